"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a flat batch of tokens and a paged KV cache.

The model sees `(input_ids, positions, attn_meta)` for every token of the step, prefill and decode
mixed, and knows nothing of scheduling. q/k/v and gate/up are fused into one matmul each; the loader
fills them slice by slice from the checkpoint's separate tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.errors import invalid
from loraplex.kernels.backend import AttentionMetadata, LoRABatch, TorchBackend
from loraplex.models.lora import LoRASlotWeights
from loraplex.models.model_config import ModelConfig
from loraplex.models.sparse_pool import SparsePool


class Module(nn.Module):
    """nn.Module whose call goes straight to `forward`. These modules take no hooks, and the hook
    dispatch of nn.Module.__call__ cost about 3% of a CPU decode step (some 40 calls per step)."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class RMSNorm(Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the model dtype, as the reference implementation does. The mean
        # square is one dot product per row: on the CPU about 5x faster on long prompts than
        # pow + mean (or F.rms_norm, which does just that), with the same result.
        h = x.float()
        mean_square = torch.linalg.vecdot(h, h).unsqueeze_(-1).div_(h.shape[-1])
        return (h * mean_square.add_(self.eps).rsqrt_()).to(x.dtype).mul_(self.weight)


class AdaptableLinear(Module, nn.Linear):
    """A linear layer that may stack several checkpoint projections along its output (fused q/k/v,
    gate/up) and adds the LoRA term of each token's adapter slot."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, dtype: torch.dtype,
                 backend: TorchBackend) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias, dtype=dtype)
        self.output_sizes = output_sizes
        self.backend = backend
        self.lora: LoRASlotWeights | None = None  # allocated by LlamaForCausalLM.enable_lora

    def shard_rows(self, shard: int) -> slice:
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        if lora is None or self.lora is None:
            return super().forward(x)  # [num_tokens, out_features]
        dora = self.lora.any_dora(lora.active_slots)
        # DoRA (PEFT's forward): y = m/||W + s·B·A|| ⊙ (W x + s·B·A x) + bias, the factor per output row of the
        # token's slot (1 for other tokens); the bias stays out of the product.
        y = nn.functional.linear(x, self.weight) if dora else super().forward(x)
        self.backend.add_lora(y, x, self.lora, lora)
        sparse = self.lora.sparse  # (a slot with a sparse part has no DoRA factor)
        if sparse is not None and sparse.any(lora.active_slots):
            self.backend.add_sparse(y, x, sparse, lora)
        if dora:
            y *= self.lora.row_factors[lora.token_index].to(y.dtype)  # slot -1: the last row, all ones
            if self.bias is not None:
                y += self.bias
        return y


def rope_inv_freq(config: ModelConfig, max_positions: int) -> torch.Tensor:
    """[rotary_dim // 2] inverse frequencies, with Llama-3, linear or LongRoPE scaling applied. LongRoPE's
    long factors apply when the engine serves more than the original context (`max_positions` >
    original_max_position_embeddings), its short ones otherwise: one choice for every sequence, as the
    cache must hold keys rotated alike (transformers chooses per forward pass, by its longest position)."""
    dim = config.rotary_dim or config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    scaling = config.rope_scaling
    if scaling["rope_type"] == "longrope":
        long = max_positions > scaling["original_max_position_embeddings"]
        # (one per rotary frequency: ModelConfig checks their lengths)
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float64)
        return (1.0 / (factors * config.rope_theta**exponents)).float()
    inv_freq = 1.0 / (config.rope_theta**exponents)
    if scaling["rope_type"] == "linear":
        return (inv_freq / scaling["factor"]).float()
    if scaling["rope_type"] == "llama3":
        return _llama3_inv_freq(inv_freq, scaling).float()
    return inv_freq.float()


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, interpolated, scaled)


