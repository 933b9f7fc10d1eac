"""Find, and when asked delete, the stage runs of an experiment that nothing refers to (``jobs/clean.py``).

Sweeps multiply runs: every trial trains its own stages under ``<output_root>/runs/``, and ``--fresh`` moves
earlier runs aside as ``<run>.old-<timestamp>``. :func:`plan_clean` sorts the run directories of one
experiment (``<experiment>-<stage>-<hash12>``, see :mod:`vgmedgen.platform.runs`) into *candidates* and
*kept* runs, each with the reason; :func:`apply_clean` deletes the candidates' directories and soft-deletes
their MLflow stage runs (``mlflow gc`` removes those for good).

A run is kept when

- a **registered model version** refers to it: the version's model card (``MODEL_CARD.md`` of
  ``<output_root>/models/*/<version>/``, found through the registered run's ``model_version`` tag or the
  card's ``train_run_id``) names it among its stages, the registered run names it in a ``run.<stage>`` tag
  (a sweep trial's run), or its MLflow run is one of the registered run's stage runs (children) or named on
  that card. With tracking off there is no registry: every model version directory on disk then counts as
  registered;
- an **unfinished sweep** names it: ``<output_root>/sweeps/<key>/sweep.json`` with a status other than
  ``finished`` (its ``stage_runs``, its trials' ``stage_runs``, and the stage runs its trials' MLflow runs
  name in ``run.<stage>`` tags or have as children);
- it may be **in use**: its MLflow run, or its MLflow parent (the job that trained it), is ``RUNNING``, or
  anything in its directory changed within ``min_age_hours`` (a job in flight writes checkpoints there).

Everything else of the experiment is a candidate, including runs moved aside by ``--fresh``, unfinished
runs older than ``min_age_hours``, and MLflow stage runs whose directory is already gone. Train parent runs,
sweep trial runs, evaluation runs and the model versions themselves are never touched; neither are the runs
of other experiments that share the output root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from vgmedgen.model.configbase import ConfigError
from vgmedgen.model.vgmedgen import MODEL_CARD
from vgmedgen.platform.runs import DONE
from vgmedgen.platform.tracking import RUN_KEY_TAG
from vgmedgen.platform.training.config import STAGES

if TYPE_CHECKING:
    from vgmedgen.platform.config import ExperimentConfig
    from vgmedgen.platform.tracking import Tracker

__all__ = [
    "DEFAULT_MIN_AGE_HOURS",
    "CleanError",
    "CleanPlan",
    "CleanReport",
    "RunEntry",
    "SweepRefs",
    "apply_clean",
    "format_plan",
    "format_report",
    "open_tracker",
    "plan_clean",
    "read_sweep",
]

DEFAULT_MIN_AGE_HOURS = 24.0  # a run changed more recently than this may belong to a job in flight
SWEEP_FILE = "sweep.json"
FINISHED_SWEEP = "finished"
# The MLflow tags this module reads besides the run key (tracking.RUN_KEY_TAG): a stage run's parent, and
# the model version a train parent run assembled (set by the train job).
PARENT_TAG = "mlflow.parentRunId"
VERSION_TAG = "model_version"
STAGE_TAG_PREFIX = "run."  # a sweep trial's MLflow run: run.<stage> = the stage run directory it used

# A stage run directory: <experiment>-<stage>-<hash12>, or one moved aside by --fresh: <that>.old-<timestamp>.
STAGE_RUN = re.compile(
    rf"^(?P<run>(?P<experiment>.+)-(?P<stage>{'|'.join(STAGES)})-[0-9a-f]{{12}})(?P<aside>\.old-.+)?$"
)


class CleanError(ConfigError):
    """What the clean job cannot work with (no runs under the output root, an unreadable sweep file, a
    tracking store that knows none of the runs); the message says what and how to fix it. A
    :class:`ConfigError`, so a job prints it as one line and exits with status 2."""


@dataclass(frozen=True)
class RunEntry:
    """One stage run of the experiment: a directory under ``<output_root>/runs``, or an MLflow run whose
    directory is gone.

    Attributes:
        name: the directory's name (for an MLflow-only entry, the run's run key).
        kind: ``finished`` (holds ``DONE.json``), ``unfinished``, ``moved aside`` (``--fresh``) or
            ``mlflow only`` (no directory).
        path: the directory, or None for an MLflow-only entry.
        size: bytes the directory holds on disk (0 without one).
        modified: when anything in the directory last changed (epoch seconds); for an MLflow-only entry, when
            its run ended or started.
        mlflow_run_ids: the MLflow stage runs whose run key is this name.
        mlflow_size: bytes of those runs' artifacts in a local artifact store (freed by ``mlflow gc``).
        reason: for a candidate, why nothing refers to it; for a kept run, what refers to it.
        stamp: the directory's own mtime (ns) when planned; :func:`apply_clean` skips a run that changed since.
    """

    name: str
    kind: str
    path: Path | None
    size: int
    modified: float
    mlflow_run_ids: tuple[str, ...] = ()
    mlflow_size: int = 0
    reason: str = ""
    stamp: int | None = None


@dataclass(frozen=True)
class CleanPlan:
    """What :func:`plan_clean` found: the candidates (to delete) and the kept runs, each with its reason.

    Attributes:
        root: the output root.
        experiment: the experiment whose runs were looked at.
        tracking_uri: the MLflow store asked, or None with tracking off.
        min_age_hours: runs changed more recently were kept.
        made_at: when the plan was made (epoch seconds); ages are counted from here.
        candidates: runs nothing refers to, by name.
        kept: runs something refers to, by name.
        others: entries under ``<root>/runs`` that are not this experiment's stage runs (left alone).
        warnings: what the plan could not establish (e.g. a registered version whose runs were not found).
    """

    root: Path
    experiment: str
    tracking_uri: str | None
    min_age_hours: float
    made_at: float
    candidates: tuple[RunEntry, ...]
    kept: tuple[RunEntry, ...]
    others: int = 0
    warnings: tuple[str, ...] = ()

    @property
    def reclaimable(self) -> int:
        """Bytes the candidates' directories hold."""
        return sum(e.size for e in self.candidates)

    @property
    def mlflow_reclaimable(self) -> int:
        """Bytes of the candidates' MLflow artifacts in a local store (freed by ``mlflow gc`` after deletion)."""
        return sum(e.mlflow_size for e in self.candidates)


