"""The sweep driver: upstream stages first, then the trials under Ray Tune, then the final scoring, the
table and plots, ``best.yaml`` and the ``sweep-best`` registration.

Layout: everything of a sweep lies in ``<output_root>/sweeps/<sweep key>/`` (:func:`~vgmedgen.platform.runs.sweep_key`):
Tune's experiment state and trial directories, ``sweep.json`` (status, trials, the stage runs it uses:
what ``jobs/clean.py`` must keep while the sweep is unfinished), ``trials.csv``/``trials.md``, the plots
and ``best.yaml``. Running the same command again continues the sweep (``Tuner.restore``): finished
trials are not re-run, unfinished ones resume from their dit checkpoints, and every MLflow run is found
again by its key rather than opened anew.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.runs import stage_identity, sweep_key, trial_name
from vgmedgen.platform.storage import atomic_write_text
from vgmedgen.platform.tuning.config import Sweep
from vgmedgen.platform.tuning.report import TrialRow, live_table, write_plots, write_tables
from vgmedgen.platform.tuning.trial import (
    OBJECTIVE_KEY,
    TIME_ATTR,
    TrialContext,
    finished_trial,
    run_trial,
    train_upstream,
    trial_experiment,
    trial_stage_runs,
)

__all__ = ["SweepOutcome", "run_sweep", "upstream_paths", "BEST_ALIAS"]

log = logging.getLogger(__name__)

BEST_ALIAS = "sweep-best"
_UPSTREAM = ("visual", "align", "autoencoder")  # the autoencoder's identity is None-valued without one
_MAX_PRETRAINED = 16  # distinct upstream configurations trained before the trials; beyond, trials train them


@dataclass
class SweepOutcome:
    key: str
    directory: Path
    rows: list[TrialRow]
    best: TrialRow | None
    best_yaml: Path | None
    registered: str | None
    seconds: float
    artifacts: list[Path] = field(default_factory=list)
    comparison: list[Path] = field(default_factory=list)  # report.evaluate: comparison.csv/.md/.png


def upstream_paths(sweep: Sweep) -> list[str]:
    """The space paths that change what an upstream stage (visual, align, autoencoder) computes."""
    base = trial_experiment(sweep, {})
    ref = {s: stage_identity(base, s) for s in _UPSTREAM}
    found = []
    for path, dist in sweep.config.space.items():
        for value in dist.ends():
            cfg = trial_experiment(sweep, {path: value})
            if any(stage_identity(cfg, s) != ref[s] for s in _UPSTREAM):
                found.append(path)
                break
    return found


def _upstream_combinations(sweep: Sweep) -> list[dict[str, Any]] | None:
    """The distinct upstream configurations of the space (as value dicts), or None when they cannot be
    listed (a continuous upstream dimension, or too many): the trials then train them, under a lock."""
    paths = upstream_paths(sweep)
    dims = [sweep.config.space[p] for p in paths]
    if any(d.kind not in ("choice", "grid") for d in dims):
        return None
    distinct: dict[str, dict[str, Any]] = {}  # by upstream identity: variants may share their upstream stages
    for vals in itertools.product(*(d.ends() for d in dims)):
        combo = dict(zip(paths, vals))
        cfg = trial_experiment(sweep, combo)
        distinct.setdefault(json.dumps([stage_identity(cfg, s) for s in _UPSTREAM], sort_keys=True), combo)
    combos = list(distinct.values())
    return combos if len(combos) <= _MAX_PRETRAINED else None


def _identity(sweep: Sweep) -> dict[str, Any]:
    # The report is out of it: turning the report on for a finished sweep evaluates that sweep's trials.
    return {
        "sweep": sweep.config.model_dump(mode="json", exclude={"report"}),
        "base": sweep.base.model_dump(mode="json"),
    }


class _Sweep:
    """The state of one sweep run on the driver."""

    def __init__(self, sweep: Sweep, key: str, directory: Path, tracker: Any, parent: str | None) -> None:
        self.sweep, self.key, self.directory, self.tracker, self.parent = (
            sweep,
            key,
            directory,
            tracker,
            parent,
        )
        self.max_t = max(self._steps_values())
        self.rows: dict[str, TrialRow] = {}
        self.stage_runs: set[str] = set()
        self._printed = ""
        state = directory / "sweep.json"
        if state.is_file():  # a resumed sweep: what is known of its trials
            for t in json.loads(state.read_text()).get("trials", []):
                self.rows[t["trial"]] = TrialRow.from_json(t)

    def _steps_values(self) -> list[int]:
        dist = self.sweep.config.space.get("train.dit.steps")
        if dist is None:
            return [self.sweep.base.train.dit.steps]
        return [int(v) for v in dist.ends()]

    def row(self, trial: Any) -> TrialRow:
        values = dict(trial.config)
        name = trial_name(self.key, values)
        row = self.rows.get(name)
        if row is None:
            row = self.rows[name] = TrialRow(name, values)
        row.trial_id = trial.trial_id
        return row

    def update(self, trial: Any, result: Mapping[str, Any]) -> None:
        row = self.row(trial)
        row.state = "RUNNING"
        if OBJECTIVE_KEY in result and TIME_ATTR in result:
            row.record(int(result[TIME_ATTR]), float(result[OBJECTIVE_KEY]))
            self.save("running")  # the reports so far: what a restarted sweep tells its scheduler again
        self.show()

    def ended(self, trial: Any, status: str) -> None:
        row = self.row(trial)
        stopped = status == "FINISHED" and (row.step or 0) < self.max_t
        row.state = "STOPPED" if stopped else ("DONE" if status == "FINISHED" else "ERROR")
        self.settle(row)
        self.save("running")
        self.show(force=True)

    def settle(self, row: TrialRow) -> None:
        """Give the trial's MLflow runs the end its state says. A trial ASHA stopped is killed with its
        actor: its runs were left RUNNING, or FAILED when the stop unwound through the trial function
        first; it ends FINISHED with an ``early_stopped`` tag, its dit run KILLED. Called when a trial
        ends, and again for every trial once the Tuner is done (a stopped actor may unwind after the first)."""
        if self.tracker is None:
            return
        client = self.tracker.client
        run = row.mlflow_run_id or self.tracker.find_run(row.name)
        if run is None:
            return
        row.mlflow_run_id = run
        row.stage_runs.update(
            {k[4:]: v for k, v in client.get_run(run).data.tags.items() if k.startswith("run.")}
        )
        status = client.get_run(run).info.status
        if row.state == "STOPPED":
            note = f"ASHA at dit step {row.step}"
            client.set_tag(run, "early_stopped", note)
            if status != "FINISHED":
                client.set_terminated(run, status="FINISHED")
            dit = self.tracker.find_run(row.stage_runs.get("dit", ""))
            if dit is not None and client.get_run(dit).info.status in ("RUNNING", "FAILED"):
                client.set_tag(dit, "early_stopped", note)
                client.set_terminated(dit, status="KILLED")
        elif status == "RUNNING" and row.state in ("DONE", "ERROR"):
            client.set_terminated(run, status="FINISHED" if row.state == "DONE" else "FAILED")

    def end_unfinished(self, status: str) -> list[str]:
        """End this sweep's trial runs still RUNNING in MLflow, and their stage runs still RUNNING, with
        ``status`` (KILLED on an interrupt, FAILED on an error); returns the run ids ended.

        For the driver on its way out of Tune before its trials: Ray ends their actors with the job, and an
        actor ended so unwinds nothing, so no one else would end those runs. The same command continuing the
        sweep reopens them. A failure here is logged, never raised: the interrupt or error goes on out."""
        if self.tracker is None:
            return []
        return self.tracker.end_running(f"tags.sweep = '{self.key}'", status)

    def show(self, force: bool = False) -> None:
        text = live_table(
            list(self.rows.values()), self.sweep.config.objective.metric, self.sweep.config.trials, self.max_t
        )
        if force or text != self._printed:
            print(text, flush=True)
            self._printed = text

    def save(self, status: str) -> None:
        rows = sorted(self.rows.values(), key=lambda r: r.name)
        for r in rows:
            self.stage_runs.update(r.stage_runs.values())
        atomic_write_text(
            self.directory / "sweep.json",
            json.dumps(
                {
                    "name": self.sweep.name,
                    "key": self.key,
                    "status": status,
                    "sweep_file": str(self.sweep.path),
                    "stage_runs": sorted(self.stage_runs),
                    "trials": [r.to_json() for r in rows],
                },
                indent=2,
            ),
        )


def run_sweep(
    sweep: Sweep,
    *,
    address: str | None = None,
    fresh: bool = False,
) -> SweepOutcome:
    """Run (or continue) ``sweep``; see the module docstring.

    Args:
        sweep: the checked sweep (:func:`~vgmedgen.platform.tuning.config.load_sweep`).
        address: Ray cluster address (None: ``RAY_ADDRESS`` or a local instance).
        fresh: move an earlier run of the same sweep aside and start anew.
    """
    from ray import tune

    from vgmedgen.platform.cli import interrupt_signal
    from vgmedgen.platform.cluster import connect
    from vgmedgen.platform.prepare import prepare_records
    from vgmedgen.platform.tracking import RUN_KEY_TAG, Tracker, open_run
    from vgmedgen.platform.training.runner import check_real_records
    from vgmedgen.platform.tuning.hooks import InterruptAtStepEnd, SweepCallback, save_experiment_state
    from vgmedgen.platform.tuning.objective import prepare_objective
    from vgmedgen.platform.tuning.space import search_algorithm, tune_space

    t0 = time.perf_counter()
    base = trial_experiment(sweep, {})
    if "dit" not in base.train.stages:
        raise ConfigError(
            f"sweep {sweep.name}: the base experiment's train.stages {list(base.train.stages)} lack dit, the stage "
            "every trial reports its objective from; add dit (with train.init_from for the stages left out)"
        )
    connect(address, include_dashboard=True)  # Train inside Tune needs it (a stopped trial's placement group)
    prepare_records(base, address=address)
    check_real_records(base)
    key = sweep_key(sweep.name, _identity(sweep))
    storage = base.root / "sweeps"
    directory = storage / key
    tracker = Tracker(base.tracking, base.root, base.name) if base.tracking.enabled else None
    if fresh and directory.exists():
        aside = storage / f"{key}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        directory.rename(aside)
        print(f"--fresh: moved the earlier sweep to {aside}", flush=True)
        if tracker is not None:  # the sweep's parent run and its trial runs: new ones for the new sweep
            suffix = f".old-{time.strftime('%Y%m%d-%H%M%S')}"
            for run in tracker.client.search_runs([tracker.experiment_id], f"tags.sweep = '{key}'"):
                name = run.data.tags.get(RUN_KEY_TAG)
                if name:
                    tracker.retire(name, name + suffix)
            tracker.retire(key, key + suffix)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = sweep.config
    metric = cfg.objective.metric
    with open_run(tracker, key=key, name=f"{sweep.name}-sweep", tags={"job": "sweep"}) as parent:
        state = _Sweep(sweep, key, directory, tracker, parent)
        if tracker is not None:
            tracker.log_params(parent, {"sweep": cfg.model_dump(mode="json"), "sweep_file": str(sweep.path)})
        state.save("running")
        objective = prepare_objective(base, metric, cfg.objective.images, cfg.objective.seed, address=address)
        combos = _upstream_combinations(sweep)
        if combos is not None:  # the distinct upstream stages first, each once, then the trials fan out
            for combo in combos:
                _, results = train_upstream(trial_experiment(sweep, combo), tracker, parent)
                state.stage_runs.update(r.run_name for r in results)
        state.save("running")
        context = TrialContext(sweep.to_json(), key, parent, objective.to_json()).to_json()
        # The trial's driver reserves no CPU (its trainer's workers take their own placement group); Tune
        # refuses an empty request, so it asks for one byte of memory instead.
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, context=context), {"cpu": 0, "memory": 1}
        )
        space = tune_space(sweep)
        callback = SweepCallback(state)
        interrupts = InterruptAtStepEnd()
        if tune.Tuner.can_restore(str(directory)) and (directory / "tuner.pkl").is_file():
            print(f"[sweep] continuing {key}: finished trials are kept, unfinished ones resume", flush=True)
            tuner = tune.Tuner.restore(
                str(directory), trainable, resume_unfinished=True, resume_errored=True, param_space=space
            )
            history = {r.trial_id: r.history for r in state.rows.values() if r.trial_id and r.history}
            # Tuner.restore takes no scheduler, and the pickled one has lost its rungs: set a new one.
            scheduler = _scheduler(sweep, state.max_t, history)
            tuner._local_tuner._tune_config.scheduler = scheduler
        else:
            scheduler = _scheduler(sweep, state.max_t, {})
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric=OBJECTIVE_KEY,
                    mode=cfg.objective.direction,
                    search_alg=search_algorithm(sweep),
                    scheduler=scheduler,
                    num_samples=cfg.trials // cfg.grid_points,
                    max_concurrent_trials=cfg.concurrent_trials,
                    time_budget_s=cfg.time_budget_s,
                ),
                run_config=tune.RunConfig(
                    name=key, storage_path=str(storage), callbacks=[callback, interrupts], verbose=0
                ),
            )
        _set_callbacks(tuner, callback, interrupts)
        try:
            # An interrupt comes out between two of Tune's steps, never inside one, and ends the job as every
            # job's does (runs KILLED, exit 130 or 143); the same command continues the sweep.
            with interrupts:
                grid = tuner.fit()
        except BaseException as exc:
            # Interrupted (Ctrl-C, SIGTERM): Tune's state as it is now, so the same command does not run again
            # a trial that finished since Tune's last periodic write; the unfinished trials' runs end as the
            # job's own do.
            save_experiment_state(scheduler)
            state.end_unfinished("FAILED" if interrupt_signal(exc) is None else "KILLED")
            raise
        _rows_from_results(state, grid)
        rows = sorted(state.rows.values(), key=lambda r: r.name)
        for row in rows:
            state.settle(row)
        best = _final_scoring(sweep, state, objective, rows, tracker)
        outcome = SweepOutcome(key, directory, rows, best, None, None, 0.0)
        if best is not None:
            outcome.best_yaml, outcome.registered = _best(sweep, key, best, tracker, directory)
        if cfg.report.evaluate:
            from vgmedgen.platform.tuning.compare import compare_trials

            outcome.comparison = compare_trials(
                sweep, rows, tracker, parent, directory, lambda: state.save("reporting"), address=address
            )
        outcome.artifacts = write_tables(rows, directory, metric, best) + write_plots(
            rows, directory, metric, list(cfg.space)
        )
        state.save("finished")
        state.show(force=True)
        if tracker is not None:
            for path in outcome.artifacts:
                tracker.log_artifact(parent, path, "sweep")
            if best is not None and best.objective is not None:
                tracker.client.log_metric(parent, f"best_{metric}", best.objective)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def _scheduler(sweep: Sweep, max_t: int, history: Mapping[str, list[tuple[int, float]]]) -> Any:
    """ASHA in dit steps, told again what the trials reported before a restart (``history``: Tune trial id ->
    its reports); first in, first out for ``scheduler.kind: none``. Both keep Tune's controller (the driver
    saves Tune's state through it when interrupted)."""
    from vgmedgen.platform.tuning.hooks import ResumedASHA, SweepFIFO

    cfg = sweep.config.scheduler
    if cfg.kind == "none":
        return SweepFIFO()

    return ResumedASHA(
        history,
        time_attr=TIME_ATTR,
        # ASHA stops a trial that reaches max_t at once, before its dit stage has exported and marked itself
        # done: one step beyond the last lets every trial that survives the rungs finish on its own.
        max_t=max_t + 1,
        grace_period=min(cfg.grace_period, max_t),
        reduction_factor=cfg.reduction_factor,
    )


