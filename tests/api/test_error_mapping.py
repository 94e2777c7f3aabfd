"""The one mapping at the HTTP edge from typed errors to OpenAI's error shape: status by kind, `param`
by field, never by message text. (No live server: the mapping itself, and the app's handlers.)"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from loraplex.api.errors import from_error, install_handlers, validation_error
from loraplex.api.protocol import ChatCompletionRequest
from loraplex.errors import ErrorKind, LoraplexError

STATUS = {ErrorKind.INVALID: 400, ErrorKind.NOT_FOUND: 404, ErrorKind.CONFLICT: 409, ErrorKind.TOO_LARGE: 413,
          ErrorKind.OVERLOADED: 429}


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_from_error_maps_kind_to_status_and_field_to_param(kind):
    # The message reads like another field's ("top_k: ..."): only `field` may decide the param.
    error = from_error(LoraplexError("files", "top_k: 2 > 1; fix it", kind, code="some_code"))
    assert (error.status, error.param, error.code) == (STATUS[kind], "files", "some_code")
    assert error.message == "files: top_k: 2 > 1; fix it"
    assert error.headers == ({"Retry-After": "1"} if kind is ErrorKind.OVERLOADED else None)


def test_from_error_without_a_field_has_no_param():
    error = from_error(LoraplexError(None, "the server is busy", ErrorKind.OVERLOADED, code="queue_full"))
    assert (error.status, error.param, error.code, error.message) == (429, None, "queue_full", "the server is busy")


def test_a_typed_error_raised_by_a_route_is_answered_by_its_kind():
    app = FastAPI()
    install_handlers(app)

    @app.post("/upload")
    async def upload():
        raise LoraplexError("files", "upload exceeds the size limit", ErrorKind.TOO_LARGE)

    response = TestClient(app).post("/upload")
    assert response.status_code == 413
    assert response.json() == {"error": {"message": "files: upload exceeds the size limit",
                                         "type": "invalid_request_error", "param": "files", "code": None}}


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": []}]}, "messages[1].content",
     "a user message needs content (a string or text parts)"),
])
def test_our_validators_name_their_field_below_the_body_place(body, param, message):
    """Read from the LoraplexError that pydantic keeps in the error's ctx, not from its text."""
    request = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(request)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]  # as FastAPI reports them
    error = validation_error(errors)
    assert (error.status, error.param, error.message) == (400, param, f"{param}: {message}")
