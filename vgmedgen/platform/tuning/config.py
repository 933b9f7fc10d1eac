"""A sweep file (``configs/sweeps/*.yaml``): a base experiment, a search space over its dotted config paths,
the objective, the search algorithm, the scheduler and the trial budget.

In YAML::

    base: ../demo.yaml                 # the experiment every trial starts from (relative to this file)
    overrides: [train.dit.steps=200]   # applied to the base before the space
    objective: {metric: kid, mode: min}
    search: {algorithm: optuna, seed: 0}
    scheduler: {kind: asha, grace_period: 50, reduction_factor: 2}   # in dit steps
    trials: 8
    concurrent_trials: 2
    space:
      train.dit.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.generator.lora.rank: {choice: [4, 8, 16]}
      model.generator.hffm.mode: {grid: [separate, hybrid]}

Variants are named sets of overrides, swept through the special space path ``variant`` (a comparison of
methods rather than of one setting)::

    variants:
      full: []
      caption: [model.generator.hffm.mode=caption]
      no_colour: [model.generator.colour.weight=0]
    space:
      variant: {grid: [full, caption, no_colour]}
      seed: {grid: [0, 1, 2]}

:func:`load_sweep` checks the whole file before any trial starts: every path of the space must exist in
the base experiment's resolved config, every distribution must have the right shape, and every value the
space can draw at its ends (each choice and grid value, both bounds of a range) must be one the
experiment config accepts. Each error names the path. Every variant's overrides must build a config the
experiment accepts, and the ``variant`` dimension may name only the variants given.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from vgmedgen.model.configbase import ConfigError, StrictConfig, build_config
from vgmedgen.platform.config import (
    ExperimentConfig,
    apply_overrides,
    experiment_data,
    read_yaml,
    resolve_output_root,
)
from vgmedgen.platform.evaluation.config import INCEPTION_WEIGHTS_FILE

__all__ = [
    "DISTRIBUTIONS",
    "OBJECTIVES",
    "VARIANT",
    "Distribution",
    "Objective",
    "REPORT_SECTIONS",
    "ReportOptions",
    "ResourceOptions",
    "SchedulerOptions",
    "SearchOptions",
    "Sweep",
    "SweepConfig",
    "load_sweep",
    "measure_problem",
]

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
VARIANT = "variant"  # the space path that picks one of the sweep's named variants
# What a trial can be ranked by, and which way is better.
OBJECTIVES: dict[str, Literal["min", "max"]] = {
    "domain_fd": "min",
    "fid": "min",
    "kid": "min",
    "adherence": "max",
    "val_loss": "min",
}


class Distribution(StrictConfig):
    """One dimension of the space: exactly one of ``choice``, ``grid`` (every value, crossed with the
    other grid dimensions), ``uniform``/``loguniform`` (``[low, high]``) or ``randint`` (``[low, high]``,
    both ends included)."""

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one(self) -> Distribution:
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one distribution of {', '.join(DISTRIBUTIONS)} (got {', '.join(given) or 'none'}), "
                "e.g. {loguniform: [1.0e-4, 1.0e-2]} or {choice: [4, 8, 16]}"
            )
        kind = given[0]
        if kind in ("choice", "grid") and not getattr(self, kind):
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, kind)
            if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
                raise ValueError(f"{kind} needs [low, high] with low < high, got [{low}, {high}]")
            if kind == "loguniform" and low <= 0:
                raise ValueError(
                    f"loguniform needs a positive low bound, got {low}; use uniform for ranges from 0"
                )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    def ends(self) -> list[Any]:
        """The values to check against the config: every choice/grid value, or both bounds."""
        value = getattr(self, self.kind)
        return list(value)


class Objective(StrictConfig):
    """What ranks the trials: ``metric`` (one of :data:`OBJECTIVES`) and ``mode`` (default: the metric's)."""

    metric: str = "kid"
    mode: Literal["min", "max"] | None = None
    images: int = Field(
        32,
        ge=2,
        le=4096,
        description="images sampled (fixed captions and seeds) for each report during training",
    )
    seed: int = Field(0, description="the seed of the first of those images (image k: seed + k)")
    final_top: int = Field(
        1, ge=0, description="trials re-scored at the end with final_images (the best by their last report)"
    )
    final_images: int = Field(
        256, ge=2, le=100_000, description="images sampled per re-scored trial: FD needs a few hundred"
    )

    @field_validator("metric")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in OBJECTIVES:
            raise ValueError(f"unknown objective {value!r}; choose one of {', '.join(OBJECTIVES)}")
        return value

    @model_validator(mode="after")
    def _mode(self) -> Objective:
        natural = OBJECTIVES[self.metric]
        if self.mode is not None and self.mode != natural:
            raise ValueError(
                f"{self.metric} is better when lower/higher as {natural}; set mode: {natural} or leave it out"
            )
        return self

    @property
    def direction(self) -> Literal["min", "max"]:
        return self.mode or OBJECTIVES[self.metric]


class SearchOptions(StrictConfig):
    """How trials are drawn: ``optuna`` (TPE, seeded), ``random`` (seeded) or ``grid`` (every grid point)."""

    algorithm: Literal["optuna", "random", "grid"] = "optuna"
    seed: int = 0


class SchedulerOptions(StrictConfig):
    """Early stopping: ``asha`` (grace period and reduction factor in dit steps) or ``none``."""

    kind: Literal["asha", "none"] = "asha"
    grace_period: int = Field(50, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class ResourceOptions(StrictConfig):
    """What one trial's training uses (its driver reserves no CPU)."""

    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)


REPORT_SECTIONS = ("evaluate", "adherence")  # what report overrides may set: outside every training identity


class ReportOptions(StrictConfig):
    """The comparison report written once the trials are done (see :mod:`vgmedgen.platform.tuning.compare`):
    every finished trial's model version through the evaluate job (and, on SynthDerm, the adherence swap
    grid), summarised per group of trials that differ only in their seed (per variant in a sweep of
    variants). Left out of the sweep's identity: turning it on for a finished sweep evaluates its trials."""

    evaluate: bool = Field(False, description="evaluate every finished trial and write the comparison")
    adherence: Literal["auto", "on", "off"] = Field(
        "auto", description="the swap grid read by the ruler (size, position, colour): auto = on SynthDerm"
    )
    overrides: list[str] = Field(
        default_factory=list,
        description="dotted evaluate.* / adherence.* settings for these evaluations (e.g. evaluate.num_images=512)",
    )

    @field_validator("adherence", mode="before")
    @classmethod
    def _yaml_booleans(cls, v: object) -> object:
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class SweepConfig(StrictConfig):
    """A sweep file (see the module docstring)."""

    base: str
    overrides: list[str] = Field(default_factory=list)
    variants: dict[str, list[str]] = Field(
        default_factory=dict, description="named sets of dotted overrides, swept by the space path `variant`"
    )
    space: dict[str, Distribution] = Field(min_length=1)
    objective: Objective = Objective()
    search: SearchOptions = SearchOptions()
    scheduler: SchedulerOptions = SchedulerOptions()
    trials: int = Field(8, ge=1)
    concurrent_trials: int = Field(1, ge=1)
    resources: ResourceOptions = ResourceOptions()
    report_every: int = Field(50, ge=1, description="dit steps between two reports of the objective")
    time_budget_s: float | None = Field(None, gt=0)
    report: ReportOptions = ReportOptions()

    @model_validator(mode="after")
    def _variants(self) -> SweepConfig:
        dist = self.space.get(VARIANT)
        if dist is None:
            if self.variants:
                raise ValueError(
                    f"variants {sorted(self.variants)} are given but the space has no `{VARIANT}` dimension to sweep "
                    f"them: add e.g. {VARIANT}: {{grid: {sorted(self.variants)}}}"
                )
            return self
        if dist.kind not in ("choice", "grid"):
            raise ValueError(
                f"space path {VARIANT} picks named variants: use choice or grid, not {dist.kind}"
            )
        unknown = [v for v in dist.ends() if v not in self.variants]
        if unknown:
            raise ValueError(
                f"space path {VARIANT}: {unknown} are not variants of this sweep; the variants are "
                f"{sorted(self.variants) or 'none (add a variants: section)'}"
            )
        return self

    @model_validator(mode="after")
    def _grid_search(self) -> SweepConfig:
        grids = [p for p, d in self.space.items() if d.kind == "grid"]
        if self.search.algorithm == "grid" and len(grids) != len(self.space):
            others = [p for p in self.space if p not in grids]
            raise ValueError(f"search.algorithm grid needs every dimension as a grid; {others} are not")
        if grids and self.search.algorithm == "optuna":
            raise ValueError(
                f"{grids} are grid dimensions, which Optuna cannot draw; use choice, or search.algorithm random/grid"
            )
        if grids and self.trials % self.grid_points:
            raise ValueError(
                f"trials {self.trials} must be a multiple of the {self.grid_points} grid points (every grid point is "
                f"run trials / grid points times): set trials to {self.grid_points} or a multiple of it"
            )
        return self

    @property
    def grid_points(self) -> int:
        """How many combinations the grid dimensions make (1 without any)."""
        return math.prod(len(d.grid or []) for d in self.space.values() if d.kind == "grid")


class Sweep:
    """A checked sweep: its config, the base experiment's data and resolved config, and where it came from."""

    def __init__(
        self, path: Path, config: SweepConfig, base_data: dict[str, Any], base: ExperimentConfig
    ) -> None:
        self.path, self.config, self.base_data, self.base = path, config, base_data, base

    @property
    def name(self) -> str:
        return self.path.stem

    def to_json(self) -> dict[str, Any]:
        """The checked sweep as plain data (what a trial on another node rebuilds it from)."""
        return {"path": str(self.path), "config": self.config.model_dump(mode="json"), "base": self.base_data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sweep:
        config = SweepConfig.model_validate(data["config"])
        base = build_config(ExperimentConfig, data["base"], where=f"sweep {Path(data['path']).stem}")
        return cls(Path(data["path"]), config, dict(data["base"]), base)

    def experiment(self, values: Mapping[str, Any]) -> ExperimentConfig:
        """The experiment of one trial: the base with ``values`` (dotted path -> value) applied; a ``variant``
        value applies that variant's overrides first."""
        return _with_values(self.base_data, values, where=f"sweep {self.name}", variants=self.config.variants)


def _with_values(
    data: Mapping[str, Any],
    values: Mapping[str, Any],
    where: str,
    variants: Mapping[str, list[str]] | None = None,
) -> ExperimentConfig:
    overrides = [f"{path}={json.dumps(value)}" for path, value in values.items() if path != VARIANT]
    if VARIANT in values:
        overrides = [*(variants or {})[values[VARIANT]], *overrides]
    return build_config(ExperimentConfig, apply_overrides(data, overrides), where=where)


def _check_path(dump: Mapping[str, Any], path: str, label: str) -> None:
    """Raise a ConfigError beginning with ``label`` when ``path`` is not a field of ``dump``."""
    node: Any = dump
    parts = path.split(".")
    for i, part in enumerate(parts):
        if node is None and i > 0:  # an optional section left unset: building the config checks the rest
            return
        if not isinstance(node, Mapping):
            where = ".".join(parts[:i])
            raise ConfigError(f"{label}: {where} is a value ({node!r}), not a section")
        if part not in node:
            where = ".".join(parts[:i]) or "the experiment config"
            hint = difflib.get_close_matches(part, list(node), n=1)
            did_you_mean = f"; did you mean {'.'.join([*parts[:i], hint[0]])}?" if hint else ""
            raise ConfigError(f"{label} does not exist: {where} has no field {part!r}{did_you_mean}")
        node = node[part]


def _check_values(
    base_data: Mapping[str, Any], values: Mapping[str, Any], variants: Mapping[str, list[str]], refused: str
) -> None:
    try:
        _with_values(base_data, values, where="", variants=variants)
    except ConfigError as err:
        raise ConfigError(f"{refused}:\n{err}") from None


def measure_problem(cfg: Any, *, metric: str | None = None, report_adherence: bool = False) -> str | None:
    """Why experiment ``cfg`` cannot be measured by objective ``metric`` (or, with ``report_adherence``, by
    the report's adherence swap grid), naming the fix; None when it can. Checked when the sweep file is read,
    before anything trains, and again where each measure is taken."""
    dataset = cfg.data.dataset
    if metric == "adherence" and dataset != "synthderm":
        return (
            f"objective adherence reads SynthDerm's size, position and colour factors, but the sweep's base "
            f"experiment trains on '{dataset}'; use kid or domain_fd for this dataset"
        )
    if report_adherence and dataset != "synthderm":
        return (
            f"report.adherence=on reads SynthDerm's factors, but the sweep trains on '{dataset}'; "
            "set report.adherence to auto or off"
        )
    if metric == "fid" and not cfg.evaluate.fidelity.inception_weights_present():
        path = cfg.evaluate.fidelity.feature_extractor_weights_path
        state = "it is not set" if path is None else f"{path} does not exist"
        return (
            "objective fid needs Inception features: set evaluate.fidelity.feature_extractor_weights_path to "
            f"torch-fidelity's weights file ({INCEPTION_WEIGHTS_FILE}; {state}), or rank by kid / domain_fd"
        )
    return None


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and check a sweep file (plus dotted ``overrides`` of the sweep file itself, e.g. ``trials=4``).

    Raises:
        ConfigError: naming the file, the field or the space path, and what is allowed.
    """
    path = Path(path)
    # output_root= is the one experiment setting a sweep's command line takes, as every job's does
    roots = [o for o in overrides or [] if o.split("=", 1)[0].strip() == "output_root"]
    data = apply_overrides(read_yaml(path), [o for o in overrides or [] if o not in roots])
    config = build_config(SweepConfig, data, where=str(path))
    base_path = (path.parent / config.base).resolve()
    # the output root's precedence as every job's: output_root= > $VGMEDGEN_OUTPUT_ROOT > the base's YAML
    base_data = experiment_data(base_path, [*config.overrides, *roots])
    base = build_config(ExperimentConfig, base_data, where=str(base_path))
    resolve_output_root(base.output_root)
    problem = measure_problem(
        base, metric=config.objective.metric, report_adherence=config.report.adherence == "on"
    )
    if problem is not None:
        raise ConfigError(f"{path}: {problem}")
    dump = base.model_dump(mode="json")
    for name, variant in config.variants.items():
        for text in variant:
            dotted = text.split("=", 1)[0].strip()
            _check_path(dump, dotted, label=f"variant {name}, override {text!r}: {dotted}")
        _check_values(
            base_data,
            {VARIANT: name},
            config.variants,
            f"variant {name}: its overrides make a config the experiment refuses",
        )
    for text in config.report.overrides:
        dotted = text.split("=", 1)[0].strip()
        if dotted.split(".", 1)[0] not in REPORT_SECTIONS:
            raise ConfigError(
                f"report override {text!r}: only {' and '.join(REPORT_SECTIONS)} settings may differ in the report's "
                "evaluations (anything else would name other runs than the trials trained); put it in overrides"
            )
        _check_path(dump, dotted, label=f"report override {text!r}: {dotted}")
    if config.report.overrides:
        try:
            build_config(ExperimentConfig, apply_overrides(base_data, config.report.overrides), where="")
        except ConfigError as err:
            raise ConfigError(f"report.overrides make a config the experiment refuses:\n{err}") from None
    for dotted, dist in config.space.items():
        if dotted == VARIANT:
            continue
        _check_path(dump, dotted, label=f"space path {dotted}")
        for value in dist.ends():
            _check_values(
                base_data,
                {dotted: value},
                config.variants,
                f"space path {dotted}: the value {value!r} ({dist.kind}) is one the experiment config refuses",
            )
    return Sweep(path, config, base_data, base)