def _set_callbacks(tuner: Any, *callbacks: Any) -> None:
    """A restored Tuner keeps the run config it was pickled with; the driver's callbacks are this process's."""
    internal = tuner._local_tuner  # noqa: SLF001 -- Tuner.restore offers no way to pass callbacks
    run_config = internal.get_run_config()
    mine = {type(c) for c in callbacks}
    others = [c for c in (run_config.callbacks or []) if type(c) not in mine]
    run_config.callbacks = [*others, *callbacks]


def _rows_from_results(state: _Sweep, grid: Any) -> None:
    """Complete the rows from Tune's results (trials that ended in an earlier run of the sweep included)."""
    for result in grid:
        values = dict(result.config or {})
        if not values:
            continue
        name = trial_name(state.key, values)
        row = state.rows.get(name) or state.rows.setdefault(name, TrialRow(name, values))
        df = result.metrics_dataframe
        if df is not None and OBJECTIVE_KEY in df and TIME_ATTR in df:
            for step, value in zip(df[TIME_ATTR], df[OBJECTIVE_KEY]):
                if step == step and value == value:  # not NaN
                    row.record(int(step), float(value))
        if result.error is not None:
            row.state, row.error = "ERROR", str(result.error).splitlines()[0][:200]
        elif row.state in ("PENDING", "RUNNING"):
            row.state = "STOPPED" if (row.step or 0) < state.max_t else "DONE"
        if not row.stage_runs:  # tracking off (no tags to read them from), or a trial that never started
            row.stage_runs.update(trial_stage_runs(trial_experiment(state.sweep, values)))


