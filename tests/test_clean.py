"""The clean job: which stage runs nothing refers to (registered model versions, unfinished sweeps, jobs in
flight), a dry run that deletes nothing, and --delete that removes exactly those directories and soft-deletes
their MLflow runs. No Ray: a fake output root and a real sqlite MLflow store."""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from vgmedgen.model.vgmedgen import MODEL_CARD
from vgmedgen.platform.clean import (
    CleanError,
    apply_clean,
    format_plan,
    open_tracker,
    plan_clean,
    read_sweep,
)
from vgmedgen.platform.config import ExperimentConfig, load_experiment
from vgmedgen.platform.runs import write_done
from vgmedgen.platform.tracking import RUN_KEY_TAG, Tracker

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
DAY = 24 * 3600
_names = itertools.count()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite MLflow store for the module (creating one costs seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('clean-mlflow') / 'mlflow.db'}"


def _overrides(root: Path, name: str, store: str) -> list[str]:
    return [f"output_root={root}", f"name={name}", f"tracking.uri={store}"]


def _age(path: Path, seconds: float) -> None:
    """Set the mtime of ``path`` and everything in it to ``seconds`` ago."""
    t = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (t, t))


def _run_dir(root: Path, name: str, *, done: bool = True, size: int = 1000) -> Path:
    d = root / "runs" / name
    (d / "checkpoint_000001").mkdir(parents=True)
    (d / "checkpoint_000001" / "model.safetensors").write_bytes(b"\0" * size)
    if done:
        write_done(d, {"metrics": {"loss": 0.5}})
    return d


def _card(root: Path, experiment: str, version: str, stages: list[dict], train_run_id: str | None) -> None:
    """A model version directory with a card naming its stage runs (the front matter the train job writes)."""
    d = root / "models" / experiment / version
    d.mkdir(parents=True)
    facts = {"version": version, "experiment": experiment, "train_run_id": train_run_id, "stages": stages}
    front = yaml.safe_dump({"license": "other", "vgmedgen": facts})
    (d / MODEL_CARD).write_text(f"---\n{front}---\n\n# VG-MedGen model version `{version}`\n")


def _sweep(
    root: Path, key: str, status: str, stage_runs: list[str], trials: list[dict] | None = None
) -> None:
    d = root / "sweeps" / key
    d.mkdir(parents=True)
    body = {"name": key, "key": key, "status": status, "stage_runs": stage_runs, "trials": trials or []}
    (d / "sweep.json").write_text(json.dumps(body))


def _mlflow_run(tracker: Tracker, key: str, parent: str | None, status: str = "FINISHED") -> str:
    """A stage run that started and (unless RUNNING) ended three days ago."""
    tags = {RUN_KEY_TAG: key, **({"mlflow.parentRunId": parent} if parent else {})}
    then = int((time.time() - 3 * DAY) * 1000)
    run_id = tracker.client.create_run(tracker.experiment_id, then, tags, run_name=key).info.run_id
    if status != "RUNNING":
        tracker.client.set_terminated(run_id, status=status, end_time=then + 1000)
    return run_id


@dataclass
class Scene:
    cfg: ExperimentConfig
    tracker: Tracker
    overrides: list[str]
    runs: dict[str, str]  # role -> run directory name (or run key)
    ids: dict[str, str]  # role -> MLflow run id

    @property
    def root(self) -> Path:
        return self.cfg.root

    def exists(self, role: str) -> bool:
        return (self.root / "runs" / self.runs[role]).is_dir()

    def lifecycle(self, role: str) -> str:
        return self.tracker.client.get_run(self.ids[role]).info.lifecycle_stage


