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


@pytest.mark.ray_cpus(1)
def test_an_interrupt_inside_a_tune_step_comes_out_at_its_end_and_the_saved_state_holds(
    ray_cluster, tmp_path: Path
):
    """Ctrl-C in the worst place: inside the driver's ``on_trial_complete``, which Tune calls before it marks
    the trial TERMINATED (the sweep's callback is slow there: it writes sweep.json and ends MLflow runs).
    Held to the step's end, the interrupt leaves a state in which the finished trial is finished, and the
    restored run does not start it again."""
    import os

    from ray import tune
    from ray.tune import Callback

    from vgmedgen.platform.tuning.hooks import InterruptAtStepEnd, SweepFIFO, save_experiment_state

    # defined here: Ray pickles it by value (its workers cannot import the tests)
    def runs_once(config: dict) -> None:
        with open(config["log"], "a") as f:
            f.write("ran\n")
        tune.report({"score": 1.0})

    class CtrlCOnCompletion(Callback):
        after = None  # the trial's status after the signal: set only when the signal is held, not raised here

        def on_trial_complete(self, iteration, trials, trial, **info):
            os.kill(os.getpid(), signal.SIGINT)
            self.after = trial.status  # Python runs the handler before this line

    log, complete, interrupts = tmp_path / "runs.log", CtrlCOnCompletion(), InterruptAtStepEnd()
    scheduler = SweepFIFO()
    tuner = tune.Tuner(
        tune.with_resources(runs_once, {"cpu": 1}),
        param_space={"log": str(log)},
        tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler),
        run_config=tune.RunConfig(
            name="cut", storage_path=str(tmp_path), callbacks=[complete, interrupts], verbose=0
        ),
    )
    with pytest.raises(KeyboardInterrupt), interrupts:
        tuner.fit()
    assert complete.after == "RUNNING" and log.read_text() == "ran\n"  # the signal came inside the step
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # and the handler is back
    assert save_experiment_state(scheduler)
    (state,) = (tmp_path / "cut").glob("experiment_state-*.json")
    (trial,) = json.loads(state.read_text())["trial_data"]
    assert json.loads(trial[0])["status"] == "TERMINATED"

    restored = tune.Tuner.restore(
        str(tmp_path / "cut"), tune.with_resources(runs_once, {"cpu": 1}), resume_unfinished=True
    )
    with InterruptAtStepEnd():  # as the sweep fits (else Tune's fit leaves its own Ctrl-C handler behind)
        grid = restored.fit()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert log.read_text() == "ran\n", "the finished trial ran again"
    assert [r.metrics["score"] for r in grid] == [1.0]


def test_a_second_interrupt_while_one_is_held_comes_out_at_once() -> None:
    import os

    from vgmedgen.platform.tuning.hooks import InterruptAtStepEnd

    held = InterruptAtStepEnd()
    with pytest.raises(KeyboardInterrupt), held:
        os.kill(os.getpid(), signal.SIGINT)
        after_first = True
        os.kill(os.getpid(), signal.SIGINT)
        after_first = False
    assert after_first
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt), held:  # one held to the end of the block comes out there
        os.kill(os.getpid(), signal.SIGINT)
        held_to_the_end = True
    assert held_to_the_end