class RotaryEmbedding(Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.cos_sin: torch.Tensor | None = None  # [2, max_positions, rotary_dim], built by `build`

    def build(self, device: torch.device, max_positions: int) -> None:
        inv_freq = rope_inv_freq(self.config, max_positions).to(device)
        t = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_positions, rotary_dim // 2]
        # LongRoPE scales cos and sin by its attention factor (1 for the other kinds).
        gain = self.config.rope_scaling.get("attention_factor", 1.0)
        # x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1), is
        # x * cos + (x2, x1) * (-sin, sin): the sign goes into the table, the swap is one roll.
        cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1) * gain
        signed_sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1) * gain
        self.cos_sin = torch.stack((cos, signed_sin))

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[2, num_tokens, 1, rotary_dim]: cos and signed sin at each position, looked up once per step."""
        return self.cos_sin[:, positions].unsqueeze(2).to(dtype)

    @staticmethod
    def apply(cos_sin: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, heads, head_dim] (any strides) -> rotated, contiguous. Query and key
        heads go through together. With a partial rotary (Phi-4-mini) the first rotary_dim dims of
        each head turn and the rest pass through."""
        cos, signed_sin = cos_sin
        rotary_dim = cos.shape[-1]
        if rotary_dim < x.shape[-1]:
            return torch.cat((RotaryEmbedding.apply(cos_sin, x[..., :rotary_dim]), x[..., rotary_dim:]), dim=-1)
        swapped = x.roll(x.shape[-1] // 2, dims=-1)  # (x2, x1), a fresh tensor
        # Two products rounded apart, then added, as the reference does (a fused multiply-add would
        # round once and drift from it by an ulp).
        return (x * cos).add_(swapped.mul_(signed_sin))


class Attention(Module):
    def __init__(self, config: ModelConfig, backend: TorchBackend, dtype, layer: int, norm=RMSNorm) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = config.attention_scale or self.head_dim**-0.5
        self.window = config.window_of(layer)  # None: global attention
        self.softcap = config.attn_softcap
        self.qkv_proj = AdaptableLinear(
            config.hidden_size, [self.q_size, self.kv_size, self.kv_size], config.qkv_bias, dtype, backend
        )
        self.o_proj = AdaptableLinear(self.q_size, [config.hidden_size], config.o_bias, dtype, backend)
        if config.qk_norm:  # Qwen3, Gemma 3: each query and key head RMS-normalised before RoPE
            self.q_norm = norm(self.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = norm(self.head_dim, config.rms_norm_eps, dtype)
        self.qk_norm = config.qk_norm
        self.backend = backend
        # [num_blocks, block_size, num_kv_heads, head_dim] each, bound by the model runner.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, rope: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata,
                lora: LoRABatch | None) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x, lora)  # [num_tokens, q_size + 2 * kv_size]
        heads = self.num_heads + self.num_kv_heads
        qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, heads, self.head_dim)
        if self.qk_norm:
            qk = torch.cat((self.q_norm(qk[:, : self.num_heads]), self.k_norm(qk[:, self.num_heads:])), dim=1)
        qk = RotaryEmbedding.apply(rope, qk)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # views of [num_tokens, heads, head_dim]
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        self.backend.write_kv(k, v, self.k_cache, self.v_cache, meta)
        out = self.backend.attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.window, self.softcap)
        return self.o_proj(out.reshape(num_tokens, self.q_size), lora)


class MLP(Module):
    def __init__(self, config: ModelConfig, backend: TorchBackend, dtype: torch.dtype) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = AdaptableLinear(config.hidden_size, [size, size], config.mlp_bias, dtype, backend)
        self.down_proj = AdaptableLinear(size, [config.hidden_size], config.mlp_bias, dtype, backend)
        self.gelu = config.hidden_act == "gelu_pytorch_tanh"  # GeGLU (Gemma), else SwiGLU

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, lora).chunk(2, dim=-1)
        # In place on the fresh projection: no new [num_tokens, intermediate] tensors.
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate, inplace=True)
        return self.down_proj(act.mul_(up), lora)


