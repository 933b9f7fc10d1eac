"""Staged training on a real local Ray cluster: three stages, MLflow, registry, resume after a fault, errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from vgmedgen.model.configbase import ConfigError
from vgmedgen.model.text import TextEncoder
from vgmedgen.model.vgmedgen import VGMedGen
from vgmedgen.platform.cluster import ClusterError, probe_address
from vgmedgen.platform.config import load_experiment
from vgmedgen.platform.prepare import prepare_records
from vgmedgen.platform.tracking import Tracker
from vgmedgen.platform.training.pipeline import ensure_text_encoder, train_experiment
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


def test_three_stages_two_workers_mlflow_and_registry(ray_cluster, output_root: Path, capsys):
    # The demo preset's stage-1/2 options, through DDP: colour moments in the style prior, a text encoder
    # that trains with its heads, heads on standardized priors.
    demo_options = (
        "model.visual.style_prior=mu_colour",
        "model.text.frozen=false",
        "model.text.standardize_priors=true",
    )
    cfg = _cfg(output_root, *demo_options)
    summary = train_experiment(cfg)
    assert [r.stage for r in summary.stages] == ["visual", "align", "dit"] and all(
        r.trained for r in summary.stages
    )

    client = MlflowClient(summary.tracking_uri)
    parent = client.get_run(summary.mlflow_run_id)
    assert parent.data.tags["git_commit"] and parent.data.params["model.preset"] == "tiny"
    children = {
        r.data.tags["stage"]: r
        for r in client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
    }
    assert set(children) == {"visual", "align", "dit"}
    for stage, run in children.items():
        history = client.get_metric_history(run.info.run_id, f"{stage}/total")
        assert sorted(m.step for m in history) == list(range(STEPS))  # every step exactly once
        assert run.data.params["train.steps"] == str(STEPS)
        assert [a.path for a in client.list_artifacts(run.info.run_id, "export")] == [
            f"export/{ {'visual': 'visual', 'align': 'text', 'dit': 'generator'}[stage] }"
        ]
    assert "visual/val_dice" in children["visual"].data.metrics
    # checkpoints are ranked by the validation metric; the best is recorded with the run
    best = json.loads((cfg.root / "runs" / summary.stages[0].run_name / "DONE.json").read_text())[
        "best_checkpoint"
    ]
    assert best["visual/val_dice"] is not None and Path(best["path"]).is_dir()
    assert "visual/val_dice" in children["visual"].data.tags["best_checkpoint"]
    assert "align/val_cos_anatomy" in children["align"].data.metrics
    assert "dit/val_loss" in children["dit"].data.metrics
    samples = [a.path for a in client.list_artifacts(children["dit"].info.run_id, "samples")]
    assert any("swap_grid" in p for p in samples) and any("samples_step000002" in p for p in samples)

    # the registry alias resolves to the model version, which loads and samples
    resolved = Tracker(cfg.tracking, cfg.root, cfg.name).resolve(f"vgmedgen-tiny@{cfg.tracking.alias}")
    model = VGMedGen.from_pretrained(resolved)
    cond = model.conditions_from_prompts(["a small round lesion"], ["dark brown pigment"])
    images, masks = model.generate(cond, [3], sampler=cfg.model.sampler.model_copy(update={"num_steps": 2}))
    assert images.shape == (1, 3, 16, 16) and masks.shape == (1, 1, 16, 16)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    # the style prior is mu + 12 colour moments; the heads carry the training priors' statistics; the
    # encoder saved with the version is the trained one, not the one `prepare` built
    assert model.text.config.style_dim == 8 + 12 and model.text.heads.style_std.shape == (20,)
    assert not torch.equal(model.text.heads.style_std, torch.ones(20))
    built = TextEncoder.from_pretrained(ensure_text_encoder(cfg), max_length=cfg.model.text.max_length)
    trained = dict(model.text.encoder.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in built.named_parameters())

    # re-submitting the finished job trains nothing and says so
    again = train_experiment(cfg)
    assert not any(r.trained for r in again.stages)
    assert again.model_version == summary.model_version
    assert "nothing to train" in capsys.readouterr().out


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


def test_missing_dataset_is_a_clear_error(output_root: Path, tmp_path: Path):
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
