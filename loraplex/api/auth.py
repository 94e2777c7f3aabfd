"""Bearer-key checks: inference needs the API key, adapter changes the admin key. Keys are compared
in constant time, so response timing reveals nothing about how much of a guess was right."""

from __future__ import annotations

import hmac

from fastapi import Request

from loraplex.api.errors import APIError


def _presented(request: Request) -> bytes | None:
    header = request.headers.get("authorization", "")
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

    def require_inference(self, request: Request) -> None:
        """With an API key set, inference (and reading the adapter list) needs it or the admin key."""
        if self.api_key is None:
            return
        token = _presented(request)
        if not _matches(token, self.api_key, self.admin_key):
            raise _unauthorized(token)

    def require_admin(self, request: Request) -> None:
        """Adapter changes need the admin key when one is set, else whatever inference needs."""
        if self.admin_key is None:
            self.require_inference(request)
            return
        token = _presented(request)
        if _matches(token, self.admin_key):
            return
        if _matches(token, self.api_key):
            raise APIError(403, "this key may run inference but not change adapters; use the admin key",
                           code="insufficient_permissions")
        raise _unauthorized(token)


def _unauthorized(token: bytes | None) -> APIError:
    if token is None:
        message = "missing API key: send the header 'Authorization: Bearer <key>'"
    else:
        message = "invalid API key"
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
