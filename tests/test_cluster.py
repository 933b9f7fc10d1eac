"""The README's cluster command, run as written against the tests' Ray head node (dashboard on, token auth)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vgmedgen.model.vgmedgen import verify_manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[1]


def _readme_command() -> list[str]:
    """The README's `ray job submit` line for the tiny job (one line, so the README and this test cannot drift)."""
    lines = [
        line.strip()
        for line in (REPO / "README.md").read_text().splitlines()
        if line.strip().startswith(
            "ray job submit --working-dir . -- python jobs/train.py --config configs/tiny.yaml"
        )
    ]
    assert lines, "README.md lost its `ray job submit ... configs/tiny.yaml` command"
    return shlex.split(lines[0])


def test_readme_ray_job_submit_trains_and_registers(ray_cluster, ray_head, tmp_path: Path):
    argv = _readme_command()
    root = tmp_path / "shared"
    argv = [f"output_root={root}" if a.startswith("output_root=") else a for a in argv]
    assert argv[:5] == ["ray", "job", "submit", "--working-dir", "."] and f"output_root={root}" in argv
    # As a user's shell on the head machine after `export RAY_AUTH_MODE=token` and `export RAY_ADDRESS=<dashboard>`
    # (the token is passed as RAY_AUTH_TOKEN: this head's token is not in ~/.ray/auth_token).
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": ray_head.token,
        "RAY_ADDRESS": ray_head.dashboard_url,
        "PATH": ray_head.env["PATH"],
    }
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", out)
    assert job_id, out[-6000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(ray_head.dashboard_url).get_job_status(job_id.group(1)) == JobStatus.SUCCEEDED

    versions = [d for d in (root / "models" / "tiny").iterdir() if (d / "manifest.json").is_file()]
    assert len(versions) == 1
    verify_manifest(versions[0])
    assert f"model version: {versions[0]}" in out
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    mv = client.get_model_version_by_alias("vgmedgen-tiny", "current")
    assert client.get_run(mv.run_id).data.tags["model_version"] == versions[0].name


def test_submit_without_the_token_is_refused_with_a_clear_message(ray_cluster, ray_head):
    # What the README warns about: a client without the token is turned away, and says why.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env.update(RAY_ADDRESS=ray_head.dashboard_url, HOME=str(ray_head.temp_dir), PATH=ray_head.env["PATH"])
    proc = subprocess.run(
        ["ray", "job", "submit", "--", "python", "-c", "print(1)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "authentication token" in (proc.stdout + proc.stderr).lower()
