import hashlib
import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer

from loraplex.models import demo


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.write_demo_model(tmp_path_factory.mktemp("demo") / "tiny-llama")


@pytest.fixture(scope="module")
def base_model(model_dir: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    return model.eval(), info


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ids(model_dir: Path, text: str) -> torch.Tensor:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return torch.tensor([tok.encode(text).ids])  # [1, T]


def test_layout_and_config(model_dir: Path) -> None:
    names = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
    expected.add("tokenizer_config.json")
    for name in demo.DEMO_ADAPTERS:
        expected |= {f"adapters/{name}/adapter_config.json", f"adapters/{name}/adapter_model.safetensors"}
    assert names == expected
    assert json.loads((model_dir / "config.json").read_text()) == demo.DEMO_CONFIG
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [demo.EOS_ID, demo.IM_END_ID]
    assert not list(model_dir.parent.glob("*.partial"))


def test_loads_in_transformers(model_dir: Path, base_model) -> None:
    model, info = base_model
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == demo.DEMO_CONFIG["vocab_size"] == 2048
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (demo.BOS_ID, demo.EOS_ID, demo.PAD_ID)
    ids = tok("The lighthouse keeper climbed the steps", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 2048)
    assert torch.isfinite(logits).all()
    top2 = logits[0].topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).median() > 0.1  # peaked, greedy not decided by near-ties


def test_deterministic_bytes(model_dir: Path, tmp_path: Path) -> None:
    again = demo.write_demo_model(tmp_path / model_dir.name)  # same name: adapter configs embed it
    files = [p.relative_to(model_dir) for p in model_dir.rglob("*") if p.is_file()]
    assert {"model.safetensors", "tokenizer.json"} <= {f.name for f in files}
    for rel in files:
        assert _sha(model_dir / rel) == _sha(again / rel), rel
    weights = load_file(str(again / "model.safetensors"))
    assert "lm_head.weight" not in weights
    assert all(t.dtype == torch.float32 for t in weights.values())


@pytest.mark.parametrize("name", list(demo.DEMO_ADAPTERS))
def test_adapter_loads_and_changes_logits(model_dir: Path, name: str) -> None:
    spec = demo.DEMO_ADAPTERS[name]
    adapter_dir = model_dir / "adapters" / name
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = _ids(model_dir, "Every garden also has a corner where nothing grows well.")
    with torch.no_grad():
        base_logits = base(ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    messages = [str(w.message).lower() for w in caught]
    assert not [m for m in messages if "missing" in m or "unexpected" in m]

    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha) == (spec["r"], spec["alpha"])
    assert set(cfg.target_modules) == set(spec["targets"])

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loaded = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    assert set(saved) == set(loaded)
    layers = demo.DEMO_CONFIG["num_hidden_layers"]
    assert len(saved) == 2 * layers * len(spec["targets"])
    shapes = demo.linear_shapes(demo.DEMO_CONFIG)
    for key, tensor in saved.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)
        out, inp = shapes[key.split(".")[-3]]
        assert tuple(tensor.shape) == ((spec["r"], inp) if ".lora_A." in key else (out, spec["r"]))
        assert tensor.abs().max() > 0

    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert (logits - base_logits).abs().max() > 1e-2


def test_tokenizer_roundtrip_and_chat_template(model_dir: Path) -> None:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = "héllo wörld — 日本語 🙂"
    enc = tok.encode(text)
    assert enc.ids[0] == demo.BOS_ID
    assert tok.decode(enc.ids) == text
    assert tok.encode("hi").ids[0] == demo.BOS_ID
    for i, special in enumerate(demo.SPECIAL_TOKENS):
        assert tok.token_to_id(special) == i
    assert tok.encode("<|im_start|>user", add_special_tokens=False).ids[0] == demo.IM_START_ID

    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_refuses_existing_model_dir(model_dir: Path) -> None:
    with pytest.raises(FileExistsError, match="remove it or pick another"):
        demo.write_demo_model(model_dir)
    assert not list(model_dir.parent.glob("*.partial"))


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> Tokenizer:
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(demo, "build_tokenizer", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        demo.write_demo_model(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_existing_empty_dir_without_adapters(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    assert demo.write_demo_model(target, adapters=False) == target
    assert (target / "config.json").is_file() and not (target / "adapters").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
