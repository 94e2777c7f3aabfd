"""Mutation check: break one term of a kernel backend and show that the test suite fails.

    python tests/mutation_check.py            # every mutation
    python tests/mutation_check.py triton-lora torch-attention

Each mutation copies the package and the tests into a temporary directory, changes one line of the
copy, and runs the tests that must catch it there (`-x`: the first failure is enough). The check
passes when every mutated copy fails its tests; a mutation that survives is printed, and the exit
status is 1. The working tree is never touched.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKEND = "loraplex/kernels/backend.py"


@dataclass(frozen=True)
class Mutation:
    file: str
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: the tests that must fail


MUTATIONS = {
    # the Triton backend adds no LoRA term
    "triton-lora": Mutation(
        BACKEND,
        "        h = self._shrink(x, weights.a, weights.ranks, batch.meta)",
        "        h = self._shrink(x, weights.a, weights.ranks, batch.meta).mul_(0)",
        ("tests/adapters/test_peft_parity.py", "-k", "triton"),
    ),
    # the Triton backend's paged decode attention returns zeros
    "triton-attention": Mutation(
        BACKEND,
        "        return self._paged_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,",
        "        return torch.zeros_like(query) + 0 * self._paged_attention(query, k_cache, v_cache, "
        "meta.block_tables, meta.seq_lens,",
        ("tests/engine/test_hf_parity.py", "-k", "triton"),
    ),
    # the torch backend adds no LoRA term
    "torch-lora": Mutation(
        BACKEND,
        "        y[group.rows] += delta.to(y.dtype)",
        "        y[group.rows] += 0 * delta.to(y.dtype)",
        ("tests/adapters/test_peft_parity.py", "-k", "torch"),
    ),
    # the torch backend's attention returns zeros
    "torch-attention": Mutation(
        BACKEND,
        "        return torch_attention.attend_group(query, k_cache, v_cache, group, scale, kv)",
        "        return torch.zeros_like(torch_attention.attend_group(query, k_cache, v_cache, group, scale, kv))",
        ("tests/engine/test_hf_parity.py", "-k", "torch"),
    ),
    # the per-step LoRA layout cuts the last adapter segment one token short (seen end to end)
    "lora-layout": Mutation(
        "loraplex/kernels/lora_meta.py",
        "        seg_starts.append(num_tokens)",
        "        seg_starts.append(num_tokens - 1)",
        ("tests/adapters/test_peft_parity.py", "-k", "torch and not cuda"),
    ),
}


def run(name: str, mutation: Mutation) -> bool:
    """True when the mutated copy fails its tests (the mutation is caught)."""
    with tempfile.TemporaryDirectory(prefix=f"mutation-{name}-") as tmp:
        copy = Path(tmp)
        for part in ("loraplex", "tests"):
            shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
        target = copy / mutation.file
        text = target.read_text()
        if text.count(mutation.old) != 1:
            raise SystemExit(f"{name}: the line to mutate is not in {mutation.file} exactly once; update this script")
        target.write_text(text.replace(mutation.old, mutation.new))
        start = time.monotonic()
        # run from the copy: `python -m pytest` puts it first on sys.path, ahead of an editable install
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                 *mutation.tests], cwd=copy, capture_output=True, text=True)
        seconds = time.monotonic() - start
        last = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        caught = result.returncode == 1  # tests failed (2+ would be a crash or a usage error)
        print(f"{name:18s} {'caught' if caught else 'SURVIVED'} in {seconds:5.0f} s: {last}", flush=True)
        if result.returncode > 1:
            print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
        return caught


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", choices=[[], *MUTATIONS], help="mutations to run (default: all)")
    names = parser.parse_args().names or list(MUTATIONS)
    survived = [name for name in names if not run(name, MUTATIONS[name])]
    print("every mutation was caught" if not survived else f"survived: {', '.join(survived)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
