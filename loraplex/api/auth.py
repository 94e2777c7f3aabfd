"""Bearer-key checks, made before a request's body is read: inference needs the API key, adapter
changes the admin key. Keys are compared in constant time, so response timing reveals nothing about
how much of a guess was right."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from loraplex.api.errors import APIError, error_body

ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
OPEN_PATHS = ("/health", "/metrics")
INFERENCE_PATHS = ("/tokenize", "/detokenize")  # vLLM's, outside /v1/: they read the model's tokenizer


def required_role(method: str, path: str) -> str | None:
    """'admin', 'inference', or None (open) for a request."""
    if path in INFERENCE_PATHS:
        return "inference"
    if not path.startswith("/v1/"):
        return None
    changes_adapters = method not in ("GET", "HEAD", "OPTIONS") and (
        path == "/v1/adapters" or path.startswith("/v1/adapters/"))
    return "admin" if changes_adapters or path in ADMIN_PATHS else "inference"


def _presented(header: str) -> bytes | None:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode()


def _matches(token: bytes | None, *keys: str | None) -> bool:
    ok = False
    for key in keys:
        if key is not None and token is not None:
            ok |= hmac.compare_digest(token, key.encode())  # no early exit: every key is compared
    return ok


class Auth:
    def __init__(self, api_key: str | None, admin_key: str | None) -> None:
        self.api_key = api_key
        self.admin_key = admin_key

    def check(self, role: str, authorization: str) -> None:
        """Raises 401 / 403 unless the `Authorization` header allows `role`. With an API key set,
        inference needs it (or the admin key). Adapter changes need the admin key when one is set,
        else whatever inference needs."""
        token = _presented(authorization)
        if role == "admin" and self.admin_key is not None:
            if _matches(token, self.admin_key):
                return
            if _matches(token, self.api_key):
                raise APIError(403, "this key may run inference but not change adapters; use the admin key",
                               code="insufficient_permissions")
            raise _unauthorized(token)
        if self.api_key is not None and not _matches(token, self.api_key, self.admin_key):
            raise _unauthorized(token)


def _unauthorized(token: bytes | None) -> APIError:
    if token is None:
        message = "missing API key: send the header 'Authorization: Bearer <key>'"
    else:
        message = "invalid API key"
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class AuthGate:
    """ASGI middleware: refuses a request without the right key before its body is read or parsed,
    so an unauthenticated client cannot make the server read and parse megabytes of JSON."""

    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        role = required_role(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if role is not None:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            try:
                self.auth.check(role, header)
            except APIError as e:
                response = JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status,
                                        headers=e.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
