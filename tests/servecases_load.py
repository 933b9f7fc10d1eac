"""The Serve application under generated and concurrent traffic, over real HTTP: an OpenAPI-driven fuzz of
every endpoint (schemathesis) and a bounded load test (locust, in a subprocess).

Imported by ``tests/test_serve.py`` (``from servecases_load import *``), whose module-scoped ``base``
fixture is the running application's base URL; these tests share that application.

The fuzz draws its cases from the application's own ``/openapi.json``, deterministically
(Hypothesis ``derandomize``) and a fixed number per operation, in four passes: the schema's examples,
valid bodies (``positive``), invalid ones (``negative``), and valid bodies brought within this
server's limits and the rule on conditions (either both prompts, or a caption alone), which the schema
cannot state (``within limits``); the last pass is what makes most 200s. Every async job it submits
carries one ``Idempotency-Key``, so the fuzz creates at most one job (others are 409 conflicts) and
leaves the job slots (``serve.jobs.max_jobs``) to the other tests; that job is then fetched, its
images asked for, and it is cancelled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

__all__ = ["test_fuzz_openapi_no_server_errors", "test_load_fixed_requests_no_failures"]

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO / "benchmarks" / "locustfile.py"

# What this server allows (tests/servehelpers.py `experiment`): tighter than the schema's bounds.
MAX_IMAGES, MAX_STEPS, MAX_GRID_CELLS = 8, 8, 16
JOB_KEY = "fuzz-job"  # the one Idempotency-Key of every job the fuzz submits
PROMPTS = ("small round lesion, centred", "pink, vignetted illumination")

# Cases per operation and pass: bounded, so that the fuzz stays well under 40 s on 2 shared cores (a grid
# within limits is the dearest case: up to 16 images, so its pass has fewer).
POSITIVE = {"POST": 20, "GET": 6, "DELETE": 6}
NEGATIVE = 12
WITHIN_LIMITS = {"/v1/generate": 14, "/v1/grid": 8}
NO_PARAMETERS = 2  # operations without parameters or body have a single case to send


@dataclass
class Outcomes:
    """Every fuzz case sent: its pass, its status, and the cases answered with a server error."""

    statuses: Counter = field(default_factory=Counter)
    oks: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)


def _describe(case: Any, what: str, text: str) -> str:
    body = case.body if not type(case.body).__name__ == "NotSet" else None
    shown = json.dumps(body, default=str)[:600] if body is not None else "-"
    return (
        f"{case.method} {case.formatted_path} [{what}] path={case.path_parameters or {}} "
        f"body={shown}\n    -> {text[:1500]}"
    )


def _token_header() -> dict[str, str]:
    """The bearer token of an application that requires one (the server reads ``VGMEDGEN_SERVE_TOKEN``)."""
    token = os.environ.get("VGMEDGEN_SERVE_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _sender(base: str, session: requests.Session, out: Outcomes, label: str) -> Callable[[Any], None]:
    """A function that sends a case and records its outcome under ``label``."""

    def send(case: Any) -> None:
        headers = _token_header()
        if case.operation.path == "/v1/jobs":
            headers["Idempotency-Key"] = JOB_KEY
        try:
            response = case.call(base_url=base, session=session, headers=headers, timeout=60)
        except requests.RequestException as exc:  # no answer at all is as bad as a 5xx
            out.failures.append(_describe(case, label, f"no response: {type(exc).__name__}: {exc}"))
            return
        status = response.status_code
        out.statuses[status] += 1
        text = response.content.decode("utf-8", "replace")
        if status in (200, 202):
            out.oks[label] += 1
            if case.operation.path == "/v1/jobs":
                out.job_ids.append(json.loads(text)["id"])
        elif status == 503 and response.headers.get("retry-after"):
            out.busy.append(_describe(case, label, f"503: {text}"))  # backpressure: a legitimate answer
        elif status >= 500:
            out.failures.append(_describe(case, label, f"{status}: {text}"))

    return send


def _run(strategy: Any, max_examples: int, send: Callable[[Any], None]) -> None:
    """Send ``max_examples`` cases drawn from ``strategy``, deterministically, never shrinking (fewer when
    the strategy cannot make that many: no invalid value exists for a free-form path parameter)."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis.errors import Unsatisfiable

    @settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        send(case)

    try:
        run()
    except Unsatisfiable:
        pass


def _count(value: Any, limit: int) -> Any:
    """A generated integer (maybe sent as a float, e.g. 3.0) folded into 1..limit; anything else as is."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == int(value):
        return 1 + int(value - 1) % limit
    return value


def _within_limits_item(item: Any, caption_alone: bool) -> Any:
    """A generated sample request made acceptable: no unknown model or random reference image; a caption
    alone or both prompts (the generated text kept where there is one); n and steps folded into this
    server's limits; a seed that leaves room for n images."""
    if not isinstance(item, dict):
        return item
    item = {k: v for k, v in item.items() if k not in ("model", "reference_image")}
    caption = item.get("caption")
    if isinstance(caption, str) and caption and caption_alone:
        item.pop("anatomy_prompt", None)
        item.pop("style_prompt", None)
    else:
        item.pop("caption", None)
        for key, default in zip(("anatomy_prompt", "style_prompt"), PROMPTS):
            if not isinstance(item.get(key), str) or not item[key].strip():
                item[key] = default
    if "n" in item:
        item["n"] = _count(item["n"], MAX_IMAGES)
    if item.get("steps") is not None:
        item["steps"] = _count(item["steps"], MAX_STEPS)
    if item.get("format") == "png":
        item["n"] = 1
    seed, n = item.get("seed"), item.get("n", 1)
    if isinstance(seed, (int, float)) and isinstance(n, int) and seed + n > 2**31:
        item["seed"] = 2**31 - n
    return item


