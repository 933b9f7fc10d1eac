"""The HTTP ingress: a FastAPI app (versioned under ``/v1``, OpenAPI at ``/docs``) in front of the model
deployment.

It validates every request (422 naming the field, the value and what is allowed), checks the bearer
token, gives every response an ``X-Request-ID`` and an access-log line, enforces each request's
deadline (504, and its work is cancelled), turns a full model queue into 503 with ``Retry-After``,
splits requests into chunks of at most ``max_batch_size`` images for the model deployment, and turns
the images into PNGs that carry their provenance. Async jobs live in the job store actor
(:mod:`vgmedgen.serve.jobs`).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time, and
# Serve's ingress wrapper leaves it no way to resolve string annotations.
import asyncio
import base64
import hmac
import json
import logging
import os
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.metrics import Counter, Gauge, Histogram

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.config import ExperimentConfig
from vgmedgen.platform.generation.grid import SwapGrid
from vgmedgen.platform.generation.request import SampleRequest
from vgmedgen.platform.images import png_bytes, provenance_fields
from vgmedgen.platform.storage import text_digest
from vgmedgen.serve.catalog import Catalog, ServedModel, UnknownModelError
from vgmedgen.serve.jobs import JOB_STORE_NAMESPACE, JobStore, job_store_name
from vgmedgen.serve.model import Chunk, ChunkResult
from vgmedgen.serve.schemas import (
    GenerateBody,
    GridBody,
    JobBody,
    RequestError,
    grid_from_body,
    http_settings,
    request_from_item,
)

__all__ = ["Ingress", "app", "read_token"]

STATIC = Path(__file__).parent / "static"
API_VERSION = "v1"
# Paths anyone may call: liveness/readiness probes, and the web page with its files and the API
# description, which hold no data and do no work (the page asks for the token itself).
PUBLIC = re.compile(r"^/(healthz|readyz|docs|openapi\.json|static/.*|favicon\.ico)?$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
log = logging.getLogger("ray.serve")

app = FastAPI(
    title="VG-MedGen",
    version=API_VERSION,
    description="Controllable medical text-to-image generation: anatomy and style prompts, seeds that "
    "reproduce, swap grids and async jobs. Every image is a synthetic PNG that records its provenance.",
)
app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")


def read_token(token_env: str | None, token_file: Path | None) -> str | None:
    """The bearer token: the file's content when ``token_file`` is set, else the variable ``token_env``."""
    if token_file is not None:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"serve.token_file {path}: no such file; write the token there or unset token_file"
            )
        return path.read_text().strip() or None
    return os.environ.get(token_env) if token_env else None


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _busy(retry_after: float, what: str = "the model queue is full") -> JSONResponse:
    seconds = max(1, int(round(retry_after)))
    return _error(503, f"{what}; retry in {seconds} s", headers={"Retry-After": str(seconds)})


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over ``serve.limits.max_body_bytes`` is refused with 413 (by its
    ``Content-Length``, or while it streams in)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.limit = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        self.limit = scope["app"].state.server.settings.limits.max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge
            return message

        try:
            await self.inner(scope, limited, send)
        except _BodyTooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        response = _error(413, f"the request body is over {self.limit} bytes (serve.limits.max_body_bytes)")
        await response(scope, receive, send)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for e in exc.errors():
        loc = [str(p) for p in e["loc"] if p not in ("body",)]
        field = ".".join(loc) or "body"
        value = e.get("input")
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        message = e["msg"]
        if e["type"] == "extra_forbidden":
            message = "is not a field of this request; see /docs for the fields"
        problems.append({"field": field, "message": message, "value": shown[:120]})
    first = problems[0] if problems else {"field": "body", "message": "is invalid"}
    return _error(422, f"invalid request: {first['field']} {first['message']}", detail=problems)


def _request_error(err: RequestError) -> JSONResponse:
    detail = [{"field": f or "body", "message": m} for f, m in err.problems]
    return _error(422, str(err).splitlines()[0] if len(detail) == 1 else str(err), detail=detail)


