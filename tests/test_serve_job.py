"""jobs/serve.py as a user runs it: a real process on the tests' head node that prints its URLs, serves
over HTTP, warns when the API is open, and on Ctrl-C removes its application and job store."""

from __future__ import annotations

import signal

import pytest
import requests
from jobprocess import JobProcess
from raycluster import free_port
from servehelpers import ANATOMY, STYLE, ServeModels, serve_models

pytestmark = pytest.mark.integration
__all__ = ["serve_models"]  # the fixture, imported for pytest


@pytest.mark.ray_cpus(0.35)
def test_serve_job_serves_until_ctrl_c_then_cleans_up(ray_cluster, serve_models: ServeModels) -> None:

    port = free_port()
    job = JobProcess(
        "serve.py",
        [f"output_root={serve_models.root}", f"serve.models=[{serve_models.versions[0]}]", f"serve.port={port}",
         "serve.num_cpus=0.25", "serve.ingress_num_cpus=0.1", "serve.app_name=jobtest"],
    )  # fmt: skip
    try:
        job.wait_for(lambda out: "Ctrl-C stops" in out, timeout_s=120)
        out = job.output()
        assert (
            f"web page:  http://127.0.0.1:{port}/" in out
            and f"API docs:  http://127.0.0.1:{port}/docs" in out
        )
        assert "WARNING: no bearer token: the API is open to anyone on this machine" in out
        body = {"anatomy_prompt": ANATOMY[0], "style_prompt": STYLE[0], "seed": 1, "format": "png"}
        r = requests.post(f"http://127.0.0.1:{port}/v1/generate", json=body, timeout=60)
        assert r.status_code == 200 and r.headers["X-Seed"] == "1"
    finally:
        code = job.interrupt(signal.SIGINT)
    assert code == 130, job.output()[-2000:]
    import ray

    with pytest.raises(ValueError):
        ray.get_actor("jobtest-jobs", namespace="vgmedgen-serve")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_bad_model_reference_exits_2_before_serving(ray_cluster, serve_models: ServeModels) -> None:
    job = JobProcess("serve.py", [f"output_root={serve_models.root}", "serve.models=[/no/such/version]"])
    code = job.process.wait(120)
    job._reader.join(10)
    out = job.output()
    assert code == 2 and "serve.models: model '/no/such/version'" in out and "Traceback" not in out, out[
        -2000:
    ]