@dataclass
class CleanReport:
    """What :func:`apply_clean` did.

    Attributes:
        deleted: the candidates whose directory (if any) and MLflow runs were deleted.
        mlflow_deleted: the MLflow run ids soft-deleted.
        skipped: ``(name, why)`` for candidates left alone (changed or gone since the plan).
        failed: ``(name, error)`` for candidates whose deletion failed.
        freed: bytes of the deleted directories.
        gc_command: the ``mlflow gc`` command that removes the soft-deleted runs for good, when there are any.
    """

    deleted: list[RunEntry] = field(default_factory=list)
    mlflow_deleted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    freed: int = 0
    gc_command: str | None = None


@dataclass(frozen=True)
class SweepRefs:
    """What one sweep's ``sweep.json`` refers to.

    Attributes:
        path: the file.
        name: the sweep's name.
        status: ``running``, ``finished``, ``failed`` or ``interrupted``; only ``finished`` is finished.
        stage_runs: every run directory name it or its trials name.
        trial_run_ids: its trials' MLflow runs.
    """

    path: Path
    name: str
    status: str
    stage_runs: tuple[str, ...]
    trial_run_ids: tuple[str, ...]

    @property
    def finished(self) -> bool:
        return self.status == FINISHED_SWEEP


# ---------------------------------------------------------------------------------------------
# Reading what refers to runs
# ---------------------------------------------------------------------------------------------


def _names(value: Any, what: str, path: Path) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CleanError(
            f"{path}: {what} must be a list of run directory names, got {value!r}. Fix or remove the file "
            f"(clean keeps every run until it can tell what each sweep refers to)."
        )
    return value