@pytest.fixture()
def scene(tmp_path: Path, store: str) -> Scene:
    """An output root with every kind of run:

    - visual + align named by the card of a registered version (kept); dit of it only via its MLflow child run;
    - dit named by an unfinished sweep (kept), dit named by a finished sweep and by an unregistered version's
      card (candidate);
    - the visual run moved aside by --fresh (candidate), an old unfinished run (candidate), a recent unfinished
      run (kept), an old unfinished run whose MLflow run is RUNNING (kept);
    - a run named only in the run.<stage> tag of the unfinished sweep's trial run (kept);
    - an MLflow stage run whose directory is gone (candidate), and a run of another experiment (left alone).
    """
    name = f"cleantest{next(_names)}"
    root = tmp_path / "out"
    overrides = _overrides(root, name, store)
    cfg = load_experiment(TINY, overrides)
    tracker = Tracker(cfg.tracking, cfg.root, cfg.name)
    runs = {
        "registered_visual": f"{name}-visual-aaaaaaaaaaaa",
        "registered_align": f"{name}-align-bbbbbbbbbbbb",
        "registered_dit": f"{name}-dit-bbbbbbbbbbbb",
        "sweep_running": f"{name}-dit-cccccccccccc",
        "sweep_finished": f"{name}-dit-dddddddddddd",
        "aside": f"{name}-visual-aaaaaaaaaaaa.old-20260101-120000",
        "unfinished_old": f"{name}-align-eeeeeeeeeeee",
        "unfinished_recent": f"{name}-dit-ffffffffffff",
        "mlflow_running": f"{name}-dit-000000000000",
        "trial_tagged": f"{name}-align-777777777777",
        "orphan": f"{name}-visual-999999999999",
        "other_experiment": "someone-else-visual-111111111111",
    }
    for role in runs:
        if role != "orphan":
            _run_dir(root, runs[role], done=not role.startswith(("unfinished", "mlflow_running")))

    ids = {}
    with tracker.open_run(key=f"{name}-job-123456789abc", name="train", tags={"job": "train"}) as parent:
        ids["parent"] = parent
        tracker.client.set_tag(parent, "model_version", "v0000000001")
        for role in ("registered_visual", "registered_align", "registered_dit"):
            ids[role] = _mlflow_run(tracker, runs[role], parent)
    tracker.register(parent, "model_version")
    with tracker.open_run(key=f"{name}-job-old000000000", name="train", tags={"job": "train"}) as old_parent:
        for role in ("sweep_running", "sweep_finished", "aside", "unfinished_old", "orphan"):
            ids[role] = _mlflow_run(tracker, runs[role], old_parent)
    ids["mlflow_running"] = _mlflow_run(tracker, runs["mlflow_running"], None, status="RUNNING")

    # The registered version's card names visual and align; dit is found through its MLflow parent.
    stages = [
        {"stage": s, "run": runs[f"registered_{s}"], "mlflow_run_id": None} for s in ("visual", "align")
    ]
    _card(root, name, "v0000000001", stages, parent)
    # A version on disk that was never registered: its card protects nothing.
    _card(root, name, "v0000000002", [{"stage": "dit", "run": runs["sweep_finished"]}], None)
    # A trial of the unfinished sweep names a run only through its MLflow run's run.<stage> tags.
    trial = _mlflow_run(tracker, f"sweep-a-trial-{name}", None)
    tracker.client.set_tag(trial, "run.align", runs["trial_tagged"])
    _sweep(root, "sweep-a", "running", [runs["sweep_running"]], [{"trial": "t0", "mlflow_run_id": trial}])
    _sweep(root, "sweep-b", "finished", [], [{"trial": "t0", "stage_runs": [runs["sweep_finished"]]}])

    for role in runs:
        if role not in ("orphan", "unfinished_recent"):
            _age(root / "runs" / runs[role], 3 * DAY)
    return Scene(cfg, tracker, overrides, runs, ids)


