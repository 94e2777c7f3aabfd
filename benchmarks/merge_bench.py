"""Merge benchmark: loraplex.arithmetic against PEFT's `add_weighted_adapter`, side by side on CPU.

Run (from the repository root, in the venv; several tens of minutes on 2 cores, almost all of it
PEFT's dense SVDs of 14336x4096 matrices):

    python benchmarks/merge_bench.py
    python benchmarks/merge_bench.py --layers 1 --adapters 4 --rank 8 --peft-svd reduced   # fewer SVDs
    python benchmarks/merge_bench.py --hidden-size 512 --intermediate-size 1024            # a smoke test

What it measures
----------------
Inputs: a `LlamaForCausalLM(LlamaConfig(...))` with random weights and Llama-3-8B's layer shapes
(hidden 4096, intermediate 14336, 32 attention heads / 8 KV heads, head_dim 128), --layers layers and a
256-token vocabulary, wrapped by `get_peft_model`; --adapters LoRA adapters of rank --rank
(lora_alpha = r, so every scale is 1) on all seven projections, added with `add_adapter` and random
A and B (`init_lora_weights=False`). The parent process builds them once and writes every A and B to a
safetensors file; each measured side reads that file, so loraplex and PEFT merge the SAME tensors
(the PEFT side copies them into its freshly built model's lora_A / lora_B).

Merges, with equal weights 1/n:
  - svd to rank --rank. loraplex: `merge(..., MergeParams(method="svd", rank=r))`, computed from the
    factors (QR of the stacked B's and A's, SVD of a small core). PEFT:
    `add_weighted_adapter(..., combination_type="svd", svd_rank=r)`, which forms each dense ΔW sum and runs
    `torch.linalg.svd` on it; once with PEFT's default `svd_full_matrices=True` ("svd") and once with its
    reduced `svd_full_matrices=False` (less work; "svd, peft reduced"), as --peft-svd selects.
  - ties at density 0.5, parameter space (on A and B; the same maths on both sides).

Time: wall clock (`time.perf_counter`) of the merge call alone, in a process whose inputs are already
built (model construction, PEFT wrapping and reading the tensors are outside it); the best of --repeats
calls (default 1: a single call, as a user runs it). PEFT's time includes what `add_weighted_adapter`
does besides the arithmetic (injecting the new, zero-filled adapter into the model).

Peak memory: each (side, method) runs in its own fresh subprocess (`python merge_bench.py --side ...`).
After the inputs are built and `gc.collect()` has run, the process resets the kernel's resident-set
high-water mark (writing "5" to /proc/self/clear_refs, Linux >= 4.0), records its RSS, runs the merge
once, then reads the high-water mark (VmHWM in /proc/self/status; not `getrusage(...).ru_maxrss`, which
on Linux also holds the RSS that the forking parent had at exec, and the parent here held the model).
"Peak extra" = high-water mark - RSS before the merge: the most resident memory the merge (with its
result, which it keeps) added at any instant, as the kernel counts it, not sampled. The inputs are
resident before the reset (copied out of the safetensors file, whose pages would otherwise be faulted
in during the merge and counted as its memory). Where clear_refs cannot be written the script stops
rather than report a number that would include input construction.

The number is that of a first merge in a fresh process, so it includes one-time costs (library code
paged in, the allocator's heap growing); a second merge in the same process needs less.

Check: the parent compares the results on every module. svd: relative Frobenius differences of the
merged ΔW = B A between the sides, and of each side from the exact rank-r truncation, which the script
computes itself in float64 from the inputs' factors (checked once against a dense float64 SVD on the
smallest module), with the spectral gap σ_r / σ_r+1 that conditions the truncation. A module passes when
the sides agree to 1e-4, or when they do not but loraplex is within 1e-4 of the exact truncation and
nearer to it than PEFT (reported as "ok, peft off"). ties: max |A_l - A_p| and max |B_l - B_p| <= 1e-5,
and both scales 1.

Threads: torch's default (one per core); other processes on the machine share the CPU, so the load
average is printed before, after, and as each measured process starts.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
              head_dim=128)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VOCAB = 256
DENSITY = 0.5
SVD_TOL = 1e-4
TIES_TOL = 1e-5
# label -> (method, peft's svd_full_matrices)
CASES = {"svd": ("svd", True), "svd, peft reduced": ("svd", False), "ties": ("ties", None)}


# ---------------------------------------------------------------------------------------------------- inputs

def build_peft_model(layers: int, adapters: int, rank: int, seed: int, shapes: dict):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**shapes, num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS), init_lora_weights=False,
                      lora_dropout=0.0)
    peft_model = get_peft_model(model, lora, adapter_name="a0")
    for i in range(1, adapters):
        peft_model.add_adapter(f"a{i}", lora)
    return peft_model


def lora_layers(peft_model):
    """{(layer, module): the PEFT LoraLayer} for every targeted projection."""
    out = {}
    for layer_idx, layer in enumerate(peft_model.base_model.model.model.layers):
        for name in TARGETS:
            part = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            out[(layer_idx, name)] = getattr(part, name)
    return out


def tensor_key(adapter: str, layer: int, module: str, half: str) -> str:
    return f"{adapter}.{layer}.{module}.{half}"


def prepare_inputs(args, path: Path) -> None:
    """Build the PEFT model once and write every adapter's A and B (fp32) to `path`."""
    from safetensors.torch import save_file

    model = build_peft_model(args.layers, args.adapters, args.rank, args.seed, shapes_of(args))
    tensors = {}
    for (layer, module), target in lora_layers(model).items():
        for i in range(args.adapters):
            name = f"a{i}"
            assert target.scaling[name] == 1.0, target.scaling[name]
            tensors[tensor_key(name, layer, module, "A")] = target.lora_A[name].weight.detach().contiguous()
            tensors[tensor_key(name, layer, module, "B")] = target.lora_B[name].weight.detach().contiguous()
    save_file(tensors, str(path))


