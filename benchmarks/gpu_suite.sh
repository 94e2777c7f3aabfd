#!/usr/bin/env bash
# Every GPU test and the GPU benchmarks, in one run, with every result in one file.
#
#   benchmarks/gpu_suite.sh                 # results in $OUT/gpu_suite.txt, or benchmarks/gpu_results/
#   GPU_SUITE_SKIP_BENCH=1 benchmarks/gpu_suite.sh    # the tests only
#
# What it runs, on CUDA, in this order (each step under its own time limit; SUITE_BUDGET seconds in all,
# default 500: a step that would not fit in what is left is skipped and said so):
#   1. tests: every test marked `gpu` (the transformers and peft parity suites in fp32 on both kernel
#      backends, greedy tokens identical; the bf16 engine against the fp32 reference with the tolerance
#      and greedy-agreement rate tests/engine/test_bf16_parity.py states; DoRA, sparse, Qwen3, merges
#      on CUDA; the kernels' bf16 tests), then every other kernel test on CUDA (fp32/fp16 against the
#      torch twins), each in parallel worker processes;
#   2. decode: a Llama-3-8B-shaped model with random bf16 weights (--load-format dummy, nothing
#      downloaded), decode tokens/s at batch 1, 32, 128 against the bandwidth floor, base and 16 adapters
#      (benchmarks/decode_floor.py);
#   3. sweep: the same model behind `loraplex serve`, the load generator over 1, 16, 128, 1000 rank-16
#      adapters (Zipf popularity, 64 closed-loop streaming clients, host cache and slots smaller than
#      the adapter count, so adapters load while serving);
#   4. bench: the offline benchmarks of BENCHMARKS.md in bf16: throughput against transformers.generate,
#      multi-adapter throughput against peft on a SmolLM2-135M-shaped random model.
# STEPS="tests kernels decode sweep bench" (the default) picks steps.
# On a machine without a CUDA GPU it says so and exits 77 (the "skipped" status of automake and
# meson), running nothing.
#
# On the device machine (python 3.12, torch 2.11, triton 3.6, transformers and peft in the image),
# nothing is installed: loraplex runs from this checkout through PYTHONPATH, and wheels carried in
# .whl/ are unpacked into /tmp/site first when there are any: benchmarks/gpu_wheels.sh downloads the
# ones the server needs (name .whl in the device call's carry).
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

STEPS=${STEPS:-tests kernels decode sweep bench}
BUDGET=${SUITE_BUDGET:-500}
SECONDS=0
has() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }
# fits LIMIT: is there time left for a step of LIMIT seconds?
fits() {
    if [ $((SECONDS + $1)) -gt "$BUDGET" ]; then
        echo "gpu_suite: skipped, $1 s would not fit in the $((BUDGET - SECONDS)) s left of SUITE_BUDGET" | tee -a "$RESULTS"
        status=1; return 1
    fi
}
WORKERS=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 6" || echo "")
# Six test processes on 16 cores: two CPU threads each, waiting passively (each process taking every core,
# spinning, is what made the first device run's tests crawl; see BENCHMARKS.md, "A shared CPU")
export OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE

# a test that hangs fails alone (pytest-timeout, where installed) instead of using up the step
PER_TEST=$("$PY" -c 'import pytest_timeout' 2>/dev/null && echo "--timeout 120" || echo "")
if has tests; then
    section "tests marked gpu (parity in fp32 on both backends, bf16 against fp32, kernels in bf16)"
    # -v: each test's outcome is in the results file as it ends, even when the step runs out of time
    fits 180 && run 180 "$PY" -m pytest -v -rfE --durations 8 $WORKERS $PER_TEST -m gpu -p no:cacheprovider tests
fi
if has kernels; then
    section "kernel tests on CUDA (fp32/fp16 against the torch twins)"
    fits 120 && run 120 "$PY" -m pytest -q -rfE $WORKERS $PER_TEST -m "not gpu" -p no:cacheprovider tests/kernels
fi

work=$(mktemp -d)
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT
if has decode || has sweep; then
    "$PY" benchmarks/shaped_model.py "$work/llama3-8b" >/dev/null
fi

if has decode; then
    section "decode against the bandwidth floor: Llama-3-8B shape, random bf16 weights"
    fits 150 && run 150 "$PY" benchmarks/decode_floor.py "$work/llama3-8b" --device cuda --dtype bfloat16 \
        --batches 1,32,128 --adapters 16 --json "$RESULTS_DIR/decode_floor.json"
fi

if has sweep && fits 180; then
    section "load-test sweep: Llama-3-8B shape behind loraplex serve, 1 -> 1000 rank-16 adapters"
    "$PY" -c 'import loraplex.api.server, loadtest.cli' 2>&1 | tail -1 | tee -a "$RESULTS"  # a missing wheel, said at once
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$PY" -m loraplex.cli serve --model "$work/llama3-8b" --load-format dummy --data-dir "$work/home" \
        --port "$port" --device cuda --dtype bfloat16 --max-loras 32 --max-cpu-adapters 128 --max-lora-rank 16 \
        --max-num-seqs 128 --allowed-local-adapter-dir "$work" --log-level warning >"$RESULTS_DIR/server.log" 2>&1 &
    server=$!
    for _ in $(seq 300); do
        "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null && break
        sleep 0.5
    done
    mkdir -p "$work/loadtest"
    run 160 "$PY" -m loadtest --base-url "http://127.0.0.1:$port/v1" --adapters-from "$work/llama3-8b/adapters/r16" \
        --register vllm --sweep "adapters=${SWEEP:-1,16,128,1000}" --popularity zipf:1.0 --arrival concurrency \
        --concurrency 64 --prompt-len 128 --output-len 128 --ignore-eos --duration "${DURATION:-20}" \
        --slo-ttft 1.0 --output "$work/loadtest/sweep_adapters.json" --plots "$work/loadtest" --quiet
    kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; server=""
    tar -C "$work" -czf "$RESULTS_DIR/loadtest.tgz" loadtest
fi

if has bench; then
    section "benchmark: offline throughput, loraplex against transformers.generate (bf16)"
    fits 100 && run 100 "$PY" benchmarks/offline_throughput.py --device cuda --dtype bfloat16 --num-requests 64 \
        --prompt-len 128 --output-len 128 --repeats 3
    section "benchmark: multi-adapter throughput, loraplex against peft (bf16, SmolLM2-135M shape)"
    fits 150 && run 150 "$PY" benchmarks/multi_lora_throughput.py --shape smollm2-135m --device cuda \
        --dtype bfloat16 --num-requests 256 --output-len 64 --repeats 3 --adapter-counts 1,8,64,256 --peft-adapters 8,64
fi

section "done: $([ $status -eq 0 ] && echo 'every step passed' || echo 'some step FAILED (see above)')"
exit $status
