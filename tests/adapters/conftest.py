"""Fixtures for the adapter tests: LoRA adapters made and saved by PEFT itself on the demo base model,
and a transformers + peft reference that generates with one adapter at a time.

Every adapter here is built the way a user would build one: `get_peft_model(base, LoraConfig(...))`
then `save_pretrained`. PEFT initialises lora_B to zero (a no-op adapter), so both halves are replaced
by random normals sized from PEFT's own per-module rank and scaling: the adapter moves each
projection's output by about `rel` times its input's rms, enough to flip greedy tokens while logits
stay O(10).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

# transformers and peft (dev dependencies) are imported inside the helpers that use them: a module-level
# import would tie every adapter test to them, though most never build a reference.

# The demo tokenizer's special tokens take ids 0..4 (<|bos|> <|eos|> <|im_start|> <|im_end|> <|pad|>).
NUM_SPECIAL = 5
PAD_ID = 4
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# name -> (LoraConfig keyword arguments, seed, relative size of the adapter's update)
PEFT_ADAPTERS: dict[str, tuple[dict[str, Any], int, float]] = {
    # rank 1 on q_proj only: the smallest possible adapter, so it is made stronger to show at all
    "q1": (dict(r=1, lora_alpha=2, target_modules=["q_proj"]), 101, 0.3),
    # rank 32 on every linear layer, as PEFT resolves "all-linear" (lm_head excluded)
    "all32": (dict(r=32, lora_alpha=16, target_modules="all-linear"), 102, 0.06),
    # rank_pattern / alpha_pattern: v_proj rank 4, layer 2's q_proj rank 2, o_proj alpha 32
    "pattern": (
        dict(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            rank_pattern={"v_proj": 4, r"layers\.2\.self_attn\.q_proj": 2},
            alpha_pattern={"o_proj": 32},
        ),
        103,
        0.08,
    ),
    # rsLoRA (scale alpha / sqrt(r)), combined with per-module ranks and alphas
    "rs": (
        dict(
            r=16,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
            rank_pattern={"gate_proj": 4},
            alpha_pattern={"k_proj": 32},
        ),
        104,
        0.08,
    ),
    # only layers 1 and 3
    "layers13": (
        dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
             layers_to_transform=[1, 3]),
        105,
        0.1,
    ),
    # target_modules as a regex string (full match on the module name): q/v of layers 0 and 2, and
    # gate_proj of the same layers
    "regex": (
        dict(r=4, lora_alpha=4, target_modules=r".*layers\.[02]\.(self_attn\.(q|v)|mlp\.gate)_proj"),
        106,
        0.12,
    ),
}


def load_hf_base(model_dir: Path):
    """A fresh fp32 transformers model of the checkpoint (PEFT wraps models in place, so one per use)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    # generate() would stop at the EOS ids of generation_config.json; the engine runs with ignore_eos
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    return model.eval()


def lora_layers(peft_model) -> dict[str, Any]:
    """Module name (as the base model names it, e.g. model.layers.0.self_attn.q_proj) -> PEFT LoRA layer."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {
        name[len(prefix):]: module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and name.startswith(prefix)
    }


def randomize_lora(peft_model, seed: int, rel: float) -> None:
    """Replace lora_A / lora_B (B is zero after PEFT's init) by random normals: A x has the rms of x per
    rank row, and scaling * B A x about `rel` times that."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sorted(lora_layers(peft_model).items()):
            if "default" in layer.lora_A:
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            else:  # LoRA on an embedding: A [r, num_embeddings], B [embedding_dim, r]
                a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
            r, scaling = layer.r["default"], layer.scaling["default"]
            a.copy_(torch.randn(a.shape, generator=gen) / math.sqrt(a.shape[1]))
            b.copy_(torch.randn(b.shape, generator=gen) * rel / (scaling * math.sqrt(r)))


def build_peft_adapter(out_dir: Path, lora_kwargs: dict[str, Any], seed: int = 0, rel: float = 0.15,
                       base_dir: Path | None = None, base=None) -> Path:
    """Make a LoRA adapter with PEFT on the checkpoint in `base_dir` (or on the given transformers model),
    randomize it and save it (safetensors) to `out_dir`."""
    import peft

    model = base if base is not None else load_hf_base(base_dir)
    config = peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora_kwargs)
    peft_model = peft.get_peft_model(model, config)
    randomize_lora(peft_model, seed, rel)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="session")
