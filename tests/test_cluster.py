"""The cluster path against the tests' Ray head node (dashboard on, token auth): the README's `ray job submit`
command as written, tracked by a real `mlflow server` process over HTTP as on a cluster; and `serve deploy` of
infra/serve.yaml answering over HTTP with the bearer token required."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient
from raycluster import free_port
from servehelpers import ANATOMY, STYLE, ServeModels, serve_models

from vgmedgen.model.vgmedgen import verify_manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[1]
__all__ = ["serve_models"]  # the fixture, imported for pytest


@dataclass
class MlflowServer:
    uri: str
    artifacts: Path
    backend: Path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real `mlflow server` (SQLite backend, proxied artifact store, both in a temporary directory) on
    127.0.0.1 and a free port, as infra/kuberay/mlflow.yaml runs it; stopped with its whole process group."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(f"http://127.0.0.1:{free_port()}", root / "artifacts", root / "mlflow.db")
    port = server.uri.rsplit(":", 1)[1]
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", port,
        "--workers", "1", "--backend-store-uri", f"sqlite:///{server.backend}",
        "--artifacts-destination", str(server.artifacts),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{server.uri}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`{' '.join(cmd)}` did not come up:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


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


def test_readme_ray_job_submit_trains_and_registers(
    ray_cluster, ray_head, mlflow_server: MlflowServer, tmp_path: Path, monkeypatch, capsys
):
    argv = _readme_command()
    root = tmp_path / "shared"
    argv = [f"output_root={root}" if a.startswith("output_root=") else a for a in argv]
    assert argv[:5] == ["ray", "job", "submit", "--working-dir", "."] and f"output_root={root}" in argv
    # On a cluster every node has MLFLOW_TRACKING_URI in its environment (infra/); this head node was started
    # without it, so the job gets it through its runtime environment, as `ray job submit` users can pass it.
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server.uri}}
    argv[5:5] = ["--runtime-env-json", json.dumps(runtime_env)]
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
    assert f"MLflow UI:     mlflow ui --backend-store-uri {mlflow_server.uri}" in out
    # nothing written beside the server: no SQLite fallback under the output root
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()

    # The server has the runs, their metrics, the registered version, and the artifacts in its own store.
    client = MlflowClient(mlflow_server.uri)
    mv = client.get_model_version_by_alias("vgmedgen-tiny", "current")
    parent = client.get_run(mv.run_id)
    assert parent.data.tags["model_version"] == versions[0].name and parent.info.status == "FINISHED"
    stages = {
        r.data.tags["stage"]: r
        for r in client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
    }
    assert set(stages) == {"visual", "align", "dit"}
    for stage, run in stages.items():
        assert run.info.status == "FINISHED"
        assert client.get_metric_history(run.info.run_id, f"{stage}/total"), (
            f"{stage}: no metrics on the server"
        )
    # proxied artifacts: the job uploads through HTTP and the server writes its own store
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = {p.name for p in mlflow_server.artifacts.rglob("*") if p.is_file()}
    assert "manifest.json" in stored and "MODEL_CARD.md" in stored, sorted(stored)[:20]

    # What the staged training leaves, read from the same job (the suite trains the tiny pipeline once here):
    # every logged step once per stage, checkpoints ranked by validation, the export and the sample grids.
    for stage, run in stages.items():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, f"{stage}/total")]
        assert steps == sorted(set(steps)) and max(steps) == 5, (stage, steps)  # tiny: 6 steps, never twice
        assert run.data.params["train.steps"] == "6"
        assert [a.path for a in client.list_artifacts(run.info.run_id, "export")] == [
            f"export/{ {'visual': 'visual', 'align': 'text', 'dit': 'generator'}[stage] }"
        ]
    assert "visual/val_dice" in stages["visual"].data.metrics and "dit/val_loss" in stages["dit"].data.metrics
    assert "align/val_cos_anatomy" in stages["align"].data.metrics
    assert "visual/val_dice" in stages["visual"].data.tags["best_checkpoint"]
    samples = [a.path for a in client.list_artifacts(stages["dit"].info.run_id, "samples")]
    assert any("swap_grid" in p for p in samples), samples
    _the_trained_version(root, mlflow_server, versions[0], parent.info.run_id, monkeypatch, capsys)


def _the_trained_version(root, mlflow_server, version, parent_run, monkeypatch, capsys) -> None:
    """The registry, the model card, loading and sampling, resubmission and content naming, on the version the
    README job trained (in this process, against the same MLflow server)."""
    from safetensors.torch import load_file, save_file

    from vgmedgen.model.vgmedgen import VGMedGen, write_manifest
    from vgmedgen.platform.config import load_experiment
    from vgmedgen.platform.tracking import resolve_model
    from vgmedgen.platform.training.driver import assemble_version, train_experiment

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    cfg = load_experiment(REPO / "configs/tiny.yaml", [f"output_root={root}"])
    ref = f"vgmedgen-tiny@{cfg.tracking.alias}"
    resolved = resolve_model(ref, cfg)
    assert resolved.name.startswith("vgmedgen-tiny-v") and resolved.run_id == parent_run
    assert resolved.path == cfg.root / "models" / "_registry" / resolved.name and len(resolved.id) == 64
    # copied once under the output root (every node sees it): a second resolve reuses the copy; a damaged copy is
    # made again from the registry
    stamp = (resolved.path / "manifest.json").stat().st_mtime_ns
    assert resolve_model(ref, cfg).path == resolved.path
    assert (resolved.path / "manifest.json").stat().st_mtime_ns == stamp
    weights = sorted(p for p in resolved.path.rglob("*.safetensors"))[0]
    weights.write_bytes(b"damaged")
    assert resolve_model(ref, cfg).id == resolved.id and weights.read_bytes() != b"damaged"
    # the model card names every stage's run and the registry entry, outside the hashes, in the registered copy too
    card = (version / "MODEL_CARD.md").read_text()
    assert card.count("`tiny-") >= 3 and "vgmedgen-tiny" in card
    assert (resolved.path / "MODEL_CARD.md").read_text() == card
    assert "MODEL_CARD.md" not in json.loads((resolved.path / "manifest.json").read_text())["files"]
    model = VGMedGen.from_pretrained(resolved.path)
    cond = model.conditions_from_prompts(["a small round lesion"], ["dark brown pigment"])
    images, masks = model.generate(cond, [3], sampler=cfg.model.sampler.model_copy(update={"num_steps": 2}))
    assert images.shape == (1, 3, 16, 16) and masks.shape == (1, 1, 16, 16)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0

    # re-submitting the finished job trains nothing and says so; sampler settings are in no stage's identity
    capsys.readouterr()
    again = train_experiment(
        load_experiment(REPO / "configs/tiny.yaml", [f"output_root={root}", "model.sampler.num_steps=3"])
    )
    assert not any(r.trained for r in again.stages)
    assert sorted(r.run_name for r in again.stages) == sorted(
        p.name for p in (root / "runs").iterdir() if p.is_dir()
    )
    assert "nothing to train" in capsys.readouterr().out
    # checkpoints are ranked by the validation metric; the best is recorded with the run
    best = json.loads((root / "runs" / again.stages[0].run_name / "DONE.json").read_text())["best_checkpoint"]
    assert best["visual/val_dice"] is not None and Path(best["path"]).is_dir()

    # the version is named by its parts' content: a retrained part (as --fresh makes) is a new version even when
    # every run name is the same; the same parts are the same version
    parts = {p: version / p for p in ("visual", "text", "generator")}
    assert assemble_version(cfg, parts) == version
    retrained = root / "retrained-generator"
    shutil.copytree(parts["generator"], retrained)
    tensors_file = next(retrained.glob("*.safetensors"))
    tensors = load_file(str(tensors_file))
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in tensors.items()}, str(tensors_file))
    write_manifest(
        retrained,
        {k: v for k, v in json.loads((retrained / "manifest.json").read_text()).items() if k != "files"},
    )
    rebuilt = assemble_version(cfg, {**parts, "generator": retrained})
    assert rebuilt != version and (rebuilt / "manifest.json").is_file()


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


@pytest.mark.ray_cpus(0.35)
def test_serve_deploy_of_infra_serve_yaml_answers_with_an_image(
    ray_cluster, ray_head, serve_models: ServeModels, tmp_path: Path
):
    """`serve deploy` of infra/serve.yaml, changed only where a test must: a free port, the test model and CPU
    shares, and the token in the application's environment (a pod gets it from the Secret)."""
    config = yaml.safe_load((REPO / "infra" / "serve.yaml").read_text())
    port, token = free_port(), "test-serve-token"
    config["http_options"]["port"] = port
    (app,) = config["applications"]
    # the builder runs on the cluster, whose working directory need not be this checkout (in a pod it is /app)
    app["args"]["config"] = str(REPO / app["args"]["config"])
    app["args"]["overrides"] = [
        *[o for o in app["args"]["overrides"] if not o.startswith("serve.port=")],
        f"serve.port={port}", f"output_root={serve_models.root}", f"serve.models=[{serve_models.versions[0]}]",
        "serve.num_cpus=0.25", "serve.ingress_num_cpus=0.1",
    ]  # fmt: skip
    app["runtime_env"] = {"env_vars": {"VGMEDGEN_SERVE_TOKEN": token}}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": ray_head.token,
        "PATH": ray_head.env["PATH"],
    }
    serve_cli = ["serve", "deploy", str(path), "-a", ray_head.dashboard_url]
    base = f"http://127.0.0.1:{port}"
    try:
        proc = subprocess.run(serve_cli, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{base}/readyz", timeout=10).status_code == 200:
                    break
            except (
                requests.ConnectionError,
                requests.Timeout,
            ):  # the proxy is not up, or the app still starts
                pass
            if time.monotonic() > deadline:
                status = subprocess.run(
                    ["serve", "status", "-a", ray_head.dashboard_url], env=env, capture_output=True, text=True
                )
                pytest.fail(f"the deployed application never became ready:\n{status.stdout}{status.stderr}")
            time.sleep(1)
        body = {"anatomy_prompt": ANATOMY[0], "style_prompt": STYLE[0], "seed": 3, "format": "png"}
        assert requests.post(f"{base}/v1/generate", json=body, timeout=60).status_code == 401
        r = requests.post(
            f"{base}/v1/generate", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text[:500]
        from vgmedgen.platform.images import read_provenance

        assert r.content.startswith(b"\x89PNG") and read_provenance(r.content)["seed"] == "3"
    finally:
        # `serve shutdown` removes every application and the proxy; the job store actor is ours to remove
        subprocess.run(
            ["serve", "shutdown", "-y", "-a", ray_head.dashboard_url],
            env=env,
            capture_output=True,
            timeout=120,
        )
        from vgmedgen.serve.ingress import shutdown_jobs

        shutdown_jobs(app["name"])
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base}/healthz", timeout=5)