# Added before the framing middleware below, so that it runs inside it (a 413 gets a request id too).
app.add_middleware(BodyLimit)


@app.middleware("http")
async def _frame(request: Request, call_next: Any) -> Response:
    """Request id, token, access log and the latency metric around every request."""
    server = request.app.state.server
    # Serve's proxy puts the client's X-Request-ID (or a new one) on the request and on the response.
    given = request.headers.get("x-request-id")
    request_id = given[:128] if given else uuid.uuid4().hex
    request.state.request_id = request_id
    start = time.perf_counter()
    # The path under the application's route prefix (Serve mounts it at serve.route_prefix).
    path = request.url.path.removeprefix(request.scope.get("root_path", "").rstrip("/")) or "/"
    refusal = None if PUBLIC.match(path) else server.refuse(request.headers.get("authorization", ""))
    if refusal is not None:
        response: Response = refusal
    else:
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - a crash is a 500 with the request id, never a stack trace to the client
            log.exception("request %s failed", request_id)
            response = _error(500, f"internal error; report request id {request_id}")
    elapsed = time.perf_counter() - start
    if not given:
        response.headers["X-Request-ID"] = request_id
    route = request.scope.get("route")
    path = getattr(route, "path", "unmatched")
    server.m_latency.observe(elapsed, tags={"route": path, "status": str(response.status_code)})
    # The access log: never the token or the body.
    log.info(
        "access request_id=%s method=%s path=%s status=%d latency_ms=%.1f",
        request_id, request.method, request.url.path, response.status_code, elapsed * 1000,
    )  # fmt: skip
    return response


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _encode(results: list[ChunkResult], version_id: str, conditions: dict[str, Any]) -> list[dict[str, Any]]:
    """Each image (and mask) of ``results`` as base64 PNG with its provenance, in seed order."""
    images = []
    for result in results:
        for seed, image, mask in result.pngs(version_id, conditions):
            entry = {"seed": seed, "png_base64": _b64(image)}
            if mask is not None:
                entry["mask_png_base64"] = _b64(mask)
            images.append(entry)
    return images


def _settings_headers(settings: dict[str, Any]) -> dict[str, str]:
    """The sampler settings an image was made with, as response headers."""
    return {
        "X-Steps": str(settings["num_steps"]),
        "X-Guidance-Anatomy": str(settings["guidance_anatomy"]),
        "X-Guidance-Style": str(settings["guidance_style"]),
    }