def read_sweep(path: Path) -> SweepRefs:
    """The references of one ``sweep.json``; a file that is not one raises :class:`CleanError` naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CleanError(
            f"cannot read sweep file {path} ({exc}); clean keeps every run until it can tell what each sweep "
            f"refers to: fix the file, or delete {path.parent} if that sweep is gone"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("status"), str):
        raise CleanError(
            f"{path} holds no sweep status (a mapping with 'status': running, finished, failed or interrupted); "
            f"fix the file, or delete {path.parent} if that sweep is gone"
        )
    trials = data.get("trials") or []
    if not isinstance(trials, list) or not all(isinstance(t, dict) for t in trials):
        raise CleanError(
            f"{path}: 'trials' must be a list of mappings, got {trials!r}; fix or remove the file"
        )
    runs = _names(data.get("stage_runs"), "'stage_runs'", path)
    ids = []
    for t in trials:
        runs += _names(t.get("stage_runs"), f"'stage_runs' of trial {t.get('trial')!r}", path)
        if isinstance(t.get("mlflow_run_id"), str):
            ids.append(t["mlflow_run_id"])
    return SweepRefs(
        path=path,
        name=str(data.get("name") or path.parent.name),
        status=data["status"],
        stage_runs=tuple(dict.fromkeys(runs)),
        trial_run_ids=tuple(dict.fromkeys(ids)),
    )


def _sweeps(root: Path) -> tuple[list[SweepRefs], list[str]]:
    """Every sweep under ``<root>/sweeps``, and warnings for sweep directories without a sweep file."""
    sweeps, warnings = [], []
    base = root / "sweeps"
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        if not d.is_dir() or d.name.startswith("."):
            continue
        if (d / SWEEP_FILE).is_file():
            sweeps.append(read_sweep(d / SWEEP_FILE))
        else:
            warnings.append(
                f"sweep directory {d} has no {SWEEP_FILE} (a sweep starting, or one from an older runner): the "
                "runs it may use are kept only while they are recent"
            )
    return sweeps, warnings


def _cards(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The model card facts of every model version directory under ``<root>/models`` (registry copies too)."""
    from vgmedgen.platform.modelcard import card_facts

    return [(p.parent, card_facts(p.parent)) for p in sorted((root / "models").glob(f"*/*/{MODEL_CARD}"))]


def _tree(path: Path) -> tuple[int, float]:
    """Bytes on disk under ``path`` and the newest mtime of it or anything in it (symlinks not followed)."""
    size, newest = 0, path.lstat().st_mtime
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                entries = list(it)
        except OSError:  # removed meanwhile, or unreadable: counted as far as it can be
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            newest = max(newest, st.st_mtime)
            size += getattr(st, "st_blocks", 0) * 512 or st.st_size
            if e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
    return size, newest


def _local_artifacts_size(uri: str | None) -> int:
    """Bytes of a run's artifacts when they lie in a local ``file:`` store, else 0 (unknown)."""
    if not uri or not uri.startswith("file:"):
        return 0
    path = Path(unquote(urlparse(uri).path))
    return _tree(path)[0] if path.is_dir() else 0


