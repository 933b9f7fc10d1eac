"""A sweep under Ray Tune, end to end at tiny scale: ASHA stops the bad trials early, the upstream stages are
trained once for all trials, a sweep interrupted after its first trial and started again ends with exactly
the configured trials (none run twice, the finished one not even started again, no MLflow run duplicated), and best.yaml leads back to the best
trial's runs, registered as sweep-best only; the comparison report evaluates the trial that trained to the end."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest
import yaml

from vgmedgen.platform.config import load_experiment
from vgmedgen.platform.runs import read_done, stage_run_name
from vgmedgen.platform.tracking import RUN_KEY_TAG, Tracker

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def _sweep_file(tmp_path: Path, output_root: Path) -> Path:
    """Three trials in grid order: a good learning rate, then two that blow the loss up by the first rung,
    on one worker, so ASHA's decisions are deterministic."""
    data = {
        "base": str(REPO / "configs" / "tiny.yaml"),
        "overrides": [
            f"output_root={output_root}",
            f"train.dit.steps={STEPS}",
            "evaluate.domain_net=tiny",
            "evaluate.domain_train.steps=20",
        ],
        "objective": {"metric": "kid", "images": 8, "final_images": 12},
        "search": {"algorithm": "grid"},
        "scheduler": {"kind": "asha", "grace_period": 2, "reduction_factor": 2},
        "trials": 3,
        "concurrent_trials": 1,
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "report_every": 2,
        "space": {"train.dit.lr": {"grid": [1e-3, 30.0, 50.0]}},
    }
    path = tmp_path / "tiny-sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _state(root: Path) -> dict:
    found = list((root / "sweeps").glob("*/sweep.json"))
    return json.loads(found[0].read_text()) if found else {}