def shapes_of(args) -> dict:
    return {**SHAPES, "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size}


def keys(layers: int) -> list[tuple[int, str]]:
    return [(layer, module) for layer in range(layers) for module in TARGETS]


# ---------------------------------------------------------------------------------------------------- memory

def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM, hence ru_maxrss) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return abs(_status_mib("VmHWM") - _status_mib("VmRSS")) < 1.0


def peak_mib() -> float:
    """The RSS high-water mark since the last reset_peak()."""
    return _status_mib("VmHWM")


# ---------------------------------------------------------------------------------------------------- one side

def run_side(args) -> None:
    """Child process: build the inputs, measure one merge, write its result, print one JSON line."""
    from safetensors.torch import load_file, save_file

    method, full_matrices = CASES[args.case]
    # copies in anonymous memory: load_file's tensors may be backed by the file's pages, which would become
    # resident (and count as the merge's) only when the merge first reads them
    tensors = {key: value.clone() for key, value in load_file(args.inputs).items()}
    n, weights = args.adapters, [1.0 / args.adapters] * args.adapters

    if args.side == "loraplex":
        from loraplex.adapters_store.formats import LoRAAdapter, LoRAModule
        from loraplex.arithmetic import MergeParams, merge

        adapters = [LoRAAdapter(name=f"a{i}", modules={
            (layer, module): LoRAModule(a=tensors[tensor_key(f"a{i}", layer, module, "A")],
                                        b=tensors[tensor_key(f"a{i}", layer, module, "B")], scale=1.0)
            for layer, module in keys(args.layers)}) for i in range(n)]
        params = (MergeParams(method="svd", rank=args.rank) if method == "svd"
                  else MergeParams(method="ties", density=DENSITY))

        def run(i: int):
            return merge(adapters, weights, params, f"merged{i}")

        def collect(out) -> dict[str, torch.Tensor]:
            result = {}
            for (layer, module), m in out.modules.items():
                assert m.scale == 1.0, m.scale
                result[f"{layer}.{module}.A"], result[f"{layer}.{module}.B"] = m.a, m.b
            return result
    else:
        model = build_peft_model(args.layers, n, args.rank, args.seed, shapes_of(args))
        targets = lora_layers(model)
        with torch.no_grad():  # the very tensors the loraplex side merges
            for (layer, module), target in targets.items():
                for i in range(n):
                    target.lora_A[f"a{i}"].weight.copy_(tensors[tensor_key(f"a{i}", layer, module, "A")])
                    target.lora_B[f"a{i}"].weight.copy_(tensors[tensor_key(f"a{i}", layer, module, "B")])
        del tensors
        names = [f"a{i}" for i in range(n)]
        kwargs = (dict(combination_type="svd", svd_rank=args.rank, svd_full_matrices=full_matrices)
                  if method == "svd" else dict(combination_type="ties", density=DENSITY))

        def run(i: int):
            model.add_weighted_adapter(names, weights, f"merged{i}", **kwargs)
            return f"merged{i}"

        def collect(out) -> dict[str, torch.Tensor]:
            result = {}
            for (layer, module), target in targets.items():
                assert target.scaling[out] == 1.0, target.scaling[out]
                result[f"{layer}.{module}.A"] = target.lora_A[out].weight.detach().clone()
                result[f"{layer}.{module}.B"] = target.lora_B[out].weight.detach().clone()
            return result

    load = os.getloadavg()[0]
    gc.collect()
    exact_peak = reset_peak()
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    out = run(0)
    seconds = [time.perf_counter() - start]
    peak = peak_mib()
    first = out
    for i in range(1, args.repeats):
        start = time.perf_counter()
        run(i)
        seconds.append(time.perf_counter() - start)
    save_file({k: v.contiguous() for k, v in collect(first).items()}, args.result)
    print(json.dumps(dict(side=args.side, case=args.case, seconds=min(seconds), all_seconds=seconds,
                          rss_before_mib=before, peak_mib=peak, peak_extra_mib=peak - before,
                          exact_peak=exact_peak, threads=torch.get_num_threads(), load=load)))


