"""Async jobs: state in one named actor, work on the model deployment.

``POST /v1/jobs`` hands the store a job's chunks (sample requests already validated and split by the
ingress); the store answers at once with a job id and runs jobs in order, ``serve.jobs.concurrency``
at a time, sending each chunk to the model deployment like any other request (so jobs share its
batches and its backpressure: a full queue makes the job wait and retry, never fail). Images are
kept as PNGs carrying their provenance until ``serve.jobs.result_ttl_s`` after the job ended, then
removed. The store is a named, detached actor, so jobs outlive an ingress replica that restarts;
:func:`vgmedgen.serve.app.shutdown` removes it with the application.

States: ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray

from vgmedgen.serve.schemas import http_settings

__all__ = ["JOB_STORE_NAMESPACE", "JobStore", "job_store_name"]

JOB_STORE_NAMESPACE = "vgmedgen-serve"
_FINAL = ("succeeded", "failed", "cancelled")
_IN_FLIGHT = 2  # chunks of one job at the model deployment at once


def job_store_name(app_name: str) -> str:
    """The name of an application's job store actor."""
    return f"{app_name}-jobs"


@dataclass
class _Job:
    id: str
    key: str | None
    fingerprint: str
    chunks: list[Any]
    model: dict[str, str]
    total: int
    state: str = "queued"
    done: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    images: list[bytes] = field(default_factory=list)
    masks: list[bytes] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    settings: list[dict[str, Any]] = field(default_factory=list)


@ray.remote(num_cpus=0, max_restarts=0)
class JobStore:
    """The jobs of one Serve application (see the module docstring)."""

    def __init__(
        self, app_name: str, result_ttl_s: float, max_jobs: int, concurrency: int, retry_after_s: float
    ):
        self.app_name = app_name
        self.ttl = result_ttl_s
        self.max_jobs = max_jobs
        self.concurrency = concurrency
        self.retry_after_s = retry_after_s
        self.jobs: dict[str, _Job] = {}
        self.keys: dict[str, str] = {}
        self.queue: list[str] = []
        self.tasks: dict[str, asyncio.Task] = {}
        self._handle = None

    def _model(self):
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle("ModelServer", app_name=self.app_name)
        return self._handle

    def _purge(self) -> None:
        now = time.time()
        for job_id in [
            j.id for j in self.jobs.values() if j.finished is not None and now - j.finished > self.ttl
        ]:
            job = self.jobs.pop(job_id)
            if job.key is not None:
                self.keys.pop(job.key, None)

    async def submit(
        self, key: str | None, fingerprint: str, chunks: list[Any], model: dict[str, str]
    ) -> dict[str, Any]:
        """Queue a job; with a known idempotency ``key`` the existing job (or a conflict when the body
        differs). Returns ``{"job": status, "created": bool}`` or ``{"error": "conflict"|"full"}``."""
        self._purge()
        if key is not None and key in self.keys and self.keys[key] in self.jobs:
            job = self.jobs[self.keys[key]]
            if job.fingerprint != fingerprint:
                return {"error": "conflict", "job_id": job.id}
            return {"job": self._status(job), "created": False}
        if len(self.jobs) >= self.max_jobs:
            return {"error": "full", "retry_after_s": self.retry_after_s}
        job = _Job(
            id=uuid.uuid4().hex,
            key=key,
            fingerprint=fingerprint,
            chunks=chunks,
            model=model,
            total=sum(c.request.n for c in chunks),
        )
        self.jobs[job.id] = job
        if key is not None:
            self.keys[key] = job.id
        self.queue.append(job.id)
        self._start_next()
        return {"job": self._status(job), "created": True}

    def _start_next(self) -> None:
        while self.queue and len(self.tasks) < self.concurrency:
            job_id = self.queue.pop(0)
            self.tasks[job_id] = asyncio.get_running_loop().create_task(self._run(self.jobs[job_id]))

    async def _run(self, job: _Job) -> None:
        from ray.serve.exceptions import BackPressureError

        job.state, job.started = "running", time.time()
        handle = self._model().options(multiplexed_model_id=job.model["version_id"])
        results: dict[int, Any] = {}
        pending = list(range(len(job.chunks)))
        collected = 0  # chunks collected so far: images are kept in the items' order
        try:
            while pending:
                batch, pending = pending[:_IN_FLIGHT], pending[_IN_FLIGHT:]
                calls = [(i, handle.remote(job.chunks[i])) for i in batch]
                refused = []
                for i, call in calls:
                    try:
                        results[i] = await call
                    except BackPressureError:
                        refused.append(i)  # the deployment is full: wait, then send it again
                while collected in results:
                    self._collect(job, job.chunks[collected], results.pop(collected))
                    collected += 1
                if refused:
                    pending = refused + pending
                    await asyncio.sleep(self.retry_after_s)
            job.state = "succeeded"
        except asyncio.CancelledError:
            job.state = "cancelled"
        except Exception as exc:  # noqa: BLE001 - any failure is the job's, reported in its status
            job.state, job.error = "failed", f"{type(exc).__name__}: {str(exc)[:500]}"
        finally:
            job.finished = time.time()
            job.chunks = []
            self.tasks.pop(job.id, None)
            self._start_next()

    def _collect(self, job: _Job, chunk: Any, result: Any) -> None:
        conditions = {k: v for k, v in chunk.request.conditions().items() if k != "reference"}
        for seed, image, mask in result.pngs(job.model["version_id"], conditions):
            job.images.append(image)
            if mask is not None:
                job.masks.append(mask)
            job.seeds.append(seed)
            job.settings.append(http_settings(result.settings))
        job.done += len(result.seeds)

    def _status(self, job: _Job) -> dict[str, Any]:
        status: dict[str, Any] = {
            "id": job.id,
            "state": job.state,
            "progress": {"done": job.done, "total": job.total},
            "queue_position": self.queue.index(job.id) if job.id in self.queue else None,
            "model": job.model,
            "created": job.created,
            "started": job.started,
            "finished": job.finished,
            "error": job.error,
        }
        if job.finished is not None:
            status["expires"] = job.finished + self.ttl
        if job.state == "succeeded":
            status["images"] = [
                {"index": k, "seed": job.seeds[k], **job.settings[k], "has_mask": k < len(job.masks)}
                for k in range(len(job.images))
            ]
        return status

    async def status(self, job_id: str) -> dict[str, Any] | None:
        """A job's state, progress, queue position and, when done, its images; None when unknown or expired."""
        self._purge()
        job = self.jobs.get(job_id)
        return None if job is None else self._status(job)

    async def image(self, job_id: str, index: int, mask: bool = False) -> bytes | None:
        """Image (or pseudo-mask) ``index`` of a finished job as PNG bytes; None when there is none."""
        self._purge()
        job = self.jobs.get(job_id)
        if job is None or job.state != "succeeded":
            return None
        images = job.masks if mask else job.images
        return images[index] if 0 <= index < len(images) else None

    async def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a queued or running job (a finished one is left as it is); None when unknown."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job.id in self.queue:
            self.queue.remove(job.id)
            job.state, job.finished, job.chunks = "cancelled", time.time(), []
        elif job.id in self.tasks:
            task = self.tasks[job.id]
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        return self._status(job)

    async def counts(self) -> dict[str, int]:
        """Jobs by state (the queue-depth metric)."""
        out: dict[str, int] = {}
        for job in self.jobs.values():
            out[job.state] = out.get(job.state, 0) + 1
        return out
