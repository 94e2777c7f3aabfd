"""PEFT LoRA adapters: parse `adapter_config.json` + `adapter_model.safetensors`, validate them
against the base model, and hold the result as per-module (A, B, scale) triples."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import re2
import torch
from safetensors import SafetensorError, safe_open

from loraplex.adapters_store.checksums import file_sha256
from loraplex.adapters_store.sparse_format import SparseDelta, is_sparse_delta
from loraplex.adapters_store.sparse_format import check_config as check_sparse_config
from loraplex.adapters_store.sparse_format import parse_module as parse_sparse_module
from loraplex.adapters_store.sparse_format import split_key as split_sparse_key
from loraplex.errors import LoraplexError, invalid
from loraplex.models.model_config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Modules an adapter may target, as the checkpoint names them.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ATTENTION_MODULES + MLP_MODULES
# Projections a checkpoint may hold fused (Phi-3): a LoRA on one is split into LoRAs on its parts, which share
# lora_A and take their rows of lora_B (and of a DoRA magnitude vector); the update is the same.
FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# (a multimodal base's text model names its layers model.language_model.layers or language_model.model.layers)
_KEY = re.compile(r"^base_model\.model\.((?:model\.language_model\.|language_model\.model\.|model\.)"
                  r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+))"
                  r"\.(?:lora_([AB])\.weight|lora_(magnitude)_vector)$")
_VISION = re.compile(r"^base_model\.model\.(?:model\.)?(?:vision_tower|multi_modal_projector)\.")
_UNSUPPORTED_FLAGS = {
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
# Bounds on adapter_config.json's numbers, orders of magnitude above real adapters (r 1..512, lora_alpha 1..1024,
# usually r or 2r); what lies beyond is a typo or an attack, and would reach the weights as inf, NaN or overflow.
MAX_CONFIG_RANK = 1 << 16  # wider than any projection served; also keeps alpha / r a float (a huge int overflows)
MAX_LORA_ALPHA = 1e4  # the scale, alpha / r or alpha / sqrt(r), is at most alpha since r >= 1
# Bound on the spectral norms of lora_A, scale * lora_B and the update scale * lora_B @ lora_A. The demo adapters
# and the PEFT-made ones of the tests measure at most 1.4 (lora_A), 4.9 (scale * lora_B) and 4.8 (the update);
# 1e4 is three orders above, and refuses weights scaled absurdly (by 1e30), which overflow half-precision slots
# (fp16 max 65504) and put inf / NaN into the KV cache.
MAX_LORA_NORM = 1e4
DEFAULT_MAX_SPARSE_DENSITY = 0.05  # --max-sparse-density: nnz / (out·in) per module and over the adapter
# rank_pattern / alpha_pattern keys are regexes matched against every module name: one entry per module of
# the largest models (126 layers x 7 projections) fits, and a module name is under 100 characters.
MAX_PATTERN_ENTRIES = 1024
MAX_PATTERN_KEY_CHARS = 256
# Weights are held in fp32; these convert exactly (float64 within fp32's range, checked after conversion).
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_SHOWN_CHARS = 60  # of a bad value or key, in a message
_HALVES = {"A": "lora_A", "B": "lora_B", "M": "lora_magnitude_vector"}
Regex = Any  # a pattern compiled by re2 (whose class is private)


@dataclass(frozen=True)
class LoRAModule:
    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    scale: float  # lora_alpha / rank, or lora_alpha / sqrt(rank) with rslora
    magnitude: torch.Tensor | None = None  # DoRA: [out_features], the rows' norms after the update; else None
    sparse: SparseDelta | None = None  # a sparse part S of the update (ΔW = scale·B·A + S); rank 0: S alone

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
        # the parts of a fused module share one lora_A: counted once
        a_bytes = sum({m.a.data_ptr(): m.a.nbytes for m in self.modules.values()}.values())
        return a_bytes + sum(m.b.nbytes + (0 if m.magnitude is None else m.magnitude.nbytes)
                             + (0 if m.sparse is None else m.sparse.num_bytes) for m in self.modules.values())

    @property
    def kind(self) -> str:
        modules = self.modules.values()
        if any(m.magnitude is not None for m in modules):
            return "dora"
        if any(m.sparse is not None for m in modules):
            return "rosa" if any(m.rank > 0 for m in modules) else "sparse"
        return "lora"

    @property
    def nnz(self) -> int:
        return sum(m.sparse.nnz for m in self.modules.values() if m.sparse is not None)

    @property
    def density(self) -> float:
        """nnz over the sizes of the modules with a sparse part (0.0 without)."""
        size = sum(m.sparse.shape[0] * m.sparse.shape[1] for m in self.modules.values() if m.sparse is not None)
        return self.nnz / size if size else 0.0


@dataclass(frozen=True)
class AdapterConfig:
    """adapter_config.json, checked: what decides each module's rank and scale, and the layers it may adapt."""

    raw: dict[str, Any]
    rank: int  # r
    alpha: float  # lora_alpha
    rslora: bool  # use_rslora: scale alpha / sqrt(rank) instead of alpha / rank
    dora: bool  # use_dora: every module has a magnitude vector
    rank_pattern: tuple[tuple[Regex, int], ...]  # (PEFT's match of the key, value), in the file's order
    alpha_pattern: tuple[tuple[Regex, float], ...]
    layers: frozenset[int] | None  # layers_to_transform; None: every layer

    def rank_of(self, full_name: str) -> int:
        return _pattern_value(self.rank_pattern, full_name, self.rank)

    def scale_of(self, full_name: str, rank: int) -> float:
        alpha = _pattern_value(self.alpha_pattern, full_name, self.alpha)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def module_shape(config: ModelConfig, module: str) -> tuple[int, int]:
    """(out_features, in_features) of a base-model projection (or of a fused one: its parts stacked)."""
    if module in FUSED_MODULES:
        parts = [module_shape(config, part) for part in FUSED_MODULES[module]]
        return sum(out for out, _ in parts), parts[0][1]
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
        "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter),
    }[module]