# ---------------------------------------------------------------------------------------------------- parent

def spawn(args, side: str, case: str, inputs: Path, result: Path) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--side", side, "--case", case, "--inputs", str(inputs),
               "--result", str(result), "--layers", str(args.layers), "--adapters", str(args.adapters),
               "--rank", str(args.rank), "--seed", str(args.seed), "--repeats", str(args.repeats),
               "--hidden-size", str(args.hidden_size), "--intermediate-size", str(args.intermediate_size)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{side} / {case} failed (exit {done.returncode})")
    line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
    report = json.loads(line)
    if not report["exact_peak"]:
        raise SystemExit("cannot reset the RSS high-water mark (/proc/self/clear_refs); the peak would include "
                         "input construction")
    print(f"  {side:8s} {case:18s} {report['seconds']:9.2f} s  peak extra {report['peak_extra_mib']:8.1f} MiB "
          f"(RSS before {report['rss_before_mib']:.0f} MiB, VmHWM {report['peak_mib']:.0f} MiB, "
          f"{report['threads']} threads, 1-min load average at start {report['load']:.2f})", flush=True)
    return report


def exact_truncation(inputs: dict[str, torch.Tensor], layer: int, module: str, adapters: int,
                     rank: int) -> tuple[torch.Tensor, float]:
    """The exact best rank-`rank` ΔW of Σ_i (1/n) B_i A_i (float64, dense [out, in]) and the spectral gap
    σ_rank / σ_rank+1 that conditions it. Computed here, not by loraplex: the sum is B A with B = [B_i / n]
    and A = [A_i] stacked, B = Qb Rb, Aᵀ = Qa Ra, so its singular triplets are those of the small core
    Rb Raᵀ (exact algebra; float64 leaves ~1e-15 of error)."""
    b = torch.cat([inputs[tensor_key(f"a{i}", layer, module, "B")].double() / adapters for i in range(adapters)], 1)
    a = torch.cat([inputs[tensor_key(f"a{i}", layer, module, "A")].double() for i in range(adapters)], 0)
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, sv, vh = torch.linalg.svd(r_b @ r_a.T)
    gap = float(sv[rank - 1] / sv[rank]) if sv.numel() > rank else float("inf")
    return (q_b @ (u[:, :rank] * sv[:rank])) @ (q_a @ vh[:rank].T).T, gap


def dense_reference_check(inputs: dict[str, torch.Tensor], adapters: int, rank: int) -> str:
    """The float64 reference against a dense float64 SVD of the summed ΔW, on the smallest module."""
    layer, module = 0, "k_proj"
    reference, _ = exact_truncation(inputs, layer, module, adapters, rank)
    dense = sum(inputs[tensor_key(f"a{i}", layer, module, "B")].double()
                @ inputs[tensor_key(f"a{i}", layer, module, "A")].double() for i in range(adapters)) / adapters
    u, sv, vh = torch.linalg.svd(dense, full_matrices=False)
    truth = (u[:, :rank] * sv[:rank]) @ vh[:rank]
    rel = float(torch.linalg.matrix_norm(reference - truth) / torch.linalg.matrix_norm(truth))
    return (f"float64 reference vs a dense float64 SVD on layers.{layer}.{module} {tuple(dense.shape)}: "
            f"rel. difference {rel:.1e}")


