"""What every job script shares: ``--config FILE`` plus dotted overrides, and clean user errors.

A job is ``python jobs/<name>.py --config configs/x.yaml [dotted.path=value ...]``. User errors
(a config typo, a missing dataset, an unreachable cluster) print one message and exit with
status 2, without a stack trace from deep inside a library; anything else is a bug and keeps
its traceback.

An interrupted job ends its work the way Ctrl-C does: SIGTERM (what ``ray job stop``, Kubernetes and
``kill`` send) raises :class:`Terminated`, a ``KeyboardInterrupt``, in the main thread, so every MLflow
run the job holds open ends KILLED (:meth:`vgmedgen.platform.tracking.Tracker.open_run`) and the job
exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).

The interrupt can surface as another exception: raised inside a library that cleans up on the way out
(SQLAlchemy, inside an MLflow call, ends its transaction and then fails with ``This transaction is closed``,
which MLflow raises as an ``MlflowException``). Such an exception is still the interrupt
(:func:`interrupt_signal`): once SIGTERM has reached the job, or when the exception arose while a
``KeyboardInterrupt`` was being handled, the runs end KILLED and the job exits 128 + the signal number,
as if the interrupt itself had come out. Without a signal an error keeps its own status and traceback.

An interrupt that does not stop the job (a library that swallows ``KeyboardInterrupt``, or a main
thread blocked in native code where no Python handler runs) is caught by a watchdog: the signal's
arrival is seen through :func:`signal.set_wakeup_fd`, which the C-level handler writes to at once, and
if the job is still running :data:`INTERRUPT_GRACE_S` seconds later (``VGMEDGEN_INTERRUPT_GRACE_S``)
the watchdog prints every thread's stack (where it hung), ends the open MLflow runs KILLED and exits
with the same status.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.config import ExperimentConfig, load_experiment

__all__ = [
    "INTERRUPT_GRACE_S",
    "Terminated",
    "exit_job",
    "interrupt_signal",
    "job_parser",
    "load_from_args",
    "run_job",
]

INTERRUPT_GRACE_S = 30.0  # seconds an interrupted job has to stop on its own before the watchdog ends it


class Terminated(KeyboardInterrupt):
    """The job received SIGTERM; handled as an interrupt (Ctrl-C) so that open runs end KILLED."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


# The signal that reached the job run_job runs (SIGTERM, through its handler); None until one does.
_received: int | None = None


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = signum  # first: whatever the exception becomes on its way out, the job knows it was stopped
    raise Terminated(signum)


def interrupt_signal(exc: BaseException | None = None) -> int | None:
    """The signal number that interrupted the job, or None when it was not interrupted.

    The job was interrupted when ``exc`` is a ``KeyboardInterrupt`` or was raised while one was handled
    (one is in its ``__cause__``/``__context__`` chain): SIGINT, or the signal of a :class:`Terminated`;
    or when a SIGTERM has reached the job :func:`run_job` runs, whatever ``exc`` is. Library code the
    interrupt unwinds through may replace it with an error of its own (SQLAlchemy inside an MLflow call:
    ``MlflowException: This transaction is closed``); that error is the interrupt, not a failure.
    """
    seen: set[int] = set()
    chain = [exc] if exc is not None else []
    while chain:
        e = chain.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt):
            if isinstance(e, Terminated):
                return e.signum
            # A library that catches the interrupt and raises a plain KeyboardInterrupt of its own (Ray Tune's
            # loop does) keeps the signal that came: the one the handler saw, else Ctrl-C's.
            return _received or signal.SIGINT
        chain.extend(c for c in (e.__context__, e.__cause__) if c is not None)
    return _received


def _user_errors() -> tuple[type[BaseException], ...]:
    from vgmedgen.platform.cluster import ClusterError
    from vgmedgen.platform.datasets.common import CorruptInputError, DatasetError
    from vgmedgen.platform.metrics.stats import MetricsError
    from vgmedgen.platform.prepare import PrepareError
    from vgmedgen.platform.records import RecordError

    return (
        ConfigError,
        ClusterError,
        DatasetError,
        CorruptInputError,
        PrepareError,
        RecordError,
        MetricsError,
        FileNotFoundError,
    )


