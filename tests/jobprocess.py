"""A job script run as a real process (as a user or ``ray job submit`` runs it), its output collected as it runs.

The process gets this process's environment (under the ``ray_cluster`` fixture: the tests' Ray address and
token) with this checkout first on ``PYTHONPATH``, so it runs the code under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["JobProcess"]

REPO = Path(__file__).resolve().parents[1]


class JobProcess:
    """``python jobs/<script> <args>``, started at once; stdout and stderr together in :meth:`output`."""

    def __init__(self, script: str, args: Sequence[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, f"jobs/{script}", *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self._lines.extend(self.process.stdout), daemon=True)
        self._reader.start()

    def output(self) -> str:
        return "".join(self._lines)

    def wait_for(self, condition: Callable[[str], bool], timeout_s: float = 240.0) -> None:
        """Return once ``condition(output so far)`` holds while the job still runs; fail with its output if
        the job ends first or the time runs out."""
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None and time.monotonic() < deadline:
            if condition(self.output()):
                return
            time.sleep(0.2)
        state = "ended" if self.process.poll() is not None else f"still ran after {timeout_s:g} s"
        raise AssertionError(f"the job {state} before the awaited point:\n{self.output()[-3000:]}")

    def interrupt(self, signum: int, timeout_s: float = 120.0) -> int:
        """Send ``signum`` and return the exit status once the job has ended."""
        self.process.send_signal(signum)
        code = self.process.wait(timeout_s)
        self._reader.join(10)
        return code
