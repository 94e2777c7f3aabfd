"""Checks that run before a model loads, so that a mistake costs a second, not a model load: each raises
LoraplexError naming the option and the fix. Torch-free (the CLI runs them before importing it)."""

from __future__ import annotations

import errno
import re
import socket
from pathlib import Path

from loraplex.errors import invalid

ADAPTER_CONFIG = "adapter_config.json"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as the Hugging Face Hub names models


def check_model_path(model: str | None) -> None:
    """`--model` exists; a Hub id that is not a local path gets a message that loraplex downloads nothing."""
    if model is None:
        return
    path = Path(model).expanduser()
    if path.exists():
        return
    if _HUB_ID.fullmatch(model):
        raise invalid("model", f"{model} is not a local path; loraplex never downloads models. Fetch it first "
                      f"(`huggingface-cli download {model} --local-dir DIR`) and pass --model DIR, or pass a .gguf "
                      "file")
    raise invalid("model", f"{path} does not exist; pass a Hugging Face checkpoint directory or a .gguf file")


def check_adapter_dirs(adapters: dict[str, str]) -> None:
    """Each `--adapter NAME=PATH` is a directory holding an adapter_config.json."""
    for name, path in adapters.items():
        where = Path(path).expanduser()
        if not where.exists():
            raise invalid("adapter", f"{name}={path}: {where} does not exist")
        if not where.is_dir() or not (where / ADAPTER_CONFIG).is_file():
            raise invalid("adapter", f"{name}={path}: not an adapter directory (no {ADAPTER_CONFIG} in it); give "
                          "a PEFT adapter directory or a loraplex sparse delta")


def check_port_free(host: str, port: int) -> None:
    """Nothing listens on host:port (a port of 0 takes any free one). Bound and released at once, as the
    server (uvicorn, through asyncio's create_server) binds it: every address the host resolves to, SO_REUSEADDR
    (a port in TIME_WAIT may be taken, not one with a listener), IPv6 sockets IPv6-only, and an address whose
    family this machine lacks skipped (EADDRNOTAVAIL) unless none is left."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise invalid("host", f"{host!r} cannot be resolved ({e.strerror}); give an address such as 127.0.0.1 "
                      "or 0.0.0.0") from None
    bound = 0
    for family, kind, proto, _, address in dict.fromkeys(infos):
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:
            continue  # a family this machine lacks (asyncio skips it too)
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise invalid("port", f"{host}:{port} is already in use (another server?); stop it, or pass "
                                  "another --port") from None
                if e.errno == errno.EADDRNOTAVAIL:
                    continue
                if e.errno == errno.EACCES:
                    raise invalid("port", f"port {port} needs privileges to listen on; pass a port above 1023") \
                        from None
                raise
            bound += 1
    if not bound:
        raise invalid("host", f"{host} is not an address of this machine; give one of its addresses, 127.0.0.1, "
                      "or 0.0.0.0")


def check_store_free(data_dir: Path, served_name: str) -> None:
    """No other server holds the adapter store of this base model (api/server.py opens it the same way)."""
    from loraplex.adapters_store.store import AdapterStore
    from loraplex.cache import STORES_DIRNAME

    lock = data_dir / STORES_DIRNAME / store_slug(served_name) / "lock"
    if lock.exists():
        AdapterStore.hold(lock).close()  # raises when another process holds it


def store_slug(served_name: str) -> str:
    """The store's directory name for a base model: adapters are only valid for the model they were made for."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", served_name) or "model"


def check_adapter_names(names: list[str | None], known: set[str], base_name: str | None) -> None:
    """Adapters asked for by name (`--use-adapter`, a prompts file's "adapter") are among those registered."""
    for name in names:
        if name is not None and name != base_name and name not in known:
            listed = ", ".join(sorted(known)) or "none (give one with --adapter NAME=PATH)"
            raise invalid("adapter", f"{name!r} is not registered; registered: {listed}")
