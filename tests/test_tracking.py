"""MLflow runs end by how the job ends: FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM (sqlite store)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from vgmedgen.platform.cli import Terminated, interrupt_signal, run_job
from vgmedgen.platform.tracking import Tracker, TrackingConfig, ended_elsewhere_when, open_run


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Tracker:
    # one sqlite store for the module (creating one costs seconds); every test uses its own run keys
    return Tracker(TrackingConfig(), tmp_path_factory.mktemp("mlflow"), "runs-test")


def _status(tracker: Tracker, run_id: str) -> str:
    return tracker.client.get_run(run_id).info.status


def test_a_block_that_completes_raises_or_is_interrupted_ends_its_run_so(tracker: Tracker) -> None:
    with tracker.open_run(key="ok", name="ok") as ok:
        assert _status(tracker, ok) == "RUNNING"
    assert _status(tracker, ok) == "FINISHED"

    with pytest.raises(ValueError, match="broken"), tracker.open_run(key="bad", name="bad") as bad:
        raise ValueError("broken")
    assert _status(tracker, bad) == "FAILED"

    with pytest.raises(KeyboardInterrupt), tracker.open_run(key="ctrl-c", name="ctrl-c") as killed:
        raise KeyboardInterrupt
    assert _status(tracker, killed) == "KILLED"

    # a nested (stage) run inside an interrupted parent: both end KILLED, the child with its parent id
    with pytest.raises(KeyboardInterrupt), tracker.open_run(key="parent", name="parent") as parent:
        with tracker.open_run(key="child", name="child", parent_id=parent) as child:
            raise KeyboardInterrupt
    assert _status(tracker, parent) == _status(tracker, child) == "KILLED"
    assert tracker.client.get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_a_resubmitted_job_reopens_its_interrupted_run_and_finishes_it(tracker: Tracker) -> None:
    with pytest.raises(KeyboardInterrupt), tracker.open_run(key="job", name="job") as first:
        tracker.sink(first)([(0, {"loss": 1.0})])
        raise KeyboardInterrupt
    assert _status(tracker, first) == "KILLED"
    assert tracker.find_run("job") == first and _status(tracker, first) == "KILLED"  # finding changes nothing
    with tracker.open_run(key="job", name="job") as again:
        assert again == first and _status(tracker, again) == "RUNNING"
        tracker.sink(again)([(0, {"loss": 1.0}), (1, {"loss": 0.5})])
    assert _status(tracker, first) == "FINISHED"
    assert [m.step for m in tracker.client.get_metric_history(first, "loss")] == [0, 1]
    assert tracker.find_run("never-opened") is None


def test_a_block_whose_work_was_ended_elsewhere_leaves_its_runs_as_that_ended_them(tracker: Tracker) -> None:
    """A sweep's trial that Ray Tune stopped: the driver ends its runs (FINISHED, the stage KILLED), then the
    trial's thread unwinds with an error as its actor shuts down; the late unwinding changes nothing."""
    stopped = False
    with pytest.raises(RuntimeError, match="controller died"), ended_elsewhere_when(lambda: stopped):
        with tracker.open_run(key="trial", name="trial") as trial:
            with tracker.open_run(key="trial-dit", name="dit", parent_id=trial) as dit:
                tracker.client.set_terminated(trial, status="FINISHED")  # the driver, on the stop
                tracker.client.set_terminated(dit, status="KILLED")
                stopped = True
                raise RuntimeError("controller died")
    assert (_status(tracker, trial), _status(tracker, dit)) == ("FINISHED", "KILLED")

    # not stopped: a trial's own error ends its runs FAILED as anywhere else
    with pytest.raises(ValueError), ended_elsewhere_when(lambda: False):
        with tracker.open_run(key="trial-error", name="trial-error") as failed:
            raise ValueError("diverged")
    assert _status(tracker, failed) == "FAILED"
    # and outside the block the predicate is gone
    with pytest.raises(ValueError), tracker.open_run(key="after", name="after") as after:
        stopped = True
        raise ValueError("after")
    assert _status(tracker, after) == "FAILED"


