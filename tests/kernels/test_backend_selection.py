"""Which kernel backend an engine gets: `EngineConfig.kernel_backend` (auto | torch | triton)."""

from __future__ import annotations

import pytest
import torch

from loraplex.config import EngineConfig
from loraplex.errors import ErrorKind, LoraplexError
from loraplex.kernels.backend import TorchBackend, TritonBackend, select_backend

CPU = torch.device("cpu")


def test_auto_is_torch_on_the_cpu():
    backend = select_backend("auto", CPU, 32, torch.float32)
    assert type(backend) is TorchBackend


def test_triton_on_the_cpu_runs_the_interpreter():
    backend = select_backend("triton", CPU, 32, torch.float32)
    assert isinstance(backend, TritonBackend) and backend.name == "triton"
    from triton.runtime.interpreter import InterpretedFunction

    from loraplex.kernels import lora_shrink

    assert isinstance(lora_shrink._lora_shrink_kernel, InterpretedFunction)


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

    for name in ("torch", "triton"):
        llm = LLM(model=str(demo_dir), dtype="float32", device="cpu", max_model_len=64, kv_cache_memory="16MiB",
                  kernel_backend=name)
        assert llm.engine.model.backend.name == name
        layer = llm.engine.model.model.layers[0]
        assert layer.self_attn.qkv_proj.backend is llm.engine.model.backend
