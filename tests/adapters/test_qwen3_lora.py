"""LoRA adapters on a Qwen3 base (per-head q/k norms, head_dim != hidden / heads) batched together with
base requests, against transformers + peft: greedy tokens and fp32 logprobs, on both kernel backends."""

from __future__ import annotations

import pytest
from conftest import PeftReference, build_peft_adapter
from test_peft_parity import TARGETS, assert_logprobs_match, assert_tokens_match, greedy, make_llm, make_requests
from tiny_families import write_random_checkpoint


@pytest.fixture(scope="module")
def qwen3(demo_dir, tmp_path_factory):
    """A tiny random Qwen3 with the demo tokenizer, and two PEFT adapters made on it."""
    import transformers

    root = tmp_path_factory.mktemp("qwen3")
    config = transformers.Qwen3Config(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, tie_word_embeddings=False,
        use_sliding_window=False, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=4)
    base = write_random_checkpoint(root / "base", demo_dir, config, transformers.Qwen3ForCausalLM, seed=11)
    adapters = {
        "attn": build_peft_adapter(root / "attn", {"r": 8, "lora_alpha": 16,
                                                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                                   seed=1, rel=0.3, base_dir=base),
        "mlp": build_peft_adapter(root / "mlp", {"r": 4, "lora_alpha": 4, "use_rslora": True,
                                                 "target_modules": ["gate_proj", "up_proj", "down_proj"]},
                                  seed=2, rel=0.3, base_dir=base),
    }
    return base, adapters, PeftReference(base, dict(adapters))


@pytest.mark.parametrize("target", TARGETS)
def test_qwen3_loras_in_a_mixed_batch_match_peft(qwen3, target):
    base, adapters, reference = qwen3
    plan = [("attn", 21), (None, 9), ("mlp", 0), ("attn", 0), (None, 33), ("mlp", 14)]
    prompts, names = make_requests(41, plan)
    max_new = target[2]
    llm = make_llm(base, adapters, target)
    outputs = llm.generate(prompts, greedy(max_new), adapter=names)
    assert_tokens_match(reference, prompts, names, outputs, max_new=max_new)
    assert_logprobs_match(reference, prompts, names, outputs, max_new)
    assert outputs[2].token_ids != outputs[3].token_ids  # one prompt on two adapters: they change the output
