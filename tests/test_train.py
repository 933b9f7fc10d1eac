"""Staged training on a real local Ray cluster: three stages, MLflow, registry, resume after a fault, errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.cluster import ClusterError, probe_address
from vgmedgen.platform.config import load_experiment
from vgmedgen.platform.prepare import prepare_records
from vgmedgen.platform.runs import job_key, stage_run_name
from vgmedgen.platform.tracking import Tracker
from vgmedgen.platform.training.driver import train_experiment
from vgmedgen.platform.training.runner import StageInputError, run_stage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def _cfg(root: Path, *extra: str):
    return load_experiment(
        REPO / "configs/tiny.yaml",
        [
            f"output_root={root}",
            "data.synthderm.num_records=120",
            *[
                f"train.{s}.{k}={v}"
                for s in ("visual", "align", "dit")
                for k, v in (("steps", STEPS), ("checkpoint_every", 2), ("val_every", 2), ("log_every", 1))
            ],
            "train.dit.sample_every=2",
            *extra,
        ],
    )


# The three stages end to end (two workers, MLflow, the registry, the model card, loading and sampling,
# resubmission, content-named versions) are tested once, on the README's own `ray job submit` of
# configs/tiny.yaml: tests/test_cluster.py::test_readme_ray_job_submit_trains_and_registers.


def _visual_only(root: Path, *extra: str):
    return _cfg(root, "train.stages=[visual]", "train.scaling.num_workers=1", "train.visual.steps=6", *extra)


def test_resume_after_injected_fault_matches_undisturbed_run(ray_cluster, tmp_path: Path):
    clean_cfg = _visual_only(tmp_path / "clean")
    fault_cfg = _visual_only(
        tmp_path / "fault", "train.visual.fail_at_step=3", "train.scaling.max_failures=1"
    )
    results = {}
    for name, cfg in (("clean", clean_cfg), ("fault", fault_cfg)):
        prepare_records(cfg)
        tracker = Tracker(cfg.tracking, cfg.root, cfg.name)
        results[name] = (run_stage(cfg, "visual", {}, tracker=tracker), tracker)
    res, tracker = results["fault"]
    assert (cfg_run := fault_cfg.root / "runs" / res.run_name / "fault_injected").is_file(), cfg_run
    history = tracker.client.get_metric_history(res.mlflow_run_id, "visual/total")
    assert sorted(m.step for m in history) == list(range(6))  # steps 2-3 ran twice but were logged once
    clean = load_file(str(results["clean"][0].export_dir / "model.safetensors"))
    resumed = load_file(str(res.export_dir / "model.safetensors"))
    assert clean.keys() == resumed.keys()
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)


@pytest.mark.ray_cpus(2)
def test_worker_killed_after_a_checkpoint_report_resumes_from_it(ray_cluster, tmp_path: Path):
    # Two workers; rank 0 SIGKILLs itself right after reporting the step-4 checkpoint, as a lost node would.
    # Ray Train loses that report (the controller had not collected every rank's report), so the stage must
    # resume from the newest complete checkpoint on disk rather than start over.
    # (That a resumed run equals the undisturbed one is test_resume_after_injected_fault_matches_undisturbed_run.)
    cfg = _visual_only(
        tmp_path,
        "train.scaling.num_workers=2",
        "train.visual.checkpoint_every=2",
        "train.visual.fail_at_step=4",
        "train.visual.fail_mode=sigkill",
        "train.scaling.max_failures=2",
    )
    prepare_records(cfg)
    tracker = Tracker(cfg.tracking, cfg.root, cfg.name)
    res = run_stage(cfg, "visual", {}, tracker=tracker)
    run_dir = cfg.root / "runs" / res.run_name
    assert (run_dir / "fault_injected").read_text() == "4"
    assert res.metrics["step"] == 5 and res.metrics["visual/resumed_from_step"] == 4  # not from step 0
    history = tracker.client.get_metric_history(res.mlflow_run_id, "visual/total")
    assert sorted(m.step for m in history) == list(range(6))  # each step exactly once
    registered = {Path(p).name for p in json.loads((run_dir / "DONE.json").read_text())["checkpoints"]}
    on_disk = {d.name for d in run_dir.glob("checkpoint_*") if d.is_dir()}
    assert on_disk == registered and len(on_disk) >= 1  # no orphaned checkpoint directory


def test_run_names_are_pinned_and_follow_what_reaches_each_stage(tmp_path: Path):
    def part(name: str, manifest: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "manifest.json").write_text(manifest)
        return d

    visual = part("visual", '{"files": {"model.safetensors": "aa"}, "part": "visual"}')
    text = part("text", '{"files": {"heads.safetensors": "bb"}, "part": "text"}')
    encoder = part("encoder", '{"files": {"config.json": "cc"}}')

    def names(*overrides: str) -> list[str]:
        cfg = load_experiment(REPO / "configs/tiny.yaml", [f"output_root={tmp_path}", *overrides])
        return [
            stage_run_name(cfg, "visual", {}),
            stage_run_name(cfg, "align", {"visual": visual, "text_encoder": encoder}),
            stage_run_name(cfg, "dit", {"visual": visual, "text": text}),
        ]

    base = names()
    # Pinned: a change that renames these renames every user's runs (their next job retrains from scratch).
    assert base == ["tiny-visual-db7bdcbc9e58", "tiny-align-929d57bdb534", "tiny-dit-e641d9c83fee"]
    assert names("model.sampler.guidance_style=2.0", "train.dit.log_every=5") == base
    dit = names("train.dit.lr=3e-4")
    assert dit[:2] == base[:2] and dit[2] != base[2]
    gen = names("model.generator.colour.weight=0.5")
    assert gen[:2] == base[:2] and gen[2] != base[2]
    align = names("train.align.lr=3e-4")
    assert align[0] == base[0] and align[1] != base[1] and align[2] == base[2]  # dit sees align via its input
    # world size and threads per worker change the result, so they change every name
    for scaling in ("train.scaling.num_workers=1", "train.scaling.threads_per_worker=2"):
        assert all(a != b for a, b in zip(names(scaling), base))


def test_stage_without_its_input_is_a_clear_error(output_root: Path):
    cfg = _cfg(output_root)
    with pytest.raises(StageInputError, match="needs the 'visual' part"):
        run_stage(cfg, "dit", {})


def test_unreachable_cluster_is_a_clear_error(output_root: Path, capsys):
    with pytest.raises(ClusterError, match="Cannot reach the Ray cluster at 127.0.0.1:9"):
        probe_address("127.0.0.1:9", timeout_s=1)
    spec = importlib.util.spec_from_file_location("train_job", REPO / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    from vgmedgen.platform.cli import run_job

    code = run_job(
        job.main,
        [
            "--config",
            str(REPO / "configs/tiny.yaml"),
            f"output_root={output_root}",
            "--address",
            "127.0.0.1:9",
        ],
    )
    err = capsys.readouterr().err
    assert code == 2 and "Cannot reach the Ray cluster" in err and "Traceback" not in err


def test_missing_dataset_is_a_clear_error(ray_cluster, output_root: Path, tmp_path: Path):
    from vgmedgen.platform.datasets.common import DatasetError

    cfg = load_experiment(
        REPO / "configs/tiny.yaml",
        [f"output_root={output_root}", "data.dataset=busi", f"data.root={tmp_path / 'no_busi_here'}"],
    )
    with pytest.raises(DatasetError, match="no_busi_here"):
        train_experiment(cfg, address=None)


def test_ray_data_ingest_streams_shards_to_workers(ray_cluster, output_root: Path):
    cfg = _cfg(output_root, "train.stages=[visual]", "train.ingest=ray_data", "train.visual.steps=3")
    prepare_records(cfg)
    # two workers x 1 CPU hold both CPUs of the test cluster: Ray Data would starve, so it is refused clearly
    with pytest.raises(ConfigError, match="needs CPUs left for Ray Data"):
        run_stage(cfg, "visual", {})
    cfg = cfg.model_copy(
        update={
            "train": cfg.train.model_copy(
                update={"scaling": cfg.train.scaling.model_copy(update={"num_workers": 1})}
            )
        }
    )
    res = run_stage(cfg, "visual", {})
    assert res.trained and (res.export_dir / "model.safetensors").is_file()
    assert res.metrics["step"] == 2 and res.metrics["visual/samples_per_s"] > 0


def test_train_job_stopped_with_sigterm_ends_its_runs_killed_and_a_resubmit_finishes_them(
    ray_cluster, output_root: Path
):
    """`ray job stop`, Kubernetes and `kill` send SIGTERM: the train job (a real process, connected to Ray,
    whose ray.init installs a SIGTERM handler of its own) ends its parent and stage runs KILLED and exits
    143; resubmitted, it reopens the same runs and ends them FINISHED."""
    import signal

    from jobprocess import JobProcess

    overrides = [
        f"output_root={output_root}",
        "data.synthderm.num_records=120",
        "train.scaling.num_workers=0",
        "train.visual.steps=60",
        "train.visual.log_every=1",
        *[f"train.{s}.{k}={v}" for s in ("align", "dit") for k, v in (("steps", 2), ("checkpoint_every", 2))],
    ]
    cfg = load_experiment(REPO / "configs/tiny.yaml", overrides)
    tracker = Tracker(cfg.tracking, cfg.root, cfg.name)  # the store exists before the job opens it
    visual_key = stage_run_name(cfg, "visual", {})
    job = JobProcess("train.py", ["--config", "configs/tiny.yaml", *overrides])
    job.wait_for(lambda out: "[visual] step" in out and tracker.find_run(visual_key))
    rc = job.interrupt(signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and "interrupted (SIGTERM)" in job.output(), job.output()[-3000:]
    parent_id, visual_id = tracker.find_run(job_key(cfg)), tracker.find_run(visual_key)
    status = tracker.client.get_run
    assert status(parent_id).info.status == status(visual_id).info.status == "KILLED"

    summary = train_experiment(cfg)  # resubmitted: the same runs, reopened and finished
    assert summary.mlflow_run_id == parent_id and summary.stages[0].mlflow_run_id == visual_id
    assert [status(r.mlflow_run_id).info.status for r in summary.stages] == ["FINISHED"] * 3
    assert status(parent_id).info.status == "FINISHED"
    history = tracker.client.get_metric_history(visual_id, "visual/total")
    assert sorted(m.step for m in history) == list(range(60))  # each step once across both attempts
    # a finished job resubmitted trains nothing and leaves its runs FINISHED (they are not reopened)
    again = train_experiment(cfg)
    assert not any(r.trained for r in again.stages)
    assert {status(r.mlflow_run_id).info.status for r in again.stages} == {"FINISHED"}
