"""The Serve application: its builder (for ``serve run`` / ``serve deploy`` with ``infra/serve.yaml``),
:func:`build_app` from an experiment config, and :func:`start` / :func:`shutdown` for ``jobs/serve.py``
and the tests.

This module must not use ``from __future__ import annotations``: Serve validates a builder's argument
against its pydantic annotation only when the annotation is a class at run time, not a string (with
the future import a bad argument would arrive as a raw dict and fail later, somewhere else).
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, BackpressureConfig, HTTPOptions

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.config import ExperimentConfig, load_experiment
from vgmedgen.platform.storage import text_digest
from vgmedgen.serve.catalog import check_models
from vgmedgen.serve.ingress import Ingress, read_token, shutdown_jobs
from vgmedgen.serve.model import ModelServer

__all__ = ["ServeArgs", "build", "build_app", "shutdown", "start", "token_warning", "urls"]


class ServeArgs(BaseModel):
    """The builder's arguments (``args:`` of an application in ``infra/serve.yaml``).

    Attributes:
        config: the experiment YAML (its ``serve`` section configures the application).
        overrides: dotted ``path=value`` overrides, as on a job's command line.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: str | None = Field(None, description="experiment YAML, e.g. configs/demo.yaml")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides, e.g. serve.port=8001")


def build(args: ServeArgs) -> Application:
    """The application builder ``serve run``/``serve deploy`` call (``vgmedgen.serve.app:build``)."""
    return build_app(load_experiment(args.config, args.overrides))


def build_app(cfg: ExperimentConfig) -> Application:
    """The application for ``cfg``'s ``serve`` section: every model reference is resolved (and the token
    file read) here, so a bad one fails before any replica starts."""
    settings = cfg.serve
    check_models(cfg)
    token = read_token(settings.token_env, settings.token_file)
    queue = settings.queue
    backpressure = BackpressureConfig(status_code=503, retry_after_s=queue.retry_after_s)
    if settings.autoscaling is None:
        scaling: dict[str, Any] = {"num_replicas": settings.replicas}
    else:
        scaling = {
            "autoscaling_config": AutoscalingConfig(
                min_replicas=settings.autoscaling.min_replicas,
                max_replicas=settings.autoscaling.max_replicas,
                target_ongoing_requests=settings.autoscaling.target_ongoing_requests,
            )
        }
    model = ModelServer.options(
        **scaling,
        max_ongoing_requests=queue.max_ongoing_requests,
        max_queued_requests=queue.max_queued_requests,
        backpressure_config=backpressure,
        ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
    ).bind(settings.model_dump(mode="json"))
    experiment = cfg.model_dump(mode="json")
    experiment["output_root"] = str(cfg.root)  # replicas resolve nothing from their own environment
    return Ingress.options(
        max_ongoing_requests=queue.ingress_max_ongoing_requests,
        max_queued_requests=queue.ingress_max_queued_requests,
        backpressure_config=backpressure,
        ray_actor_options={"num_cpus": settings.ingress_num_cpus},
    ).bind(experiment, model, None if token is None else text_digest(token))


def urls(cfg: ExperimentConfig) -> dict[str, str]:
    """The application's web page, API docs and health URLs."""
    host = cfg.serve.host if cfg.serve.host not in ("0.0.0.0", "::") else "127.0.0.1"
    base = f"http://{host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}"
    return {"url": base + "/", "docs": f"{base}/docs", "page": base + "/", "health": f"{base}/healthz"}


def start(cfg: ExperimentConfig, app: Application | None = None) -> dict[str, str]:
    """Start Serve on the connected Ray cluster (HTTP on ``serve.host:serve.port``) and deploy the
    application (``app``, built from ``cfg`` when not given); returns its URLs once it is running.

    Raises:
        ConfigError: Serve already listens elsewhere on this cluster (its HTTP options are
            cluster-wide), or a model reference or the token file is bad.
    """
    settings = cfg.serve
    app = build_app(cfg) if app is None else app
    serve.start(http_options=HTTPOptions(host=settings.host, port=settings.port))
    running = serve.context._get_global_client().http_config
    if (running.host, running.port) != (settings.host, settings.port):
        raise ConfigError(
            f"Serve already runs on this Ray cluster with HTTP on {running.host}:{running.port}, and its HTTP "
            f"options are cluster-wide: set serve.host={running.host} serve.port={running.port}, or shut that "
            "Serve down first (`serve shutdown`)"
        )
    try:  # returns once every deployment is running; raises when one fails to start
        serve.run(app, name=settings.app_name, route_prefix=settings.route_prefix, blocking=False)
    except Exception:
        shutdown(cfg)
        raise
    return urls(cfg)


def shutdown(cfg: ExperimentConfig) -> None:
    """Delete the application and its job store (other applications on the cluster keep running)."""
    serve.delete(cfg.serve.app_name)
    shutdown_jobs(cfg.serve.app_name)


def token_warning(cfg: ExperimentConfig) -> str | None:
    """What to tell whoever starts a server that anyone who reaches it may use (no token set)."""
    settings = cfg.serve
    if read_token(settings.token_env, settings.token_file) is not None:
        return None
    exposed = settings.host not in ("127.0.0.1", "localhost", "::1")
    where = f"on {settings.host}, reachable from the network" if exposed else "to anyone on this machine"
    how = f"set {settings.token_env}" if settings.token_env else "set serve.token_env or serve.token_file"
    return f"no bearer token: the API is open {where}; {how} to require one"
