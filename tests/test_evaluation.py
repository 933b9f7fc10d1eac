"""Evaluation: classifier/judge training through the shared loop, synthetic rows, plans, adherence, the evaluate job."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from vgmedgen.model.domain_nets import domain_net_config
from vgmedgen.platform.config import load_experiment
from vgmedgen.platform.datasets.measure import describe_bins, measure_mask
from vgmedgen.platform.datasets.synthderm import synthderm_record
from vgmedgen.platform.evaluation.adherence import prompt_vocabulary
from vgmedgen.platform.evaluation.control import anatomy_adherence, judge_heads
from vgmedgen.platform.evaluation.downstream import plan_policy, subset_records
from vgmedgen.platform.evaluation.generate import prompt_rows
from vgmedgen.platform.images import read_provenance
from vgmedgen.platform.metrics.stats import MetricsError
from vgmedgen.platform.records import records_to_table
from vgmedgen.platform.training.classify import (
    ClassifierSpec,
    ClassifierTask,
    fit_classifier,
    load_labelled,
    predict,
)
from vgmedgen.platform.training.config import StageTrainConfig

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def _split_of(group: str) -> str:
    u = zlib.crc32(group.encode()) % 10
    return "val" if u < 2 else ("test" if u < 4 else "train")


def write_synthderm(directory: Path, n: int, seed: int = 0) -> Path:
    """SynthDerm records at 32 px with group-safe splits, written without Ray (unit tests)."""
    rows = []
    for i in range(n):
        r = synthderm_record(seed, i, SIZE)
        rows.append({**r, "split": _split_of(r["group"])})
    directory.mkdir(parents=True)
    pq.write_table(records_to_table(rows), directory / "part-00000.parquet")
    return directory


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    return write_synthderm(tmp_path_factory.mktemp("records") / "synthderm-32", 1500)


def test_judges_trained_at_tiny_scale_beat_chance_by_a_wide_margin(records: Path, tmp_path: Path):
    heads = judge_heads()
    net = domain_net_config(
        "tiny", num_classes=sum(len(h.classes) for h in heads), input_size=SIZE, width=16, coord_channels=True
    )
    train = StageTrainConfig(steps=400, batch_size=32, lr=2e-3, checkpoint_every=400, val_every=400)
    spec = ClassifierSpec(net=net, heads=heads, records_dir=records, train=train, seed=0)
    judges = fit_classifier(spec, tmp_path / "nets", "judges")  # the shared loop under Ray Train, in-process

    val = load_labelled(records, "val", heads)
    pred = predict(judges.net, heads, val.images)
    margins = []
    for k, h in enumerate(heads):
        target = val.targets[:, k]
        acc = float((pred[:, k] == target).float().mean())
        majority = float(torch.bincount(target).max()) / len(target)  # always guessing the commonest value
        assert judges.metrics[f"acc_{h.name}"] == pytest.approx(acc, abs=1e-6)
        margins.append(acc - majority)
        # what a 0.1 M-parameter judge learns from 1,200 images in 400 steps (measured: +0.22, +0.57, +0.37);
        # position, shape and border need the full-size judges (see the evaluate config)
        if h.name in ("size", "skin_tone", "illumination"):
            assert acc > majority + 0.15, (h.name, acc, majority)
    assert np.mean(margins) > 0.1
    # a second call with the same spec and data reuses the trained network
    again = fit_classifier(spec, tmp_path / "nets", "judges")
    assert again.directory == judges.directory
    for a, b in zip(again.net.state_dict().values(), judges.net.state_dict().values()):
        assert torch.equal(a, b)


def test_instruments_are_seeded_by_the_evaluate_config_never_by_the_model_under_test(tmp_path: Path):
    """Models trained with different seeds are measured with the same domain network and judges (their specs
    are their run identities); only evaluate.instrument_seed gives other ones."""
    from vgmedgen.platform.evaluation.driver import domain_spec, judges_of

    def specs(*overrides: str) -> list[dict]:
        cfg = load_experiment(REPO / "configs/tiny.yaml", [f"output_root={tmp_path}", *overrides])
        if not cfg.records_dir.exists():
            write_synthderm(cfg.records_dir, 40)  # the domain network's classes are the train labels
        return [domain_spec(cfg)[0].model_dump(mode="json"), judges_of(cfg).model_dump(mode="json")]

    trained_with_seed_0 = specs("seed=0")
    assert specs("seed=5") == trained_with_seed_0
    other = specs("seed=0", "evaluate.instrument_seed=3")
    assert [s["seed"] for s in other] == [3, 3] and all(a != b for a, b in zip(other, trained_with_seed_0))


def test_segmentation_task_learns_masks(records: Path, tmp_path: Path):
    net = domain_net_config("tiny", kind="segmentation", num_classes=1, input_size=SIZE)
    train = StageTrainConfig(steps=60, batch_size=32, lr=3e-3, checkpoint_every=60, val_every=60)
    spec = ClassifierSpec(net=net, records_dir=records, train=train, seed=0)
    task = ClassifierTask(spec, torch.device("cpu"))
    before = task.validate()["dice"]
    seg = fit_classifier(spec, tmp_path / "nets", "seg")
    assert seg.metrics["dice"] > max(0.5, before + 0.2)


def test_downstream_plans_are_generation_policies():
    assert plan_policy("balance") == {"balance": {}}
    assert plan_policy("x0.5") == {"multiply": 0.5} and plan_policy("x2") == {"multiply": 2.0}
    with pytest.raises(ValueError, match="unknown downstream plan 'xy'"):
        plan_policy("xy")


def test_downstream_scalars_carry_balanced_accuracy_and_macro_f1_per_plan():
    from vgmedgen.platform.evaluation.downstream import DownstreamResult

    runs = [
        {"plan": "real", "seed": s, "n_real": 10, "n_synthetic": 0, "balanced_accuracy": b, "macro_f1": f}
        for s, b, f in ((0, 0.5, 0.4), (1, 0.7, 0.6))
    ] + [
        {"plan": "x1", "seed": 0, "n_real": 10, "n_synthetic": 10, "balanced_accuracy": 0.8, "macro_f1": 0.3}
    ]
    out = DownstreamResult("classification", runs, seconds=1.0).scalars()
    assert out["downstream/real_balanced_accuracy"] == pytest.approx(0.6)
    assert out["downstream/real_macro_f1"] == pytest.approx(0.5)
    assert out["downstream/real_macro_f1_std"] == pytest.approx(0.1414, abs=1e-4)
    assert out["downstream/x1_balanced_accuracy_gain"] == pytest.approx(0.2)
    assert out["downstream/x1_macro_f1_gain"] == pytest.approx(-0.2)
    assert "downstream/real_macro_f1_gain" not in out  # the baseline has no gain over itself


def test_low_data_subset_keeps_val_and_test(records: Path, tmp_path: Path):
    out = subset_records(records, 5, 0, tmp_path)
    full, sub = pq.read_table(records), pq.read_table(out)
    for split in ("val", "test"):
        assert full.column("split").to_pylist().count(split) == sub.column("split").to_pylist().count(split)
    train_labels = [
        lab
        for lab, s in zip(sub.column("label").to_pylist(), sub.column("split").to_pylist())
        if s == "train"
    ]
    assert max(train_labels.count(c) for c in set(train_labels)) == 5


def test_anatomy_adherence_scores_in_the_vocabulary_that_wrote_the_prompts(records: Path):
    # Real data: the prompts were written from the caption bins of the source masks (9-cell grid).
    src = torch.zeros(3, 1, 30, 30)
    src[0, :, 12:18, 12:18] = 1  # small, centre
    src[1, :, 0:12, 0:12] = 1  # upper left
    src[2, :, 18:30, 18:30] = 1  # lower right
    written = [describe_bins(measure_mask(m[0].numpy() > 0.5), None) for m in src]
    written.append({"mask_policy": "none"})  # a record without a mask asks for no size: skipped
    gen = torch.cat([src, torch.zeros(1, 1, 30, 30)])
    same = anatomy_adherence(gen, written, vocabulary="caption")
    assert same["adherence/caption/pseudo_mask/size"] == same["adherence/caption/pseudo_mask/position"] == 1.0
    assert same["adherence/caption/pseudo_mask/n"] == 3.0
    moved = gen.roll(shifts=(0, 15), dims=(2, 3))  # same sizes, other places
    shifted = anatomy_adherence(moved, written, vocabulary="caption")
    assert shifted["adherence/caption/pseudo_mask/size"] == 1.0
    assert shifted["adherence/caption/pseudo_mask/position"] < 1.0
    empty = anatomy_adherence(torch.zeros_like(gen), written, vocabulary="caption")
    assert (
        empty["adherence/caption/pseudo_mask/empty"] == 1.0
        and empty["adherence/caption/pseudo_mask/size"] == 0.0
    )
    # SynthDerm: the prompts were written from its factors, so its own functions read the masks
    # (centre plus quadrants), and the true masks agree exactly with the factors.
    rows = prompt_rows(records, "val")
    syn = anatomy_adherence(rows.masks, rows.attributes, vocabulary=prompt_vocabulary("synthderm"))
    assert (
        syn["adherence/synthderm/pseudo_mask/size"] == syn["adherence/synthderm/pseudo_mask/position"] == 1.0
    )
    # A request written in the other vocabulary is refused, naming the fix.
    with pytest.raises(ValueError, match="score it in caption"):
        anatomy_adherence(gen, [*written[:3], {"size": "small", "position": "upper"}], vocabulary="synthderm")


def test_required_fid_without_weights_fails_before_any_work(tmp_path: Path):
    from vgmedgen.platform.evaluation.driver import evaluate_experiment

    cfg = load_experiment(
        REPO / "configs/tiny.yaml", [f"output_root={tmp_path}", "evaluate.fidelity.fid=required"]
    )
    with pytest.raises(MetricsError, match="feature_extractor_weights_path"):
        evaluate_experiment(cfg)
    assert not (tmp_path / "records").exists()


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_evaluate_job_end_to_end_with_downstream(ray_cluster, output_root: Path, capsys):
    """Train a tiny model in-process, then the evaluate job: distances, memorisation, adherence,
    controllability, the downstream benchmark (3 seeds on Ray), the report and MLflow."""
    import importlib.util

    from vgmedgen.platform.training.driver import train_experiment

    overrides = [
        f"output_root={output_root}",
        "data.synthderm.num_records=160",
        "train.scaling.num_workers=0",
        *[
            f"train.{s}.{k}={v}"
            for s in ("visual", "align", "dit")
            for k, v in (("steps", 3), ("checkpoint_every", 3), ("val_every", 3))
        ],
        "evaluate.domain_net=tiny",
        "evaluate.num_images=16",
        "evaluate.domain_train.steps=5",
        "evaluate.domain_train.batch_size=16",
        "evaluate.fidelity.kid_subset_size=8",
        "evaluate.fidelity.kid_subsets=5",
        "evaluate.controllability.num_prompts=8",
        "evaluate.controllability.judge_net=tiny",
        "evaluate.controllability.judge_train.steps=5",
        "evaluate.controllability.judge_train.batch_size=16",
        "evaluate.downstream.enabled=true",
        "evaluate.downstream.net=tiny",
        "evaluate.downstream.train.steps=3",
        "evaluate.downstream.train.batch_size=16",
        "evaluate.downstream.real_per_class=6",
        "evaluate.downstream.plans=[balance,x0.5]",
        "evaluate.sampler.num_steps=2",
    ]
    summary = train_experiment(load_experiment(REPO / "configs/tiny.yaml", overrides))
    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs/evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--config", str(REPO / "configs/tiny.yaml"), *overrides]) == 0
    out = capsys.readouterr().out
    assert "SFD" in out and "Controllability" in out and "Downstream classification" in out

    reg = MlflowClient(summary.tracking_uri).get_model_version_by_alias(f"vgmedgen-{'tiny'}", "latest")
    report_dir = output_root / "evaluation" / "tiny" / f"vgmedgen-tiny-v{reg.version}"
    report = json.loads((report_dir / "report.json").read_text())
    names = {d["metric"] for d in report["distances"]}
    assert names == {"SFD", "SKD"}  # no Inception weights here: FID/KID skipped with the warning
    assert any("FID/KID skipped" in w for w in report["warnings"])
    assert all(d["floor"] is not None for d in report["distances"])
    assert 0.0 <= report["memorisation"]["share"] <= 1.0
    s = report["scalars"]
    assert {
        "adherence/synthderm/pseudo_mask/size",
        "adherence/synthderm/pseudo_mask/position",
        "control/swapped_pigment",
        "control/judge_on_real_pigment",
        "control/chance_pigment",
    } <= set(s)
    runs = report["tables"]["Downstream runs"]
    assert {(r["plan"], r["seed"]) for r in runs} == {
        (p, k) for p in ("real", "balance", "x0.5") for k in (0, 1, 2)
    }
    for r in runs:
        assert {"balanced_accuracy", "macro_f1"} <= set(r) and any(k.startswith("recall_") for k in r)
        assert (r["n_synthetic"] == 0) == (r["plan"] == "real")
    for png in ("distances.png", "memorisation.png", "confusion.png", "samples.png"):
        assert (report_dir / png).stat().st_size > 1000
    # the generated samples say what they are and which model version, seeds and prompts made them
    shown = read_provenance(report_dir / "samples.png")
    assert shown["synthetic"] == "true" and shown["kind"] == "evaluation samples"
    assert len(shown["model_version"]) == 64 and len(json.loads(shown["seeds"])) == len(
        json.loads(shown["anatomy_prompts"])
    )
    assert read_provenance(report_dir / "distances.png") == {}
    # logged into the model version's training run
    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(reg.run_id)
    assert "eval/SFD" in run.data.metrics and "downstream/real_balanced_accuracy" in run.data.metrics
    assert "downstream/real_macro_f1" in run.data.metrics
    assert "evaluation/report.json" in [a.path for a in client.list_artifacts(reg.run_id, "evaluation")]
    # the registered version's model card carries the evaluation (and still the training stages)
    card = Path(
        client.download_artifacts(reg.run_id, "model_version/MODEL_CARD.md", str(output_root))
    ).read_text()
    assert "| `eval/SFD` |" in card and "against the real test split" in card and "## Training stages" in card

    # the segmentation variant of the benchmark (Kvasir-style): real vs real + image/pseudo-mask pairs
    seg = [
        *overrides,
        "evaluate.downstream.task=segmentation",
        "evaluate.downstream.plans=[x0.5]",
        "evaluate.controllability.enabled=off",
    ]
    assert job.main(["--config", str(REPO / "configs/tiny.yaml"), *seg]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    seg_runs = report["tables"]["Downstream runs"]
    assert {(r["plan"], r["seed"]) for r in seg_runs} == {(p, k) for p in ("real", "x0.5") for k in (0, 1, 2)}
    assert all(0.0 <= r["dice"] <= 1.0 and 0.0 <= r["iou"] <= 1.0 for r in seg_runs)
    assert "downstream/x0.5_dice_gain" in report["scalars"]
    capsys.readouterr()

    # bad input: a model reference that does not exist -> exit 2 with the reason
    from vgmedgen.platform.cli import run_job

    bad = [*overrides, "evaluate.model=/nonexistent/version"]
    assert run_job(job.main, ["--config", str(REPO / "configs/tiny.yaml"), *bad]) == 2
    assert "/nonexistent/version" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_interrupted_evaluate_job_ends_its_run_killed_and_a_rerun_finishes_it(
    ray_cluster, output_root: Path, tmp_path: Path
):
    """The evaluate job on a folder of generated PNGs, as a real process: SIGINT while it trains its domain
    extractor ends its MLflow run KILLED (exit 130); the same job run again reuses that run and ends it
    FINISHED, with its progress (images counted) in the job's output."""
    import signal

    from jobprocess import JobProcess

    from vgmedgen.platform.tracking import Tracker

    folder = tmp_path / "generated-pngs"
    folder.mkdir()
    for i in range(16):
        (folder / f"{i:03d}.png").write_bytes(synthderm_record(7, i, 16)["image"])
    overrides = [
        f"output_root={output_root}",
        "data.synthderm.num_records=160",
        f"evaluate.generated_dir={folder}",
        "evaluate.num_images=16",
        "evaluate.domain_net=tiny",
        "evaluate.domain_train.batch_size=16",
        "evaluate.domain_train.log_every=1",
        "evaluate.fidelity.kid_subset_size=8",
        "evaluate.fidelity.kid_subsets=5",
        "evaluate.controllability.enabled=off",
    ]
    cfg = load_experiment(REPO / "configs/tiny.yaml", overrides)
    tracker = Tracker(cfg.tracking, cfg.root, cfg.name)  # the store exists before the job opens it
    key = f"{cfg.name}-evaluate-{folder.name}"
    args = ["--config", "configs/tiny.yaml", *overrides]

    # 1. interrupted while it trains the domain extractor (far more steps than it gets to run)
    job = JobProcess("evaluate.py", [*args, "evaluate.domain_train.steps=100000"])
    job.wait_for(
        lambda out: "[evaluate] domain extractor" in out and " step " in out and tracker.find_run(key)
    )
    run_id = tracker.find_run(key)
    assert tracker.client.get_run(run_id).info.status == "RUNNING"
    assert job.interrupt(signal.SIGINT) == 130, job.output()[-3000:]
    assert "interrupted (SIGINT)" in job.output()
    if "did not stop within" in job.output():  # the watchdog ended it: say where it hung
        import warnings

        warnings.warn(
            f"the interrupted evaluate job needed the watchdog:\n{job.output()[-6000:]}", stacklevel=1
        )
    assert tracker.client.get_run(run_id).info.status == "KILLED"

    # 2. the same job again (fewer domain steps): the same run, FINISHED, with its results and progress
    again = JobProcess("evaluate.py", [*args, "evaluate.domain_train.steps=5"])
    assert again.process.wait(300) == 0, again.output()[-3000:]
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and "eval/SFD" in run.data.metrics
    assert len(tracker.client.search_runs([tracker.experiment_id])) == 1  # reused, not a second run
    assert "domain features, generated" in again.output() and "16/16" in again.output()


def test_coordinate_channels_are_appended_and_saved(tmp_path: Path) -> None:
    from vgmedgen.model.domain_nets import DomainClassifier

    net = DomainClassifier(
        domain_net_config("tiny", num_classes=3, input_size=16, coord_channels=True)
    ).eval()
    img = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    x = net.prepare(img)
    assert x.shape == (2, 5, 16, 16)
    assert torch.allclose(x[0, 3, 0], torch.linspace(-1, 1, 16)) and torch.allclose(
        x[0, 4, :, 0], torch.linspace(-1, 1, 16)
    )
    # the config (and so the coordinate maps) travels with the saved network
    from vgmedgen.model.domain_nets import load_domain_net, save_domain_net

    path = tmp_path / "net.safetensors"
    save_domain_net(net, path)
    back = load_domain_net(path)
    assert back.config.coord_channels and torch.equal(back.features(back.prepare(img)), net.features(x))