def _all_runs(tracker: Tracker) -> list[Any]:
    """Every active MLflow run of the tracker's experiment (all pages)."""
    runs: list[Any] = []
    token = None
    while True:
        page = tracker.client.search_runs([tracker.experiment_id], max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _registered_versions(tracker: Tracker) -> list[Any]:
    """Every model version in the store's registry (all registered models, all pages)."""
    versions: list[Any] = []
    token = None
    while True:
        page = tracker.client.search_model_versions(max_results=1000, page_token=token)
        versions += list(page)
        token = page.token
        if not token:
            return versions


class _References:
    """Run names and MLflow run ids that something refers to, each with the reasons."""

    def __init__(self, runs: Sequence[Any]) -> None:
        self.names: dict[str, list[str]] = defaultdict(list)
        self.ids: dict[str, list[str]] = defaultdict(list)
        self._by_id = {r.info.run_id: r for r in runs}
        self._children: dict[str, list[Any]] = defaultdict(list)
        for r in runs:
            if PARENT_TAG in r.data.tags:
                self._children[r.data.tags[PARENT_TAG]].append(r)

    def name(self, name: str, why: str) -> None:
        if why not in self.names[name]:
            self.names[name].append(why)

    def run_id(self, run_id: str, why: str, *, children: bool = False) -> int:
        """Refer to an MLflow run, its run key and the stage runs its ``run.<stage>`` tags name and, with
        ``children``, to its stage runs (the runs whose parent it is) and their run keys; returns how many
        stage run names that names."""
        found = [self._by_id[run_id]] if run_id in self._by_id else []
        if children:
            found += self._children.get(run_id, [])
        stage_runs = 0
        for rid in dict.fromkeys([run_id, *(r.info.run_id for r in found)]):
            if why not in self.ids[rid]:
                self.ids[rid].append(why)
        for r in found:
            # its own run key, and the stage runs a sweep trial's run names in its run.<stage> tags
            names = [r.data.tags.get(RUN_KEY_TAG)]
            names += [
                v for k, v in r.data.tags.items() if k.startswith(STAGE_TAG_PREFIX) and STAGE_RUN.match(v)
            ]
            for key in filter(None, names):
                self.name(key, why)
                stage_runs += bool(STAGE_RUN.match(key))
        return stage_runs


def _refer_registry(
    refs: _References,
    tracker: Tracker,
    cards: Sequence[tuple[Path, Mapping[str, Any]]],
    runs_by_id: Mapping[str, Any],
) -> list[str]:
    """Refer to the runs of every registered model version; returns warnings for versions whose runs of
    this experiment could not be found."""
    by_version: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    by_train_run: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for directory, facts in cards:
        by_version[directory.name].append(facts)
        if facts.get("train_run_id"):
            by_train_run[facts["train_run_id"]].append(facts)
    warnings = []
    for mv in _registered_versions(tracker):
        why = f"registered: {mv.name} v{mv.version}"
        run = runs_by_id.get(mv.run_id) if mv.run_id else None
        if run is None and mv.run_id:
            try:
                run = tracker.client.get_run(mv.run_id)  # a run of another experiment, or a deleted one
            except Exception:  # no such run any more: the card and children cannot be found through it
                run = None
        version = run.data.tags.get(VERSION_TAG) if run is not None else None
        facts = by_version.get(version or "", []) + by_train_run.get(mv.run_id or "", [])
        found = 0
        for f in facts:
            for stage in f.get("stages") or []:
                if stage.get("run"):
                    refs.name(stage["run"], why)
                    found += 1
                if stage.get("mlflow_run_id"):
                    found += refs.run_id(stage["mlflow_run_id"], why)
        if mv.run_id:
            found += refs.run_id(mv.run_id, why, children=True)
        ours = run is None or run.info.experiment_id == tracker.experiment_id
        if not found and ours:
            warnings.append(
                f"registered version {mv.name} v{mv.version} (MLflow run {mv.run_id}): no model card under "
                f"models/ names its stage runs and it has no stage runs in MLflow, so clean cannot tell which "
                "runs it was trained from"
            )
    return warnings


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def open_tracker(cfg: ExperimentConfig) -> Tracker | None:
    """The experiment's MLflow store, or None with tracking off.

    The default store (``<output_root>/mlflow.db``) must exist already: clean never creates one, and an
    output root without it holds runs no registry knows of.
    """
    if not cfg.tracking.enabled:
        return None
    from vgmedgen.platform.tracking import Tracker

    default = not (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))
    if default and not (cfg.root / "mlflow.db").is_file():
        raise CleanError(
            f"no MLflow store at {cfg.root / 'mlflow.db'}, so clean cannot tell which runs registered model "
            "versions use. Point clean at the store the jobs used (tracking.uri=... or MLFLOW_TRACKING_URI), "
            "or, if they ran with tracking off, pass tracking.enabled=false (every model version on disk then "
            "counts as registered)"
        )
    return Tracker(cfg.tracking, cfg.root, cfg.name)


def _scan_runs(runs_dir: Path, experiment: str) -> tuple[list[tuple[Path, re.Match[str]]], int, set[str]]:
    """This experiment's run directories, the number of other entries, and the experiments those belong to."""
    ours, others, experiments = [], 0, set()
    for p in sorted(runs_dir.iterdir()):
        m = STAGE_RUN.match(p.name)
        if m and m["experiment"] == experiment and p.is_dir() and not p.is_symlink():
            ours.append((p, m))
        else:
            others += 1
            if m:
                experiments.add(m["experiment"])
    return ours, others, experiments