CANDIDATES = {"sweep_finished", "aside", "unfinished_old", "orphan"}
KEPT = {
    "registered_visual",
    "registered_align",
    "registered_dit",
    "sweep_running",
    "unfinished_recent",
    "mlflow_running",
    "trial_tagged",
}


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    import importlib.util

    from vgmedgen.platform.cli import run_job

    spec = importlib.util.spec_from_file_location("clean_job", REPO / "jobs" / "clean.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = run_job(module.main, argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_dry_run_lists_exactly_the_unreferenced_runs_with_reasons_and_deletes_nothing(
    scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = plan_clean(scene.cfg, scene.tracker)
    assert {e.name for e in plan.candidates} == {scene.runs[r] for r in CANDIDATES}
    assert {e.name for e in plan.kept} == {scene.runs[r] for r in KEPT}
    assert plan.others == 1 and plan.warnings == ()  # the other experiment's run is left alone

    why = {e.name: e.reason for e in (*plan.candidates, *plan.kept)}
    kind = {e.name: e.kind for e in plan.candidates}
    r = scene.runs
    assert why[r["registered_visual"]].startswith(f"registered: vgmedgen-{scene.cfg.name} v1")
    assert why[r["registered_dit"]].startswith("registered:")  # through the registered run's stage runs
    assert why[r["sweep_running"]] == why[r["trial_tagged"]] == "unfinished sweep sweep-a (running)"
    assert "less than --min-age-hours 24" in why[r["unfinished_recent"]]
    assert f"its MLflow run {scene.ids['mlflow_running']} is RUNNING" in why[r["mlflow_running"]]
    assert kind[r["aside"]] == "moved aside" and why[r["aside"]].startswith("moved aside by --fresh")
    assert kind[r["unfinished_old"]] == "unfinished"
    assert why[r["unfinished_old"]].startswith("unfinished (no DONE.json)")
    assert kind[r["sweep_finished"]] == "finished"
    assert "its model version v0000000002 is not registered" in why[r["sweep_finished"]]
    assert "named only by finished sweep sweep-b" in why[r["sweep_finished"]]
    assert kind[r["orphan"]] == "mlflow only" and "its run directory is gone" in why[r["orphan"]]
    for e in plan.candidates:
        assert "no registered model version or unfinished sweep refers to it" in e.reason
        assert e.mlflow_run_ids == (scene.ids[next(k for k, v in r.items() if v == e.name)],)
    assert plan.reclaimable == sum(e.size for e in plan.candidates) > 3000  # three directories of 1000 B+

    rc, out, err = _main(["--config", str(TINY), *scene.overrides], capsys)
    assert rc == 0, err
    assert "why unreferenced" in out and "dry run: nothing deleted" in out
    assert (
        f"reclaimable: {format_plan(plan).split('reclaimable: ')[1].split(' in ')[0]} in 3 run directories"
        in out
    )
    for role in r:
        if role != "orphan":
            assert scene.exists(role), role
    assert all(scene.lifecycle(role) == "active" for role in scene.ids)


def test_delete_removes_exactly_the_candidates_and_soft_deletes_their_mlflow_runs(
    scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    locks = {
        role: scene.root / "runs" / f"{scene.runs[role]}.lock" for role in scene.runs if role != "orphan"
    }
    for lock in locks.values():  # the stage locks a sweep's trials leave beside the runs
        lock.touch()
    rc, out, err = _main(["--config", str(TINY), *scene.overrides, "--delete"], capsys)
    assert rc == 0, err
    assert {role for role, lock in locks.items() if not lock.exists()} == set(CANDIDATES) & set(locks)
    assert "deleted 4 runs" in out and "4 MLflow runs soft-deleted" in out
    assert f"mlflow gc --backend-store-uri {scene.tracker.uri} --run-ids " in out
    for role in scene.runs:
        if role != "orphan":
            assert scene.exists(role) == (role not in CANDIDATES), role
    for role in scene.ids:
        assert scene.lifecycle(role) == ("deleted" if role in CANDIDATES else "active"), role
    mv = scene.tracker.client.search_model_versions(f"name='vgmedgen-{scene.cfg.name}'")
    assert [m.run_id for m in mv] == [scene.ids["parent"]]  # the registered version and its train run stay

    again = plan_clean(scene.cfg, scene.tracker)  # a second pass finds nothing more
    assert again.candidates == () and {e.name for e in again.kept} == {scene.runs[r] for r in KEPT}


def test_a_recent_run_is_kept_until_it_is_older_than_min_age_hours(scene: Scene) -> None:
    recent = scene.runs["unfinished_recent"]
    assert recent in {e.name for e in plan_clean(scene.cfg, scene.tracker, 24).kept}
    assert recent in {e.name for e in plan_clean(scene.cfg, scene.tracker, 0).candidates}
    # a registered run stays whatever its age
    assert scene.runs["registered_visual"] in {e.name for e in plan_clean(scene.cfg, scene.tracker, 0).kept}
    # a finished run just written is kept too: the job that wrote it may still assemble it
    _age(scene.root / "runs" / scene.runs["aside"], 60)
    assert scene.runs["aside"] in {e.name for e in plan_clean(scene.cfg, scene.tracker).kept}


def test_a_run_that_changes_after_the_plan_is_not_deleted(scene: Scene) -> None:
    plan = plan_clean(scene.cfg, scene.tracker)
    old = scene.root / "runs" / scene.runs["unfinished_old"]
    (old / "checkpoint_000002").mkdir()  # a resubmitted job resumes it meanwhile
    report = apply_clean(plan, scene.tracker)
    assert report.skipped == [
        (old.name, "its directory changed since the plan was made (a job may be using it again)")
    ]
    assert old.is_dir() and scene.lifecycle("unfinished_old") == "active"
    assert {e.name for e in report.deleted} == {scene.runs[r] for r in CANDIDATES - {"unfinished_old"}}
    assert report.failed == [] and report.freed == sum(e.size for e in report.deleted)


def test_with_tracking_off_every_version_on_disk_counts_as_registered(scene: Scene) -> None:
    cfg = load_experiment(TINY, [*scene.overrides, "tracking.enabled=false"])
    assert open_tracker(cfg) is None
    plan = plan_clean(cfg, None)
    why = {e.name: e.reason for e in plan.kept}
    assert why[scene.runs["sweep_finished"]].startswith("model version v0000000002 (tracking off")
    assert scene.runs["registered_visual"] in why
    assert all(e.mlflow_run_ids == () for e in plan.candidates)
    with pytest.raises(ValueError, match="tracking store"):
        apply_clean(plan, scene.tracker)


def test_errors_name_the_problem_and_the_fix(
    tmp_path: Path, store: str, scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = _main(["--config", str(tmp_path / "nope.yaml")], capsys)
    assert rc == 2 and "nope.yaml does not exist" in err

    empty = _overrides(tmp_path / "empty", "cleantest-empty", store)
    rc, _, err = _main(["--config", str(TINY), *empty], capsys)
    assert rc == 2 and "no runs under" in err and "runs does not exist" in err and "output_root" in err

    other = [*scene.overrides[:1], "name=nobody", scene.overrides[2]]
    rc, _, err = _main(["--config", str(TINY), *other], capsys)
    assert (
        rc == 2
        and "no runs of experiment 'nobody'" in err
        and f"runs of {scene.cfg.name}, someone-else" in err
    )

    default_store = [*scene.overrides[:2]]  # the default store <output_root>/mlflow.db does not exist here
    rc, _, err = _main(["--config", str(TINY), *default_store], capsys)
    assert rc == 2 and "no MLflow store at" in err and "tracking.enabled=false" in err
    assert not (scene.root / "mlflow.db").exists()  # clean never creates a store

    rc, _, err = _main(["--config", str(TINY), *scene.overrides, "--min-age-hours", "-1"], capsys)
    assert rc == 2 and "--min-age-hours must be 0 or more" in err

    (scene.root / "sweeps" / "sweep-a" / "sweep.json").write_text("{not json")
    with pytest.raises(CleanError, match="cannot read sweep file .*sweep-a.*delete .*sweep-a"):
        plan_clean(scene.cfg, scene.tracker)
    assert all(scene.exists(role) for role in scene.runs if role != "orphan")


def test_read_sweep_collects_the_runs_of_the_sweep_and_its_trials(tmp_path: Path) -> None:
    trials = [
        {"trial": "t0", "mlflow_run_id": "abc", "stage_runs": ["x-dit-000000000001"]},
        {"trial": "t1", "mlflow_run_id": None, "stage_runs": ["x-dit-000000000002", "x-visual-000000000000"]},
    ]
    _sweep(tmp_path, "k", "interrupted", ["x-visual-000000000000"], trials)
    s = read_sweep(tmp_path / "sweeps" / "k" / "sweep.json")
    assert s.stage_runs == ("x-visual-000000000000", "x-dit-000000000001", "x-dit-000000000002")
    assert s.trial_run_ids == ("abc",) and s.status == "interrupted" and not s.finished

    bad = tmp_path / "sweeps" / "k" / "sweep.json"
    bad.write_text(json.dumps({"status": "running", "stage_runs": "x-dit-000000000001"}))
    with pytest.raises(CleanError, match="'stage_runs' must be a list of run directory names"):
        read_sweep(bad)
    bad.write_text(json.dumps({"stage_runs": []}))
    with pytest.raises(CleanError, match="holds no sweep status"):
        read_sweep(bad)
