#!/usr/bin/env bash
# Every GPU test and the GPU benchmarks, in one run, with every result in one file.
#
#   benchmarks/gpu_suite.sh                 # results in $OUT/gpu_suite.txt, or benchmarks/gpu_results/
#   GPU_SUITE_SKIP_BENCH=1 benchmarks/gpu_suite.sh    # the tests only
#
# What it runs, on CUDA (about 5 minutes on one H100/H200; budget: 8):
#   1. the tests marked `gpu`: the transformers and peft parity suites in fp32 on both kernel backends
#      (greedy tokens identical to the fp32 references), the bf16 engine against the fp32 reference
#      (tests/engine/test_bf16_parity.py states the tolerance and the greedy-agreement rate), and the
#      Triton kernels' bf16 tests against their torch twins;
#   2. every kernel test on CUDA (fp32/fp16 against the twins: tests/kernels picks CUDA when it is there);
#   3. the GPU benchmarks of benchmarks/BENCHMARKS.md: offline throughput against transformers.generate
#      and multi-adapter throughput against peft, in bf16.
# On a machine without a CUDA GPU it says so and exits 77 (the "skipped" status of automake and
# meson), running nothing.
#
# On the device machine (python 3.12, torch 2.11, triton 3.6, transformers and peft in the image),
# nothing is installed: loraplex runs from this checkout through PYTHONPATH, and wheels carried in
# .whl/ (see the device README) are unpacked into /tmp/site first when there are any.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_suite: no CUDA GPU here (torch.cuda.is_available() is False, or torch is missing): nothing was run."
    echo "gpu_suite: run it on a machine with an NVIDIA GPU; on the CPU, 'python -m pytest' runs everything else."
    exit 77
fi

RESULTS_DIR=${OUT:-benchmarks/gpu_results}
mkdir -p "$RESULTS_DIR"
RESULTS="$RESULTS_DIR/gpu_suite.txt"
: >"$RESULTS"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
status=0

section() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)" | tee -a "$RESULTS"; }
# run LIMIT_SECONDS COMMAND...: output to the terminal and the results file; a failure is remembered
run() {
    local limit=$1; shift
    echo "\$ $*" | tee -a "$RESULTS"
    timeout "$limit" "$@" 2>&1 | tee -a "$RESULTS"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "gpu_suite: exit status $rc" | tee -a "$RESULTS"; status=1; }
}

section "machine"
run 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run 60 "$PY" -c 'import torch, triton, transformers, peft; print("python", __import__("sys").version.split()[0],
"torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'

section "tests marked gpu (parity in fp32 on both backends, bf16 against fp32, kernels in bf16)"
run 300 "$PY" -m pytest -q -rP -m gpu -p no:cacheprovider tests/engine/test_hf_parity.py tests/engine/test_bf16_parity.py \
    tests/adapters/test_peft_parity.py tests/kernels

section "kernel tests on CUDA (fp32/fp16 against the torch twins)"
run 180 "$PY" -m pytest -q -m "not gpu" -p no:cacheprovider tests/kernels

if [ -z "${GPU_SUITE_SKIP_BENCH:-}" ]; then
    section "benchmark: offline throughput, loraplex against transformers.generate (bf16)"
    run 120 "$PY" benchmarks/offline_throughput.py --device cuda --dtype bfloat16 --num-requests 64 \
        --prompt-len 128 --output-len 128 --repeats 3
    section "benchmark: multi-adapter throughput, loraplex against peft (bf16)"
    run 150 "$PY" benchmarks/multi_lora_throughput.py --device cuda --dtype bfloat16 --num-requests 256 \
        --output-len 64 --repeats 3 --adapter-counts 1,8,64,256 --peft-adapters 8,64
fi

section "done: $([ $status -eq 0 ] && echo 'every step passed' || echo 'some step FAILED (see above)')"
exit $status
