"""A fixed number of ``POST /v1/generate`` requests through locust, for the Serve load test
(``tests/servecases_load.py``) and the throughput benchmark (``benchmarks/serve_throughput.py``).

Every user sends ``VGMEDGEN_LOAD_REQUESTS`` requests back to back (no wait between them) and stops
itself (``StopUser``); once all users have stopped the runner quits, so a run is exactly users x
requests requests. Locust by itself would keep running until ``--run-time``, which stays as a safety
bound. A request counts as failed unless it answers 200 with ``n`` images; the failure message carries
the status and the start of the body.

Settings, from environment variables:
    VGMEDGEN_LOAD_REQUESTS   requests per user (default 3)
    VGMEDGEN_LOAD_N          images per request (default 1)
    VGMEDGEN_LOAD_STEPS      sampler steps (default: the model's own)
    VGMEDGEN_LOAD_TOKEN      bearer token sent as ``Authorization`` (default: none)
    VGMEDGEN_LOAD_TIMEOUT_S  network timeout of one request (default 120)
    VGMEDGEN_LOAD_ANATOMY, VGMEDGEN_LOAD_STYLE   the prompts (defaults below)
    VGMEDGEN_LOAD_RECORD     a JSON file written when locust quits: each request's start time (s since
                             the epoch), latency (ms), status (0: no response), the images of the
                             sampler batch it shared and that batch's seconds (``timing.batch_images``,
                             ``timing.sample_s``) or, when it failed, why; in completion order

Usage (locust is the venv's; 32 users, all started at once, 3 requests each, at most 120 s):
    VGMEDGEN_LOAD_REQUESTS=3 .venv/bin/locust -f benchmarks/locustfile.py --headless -u 32 -r 32 \\
        --run-time 120s --stop-timeout 30 -H http://127.0.0.1:8000 --json-file load-stats --only-summary
The exit code is 1 when any request failed (locust's ``--exit-code-on-error``), 0 otherwise. Read the
final counts from ``--json-file`` (written at shutdown), not from ``--csv``: locust 2.47 rewrites its CSV
files once a second and not at shutdown, so they can miss the last second's requests (and
``--json-file`` resets the stats it saves, so the printed summary after it shows zeros).
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import gevent
from locust import FastHttpUser, constant, events, task
from locust.env import Environment
from locust.exception import StopUser

REQUESTS = int(os.environ.get("VGMEDGEN_LOAD_REQUESTS", "3"))
N = int(os.environ.get("VGMEDGEN_LOAD_N", "1"))
STEPS = int(os.environ["VGMEDGEN_LOAD_STEPS"]) if os.environ.get("VGMEDGEN_LOAD_STEPS") else None
TOKEN = os.environ.get("VGMEDGEN_LOAD_TOKEN") or None
TIMEOUT_S = float(os.environ.get("VGMEDGEN_LOAD_TIMEOUT_S", "120"))
ANATOMY = os.environ.get("VGMEDGEN_LOAD_ANATOMY", "small round lesion, centred")
STYLE = os.environ.get("VGMEDGEN_LOAD_STYLE", "pink, vignetted illumination")
RECORD = os.environ.get("VGMEDGEN_LOAD_RECORD") or None

_seeds = itertools.count(1000)
_record: list[dict[str, Any]] = []


class GenerateUser(FastHttpUser):
    """Sends ``REQUESTS`` generate requests of ``N`` images, then stops."""

    wait_time = constant(0)
    network_timeout = TIMEOUT_S
    connection_timeout = TIMEOUT_S

    def on_start(self) -> None:
        self.sent = 0
        self.headers = {"Authorization": f"Bearer {TOKEN}"} if TOKEN else {}

    @task
    def generate(self) -> None:
        body: dict[str, Any] = {
            "anatomy_prompt": ANATOMY,
            "style_prompt": STYLE,
            "n": N,
            "seed": next(_seeds),
        }
        if STEPS is not None:
            body["steps"] = STEPS
        self.sent += 1
        with self.client.post(
            "/v1/generate", json=body, headers=self.headers, name="/v1/generate", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {(response.text or '')[:300]}")
            else:
                answer = response.json()
                images = len(answer.get("images", []))
                if images != N:
                    response.failure(f"status 200 with {images} images, not {N}")
                else:
                    response.success()
                    # For the record: the request event hands its listeners this context.
                    timing, context = answer.get("timing", {}), response.request_meta["context"]
                    context["batch_images"] = timing.get("batch_images")
                    context["sample_s"] = timing.get("sample_s")
        if self.sent >= REQUESTS:
            raise StopUser()


@events.request.add_listener
def _record_request(
    start_time: float,
    response_time: float,
    response: Any = None,
    exception: Any = None,
    context: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    status = getattr(response, "status_code", None) or 0
    entry = {"start": start_time, "ms": response_time, "status": int(status)}
    for key in ("batch_images", "sample_s"):
        if context and context.get(key) is not None:
            entry[key] = context[key]
    if exception is not None:
        entry["error"] = str(exception)[:400]
    _record.append(entry)


@events.init.add_listener
def _quit_when_done(environment: Environment, **_: Any) -> None:
    """Once every user has been spawned, quit the runner as soon as none is left running."""

    def watch() -> None:
        runner = environment.runner
        while runner is not None and runner.user_count > 0:
            gevent.sleep(0.05)
        if runner is not None:
            runner.quit()

    environment.events.spawning_complete.add_listener(lambda **_: gevent.spawn(watch))


@events.quitting.add_listener
def _write_record(environment: Environment, **_: Any) -> None:
    if RECORD:
        with open(RECORD, "w") as f:
            json.dump({"requests_per_user": REQUESTS, "n": N, "steps": STEPS, "requests": _record}, f)
