"""The tests' one Ray cluster: a real head node started with ``ray start --head --block``.

Tune with Train, ``ray job submit`` and ``serve deploy`` need the dashboard, and a second Ray instance on
the host breaks the first, so every Ray test and every job subprocess uses this one head node:

- the dashboard on, every port free (picked here), a short ``--temp-dir`` under /tmp (Ray refuses
  socket paths over 107 bytes, which pytest's temporary paths exceed);
- token authentication with a token made here, set explicitly (``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``) for
  the head and for every client, so nothing depends on ``~/.ray/auth_token``;
- the venv's ``bin`` first on ``PATH``, so ``python`` in a job entrypoint is the venv's;
- stopped through its own process (SIGTERM to the ``ray start --block`` process, which stops what it
  started), never with ``ray stop``, which kills every Ray on the host.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["HeadNode", "free_port"]

VENV_BIN = str(Path(sys.executable).parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class HeadNode:
    num_cpus: int
    temp_dir: Path
    token: str
    gcs_port: int
    dashboard_port: int
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """What ``ray.init(address=...)`` and ``RAY_ADDRESS`` of a driver take."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """What ``ray job submit --address`` takes."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @classmethod
    def start(cls, num_cpus: int = 2, token: str | None = None, timeout_s: float = 90.0) -> HeadNode:
        """Start a head node with ``num_cpus`` CPUs and token auth (``token``, or a new one)."""
        temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        token = token or secrets.token_hex(32)
        ports = {
            name: free_port()
            for name in (
                "port",
                "dashboard-port",
                "ray-client-server-port",
                "node-manager-port",
                "object-manager-port",
                "metrics-export-port",
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
            )
        }
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Every TorchTrainer of the suite pays Ray Train's fixed costs: its controller polls the workers every
            # 2 s (a finished stage is seen up to 2 s late, often later) and starts a preemption watcher actor (a
            # process of its own; there is no preemptible node here). Measured on the sweep's end-to-end test:
            # 278 s -> 255 s with both changed.
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        }
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        cmd = [
            str(Path(VENV_BIN) / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *[f"--{k}={v}" for k, v in ports.items()],
        ]
        log_path = temp_dir / "head.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                cmd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        head = cls(num_cpus, temp_dir, token, ports["port"], ports["dashboard-port"], process, log_path, env)
        deadline = time.monotonic() + timeout_s
        while not (_open(head.gcs_port) and _open(head.dashboard_port)):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-4000:]
                head.stop()
                raise RuntimeError(f"the tests' Ray head node did not start ({' '.join(cmd)}):\n{tail}")
            time.sleep(0.5)
        return head

    def client_env(self) -> dict[str, str]:
        """What a client process (a driver, ``ray job submit``) needs to reach this head."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_ADDRESS": self.address,
            "PATH": self.env["PATH"],
        }

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop this head and what it started (every process of its session), nothing else on the host."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)  # `ray start --block` stops its processes
                self.process.wait(timeout_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for pid in _session_pids(
            self.process.pid
        ):  # stragglers (idle workers have process groups of their own)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.wait(10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _session_pids(sid: int) -> list[int]:
    """The processes of session ``sid`` (the head was started as a session leader)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state ppid pgrp session
            pids.append(int(stat.parent.name))
    return pids
