"""Which kernel backend an engine gets: `EngineConfig.kernel_backend` (auto | torch | triton)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from loraplex.config import EngineConfig
from loraplex.errors import ErrorKind, LoraplexError
from loraplex.kernels.backend import TorchBackend, select_backend

CPU = torch.device("cpu")


def test_auto_is_torch_on_the_cpu():
    backend = select_backend("auto", CPU, 32, torch.float32)
    assert type(backend) is TorchBackend


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    """`code` in a new interpreter without TRITON_INTERPRET: whether triton was imported before is the point."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_triton_on_the_cpu_turns_the_interpreter_on_before_triton_is_imported():
    result = _fresh_python("""
        import os, sys, torch
        from loraplex.kernels.backend import select_backend
        backend = select_backend("triton", torch.device("cpu"), 32, torch.float32)
        from triton.runtime.interpreter import InterpretedFunction
        from loraplex.kernels import lora_shrink
        assert backend.name == "triton" and os.environ["TRITON_INTERPRET"] == "1"
        assert isinstance(lora_shrink._lora_shrink_kernel, InterpretedFunction)
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_triton_on_the_cpu_is_refused_once_triton_was_imported_compiled():
    result = _fresh_python("""
        import torch, triton
        from loraplex.errors import LoraplexError
        from loraplex.kernels.backend import select_backend
        try:
            select_backend("triton", torch.device("cpu"), 32, torch.float32)
        except LoraplexError as e:
            assert e.field == "kernel_backend" and "TRITON_INTERPRET=1" in str(e), e
            print("refused")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "refused", result.stderr[-2000:]


@pytest.mark.parametrize(("head_dim", "dtype", "words"), [
    (48, torch.float32, "power of two"),
    (512, torch.float32, "power of two"),
    (32, torch.bfloat16, "bf16"),
])
def test_triton_refuses_what_its_kernels_cannot_run(head_dim, dtype, words):
    with pytest.raises(LoraplexError, match=words) as info:
        select_backend("triton", CPU, head_dim, dtype)
    assert info.value.field == "kernel_backend" and info.value.kind is ErrorKind.INVALID
    assert "--kernel-backend torch" in str(info.value)


def test_the_engine_option_is_validated():
    assert EngineConfig().kernel_backend == "auto"
    with pytest.raises(ValueError, match="^kernel_backend: 'cuda' is not one of auto, torch, triton"):
        EngineConfig(kernel_backend="cuda")


def test_the_engine_uses_the_backend_it_is_given(demo_dir):
    from loraplex import LLM

    # Triton on the CPU only where the tests run it interpreted (no CUDA): see tests/conftest.py
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("torch", "triton"):
        llm = LLM(model=str(demo_dir), dtype="float32", device=device, max_model_len=64, kv_cache_memory="16MiB",
                  kernel_backend=name)
        assert llm.engine.model.backend.name == name
        layer = llm.engine.model.model.layers[0]
        assert layer.self_attn.qkv_proj.backend is llm.engine.model.backend
