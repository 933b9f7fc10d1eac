"""MLflow tracking: one parent run per job, a nested run per stage, the model registry.

A job opens its runs only through :meth:`Tracker.open_run`, a context manager that ends the run
FINISHED when its block completes, KILLED when the block is interrupted (``KeyboardInterrupt``: Ctrl-C,
and SIGTERM, which :func:`vgmedgen.platform.cli.run_job` turns into
:class:`~vgmedgen.platform.cli.Terminated`) and FAILED when it raises anything else. A resubmitted job
finds its run by key and reopens it, so an interrupted run ends FINISHED once its job completes. Inside
:func:`ended_elsewhere_when`, a block that raises while its predicate holds leaves its run to the process that
ended its work (a sweep's driver ends the runs of the trials Ray Tune stopped).

The tracking URI comes from the config, else ``MLFLOW_TRACKING_URI``, else a sqlite store under the
output root with artifacts beside it (MLflow 3.17 refuses ``file:`` stores). For a multi-node
cluster, point ``tracking.uri`` at an MLflow server every node can reach. Workers log through
:class:`MetricsSink` (rank 0 only); everything else happens on the driver.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.config import TrackingConfig

if TYPE_CHECKING:
    from vgmedgen.platform.config import ExperimentConfig

__all__ = [
    "MetricsSink",
    "ModelRef",
    "ModelNotFoundError",
    "Tracker",
    "TrackingConfig",
    "blank_store_path",
    "ended_elsewhere_when",
    "flatten",
    "new_sqlite_store",
    "open_run",
    "resolve_model",
]

log = logging.getLogger(__name__)

RUN_KEY_TAG = "vgmedgen.run_key"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}} -> {"a.b": "1"}`` (MLflow params are flat strings of at most 6000 chars)."""
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def git_commit(repo: Path | None = None) -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=repo or Path(__file__).parent,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class MetricsSink:
    """Picklable logger for a worker: ``sink([(step, {name: value})])`` and ``sink.artifacts(paths)``."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def __call__(self, entries: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        """Log each ``(step, metrics)`` entry once: steps already in the run are skipped, so a worker that
        re-logs what a killed predecessor may or may not have logged never duplicates a step."""
        from mlflow.entities import Metric

        entries = [(int(step), values) for step, values in entries if values]
        if not entries:
            return
        client = self._client()
        common = sorted(set.intersection(*(set(values) for _, values in entries)))
        if common:
            logged = {m.step for m in client.get_metric_history(self.run_id, common[0])}
            entries = [(step, values) for step, values in entries if step not in logged]
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for step, values in entries for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's log_batch limit
            client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def artifacts(self, paths: Sequence[Path], artifact_path: str = "samples") -> None:
        client = self._client()
        for p in paths:
            client.log_artifact(self.run_id, str(p), artifact_path)


def blank_store_path() -> Path:
    """Where this machine keeps a blank MLflow store of the installed MLflow version (``$XDG_CACHE_HOME`` or
    ``~/.cache``, under ``vgmedgen/``)."""
    import mlflow

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vgmedgen"
    return cache / f"mlflow-{mlflow.__version__}-blank.db"


def new_sqlite_store(db: Path, default_artifacts: Path) -> bool:
    """Create the MLflow sqlite store ``db`` as a copy of a blank one (:func:`blank_store_path`, made once per
    MLflow version): MLflow builds a new store by running every schema migration since its first release,
    1.1-1.7 s on an idle 2-core host, 3-8 s on a busy one and 11 s inside a sweep job, against 0.05-0.1 s for
    the copy (benchmarks/mlflow_store.py). The copy's ``Default`` experiment keeps its artifacts in
    ``default_artifacts`` (MLflow would put them under the working directory's ``mlruns``). Making the blank
    store of a new MLflow version removes those of other versions (about 1 MB each).

    Returns False, leaving MLflow to create the store as usual, when the cache cannot be written or read.
    The copy takes its place atomically, so two processes opening the same new store at once both find it
    whole.
    """
    import shutil
    import sqlite3
    from contextlib import closing

    from mlflow.tracking import MlflowClient

    blank = blank_store_path()
    mine = db.with_name(f".{db.name}.{os.getpid()}.new")
    try:
        if not blank.is_file():
            blank.parent.mkdir(parents=True, exist_ok=True)
            scratch = blank.with_name(f".{blank.name}.{os.getpid()}.new")
            scratch.unlink(missing_ok=True)
            MlflowClient(f"sqlite:///{scratch}").search_experiments()  # MLflow creates and migrates it
            os.replace(scratch, blank)
            for old in blank.parent.glob("mlflow-*-blank.db"):
                if old != blank:  # another MLflow version's: a process copying it still reads its open file
                    old.unlink(missing_ok=True)
        shutil.copyfile(blank, mine)
        with closing(sqlite3.connect(mine)) as con, con:
            con.execute(
                "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                (default_artifacts.as_uri(),),
            )
        try:
            os.link(mine, db)  # fails if another process made the store first: then that one is used
        except FileExistsError:
            pass
        return True
    except Exception as exc:  # noqa: BLE001 -- a speed-up only: any failure leaves the store to MLflow
        log.info("MLflow creates %s itself (the blank store at %s is unusable: %s)", db, blank, exc)
        return False
    finally:
        mine.unlink(missing_ok=True)


class Tracker:
    """Driver-side MLflow access for one experiment."""

    def __init__(self, cfg: TrackingConfig, output_root: Path, experiment_name: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.root = output_root
        self.uri = (
            cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output_root / 'mlflow.db'}"
        )
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            if not db.exists():
                new_sqlite_store(db, output_root / "mlartifacts" / "Default")
        self.client = MlflowClient(self.uri)
        self.experiment_name = cfg.experiment or experiment_name
        self.model_name = cfg.registered_model or f"vgmedgen-{experiment_name}"
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:"):
                location = (output_root / "mlartifacts" / self.experiment_name).as_uri()
            self.experiment_id = self.client.create_experiment(
                self.experiment_name, artifact_location=location
            )
        else:
            self.experiment_id = exp.experiment_id
        self._mlflow = mlflow

    def ui_command(self) -> str:
        return f"mlflow ui --backend-store-uri {self.uri}"

    @contextmanager
    def open_run(
        self, key: str, name: str, parent_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[str]:
        """The run tagged with ``key`` (the existing one, reopened: resumed jobs reuse it; or a new one), open
        for the block and ended by how the block ends.

        Yields:
            The run id.

        The status is FINISHED when the block completes, KILLED when it is interrupted and FAILED on any other
        exception, which propagates. Interrupted: a ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM through
        :func:`vgmedgen.platform.cli.run_job`), or any exception once the job has been interrupted
        (:func:`vgmedgen.platform.cli.interrupt_signal`), such as the ``MlflowException`` SQLAlchemy leaves
        when the interrupt lands inside an MLflow call.
        """
        from vgmedgen.platform.cli import interrupt_signal

        run_id = self._reopen(key, name, parent_id, tags)
        _OPEN_RUNS[run_id] = self
        try:
            yield run_id
        except BaseException as exc:
            ended_elsewhere = _ENDED_ELSEWHERE.get()
            if ended_elsewhere is not None and ended_elsewhere():
                log.info("MLflow run %s: its work was ended from outside; its end is left to that", run_id)
            else:
                self._end(run_id, "FAILED" if interrupt_signal(exc) is None else "KILLED")
            raise
        finally:
            _OPEN_RUNS.pop(run_id, None)
        try:
            self.client.set_terminated(run_id, status="FINISHED")
        except BaseException as exc:
            if interrupt_signal(exc) is not None:  # interrupted while ending it: the block did complete
                self._end(run_id, "FINISHED")
            raise

    def find_run(self, key: str) -> str | None:
        """The id of the run tagged with ``key``, if any; its status is left as it is."""
        run = self._find(key)
        return run.info.run_id if run is not None else None

    def _find(self, key: str) -> Any:
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1
        )
        return found[0] if found else None

    def _reopen(self, key: str, name: str, parent_id: str | None, tags: Mapping[str, str] | None) -> str:
        run = self._find(key)
        if run is not None:
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        all_tags = {RUN_KEY_TAG: key, "git_commit": git_commit(), **(tags or {})}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        return self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id

    def _end(self, run_id: str, status: str) -> None:
        """End a run on the way out of a failed or interrupted block, never masking why the block ended."""
        try:
            self.client.set_terminated(run_id, status=status)
        except Exception as exc:  # an unreachable tracking server must not hide the job's own error
            log.warning("could not mark MLflow run %s %s: %s", run_id, status, exc)

    def end_running(self, filter_string: str, status: str) -> list[str]:
        """End the RUNNING runs that ``filter_string`` finds, and their RUNNING nested runs first, with ``status``;
        returns the ids ended. For runs whose process went without ending them. Never raises (as :meth:`_end`):
        it runs on the way out of an interrupt or error, which must go on out."""
        running = "attributes.status = 'RUNNING'"
        ended: list[str] = []
        try:
            for run in self.client.search_runs([self.experiment_id], f"{filter_string} and {running}"):
                run_id = run.info.run_id
                nested = f"tags.mlflow.parentRunId = '{run_id}' and {running}"
                for child in self.client.search_runs([self.experiment_id], nested):
                    self._end(child.info.run_id, status)
                    ended.append(child.info.run_id)
                self._end(run_id, status)
                ended.append(run_id)
        except Exception as exc:  # noqa: BLE001 -- an unreachable store must not hide why the job is leaving
            log.warning("could not end the MLflow runs found by %s (%s): %s", filter_string, status, exc)
        return ended

    def retire(self, key: str, new_key: str) -> None:
        """Re-tag the runs found by ``key`` with ``new_key``, so that :meth:`open_run` starts a new one for ``key``."""
        for run in self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'"
        ):
            self.client.set_tag(run.info.run_id, RUN_KEY_TAG, new_key)
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status="KILLED")

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        items = [Param(k, v) for k, v in flatten(params).items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def sink(self, run_id: str) -> MetricsSink:
        return MetricsSink(self.uri, run_id)

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def register(self, run_id: str, artifact_path: str, alias: str | None = None) -> str:
        """Register ``<run artifacts>/<artifact_path>`` (once per run) and point ``alias`` (default:
        ``tracking.alias``) at it; return the version."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(self.model_name)
        except MlflowException:
            pass  # already registered
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        existing = [
            mv
            for mv in self.client.search_model_versions(f"name='{self.model_name}' and run_id='{run_id}'")
            if mv.source == source
        ]
        mv = (
            existing[0]
            if existing
            else self.client.create_model_version(self.model_name, source, run_id=run_id)
        )
        self.client.set_registered_model_alias(self.model_name, alias or self.cfg.alias, mv.version)
        return str(mv.version)

    def version_by_alias(self, name: str, alias: str) -> Any:
        """The registry's model version ``name@alias`` (an MLflow ``ModelVersion``), or a clear error."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            known = ", ".join(sorted(m.name for m in self.client.search_registered_models())) or "none"
            raise ModelNotFoundError(
                f"No registered model version {name}@{alias} in {self.uri} ({exc.message}). Registered models: "
                f"{known}. Train one first (jobs/train.py registers <name>@{self.cfg.alias}), or give a directory."
            ) from None

    def download(self, source: str, into: Path | None = None) -> Path:
        """A local copy of a registered version's artifacts: a new temporary directory, or ``into`` (made
        once: a directory there with a manifest is returned as it is, the caller verifies it)."""
        if into is None:
            return Path(self._mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=self.uri))
        if (into / "manifest.json").is_file():
            return into
        import shutil
        import tempfile

        shutil.rmtree(into, ignore_errors=True)  # an unfinished copy
        into.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=into.parent, prefix=f".{into.name}-") as tmp:
            got = self._mlflow.artifacts.download_artifacts(
                artifact_uri=source, tracking_uri=self.uri, dst_path=tmp
            )
            Path(got).rename(into)  # whole or not at all
        return into

    def run_of_version(self, version: str) -> str | None:
        """The parent train run tagged with a model version's directory name, if this store has one."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.model_version = '{version}'", max_results=1
        )
        return runs[0].info.run_id if runs else None


