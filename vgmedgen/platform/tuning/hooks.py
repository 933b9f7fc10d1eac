"""The sweep's hooks into Ray Tune: the driver's callbacks, an ASHA that survives a restore, and the state saved
on an interrupt.

Imported only when a sweep runs (it imports Ray Tune).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from types import FrameType
from typing import Any, Protocol

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

__all__ = [
    "InterruptAtStepEnd",
    "ResumedASHA",
    "SweepCallback",
    "SweepFIFO",
    "save_experiment_state",
    "stopped_by_tune",
]

log = logging.getLogger(__name__)

TUNE_SIGINT = "TUNE_DISABLE_SIGINT_HANDLER"  # read by Tune's fit() when it starts


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


def stopped_by_tune() -> bool:
    """In a trial's thread: whether Tune has ended this trial's session, which it does when it stops the trial
    (ASHA, the end of the sweep) before it shuts the trial's actor down. The thread itself learns of it only
    as it unwinds, its trainer's controller gone with the actor."""
    from ray.train._internal.session import get_session  # Tune's function-trainable session (Ray 2.60)

    return get_session() is None


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
    ended since Tune's last periodic write). Consistent when the interrupt came at a step's end
    (:class:`InterruptAtStepEnd`)."""
    controller = getattr(scheduler, "controller", None)
    if controller is None:
        return False
    # Schedulers get the controller behind a wrapper that logs a warning for each attribute it reaches
    controller = getattr(controller, "_tune_controller", controller)
    try:
        controller.checkpoint(force=True)
        # checkpoint() writes the state to the driver's staging folder and copies it to the sweep's folder in a
        # background process, whatever its `wait` says (Ray 2.60): the job is about to exit, so wait for it.
        controller._storage.syncer.wait()
    except Exception as exc:  # noqa: BLE001 -- an interrupt is under way: report and let it go on
        log.warning("could not save Tune's experiment state on the interrupt: %s", exc)
        return False
    return True


class InterruptAtStepEnd(Callback):
    """Holds Ctrl-C and SIGTERM while Tune's controller is inside a step, and delivers them (to the handler
    that was there before) when the step ends.

    Raised wherever it lands, an interrupt leaves Tune's state half-changed: Tune calls the driver's
    ``on_trial_complete`` before it marks the trial TERMINATED, and the search algorithm counts a new trial
    before the controller holds it; saved like that, the restored sweep runs a finished trial again or waits
    forever for one it never gets. A step waits at most 0.1 s for an event, so the interrupt is late by that
    and the event's handling. A second signal while one is held is delivered at once.

    Use as a context manager around ``Tuner.fit()``, with the same object among the run's callbacks. Inside it
    Tune's own Ctrl-C handler is off: that one ends ``fit()`` normally with trials unfinished, and the sweep would
    go on to its final scoring.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._held: int | None = None
        self._handlers: dict[int, Any] = {}
        self._tune_handler: str | None = None

    def __reduce__(self) -> Any:
        return (InterruptAtStepEnd, ())  # Tune pickles its run config; the handlers are this process's

    def __enter__(self) -> InterruptAtStepEnd:
        self._tune_handler = os.environ.get(TUNE_SIGINT)
        os.environ[TUNE_SIGINT] = "1"
        if threading.current_thread() is threading.main_thread():  # only there can handlers be set
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not None:  # None: set outside Python, which cannot restore it
                    self._handlers[signum] = signal.signal(signum, self._hold)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tune_handler is None:
            os.environ.pop(TUNE_SIGINT, None)
        else:
            os.environ[TUNE_SIGINT] = self._tune_handler
        held = self._restore()
        if held is not None:  # came after the last step (or an error is on its way out): delivered now
            self._deliver(held)

    def _restore(self) -> int | None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}
        held, self._held = self._held, None
        return held

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        if self._held is not None:
            self.on_step_end()
            return
        self._held = signum

    def _deliver(self, signum: int) -> None:
        handler = signal.getsignal(signum)
        if callable(handler):
            handler(signum, None)
        else:  # the default action (or ignored): as if the signal came now
            signal.raise_signal(signum)

    def on_step_end(self, *args: Any, **info: Any) -> None:
        if self._held is not None:
            self._deliver(self._restore())


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
