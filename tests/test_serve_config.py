"""The `serve` section and infra/serve.yaml, without a cluster: typos and inconsistent limits fail at load
naming the field; the deploy file validates against Serve's own schema and binds 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.config import load_experiment

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("serve.prot=8000", "prot"),
        ("serve.batching.max_batch_sise=4", "max_batch_sise"),
        ("serve.queue.max_ongoing_requests=2", "below max_batch_size x max_concurrent_batches"),
        ("serve.device=cuda", "num_gpus is 0"),
        ("serve.port=70000", "port"),
        ("serve.limits.max_images=100000", "max_images"),
        ("serve.autoscaling={min_replicas: 3, max_replicas: 1}", "raise max_replicas"),
    ],
)
def test_bad_serve_settings_fail_at_load_naming_the_field(override: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_experiment(REPO / "configs" / "demo.yaml", [override])


def test_defaults_bind_localhost_and_keep_batches_fillable() -> None:
    serve = load_experiment(REPO / "configs" / "demo.yaml").serve
    assert serve.host == "127.0.0.1" and serve.cors_origins == ()
    assert (
        serve.queue.max_ongoing_requests
        >= serve.batching.max_batch_size * serve.batching.max_concurrent_batches
    )
    assert serve.queue.max_queued_requests > 0  # bounded: a full queue answers 503, never hangs


def test_serve_settings_change_no_training_identity() -> None:
    from vgmedgen.platform.runs import job_key

    cfg = load_experiment(REPO / "configs" / "demo.yaml")
    assert job_key(cfg) == job_key(load_experiment(REPO / "configs" / "demo.yaml", ["serve.port=9999"]))


def test_infra_serve_yaml_validates_binds_localhost_and_its_builder_args_load() -> None:
    from ray.serve.schema import ServeDeploySchema

    from vgmedgen.serve.app import ServeArgs

    deploy = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "infra" / "serve.yaml").read_text()))
    assert deploy.http_options.host == "127.0.0.1"  # Serve's config-file default would be 0.0.0.0
    (app,) = deploy.applications
    assert app.import_path == "vgmedgen.serve.app:build"
    args = ServeArgs.model_validate(app.args)
    cfg = load_experiment(REPO / args.config, args.overrides)
    assert cfg.serve.port == deploy.http_options.port and cfg.serve.app_name == app.name
    with pytest.raises(ValueError, match="overides"):
        ServeArgs.model_validate({**app.args, "overides": []})


def test_serve_builder_module_keeps_runtime_annotations() -> None:
    """Serve validates builder arguments only against a real class annotation (no future import there)."""
    import inspect

    from vgmedgen.serve import app

    assert not hasattr(app, "annotations")  # the name the future import would bind
    assert inspect.signature(app.build).parameters["args"].annotation is app.ServeArgs