def split_fused(module: str, weights: LoRAModule, base: ModelConfig | None, full_name: str) -> dict[str, LoRAModule]:
    """A LoRA on a fused projection -> the LoRAs on its parts: the same lora_A, each part's rows of lora_B. A part
    keeps only the rank columns its rows use (a fused export of parts with lora_As of their own is block-diagonal:
    each part gets its own rank back, and a part it never adapted none), unless it carries a DoRA magnitude."""
    parts = FUSED_MODULES[module]
    if base is not None:
        sizes = [module_shape(base, part)[0] for part in parts]
    elif module == "gate_up_proj" and weights.b.shape[0] % 2 == 0:  # gate and up are the same size
        sizes = [weights.b.shape[0] // 2] * 2
    else:
        raise _weights_error(f"{full_name}: a LoRA on a fused {module} splits into {'/'.join(parts)} by the base "
                             f"model's sizes (lora_B has {weights.b.shape[0]} rows); give the base model (--base) to "
                             "read it")
    rows = torch.tensor(sizes).cumsum(0).tolist()
    whole, trimmed = {}, {}
    for part, start, end in zip(parts, [0, *rows[:-1]], rows, strict=True):
        b = weights.b[start:end].contiguous()
        magnitude = None if weights.magnitude is None else weights.magnitude[start:end].contiguous()
        whole[part] = dataclasses.replace(weights, b=b, magnitude=magnitude)
        used = b.ne(0).any(dim=0)
        if magnitude is not None or bool(used.all()):
            trimmed[part] = whole[part]
        elif bool(used.any()):
            trimmed[part] = dataclasses.replace(weights, a=weights.a[used].contiguous(), b=b[:, used].contiguous())
        # else: no update on this part
    return trimmed or whole  # (an untrained adapter, lora_B all zeros: its parts as they are)


def load_peft_lora(path: Path, name: str, base: ModelConfig | None, max_rank: int,
                   sha256: str | None = None, max_sparse_density: float = DEFAULT_MAX_SPARSE_DENSITY) -> LoRAAdapter:
    """Read and validate a PEFT LoRA directory. Refusals are LoraplexError (INVALID) whose field is the
    file at fault (adapter_config.json, adapter_model.safetensors), or `files` when one is missing; the
    message never holds the directory, which is the caller's to name. `sha256`: the weights file's,
    when the caller has just checked it (else it is computed). `base` None (offline merges, no model at
    hand): every check but those against the base model's layers and shapes."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        raw = _parse_json(path / CONFIG_FILE)
        if isinstance(raw, dict) and is_sparse_delta(raw):
            return _load_sparse_delta(path, name, base, raw, max_sparse_density, sha256)
        if isinstance(raw, dict) and raw.get("peft_type") == "ROSA":
            return _load_rosa(path, name, base, max_rank, max_sparse_density, sha256)
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
    return LoRAAdapter(name=name, modules=modules, config=config.raw, sha256=digest)


def _weights_file(path: Path) -> Path:
    file = path / WEIGHTS_FILE
    if not file.exists():
        raise invalid("files", f"{WEIGHTS_FILE} is missing")
    return file


def _load_sparse_delta(path: Path, name: str, base: ModelConfig | None, raw: dict, max_density: float,
                       sha256: str | None) -> LoRAAdapter:
    """loraplex's sparse-delta format (sparse_format.py): per module S alone, as a module of rank 0."""
    check_sparse_config(raw, max_density)
    weights_file = _weights_file(path)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    names: dict[tuple[int, str], str] = {}
    for key, tensor in _read_safetensors(weights_file).items():
        split = split_sparse_key(key)
        if split is None:
            raise _weights_error(f"unexpected tensor {key!r} in a sparse delta; expected keys like "
                                 "base_model.model.model.layers.0.self_attn.q_proj.sparse_delta.values")
        full_name, layer, module, suffix = split
        if module not in LORA_MODULES or (base is not None and layer >= base.num_layers):
            raise _weights_error(f"{key}: no such projection in the base model (made for another base model?)")
        parts.setdefault((layer, module), {})[suffix] = tensor
        names[(layer, module)] = full_name
    if not parts:
        raise _weights_error("holds no sparse_delta tensors")
    modules = {}
    for (layer, module), tensors in sorted(parts.items()):
        expected = module_shape(base, module) if base is not None else None
        delta = parse_sparse_module(names[(layer, module)], tensors, expected, max_density)
        out_features, in_features = delta.shape
        modules[(layer, module)] = LoRAModule(a=torch.zeros(0, in_features), b=torch.zeros(out_features, 0),
                                              scale=1.0, sparse=delta)
    digest = sha256 or file_sha256(weights_file)[0]
    return LoRAAdapter(name=name, modules=modules, config=raw, sha256=digest)


_ROSA_KEY = re.compile(r"^base_model\.model\.(model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+))"
                       r"\.rosa_(A\.weight|B\.weight|spa\.\w+)$")


def _load_rosa(path: Path, name: str, base: ModelConfig | None, max_rank: int, max_density: float,
               sha256: str | None) -> LoRAAdapter:
    """A RoSA adapter as IST-DASLab/peft-rosa saves it: per module rosa_A / rosa_B (as lora_A / lora_B, the
    same scale rules) and rosa_spa, a CSR matrix S added unscaled: ΔW = s·B·A + S."""
    config = read_adapter_config(path, expected_type="ROSA")
    weights_file = _weights_file(path)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    names: dict[tuple[int, str], str] = {}
    for key, tensor in _read_safetensors(weights_file).items():
        match = _ROSA_KEY.match(key)
        if match is None or match.group(3) not in LORA_MODULES:
            raise _weights_error(f"unexpected tensor {key!r} in a RoSA adapter; expected keys like "
                                 "base_model.model.model.layers.0.self_attn.q_proj.rosa_A.weight / .rosa_spa.values")
        layer = int(match.group(2))
        if base is not None and layer >= base.num_layers:
            raise _weights_error(f"{key}: layer {layer} does not exist; the base model has {base.num_layers} layers")
        parts.setdefault((layer, match.group(3)), {})[match.group(4)] = tensor
        names[(layer, match.group(3))] = match.group(1)
    if not parts:
        raise _weights_error("holds no RoSA tensors")
    _check_layers(config.layers, {layer for layer, _ in parts}, base)
    modules = {}
    for (layer, module), tensors in sorted(parts.items()):
        full_name = names[(layer, module)]
        if {"A.weight", "B.weight"} - set(tensors):
            raise _weights_error(f"{full_name}: needs both rosa_A.weight and rosa_B.weight")
        low_rank = _module(tensors["A.weight"], tensors["B.weight"], config, base, module, full_name, max_rank)
        sparse = None
        if "spa.values" in tensors:
            sparse = _rosa_sparse(full_name, tensors, (low_rank.b.shape[0], low_rank.a.shape[1]), max_density)
        modules[(layer, module)] = dataclasses.replace(low_rank, sparse=sparse)
    digest = sha256 or file_sha256(weights_file)[0]
    return LoRAAdapter(name=name, modules=modules, config=config.raw, sha256=digest)


def _rosa_sparse(full_name: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int],
                 max_density: float) -> SparseDelta:
    """rosa_spa (values, row_offs, col_idx; row_idx only orders rows for load balance) as a checked
    SparseDelta. Columns are sorted within each row first (spops does not require them sorted)."""
    for part in ("spa.row_offs", "spa.col_idx"):
        if part not in tensors:
            raise _weights_error(f"{full_name}: rosa_{part} is missing")
    values, crow, col = tensors["spa.values"], tensors["spa.row_offs"], tensors["spa.col_idx"]
    if crow.ndim != 1 or col.ndim != 1 or crow.is_floating_point() or col.is_floating_point():
        raise _weights_error(f"{full_name}: rosa_spa.row_offs and col_idx must be integer vectors")
    crow, col = crow.long(), col.long()
    if col.numel() == values.numel() and crow.numel() == shape[0] + 1 and int(crow[-1]) == values.numel() and \
            bool((crow[1:] >= crow[:-1]).all()):
        rows = torch.repeat_interleave(torch.arange(shape[0]), crow[1:] - crow[:-1])
        order = torch.argsort(rows * (shape[1] + 1) + col.clamp(0, shape[1]), stable=True)
        col, values = col[order], values[order]
    return parse_sparse_module(full_name, {"values": values, "crow_indices": crow, "col_indices": col,
                                           "shape": torch.tensor(shape)}, shape, max_density)


