"""Putting a run's adapters in place, and taking them away afterwards.

Three ways (`AdapterSource.mode`):

- `names`: adapters the server already serves, by name (`--adapter-names a,b,c`); nothing is changed.
- `upload`: loraplex's REST upload, `POST {base}/adapters` (multipart: `name`, and the PEFT files as `files`
  parts), one upload per name of the same directory (`--adapters-from DIR`), as `PREFIX0`, `PREFIX1`, ...;
  removed with `DELETE {base}/adapters/{name}`.
- `vllm`: vLLM's `POST {base}/load_lora_adapter` `{"lora_name", "lora_path"}` (the directory's absolute path,
  which the server reads itself, so it must be on the server's machine; vLLM needs
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, loraplex `--allowed-local-adapter-dir`); removed with
  `POST {base}/unload_lora_adapter` `{"lora_name"}`.

Only the adapters a run's schedule uses are put in place; a name that already exists on the server is an
error (an adapter left by an earlier run with --keep-adapters, most likely), never overwritten.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
UPLOAD_PARALLEL = 8


class AdapterError(RuntimeError):
    pass


@dataclass
class AdapterSource:
    mode: str  # names | upload | vllm
    names: tuple[str, ...] = ()  # mode names
    directory: Path | None = None  # upload, vllm
    prefix: str = "lt-"
    placed: list[str] = field(default_factory=list)  # what this run put on the server (to remove)

    def __post_init__(self) -> None:
        if self.mode not in ("names", "upload", "vllm"):
            raise AdapterError(f"unknown adapter mode {self.mode!r}")
        if self.mode == "names" and not self.names:
            raise AdapterError("no adapter names given")
        if self.mode in ("upload", "vllm"):
            if self.directory is None:
                raise AdapterError("--adapters-from DIR is needed to upload or register adapters")
            self.directory = Path(self.directory).resolve()
            missing = [f for f in PEFT_FILES if not (self.directory / f).is_file()]
            if missing:
                raise AdapterError(f"{self.directory} is not a PEFT adapter directory: no {', '.join(missing)}")

    @property
    def capacity(self) -> int | None:
        """How many adapters this source can provide (None: any number)."""
        return len(self.names) if self.mode == "names" else None

    def name(self, index: int) -> str:
        return self.names[index] if self.mode == "names" else f"{self.prefix}{index}"

    def describe(self) -> dict:
        return {"mode": self.mode, "directory": None if self.directory is None else str(self.directory),
                "prefix": None if self.mode == "names" else self.prefix,
                "names": list(self.names) if self.mode == "names" else None}

    async def place(self, client: httpx.AsyncClient, base_url: str, admin_key: str | None,
                    indices: list[int]) -> None:
        """Uploads / registers the adapters at these indices (nothing for `names`)."""
        if self.mode == "names":
            return
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        base = base_url.rstrip("/")
        files = {f: (self.directory / f).read_bytes() for f in PEFT_FILES} if self.mode == "upload" else {}
        gate = asyncio.Semaphore(UPLOAD_PARALLEL)

        async def one(index: int) -> None:
            name = self.name(index)
            async with gate:
                if self.mode == "upload":
                    parts = [("files", (f, data)) for f, data in files.items()]
                    resp = await client.post(f"{base}/adapters", headers=headers, data={"name": name}, files=parts)
                    ok = resp.status_code in (200, 201)
                else:
                    resp = await client.post(f"{base}/load_lora_adapter", headers=headers,
                                             json={"lora_name": name, "lora_path": str(self.directory)})
                    ok = resp.status_code == 200
            if not ok:
                what = "upload" if self.mode == "upload" else "registration"
                hint = " (it exists: left by a run with --keep-adapters? delete it or use another --adapter-prefix)" \
                    if resp.status_code == 409 or "already" in resp.text else ""
                raise AdapterError(f"adapter {name}: {what} failed with HTTP {resp.status_code}{hint}: "
                                   f"{resp.text[:300]}")
            self.placed.append(name)

        results = await asyncio.gather(*(one(i) for i in sorted(set(indices))), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]

    async def remove(self, client: httpx.AsyncClient, base_url: str, admin_key: str | None) -> list[str]:
        """Removes what `place` put on the server; returns the problems (an empty list when all went)."""
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        base = base_url.rstrip("/")
        problems: list[str] = []
        gate = asyncio.Semaphore(UPLOAD_PARALLEL)

        async def one(name: str) -> None:
            async with gate:
                try:
                    if self.mode == "upload":
                        resp = await client.delete(f"{base}/adapters/{name}", headers=headers)
                    else:
                        resp = await client.post(f"{base}/unload_lora_adapter", headers=headers,
                                                 json={"lora_name": name})
                except httpx.HTTPError as e:
                    problems.append(f"{name}: {type(e).__name__}: {e}")
                    return
            if resp.status_code != 200:
                problems.append(f"{name}: HTTP {resp.status_code}: {resp.text[:200]}")
            else:
                self.placed.remove(name)

        await asyncio.gather(*(one(n) for n in list(self.placed)))
        return problems


async def base_model_name(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    """The served base model: the first entry of GET /models without a parent (vLLM and loraplex list
    adapters with `parent` set), else the first entry."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = await client.get(f"{base_url.rstrip('/')}/models", headers=headers)
    if resp.status_code != 200:
        raise AdapterError(f"GET /models failed with HTTP {resp.status_code}: {resp.text[:300]}")
    models = resp.json().get("data") or []
    if not models:
        raise AdapterError("GET /models lists no model")
    for m in models:
        if m.get("parent") is None:
            return m["id"]
    return models[0]["id"]
