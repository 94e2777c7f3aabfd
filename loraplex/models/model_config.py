"""The architecture facts of a checkpoint, read from its Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Family:
    """What sets an architecture apart from Llama's."""

    qkv_bias: bool = False  # q/k/v projections carry a bias whatever attention_bias says (and o_proj none)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before RoPE (q_norm, k_norm)
    sliding_opt_in: bool = False  # sliding_window applies only with use_sliding_window: true


SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": Family(),
    "MistralForCausalLM": Family(),
    "Qwen2ForCausalLM": Family(qkv_bias=True, sliding_opt_in=True),
    "Qwen3ForCausalLM": Family(qk_norm=True, sliding_opt_in=True),
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

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
        architecture = _architecture(raw, source)
        num_heads = _required(raw, "num_attention_heads", source)
        hidden_size = _required(raw, "hidden_size", source)
        family = SUPPORTED_ARCHITECTURES[architecture]
        sliding = raw.get("sliding_window")
        if family.sliding_opt_in and not raw.get("use_sliding_window", False):
            sliding = None
        return cls(
            architecture=architecture,
            hidden_size=hidden_size,
            intermediate_size=_required(raw, "intermediate_size", source),
            num_layers=_required(raw, "num_hidden_layers", source),
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or hidden_size // num_heads,
            vocab_size=_required(raw, "vocab_size", source),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(raw),
            rope_scaling=_rope_scaling(raw, source),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            qkv_bias=family.qkv_bias or raw.get("attention_bias", False),
            o_bias=(not family.qkv_bias) and raw.get("attention_bias", False),
            mlp_bias=raw.get("mlp_bias", False),
            qk_norm=family.qk_norm,
            sliding_window=sliding,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_tuple(raw.get("eos_token_id")),
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
    params = raw.get("rope_parameters") or {}
    return float(raw.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(raw: dict[str, Any], source: str) -> dict[str, Any]:
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older configs `rope_scaling`.
    scaling = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    scaling.pop("rope_theta", None)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: rope_scaling type {rope_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    scaling["rope_type"] = rope_type
    required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                   "original_max_position_embeddings")}.get(rope_type, ())
    missing = [key for key in required if not isinstance(scaling.get(key), (int, float))]
    if missing:
        raise ValueError(f"{source}: rope_scaling type {rope_type!r} needs numeric {', '.join(missing)}")
    return scaling


def _as_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)
