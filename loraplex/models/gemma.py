"""Gemma 2 and Gemma 3 text decoders: the Llama decoder's attention and GeGLU MLP inside Gemma's layer.

What differs from Llama: RMSNorm scales by 1 + w (in fp32, before the cast back); each block is wrapped in two
norms (before and after attention, before and after the MLP); embeddings are multiplied by sqrt(hidden_size);
attention scales q·k by query_pre_attn_scalar ** -0.5; layers alternate between a sliding window and global
attention. Gemma 2 soft-caps attention scores and the final logits (cap · tanh(x / cap)); Gemma 3 normalises
each query and key head (q_norm, k_norm) and turns its sliding layers with a RoPE of its own base.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from loraplex.kernels.backend import AttentionMetadata, LoRABatch, TorchBackend
from loraplex.models.llama import MLP, Attention, LlamaForCausalLM, Module, RMSNorm, RotaryEmbedding
from loraplex.models.model_config import ModelConfig


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) · (1 + w), in fp32 then cast back (the weight is stored as w; a fresh one is zero)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        mean_square = torch.linalg.vecdot(h, h).unsqueeze_(-1).div_(h.shape[-1])
        return (h * mean_square.add_(self.eps).rsqrt_()).mul_(1.0 + self.weight.float()).to(x.dtype)


class GemmaDecoderLayer(Module):
    def __init__(self, config: ModelConfig, backend: TorchBackend, dtype: torch.dtype, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, backend, dtype, layer, norm=GemmaRMSNorm)
        self.mlp = MLP(config, backend, dtype)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps, dtype)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps, dtype)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps, dtype)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps, dtype)
        self.local = config.local_rope_theta is not None and config.is_sliding(layer)

    def forward(self, rope: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata,
                lora: LoRABatch | None) -> torch.Tensor:
        x += self.post_attention_layernorm(self.self_attn(rope, self.input_layernorm(x), meta, lora))
        return x.add_(self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), lora)))


class GemmaModel(Module):
    def __init__(self, config: ModelConfig, backend: TorchBackend, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        # sqrt(hidden_size) rounded to the model's dtype first, as transformers multiplies by it
        self.embed_scale = torch.tensor(config.embed_scale, dtype=dtype, device="cpu").item()
        self.rotary = RotaryEmbedding(config)
        self.local_rotary = None  # Gemma 3's sliding layers: plain RoPE of base local_rope_theta
        if config.local_rope_theta is not None:
            local = dataclasses.replace(config, rope_theta=config.local_rope_theta,
                                        rope_scaling={"rope_type": "default"})
            self.local_rotary = RotaryEmbedding(local)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, backend, dtype, i) for i in range(config.num_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                lora: LoRABatch | None):
        x = self.embed_tokens(input_ids)
        x *= self.embed_scale
        rope = self.rotary.lookup(positions, x.dtype)
        local_rope = self.local_rotary.lookup(positions, x.dtype) if self.local_rotary is not None else rope
        for layer in self.layers:
            x = layer(local_rope if layer.local else rope, x, meta, lora)
        return self.norm(x)


class GemmaForCausalLM(LlamaForCausalLM):
    @staticmethod
    def make_model(config: ModelConfig, backend: TorchBackend, dtype: torch.dtype) -> Module:
        return GemmaModel(config, backend, dtype)

    def build_rope(self, device: torch.device, max_positions: int) -> None:
        super().build_rope(device, max_positions)
        if self.model.local_rotary is not None:
            self.model.local_rotary.build(device, max_positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits.div_(cap)).mul_(cap)
