"""One sweep trial, as Ray Tune runs it: the trial's experiment, its upstream stages (reused), its dit stage
on its own TorchTrainer reporting the objective to Tune.

Ray 2.60 rejects ``Tuner(TorchTrainer)``: a trial is a function that builds its trainers itself. Only the
dit trainer reports to Tune (:class:`ObjectiveReport`), and every report it passes on carries the
objective (the last measured value carried forward) and ``dit_step``, ASHA's time attribute (Tune's
default counts reports, not steps). A trial's driver reserves no CPU (its workers take their own
placement group), or a trial plus its workers would ask for more CPUs than a small node has.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.config import ExperimentConfig
from vgmedgen.platform.runs import read_done, stage_run_name, trial_name
from vgmedgen.platform.training.runner import PARTS, StageResult, run_stage
from vgmedgen.platform.tuning.config import Sweep

__all__ = [
    "OBJECTIVE_KEY",
    "TIME_ATTR",
    "TrialContext",
    "run_trial",
    "stage_lock",
    "train_upstream",
    "trial_stage_runs",
    "trial_experiment",
]

TIME_ATTR = "dit_step"  # ASHA's time attribute: dit steps done
OBJECTIVE_KEY = "objective"  # what every report to Tune carries
_VAL_OBJECTIVE = "dit/val_objective"  # as the dit stage reports it


def trial_experiment(sweep: Sweep, values: Mapping[str, Any]) -> ExperimentConfig:
    """The full experiment of a trial: the base, the trial's values, and what the sweep fixes for every trial.

    The dit stage validates, logs and checkpoints every ``report_every`` steps (each report to Tune then
    carries a fresh objective, and a stopped trial keeps the checkpoint of its last report), and every
    stage trains on the sweep's resources.
    """
    cfg = sweep.config
    every = cfg.report_every
    res = cfg.resources
    fixed = {
        "train.dit.val_every": every,
        "train.dit.log_every": every,
        "train.dit.checkpoint_every": every,
        "train.scaling.num_workers": res.workers,
        "train.scaling.cpus_per_worker": res.cpus_per_worker,
        "train.scaling.use_gpu": res.gpus_per_worker > 0,
    }
    if res.gpus_per_worker > 0:
        fixed["train.scaling.gpus_per_worker"] = res.gpus_per_worker
    clash = sorted(set(values) & set(fixed))
    if clash:
        raise ConfigError(
            f"sweep {sweep.name}: {clash} are set by the sweep for every trial (report_every, resources); "
            "take them out of the space"
        )
    return sweep.experiment({**values, **fixed})


@contextlib.contextmanager
def stage_lock(cfg: ExperimentConfig, stage: str, inputs: Mapping[str, Path]) -> Iterator[None]:
    """Hold the stage run's lock file (``<root>/runs/<run>.lock``): concurrent trials that need the same
    upstream stage train it once, the others wait and then find it finished."""
    from filelock import FileLock

    runs = cfg.root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    with FileLock(str(runs / f"{stage_run_name(cfg, stage, inputs)}.lock")):
        yield


def train_upstream(
    cfg: ExperimentConfig, tracker: Any, parent_run_id: str | None, *, lock: bool = True
) -> tuple[dict[str, Path], list[StageResult]]:
    """Train (or find finished) every stage of ``cfg`` before dit; returns the parts (visual, text, the text
    encoder, and any ``train.init_from`` parts) and the stage results."""
    from vgmedgen.platform.tracking import resolve_model
    from vgmedgen.platform.training.driver import ensure_text_encoder, parts_from, stage_inputs

    parts: dict[str, Path] = {}
    if cfg.train.init_from:
        parts.update(parts_from(resolve_model(cfg.train.init_from, cfg, tracker=tracker).path))
    parts["text_encoder"] = ensure_text_encoder(cfg)
    results = []
    for stage in cfg.train_stages:
        if stage == "dit":
            break
        inputs = stage_inputs(stage, parts)
        with stage_lock(cfg, stage, inputs) if lock else contextlib.nullcontext():
            res = run_stage(cfg, stage, inputs, tracker=tracker, parent_run_id=parent_run_id)
        parts[PARTS[stage]] = res.export_dir
        results.append(res)
    return parts, results


def _stage_chain(cfg: ExperimentConfig) -> tuple[dict[str, Path], dict[str, str]]:
    """The parts and stage run names of ``cfg`` as its training computes them, from the finished exports of
    the stages before each (nothing is trained; a stage whose input export is missing ends the chain)."""
    from vgmedgen.platform.tracking import resolve_model
    from vgmedgen.platform.training.driver import ensure_text_encoder, parts_from, stage_inputs

    parts: dict[str, Path] = {}
    if cfg.train.init_from:
        parts.update(parts_from(resolve_model(cfg.train.init_from, cfg).path))
    parts["text_encoder"] = ensure_text_encoder(cfg)
    names = {}
    for stage in cfg.train_stages:
        inputs = stage_inputs(stage, parts)
        if any(not (Path(p) / "manifest.json").is_file() for k, p in inputs.items() if k != "text_encoder"):
            break
        names[stage] = stage_run_name(cfg, stage, inputs)
        parts[PARTS[stage]] = cfg.root / "runs" / names[stage] / "export" / PARTS[stage]
    return parts, names


def trial_stage_runs(cfg: ExperimentConfig) -> dict[str, str]:
    """The stage run names of a trial's experiment (stage -> run name) that can be named today."""
    return _stage_chain(cfg)[1]


