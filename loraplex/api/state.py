"""What every route needs: the engine, the adapters, metrics, auth and limits of one server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from loraplex.api.auth import Auth
from loraplex.api.errors import model_not_found
from loraplex.api.metrics import Metrics
from loraplex.api.registry import AdapterRegistry
from loraplex.config import ServerConfig
from loraplex.engine.async_engine import AsyncEngine


@dataclass
class ServerState:
    engine: AsyncEngine
    registry: AdapterRegistry
    metrics: Metrics
    auth: Auth
    config: ServerConfig
    base_name: str  # the served name of the base model
    created: int  # unix time the server started

    def resolve(self, model: str) -> str | None:
        """A request's `model` -> the adapter to run (None: the base model); 404 if neither."""
        if model == self.base_name:
            return None
        if model in self.registry:
            return model
        raise model_not_found(model)


def server_state(request: Request) -> ServerState:
    return request.app.state.loraplex


State = Annotated[ServerState, Depends(server_state)]