class DecoderLayer(Module):
    def __init__(self, config: ModelConfig, backend: TorchBackend, dtype, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, backend, dtype, layer)
        self.mlp = MLP(config, backend, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, rope: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata,
                lora: LoRABatch | None) -> torch.Tensor:
        # x is this forward's own residual stream (from the embedding lookup): added to in place.
        x += self.self_attn(rope, self.input_layernorm(x), meta, lora)
        return x.add_(self.mlp(self.post_attention_layernorm(x), lora))


class LlamaModel(Module):
    def __init__(self, config: ModelConfig, backend: TorchBackend, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(DecoderLayer(config, backend, dtype, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                lora: LoRABatch | None):
        x = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        rope = self.rotary.lookup(positions, x.dtype)
        for layer in self.layers:
            x = layer(rope, x, meta, lora)
        return self.norm(x)


class LlamaForCausalLM(Module):
    # checkpoint projection -> (fused module, shard index)
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, backend: TorchBackend, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.backend = backend
        self.model = self.make_model(config, backend, dtype)
        self.sparse_pool: SparsePool | None = None  # allocated by enable_lora
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)

    @staticmethod
    def make_model(config: ModelConfig, backend: TorchBackend, dtype: torch.dtype) -> Module:
        return LlamaModel(config, backend, dtype)

    @property
    def checkpoint_shards(self) -> dict[str, tuple[str, int]]:
        """The fused layers' slices as the checkpoint stores them: separate tensors (q_proj, ...), or none
        where the checkpoint holds them fused already (Phi-3's qkv_proj, gate_up_proj)."""
        return {} if self.config.fused_checkpoint else self.packed_modules

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                lora: LoRABatch | None = None):
        """[num_tokens] ids and positions -> [num_tokens, hidden] final hidden states. `lora` maps
        tokens to adapter slots (None: no token uses one)."""
        return self.model(input_ids, positions, meta, lora)

    def build_rope(self, device: torch.device, max_positions: int) -> None:
        """The rotary tables for positions 0..max_positions - 1 (which also decides LongRoPE's factors)."""
        self.model.rotary.build(device, max_positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] fp32 logits."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers]

    def lora_targets(self) -> dict[tuple[int, str], tuple[AdaptableLinear, int]]:
        """(layer, checkpoint projection) -> (the layer computing it, its slice index)."""
        targets = {}
        for i, layer in enumerate(self.model.layers):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                fused, shard = self.packed_modules.get(name, (name, 0))
                parent = layer.self_attn if hasattr(layer.self_attn, fused) else layer.mlp
                targets[(i, name)] = (getattr(parent, fused), shard)
        return targets

    def enable_lora(self, max_loras: int, max_rank: int, sparse_memory: int = 0) -> None:
        """Allocate `max_loras` adapter slots of up to `max_rank` in every adaptable layer, and a pool of
        `sparse_memory` bytes for the slots' sparse parts (0: no sparse adapters). The pool's budget also
        pays for each layer's per-slot row table (4 bytes per output row and slot)."""
        weight = self.model.embed_tokens.weight
        layers = [module for module in self.modules() if isinstance(module, AdaptableLinear)]
        if sparse_memory:
            row_tables = sum((max_loras + 1) * (layer.out_features + 1) * 4 for layer in layers)
            if sparse_memory <= row_tables:
                raise invalid("max_sparse_memory", f"{sparse_memory} bytes do not cover the sparse row tables of "
                              f"{max_loras} slots in this model ({row_tables} bytes); give more, or 0 to serve no "
                              "sparse adapters")
            self.sparse_pool = SparsePool.from_bytes(sparse_memory - row_tables, max_loras, weight.dtype,
                                                     weight.device)
        for module in layers:
            module.lora = LoRASlotWeights.allocate(
                max_loras, max_rank, module.in_features, module.output_sizes, weight.dtype, weight.device,
                self.sparse_pool,
            )