def plan_clean(
    cfg: ExperimentConfig,
    tracker: Tracker | None,
    min_age_hours: float = DEFAULT_MIN_AGE_HOURS,
    *,
    now: float | None = None,
) -> CleanPlan:
    """Sort the experiment's stage runs into candidates and kept runs (see the module docstring). Deletes nothing.

    Args:
        cfg: the experiment (its output root and name).
        tracker: its MLflow store (:func:`open_tracker`), or None with tracking off.
        min_age_hours: a run whose directory changed more recently is kept (a job may be writing it).
        now: the time ages are counted from (epoch seconds; default: now).

    Raises:
        CleanError: no run directory of the experiment under the output root, a sweep file that cannot be
            read, or a tracking store that knows no run of the experiment while its run directories exist.
    """
    if min_age_hours < 0:
        raise CleanError(f"--min-age-hours must be 0 or more, got {min_age_hours:g}")
    now = time.time() if now is None else now
    root = cfg.root
    runs_dir = root / "runs"
    if not runs_dir.is_dir():
        raise CleanError(
            f"no runs under {root}: {runs_dir} does not exist. Is the output root right? It comes from "
            "output_root=... on the command line, else $VGMEDGEN_OUTPUT_ROOT, else the config's output_root "
            "(else ~/vgmedgen)"
        )
    ours, others, experiments = _scan_runs(runs_dir, cfg.name)
    if not ours:
        found = (
            f"it holds runs of {', '.join(sorted(experiments))}" if experiments else "it holds no stage runs"
        )
        raise CleanError(
            f"no runs of experiment {cfg.name!r} under {runs_dir} ({found}); give the config of the experiment "
            "to clean (its name= decides which runs are looked at), or the right output_root=..."
        )

    mlflow_runs = _all_runs(tracker) if tracker is not None else []
    if tracker is not None and not mlflow_runs:
        raise CleanError(
            f"the MLflow store {tracker.uri} has no runs of experiment {tracker.experiment_name!r}, but {runs_dir} "
            f"holds {len(ours)} of its run directories: is this the store the jobs used? Set tracking.uri=... "
            "(or MLFLOW_TRACKING_URI) to it, or pass tracking.enabled=false if they ran with tracking off"
        )
    runs_by_id = {r.info.run_id: r for r in mlflow_runs}
    runs_by_key: dict[str, list[Any]] = defaultdict(list)
    for r in mlflow_runs:
        if RUN_KEY_TAG in r.data.tags:
            runs_by_key[r.data.tags[RUN_KEY_TAG]].append(r)

    refs = _References(mlflow_runs)
    warnings: list[str] = []
    cards = _cards(root)
    # (a) registered model versions
    if tracker is not None:
        warnings += _refer_registry(refs, tracker, cards, runs_by_id)
    else:
        for directory, facts in cards:
            for stage in facts.get("stages") or []:
                if stage.get("run"):
                    refs.name(
                        stage["run"], f"model version {directory.name} (tracking off: every version counts)"
                    )
    registered_names = set(refs.names)
    # (b) unfinished sweeps; finished ones are only noted, for the candidates' reasons
    sweeps, sweep_warnings = _sweeps(root)
    warnings += sweep_warnings
    finished_sweeps: dict[str, list[str]] = defaultdict(list)
    for s in sweeps:
        if s.finished:
            for name in s.stage_runs:
                finished_sweeps[name].append(s.name)
            continue
        why = f"unfinished sweep {s.name} ({s.status})"
        for name in s.stage_runs:
            refs.name(name, why)
        for run_id in s.trial_run_ids:
            refs.run_id(run_id, why, children=True)
    unregistered_cards: dict[str, list[str]] = defaultdict(list)
    for directory, facts in cards:
        for stage in facts.get("stages") or []:
            if stage.get("run") and stage["run"] not in registered_names:
                unregistered_cards[stage["run"]].append(directory.name)
    protected_ids = set(refs.ids)

    def in_use(name: str, modified: float) -> list[str]:
        """(c) why the run may belong to a job in flight."""
        why = []
        for r in runs_by_key.get(name, []):
            if r.info.status == "RUNNING":
                why.append(f"its MLflow run {r.info.run_id} is RUNNING")
            parent = runs_by_id.get(r.data.tags.get(PARENT_TAG, ""))
            if parent is not None and parent.info.status == "RUNNING":
                why.append(f"the job that trained it is running (MLflow run {parent.info.run_id} is RUNNING)")
        age_h = (now - modified) / 3600
        if age_h < min_age_hours:
            why.append(f"changed {_age(now - modified)} ago (less than --min-age-hours {min_age_hours:g})")
        return why

    def entry(
        name: str, kind: str, path: Path | None, size: int, modified: float, stamp: int | None
    ) -> tuple[RunEntry, bool]:
        """The run's entry, and whether it is kept."""
        ids = tuple(r.info.run_id for r in runs_by_key.get(name, []) if r.info.run_id not in protected_ids)
        kept = refs.names.get(name, []) + in_use(name, modified)
        if kept:
            reason = "; ".join(dict.fromkeys(kept))
        else:
            facts = []
            if kind == "moved aside":
                facts.append("moved aside by --fresh")
            elif kind == "unfinished":
                facts.append("unfinished (no DONE.json)")
            elif kind == "mlflow only":
                facts.append("its run directory is gone")
            if unregistered_cards.get(name):
                facts.append(f"its model version {', '.join(unregistered_cards[name])} is not registered")
            if finished_sweeps.get(name):
                facts.append(f"named only by finished sweep {', '.join(finished_sweeps[name])}")
            facts.append("no registered model version or unfinished sweep refers to it")
            reason = "; ".join(facts)
        mlflow_size = (
            sum(_local_artifacts_size(runs_by_id[i].info.artifact_uri) for i in ids) if not kept else 0
        )
        return RunEntry(name, kind, path, size, modified, ids, mlflow_size, reason, stamp), bool(kept)

    candidates, kept = [], []
    for path, m in ours:
        size, modified = _tree(path)
        kind = "moved aside" if m["aside"] else ("finished" if (path / DONE).is_file() else "unfinished")
        e, keep = entry(path.name, kind, path, size, modified, path.stat().st_mtime_ns)
        (kept if keep else candidates).append(e)
    on_disk = {p.name for p, _ in ours}
    for key, found in sorted(runs_by_key.items()):
        m = STAGE_RUN.match(key)
        if key in on_disk or not m or m["experiment"] != cfg.name:
            continue
        times = [(r.info.end_time or r.info.start_time or 0) / 1000 for r in found]
        e, keep = entry(key, "mlflow only", None, 0, max(times), None)
        (kept if keep else candidates).append(e)
    return CleanPlan(
        root=root,
        experiment=cfg.name,
        tracking_uri=tracker.uri if tracker is not None else None,
        min_age_hours=min_age_hours,
        made_at=now,
        candidates=tuple(candidates),
        kept=tuple(kept),
        others=others,
        warnings=tuple(warnings),
    )


