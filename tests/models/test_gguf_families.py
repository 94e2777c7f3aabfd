"""GGUF files of the Qwen families (llama.cpp's `qwen2` and `qwen3` architectures: q/k rows not permuted,
qwen2's q/k/v biases, qwen3's per-head q/k norms), written with `gguf.GGUFWriter` from tiny random
Hugging Face checkpoints, all tensors F32: loraplex serving the GGUF file, and the directory `loraplex
convert` makes of it, match transformers on the original checkpoint (fp32 logprobs, greedy tokens)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_vocab import tokenizer_metadata

from loraplex import LLM, SamplingParams
from loraplex.models.gguf import convert_gguf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
TINY = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6,
            rope_theta=1000000.0, bos_token_id=0, eos_token_id=1, pad_token_id=4)
NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
MAX_NEW = 12


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.<i>.<module>.<weight|bias>
    module, _, kind = rest.rpartition(".")
    return f"blk.{layer}.{NAMES[module]}.{kind}"


def write_family(root: Path, demo_dir: Path, arch: str):
    """(HF checkpoint dir, GGUF file) of a tiny random model of `arch` with the demo tokenizer."""
    import gguf
    import transformers

    if arch == "qwen3":
        config = transformers.Qwen3Config(head_dim=32, use_sliding_window=False, **TINY)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.Qwen2Config(use_sliding_window=False, **TINY)
        model = transformers.Qwen2ForCausalLM(config)
    gen = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.2
            param.copy_(1.0 + noise if "norm" in name else noise)
    hf_dir = root / f"{arch}-hf"
    model.save_pretrained(hf_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(demo_dir / name, hf_dir / name)
    tokens, types, merges = tokenizer_metadata(demo_dir)
    path = root / f"{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(TINY["max_position_embeddings"])
    writer.add_embedding_length(TINY["hidden_size"])
    writer.add_block_count(TINY["num_hidden_layers"])
    writer.add_feed_forward_length(TINY["intermediate_size"])
    writer.add_head_count(TINY["num_attention_heads"])
    writer.add_head_count_kv(TINY["num_key_value_heads"])
    head_dim = getattr(config, "head_dim", None) or TINY["hidden_size"] // TINY["num_attention_heads"]
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    writer.add_rope_freq_base(TINY["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)
    for name, tensor in model.state_dict().items():
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(tensor.float().numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf_dir, path, model.eval()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_a_qwen_gguf_and_its_conversion_match_transformers(demo_dir, tmp_path, arch):
    hf_dir, path, reference = write_family(tmp_path, Path(demo_dir), arch)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 2048, (n,), generator=gen).tolist() for n in (7, 30, 1)]
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True, logprobs=1)
    converted = convert_gguf(path, tmp_path / f"{arch}-converted")
    for source in (path, converted):
        llm = LLM(model=str(source), dtype="float32", device="cpu", max_model_len=256, kv_cache_memory="32MiB")
        assert llm.engine.model.config.architecture == reference.config.architectures[0]
        outputs = llm.generate(prompts, params)
        for prompt, out in zip(prompts, outputs, strict=True):
            with torch.no_grad():
                ids = torch.tensor([prompt + out.token_ids])
                ref = reference(input_ids=ids).logits[0].float().log_softmax(-1)[len(prompt) - 1:-1]
            assert out.token_ids == ref.argmax(-1).tolist(), f"{source.name}: greedy tokens differ"
            ours = torch.tensor([lp.logprob for lp in out.logprobs])
            torch.testing.assert_close(ours, ref[torch.arange(MAX_NEW), out.token_ids], atol=1e-4, rtol=0)