REGISTRY_COPIES = "_registry"  # <output_root>/models/_registry/<name>-v<version>: registered versions, copied

# The runs open in this process (run id -> its tracker), for a job that must leave without unwinding.
_OPEN_RUNS: dict[str, Tracker] = {}

# Set by ended_elsewhere_when: whether a block unwinding now was ended by another process, which ends its run.
_ENDED_ELSEWHERE: ContextVar[Callable[[], bool] | None] = ContextVar("vgmedgen_ended_elsewhere", default=None)


@contextmanager
def ended_elsewhere_when(predicate: Callable[[], bool]) -> Iterator[None]:
    """Within the block (this thread), a run block that raises while ``predicate()`` is true leaves its run's
    status as it is, instead of ending it FAILED or KILLED.

    For work that another process stops and then ends the runs of: Ray Tune stops a trial ASHA cut short by
    ending its session, and the trial's thread unwinds later, while its actor shuts down; the sweep's driver
    gives the trial's runs their end (FINISHED, early-stopped; the dit stage KILLED), and a late FAILED from
    the unwinding thread would overwrite it.
    """
    token = _ENDED_ELSEWHERE.set(predicate)
    try:
        yield
    finally:
        _ENDED_ELSEWHERE.reset(token)


def end_open_runs(status: str = "KILLED") -> list[str]:
    """End every MLflow run this process holds open with ``status``; returns their ids. Used by the
    interrupt watchdog of :func:`vgmedgen.platform.cli.run_job` when a job does not stop on its own."""
    ended = []
    for run_id, tracker in list(_OPEN_RUNS.items()):
        tracker._end(run_id, status)
        _OPEN_RUNS.pop(run_id, None)
        ended.append(run_id)
    return ended