def job_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every job takes."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", "-c", help="experiment YAML (see configs/); defaults apply when omitted")
    parser.add_argument(
        "overrides", nargs="*", metavar="path=value", help="dotted config overrides, e.g. data.resolution=32"
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="start anew instead of reusing or resuming earlier output"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="warnings and errors only")
    return parser


def load_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The validated experiment config named by the parsed arguments."""
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return load_experiment(args.config, args.overrides)


def exit_job(code: int) -> None:
    """Leave the process with a job's exit status (the ``__main__`` of every job script).

    After an interrupt (128 + SIGINT or SIGTERM) the open runs are already ended, so the process leaves at
    once with ``os._exit``: a thread that cannot be interrupted (an in-process trainer's loop, a Ray client
    thread) or an exit hook waiting on the cluster must not keep an interrupted job alive.
    """
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


class _InterruptWatchdog:
    """Sees SIGINT/SIGTERM arrive (through the wakeup fd, written by the C-level handler even while the main
    thread is stuck) and, if the process still runs ``grace`` seconds later, dumps every thread's stack,
    ends the open MLflow runs KILLED and leaves with 128 + the signal number."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._closed = threading.Event()
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="interrupt-watchdog", daemon=True).start()

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._read, 1)
            except OSError:
                return
            if not data:  # closed: the job ended
                os.close(self._read)
                return
            if data[0] in (signal.SIGINT, signal.SIGTERM):
                break
        signum = data[0]
        if self._closed.wait(self.grace):  # the job stopped on its own
            os.close(self._read)
            return
        import faulthandler

        name = signal.Signals(signum).name
        print(
            f"interrupted ({name}): the job did not stop within {self.grace:g} s of the signal; ending its "
            "open MLflow runs KILLED and exiting. Its threads at this moment:",
            file=sys.stderr,
            flush=True,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        try:
            from vgmedgen.platform.tracking import end_open_runs

            end_open_runs("KILLED")
        except Exception as exc:  # the exit must not depend on the tracking server
            print(f"could not end the open MLflow runs: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)

    def close(self) -> None:
        self._closed.set()
        signal.set_wakeup_fd(self._previous)
        os.close(self._write)  # a watcher still reading gets b"" and ends


def run_job(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a job's ``main``; user errors become one message on stderr and exit status 2, an interrupt
    (SIGINT, or SIGTERM as :class:`Terminated`) exits 128 + the signal number once open runs are ended.

    Any exception that comes out of an interrupted job (:func:`interrupt_signal`: after a SIGTERM reached
    it, or raised while a ``KeyboardInterrupt`` was handled) is the interrupt, whatever its type.
    """
    global _received
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        _received = None
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    grace = float(os.environ.get("VGMEDGEN_INTERRUPT_GRACE_S", INTERRUPT_GRACE_S))
    watchdog = _InterruptWatchdog(grace) if main_thread else None
    try:
        return int(main(argv) or 0)
    except BaseException as exc:
        signum = interrupt_signal(exc)
        if signum is None:
            if isinstance(exc, _user_errors()):
                print(f"error: {exc}", file=sys.stderr)
                return 2
            raise
        _end_interrupted(signum, exc)
        return 128 + signum
    finally:
        if previous is not None:  # None: a handler installed outside Python, which cannot be restored
            signal.signal(signal.SIGTERM, previous)
        if watchdog is not None:  # the job is out of main: exit_job leaves at once from here
            watchdog.close()
        if main_thread:
            _received = None


def _end_interrupted(signum: int, exc: BaseException) -> None:
    """Report an interrupted job and end the runs it still holds open KILLED (its ``open_run`` blocks ended
    theirs on the way out; one held by another thread, or opened outside such a block, is ended here)."""
    message = f"interrupted ({signal.Signals(signum).name})"
    if not isinstance(exc, KeyboardInterrupt):  # the interrupt surfaced as another exception
        detail = str(exc).strip().splitlines()
        message += f"; it surfaced as {type(exc).__name__}" + (f": {detail[0][:300]}" if detail else "")
    print(message, file=sys.stderr, flush=True)
    tracking = sys.modules.get("vgmedgen.platform.tracking")  # loaded only by a job that tracks runs
    if tracking is not None:
        try:
            tracking.end_open_runs("KILLED")
        except Exception as err:  # the exit must not depend on the tracking server
            print(f"could not end the open MLflow runs: {err}", file=sys.stderr, flush=True)
