"""Errors at the HTTP edge, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from loraplex.errors import ErrorKind, LoraplexError

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "server_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


_SURROGATES = "surrogates not allowed"  # UnicodeEncodeError's reason for a lone surrogate in UTF-8

_STATUS = {ErrorKind.INVALID: 400, ErrorKind.NOT_FOUND: 404, ErrorKind.CONFLICT: 409, ErrorKind.TOO_LARGE: 413,
           ErrorKind.OVERLOADED: 429}


def from_error(error: LoraplexError) -> APIError:
    """A typed error from inside as the HTTP error of its kind: `param` is its field, `code` its code,
    and the message its own ("field: what is wrong; how to fix it")."""
    headers = {"Retry-After": "1"} if error.kind is ErrorKind.OVERLOADED else None  # busy now, not for long
    return APIError(_STATUS[error.kind], str(error), param=error.field, code=error.code, headers=headers)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist; GET /v1/models lists the base model and every "
                    "adapter", param="model", code="model_not_found")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The body of every error answer. Its text may echo the client's input, which JSON lets hold lone
    surrogates ("\\ud800") that UTF-8 cannot encode: those are written as their escapes instead."""
    error_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": _encodable(message), "type": error_type, "param": _encodable(param),
                      "code": _encodable(code)}}


def _encodable(text: str | None) -> str | None:
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def routing_error(request: Request, error: StarletteHTTPException) -> APIError:
    """Starlette's HTTP errors (only its router raises them: no route of ours does) in OpenAI's shape:
    an unknown route is a 404 saying which request it was, as OpenAI's "Invalid URL (GET /v1/nope)"
    does, and a known route's wrong method a 405 whose `Allow` lists every method of its path."""
    path = request.url.path
    shown = f"{request.method} {path if len(path) <= 200 else path[:200] + '...'}"
    if error.status_code == 404:
        return APIError(404, f"Invalid URL ({shown}): no such endpoint; see /docs for the API", code="unknown_url",
                        headers=error.headers)
    if error.status_code == 405:
        allowed = _allowed_methods(request) or (error.headers or {}).get("Allow")
        headers = {**(error.headers or {}), "Allow": allowed} if allowed else error.headers
        # The message stays Starlette's (clients and tests match it); `Allow` says what the endpoint takes.
        return APIError(405, str(error.detail), code="method_not_allowed", headers=headers)
    return APIError(error.status_code, str(error.detail), headers=error.headers)


_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> str:
    """Every method the request's path takes: Starlette's `Allow` names only the first route whose path
    matched, and one path may have several routes (GET and DELETE /v1/adapters/{name}). Asked of the
    routes themselves (`matches`, which also sees into included routers), one method at a time."""
    allowed = [method for method in _METHODS if any(
        route.matches({**request.scope, "method": method})[0] is Match.FULL for route in request.app.router.routes)]
    return ", ".join(allowed)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), status_code=error.status,
                        headers=error.headers)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(LoraplexError)
    async def _typed(request: Request, error: LoraplexError) -> JSONResponse:
        return error_response(from_error(error))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(routing_error(request, error))

    @app.exception_handler(UnicodeEncodeError)
    async def _unencodable(request: Request, error: UnicodeEncodeError) -> JSONResponse:
        if error.reason != _SURROGATES:
            return await _unexpected(request, error)
        # Only a client's text holds lone surrogates: a route passed one to an encoder (a tokenizer, a path).
        return error_response(APIError(400, "the request holds a lone surrogate (e.g. \\ud800), which is not "
                                       "text; send well-formed UTF-16 surrogate pairs or UTF-8",
                                       code="invalid_unicode"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        # The connection is closed after it: whatever failed may have left its state (a half-read body) behind.
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(error).__name__}; see the server log",
                                       headers={"Connection": "close"}))


# Fields that take one of several shapes: pydantic reports each alternative's failure, so say once
# what the field accepts instead.
_SHAPES = {
    "prompt": "must be a non-empty string, list of strings, list of token ids, or list of lists of token ids",
    "stop": "must be a string or a list of at most 16 strings",
    "content": 'must be a string or a list of {"type": "text", "text": ...} parts (images and audio are not '
               "supported)",
}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def validation_error(errors: list[dict]) -> APIError:
    """The first of pydantic's errors as a 400 whose `param` is written as OpenAI writes it
    (`messages[0].content`)."""
    first = errors[0]
    param = _param(first.get("loc", ()))
    message = str(first.get("msg", "invalid value"))
    ours = first.get("ctx", {}).get("error")  # what a validator of ours raised, as it raised it
    if isinstance(ours, LoraplexError):
        param = ".".join(p for p in (param, ours.field) if p)
        message = ours.message
    else:
        leaf = re.sub(r"\[\d+\]$", "", param.rpartition(".")[2]) if param else ""
        if leaf in _SHAPES and len([e for e in errors if _param(e.get("loc", ())) == param]) > 1:
            message = _SHAPES[leaf]
    return APIError(400, f"{param}: {message}" if param else message, param=param or None)


def _param(loc: tuple) -> str:
    param = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in _TYPE_TAGS or not re.fullmatch(r"[a-z_][a-z0-9_]*", str(part)):
            break  # which alternative of a union failed: not a field
        else:
            param = f"{param}.{part}" if param else str(part)
    return param