def open_run(
    tracker: Tracker | None,
    key: str,
    name: str,
    parent_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> AbstractContextManager[str | None]:
    """:meth:`Tracker.open_run` when tracking is on, else a block that yields None (no run)."""
    if tracker is None:
        return nullcontext(None)
    return tracker.open_run(key, name, parent_id, tags)


class ModelNotFoundError(FileNotFoundError):
    """A model reference names neither a model version directory nor a registered version."""


@dataclass(frozen=True)
class ModelRef:
    """A resolved, verified model version.

    Attributes:
        ref: what the user wrote (a directory or ``<name>@<alias>``).
        path: the local model version directory.
        id: the sha256 of its ``manifest.json``, which holds every file's sha256: its content identity.
        name: a short name for reports: ``<name>-v<N>`` for a registry reference, else the directory's name.
        run_id: the MLflow run that produced it, when the tracking store knows it.
    """

    ref: str
    path: Path
    id: str
    name: str
    run_id: str | None = None


def model_reference(value: str | None, cfg: ExperimentConfig, tracker: Tracker | None, field: str) -> str:
    """A job's model setting (``field``, e.g. ``generate.model``) or, when unset, the experiment's
    registered model at ``tracking.alias``; a clear error when it is unset and tracking is off."""
    if value is not None:
        return value
    if tracker is None:
        raise ConfigError(
            f"{field} is not set and tracking is off; set {field} to a model version directory "
            "or turn tracking on to use the registered model"
        )
    return f"{tracker.model_name}@{cfg.tracking.alias}"


def resolve_model(ref: str, cfg: ExperimentConfig, *, tracker: Tracker | None = None) -> ModelRef:
    """The one resolver of model references: a directory, or ``<name>@<alias>`` (``models:/`` optional)
    in the experiment's MLflow registry, to a verified :class:`ModelRef`.

    Every file of the version is checked against its manifest's hash before it is returned, so a
    half-copied or edited version fails here with the file it found wrong, not deep inside loading.

    Args:
        ref: the reference.
        cfg: the experiment (its tracking settings and output root locate the registry).
        tracker: an open :class:`Tracker` of ``cfg`` to reuse (one is opened when needed).
    """
    from vgmedgen.model.vgmedgen import ModelVersionError, verify_manifest
    from vgmedgen.platform.storage import file_digest

    path = Path(ref).expanduser()
    run_id: str | None = None
    if path.is_dir():
        name = path.name
    else:
        spec = ref.removeprefix("models:/")
        model_name, _, alias = spec.partition("@")
        if not alias or not model_name:
            raise ModelNotFoundError(
                f"model {ref!r}: no such model version directory, and not a registry reference '<name>@<alias>' "
                "(e.g. vgmedgen-demo@current)"
            )
        if tracker is None:
            if not cfg.tracking.enabled:
                raise ConfigError(
                    f"model {ref!r} is a registry reference, but tracking is disabled (tracking.enabled=false): "
                    "enable tracking or give the model version's directory"
                )
            tracker = Tracker(cfg.tracking, cfg.root, cfg.name)
        mv = tracker.version_by_alias(model_name, alias)
        run_id, name = mv.run_id, f"{model_name}-v{mv.version}"
        # Copied once under the output root, which every node of a cluster sees: actors of a Ray job load
        # the version from this path (a temporary directory would exist on the driver's node only).
        path = tracker.download(mv.source, cfg.root / "models" / REGISTRY_COPIES / name)
        try:
            verify_manifest(path)
        except ModelVersionError:  # a damaged copy: made again from the registry, then checked once more
            import shutil

            shutil.rmtree(path)
            path = tracker.download(mv.source, path)
    verify_manifest(path)
    if run_id is None and tracker is not None:
        run_id = tracker.run_of_version(path.name)
    return ModelRef(ref=ref, path=path, id=file_digest(path / "manifest.json"), name=name, run_id=run_id)
