"""Load a Hugging Face checkpoint directory into `LlamaForCausalLM`, one tensor at a time."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from loraplex.kernels.backend import TorchBackend, select_backend
from loraplex.models.llama import AdaptableLinear, LlamaForCausalLM
from loraplex.models.model_config import ModelConfig
from loraplex.models.registry import model_class

logger = logging.getLogger(__name__)

# Tensors some checkpoints carry that the model recomputes or does not need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# A multimodal checkpoint's text model (ModelConfig.text_of_multimodal): its tensors' prefixes -> the text-only
# checkpoint's, and the parts it does not need (the vision tower and its projector)
MULTIMODAL_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                       "language_model.lm_head.": "lm_head."}
MULTIMODAL_SKIPPED = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.",
                      "model.multi_modal_projector.")


def find_weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (a JSON object with a weight_map): {e}") from None
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [f for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index}: names {missing[0].name}, which is not in {model_dir}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ValueError(
            f"{model_dir}: holds only pickle weights (*.bin/*.pt), which loraplex does not load; convert "
            "them with `transformers`: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
            "safe_serialization=True)"
        )
    raise FileNotFoundError(f"{model_dir}: no *.safetensors weights found")


def is_gguf(path: Path) -> bool:
    """A .gguf file, or a directory holding one and no config.json."""
    if path.is_file():
        return path.suffix == ".gguf"
    return not (path / "config.json").exists() and any(path.glob("*.gguf"))


def load_model(
    model_path: Path, dtype: torch.dtype, device: torch.device, backend: str | TorchBackend = "auto",
    load_format: str = "auto",
) -> LlamaForCausalLM:
    """Build the model from a Hugging Face checkpoint directory or a GGUF file. `backend` is a kernel
    backend, or the name of one (auto | torch | triton) to choose for the device and head size.
    `load_format="dummy"` reads config.json only and fills the weights with seeded random values of
    the right shapes (for benchmarks of model shapes nobody has downloaded)."""
    if load_format == "dummy":
        return _dummy_model(model_path, dtype, device, backend)
    if is_gguf(model_path):
        from loraplex.models.gguf import read_gguf

        checkpoint = read_gguf(model_path)
        config = ModelConfig.from_dict(checkpoint.config, source=checkpoint.path.name)
        tensors = ((checkpoint.path, name, tensor) for name, tensor in checkpoint.tensors())
        total = len(checkpoint.reader.tensors)
    else:
        config = ModelConfig.from_file(model_path / "config.json")
        files = find_weight_files(model_path)
        tensors = ((path, name, tensor) for path in files for name, tensor in _read_tensors(path))
        total = sum(_count_tensors(path) for path in files)
    if isinstance(backend, str):
        backend = select_backend(backend, device, config.head_dim, dtype)
    with torch.device("meta"):
        model = model_class(config)(config, backend, dtype)
    model.to_empty(device=device)
    unfilled = set(expected_tensor_names(model))
    progress = LoadProgress(model_path.name, total)
    for path, name, tensor in tensors:
        _load_tensor(model, config, path, name, tensor, unfilled)
        progress.step()
    progress.done()
    if unfilled:
        names = ", ".join(sorted(unfilled)[:5])
        raise ValueError(f"{model_path}: checkpoint lacks {len(unfilled)} tensor(s) the model needs: {names}")
    model.build_rope(device, config.max_position_embeddings)
    return model.eval().requires_grad_(False)


def _dummy_model(model_path: Path, dtype: torch.dtype, device: torch.device,
                 backend: str | TorchBackend) -> LlamaForCausalLM:
    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model_path}: --load-format dummy needs the model's config.json (and a tokenizer) there")
    config = ModelConfig.from_file(config_file)
    if isinstance(backend, str):
        backend = select_backend(backend, device, config.head_dim, dtype)
    with torch.device("meta"):
        model = model_class(config)(config, backend, dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(0.0 if config.gemma else 1.0)  # RMSNorm gains of 1 (Gemma stores w in 1 + w)
        else:  # a trained model's scale: activations neither vanish nor overflow across layers
            param.data.normal_(0.0, 0.02, generator=generator)
    logger.info("%s: random weights (--load-format dummy), %d parameters", model_path.name,
                sum(p.numel() for p in model.parameters()))
    model.build_rope(device, config.max_position_embeddings)
    return model.eval().requires_grad_(False)


class LoadProgress:
    """Log lines while the weights load: tensors loaded / total, every PROGRESS_SECONDS, and when done."""

    PROGRESS_SECONDS = 2.0

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.loaded = name, total, 0
        self.start = self.last = time.monotonic()

    def step(self) -> None:
        self.loaded += 1
        now = time.monotonic()
        if now - self.last >= self.PROGRESS_SECONDS:
            self.last = now
            logger.info("loading weights of %s: %d/%d tensors (%.0f s)", self.name, self.loaded, self.total,
                        now - self.start)

    def done(self) -> None:
        logger.info("loaded weights of %s: %d/%d tensors in %.1f s", self.name, self.loaded, self.total,
                    time.monotonic() - self.start)


def _count_tensors(path: Path) -> int:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return len(f.keys())


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    # safe_open memory-maps the file: each tensor is read as it is copied into its parameter.
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open objects are not iterable)
            yield name, f.get_tensor(name)


def expected_tensor_names(model: LlamaForCausalLM) -> Iterator[str]:
    """Every checkpoint tensor name the model expects, fused shards named as the checkpoint has them."""
    shards_of: dict[str, list[str]] = {}  # fused module -> checkpoint projections
    for ckpt_leaf, (fused_leaf, _) in model.checkpoint_shards.items():
        shards_of.setdefault(fused_leaf, []).append(ckpt_leaf)
    for name, _ in model.named_parameters():
        module, _, kind = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        for ckpt_leaf in shards_of.get(leaf, [leaf]):
            yield ".".join(part for part in (parent, ckpt_leaf, kind) if part)


def _load_tensor(model, config: ModelConfig, path: Path, name: str, tensor, unfilled: set[str]) -> None:
    if name.endswith(IGNORED_SUFFIXES):
        return
    if config.text_of_multimodal:
        if name.startswith(MULTIMODAL_SKIPPED):
            return
        prefix = next((p for p in MULTIMODAL_PREFIXES if name.startswith(p)), None)
        name = name if prefix is None else MULTIMODAL_PREFIXES[prefix] + name.removeprefix(prefix)
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return  # tied: the embedding matrix doubles as the output head
    destination = _destination(model, name)
    if destination is None:
        raise ValueError(f"{path.name}: unexpected tensor {name!r}; it is not part of a "
                         f"{config.architecture} with this config.json")
    param, rows = destination
    target = param.data if rows is None else param.data[rows]
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"{path.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                         f"expected {tuple(target.shape)} from config.json")
    target.copy_(tensor)
    unfilled.discard(name)


def _destination(model: LlamaForCausalLM, name: str) -> tuple[torch.nn.Parameter, slice | None] | None:
    module_path, _, kind = name.rpartition(".")
    parent, _, leaf = module_path.rpartition(".")
    rows = None
    shards = model.checkpoint_shards
    if leaf in shards:
        fused_leaf, shard = shards[leaf]
        module_path = f"{parent}.{fused_leaf}"
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return None
    param = getattr(module, kind, None)
    if not isinstance(param, torch.nn.Parameter):
        return None
    if leaf in shards:
        if not isinstance(module, AdaptableLinear):
            return None
        rows = module.shard_rows(shard)
    return param, rows
