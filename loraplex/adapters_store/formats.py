"""PEFT LoRA adapters: parse `adapter_config.json` + `adapter_model.safetensors`, validate them
against the base model, and hold the result as per-module (A, B, scale) triples."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from loraplex.adapters_store.checksums import file_sha256
from loraplex.errors import LoraplexError, invalid
from loraplex.models.model_config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Modules an adapter may target, as the checkpoint names them.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ATTENTION_MODULES + MLP_MODULES
_KEY = re.compile(r"^base_model\.model\.(model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+))\.lora_([AB])\.weight$")
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA adapters (use_dora) are not supported yet; merge the adapter into a LoRA or retrain without DoRA",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported; retrain without it",
    "lora_bias": "lora_bias (a trained bias on lora_B) is not supported; retrain with lora_bias=False",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported; only plain LoRA",
    "layer_replication": "layer_replication (layers stacked anew) is not supported; only plain LoRA",
    "use_bdlora": "BD-LoRA (use_bdlora) is not supported; only plain LoRA",
    "kasa_config": "KaSA (kasa_config) is not supported; only plain LoRA",
    "arrow_config": "Arrow routing (arrow_config) is not supported; only plain LoRA",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported; only plain LoRA",
    "trainable_token_indices": "trainable tokens (trainable_token_indices, new embed_tokens rows) are not supported",
}


@dataclass(frozen=True)
class LoRAModule:
    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    scale: float  # lora_alpha / rank, or lora_alpha / sqrt(rank) with rslora

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoRAAdapter:
    name: str
    modules: dict[tuple[int, str], LoRAModule]  # (layer, module) -> weights
    config: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def target_modules(self) -> list[str]:
        return sorted({module for _, module in self.modules}, key=LORA_MODULES.index)

    @property
    def num_bytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())


def module_shape(config: ModelConfig, module: str) -> tuple[int, int]:
    """(out_features, in_features) of a base-model projection."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
        "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter),
    }[module]


def load_peft_lora(path: Path, name: str, base: ModelConfig, max_rank: int, sha256: str | None = None) -> LoRAAdapter:
    """Read and validate a PEFT LoRA directory. Refusals are LoraplexError (INVALID) whose field is the
    file at fault (adapter_config.json, adapter_model.safetensors), or `files` when one is missing; the
    message never holds the directory, which is the caller's to name. `sha256`: the weights file's,
    when the caller has just checked it (else it is computed)."""
    path = Path(path)
    config = read_adapter_config(path)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.exists():
        if (path / "adapter_model.bin").exists():
            raise invalid(
                "files", "adapter_model.bin is a pickle file, which loraplex never loads (it can run code); "
                "convert it: python -c \"import torch; from safetensors.torch import save_file; "
                "save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\""
            )
        raise invalid("files", f"{WEIGHTS_FILE} is missing")
    tensors = _read_safetensors(weights_file)
    modules = _pair_modules(tensors, config, base, max_rank)
    digest = sha256 or file_sha256(weights_file)[0]  # in chunks: uploads may be large
    return LoRAAdapter(name=name, modules=modules, config=config, sha256=digest)