# ---------------------------------------------------------------------------------------------
# Applying it
# ---------------------------------------------------------------------------------------------


def _changed(e: RunEntry) -> str | None:
    """Why a planned candidate must be left alone now, or None."""
    if e.path is None:
        return None
    if not e.path.exists():
        return "its directory is already gone"
    if e.stamp is not None and e.path.stat().st_mtime_ns != e.stamp:
        return "its directory changed since the plan was made (a job may be using it again)"
    return None


def apply_clean(plan: CleanPlan, tracker: Tracker | None) -> CleanReport:
    """Delete the plan's candidates: each directory (``shutil.rmtree``), then its MLflow stage runs
    (``client.delete_run``, a soft delete: ``mlflow gc`` removes them and their artifacts for good).

    A candidate whose directory changed or vanished since the plan is skipped; a failed deletion is recorded
    and the others go on.

    Args:
        plan: from :func:`plan_clean`.
        tracker: the same store the plan was made with (None with tracking off).
    """
    uri = tracker.uri if tracker is not None else None
    if uri != plan.tracking_uri:
        raise ValueError(f"the plan was made with tracking store {plan.tracking_uri}, not {uri}")
    report = CleanReport()
    for e in plan.candidates:
        why = _changed(e)
        if why is not None:
            report.skipped.append((e.name, why))
            continue
        try:
            if e.path is not None:
                shutil.rmtree(e.path)
                report.freed += e.size
                # the stage lock sweeps' trials take beside a run (<run>.lock) goes with it
                e.path.with_name(e.path.name + ".lock").unlink(missing_ok=True)
            for run_id in e.mlflow_run_ids if tracker is not None else ():  # ids only come with a tracker
                tracker.client.delete_run(run_id)
                report.mlflow_deleted.append(run_id)
        except Exception as exc:  # a permission error, a store gone away: the others still go
            report.failed.append((e.name, f"{type(exc).__name__}: {exc}"))
            continue
        report.deleted.append(e)
    if report.mlflow_deleted and tracker is not None:
        report.gc_command = (
            f"mlflow gc --backend-store-uri {tracker.uri} --run-ids {','.join(report.mlflow_deleted)}"
        )
    return report


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _age(seconds: float) -> str:
    hours = max(seconds, 0) / 3600
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} d"