def read_adapter_config(path: Path, expected_type: str = "LORA") -> AdapterConfig:
    file = path / CONFIG_FILE
    if not file.exists():
        raise invalid("files", f"{CONFIG_FILE} is missing; is this a PEFT adapter directory?")
    config = _parse_json(file)
    if not isinstance(config, dict):
        raise _config_error("must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != expected_type:
        raise _config_error(f"peft_type {peft_type!r} is not supported; loraplex serves LORA and ROSA adapters "
                            "(and its own sparse deltas)")
    for flag, message in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise _config_error(message)
    if config.get("bias", "none") != "none":
        raise _config_error(f"bias {config.get('bias')!r} is not supported; only bias 'none' (no trained biases)")
    return AdapterConfig(
        raw=config, rank=_rank("r", config.get("r")), alpha=_alpha("lora_alpha", config.get("lora_alpha")),
        rslora=_flag("use_rslora", config.get("use_rslora", False)),
        dora=_flag("use_dora", config.get("use_dora", False)),
        rank_pattern=_patterns(config, "rank_pattern", _rank), alpha_pattern=_patterns(config, "alpha_pattern", _alpha),
        layers=_layers(config.get("layers_to_transform")),
    )


def _parse_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _config_error(f"not valid JSON ({e})") from None
    except ValueError:  # an integer of more than 4300 digits (Python's int_max_str_digits)
        raise _config_error("not valid JSON that can be read: it holds a number too long to convert") from None
    except RecursionError:
        raise _config_error("not valid JSON that can be read: it is nested too deeply; "
                            "an adapter config is a flat object") from None


def _show(value: Any) -> str:
    """A bad value for a message: its repr, cut short (a client's value may be huge)."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not the number 1


def _rank(label: str, value: Any) -> int:
    if not _is_int(value) or not 1 <= value <= MAX_CONFIG_RANK:
        raise _config_error(f"{label} must be an integer from 1 to {MAX_CONFIG_RANK} (a LoRA rank), got "
                            f"{_show(value)}; set it to the rank the adapter was trained with")
    return value


def _alpha(label: str, value: Any) -> float:
    # NaN and inf fail the range test, and Python compares a huge int with a float exactly
    if not (_is_int(value) or isinstance(value, float)) or not 0 < value <= MAX_LORA_ALPHA:
        raise _config_error(f"{label} must be a number above 0 and at most {MAX_LORA_ALPHA:g} (a LoRA alpha, "
                            f"usually the rank or twice it), got {_show(value)}; set it to the alpha the adapter "
                            "was trained with")
    return float(value)


def _flag(label: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _config_error(f"{label} must be true or false, got {_show(value)}")
    return value


def _layers(value: Any) -> frozenset[int] | None:
    if value is None or value == []:  # PEFT reads an empty list as every layer
        return None
    values = [value] if _is_int(value) else value
    if not isinstance(values, list) or not all(_is_int(layer) and layer >= 0 for layer in values):
        raise _config_error(f"layers_to_transform must be a layer index or a list of them (integers from 0), got "
                            f"{_show(value)}")
    return frozenset(values)


def _patterns(config: dict[str, Any], field_name: str, parse_value) -> tuple[tuple[Regex, Any], ...]:
    """rank_pattern / alpha_pattern: each key compiled once, as PEFT matches it, by RE2 (linear time: a key such
    as `(.|.)*z` cannot stall the server as it would in Python's backtracking re)."""
    patterns = config.get(field_name)
    if patterns is None:
        return ()
    if not isinstance(patterns, dict):
        raise _config_error(f"{field_name} must be an object of module-name pattern -> number, got {_show(patterns)}")
    if len(patterns) > MAX_PATTERN_ENTRIES:
        raise _config_error(f"{field_name} has {len(patterns)} entries, more than the {MAX_PATTERN_ENTRIES} allowed; "
                            "join patterns with | or rely on the default for most modules")
    return tuple((_compile_pattern(field_name, key), parse_value(_pattern_label(field_name, key), value))
                 for key, value in patterns.items())


def _pattern_label(field_name: str, key: str) -> str:
    shown = json.dumps(key[:_SHOWN_CHARS]) + ("..." if len(key) > _SHOWN_CHARS else "")
    return f"{field_name}[{shown}]"


def _compile_pattern(field_name: str, key: str) -> Regex:
    label = _pattern_label(field_name, key)
    if len(key) > MAX_PATTERN_KEY_CHARS:
        raise _config_error(f"{label}: the key is longer than {MAX_PATTERN_KEY_CHARS} characters; a module-name "
                            "pattern needs far fewer")
    options = re2.Options()
    options.log_errors = False  # the refusal goes to the client, not to the server's stderr
    try:
        return re2.compile(rf"(.*\.)?({key})$", options)  # PEFT's rule: the end of the name, on a dot boundary
    except (re2.error, UnicodeEncodeError) as e:
        reason = e.args[0].decode(errors="replace") if isinstance(e.args[0], bytes) else str(e)
        raise _config_error(f"{label}: the key is not a regular expression RE2 accepts ({reason}); write it without "
                            "backreferences or lookaround (patterns are matched in linear time)") from None


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


def _pair_modules(tensors: dict[str, torch.Tensor], config: AdapterConfig, base: ModelConfig | None,
                  max_rank: int) -> dict[tuple[int, str], LoRAModule]:
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    full_names: dict[tuple[int, str], str] = {}
    for key, tensor in tensors.items():
        if _VISION.match(key):
            continue  # a multimodal model's vision tower: text prompts never reach it (loraplex serves text only)
        layer, module, half, full_name = _parse_key(key, base)
        halves.setdefault((layer, module), {})[half] = tensor
        full_names[(layer, module)] = full_name
    if not halves:
        raise _weights_error("holds no LoRA weights (lora_A / lora_B tensors)")
    _check_layers(config.layers, {layer for layer, _ in halves}, base)
    modules = {}
    for (layer, module), pair in sorted(halves.items()):
        full_name = full_names[(layer, module)]
        if not {"A", "B"} <= set(pair):
            raise _weights_error(f"{full_name}: has {', '.join(_HALVES[h] for h in sorted(pair))} but not its other "
                                 f"half ({' or '.join(_HALVES[h] for h in sorted({'A', 'B'} - set(pair)))})")
        if ("M" in pair) != config.dora:
            raise _weights_error(f"{full_name}: lora_magnitude_vector must be there exactly when adapter_config.json "
                                 f"has use_dora true (use_dora is {str(config.dora).lower()})")
        fused = module in FUSED_MODULES  # its parts' ranks are checked against max_rank once split
        module_weights = _module(pair["A"], pair["B"], config, base, module, full_name,
                                 MAX_CONFIG_RANK if fused else max_rank)
        if "M" in pair:
            module_weights = dataclasses.replace(module_weights,
                                                 magnitude=_magnitude(pair["M"], module_weights, full_name))
        if fused:
            for part, part_weights in split_fused(module, module_weights, base, full_name).items():
                if (layer, part) in halves:
                    raise _weights_error(f"{full_name}: adapts {part} both fused (in {module}) and alone")
                _check_rank(part_weights.rank, max_rank, f"{full_name} ({part})")
                modules[(layer, part)] = part_weights
        else:
            modules[(layer, module)] = module_weights
    return modules


def _parse_key(key: str, base: ModelConfig | None) -> tuple[int, str, str, str]:
    match = _KEY.match(key)
    if match is None:
        if "lora_embedding" in key or "embed_tokens" in key:
            raise _weights_error(f"{key}: LoRA on embeddings is not supported yet")
        if "lm_head" in key:
            raise _weights_error(f"{key}: LoRA on lm_head is not supported yet")
        raise _weights_error(f"unexpected tensor {key!r}; expected PEFT LoRA keys like "
                             "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (made for another "
                             "architecture?)")
    full_name, layer, module = match.group(1), int(match.group(2)), match.group(3)
    half = match.group(4) or "M"  # A, B, or M: a DoRA magnitude vector
    fused_base = base is None or base.fused_checkpoint
    if module not in LORA_MODULES and not (module in FUSED_MODULES and fused_base):
        known = LORA_MODULES + (tuple(FUSED_MODULES) if fused_base else ())
        raise _weights_error(f"{key}: module {module!r} is not a projection of this base model "
                             f"(expected one of {', '.join(known)}); made for another base model?")
    if base is not None and layer >= base.num_layers:
        raise _weights_error(f"{key}: layer {layer} does not exist; the base model has {base.num_layers} layers "
                             "(made for another base model?)")
    return layer, module, half, full_name


def _check_layers(allowed: frozenset[int] | None, layers: set[int], base: ModelConfig | None) -> None:
    if allowed is None:
        return
    if base is not None and max(allowed) >= base.num_layers:
        raise _config_error(f"layers_to_transform names layer {max(allowed)}, but the base model has {base.num_layers} "
                            "layers (made for another base model?)")
    extra = sorted(layers - allowed)
    if extra:
        raise _weights_error(f"has weights for layer {extra[0]}, outside layers_to_transform {sorted(allowed)}")


def _module(a: torch.Tensor, b: torch.Tensor, config: AdapterConfig, base: ModelConfig | None, module: str,
            full_name: str, max_rank: int) -> LoRAModule:
    if a.ndim != 2 or b.ndim != 2:
        raise _weights_error(f"{full_name}: lora_A and lora_B must be matrices, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
    rank = a.shape[0]
    out_features, in_features = module_shape(base, module) if base is not None else (b.shape[0], a.shape[1])
    if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
        raise _weights_error(f"{full_name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                             f"model, which needs ({rank}, {in_features}) / ({out_features}, {rank}); made for "
                             "another base model?")
    expected_rank = config.rank_of(full_name)
    if rank != expected_rank:
        raise _weights_error(f"{full_name}: rank {rank} differs from the {expected_rank} that {CONFIG_FILE} "
                             "(r / rank_pattern) gives")
    _check_rank(rank, max_rank, full_name)
    a, b = _fp32("lora_A", a, full_name), _fp32("lora_B", b, full_name)
    scale = config.scale_of(full_name, rank)
    check_norms(a, b, scale, full_name)
    return LoRAModule(a=a.contiguous(), b=b.contiguous(), scale=scale)


def _check_rank(rank: int, max_rank: int, full_name: str) -> None:
    if rank > max_rank:
        raise _weights_error(f"{full_name}: rank {rank} exceeds max_lora_rank {max_rank}; restart with "
                             f"--max-lora-rank {rank} or more")


def _magnitude(tensor: torch.Tensor, module: LoRAModule, full_name: str) -> torch.Tensor:
    """DoRA's magnitude vector: one positive finite norm per output row."""
    out_features = module.b.shape[0]
    if tuple(tensor.shape) != (out_features,):
        raise _weights_error(f"{full_name}: lora_magnitude_vector has shape {tuple(tensor.shape)}, expected "
                             f"({out_features},), one value per output row")
    tensor = _fp32("lora_magnitude_vector", tensor, full_name)
    if not bool((tensor > 0).all()) or float(tensor.max()) > MAX_LORA_NORM:
        raise _weights_error(f"{full_name}: lora_magnitude_vector must hold row norms in (0, {MAX_LORA_NORM:g}]; "
                             "export the adapter again")
    return tensor.contiguous()


def _fp32(half: str, tensor: torch.Tensor, full_name: str) -> torch.Tensor:
    if tensor.dtype not in WEIGHT_DTYPES:
        raise _weights_error(f"{full_name}: {half} has dtype {str(tensor.dtype).removeprefix('torch.')}; expected a "
                             "floating-point tensor of float32, bfloat16, float16 or float64 (fp8 and integer "
                             "weights are not supported): save the adapter in one of those")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():  # after the conversion: float64 beyond fp32's range turns infinite
        raise _weights_error(f"{full_name}: {half} holds NaN or infinite values (or values beyond float32's range)")
    return tensor


def check_norms(a: torch.Tensor, b: torch.Tensor, scale: float, full_name: str, field: str = WEIGHTS_FILE) -> None:
    """Spectral norms of lora_A, scale * lora_B and their product, from QR's small triangular factors
    (B = Qb Rb, A^T = Qa Ra, so ||B A|| = ||Rb Ra^T||): never a dense [out, in] product. A refusal is a
    LoraplexError on `field`."""
    r_a = torch.linalg.qr(a.double().T, mode="r").R  # [min(in, rank), rank]
    r_b = torch.linalg.qr(b.double(), mode="r").R  # [min(out, rank), rank]
    scale = abs(scale)
    norms = {"lora_A": _spectral_norm(r_a), "scale * lora_B": scale * _spectral_norm(r_b),
             "the update scale * lora_B @ lora_A": scale * _spectral_norm(r_b @ r_a.T)}
    for what, norm in norms.items():
        if not norm <= MAX_LORA_NORM:
            raise invalid(field, f"{full_name}: {what} has spectral norm {norm:.3g}, above the {MAX_LORA_NORM:g} that "
                                 "trained adapters stay orders of magnitude below; its weights (or lora_alpha / "
                                 "alpha_pattern) are scaled wrong: export the adapter again")


def _spectral_norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def _pattern_value(patterns: tuple[tuple[Regex, Any], ...], full_name: str, default: Any) -> Any:
    # PEFT's rule: the first key that matches (in the file's order) gives the value
    for regex, value in patterns:
        if regex.match(full_name):
            return value
    return default
