"""The sweep's hooks into Ray Tune: the driver's callback and an ASHA that survives a restore.

Imported only when a sweep runs (it imports Ray Tune).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

__all__ = ["ResumedASHA", "SweepCallback", "SweepFIFO", "save_experiment_state"]

log = logging.getLogger(__name__)


class TrialSink(Protocol):
    def update(self, trial: Any, result: Mapping[str, Any]) -> None: ...

    def ended(self, trial: Any, status: str) -> None: ...


class SweepCallback(Callback):
    """Tune callback on the driver: hands each result and each trial's end to ``sink`` (the live table, trial
    end states in MLflow and ``sweep.json``)."""

    def __init__(self, sink: TrialSink | None) -> None:
        self.sink = sink

    def __reduce__(self) -> Any:
        # Tune pickles its run config (tuner.pkl); the driver's state is this process's alone, and a restored
        # sweep sets a new callback.
        return (SweepCallback, (None,))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.sink is not None:
            self.sink.update(trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.sink is not None:
            self.sink.ended(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.sink is not None:
            self.sink.ended(trial, "FAILED")


class _KeepsController:
    """A scheduler that remembers the Tune controller adding its trials: on an interrupt the driver saves Tune's
    experiment state through it (:func:`save_experiment_state`). Tune writes that state every 10 s or so; a
    trial that finished just before a Ctrl-C would otherwise be run again by the restored sweep."""

    controller: Any = None

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.controller = tune_controller
        super().on_trial_add(tune_controller, trial)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "controller"}


def save_experiment_state(scheduler: Any) -> bool:
    """Write Tune's experiment state now (trial states as the controller has them); False when there is no
    controller yet or the write failed (logged: the sweep still continues, re-running at most the trials that
    ended since Tune's last periodic write)."""
    controller = getattr(scheduler, "controller", None)
    if controller is None:
        return False
    try:
        controller.checkpoint(force=True, wait=True)
    except Exception as exc:  # noqa: BLE001 -- an interrupt is under way: report and let it go on
        log.warning("could not save Tune's experiment state on the interrupt: %s", exc)
        return False
    return True


class SweepFIFO(_KeepsController, FIFOScheduler):
    """Tune's first-in-first-out scheduler (``scheduler.kind: none``) that keeps its controller."""


class ResumedASHA(_KeepsController, ASHAScheduler):
    """ASHA told again, as Tune re-adds each restored trial, what that trial reported before the restart
    (``history``: Tune trial id -> its (time, value) reports). Tune saves the search algorithm's state with the
    experiment but not the scheduler's: a restored plain ASHA would start with empty rungs and let the next
    weak trial run on."""

    def __init__(self, history: Mapping[str, list[tuple[int, float]]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history = history

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for step, value in self.history.get(trial.trial_id, []):
            bracket.on_result(trial, step, self._metric_op * value)