def _final_scoring(
    sweep: Sweep, state: _Sweep, objective: Any, rows: list[TrialRow], tracker: Any
) -> TrialRow | None:
    """The best trial: the finished trials ranked by their last objective; the top ``objective.final_top``
    re-scored with ``objective.final_images`` images (KID and FD; FID with the Inception weights) and
    ranked by that instead when the objective is a distance."""
    from vgmedgen.platform.tuning.objective import SCORED_METRICS

    ocfg = sweep.config.objective
    sign = 1 if ocfg.direction == "min" else -1
    done = [r for r in rows if r.state == "DONE" and r.objective is not None]
    done.sort(key=lambda r: sign * r.objective)
    if not done:
        return None
    top = done[: ocfg.final_top]
    if ocfg.metric in SCORED_METRICS and top:
        for row in top:
            if ocfg.metric in row.final:  # scored when this sweep ended before (the same command run again)
                continue
            row.final = _score_trial(sweep, row, objective, ocfg.final_images)
            if tracker is not None and row.mlflow_run_id:
                for k, v in row.final.items():
                    tracker.client.log_metric(row.mlflow_run_id, f"final_{k}", v)
        top.sort(key=lambda r: sign * r.final[ocfg.metric])
        return top[0]
    return done[0]


def _trial_version(sweep: Sweep, row: TrialRow) -> tuple[Any, Path, list[Any]]:
    """A finished trial's experiment, its assembled model version and its stage results."""
    cfg = trial_experiment(sweep, row.values)
    version, results = finished_trial(cfg, row.name)
    return cfg, version, results


