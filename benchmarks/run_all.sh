#!/usr/bin/env bash
# Every benchmark in one command: the offline figures of the earlier issues, the server against the
# engine, and a loopback load-test sweep over the number of adapters (1, 16, 128, 512 on the tiny demo
# model, Zipf popularity). Each writes its table to $OUT/<name>.md (with the machine, the date, the
# commit and the command on top); the sweep also writes its JSON and plots to $OUT/loadtest/.
# benchmarks/BENCHMARKS.md records the figures from these files by hand, with their commands.
#
#   benchmarks/run_all.sh                      # everything (about 25 minutes on 2 CPU cores)
#   QUICK=1 benchmarks/run_all.sh              # shorter runs and a smaller sweep (1, 16): a smoke test
#   ONLY="sweep" benchmarks/run_all.sh         # some of: offline multi_lora adapter_kinds server
#                                              #          composition merge shared_cpu sweep
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/$(date -u +%Y-%m-%d)}
ONLY=${ONLY:-offline multi_lora adapter_kinds server composition merge shared_cpu sweep}
QUICK=${QUICK:-}
mkdir -p "$OUT"
PY=${PYTHON:-python}

header() {  # the machine, the date, the commit and the command, on top of every table
  echo "<!-- $(uname -m), $(nproc) cores, $($PY -c 'import torch; print("torch", torch.__version__)'), $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), command: $* -->"
}

run() {  # run NAME COMMAND...: the command's stdout, under its header, to $OUT/NAME.md
  local name=$1; shift
  case " $ONLY " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name: $*" >&2
  { header "$@"; "$@"; } > "$OUT/$name.md"
}

if [[ -n $QUICK ]]; then
  run offline $PY benchmarks/offline_throughput.py --num-requests 16 --output-len 16
  run server $PY benchmarks/server_throughput.py --num-requests 16 --output-len 16
  SWEEP=${SWEEP:-1,16}; DURATION=${DURATION:-10}
else
  run offline $PY benchmarks/offline_throughput.py
  run multi_lora $PY benchmarks/multi_lora_throughput.py
  run adapter_kinds $PY benchmarks/adapter_kinds_throughput.py
  run server $PY benchmarks/server_throughput.py
  run composition $PY benchmarks/composition_ttft.py
  run merge $PY benchmarks/merge_vs_peft.py
  run shared_cpu $PY benchmarks/shared_cpu.py --prompts 4 --tokens 32 --rounds 2
  SWEEP=${SWEEP:-1,16,128,512}; DURATION=${DURATION:-30}
fi

case " $ONLY " in *" sweep "*)
  # The sweep: a demo server on a free loopback port, the load generator uploading N copies of the
  # tiny model's `alpha` adapter (as N adapters), 16 closed-loop clients, Zipf(1.0) popularity.
  work=$(mktemp -d)
  trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
  $PY -m loraplex.cli demo-model --tiny "$work/demo" >/dev/null
  port=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  $PY -m loraplex.cli serve --model "$work/demo" --data-dir "$work/home" --port "$port" --device cpu \
    --dtype float32 --max-loras 8 --max-cpu-adapters 64 --max-adapter-size 64MiB --log-level warning &
  server=$!
  for _ in $(seq 600); do
    $PY -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null && break
    sleep 0.2
  done
  mkdir -p "$OUT/loadtest"
  cmd=($PY -m loadtest --base-url "http://127.0.0.1:$port/v1" --adapters-from "$work/demo/adapters/alpha"
       --sweep "adapters=$SWEEP" --popularity zipf:1.0 --arrival concurrency --concurrency 16
       --prompt-len 32 --output-len 32 --ignore-eos --duration "$DURATION" --slo-ttft 1.0
       --output "$OUT/loadtest/sweep_adapters.json" --plots "$OUT/loadtest")
  echo "== sweep: ${cmd[*]}" >&2
  { header "${cmd[@]}"; "${cmd[@]}"; } > "$OUT/sweep.md"
  ;;
esac
echo "results in $OUT" >&2
