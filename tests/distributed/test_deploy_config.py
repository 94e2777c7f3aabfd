"""The documented `serve deploy` config (deploy/ray-serve.yaml) is one Ray Serve accepts, names the
application builder, and holds engine and server options loraplex accepts."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
schema = pytest.importorskip("ray.serve.schema", reason="the ray extra is not installed (pip install -e '.[ray]')")

from loraplex.config import EngineConfig, ServerConfig  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "ray-serve.yaml"


def test_the_deploy_config_is_valid_for_serve_and_for_loraplex():
    config = schema.ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (app,) = config.applications
    module, _, attribute = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attribute)
    from loraplex.distributed.cluster import ROUTINGS, app_builder

    assert builder is app_builder
    args = app.args
    EngineConfig.from_options(**args["engine"])  # unknown or bad options raise
    ServerConfig(**args["server"])
    assert args["routing"] in ROUTINGS and args["replicas"] >= 1
    assert args["engine"]["max_cpu_adapters"] >= args["engine"]["max_loras"]
    # the autoscaling bounds are ones Serve accepts
    from ray.serve.config import AutoscalingConfig

    bounds = AutoscalingConfig(**args["autoscaling"])
    assert 1 <= bounds.min_replicas <= bounds.max_replicas
