"""The ``serve`` section of an experiment: what ``jobs/serve.py`` and ``infra/serve.yaml`` put behind HTTP.

Every value has its default here and nowhere else; the Serve application (:mod:`vgmedgen.serve`) reads
this section and nothing else. A typo in a key fails at load, naming the field (Serve's own config
schemas would silently ignore it). In YAML::

    serve:
      models: [vgmedgen-demo@current, /data/models/v7]   # the first is the default
      port: 8000
      batching: {max_batch_size: 16, batch_wait_timeout_s: 0.05}
      queue: {max_ongoing_requests: 32, max_queued_requests: 64}
      token_env: VGMEDGEN_SERVE_TOKEN                    # set it to require a bearer token

Loading this module stays light (no ray, no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from vgmedgen.model.configbase import StrictConfig
from vgmedgen.platform.generation.config import MAX_IMAGES, MAX_PROMPT_CHARS, MAX_STEPS

__all__ = [
    "AutoscalingOptions",
    "BatchingOptions",
    "JobOptions",
    "QueueOptions",
    "ServeConfig",
    "ServeLimits",
]


class BatchingOptions(StrictConfig):
    """Dynamic batching of the model deployment (``@serve.batch``); a batch counts images, not requests.

    Attributes:
        max_batch_size: most images per sampler batch.
        batch_wait_timeout_s: how long a batch waits to fill once its first image arrived.
        max_concurrent_batches: sampler batches one replica runs at a time.
    """

    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.05, ge=0.0, le=10.0)
    max_concurrent_batches: int = Field(1, ge=1, le=16)


class QueueOptions(StrictConfig):
    """Backpressure: beyond these a request is answered 503 with ``Retry-After``, never left hanging.

    Attributes:
        max_ongoing_requests: images a model replica works on at once (at least one full batch).
        max_queued_requests: images waiting for a model replica; -1 = unbounded (never in production).
        ingress_max_ongoing_requests: HTTP requests one ingress replica handles at once.
        ingress_max_queued_requests: HTTP requests waiting for an ingress replica.
        retry_after_s: the ``Retry-After`` a refused request is given.
    """

    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    ingress_max_ongoing_requests: int = Field(64, ge=1)
    ingress_max_queued_requests: int = Field(128, ge=-1)
    retry_after_s: int = Field(2, ge=1, le=3600)


class AutoscalingOptions(StrictConfig):
    """Model replicas scaled by Serve between ``min_replicas`` and ``max_replicas``.

    Attributes:
        min_replicas: replicas kept warm (0 scales to zero and makes the next request wait for a load).
        max_replicas: most replicas.
        target_ongoing_requests: images per replica Serve aims at.
    """

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(16.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingOptions:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas}); raise max_replicas"
            )
        return self


class ServeLimits(StrictConfig):
    """What one HTTP request may ask for (tighter than the sample request's own limits, never looser).

    Attributes:
        max_images: ``n`` of one ``/v1/generate`` request.
        max_job_images: images of one async job (``/v1/jobs``).
        max_grid_cells: anatomy x style prompts x seeds of one ``/v1/grid``.
        max_steps: sampler steps.
        max_prompt_chars: characters of one prompt.
        max_body_bytes: bytes of a request body (a base64 reference image included).
        max_reference_pixels: width x height of a reference image (bigger ones, and decompression
            bombs, are refused before they are decoded).
    """

    max_images: int = Field(16, ge=1, le=MAX_IMAGES)
    max_job_images: int = Field(256, ge=1, le=4096)
    max_grid_cells: int = Field(64, ge=1, le=1024)
    max_steps: int = Field(100, ge=1, le=MAX_STEPS)
    max_prompt_chars: int = Field(500, ge=1, le=MAX_PROMPT_CHARS)
    max_body_bytes: int = Field(8 * 2**20, ge=1024)
    max_reference_pixels: int = Field(4096 * 4096, ge=64)


class JobOptions(StrictConfig):
    """Async jobs (``POST /v1/jobs``).

    Attributes:
        result_ttl_s: how long a finished job's images stay downloadable; then they are removed.
        max_jobs: jobs kept at once (queued, running or finished); a new one beyond is refused with 503.
        concurrency: jobs that sample at the same time (the others wait in order).
    """

    result_ttl_s: float = Field(3600.0, gt=0)
    max_jobs: int = Field(100, ge=1)
    concurrency: int = Field(1, ge=1, le=64)


class ServeConfig(StrictConfig):
    """The Serve application: model versions, address, batching, backpressure, limits and the token.

    Attributes:
        models: model versions (directories or ``<name>@<alias>``); the first is the default. Empty:
            the experiment's registered model at ``tracking.alias``.
        app_name: the Serve application's name (and the prefix of its named job actor).
        route_prefix: where the application is mounted.
        host: the address HTTP binds; 127.0.0.1 unless set (0.0.0.0 exposes it to the network).
        port: the HTTP port.
        device: ``auto`` (CUDA when the replica has a GPU), ``cpu`` or ``cuda``.
        num_cpus: CPUs reserved per model replica.
        num_gpus: GPUs per model replica (0 or 1; fractions share a GPU).
        ingress_num_cpus: CPUs reserved per ingress replica.
        replicas: model replicas when ``autoscaling`` is unset.
        autoscaling: replica bounds for Serve's autoscaler (None: fixed ``replicas``).
        max_models_per_replica: model versions one replica keeps loaded (least recently used leave first).
        alias_refresh_s: how often a ``<name>@<alias>`` is looked up again (0: on every request).
        request_timeout_s: the deadline of a request; a client may ask for less with ``X-Timeout-S``.
        token_env: the environment variable holding the bearer token; requests need it when it is set.
        token_file: a file holding the bearer token (instead of ``token_env``).
        cors_origins: origins allowed to call the API from a browser; empty = CORS off.
        batching: dynamic batching (:class:`BatchingOptions`).
        queue: backpressure (:class:`QueueOptions`).
        limits: request limits (:class:`ServeLimits`).
        jobs: async jobs (:class:`JobOptions`).
        use_ema: sample from the EMA weights when a version has them.
    """

    models: tuple[str, ...] = ()
    app_name: str = Field("vgmedgen", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    route_prefix: str = Field("/", pattern=r"^/")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0, le=1)
    ingress_num_cpus: float = Field(0.1, ge=0)
    replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingOptions | None = None
    max_models_per_replica: int = Field(2, ge=1, le=64)
    alias_refresh_s: float = Field(60.0, ge=0)
    request_timeout_s: float = Field(120.0, gt=0)
    token_env: str | None = "VGMEDGEN_SERVE_TOKEN"
    token_file: Path | None = None
    cors_origins: tuple[str, ...] = ()
    batching: BatchingOptions = BatchingOptions()
    queue: QueueOptions = QueueOptions()
    limits: ServeLimits = ServeLimits()
    jobs: JobOptions = JobOptions()
    use_ema: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        per_replica = self.batching.max_batch_size * self.batching.max_concurrent_batches
        if self.queue.max_ongoing_requests < per_replica:
            raise ValueError(
                f"queue.max_ongoing_requests ({self.queue.max_ongoing_requests}) is below max_batch_size x "
                f"max_concurrent_batches ({per_replica}): batches could never fill; raise it to at least {per_replica}"
            )
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError("device is cuda but num_gpus is 0: set serve.num_gpus (e.g. 1) or device=auto")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models lists a version twice: {list(self.models)}")
        return self
