"""Model fixtures for the engine tests: the demo checkpoint plus tiny random Qwen2, Qwen3, Llama-3, Mistral,
Gemma 2, Gemma 3 and Phi-3 checkpoints written with `transformers.save_pretrained`, each paired with its Hugging
Face reference."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import pytest
import torch
from tiny_families import family_config, long_rope_everywhere, write_random_checkpoint

# transformers (a dev dependency) is imported where a reference model is built, not here: a module-level
# import would tie every engine test to it, though most never touch a reference model.


# The demo tokenizer's special tokens (loraplex.models.demo): <|bos|> <|eos|> <|im_start|> <|im_end|> <|pad|>
BOS_ID, EOS_ID, PAD_ID = 0, 1, 4
NUM_SPECIAL = 5
SPECIAL_IDS = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


class ParityModel:
    """A checkpoint directory and, loaded on first use, its transformers reference model."""

    def __init__(self, name: str, path: Path, adjust_reference=None) -> None:
        self.name = name
        self.path = path
        self.adjust_reference = adjust_reference  # edits the reference's transformers config in place, or None
        self._greedy: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def __repr__(self) -> str:
        return f"ParityModel({self.name})"

    @cached_property
    def hf(self):
        import transformers

        config = transformers.AutoConfig.from_pretrained(self.path)
        if self.adjust_reference is not None:
            self.adjust_reference(config)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            self.path, config=config, dtype=torch.float32, attn_implementation="eager"
        )
        # generate() fills unset (None) options from the checkpoint's generation_config.json, whose EOS
        # ids would stop it early: clear them at the source; `greedy` checks every continuation is full.
        model.generation_config.eos_token_id = None
        model.config.eos_token_id = None
        return model.eval()

    @property
    def vocab_size(self) -> int:
        return self.hf.config.vocab_size

    def kv_block_bytes(self, block_size: int) -> int:
        """fp32 bytes of K and V for `block_size` tokens over all layers, from the HF config."""
        cfg = self.hf.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * head_dim * 4

    @torch.no_grad()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """[len(token_ids), vocab] fp32 logits of one full forward pass, no KV cache."""
        ids = torch.tensor([token_ids])
        return self.hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0].float()

    @torch.no_grad()
    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """`model.generate` greedy continuation of one prompt alone, EOS stopping off; memoised."""
        key = (tuple(prompt), max_new_tokens)
        if key not in self._greedy:
            assert PAD_ID not in prompt, "the pad token must not occur in a prompt"
            ids = torch.tensor([prompt])
            out = self.hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=None,
                pad_token_id=PAD_ID,
            )
            assert out[0, : len(prompt)].tolist() == prompt
            new = out[0, len(prompt) :].tolist()
            assert len(new) == max_new_tokens, f"HF stopped early: {len(new)} of {max_new_tokens} tokens"
            self._greedy[key] = new
        return self._greedy[key]


def _write_tiny(directory: Path, demo_dir: Path, config, model_cls, seed: int) -> Path:
    return write_random_checkpoint(directory, demo_dir, config, model_cls, seed)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    from loraplex.models.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("parity") / "demo", adapters=False)


@pytest.fixture(scope="session")
def qwen2_model_dir(tmp_path_factory, demo_model_dir) -> Path:
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=_vocab_size(demo_model_dir),
        tie_word_embeddings=False,
        use_sliding_window=False,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        **TINY_SHAPE,
        **SPECIAL_IDS,
    )
    return _write_tiny(tmp_path_factory.mktemp("parity") / "qwen2", demo_model_dir, config,
                       transformers.Qwen2ForCausalLM, seed=1)


@pytest.fixture(scope="session")
def qwen3_model_dir(tmp_path_factory, demo_model_dir) -> Path:
    """Qwen3: per-head q/k RMSNorm before RoPE (random norm weights, so they must be applied), no qkv bias,
    and a head_dim (32) that is not hidden_size / heads (16)."""
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=_vocab_size(demo_model_dir),
        tie_word_embeddings=False,
        use_sliding_window=False,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        head_dim=32,
        **TINY_SHAPE,
        **SPECIAL_IDS,
    )
    return _write_tiny(tmp_path_factory.mktemp("parity") / "qwen3", demo_model_dir, config,
                       transformers.Qwen3ForCausalLM, seed=4)


@pytest.fixture(scope="session")
def llama3_model_dir(tmp_path_factory, demo_model_dir) -> Path:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=_vocab_size(demo_model_dir),
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling=dict(LLAMA3_ROPE),
        rms_norm_eps=1e-5,
        **TINY_SHAPE,
        **SPECIAL_IDS,
    )
    return _write_tiny(tmp_path_factory.mktemp("parity") / "llama3", demo_model_dir, config,
                       transformers.LlamaForCausalLM, seed=2)


def _mistral_config(demo_model_dir: Path, sliding_window: int | None):
    import transformers

    return transformers.MistralConfig(
        vocab_size=_vocab_size(demo_model_dir),
        tie_word_embeddings=True,
        head_dim=32,  # != hidden_size / num_attention_heads, as in Mistral-Nemo
        sliding_window=sliding_window,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        **TINY_SHAPE,
        **SPECIAL_IDS,
    )


@pytest.fixture(scope="session")
def mistral_model_dir(tmp_path_factory, demo_model_dir) -> Path:
    import transformers

    config = _mistral_config(demo_model_dir, sliding_window=None)
    return _write_tiny(tmp_path_factory.mktemp("parity") / "mistral", demo_model_dir, config,
                       transformers.MistralForCausalLM, seed=3)


@pytest.fixture(scope="session")
def mistral_sliding_model_dir(tmp_path_factory, demo_model_dir) -> Path:
    """Mistral with a 32-token sliding window: prompts longer than that must not see past it."""
    import transformers

    config = _mistral_config(demo_model_dir, sliding_window=32)
    return _write_tiny(tmp_path_factory.mktemp("parity") / "mistral-swa", demo_model_dir, config,
                       transformers.MistralForCausalLM, seed=3)


def _family_dir(name: str, tmp_path_factory, demo_model_dir: Path, seed: int) -> Path:
    config, model_cls = family_config(name, _vocab_size(demo_model_dir), SPECIAL_IDS)
    return _write_tiny(tmp_path_factory.mktemp("parity") / name, demo_model_dir, config, model_cls, seed=seed)


@pytest.fixture(scope="session")
def gemma2_model_dir(tmp_path_factory, demo_model_dir) -> Path:
    """Gemma 2: (1 + w) sandwich norms, scaled embeddings, GeGLU, sliding/global layers with a 24-token window,
    attention and final soft-capping, query_pre_attn_scalar."""
    return _family_dir("gemma2", tmp_path_factory, demo_model_dir, seed=5)


@pytest.fixture(scope="session")
def gemma3_model_dir(tmp_path_factory, demo_model_dir) -> Path:
    """Gemma 3: Gemma 2's layer without soft-capping, with q/k norms and a local RoPE base on sliding layers."""
    return _family_dir("gemma3", tmp_path_factory, demo_model_dir, seed=6)


