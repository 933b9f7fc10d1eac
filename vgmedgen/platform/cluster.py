"""Connecting to Ray: an existing cluster when one is named, else a local one started here.

The same job command runs locally, under ``ray job submit`` (which sets ``RAY_ADDRESS``) and as a
KubeRay RayJob entrypoint. A named address is probed with a short TCP timeout first, so an
unreachable cluster is one clear error instead of a minute of retries inside ``ray.init``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from urllib.parse import urlparse

__all__ = ["ClusterError", "connect", "probe_address"]

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """The named Ray cluster cannot be reached; the message says which address and what to do."""


def probe_address(address: str, timeout_s: float = 3.0) -> None:
    """Raise :class:`ClusterError` unless a TCP connection to ``address`` (host:port or URL) opens in time."""
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise ClusterError(
            f"Ray address {address!r} is not of the form host:port (e.g. 10.0.0.5:6379 or ray://head:10001)"
        )
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        raise ClusterError(
            f"Cannot reach the Ray cluster at {address} ({exc.__class__.__name__}: {exc}). Check that the head node "
            "is up and the address is right, or leave --address / RAY_ADDRESS unset to start a local Ray instance."
        ) from None


def connect(
    address: str | None = None, *, num_cpus: int | None = None, include_dashboard: bool | None = None
):
    """Initialise Ray once per process and return the ``ray`` module.

    Args:
        address: ``host:port``, ``ray://host:port``, ``auto`` or ``local``; None uses ``RAY_ADDRESS``
            when set (as ``ray job submit`` does), else starts a local instance.
        num_cpus: CPUs of a local instance (default: all).
        include_dashboard: for a local instance; the dashboard is needed for job submission and
            makes Train-inside-Tune reliable (see docs/design.md, section "Library notes").
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address not in ("auto", "local"):
        probe_address(address)  # before anything else: a wrong address is the user's first problem
    if ray.is_initialized():
        return ray
    kwargs = {"address": address, "log_to_driver": True}
    if address in (None, "local"):
        kwargs.update(num_cpus=num_cpus, include_dashboard=include_dashboard)
    log.info("Connecting to Ray at %s", address or "a new local instance")
    main_thread = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    ray.init(**{k: v for k, v in kwargs.items() if v is not None or k == "address"})
    if callable(on_sigterm):
        # ray.init replaces the driver's SIGTERM handler with sys.exit(15); keep the job's own
        # (vgmedgen.platform.cli.run_job), which ends the job's MLflow runs KILLED rather than FAILED.
        signal.signal(signal.SIGTERM, on_sigterm)
    return ray
