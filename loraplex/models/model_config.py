"""The architecture facts of a checkpoint, read from its Hugging Face `config.json`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Family:
    """What sets an architecture apart from Llama's."""

    qkv_bias: bool = False  # q/k/v projections carry a bias whatever attention_bias says (and o_proj none)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before RoPE (q_norm, k_norm)
    sliding_opt_in: bool = False  # sliding_window applies only with use_sliding_window: true
    gemma: int = 0  # Gemma 2 or 3: (1 + w) norms around both blocks, scaled embeddings, GeGLU, query_pre_attn_scalar
    sliding_pattern: int = 0  # every n-th layer global, the others sliding (when config.json lists no layer_types)
    fused_checkpoint: bool = False  # Phi-3: the checkpoint holds qkv_proj and gate_up_proj fused


SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": Family(),
    "MistralForCausalLM": Family(),
    "Qwen2ForCausalLM": Family(qkv_bias=True, sliding_opt_in=True),
    "Qwen3ForCausalLM": Family(qk_norm=True, sliding_opt_in=True),
    "Gemma2ForCausalLM": Family(gemma=2, sliding_pattern=2),
    "Gemma3ForCausalLM": Family(gemma=3, qk_norm=True, sliding_pattern=6),
    "Phi3ForCausalLM": Family(fused_checkpoint=True),
}
# Multimodal checkpoints whose text model loraplex serves alone: architecture -> the text model's
MULTIMODAL_TEXT = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
# transformers' Gemma3TextConfig defaults: a multimodal Gemma 3 config.json lists in text_config only what differs
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "hidden_activation": "gelu_pytorch_tanh",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
# transformers' defaults for keys a Gemma config.json may leave out
_GEMMA_SOFTCAPS = {2: (50.0, 30.0), 3: (None, None)}  # (attn_logit_softcapping, final_logit_softcapping)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Each layer's sliding window (None: global attention); () = no layer slides.
    layer_windows: tuple[int | None, ...] = ()
    # Which layers are of the sliding kind (layer_types), whether or not a window is set: Gemma 3 turns them with
    # its local RoPE either way; () = none.
    sliding_layers: tuple[bool, ...] = ()
    hidden_act: str = "silu"  # of the gate: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    rotary_dim: int | None = None  # dims of each head that RoPE turns (partial_rotary_factor); None: all
    fused_checkpoint: bool = False  # Phi-3: qkv_proj and gate_up_proj stored fused
    # Gemma
    gemma: int = 0  # 2 or 3: the Gemma layer (norms with 1 + w, four per layer), else 0
    embed_scale: float = 1.0  # embeddings multiplied by it (Gemma: sqrt(hidden_size))
    attention_scale: float | None = None  # of q·k; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # scores s -> cap * tanh(s / cap) (Gemma 2)
    final_softcap: float | None = None  # logits likewise (Gemma 2)
    local_rope_theta: float | None = None  # sliding layers' RoPE base, plain RoPE (Gemma 3); None: as the others
    # The checkpoint is a multimodal model's (Gemma3ForConditionalGeneration): its text model is served, its
    # vision tower and projector are skipped, and tensor names lose their language-model prefix.
    text_of_multimodal: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"layer_types lists {len(self.sliding_layers)} layers, but num_hidden_layers is "
                             f"{self.num_layers}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (supported: "
                             f"{', '.join(SUPPORTED_ACTIVATIONS)})")
        rotary = self.rotary_dim if self.rotary_dim is not None else self.head_dim
        if not 0 < rotary <= self.head_dim or rotary % 2:
            raise ValueError(f"partial_rotary_factor gives {rotary} rotary dims of a {self.head_dim}-dim head; "
                             "it must give an even number between 2 and head_dim")
        for key in ("long_factor", "short_factor") if self.rope_scaling.get("rope_type") == "longrope" else ():
            if len(self.rope_scaling[key]) != rotary // 2:
                raise ValueError(f"rope_scaling {key} has {len(self.rope_scaling[key])} entries; {rotary} rotary "
                                 f"dims need {rotary // 2}")

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` is of the sliding kind (its window, if any, is `window_of`)."""
        return bool(self.sliding_layers) and self.sliding_layers[layer]

    def window_of(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (keys seen back from each query, itself included), or None."""
        return self.layer_windows[layer] if self.layer_windows else None

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing; a model directory needs a Hugging Face config.json") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        multimodal = any(name in MULTIMODAL_TEXT for name in raw.get("architectures") or [])
        if multimodal:
            raw = _text_config(raw, source)
        architecture = _architecture(raw, source)
        num_heads = _required(raw, "num_attention_heads", source)
        hidden_size = _required(raw, "hidden_size", source)
        family = SUPPORTED_ARCHITECTURES[architecture]
        sliding = raw.get("sliding_window")
        if family.sliding_opt_in and not raw.get("use_sliding_window", False):
            sliding = None
        num_layers = _required(raw, "num_hidden_layers", source)
        head_dim = raw.get("head_dim") or hidden_size // num_heads
        rope_params = raw.get("rope_parameters") or {}
        # Gemma 3 keeps a RoPE per layer type: the global layers' (maybe scaled), the sliding layers' (plain).
        per_type = "full_attention" in rope_params
        global_rope = {**raw, "rope_parameters": rope_params["full_attention"]} if per_type else raw
        gemma_extras = _gemma_fields(raw, family, hidden_size, per_type, source) if family.gemma else {}
        kinds = _sliding_layers(raw, family, sliding, num_layers, source)
        return cls(
            architecture=architecture,
            hidden_size=hidden_size,
            intermediate_size=_required(raw, "intermediate_size", source),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            vocab_size=_required(raw, "vocab_size", source),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(global_rope),
            rope_scaling=_rope_scaling(global_rope, source),
            tie_word_embeddings=raw.get("tie_word_embeddings", bool(family.gemma)),  # transformers' defaults
            qkv_bias=family.qkv_bias or raw.get("attention_bias", False),
            o_bias=(not family.qkv_bias) and raw.get("attention_bias", False),
            mlp_bias=raw.get("mlp_bias", False),
            qk_norm=family.qk_norm,
            sliding_window=sliding,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_tuple(raw.get("eos_token_id")),
            layer_windows=tuple(sliding if slides else None for slides in kinds) if sliding else (),
            sliding_layers=kinds,
            # transformers' Gemma reads hidden_activation only (and defaults to GeGLU)
            hidden_act=(raw.get("hidden_activation") or "gelu_pytorch_tanh") if family.gemma
            else raw.get("hidden_act") or "silu",
            rotary_dim=_rotary_dim(raw, head_dim),
            fused_checkpoint=family.fused_checkpoint,
            text_of_multimodal=multimodal,
            **gemma_extras,
        )


def _text_config(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """A multimodal config.json -> its text model's config, as a text-only checkpoint would have it."""
    [text_architecture] = [MULTIMODAL_TEXT[name] for name in raw["architectures"] if name in MULTIMODAL_TEXT]
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"{source}: a {raw['architectures'][0]} config needs its text_config")
    ids = {key: raw[key] for key in ("bos_token_id", "eos_token_id", "tie_word_embeddings") if key in raw}
    defaults = dict(GEMMA3_TEXT_DEFAULTS)
    if "rope_parameters" in text:  # transformers >= 5 keeps the RoPE bases there
        del defaults["rope_theta"], defaults["rope_local_base_freq"]
    return {**defaults, **ids, **text, "architectures": [text_architecture]}


def _sliding_layers(raw: dict[str, Any], family: Family, window: int | None, num_layers: int,
                    source: str) -> tuple[bool, ...]:
    """Each layer: of the sliding kind? From config.json's layer_types, else as transformers derives them."""
    types = raw.get("layer_types")
    if types is None:
        if family.sliding_pattern:  # Gemma: every pattern-th layer global
            pattern = raw.get("sliding_window_pattern", family.sliding_pattern)
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]
        elif family.sliding_opt_in:  # Qwen: with use_sliding_window, the layers from max_window_layers on
            first = raw.get("max_window_layers", 28) if window else num_layers
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        else:
            types = ["sliding_attention" if window else "full_attention"] * num_layers
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown and window:  # (without a window no layer slides: the kinds only pick Gemma 3's RoPE)
        raise ValueError(f"{source}: layer_types holds {unknown[0]!r}; loraplex knows sliding_attention and "
                         "full_attention")
    return tuple(kind == "sliding_attention" for kind in types) if "sliding_attention" in types else ()


def _rotary_dim(raw: dict[str, Any], head_dim: int) -> int | None:
    factor = raw.get("partial_rotary_factor") or (raw.get("rope_parameters") or {}).get("partial_rotary_factor")
    return None if factor in (None, 1, 1.0) else int(head_dim * factor)


def _gemma_fields(raw: dict[str, Any], family: Family, hidden_size: int, per_type_rope: bool,
                  source: str) -> dict[str, Any]:
    attn_cap, final_cap = _GEMMA_SOFTCAPS[family.gemma]
    local_theta = None
    if family.gemma == 3:
        local = raw["rope_parameters"]["sliding_attention"] if per_type_rope else {}
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: the sliding layers' rope_type {local['rope_type']!r} is not supported "
                             "(Gemma 3's local RoPE is the default kind)")
        local_theta = float(local.get("rope_theta") or raw.get("rope_local_base_freq") or 10000.0)
    return dict(
        gemma=family.gemma,
        embed_scale=hidden_size**0.5,
        attention_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5,
        # transformers' Gemma 3 attention never passes attn_logit_softcapping on: it is ignored there too
        attn_softcap=raw.get("attn_logit_softcapping", attn_cap) if family.gemma == 2 else None,
        final_softcap=raw.get("final_logit_softcapping", final_cap),
        local_rope_theta=local_theta,
    )


def _architecture(raw: dict[str, Any], source: str) -> str:
    names = raw.get("architectures") or []
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    raise ValueError(f"{source}: architecture {names or raw.get('model_type')!r} is not supported; "
                     f"loraplex serves {supported}")


def _required(raw: dict[str, Any], key: str, source: str) -> Any:
    if key not in raw:
        raise ValueError(f"{source}: required field {key!r} is missing")
    return raw[key]


def _rope_theta(raw: dict[str, Any]) -> float:
    params = raw.get("rope_parameters") or {}  # transformers >= 5: the theta inside wins, as there
    return float(params.get("rope_theta") or raw.get("rope_theta") or 10000.0)


def _rope_scaling(raw: dict[str, Any], source: str) -> dict[str, Any]:
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older configs `rope_scaling`.
    scaling = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    scaling.pop("rope_theta", None)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    rope_type = "longrope" if rope_type == "su" else rope_type  # Phi-3's first name for it
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: rope_scaling type {rope_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    scaling.pop("partial_rotary_factor", None)
    if rope_type == "longrope":
        return _longrope(raw, scaling, source)
    required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                   "original_max_position_embeddings")}.get(rope_type, ())
    missing = [key for key in required if not isinstance(scaling.get(key), (int, float))]
    if missing:
        raise ValueError(f"{source}: rope_scaling type {rope_type!r} needs numeric {', '.join(missing)}")
    return scaling


def _longrope(raw: dict[str, Any], scaling: dict[str, Any], source: str) -> dict[str, Any]:
    """Phi-3's LongRoPE: per-frequency divisors for short contexts and for long ones, and cos/sin scaled by the
    attention factor (transformers' defaults: factor = max_position_embeddings / original, attention factor
    sqrt(1 + ln(factor) / ln(original)))."""
    original = raw.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
    if not isinstance(original, int) or original < 1:
        raise ValueError(f"{source}: rope_scaling type 'longrope' needs original_max_position_embeddings")
    for key in ("long_factor", "short_factor"):
        factors = scaling.get(key)
        if not isinstance(factors, list) or not factors or not all(isinstance(f, (int, float)) for f in factors):
            raise ValueError(f"{source}: rope_scaling type 'longrope' needs {key}, a list of numbers")
    factor = scaling.get("factor") or raw.get("max_position_embeddings", 2048) / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {**scaling, "original_max_position_embeddings": original, "attention_factor": float(attention)}


def _as_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)