@pytest.fixture(scope="session")
def phi3_model_dir(tmp_path_factory, demo_model_dir) -> Path:
    """Phi-3: fused qkv_proj / gate_up_proj tensors, partial rotary, LongRoPE (original context 64)."""
    return _family_dir("phi3", tmp_path_factory, demo_model_dir, seed=7)


def _vocab_size(demo_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(demo_dir / "tokenizer.json")).get_vocab_size()


PARITY_MODELS = ("demo", "qwen2", "qwen3", "llama3", "mistral", "gemma2", "gemma3", "phi3")
# The engine serves these models beyond Phi-3's original context (max_model_len 512 > 64), so it rotates every
# position with the long LongRoPE factors; transformers would use the short ones on short inputs.
_REFERENCE_ADJUSTMENTS = {"phi3": long_rope_everywhere}


@pytest.fixture(scope="session")
def parity_cache() -> dict[str, ParityModel]:
    """name -> ParityModel, shared by the whole session (HF models and greedy references are memoised)."""
    return {}


def _get(request, cache: dict[str, ParityModel], name: str) -> ParityModel:
    if name not in cache:
        cache[name] = ParityModel(name, Path(request.getfixturevalue(f"{name}_model_dir")),
                                  _REFERENCE_ADJUSTMENTS.get(name))
    return cache[name]


@pytest.fixture
def load_parity_model(request, parity_cache):
    """`load_parity_model(name)` -> the session's ParityModel for each of PARITY_MODELS and mistral_sliding."""
    return lambda name: _get(request, parity_cache, name)


@pytest.fixture(params=PARITY_MODELS)
def parity_model(request, parity_cache) -> ParityModel:
    return _get(request, parity_cache, request.param)

