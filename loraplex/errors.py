"""Typed errors shared by every layer: what went wrong (the kind), with which field, and how to fix it.

Layers raise `LoraplexError` for bad input or a refused request; the HTTP edge maps its `kind` to a
status code and its `field` to OpenAI's `param`, and the CLI prints its message. No layer reads
another's message text to find these out. It is a `ValueError`, so callers that only need to know
"the input was bad" may keep catching that.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    INVALID = "invalid"  # the input is wrong (400)
    NOT_FOUND = "not_found"  # it names something that does not exist (404)
    CONFLICT = "conflict"  # it clashes with what exists (409)
    TOO_LARGE = "too_large"  # it is over a size limit (413)
    OVERLOADED = "overloaded"  # the server is too busy to take it now; retry (429)


class LoraplexError(ValueError):
    """`field`: the input at fault (`max_tokens`, `files`, `adapter`), or None when no one field is.
    `message`: what is wrong and how to fix it, without the field. `code`: a short machine-readable
    tag for clients (`model_not_found`), when one applies."""

    def __init__(self, field: str | None, message: str, kind: ErrorKind = ErrorKind.INVALID,
                 code: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message
        self.kind = kind
        self.code = code


def invalid(field: str | None, message: str, code: str | None = None) -> LoraplexError:
    return LoraplexError(field, message, ErrorKind.INVALID, code)


def not_found(field: str | None, message: str, code: str | None = None) -> LoraplexError:
    return LoraplexError(field, message, ErrorKind.NOT_FOUND, code)


def conflict(field: str | None, message: str, code: str | None = None) -> LoraplexError:
    return LoraplexError(field, message, ErrorKind.CONFLICT, code)


def too_large(field: str | None, message: str, code: str | None = None) -> LoraplexError:
    return LoraplexError(field, message, ErrorKind.TOO_LARGE, code)


def overloaded(field: str | None, message: str, code: str | None = None) -> LoraplexError:
    return LoraplexError(field, message, ErrorKind.OVERLOADED, code)
