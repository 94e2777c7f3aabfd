#!/usr/bin/env bash
# Wheels for the device machine: the packages `loraplex serve` and the load generator need that the
# device's image lacks (it has torch, triton, transformers, peft, numpy, httpx, matplotlib, pytest ...,
# and no package index), at the versions installed here, for its Python 3.12 on x86-64. They go to
# .whl/ (ignored by git); name `.whl` in the device call's `carry`, and gpu_suite.sh unpacks them.
#
#   benchmarks/gpu_wheels.sh            # run in the checkout's root, from the virtual environment
set -euo pipefail
cd "$(dirname "$0")/.."
# The image's list is in the device library's KINDS.md; these are loraplex's dependencies missing from it.
MISSING=(gguf fastapi starlette pydantic pydantic-core annotated-types typing-inspection opentelemetry-api
         uvicorn python-multipart google-re2 xgrammar apache-tvm-ffi)
pins=()
for name in "${MISSING[@]}"; do
    version=$(python -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
    [ -n "$version" ] || { echo "gpu_wheels: $name is not installed here; install loraplex first" >&2; exit 1; }
    pins+=("$name==$version")
done
mkdir -p .whl
python -m pip download -q --no-deps --only-binary :all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .whl "${pins[@]}"
ls .whl