@pytest.mark.ray_cpus(2)
def test_sweep_stops_early_reuses_stages_resumes_and_writes_best(
    ray_cluster, tmp_path: Path, output_root: Path
):
    from jobprocess import JobProcess

    sweep = _sweep_file(tmp_path, output_root)
    args = ["--config", str(sweep)]
    first = JobProcess("sweep.py", args)
    first.wait_for(
        lambda out: any(t["state"] == "DONE" for t in _state(output_root).get("trials", [])), timeout_s=400
    )
    rc = first.interrupt(signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, first.output()[-3000:]
    state = _state(output_root)
    assert state["status"] == "running" and [t["state"] for t in state["trials"]] == ["DONE"]
    good = state["trials"][0]
    runs = output_root / "runs"
    good_done = (runs / good["stages"]["dit"] / "DONE.json").read_text()

    # the second run also writes the comparison report (out of the sweep's identity: the same sweep continues)
    report = [
        "report.evaluate=true",
        "report.adherence=on",
        "report.overrides=[evaluate.num_images=8,evaluate.fidelity.kid_subset_size=4,evaluate.fidelity.kid_subsets=2,"
        "evaluate.controllability.enabled=off,evaluate.sampler.num_steps=2,adherence.seeds_per_cell=1,"
        "adherence.ruler.train.steps=10,adherence.sampler.num_steps=2]",
    ]
    again = JobProcess("sweep.py", [*args, *report])
    assert again.process.wait(400) == 0, again.output()[-4000:]
    out = again.output()
    assert "continuing" in out and "3/3 trials: 1 done, 2 stopped" in out  # the live table
    # the interrupt saved Tune's state: the trial that had finished is not started again
    short = good["trial"].rsplit("-", 1)[-1]
    rerun = [line for line in out.splitlines() if line.startswith(short) and "RUNNING" in line]
    assert not rerun, out[-3000:]

    state = _state(output_root)
    trials = {t["values"]["train.dit.lr"]: t for t in state["trials"]}
    assert state["status"] == "finished" and len(state["trials"]) == 3 and set(trials) == {1e-3, 30.0, 50.0}
    # ASHA: the good trial reported every step to the end; both bad ones stopped at the first rung
    assert [s for s, _ in trials[1e-3]["history"]] == [2, 4, 6, 8]
    for lr in (30.0, 50.0):
        assert trials[lr]["state"] == "STOPPED" and [s for s, _ in trials[lr]["history"]] == [2], trials[lr]
    # upstream stages trained once for all trials; one dit run per trial; the good one not run again
    stages = Counter(p.name.split("-")[1] for p in runs.iterdir() if p.is_dir())
    assert stages == {"visual": 1, "align": 1, "dit": 3}
    assert (runs / good["stages"]["dit"] / "DONE.json").read_text() == good_done
    assert len({t["stages"]["visual"] for t in state["trials"]}) == 1

    cfg = load_experiment(REPO / "configs/tiny.yaml", [f"output_root={output_root}"])
    tracker = Tracker(cfg.tracking, cfg.root, cfg.name)
    all_runs = tracker.client.search_runs([tracker.experiment_id], max_results=1000)
    keys = Counter(r.data.tags.get(RUN_KEY_TAG) for r in all_runs)
    assert max(keys.values()) == 1, keys  # no run key opened twice
    trial_runs = [r for r in all_runs if r.data.tags.get("job") == "sweep-trial"]
    assert len(trial_runs) == 3 and {r.info.status for r in trial_runs} == {"FINISHED"}
    assert sum(r.data.tags.get("job") == "sweep" for r in all_runs) == 1
    stopped = [r for r in trial_runs if "early_stopped" in r.data.tags]
    assert len(stopped) == 2
    good_run = tracker.client.get_run(good["mlflow_run_id"])
    assert [m.step for m in tracker.client.get_metric_history(good_run.info.run_id, "objective")] == [
        2,
        4,
        6,
        8,
    ]
    assert "final_kid" in good_run.data.metrics and "final_fd" in good_run.data.metrics

    # best.yaml: the good trial's whole config, naming the same runs; registered as sweep-best, not current
    best_cfg = load_experiment(output_root / "sweeps" / state["key"] / "best.yaml")
    assert best_cfg.train.dit.lr == 1e-3 and best_cfg.root == cfg.root
    named = good["stages"]
    visual, text = runs / named["visual"] / "export" / "visual", runs / named["align"] / "export" / "text"
    assert stage_run_name(best_cfg, "visual", {}) == named["visual"]
    assert stage_run_name(best_cfg, "dit", {"visual": visual, "text": text}) == named["dit"]
    assert read_done(runs / named["dit"]) is not None  # jobs/train.py --config best.yaml finds it finished
    model = tracker.client.get_registered_model(tracker.model_name)
    assert set(model.aliases) == {"sweep-best"}
    assert (
        model.aliases["sweep-best"]
        and tracker.client.get_model_version_by_alias(tracker.model_name, "sweep-best").run_id
        == good["mlflow_run_id"]
    )
    sweep_dir = output_root / "sweeps" / state["key"]
    for name in ("trials.csv", "trials.md", "objective_by_step.png", "parameters.png"):
        assert (sweep_dir / name).is_file()
    assert (sweep_dir / "trials.md").read_text().splitlines()[2].split("|")[2].strip() == "*"

    # the comparison report (turned on for the second run: it is out of the sweep's identity): the evaluate
    # job and the ruler's swap grid on the one trial that trained to the end, logged to its run
    assert "comparison:" in out
    evaluated = [t for t in state["trials"] if t["evaluation"]]
    assert [t["values"]["train.dit.lr"] for t in evaluated] == [1e-3]  # stopped trials are not compared
    figures = evaluated[0]["evaluation"]
    assert {"eval/SFD", "eval/SKD", "adherence/synthderm/size", "adherence/synthderm/colour"} <= set(figures)
    md = (sweep_dir / "comparison.md").read_text().splitlines()
    assert md[0].startswith("| group | trials | domain FD (SFD) ↓ | domain KD (SKD) ↓ |")
    assert md[2].startswith("| train.dit.lr=0.001 | 1 |")
    assert (sweep_dir / "comparison.png").is_file()
    good_run = tracker.client.get_run(good["mlflow_run_id"])
    assert "eval/SFD" in good_run.data.metrics and "adherence/synthderm/size" in good_run.data.metrics
    parent = next(r for r in all_runs if r.data.tags.get("job") == "sweep").info.run_id
    assert {a.path for a in tracker.client.list_artifacts(parent, "comparison")} >= {
        "comparison/comparison.md",
        "comparison/comparison.png",
    }
