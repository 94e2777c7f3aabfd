"""loraplex: one frozen base model, many adapters, one batch."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Loaded on first use, so that `loraplex --help` and `--version` answer without importing torch.
_EXPORTS = {
    "LLM": "loraplex.llm",
    "EngineConfig": "loraplex.config",
    "LLMEngine": "loraplex.engine.llm_engine",
    "RequestOutput": "loraplex.engine.llm_engine",
    "SamplingParams": "loraplex.engine.sampling",
}
__all__ = ["LLM", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]

if TYPE_CHECKING:
    from loraplex.config import EngineConfig
    from loraplex.engine.llm_engine import LLMEngine, RequestOutput
    from loraplex.engine.sampling import SamplingParams
    from loraplex.llm import LLM


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loraplex' has no attribute {name!r}")