def test_without_tracking_the_block_runs_with_no_run() -> None:
    with open_run(None, key="k", name="n") as run_id:
        assert run_id is None


def test_sigterm_ends_the_jobs_run_killed_and_exits_143(tracker: Tracker, capsys) -> None:
    opened: list[str] = []

    def main(argv):
        with tracker.open_run(key="terminated", name="terminated") as run_id:
            opened.append(run_id)
            os.kill(os.getpid(), signal.SIGTERM)  # what `ray job stop`, Kubernetes and `kill` send
            time.sleep(10)  # interrupted at once by the handler run_job installs
        return 0

    before = signal.getsignal(signal.SIGTERM)
    t0 = time.monotonic()
    assert run_job(main, []) == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 5
    assert _status(tracker, opened[0]) == "KILLED"
    assert "interrupted (SIGTERM)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # the job's handler does not outlive the job

    def ctrl_c(argv):
        with tracker.open_run(key="interrupted", name="interrupted") as run_id:
            opened.append(run_id)
            raise KeyboardInterrupt

    assert run_job(ctrl_c, []) == 128 + signal.SIGINT
    assert _status(tracker, opened[1]) == "KILLED"
    assert isinstance(Terminated(), KeyboardInterrupt)


def test_an_interrupt_the_job_swallows_is_ended_by_the_watchdog(tracker: Tracker, tmp_path) -> None:
    """A job whose code swallows Ctrl-C (as a library catching KeyboardInterrupt might) still stops: the
    watchdog sees the signal arrive, and after the grace time prints every thread's stack, ends the open
    run KILLED and exits 130."""
    import subprocess
    import sys

    script = tmp_path / "stubborn_job.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from vgmedgen.platform.cli import exit_job, run_job\n"
        "from vgmedgen.platform.tracking import Tracker, TrackingConfig\n"
        f"tracker = Tracker(TrackingConfig(), Path({str(tracker.root)!r}), 'runs-test')\n"
        "def main(argv):\n"
        "    with tracker.open_run(key='stubborn', name='stubborn'):\n"
        "        while True:\n"
        "            try:  # the signal may land as soon as 'running' is out: inside the try, always\n"
        "                print('running', flush=True)\n"
        "                time.sleep(60)\n"
        "            except KeyboardInterrupt:\n"
        "                pass  # swallowed\n"
        "exit_job(run_job(main))\n"
    )
    env = {**os.environ, "VGMEDGEN_INTERRUPT_GRACE_S": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen = []
    while not seen or seen[-1].strip() != "running":  # MLflow may log a line or two first
        seen.append(proc.stdout.readline())
        assert seen[-1], "".join(seen)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert time.monotonic() - t0 < 30
    assert "interrupted (SIGINT): the job did not stop within 1 s" in out
    assert "stubborn_job.py" in out and "in main" in out  # the stack shows where it was
    assert _status(tracker, tracker.find_run("stubborn")) == "KILLED"


def test_an_interrupt_that_surfaces_as_another_exception_still_ends_the_job_interrupted(
    tracker: Tracker, capsys
) -> None:
    """SIGTERM landing inside a library call (SQLAlchemy inside an MLflow call) can come out of the job as the
    library's own error ("This transaction is closed"): the job still ends as interrupted, its run KILLED."""
    opened: list[str] = []

    def surfaced(argv):
        with tracker.open_run(key="surfaced", name="surfaced") as run_id:
            opened.append(run_id)
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)
            except KeyboardInterrupt:
                raise RuntimeError("This transaction is closed") from None  # as SQLAlchemy did
        return 0

    def swallowed(argv):  # the interrupt is swallowed; a later error no longer carries it in its chain
        with tracker.open_run(key="swallowed", name="swallowed") as run_id:
            opened.append(run_id)
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)
            except KeyboardInterrupt:
                pass
            raise FileNotFoundError("state.pt")  # a user error otherwise (exit 2)
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert run_job(surfaced, []) == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM); it surfaced as RuntimeError: This transaction is closed" in (
        capsys.readouterr().err
    )
    assert run_job(swallowed, []) == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM); it surfaced as FileNotFoundError" in capsys.readouterr().err
    assert [_status(tracker, r) for r in opened] == ["KILLED", "KILLED"]
    assert signal.getsignal(signal.SIGTERM) is before and interrupt_signal() is None

    def broken(argv):  # no signal: an error is the job's own, with its traceback
        with tracker.open_run(key="broken", name="broken") as run_id:
            opened.append(run_id)
            raise RuntimeError("This transaction is closed")

    with pytest.raises(RuntimeError, match="transaction is closed"):
        run_job(broken, [])
    assert _status(tracker, opened[-1]) == "FAILED"