def peft_adapters(demo_dir, tmp_path_factory) -> dict[str, Path]:
    """name -> directory of each adapter in PEFT_ADAPTERS, saved by PEFT."""
    root = tmp_path_factory.mktemp("peft-adapters")
    return {
        name: build_peft_adapter(root / name, kwargs, seed, rel, base_dir=demo_dir)
        for name, (kwargs, seed, rel) in PEFT_ADAPTERS.items()
    }


class PeftReference:
    """transformers + peft on one adapter at a time (None = the base model alone); models and greedy
    continuations are memoised."""

    def __init__(self, base_dir: Path, adapters: dict[str, Path]) -> None:
        self.base_dir = base_dir
        self.adapters = adapters
        self._models: dict[str | None, Any] = {}
        self._greedy: dict[tuple[str | None, tuple[int, ...], int], list[int]] = {}

    def add(self, name: str, path: Path) -> None:
        self.adapters[name] = path
        self._models.pop(name, None)
        self._greedy = {key: value for key, value in self._greedy.items() if key[0] != name}

    def model(self, adapter: str | None):
        if adapter not in self._models:
            base = load_hf_base(self.base_dir)
            if adapter is None:
                self._models[adapter] = base
            else:
                from peft import PeftModel

                model = PeftModel.from_pretrained(base, self.adapters[adapter])
                self._models[adapter] = model.eval()
        return self._models[adapter]

    @torch.no_grad()
    def greedy(self, adapter: str | None, prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (adapter, tuple(prompt), max_new_tokens)
        if key not in self._greedy:
            assert PAD_ID not in prompt, "the pad token must not occur in a prompt"
            ids = torch.tensor([prompt])
            out = self.model(adapter).generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=None,
                pad_token_id=PAD_ID,
            )
            assert out[0, : len(prompt)].tolist() == prompt
            new = out[0, len(prompt):].tolist()
            assert len(new) == max_new_tokens, f"HF stopped early: {len(new)} of {max_new_tokens} tokens"
            self._greedy[key] = new
        return self._greedy[key]

    @torch.no_grad()
    def logits(self, adapter: str | None, token_ids: list[int]) -> torch.Tensor:
        """[len(token_ids), vocab] fp32 logits of one full forward pass, no KV cache."""
        ids = torch.tensor([token_ids])
        out = self.model(adapter)(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        return out.logits[0].float()


@pytest.fixture(scope="session")
def make_peft_adapter(demo_dir):
    """`make_peft_adapter(out_dir, lora_kwargs, seed=0, rel=0.15, base=None)`: build_peft_adapter on the demo
    checkpoint, or on `base` (a transformers model). Test modules cannot import this conftest (no package)."""

    def make(out_dir: Path, lora_kwargs: dict[str, Any], seed: int = 0, rel: float = 0.15, base=None) -> Path:
        return build_peft_adapter(out_dir, lora_kwargs, seed, rel, base_dir=Path(demo_dir), base=base)

    return make


@pytest.fixture(scope="session")
def peft_lora_layers():
    """`peft_lora_layers(peft_model)` -> {base-model module name: PEFT LoRA layer}."""
    return lora_layers


@pytest.fixture(scope="session")
def peft_reference(demo_dir, peft_adapters) -> PeftReference:
    demo_adapters = {name: Path(demo_dir) / "adapters" / name for name in ("alpha", "beta", "gamma")}
    return PeftReference(Path(demo_dir), {**demo_adapters, **peft_adapters})