def _within_limits_grid(body: Any) -> Any:
    """A generated grid made acceptable: no unknown model, at most 16 cells, steps within the limit."""
    if not isinstance(body, dict):
        return body
    body = {k: v for k, v in body.items() if k != "model"}
    rows = body.get("anatomy_prompts") or [PROMPTS[0]]
    columns = body.get("style_prompts") or [PROMPTS[1]]
    body["anatomy_prompts"], body["style_prompts"] = rows[:4], columns[:4]
    cells = len(body["anatomy_prompts"]) * len(body["style_prompts"])
    if "seeds_per_cell" in body:
        body["seeds_per_cell"] = _count(body["seeds_per_cell"], max(1, MAX_GRID_CELLS // cells))
    if body.get("steps") is not None:
        body["steps"] = _count(body["steps"], MAX_STEPS)
    return body


def _within_limits(case: Any, caption_alone: bool) -> Any:
    path = case.operation.path
    if path == "/v1/generate":
        case.body = _within_limits_item(case.body, caption_alone)
    elif path == "/v1/grid":
        case.body = _within_limits_grid(case.body)
    return case


@pytest.mark.timeout(180)
def test_fuzz_openapi_no_server_errors(base: str) -> None:
    """No generated request, valid or not, gets a server error (500/502/504, or no answer); at least 20 get
    200/202."""
    import schemathesis
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    started = time.perf_counter()
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", config=schemathesis.Config(), timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/generate", "POST /v1/grid", "POST /v1/jobs", "GET /v1/jobs/{job_id}"} <= labels, labels
    out = Outcomes()
    with requests.Session() as session:
        for op in operations:
            has_input = bool(op.body) or any(True for _ in op.iter_parameters())
            examples = op.get_strategies_from_examples()
            if examples:
                _run(st.one_of(examples), 2 * len(examples), _sender(base, session, out, "examples"))
            count = POSITIVE[op.method.upper()] if has_input else NO_PARAMETERS
            _run(op.as_strategy(), count, _sender(base, session, out, "positive"))
            if has_input:
                negative = op.as_strategy(generation_mode=GenerationMode.NEGATIVE)
                _run(negative, NEGATIVE, _sender(base, session, out, "negative"))
            if op.path in WITHIN_LIMITS:
                within = st.builds(_within_limits, op.as_strategy(), st.booleans())
                _run(within, WITHIN_LIMITS[op.path], _sender(base, session, out, "limits"))
        # The job the fuzz made (if the job slots were not all taken): its status, images, cancellation.
        for job_id in sorted(set(out.job_ids))[:1]:
            send = _sender(base, session, out, "job")
            for op in operations:
                if "job_id" in op.path:
                    index = {"index": 0} if "{index}" in op.path else {}
                    send(op.Case(path_parameters={"job_id": job_id, **index}))
            send(schema["/v1/jobs/{job_id}"]["DELETE"].Case(path_parameters={"job_id": job_id}))
    elapsed = time.perf_counter() - started
    summary = (
        f"{sum(out.statuses.values())} cases in {elapsed:.1f} s, statuses {dict(sorted(out.statuses.items()))}, "
        f"200/202 by pass {dict(out.oks)}, 503 with Retry-After {len(out.busy)}"
    )
    print(summary)
    assert not out.failures, f"{len(out.failures)} server errors ({summary}):\n" + "\n".join(out.failures)
    assert sum(out.oks.values()) >= 20, f"too few requests answered 200/202: {summary}"


@pytest.mark.timeout(120)
def test_load_fixed_requests_no_failures(base: str, tmp_path: Path) -> None:
    """32 concurrent locust users, 3 single-image requests each: all 96 requests done, none failed."""
    users, per_user = 32, 3
    record = tmp_path / "record.json"
    env = {
        **os.environ,
        "VGMEDGEN_LOAD_REQUESTS": str(per_user),
        "VGMEDGEN_LOAD_N": "1",
        "VGMEDGEN_LOAD_RECORD": str(record),
        "VGMEDGEN_LOAD_TOKEN": os.environ.get("VGMEDGEN_SERVE_TOKEN", ""),
    }
    command = [
        str(Path(sys.executable).parent / "locust"),
        *("-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users)),
        *("--run-time", "60s", "--stop-timeout", "10", "-H", base),
        *("--json-file", str(tmp_path / "stats"), "--only-summary", "--loglevel", "WARNING"),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=100)
    elapsed = time.perf_counter() - started
    log = (done.stdout + done.stderr)[-3000:]
    assert (tmp_path / "stats.json").is_file() and record.is_file(), f"locust wrote no stats:\n{log}"
    (entry,) = [e for e in json.loads((tmp_path / "stats.json").read_text()) if e["name"] == "/v1/generate"]
    sent = json.loads(record.read_text())["requests"]
    statuses = Counter(r["status"] for r in sent)
    failed = [r for r in sent if "error" in r]
    summary = f"{entry['num_requests']} requests in {elapsed:.1f} s, statuses {dict(statuses)}"
    print(summary)
    assert not failed and entry["num_failures"] == 0, f"{summary}; failures: {failed[:10]}\n{log}"
    assert not any(status >= 500 for status in statuses), summary
    assert entry["num_requests"] == len(sent) == users * per_user, (
        f"{summary}; planned {users * per_user}\n{log}"
    )
    assert done.returncode == 0, f"locust exited with {done.returncode}:\n{log}"