def read_adapter_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not file.exists():
        raise invalid("files", f"{CONFIG_FILE} is missing; is this a PEFT adapter directory?")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _config_error(f"not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise _config_error("must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _config_error(f"peft_type {peft_type!r} is not supported; loraplex serves LORA adapters")
    for flag, message in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise _config_error(message)
    if config.get("bias", "none") != "none":
        raise _config_error(f"bias {config.get('bias')!r} is not supported; only bias 'none' (no trained biases)")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or value <= 0:
            raise _config_error(f"{key} must be a positive number, got {value!r}")
    _check_patterns(config)
    return config


def _config_error(message: str) -> LoraplexError:
    return invalid(CONFIG_FILE, message)


def _weights_error(message: str) -> LoraplexError:
    return invalid(WEIGHTS_FILE, message)


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise _weights_error(f"not a readable safetensors file ({e})") from None


def _pair_modules(tensors: dict[str, torch.Tensor], config: dict[str, Any], base: ModelConfig,
                  max_rank: int) -> dict[tuple[int, str], LoRAModule]:
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    full_names: dict[tuple[int, str], str] = {}
    for key, tensor in tensors.items():
        layer, module, half, full_name = _parse_key(key, base)
        halves.setdefault((layer, module), {})[half] = tensor
        full_names[(layer, module)] = full_name
    if not halves:
        raise _weights_error("holds no LoRA weights (lora_A / lora_B tensors)")
    _check_layers(config, {layer for layer, _ in halves})
    modules = {}
    for (layer, module), pair in sorted(halves.items()):
        full_name = full_names[(layer, module)]
        if set(pair) != {"A", "B"}:
            raise _weights_error(f"{full_name}: has lora_{''.join(pair)} but not its other half")
        modules[(layer, module)] = _module(pair["A"], pair["B"], config, base, module, full_name, max_rank)
    return modules


def _parse_key(key: str, base: ModelConfig) -> tuple[int, str, str, str]:
    match = _KEY.match(key)
    if match is None:
        if "lora_embedding" in key or "embed_tokens" in key:
            raise _weights_error(f"{key}: LoRA on embeddings is not supported yet")
        if "lora_magnitude_vector" in key:
            raise _weights_error(f"{key}: DoRA weights are not supported yet")
        if "lm_head" in key:
            raise _weights_error(f"{key}: LoRA on lm_head is not supported yet")
        raise _weights_error(f"unexpected tensor {key!r}; expected PEFT LoRA keys like "
                             "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (made for another "
                             "architecture?)")
    full_name, layer, module, half = match.group(1), int(match.group(2)), match.group(3), match.group(4)
    if module not in LORA_MODULES:
        raise _weights_error(f"{key}: module {module!r} is not a projection of this base model "
                             f"(expected one of {', '.join(LORA_MODULES)}); made for another base model?")
    if layer >= base.num_layers:
        raise _weights_error(f"{key}: layer {layer} does not exist; the base model has {base.num_layers} layers "
                             "(made for another base model?)")
    return layer, module, half, full_name


def _check_layers(config: dict[str, Any], layers: set[int]) -> None:
    allowed = config.get("layers_to_transform")
    if allowed is None or allowed == []:  # PEFT reads an empty list as every layer
        return
    allowed = {allowed} if isinstance(allowed, int) else set(allowed)
    extra = sorted(layers - allowed)
    if extra:
        raise _weights_error(f"has weights for layer {extra[0]}, outside layers_to_transform {sorted(allowed)}")


def _module(a: torch.Tensor, b: torch.Tensor, config: dict[str, Any], base: ModelConfig, module: str,
            full_name: str, max_rank: int) -> LoRAModule:
    out_features, in_features = module_shape(base, module)
    if a.ndim != 2 or b.ndim != 2:
        raise _weights_error(f"{full_name}: lora_A and lora_B must be matrices, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
    rank = a.shape[0]
    if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
        raise _weights_error(f"{full_name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                             f"model, which needs ({rank}, {in_features}) / ({out_features}, {rank}); made for "
                             "another base model?")
    expected_rank = _pattern_value(config.get("rank_pattern") or {}, full_name, config["r"])
    if rank != expected_rank:
        raise _weights_error(f"{full_name}: rank {rank} differs from the {expected_rank} that {CONFIG_FILE} "
                             "(r / rank_pattern) gives")
    if rank > max_rank:
        raise _weights_error(f"{full_name}: rank {rank} exceeds max_lora_rank {max_rank}; restart with "
                             f"--max-lora-rank {rank} or more")
    for half, tensor in (("lora_A", a), ("lora_B", b)):
        if not tensor.is_floating_point():
            raise _weights_error(f"{full_name}: {half} has dtype {tensor.dtype}; expected a floating-point tensor")
        if not torch.isfinite(tensor).all():
            raise _weights_error(f"{full_name}: {half} holds NaN or infinite values")
    alpha = _pattern_value(config.get("alpha_pattern") or {}, full_name, config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoRAModule(a=a.float().contiguous(), b=b.float().contiguous(), scale=float(scale))


def _pattern_value(patterns: dict[str, Any], full_name: str, default: Any) -> Any:
    # PEFT's rule: the first key that matches the end of the module's name, on a dot boundary.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", full_name):
            return value
    return default


def _check_patterns(config: dict[str, Any]) -> None:
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field_name) or {}
        if not isinstance(patterns, dict):
            raise _config_error(f"{field_name} must be an object of module-name pattern -> number")
        for key, value in patterns.items():
            try:
                re.compile(key)
            except re.error as e:
                raise _config_error(f"{field_name} key {key!r} is not a valid regular expression ({e})") from None
            if not isinstance(value, (int, float)) or value <= 0:
                raise _config_error(f"{field_name}[{key!r}] must be a positive number, got {value!r}")
