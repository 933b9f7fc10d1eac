"""The Serve application over real HTTP on 127.0.0.1, on the tests' head node: generate (PNG and JSON),
grid, async jobs, validation, models, token, backpressure, deadlines, multiplexed versions, alias
refresh and determinism."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest
import requests
from servecases_load import *  # noqa: F403  (fuzz and load tests, share this module's app)
from servecases_web import *  # noqa: F403  (browser tests, share this module's app)
from servehelpers import (
    ANATOMY,
    CAPTIONS,
    REGISTERED,
    STYLE,
    ServeModels,
    experiment,
    running_app,
    serve_models,
    wait_ready,
)

from vgmedgen.platform.images import read_provenance

pytestmark = pytest.mark.integration
__all__ = ["serve_models"]  # the fixture, imported for pytest


@pytest.fixture(scope="module")
def base(ray_head, serve_models: ServeModels) -> Iterator[str]:
    with running_app(experiment(serve_models)) as url:
        wait_ready(url)
        yield url


def _prompts(**extra):
    return {"anatomy_prompt": ANATOMY[0], "style_prompt": STYLE[0], **extra}


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b64))))


def test_generate_json_carries_seeds_parameters_model_and_timing(
    base: str, serve_models: ServeModels
) -> None:
    r = requests.post(f"{base}/v1/generate", json=_prompts(n=3, seed=11, return_masks=True), timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [im["seed"] for im in body["images"]] == [11, 12, 13]
    assert body["parameters"]["steps"] == 2 and body["parameters"]["anatomy_prompt"] == ANATOMY[0]
    assert body["model"]["name"] == "v0" and len(body["model"]["version_id"]) == 64
    assert body["timing"]["total_s"] > 0 and r.headers["X-Request-ID"] == body["request_id"]
    image = _pixels(body["images"][0]["png_base64"])
    mask = _pixels(body["images"][0]["mask_png_base64"])
    assert image.shape[2] == 3 and mask.shape == image.shape[:2]
    fields = read_provenance(base64.b64decode(body["images"][1]["png_base64"]))
    assert fields["seed"] == "12" and fields["model_version"] == body["model"]["version_id"]


def test_generate_png_is_one_image_with_its_provenance(base: str) -> None:
    r = requests.post(f"{base}/v1/generate", json=_prompts(seed=4, format="png"), timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert (
        r.headers["X-Seed"] == "4" and r.headers["X-Steps"] == "2" and len(r.headers["X-Model-Version"]) == 64
    )
    fields = read_provenance(r.content)
    assert fields["seed"] == "4" and fields["anatomy_prompt"] == ANATOMY[0] and fields["kind"] == "image"
    r = requests.post(f"{base}/v1/generate", json=_prompts(n=2, format="png"), timeout=60)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "format", r.text


def test_a_missing_seed_is_drawn_and_returned_so_the_images_can_be_made_again(base: str) -> None:
    first = requests.post(f"{base}/v1/generate", json={"caption": CAPTIONS[0]}, timeout=60).json()
    seed = first["images"][0]["seed"]
    again = requests.post(
        f"{base}/v1/generate", json={"caption": CAPTIONS[0], "seed": seed}, timeout=60
    ).json()
    assert again["images"][0]["png_base64"] == first["images"][0]["png_base64"]


def test_same_request_same_images_alone_or_in_a_batch_with_other_guidance(base: str) -> None:
    """Determinism: a request sampled alone equals the same request sampled in a shared batch with other
    prompts and other guidance (rows carry their own guidance)."""
    wanted = _prompts(seed=21, n=2, steps=3)
    alone = requests.post(f"{base}/v1/generate", json=wanted, timeout=60).json()
    assert alone["timing"]["batch_images"] == 2
    others = [
        {"anatomy_prompt": ANATOMY[1], "style_prompt": STYLE[1], "seed": 7, "n": 2, "steps": 3, "guidance_anatomy": 2.0},
        {"caption": CAPTIONS[0], "seed": 9, "n": 1, "steps": 3},
        {**wanted, "guidance_style": 1.5},
    ]  # fmt: skip
    for _ in range(5):  # until the concurrent requests land in one batch
        with ThreadPoolExecutor(len(others) + 1) as pool:
            futures = [
                pool.submit(requests.post, f"{base}/v1/generate", json=b, timeout=60)
                for b in [wanted, *others]
            ]
            batched = futures[0].result().json()
            for f in futures[1:]:
                assert f.result().status_code == 200
        if batched["timing"]["batch_images"] > 2:
            break
    assert batched["timing"]["batch_images"] > 2, "the concurrent requests never shared a batch"
    assert [im["seed"] for im in batched["images"]] == [21, 22]
    for a, b in zip(alone["images"], batched["images"]):
        _same_up_to_one_level(a["png_base64"], b["png_base64"])


def test_grid_png_and_cells(base: str) -> None:
    body = {"anatomy_prompts": ANATOMY, "style_prompts": STYLE[:1], "seed": 2, "seeds_per_cell": 2}
    r = requests.post(f"{base}/v1/grid", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert read_provenance(r.content)["kind"] == "swap grid"
    cells = requests.post(f"{base}/v1/grid", json={**body, "format": "json"}, timeout=60).json()["cells"]
    assert [(c["row"], c["column"], c["seed"]) for c in cells] == [(0, 0, 2), (0, 0, 3), (1, 0, 2), (1, 0, 3)]
    # A cell is the image /v1/generate makes for its prompts and seed.
    single = requests.post(
        f"{base}/v1/generate",
        json={"anatomy_prompt": ANATOMY[1], "style_prompt": STYLE[0], "seed": 3},
        timeout=60,
    ).json()
    _same_up_to_one_level(single["images"][0]["png_base64"], cells[3]["png_base64"])


def _same_up_to_one_level(a: str, b: str) -> None:
    """The same image sampled in batches of different sizes: BLAS blocks the matmuls differently, which
    moves a few pixels by one 8-bit level at most (measured, docs/serve.md)."""
    diff = np.abs(_pixels(a).astype(int) - _pixels(b).astype(int))
    assert diff.max() <= 1, f"a pixel moved by {diff.max()} levels"


def _reference_b64(size: int = 24) -> str:
    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return base64.b64encode(buf.getvalue()).decode()


def _bomb_b64() -> str:
    """A 1-bit 6000 x 6000 PNG: a few KB on the wire, 36 megapixels decoded."""
    buf = io.BytesIO()
    PIL.Image.new("1", (6000, 6000)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_reference_image_conditions_and_is_never_a_path(base: str) -> None:
    r = requests.post(
        f"{base}/v1/generate", json={"reference_image": _reference_b64(), "seed": 1}, timeout=60
    )
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["reference_image"] == "24x24 (uploaded)"
    # A path where the image should be is refused as not base64, never opened.
    r = requests.post(f"{base}/v1/generate", json={"reference_image": "/etc/passwd"}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "reference_image"


INVALID = [
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"n": 9}, "n", "at most 8 on this server"),
    ({"n": True}, "n", "boolean"),
    ({"steps": 9}, "steps", "at most 8 on this server"),
    ({"steps": 0}, "steps", "greater than or equal to 1"),
    ({"guidance_style": -1}, "guidance_style", "greater than or equal to 0"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"stpes": 3}, "stpes", "not a field"),
    ({"anatomy_prompt": None}, "", "needs `anatomy_prompt`"),
    ({"caption": "x"}, "", "cannot be combined"),
    ({"anatomy_prompt": "x" * 501}, "anatomy_prompt", "more than the 500"),
    ({"format": "gif"}, "format", "'json' or 'png'"),
    ({"reference_image": "not base64!", "anatomy_prompt": None}, "reference_image", "not valid base64"),
    ({"reference_image": base64.b64encode(b"GIF89a nonsense").decode(), "anatomy_prompt": None}, "reference_image", "not a readable image"),
    ({"reference_image": _bomb_b64(), "anatomy_prompt": None}, "reference_image", "6000x6000 pixels"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "field", "words"), INVALID, ids=[f"{i}-{c[1] or 'rule'}" for i, c in enumerate(INVALID)]
)
def test_bad_fields_get_422_naming_the_field_value_and_rule(
    base: str, change: dict, field: str, words: str
) -> None:
    body = {k: v for k, v in {**_prompts(), **change}.items() if v is not None}
    r = requests.post(f"{base}/v1/generate", json=body, timeout=60)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(d["field"] == (field or "body") and words in d["message"] for d in detail), detail
    assert "Traceback" not in r.text


def test_limits_on_body_size_grid_cells_and_job_images(base: str) -> None:
    r = requests.post(f"{base}/v1/generate", json=_prompts(caption="x" * 300_000), timeout=60)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]
    grid = {"anatomy_prompts": ["a"] * 5, "style_prompts": ["b"] * 4}
    r = requests.post(f"{base}/v1/grid", json=grid, timeout=60)
    assert r.status_code == 422 and "20 images" in r.json()["error"], r.text
    r = requests.post(f"{base}/v1/jobs", json={"items": [_prompts(n=20), _prompts(n=20)]}, timeout=60)
    assert r.status_code == 422 and "40 images" in r.json()["error"], r.text


def test_unknown_model_is_404_listing_the_served_ones(base: str) -> None:
    r = requests.post(f"{base}/v1/generate", json=_prompts(model="nope"), timeout=60)
    assert r.status_code == 404 and "v0" in r.json()["error"] and REGISTERED in r.json()["error"], r.text


def test_deadline_passed_is_504_and_the_server_goes_on(base: str) -> None:
    r = requests.post(
        f"{base}/v1/generate", json=_prompts(n=8, steps=8), headers={"X-Timeout-S": "0.01"}, timeout=60
    )
    assert r.status_code == 504 and "deadline of 0.01 s" in r.json()["error"], r.text
    assert requests.post(f"{base}/v1/generate", json=_prompts(), timeout=60).status_code == 200


def test_health_docs_and_request_ids(base: str) -> None:
    assert requests.get(f"{base}/healthz", timeout=10).json() == {"status": "alive"}
    assert requests.get(f"{base}/readyz", timeout=10).json()["default_model"] == "v0"
    spec = requests.get(f"{base}/openapi.json", timeout=10).json()
    assert {"/v1/generate", "/v1/grid", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/models"} <= set(spec["paths"])
    assert requests.get(f"{base}/docs", timeout=10).status_code == 200
    r = requests.get(f"{base}/healthz", headers={"X-Request-ID": "mine-123"}, timeout=10)
    assert r.headers["X-Request-ID"] == "mine-123"


def test_two_versions_multiplexed_and_the_alias_followed(base: str, serve_models: ServeModels) -> None:
    models = requests.get(f"{base}/v1/models", timeout=10).json()["models"]
    assert [m["name"] for m in models] == ["v0", f"{REGISTERED}-v1"] and models[0]["default"]
    assert models[1]["aliases"] == [f"{REGISTERED}@current"] and models[1]["registry_version"] == "1"
    assert models[0]["resolution"] > 0 and models[0]["sampler"]["num_steps"] == 2
    assert models[0]["example_prompts"][0] == {"anatomy_prompt": ANATOMY[0], "style_prompt": STYLE[0]}
    body = _prompts(seed=5)
    a = requests.post(f"{base}/v1/generate", json={**body, "model": "v0"}, timeout=60).json()
    b = requests.post(
        f"{base}/v1/generate", json={**body, "model": f"{REGISTERED}@current"}, timeout=60
    ).json()
    assert a["model"]["version_id"] != b["model"]["version_id"]
    assert a["images"][0]["png_base64"] != b["images"][0]["png_base64"]
    # The registry moves the alias to another version: the server follows (alias_refresh_s=0 here).
    assert serve_models.register(2) == "2"
    c = requests.post(
        f"{base}/v1/generate", json={**body, "model": f"{REGISTERED}@current"}, timeout=60
    ).json()
    assert c["model"]["name"] == f"{REGISTERED}-v2" and c["model"]["version_id"] not in (
        a["model"]["version_id"], b["model"]["version_id"])  # fmt: skip
    assert requests.get(f"{base}/v1/models", timeout=10).json()["models"][1]["registry_version"] == "2"


def _wait_job(
    base: str, job_id: str, states=("succeeded", "failed", "cancelled"), timeout_s=60.0, **kw
) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = requests.get(f"{base}/v1/jobs/{job_id}", timeout=10, **kw).json()
        if status["state"] in states:
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {states}: {status}")


def test_async_job_lifecycle_idempotency_and_downloads(base: str) -> None:
    body = {
        "items": [_prompts(seed=30, n=3), {"caption": CAPTIONS[0], "seed": 40, "n": 2}],
        "return_masks": True,
    }
    r = requests.post(f"{base}/v1/jobs", json=body, headers={"Idempotency-Key": "job-a"}, timeout=60)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["progress"]["total"] == 5 and r.headers["Location"] == f"/v1/jobs/{job['id']}"
    again = requests.post(f"{base}/v1/jobs", json=body, headers={"Idempotency-Key": "job-a"}, timeout=60)
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    conflict = requests.post(
        f"{base}/v1/jobs",
        json={**body, "return_masks": False},
        headers={"Idempotency-Key": "job-a"},
        timeout=60,
    )
    assert conflict.status_code == 409 and job["id"] in conflict.json()["error"]
    done = _wait_job(base, job["id"])
    assert done["state"] == "succeeded" and done["progress"] == {"done": 5, "total": 5}, done
    assert [im["seed"] for im in done["images"]] == [30, 31, 32, 40, 41]
    png = requests.get(f"{base}{done['images'][3]['url']}", timeout=10)
    assert png.headers["content-type"] == "image/png" and read_provenance(png.content)["seed"] == "40"
    assert (
        read_provenance(requests.get(f"{base}{done['images'][3]['mask_url']}", timeout=10).content)["kind"]
        == "pseudo-mask"
    )
    # The job's images are those /v1/generate makes for the same request.
    direct = requests.post(f"{base}/v1/generate", json=_prompts(seed=30, n=1), timeout=60).json()
    job_png = requests.get(f"{base}{done['images'][0]['url']}", timeout=10).content
    _same_up_to_one_level(direct["images"][0]["png_base64"], base64.b64encode(job_png).decode())
    assert requests.get(f"{base}/v1/jobs/{job['id']}/images/99.png", timeout=10).status_code == 404
    assert requests.get(f"{base}/v1/jobs/unknown", timeout=10).status_code == 404


def test_jobs_queue_in_order_and_cancel(base: str) -> None:
    big = {"items": [_prompts(seed=s, n=8, steps=8) for s in range(0, 32, 8)]}
    first = requests.post(f"{base}/v1/jobs", json=big, timeout=60).json()
    second = requests.post(f"{base}/v1/jobs", json=big, timeout=60).json()
    status = requests.get(f"{base}/v1/jobs/{second['id']}", timeout=10).json()
    assert status["state"] == "queued" and status["queue_position"] == 0, status
    cancelled = requests.delete(f"{base}/v1/jobs/{second['id']}", timeout=10).json()
    assert cancelled["state"] == "cancelled"
    running = _wait_job(base, first["id"], states=("running",), timeout_s=30)
    stopped = requests.delete(f"{base}/v1/jobs/{running['id']}", timeout=30).json()
    assert stopped["state"] == "cancelled" and stopped["progress"]["done"] < 32, stopped
    assert requests.delete(f"{base}/v1/jobs/nope", timeout=10).status_code == 404


@pytest.fixture(scope="module")
def secured(base: str, serve_models: ServeModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second application on the same Serve: a token, a one-image queue and results kept for 1 s."""
    from urllib.parse import urlparse

    from vgmedgen.serve.app import shutdown, start

    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text("s3cret-token\n")
    cfg = experiment(
        serve_models,
        app_name="secured",
        route_prefix="/secured",
        port=urlparse(base).port,
        models=[str(serve_models.versions[0])],
        token_file=str(token_file),
        batching={"max_batch_size": 1},
        queue={"max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 1},
        jobs={"result_ttl_s": 1.0},
        cors_origins=["http://lab.example"],
    )
    urls = start(cfg)
    try:
        url = urls["url"].rstrip("/")
        wait_ready(url)
        yield url
    finally:
        shutdown(cfg)


AUTH = {"Authorization": "Bearer s3cret-token"}


def test_token_required_refused_and_accepted(secured: str) -> None:
    r = requests.post(f"{secured}/v1/generate", json=_prompts(), timeout=60)
    assert (
        r.status_code == 401
        and r.headers["WWW-Authenticate"] == "Bearer"
        and "Bearer <token>" in r.json()["error"]
    )
    r = requests.post(
        f"{secured}/v1/generate", json=_prompts(), headers={"Authorization": "Bearer wrong"}, timeout=60
    )
    assert r.status_code == 403 and "s3cret" not in r.text
    assert requests.get(f"{secured}/v1/models", timeout=10).status_code == 401
    assert (
        requests.post(f"{secured}/v1/generate", json=_prompts(), headers=AUTH, timeout=60).status_code == 200
    )
    assert requests.get(f"{secured}/v1/models", headers=AUTH, timeout=10).json()["token_required"] is True
    assert requests.get(f"{secured}/healthz", timeout=10).status_code == 200  # probes stay open


def test_full_queue_answers_503_with_retry_after_and_nothing_else_fails(secured: str) -> None:
    body = _prompts(steps=8)
    with ThreadPoolExecutor(10) as pool:
        answers = list(
            pool.map(
                lambda _: requests.post(f"{secured}/v1/generate", json=body, headers=AUTH, timeout=60),
                range(10),
            )
        )
    codes = sorted(r.status_code for r in answers)
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    busy = next(r for r in answers if r.status_code == 503)
    assert busy.headers["Retry-After"] == "1" and "queue is full" in busy.json()["error"]


def test_job_results_expire_after_their_ttl(secured: str) -> None:
    job = requests.post(
        f"{secured}/v1/jobs", json={"items": [_prompts(n=1)]}, headers=AUTH, timeout=60
    ).json()
    done = _wait_job(secured, job["id"], headers=AUTH)
    assert done["state"] == "succeeded" and done["expires"] - done["finished"] == pytest.approx(1.0)
    time.sleep(1.5)
    assert requests.get(f"{secured}/v1/jobs/{job['id']}", headers=AUTH, timeout=10).status_code == 404


def test_bad_builder_argument_is_refused(serve_models: ServeModels) -> None:
    from pydantic import ValidationError
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from vgmedgen.serve.app import build

    with pytest.raises(ValidationError, match="overides"):
        call_user_app_builder_with_args_if_necessary(build, {"config": None, "overides": ["serve.port=1"]})


def test_a_second_port_on_the_same_cluster_is_a_clear_error(base: str, serve_models: ServeModels) -> None:
    from urllib.parse import urlparse

    from vgmedgen.model.configbase import ConfigError
    from vgmedgen.serve.app import start

    port = urlparse(base).port
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*cluster-wide.*serve.port={port}"):
        start(experiment(serve_models, app_name="other", port=port + 1))


def test_access_log_line_per_request_without_the_token(base: str, ray_head) -> None:
    requests.post(
        f"{base}/v1/generate", json=_prompts(), headers={"X-Request-ID": "access-log-test-1"}, timeout=60
    )
    logs = ray_head.temp_dir / "session_latest" / "logs" / "serve"
    deadline = time.monotonic() + 10
    lines: list[str] = []
    while time.monotonic() < deadline and not lines:
        lines = [
            line
            for f in logs.glob("replica_vgmedgen_Ingress_*.log")
            for line in f.read_text(errors="replace").splitlines()
            if "request_id=access-log-test-1" in line
        ]
        time.sleep(0.2)
    assert lines and "path=/v1/generate status=200 latency_ms=" in lines[0], lines


def test_prometheus_metrics_carry_the_custom_series(base: str, ray_head) -> None:
    """Latency, images, batch sizes, queue depth and model loads reach Ray's Prometheus endpoint."""
    import ray

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    wanted = {
        "ray_vgmedgen_request_seconds_bucket",
        "ray_vgmedgen_images_generated_total",
        "ray_vgmedgen_batch_images_bucket",
        "ray_vgmedgen_queue_depth",
        "ray_vgmedgen_model_loads_total",
        "ray_vgmedgen_model_load_seconds_bucket",
    }
    deadline = time.monotonic() + 30  # Ray exports worker metrics every few seconds
    while True:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found = {
            line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_vgmedgen")
        }
        if wanted <= found or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert wanted <= found, f"missing {sorted(wanted - found)}; found {sorted(found)}"
    images = [line for line in text.splitlines() if line.startswith("ray_vgmedgen_images_generated_total")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in images) >= 10


def test_cors_is_off_unless_origins_are_listed(base: str, secured: str) -> None:
    preflight = {"Origin": "http://lab.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    assert (
        "access-control-allow-origin"
        not in requests.options(f"{base}/v1/generate", headers=preflight, timeout=10).headers
    )
    r = requests.options(f"{secured}/v1/generate", headers=preflight, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://lab.example"
    other = requests.options(
        f"{secured}/v1/generate", headers={**preflight, "Origin": "http://evil.example"}, timeout=10
    )
    assert "access-control-allow-origin" not in other.headers