def _score_trial(sweep: Sweep, row: TrialRow, objective: Any, images: int) -> dict[str, float]:
    from vgmedgen.platform.generation.sample import generate_samples, load_model
    from vgmedgen.platform.generation.score import Scorer
    from vgmedgen.platform.tuning.objective import fixed_requests, score_images

    cfg, version, _ = _trial_version(sweep, row)
    print(f"[sweep] scoring trial {row.short} with {images} images ...", flush=True)
    scorer = Scorer(objective.assets_dir)
    requests, labels = fixed_requests(cfg.records_dir, images, objective.seed + 1_000_000)
    samples = generate_samples(load_model(version), requests, progress=True)
    return score_images(scorer, samples.images_uint8(), labels, objective.metric, objective.seed)


def _best(sweep: Sweep, key: str, best: TrialRow, tracker: Any, directory: Path) -> tuple[Path, str | None]:
    """Write ``best.yaml`` (the best trial's full resolved config) and register its model version as
    ``<model>@sweep-best`` (never ``current``)."""
    import yaml

    from vgmedgen.platform.modelcard import write_model_card

    cfg, version, results = _trial_version(sweep, best)
    data = cfg.model_dump(mode="json")
    data["output_root"] = str(cfg.root)  # the same root: jobs/train.py --config best.yaml finds the runs
    header = (
        f"# The best trial of sweep {sweep.name} ({key}): trial {best.short}, {sweep.config.objective.metric} "
        f"{best.objective:.6g} at dit step {best.step}.\n"
        f"# Its sampled values: {json.dumps(best.values)}\n"
        "# python jobs/train.py --config best.yaml reuses its finished runs; add --fresh to train them again.\n"
    )
    path = directory / "best.yaml"
    atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False))
    registered = None
    if tracker is not None and best.mlflow_run_id:
        run = best.mlflow_run_id
        card = write_model_card(version, cfg, results, train_run_id=run)
        if "model_version" not in {a.path for a in tracker.client.list_artifacts(run)}:
            tracker.log_artifacts(run, version, "model_version")
        tracker.client.set_tag(run, "model_version", version.name)
        number = tracker.register(run, "model_version", alias=BEST_ALIAS)
        registered = f"{tracker.model_name} v{number} @{BEST_ALIAS}"
        write_model_card(version, cfg, results, train_run_id=run, registered=registered)
        tracker.log_artifact(run, card, "model_version")
        tracker.log_artifact(run, path, "sweep")
    return path, registered