def test_sigterm_inside_an_mlflow_transaction_ends_the_job_interrupted(tracker: Tracker, capsys) -> None:
    """The real case: SIGTERM lands as SQLAlchemy ends an MLflow write's transaction, and the interrupt comes
    out as ``MlflowException: This transaction is closed`` (MLflow 3.17, SQLAlchemy 2.1)."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    opened: list[str] = []
    ends = []

    def sigterm_at_the_second_transaction_end(*args) -> None:
        ends.append(1)
        if len(ends) == 2:  # the first is the read of the metric history, the second the write's
            os.kill(os.getpid(), signal.SIGTERM)

    def main(argv):
        with tracker.open_run(key="in-mlflow", name="in-mlflow") as run_id:
            opened.append(run_id)
            sink = tracker.sink(run_id)
            event.listen(Session, "after_transaction_end", sigterm_at_the_second_transaction_end)
            try:
                sink([(0, {"loss": 1.0})])
            finally:
                event.remove(Session, "after_transaction_end", sigterm_at_the_second_transaction_end)
        return 0

    assert run_job(main, []) == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM)" in capsys.readouterr().err
    assert _status(tracker, opened[0]) == "KILLED"


def test_a_new_sqlite_store_is_a_copy_of_one_blank_store_per_mlflow_version(tmp_path, monkeypatch) -> None:
    import mlflow

    from vgmedgen.platform.tracking import blank_store_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    older = tmp_path / "cache" / "vgmedgen" / "mlflow-0.9.0-blank.db"  # an earlier MLflow version's
    older.parent.mkdir(parents=True)
    older.write_bytes(b"")
    first = Tracker(TrackingConfig(), tmp_path / "a", "exp")
    blank = blank_store_path()
    assert (
        blank == tmp_path / "cache" / "vgmedgen" / f"mlflow-{mlflow.__version__}-blank.db" and blank.is_file()
    )
    assert sorted(p.name for p in blank.parent.iterdir()) == [blank.name]  # the older one removed
    second = Tracker(TrackingConfig(), tmp_path / "b", "exp")
    made = [t.client.get_experiment("0") for t in (first, second)]
    assert made[0].creation_time == made[1].creation_time  # both copies of the one blank store
    assert made[1].artifact_location == (tmp_path / "b" / "mlartifacts" / "Default").as_uri()
    with second.open_run("key", "a run") as run_id:
        second.client.log_metric(run_id, "loss", 0.5)
    assert second.client.get_run(run_id).data.metrics == {"loss": 0.5}
    assert [r.info.run_id for r in first.client.search_runs([first.experiment_id])] == []  # stores apart
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["mlflow.db"]  # no leftover of the copy


def test_an_unusable_blank_store_leaves_the_new_store_to_mlflow(tmp_path, monkeypatch) -> None:
    from vgmedgen.platform.tracking import new_sqlite_store

    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert not new_sqlite_store(tmp_path / "x" / "mlflow.db", tmp_path / "x" / "mlartifacts" / "Default")
    tracker = Tracker(TrackingConfig(), tmp_path / "root", "exp")  # MLflow makes it, as without the cache
    with tracker.open_run("key", "a run") as run_id:
        pass
    assert tracker.client.get_run(run_id).info.status == "FINISHED"
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["mlflow.db"]
