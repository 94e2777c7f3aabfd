"""Every error answer encodes, whatever the client sent, and an unexpected failure is a JSON 500 that
closes the connection. (No live server: an app built in-process, with the app's handlers.)"""

from __future__ import annotations

import json

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from loraplex.api.errors import error_response, install_handlers, model_not_found
from loraplex.errors import not_found

LONE_SURROGATE = "\ud800"  # what JSON input may hold and UTF-8 cannot encode


def broken_dependency() -> None:
    raise RuntimeError("injected failure")


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    install_handlers(app)

    @app.get("/api-error")
    async def api_error():
        raise model_not_found(LONE_SURROGATE)

    @app.get("/typed-error")
    async def typed_error():
        raise not_found(f"adapter{LONE_SURROGATE}", f"adapter '{LONE_SURROGATE}' does not exist", code=LONE_SURROGATE)

    @app.get("/encode/{codec}")
    async def encode(codec: str):
        return {"bytes": len(f"caf\u00e9 {LONE_SURROGATE}".encode(codec))}

    @app.get("/broken", dependencies=[Depends(broken_dependency)])
    async def broken():
        return {"never": "reached"}

    return TestClient(app, raise_server_exceptions=False)


def test_an_error_body_writes_a_lone_surrogate_as_its_escape():
    body = json.loads(error_response(model_not_found(LONE_SURROGATE)).body.decode("utf-8"))
    assert body["error"]["message"].startswith("The model '\\ud800' does not exist")


@pytest.mark.parametrize("path", ["/api-error", "/typed-error"])
def test_an_error_echoing_a_lone_surrogate_is_answered_as_its_kind(client, path):
    response = client.get(path)
    assert response.status_code == 404
    error = response.json()["error"]
    assert "'\\ud800' does not exist" in error["message"]
    assert all(LONE_SURROGATE not in (error[key] or "") for key in ("message", "param", "code"))


def test_an_unexpected_exception_is_a_json_500_that_closes_the_connection(client):
    response = client.get("/broken")
    assert response.status_code == 500
    assert response.headers["connection"] == "close"
    assert response.json() == {"error": {"message": "internal error: RuntimeError; see the server log",
                                         "type": "server_error", "param": None, "code": None}}


def test_starlettes_errors_keep_their_headers(client):
    response = client.post("/broken")  # GET only: the 405 says which methods are allowed
    assert response.status_code == 405 and response.headers["allow"] == "GET"
    assert response.json()["error"]["message"] == "Method Not Allowed"


def test_a_lone_surrogate_reaching_an_encoder_is_a_400_and_other_encode_errors_a_500(client):
    response = client.get("/encode/utf-8")
    assert response.status_code == 400 and "lone surrogate" in response.json()["error"]["message"]
    assert response.json()["error"]["code"] == "invalid_unicode"
    response = client.get("/encode/ascii")  # no client text can cause this: a server bug
    assert response.status_code == 500 and response.headers["connection"] == "close"
