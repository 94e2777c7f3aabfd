"""Which model class serves an architecture: the Llama decoder unless the family's layer differs."""

from __future__ import annotations

from loraplex.models.gemma import GemmaForCausalLM
from loraplex.models.llama import LlamaForCausalLM
from loraplex.models.model_config import ModelConfig


def model_class(config: ModelConfig) -> type[LlamaForCausalLM]:
    """Gemma 2 and 3 have a layer of their own (models/gemma.py); Llama, Mistral, Qwen2/3 and Phi-3 differ from
    Llama only in what ModelConfig carries (biases, q/k norms, windows, RoPE kinds, fused checkpoint tensors)."""
    return GemmaForCausalLM if config.gemma else LlamaForCausalLM