def finished_trial(cfg: ExperimentConfig, trial: str) -> tuple[Path, list[StageResult]]:
    """A finished trial's model version (assembled if new) and its stage results.

    Raises:
        RuntimeError: naming the trial and its first stage run that is not finished.
    """
    from vgmedgen.platform.training.driver import assemble_version

    parts, names = _stage_chain(cfg)
    results = []
    for stage in cfg.train_stages:
        run = names.get(stage)
        done = read_done(cfg.root / "runs" / run) if run else None
        if done is None:
            raise RuntimeError(f"trial {trial}: its {stage} stage run {run} is not finished")
        results.append(StageResult(stage, run, parts[PARTS[stage]], False, done.get("metrics", {})))
    return assemble_version(cfg, parts), results


@dataclass(frozen=True)
class TrialContext:
    """What every trial gets besides its sampled values (JSON-able: Tune pickles it into each trial)."""

    sweep: dict[str, Any]  # Sweep.to_json(): the trial needs no access to the sweep file
    sweep_key: str
    parent_run_id: str | None
    objective: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _report_callback(sink: Any, every: int, worst: float) -> Any:
    """A Ray Train callback passing the dit trainer's reports to Tune, each with the objective and the step.

    ``every``: the dit steps between validations; ``worst``: the objective of a validation whose value was
    not finite (the loop leaves non-finite values out of its reports): a diverged trial ranks last.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReport(TuneReportCallback):
        def __init__(self) -> None:
            super().__init__()
            self.sink, self.last = sink, None

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            m = metrics[0]  # rank 0's report: the one that validates
            if "step" not in m:
                return
            step = int(m["step"]) + 1
            if _VAL_OBJECTIVE in m:
                self.last = float(m[_VAL_OBJECTIVE])
            elif step % every == 0:
                self.last = worst  # validated, but the value was NaN or infinite: the trial diverged
            if self.last is None:
                return  # nothing measured yet: Tune checks the objective on every result it gets
            out = {OBJECTIVE_KEY: self.last, TIME_ATTR: step}
            out.update({k.removeprefix("dit/"): float(v) for k, v in m.items() if k.startswith("dit/val_")})
            if self.sink is not None and math.isfinite(self.last):
                self.sink([(step, {k: v for k, v in out.items() if k != TIME_ATTR})])
            self._training_actor_item_queue.put(out)

    return ObjectiveReport()


def run_trial(config: dict[str, Any], context: str) -> None:
    """The function Tune runs for each trial (``context``: :meth:`TrialContext.to_json`)."""
    import ray.tune

    from vgmedgen.platform.tracking import Tracker, ended_elsewhere_when, open_run
    from vgmedgen.platform.training.driver import stage_inputs
    from vgmedgen.platform.tuning.hooks import stopped_by_tune
    from vgmedgen.platform.tuning.objective import ObjectiveSpec

    ctx = TrialContext(**json.loads(context))
    values = dict(config)
    sweep = Sweep.from_json(ctx.sweep)
    cfg = trial_experiment(sweep, values)
    tracker = Tracker(cfg.tracking, cfg.root, cfg.name) if cfg.tracking.enabled else None
    name = trial_name(ctx.sweep_key, values)
    tags = {"sweep": ctx.sweep_key, "trial_id": ray.tune.get_context().get_trial_id(), "job": "sweep-trial"}
    # A trial Tune stopped unwinds only as its actor shuts down: the driver ends its runs, and the thread leaves them.
    with (
        ended_elsewhere_when(stopped_by_tune),
        open_run(
            tracker, key=name, name=name.rsplit("-", 1)[1], parent_id=ctx.parent_run_id, tags=tags
        ) as run,
    ):
        if tracker is not None:
            tracker.log_params(run, values)
        parts, upstream = train_upstream(cfg, tracker, run)
        inputs = stage_inputs("dit", parts)
        dit_run = stage_run_name(cfg, "dit", inputs)
        if tracker is not None:
            for res in upstream:
                tracker.client.set_tag(run, f"run.{res.stage}", res.run_name)
            tracker.client.set_tag(run, "run.dit", dit_run)
        direction = sweep.config.objective.direction
        worst = math.inf if direction == "min" else -math.inf  # a validation that was NaN: a diverged trial
        done = read_done(cfg.root / "runs" / dit_run)
        if done is not None:
            # Trained before (an equal trial, or this one before a restart): its final report, not a retraining.
            m = done.get("metrics", {})
            ray.tune.report(
                {
                    OBJECTIVE_KEY: float(m.get(_VAL_OBJECTIVE, worst)),
                    TIME_ATTR: int(m.get("step", cfg.train.dit.steps - 1)) + 1,
                    **{k.removeprefix("dit/"): float(v) for k, v in m.items() if k.startswith("dit/val_")},
                }
            )
            return
        sink = tracker.sink(run) if tracker is not None else None
        run_stage(
            cfg,
            "dit",
            inputs,
            tracker=tracker,
            parent_run_id=run,
            objective=ObjectiveSpec.from_json(ctx.objective),
            callbacks=[_report_callback(sink, sweep.config.report_every, worst)],
        )
