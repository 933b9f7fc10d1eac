"""The model versions a server offers: each configured reference resolved once through the platform's
one resolver, ``<name>@<alias>`` references looked up again every ``serve.alias_refresh_s`` so that
moving an alias in the registry moves the server to the new version without a restart.

A served model is known by its name (``<name>-v<N>`` for a registry version, the directory's name
otherwise), by the reference it was configured with and by its version id (the manifest's sha256)
or any prefix of 8+ characters of it. Requests name a model; the catalog maps the name to a
directory it resolved itself, so nothing a request carries ever becomes a path.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vgmedgen.model.configbase import ConfigError
from vgmedgen.model.vgmedgen import read_model_config
from vgmedgen.platform.config import ExperimentConfig
from vgmedgen.platform.tracking import ModelRef, Tracker, model_reference, resolve_model

__all__ = ["Catalog", "ServedModel", "UnknownModelError"]

EXAMPLES = 6  # example prompt pairs offered per model


class UnknownModelError(LookupError):
    """A request names a model this server does not serve; the message lists the served ones."""


@dataclass
class ServedModel:
    """One model version behind the API.

    Attributes:
        ref: the reference it was configured with (a directory or ``<name>@<alias>``).
        model: the resolved version.
        image_size: the side of its square images in pixels.
        sampler: its default sampler settings.
        examples: example (anatomy, style) prompt pairs from its experiment's train records.
        registry: (name, alias, version) for a registry reference, else None.
    """

    ref: str
    model: ModelRef
    image_size: int
    sampler: dict[str, Any]
    examples: list[dict[str, str]] = field(default_factory=list)
    registry: tuple[str, str, str] | None = None

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version_id(self) -> str:
        return self.model.id

    def describe(self, default: bool) -> dict[str, Any]:
        """What ``GET /v1/models`` says about it."""
        return {
            "name": self.name,
            "ref": self.ref,
            "version_id": self.version_id,
            "aliases": [f"{self.registry[0]}@{self.registry[1]}"] if self.registry else [],
            "registry_version": self.registry[2] if self.registry else None,
            "default": default,
            "resolution": self.image_size,
            "sampler": self.sampler,
            "example_prompts": self.examples,
        }


def _examples(cfg: ExperimentConfig) -> list[dict[str, str]]:
    """A few distinct (anatomy, style) prompt pairs of the experiment's train records, if they are here."""
    from vgmedgen.platform.records import read_split

    try:
        table = read_split(cfg.records_dir, "train", columns=["anatomy_text", "style_text"], limit=2000)
    except (FileNotFoundError, ValueError, OSError):
        return []
    pairs = dict.fromkeys(
        zip(table.column("anatomy_text").to_pylist(), table.column("style_text").to_pylist())
    )
    return [{"anatomy_prompt": a, "style_prompt": s} for a, s in list(pairs)[:EXAMPLES]]


class Catalog:
    """The served versions, in the configured order (the first is the default)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self._tracker: Tracker | None = None
        refs = list(cfg.serve.models)
        if not refs:
            refs = [model_reference(None, cfg, self._open_tracker(), "serve.models")]
        self._examples = _examples(cfg)
        self.models: list[ServedModel] = [self._resolve(ref) for ref in refs]
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _open_tracker(self) -> Tracker | None:
        if self._tracker is None and self.cfg.tracking.enabled:
            self._tracker = Tracker(self.cfg.tracking, self.cfg.root, self.cfg.name)
        return self._tracker

    def _resolve(self, ref: str) -> ServedModel:
        is_dir = Path(ref).expanduser().is_dir()
        model = resolve_model(ref, self.cfg, tracker=None if is_dir else self._open_tracker())
        registry = None
        if not is_dir:
            name, _, alias = ref.removeprefix("models:/").partition("@")
            registry = (name, alias, model.name.rpartition("-v")[2])
        config = read_model_config(model.path / "model_config.json")
        return ServedModel(
            ref=ref,
            model=model,
            image_size=config.image_size,
            sampler=config.sampler.model_dump(),
            examples=self._examples,
            registry=registry,
        )

    def refresh(self, force: bool = False) -> list[str]:
        """Look registry aliases up again (at most every ``serve.alias_refresh_s``); returns the names of
        versions that changed."""
        with self._lock:  # one lookup at a time (requests call this from worker threads)
            return self._refresh(force)

    def _refresh(self, force: bool) -> list[str]:
        if not force and time.monotonic() - self._checked < self.cfg.serve.alias_refresh_s:
            return []
        self._checked = time.monotonic()
        changed = []
        for i, served in enumerate(self.models):
            if served.registry is None:
                continue
            name, alias, version = served.registry
            tracker = self._open_tracker()
            if tracker is None:
                continue
            current = str(tracker.version_by_alias(name, alias).version)
            if current != version:
                self.models[i] = self._resolve(served.ref)
                changed.append(self.models[i].name)
        return changed

    def get(self, name: str | None) -> ServedModel:
        """The served model ``name`` (its name, configured reference or version id prefix); None: the default.

        Raises:
            UnknownModelError: listing the served models.
        """
        if name is None:
            return self.models[0]
        for served in self.models:
            if name in (served.name, served.ref) or (len(name) >= 8 and served.version_id.startswith(name)):
                return served
        listed = ", ".join(f"{m.name} ({m.ref})" for m in self.models)
        raise UnknownModelError(f"model {name[:200]!r} is not served here; served models: {listed}")

    def describe(self) -> list[dict[str, Any]]:
        return [m.describe(default=i == 0) for i, m in enumerate(self.models)]


def check_models(cfg: ExperimentConfig) -> Catalog:
    """Resolve every configured model now (a bad reference fails before Serve starts), as a ConfigError."""
    try:
        return Catalog(cfg)
    except FileNotFoundError as exc:
        raise ConfigError(f"serve.models: {exc}") from None