def rel_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y))


def check(case: str, lp_path: Path, peft_path: Path, args, inputs: dict[str, torch.Tensor],
          references: dict) -> tuple[bool, list[str]]:
    """svd: ok when loraplex and PEFT agree to SVD_TOL; "ok, peft off" when they do not but loraplex is within
    SVD_TOL of the exact (float64) truncation and nearer to it than PEFT; else FAIL. ties: tensor for tensor."""
    from safetensors.torch import load_file

    lp, pf = load_file(str(lp_path)), load_file(str(peft_path))
    lines, ok = [], True
    method = CASES[case][0]
    for layer, module in keys(args.layers):
        a_l, b_l = lp[f"{layer}.{module}.A"], lp[f"{layer}.{module}.B"]
        a_p, b_p = pf[f"{layer}.{module}.A"], pf[f"{layer}.{module}.B"]
        same = a_l.shape == a_p.shape and b_l.shape == b_p.shape
        name = f"layers.{layer}.{module}"
        if method == "svd":
            if (layer, module) not in references:
                references[(layer, module)] = exact_truncation(inputs, layer, module, args.adapters, args.rank)
            exact, gap = references[(layer, module)]
            d_l, d_p = (b_l.double() @ a_l.double()), (b_p.double() @ a_p.double())
            rel, err_l, err_p = rel_diff(d_l, d_p), rel_diff(d_l, exact), rel_diff(d_p, exact)
            del d_l, d_p
            status = ("ok" if same and rel < SVD_TOL else
                      "ok, peft off" if same and err_l < SVD_TOL and err_l <= err_p else "FAIL")
            lines.append(f"{name:20s} {b_l.shape[0]:5d}x{a_l.shape[1]:<5d} rank {a_l.shape[0]}/{a_p.shape[0]}  "
                         f"loraplex vs peft {rel:.2e}  vs exact: loraplex {err_l:.2e}, peft {err_p:.2e}  "
                         f"gap s{args.rank}/s{args.rank + 1} {gap:.4f}  {status}")
            good = status != "FAIL"
        else:
            da = float((a_l - a_p).abs().max()) if same else float("inf")
            db = float((b_l - b_p).abs().max()) if same else float("inf")
            good = da <= TIES_TOL and db <= TIES_TOL
            lines.append(f"{name:20s} A {tuple(a_l.shape)} max|dA| = {da:.2e}  B {tuple(b_l.shape)} max|dB| = "
                         f"{db:.2e}  {'ok' if good else 'FAIL'}")
        ok &= good
    return ok, lines


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    from safetensors.torch import load_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16, help="rank of every input and of the svd merge")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="merge calls per side; the best time is reported")
    parser.add_argument("--peft-svd", choices=("default", "reduced", "both"), default="both",
                        help="PEFT's svd_full_matrices: True (its default), False, or a row for each")
    parser.add_argument("--hidden-size", type=int, default=SHAPES["hidden_size"], help="only to try the script out")
    parser.add_argument("--intermediate-size", type=int, default=SHAPES["intermediate_size"],
                        help="only to try the script out")
    parser.add_argument("--methods", default="svd,ties", help="comma-separated: svd, ties")
    # internal: one measured side in a fresh process
    parser.add_argument("--side", choices=("loraplex", "peft"), help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=tuple(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args)
        return

    methods = [m.strip() for m in args.methods.split(",")]
    cases = []
    if "svd" in methods:
        cases += {"default": ["svd"], "reduced": ["svd, peft reduced"], "both": ["svd", "svd, peft reduced"]}[
            args.peft_svd]
    if "ties" in methods:
        cases.append("ties")

    print(f"loraplex merge benchmark: {args.adapters} adapters of rank {args.rank} (alpha = r) on "
          f"{', '.join(TARGETS)}; {args.layers} layers of Llama-3-8B shape (hidden {args.hidden_size}, "
          f"intermediate {args.intermediate_size}, {SHAPES['num_attention_heads']}/"
          f"{SHAPES['num_key_value_heads']} heads of {SHAPES['head_dim']}), vocab {VOCAB}; weights 1/n; svd to rank "
          f"{args.rank}, ties density {DENSITY} (parameter space)")
    import peft
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average before {os.getloadavg()}", flush=True)

    rows, checks, all_ok = [], [], True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = tmp / "inputs.safetensors"
        start = time.perf_counter()
        prepare_inputs(args, inputs)
        print(f"inputs built in {time.perf_counter() - start:.1f} s ({inputs.stat().st_size / 2**20:.0f} MiB of "
              "A/B); measuring each side in a fresh process:", flush=True)
        lp_reports, references = {}, {}
        input_tensors = load_file(str(inputs))
        reference_note = dense_reference_check(input_tensors, args.adapters, args.rank) if any(
            CASES[case][0] == "svd" for case in cases) else None
        for case in cases:
            method = CASES[case][0]
            if method not in lp_reports:  # loraplex has no full/reduced variant: one run per method
                lp_reports[method] = spawn(args, "loraplex", method, inputs, tmp / f"loraplex-{method}.st")
            lp = lp_reports[method]
            pf = spawn(args, "peft", case, inputs, tmp / f"peft-{case}.st")
            ok, lines = check(case, tmp / f"loraplex-{method}.st", tmp / f"peft-{case}.st", args, input_tensors,
                              references)
            all_ok &= ok
            checks.append((case, ok, lines))
            rows.append((case, lp, pf))

    print(f"\nload average after {os.getloadavg()}")
    print("\n## Correctness (loraplex vs PEFT, same input tensors)\n")
    print(f"svd: relative Frobenius differences of the merged ΔW = B A, between the two sides and of each side from "
          f"the exact rank-{args.rank} truncation (float64, computed by this script from the inputs' factors; "
          f"{reference_note}). gap: σ{args.rank}/σ{args.rank + 1} of the summed ΔW; near 1 the truncation is "
          "ill-conditioned and float32 rounding moves it more. ok: sides agree < "
          f"{SVD_TOL:g}; 'ok, peft off': they do not, but loraplex is within {SVD_TOL:g} of the exact truncation "
          f"and nearer to it than PEFT. ties: max |A_l - A_p|, max |B_l - B_p| <= {TIES_TOL:g}.\n"
          if reference_note else "")
    for case, ok, lines in checks:
        if CASES[case][0] == "svd":
            strict = sum(line.endswith("  ok") for line in lines)
            summary = f"{strict}/{len(lines)} modules agree < {SVD_TOL:g}"
        else:
            summary = f"max abs <= {TIES_TOL:g}, {len(lines)} modules"
        print(f"{case}: {'OK' if ok else 'FAILED'} ({summary})")
        for line in lines:
            print("  " + line)

    print("\n## Time and peak memory\n")
    print("| method | loraplex time (s) | peft time (s) | speedup (peft/loraplex) | loraplex peak extra (MiB) | "
          "peft peak extra (MiB) | memory ratio (loraplex/peft) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case, lp, pf in rows:
        label = {"svd": "svd (peft svd_full_matrices=True, its default)",
                 "svd, peft reduced": "svd (peft svd_full_matrices=False)", "ties": f"ties (density {DENSITY})"}[case]
        speedup = pf["seconds"] / lp["seconds"]
        ratio = lp["peak_extra_mib"] / pf["peak_extra_mib"] if pf["peak_extra_mib"] > 0 else float("nan")
        print(f"| {label} | {lp['seconds']:.3f} | {pf['seconds']:.3f} | {speedup:.1f}x | {lp['peak_extra_mib']:.1f} "
              f"| {pf['peak_extra_mib']:.1f} | {ratio:.3f} |")
    svd_rows = [(lp, pf) for case, lp, pf in rows if CASES[case][0] == "svd"]
    if svd_rows:
        speed = min(pf["seconds"] / lp["seconds"] for lp, pf in svd_rows)
        memory = max(lp["peak_extra_mib"] / max(pf["peak_extra_mib"], 1e-9) for lp, pf in svd_rows)
        met = speed >= 5 and memory <= 2
        print(f"\nTarget (svd >= 5x faster than PEFT's dense SVD, peak memory within 2x of PEFT's or better): "
              f"{'met' if met else 'NOT met'} (worst speedup {speed:.1f}x, worst memory ratio {memory:.3f})")
    print(f"time: one merge call{'' if args.repeats == 1 else f', best of {args.repeats}'}, inputs built "
          "beforehand; peak extra: kernel RSS high-water mark during the merge minus RSS before it")
    if not all_ok:
        raise SystemExit("correctness check FAILED")


if __name__ == "__main__":
    main()