def _grid_cells(
    grid: SwapGrid, images: np.ndarray, version_id: str, settings: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every cell of a swap grid as JSON: row, column, seed, prompts and the base64 PNG."""
    out = []
    for i, c in enumerate(grid.cells()):
        anatomy, style = grid.anatomy_prompts[c.row], grid.style_prompts[c.column]
        fields = provenance_fields(
            model_version=version_id, seed=c.seed, anatomy_prompt=anatomy, style_prompt=style, **settings
        )
        out.append(
            {"row": c.row, "column": c.column, "seed": c.seed, "anatomy_prompt": anatomy, "style_prompt": style,
             "png_base64": _b64(png_bytes(images[i], fields))}
        )  # fmt: skip
    return out


def _grid_png(grid: SwapGrid, images: np.ndarray, version_id: str, settings: dict[str, Any]) -> bytes:
    """The swap-grid picture of ``images`` ((N, H, W, 3) uint8 in cells() order) with its provenance."""
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    effective = grid.model_copy(update=settings)  # as sampled: the model's defaults filled in
    with tempfile.TemporaryDirectory() as tmp:
        path = effective.save(tensor, Path(tmp) / "grid.png", effective.provenance(version_id))
        return path.read_bytes()


# Everything the class uses is defined above it: Serve pickles the class when it is decorated.
@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """The FastAPI ingress deployment (see the module docstring)."""

    def __init__(self, experiment: dict[str, Any], model: Any, token_digest: str | None = None) -> None:
        self.cfg = ExperimentConfig.model_validate(experiment)
        self.settings = self.cfg.serve
        self.model = model
        self.catalog = Catalog(self.cfg)
        # The builder read the token where it ran (the driver, or `serve deploy`'s task) and sent its digest:
        # the token itself never travels to a replica, and a replica's own environment does not matter.
        self.token_digest = token_digest
        torch.set_num_threads(1)
        app.state.server = self
        if self.settings.cors_origins:  # off unless origins are listed; added before the app serves anything
            from fastapi.middleware.cors import CORSMiddleware

            app.add_middleware(
                CORSMiddleware,
                allow_origins=list(self.settings.cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=[
                    "Authorization",
                    "Content-Type",
                    "Idempotency-Key",
                    "X-Request-ID",
                    "X-Timeout-S",
                ],
            )
        self.m_latency = Histogram(
            "vgmedgen_request_seconds",
            "HTTP request latency.",
            boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
            tag_keys=("route", "status"),
        )
        self.m_requests_images = Counter(
            "vgmedgen_images_requested", "Images asked for.", tag_keys=("route",)
        )
        self.m_queue = Gauge(
            "vgmedgen_queue_depth", "Requests in this ingress and async jobs waiting.", tag_keys=("kind",)
        )
        self.ongoing = 0
        # The name the application was deployed under (serve.app_name, or the name in a `serve deploy` file).
        app_name = serve.get_replica_context().app_name
        self.jobs = JobStore.options(
            name=job_store_name(app_name),
            namespace=JOB_STORE_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
        ).remote(
            app_name,
            self.settings.jobs.result_ttl_s,
            self.settings.jobs.max_jobs,
            self.settings.jobs.concurrency,
            self.settings.queue.retry_after_s,
        )
        self.ready = False
        self._background: list[asyncio.Task] = []
        try:  # started now when the constructor runs on the replica's event loop, else by the first request
            self._start_background()
        except RuntimeError:
            pass

    def _start_background(self) -> None:
        loop = asyncio.get_running_loop()
        self._background = [loop.create_task(self._warm_up()), loop.create_task(self._report_queue())]

    async def _report_queue(self, period_s: float = 2.0) -> None:
        """The queue-depth gauge, sampled every ``period_s`` (a gauge not refreshed leaves Ray's export)."""
        while True:
            self.m_queue.set(self.ongoing, tags={"kind": "requests"})
            try:
                counts = await self.jobs.counts.remote()
                self.m_queue.set(counts.get("queued", 0), tags={"kind": "jobs_queued"})
                self.m_queue.set(counts.get("running", 0), tags={"kind": "jobs_running"})
            except Exception:  # noqa: BLE001 - the job store restarting: the next sample reports it
                pass
            await asyncio.sleep(period_s)

    def refuse(self, authorization: str) -> JSONResponse | None:
        """The response refusing a request's ``Authorization`` header, or None when it may pass."""
        if self.token_digest is None:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _error(
                401,
                "a bearer token is required: send the header 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        # Digests of equal length compared in constant time: the time taken says nothing about the token.
        if not hmac.compare_digest(text_digest(token.strip()), self.token_digest):
            return _error(403, "the bearer token is wrong; ask whoever runs this server for the token")
        return None

    async def _warm_up(self) -> None:
        """Load the default model on a replica (``/readyz`` answers 200 once it is)."""
        served = self.catalog.models[0]
        while True:
            try:
                await self.model.options(multiplexed_model_id=served.version_id).ready.remote(
                    str(served.model.path)
                )
                self.ready = True
                return
            except Exception:  # noqa: BLE001 - not ready yet (a replica starting): try again
                await asyncio.sleep(1.0)

    # -- helpers -------------------------------------------------------------------------------

    def _deadline(self, request: Request) -> float:
        limit = self.settings.request_timeout_s
        asked = request.headers.get("x-timeout-s")
        try:
            value = float(asked) if asked is not None else limit
        except ValueError:
            value = limit
        return min(limit, value) if value > 0 else limit

    async def _refresh(self) -> None:
        """Look registry aliases up again (in a thread: a moved alias loads and verifies a version)."""
        try:
            await asyncio.to_thread(self.catalog.refresh)
        except Exception:  # noqa: BLE001 - the registry unreachable: keep serving the versions already known
            log.warning(
                "could not look the served aliases up again; serving the versions known", exc_info=True
            )

    async def _served(self, name: str | None) -> ServedModel:
        await self._refresh()
        return self.catalog.get(name)

    def _chunks(
        self, request: SampleRequest, served: ServedModel, reference: np.ndarray | None, masks: bool
    ) -> list[Chunk]:
        size = self.settings.batching.max_batch_size
        return [
            Chunk(
                request=request.model_copy(
                    update={"seed": request.seed + start, "n": min(size, request.n - start)}
                ),
                model_id=served.version_id,
                model_path=str(served.model.path),
                reference_pixels=reference,
                return_masks=masks,
            )
            for start in range(0, request.n, size)
        ]

    async def _sample(self, chunks: list[Chunk], deadline: float) -> list[ChunkResult]:
        """Every chunk's result, or an exception: TimeoutError past the deadline (work cancelled),
        BackPressureError when the model queue is full."""
        handle = self.model.options(multiplexed_model_id=chunks[0].model_id)
        calls = [handle.remote(c) for c in chunks]
        self.ongoing += 1
        self.m_queue.set(self.ongoing, tags={"kind": "requests"})
        try:
            return await asyncio.wait_for(asyncio.gather(*calls), timeout=deadline)
        except BaseException:
            for call in calls:
                call.cancel()
            raise
        finally:
            self.ongoing -= 1
            self.m_queue.set(self.ongoing, tags={"kind": "requests"})

    async def _run(self, request: Request, chunks: list[Chunk]) -> list[ChunkResult] | JSONResponse:
        deadline = self._deadline(request)
        try:
            return await self._sample(chunks, deadline)
        except TimeoutError:
            return _error(
                504,
                f"the request passed its deadline of {deadline:g} s and was cancelled; ask for fewer images or "
                "steps, use POST /v1/jobs, or raise X-Timeout-S (at most serve.request_timeout_s)",
            )
        except BackPressureError:
            return _busy(self.settings.queue.retry_after_s)

    # -- endpoints -------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz", tags=["health"])
    async def healthz(self) -> dict[str, str]:
        """Alive: the ingress answers."""
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "no model loaded yet"}})
    async def readyz(self) -> JSONResponse:
        """Ready: the default model version is loaded on a model replica."""
        if not self._background:
            self._start_background()
        if not self.ready:
            return _error(503, "the default model is still loading", headers={"Retry-After": "2"})
        return JSONResponse({"status": "ready", "default_model": self.catalog.models[0].name})

    @app.get(f"/{API_VERSION}/models", tags=["models"])
    async def models(self) -> dict[str, Any]:
        """The served model versions (the first is the default), their defaults, example prompts and the
        server's limits."""
        await self._refresh()
        return {
            "models": self.catalog.describe(),
            "limits": self.settings.limits.model_dump(),
            "batching": self.settings.batching.model_dump(),
            "token_required": self.token_digest is not None,
        }

    @app.post(
        f"/{API_VERSION}/generate",
        tags=["generate"],
        responses={
            200: {"content": {"image/png": {}}, "description": "json: images with seeds; png: one image"},
            404: {"description": "unknown model"},
            422: {"description": "invalid request"},
            503: {"description": "queue full (Retry-After)"},
            504: {"description": "deadline passed"},
        },
    )
    async def generate(self, body: GenerateBody, request: Request) -> Response:
        """Generate images for anatomy + style prompts, a caption or a reference image.

        The same request (seed included) gives the same images, whatever else shares its batch.
        """
        start = time.perf_counter()
        try:
            sample, reference = request_from_item(body, self.settings.limits)
            served = await self._served(body.model)
        except RequestError as err:
            return _request_error(err)
        except UnknownModelError as err:
            return _error(404, str(err), served=[m.name for m in self.catalog.models])
        if body.format == "png" and sample.n != 1:
            return _request_error(
                RequestError([("format", "png returns one image: set n to 1, or use json")])
            )
        self.m_requests_images.inc(sample.n, tags={"route": "generate"})
        results = await self._run(request, self._chunks(sample, served, reference, body.return_masks))
        if isinstance(results, JSONResponse):
            return results
        elapsed = time.perf_counter() - start
        conditions = {k: v for k, v in sample.conditions().items() if k != "reference"}
        if reference is not None:
            conditions["reference_image"] = f"{reference.shape[1]}x{reference.shape[0]} (uploaded)"
        settings = results[0].settings
        timing = {"total_s": round(elapsed, 4), "sample_s": round(max(r.sample_s for r in results), 4)}
        if body.format == "png":
            ((seed, data, _),) = await asyncio.to_thread(results[0].pngs, served.version_id, conditions)
            headers = {
                "X-Seed": str(seed),
                "X-Model-Version": served.version_id,
                **_settings_headers(settings),
                "X-Timing-S": f"{elapsed:.4f}",
            }
            return Response(data, media_type="image/png", headers=headers)
        images = await asyncio.to_thread(_encode, results, served.version_id, conditions)
        return JSONResponse(
            {
                "request_id": request.state.request_id,
                "model": {"name": served.name, "version_id": served.version_id, "ref": served.ref},
                "parameters": {**conditions, "seed": sample.seed, "n": sample.n, **http_settings(settings)},
                "images": images,
                "timing": {**timing, "batch_images": max(r.batch_images for r in results)},
            }
        )

    @app.post(
        f"/{API_VERSION}/grid",
        tags=["generate"],
        responses={
            200: {"content": {"image/png": {}}, "description": "the swap-grid PNG, or its cells as json"}
        },
    )
    async def grid(self, body: GridBody, request: Request) -> Response:
        """Anatomy prompts (rows) x style prompts (columns): the picture of disentanglement."""
        try:
            grid = grid_from_body(body, self.settings.limits)
            served = await self._served(body.model)
        except RequestError as err:
            return _request_error(err)
        except UnknownModelError as err:
            return _error(404, str(err), served=[m.name for m in self.catalog.models])
        chunks = [chunk for r in grid.cell_requests() for chunk in self._chunks(r, served, None, False)]
        results = await self._run(request, chunks)
        if isinstance(results, JSONResponse):
            return results
        images = np.concatenate([r.images for r in results])  # (N, H, W, 3) in cells() order
        settings = results[0].settings
        if body.format == "json":
            return JSONResponse(
                {
                    "request_id": request.state.request_id,
                    "model": {"name": served.name, "version_id": served.version_id},
                    "parameters": http_settings(settings),
                    "cells": await asyncio.to_thread(_grid_cells, grid, images, served.version_id, settings),
                }
            )
        data = await asyncio.to_thread(_grid_png, grid, images, served.version_id, settings)
        headers = {"X-Model-Version": served.version_id, **_settings_headers(settings)}
        return Response(data, media_type="image/png", headers=headers)

    @app.post(f"/{API_VERSION}/jobs", tags=["jobs"], status_code=202)
    async def submit_job(self, body: JobBody, request: Request) -> JSONResponse:
        """Queue a larger piece of work; 202 with the job id. The same ``Idempotency-Key`` returns the
        same job."""
        limits = self.settings.limits
        total = sum(item.n for item in body.items)
        if total > limits.max_job_images:
            return _request_error(
                RequestError(
                    [
                        (
                            "items",
                            f"ask for {total} images in all, more than the {limits.max_job_images} a job may",
                        )
                    ]
                )
            )
        try:
            served = await self._served(body.model)
            chunks = []
            for i, item in enumerate(body.items):
                try:
                    sample, reference = request_from_item(item, limits, max_images=limits.max_job_images)
                except RequestError as err:
                    raise RequestError(
                        [(f"items.{i}.{f}" if f else f"items.{i}", m) for f, m in err.problems]
                    ) from None
                chunks.extend(self._chunks(sample, served, reference, body.return_masks))
        except RequestError as err:
            return _request_error(err)
        except UnknownModelError as err:
            return _error(404, str(err), served=[m.name for m in self.catalog.models])
        key = request.headers.get("idempotency-key")
        if key is not None and not REQUEST_ID.match(key):
            return _request_error(
                RequestError([("Idempotency-Key", "must be 1-128 letters, digits or ._:-")])
            )
        fingerprint = text_digest(
            json.dumps([body.model_dump(mode="json"), served.version_id], sort_keys=True)
        )
        model = {"name": served.name, "version_id": served.version_id}
        answer = await self.jobs.submit.remote(key, fingerprint, chunks, model)
        if answer.get("error") == "conflict":
            return _error(
                409,
                f"Idempotency-Key {key!r} was used for another request (job {answer['job_id']}); use a new key",
            )
        if answer.get("error") == "full":
            return _busy(answer["retry_after_s"], "the server holds serve.jobs.max_jobs jobs")
        job = self._links(answer["job"])
        return JSONResponse(
            job, status_code=202 if answer["created"] else 200, headers={"Location": job["links"]["self"]}
        )

    def _links(self, status: dict[str, Any]) -> dict[str, Any]:
        base = f"/{API_VERSION}/jobs/{status['id']}"
        status["links"] = {"self": base}
        for image in status.get("images", []):
            image["url"] = f"{base}/images/{image['index']}.png"
            if image.pop("has_mask"):
                image["mask_url"] = f"{base}/masks/{image['index']}.png"
        return status

    @app.get(f"/{API_VERSION}/jobs/{{job_id}}", tags=["jobs"])
    async def job(self, job_id: str) -> JSONResponse:
        """A job's state, progress (images done / total), queue position and, when done, its image links."""
        status = await self.jobs.status.remote(job_id)
        if status is None:
            return _error(404, f"no job {job_id[:64]!r} (unknown, or its results expired)")
        return JSONResponse(self._links(status))

    @app.delete(f"/{API_VERSION}/jobs/{{job_id}}", tags=["jobs"])
    async def cancel_job(self, job_id: str) -> JSONResponse:
        """Cancel a queued or running job."""
        status = await self.jobs.cancel.remote(job_id)
        if status is None:
            return _error(404, f"no job {job_id[:64]!r} (unknown, or its results expired)")
        return JSONResponse(self._links(status))

    @app.get(f"/{API_VERSION}/jobs/{{job_id}}/images/{{index}}.png", tags=["jobs"], response_class=Response)
    async def job_image(self, job_id: str, index: int) -> Response:
        """Image ``index`` of a finished job."""
        return await self._job_file(job_id, index, mask=False)

    @app.get(f"/{API_VERSION}/jobs/{{job_id}}/masks/{{index}}.png", tags=["jobs"], response_class=Response)
    async def job_mask(self, job_id: str, index: int) -> Response:
        """The pseudo-mask of image ``index`` of a finished job (asked for with ``return_masks``)."""
        return await self._job_file(job_id, index, mask=True)

    async def _job_file(self, job_id: str, index: int, mask: bool) -> Response:
        data = await self.jobs.image.remote(job_id, index, mask)
        if data is None:
            return _error(
                404,
                f"job {job_id[:64]!r} has no {'mask' if mask else 'image'} {index} (unknown job, not finished, expired, or out of range)",
            )
        return Response(data, media_type="image/png")


def shutdown_jobs(app_name: str) -> None:
    """Remove an application's job store actor (with its jobs)."""
    try:
        ray.kill(ray.get_actor(job_store_name(app_name), namespace=JOB_STORE_NAMESPACE))
    except ValueError:
        pass
