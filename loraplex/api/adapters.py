"""The adapter REST API (/v1/adapters) and vLLM's load/unload endpoints."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from loraplex.adapters_store.uploads import ALLOWED_FILES, stage_upload
from loraplex.api.errors import APIError
from loraplex.api.protocol import LoadLoRARequest, MergeRequest, UnloadLoRARequest
from loraplex.api.state import ServerState, State

router = APIRouter()

MAX_UPLOAD_PARTS = 16


@router.get("/v1/adapters")
async def list_adapters(state: State) -> dict[str, Any]:
    infos = sorted(state.registry.infos.values(), key=lambda i: i.name)
    return {"object": "list", "data": [info.to_json(state.base_name) for info in infos]}


@router.get("/v1/adapters/{name}")
async def get_adapter(name: str, state: State) -> dict[str, Any]:
    info = state.registry.infos.get(name)
    if info is None:
        raise APIError(404, f"adapter '{name}' does not exist", param="name", code="adapter_not_found")
    return info.to_json(state.base_name)


@router.post("/v1/adapters")
async def upload_adapter(request: Request, state: State) -> JSONResponse:
    """multipart/form-data: `name`, and the PEFT files (or one .tar.gz / .zip of them) as `files`."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(415, "send multipart/form-data with a 'name' field and the adapter's files as 'files' "
                       f"parts ({', '.join(ALLOWED_FILES[:2])}, or one .tar.gz / .zip of them)")
    try:
        form = await request.form(max_files=MAX_UPLOAD_PARTS, max_fields=8)
    except MultiPartException as e:
        raise APIError(400, f"files: the multipart body could not be read: {e}", param="files") from None
    try:
        name = form.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "name: a form field 'name' with the adapter's name is required", param="name")
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not files:
            raise APIError(400, "files: no file parts; send the adapter's files as 'files' parts", param="files")
        info = await _store_parts(state, name, [(f.filename or "", f.file) for f in files], "upload", replace=False)
    finally:
        await form.close()
    return JSONResponse(info, status_code=201)


@router.post("/v1/adapters/merge")
async def merge_adapters(body: MergeRequest, state: State) -> JSONResponse:
    """A new stored adapter made of served ones: `name`, `method`, `sources` [{name, weight?, loss?,
    step?}] and the method's parameters. Durable, listed with its recipe, served at once."""
    info = await state.registry.add_merged(body.name, body.sources, body.params(), replace=body.replace)
    return JSONResponse(info.to_json(state.base_name), status_code=201)


@router.delete("/v1/adapters/{name}")
async def delete_adapter(name: str, state: State) -> dict[str, Any]:
    info = await state.registry.delete(name)
    return {"id": name, "object": "adapter", "deleted": True, "sha256": info.sha256 if info else None}


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRARequest, state: State) -> PlainTextResponse:
    """vLLM's endpoint: reads a directory under --allowed-local-adapter-dir into the store."""
    allowed = state.config.allowed_local_adapter_dir
    if allowed is None:
        raise APIError(403, "lora_path: loading adapters from server paths is off; start the server with "
                       "--allowed-local-adapter-dir DIR, or upload with POST /v1/adapters", param="lora_path")
    root = Path(allowed).resolve()
    try:
        path = Path(body.lora_path).expanduser().resolve()  # symlinks resolved: no way out of `root`
    except (ValueError, OSError) as e:
        raise APIError(400, f"lora_path: not a usable path ({e})", param="lora_path") from None
    if not path.is_relative_to(root):
        raise APIError(403, f"lora_path: {body.lora_path} is outside the allowed directory {root}",
                       param="lora_path")
    if not path.is_dir():
        raise APIError(400, f"lora_path: {body.lora_path} is not a directory", param="lora_path")
    files = [p for p in sorted(path.iterdir()) if p.name in ALLOWED_FILES and p.is_file()]
    escaping = [p.name for p in files if not p.resolve().is_relative_to(root)]
    if escaping:  # a file linked to somewhere else
        raise APIError(403, f"lora_path: {', '.join(escaping)} links outside the allowed directory {root}",
                       param="lora_path")
    handles = [open(p.resolve(), "rb") for p in files]  # noqa: SIM115 (closed below)
    try:
        await _store_parts(state, body.lora_name, [(Path(h.name).name, h) for h in handles], f"local:{path}",
                           replace=body.load_inplace)
    finally:
        for handle in handles:
            handle.close()
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRARequest, state: State):
    await state.registry.delete(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def _store_parts(state: ServerState, name: str, parts: list, source: str, replace: bool) -> dict[str, Any]:
    registry = state.registry
    staged = registry.store.staging_dir()
    try:
        await asyncio.to_thread(stage_upload, parts, staged, state.config.max_adapter_bytes)
    except BaseException:  # an UploadError among them: the app's handler answers it as its kind says
        registry.store.discard(staged)
        raise
    info = await registry.add_staged(name, staged, source, replace=replace)
    return info.to_json(state.base_name)