def _table(rows: Iterable[Sequence[str]], header: Sequence[str]) -> Iterator[str]:
    rows = [list(header), *map(list, rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        yield "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()


def format_plan(plan: CleanPlan, *, delete: bool = False) -> str:
    """The plan as the job prints it: candidates, kept runs, warnings and the totals."""
    lines = [f"runs of experiment {plan.experiment!r} under {plan.root / 'runs'}", ""]
    if plan.candidates:
        lines.append(f"unreferenced ({len(plan.candidates)}):")
        rows = [
            (
                e.name,
                e.kind,
                _size(e.size),
                _age(plan.made_at - e.modified),
                ",".join(i[:8] for i in e.mlflow_run_ids) or "-",
                e.reason,
            )
            for e in plan.candidates
        ]
        lines += [
            "  " + r for r in _table(rows, ("run", "kind", "size", "age", "MLflow", "why unreferenced"))
        ]
    else:
        lines.append("unreferenced: none")
    lines.append("")
    if plan.kept:
        lines.append(f"kept ({len(plan.kept)}):")
        rows = [(e.name, _size(e.size), _age(plan.made_at - e.modified), e.reason) for e in plan.kept]
        lines += ["  " + r for r in _table(rows, ("run", "size", "age", "why kept"))]
        lines.append("")
    if plan.others:
        lines.append(
            f"{plan.others} other {'entry' if plan.others == 1 else 'entries'} under runs/ (other experiments, "
            "not stage runs) left alone"
        )
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    mlflow = sum(len(e.mlflow_run_ids) for e in plan.candidates)
    directories = sum(e.path is not None for e in plan.candidates)
    total = f"reclaimable: {_size(plan.reclaimable)} in {directories} run directories"
    if mlflow:
        total += f", and {mlflow} MLflow runs"
        if plan.mlflow_reclaimable:
            total += f" ({_size(plan.mlflow_reclaimable)} of artifacts, freed by `mlflow gc` once deleted)"
    lines.append(total)
    if not delete and plan.candidates:
        lines.append(
            "dry run: nothing deleted; run again with --delete to delete the runs listed as unreferenced"
        )
    return "\n".join(lines)


def format_report(report: CleanReport) -> str:
    """What :func:`apply_clean` did, as the job prints it."""
    lines = []
    for e in report.deleted:
        what = [f"directory ({_size(e.size)})"] if e.path is not None else []
        what += [f"MLflow run {i}" for i in e.mlflow_run_ids]
        lines.append(f"deleted {e.name}: {', '.join(what)}")
    lines += [f"skipped {name}: {why}" for name, why in report.skipped]
    lines += [f"FAILED {name}: {error}" for name, error in report.failed]
    lines.append(
        f"deleted {len(report.deleted)} runs, freed {_size(report.freed)}; "
        f"{len(report.mlflow_deleted)} MLflow runs soft-deleted"
    )
    if report.gc_command:
        lines.append(f"to remove the MLflow runs and their artifacts for good: {report.gc_command}")
    return "\n".join(lines)
