"""The ``generate`` section of an experiment: which model version, what to generate (policies), how the
Ray Data job runs (batch size, actors), which quality filters apply and what it writes.

A policy is a one-key mapping in YAML, e.g.::

    generate:
      model: vgmedgen-demo@current
      policies:
        - balance: {}                 # top every class up to the largest
        - multiply: 2                 # 2 x the real train rows of each class
        - per_class: {nevus: 100}     # exact counts per label
        - from_records: {}            # every real train record's prompts again, new seeds
        - swap_grid: {anatomy_prompts: [...], style_prompts: [...], seeds_per_cell: 4}
        - prompts_csv: {path: /data/prompts.csv}

Prompts and priors come from the train split only; a generated row inherits the class of the record its
prompts came from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from vgmedgen.model.configbase import StrictConfig

__all__ = [
    "MAX_GUIDANCE",
    "MAX_IMAGES",
    "MAX_PROMPT_CHARS",
    "MAX_STEPS",
    "SEED_LIMIT",
    "check_guidance",
    "check_prompt",
    "check_seed",
    "check_steps",
    "ActorOptions",
    "BalancePolicy",
    "FilterConfig",
    "FromRecordsPolicy",
    "GenerateConfig",
    "MultiplyPolicy",
    "PerClassPolicy",
    "Policy",
    "PromptsCsvPolicy",
    "SwapGridPolicy",
]


# -- the limits of what one may ask the sampler for, and their rules: shared by the sample request, the
# swap grid and this section (here, in a config module, so that loading a config stays light) ---------

MAX_PROMPT_CHARS = (
    1000  # far above any caption the text encoder keeps (it truncates to its max_length tokens)
)
MAX_IMAGES = 256  # images per request; more go in several requests
MAX_STEPS = 1000  # DPM-Solver++ steps; the noise schedules train on 1000 timesteps
MAX_GUIDANCE = 50.0
SEED_LIMIT = 2**31  # every seed below it: it fits int32, JSON numbers and every RNG API


def _error(message: str, **context: Any) -> PydanticCustomError:
    # One error type for every rule of this module, so that formatters can tell them from pydantic's own.
    return PydanticCustomError("sample_request", message, context)


def check_prompt(text: str) -> str:
    """A prompt (anatomy, style or caption) as it is allowed: not blank, at most MAX_PROMPT_CHARS.

    The ``check_*`` functions are the request's rules, for other models (the swap grid) to share;
    they raise ``PydanticCustomError``, which a pydantic validator reports as the field's error.
    """
    if not text.strip():
        raise _error("is empty; describe the image in words, or leave the field out")
    if len(text) > MAX_PROMPT_CHARS:
        raise _error(
            "has {length} characters, more than {limit}; shorten it (the text encoder keeps only its "
            "first tokens anyway)",
            length=len(text),
            limit=MAX_PROMPT_CHARS,
        )
    return text


def check_seed(value: int) -> int:
    """A first seed: in [0, 2**31)."""
    if not 0 <= value < SEED_LIMIT:
        raise _error("must lie in [0, 2**31), got {value}", value=value)
    return value


def check_steps(value: int) -> int:
    """A number of DPM-Solver++ steps: 1 to MAX_STEPS."""
    if value < 1:
        raise _error("must be a positive integer, got {value}", value=value)
    if value > MAX_STEPS:
        raise _error(
            "must be at most {limit}, got {value}; DPM-Solver++ needs about 20", value=value, limit=MAX_STEPS
        )
    return value


def check_guidance(value: float) -> float:
    """A guidance scale (g_a or g_s): finite, in [0, MAX_GUIDANCE]."""
    if not (math.isfinite(value) and 0.0 <= value <= MAX_GUIDANCE):
        raise _error(
            "must be a number in [0, {limit}] (1 = no guidance, the paper uses 4.5), got {value}",
            value=value,
            limit=MAX_GUIDANCE,
        )
    return value


class BalancePolicy(StrictConfig):
    """Top up every class of the real train split to the size of its largest class."""

    balance: dict = Field(default_factory=dict, description="No options: `- balance: {}`.")

    @field_validator("balance")
    @classmethod
    def _empty(cls, v: dict) -> dict:
        if v:
            raise ValueError(f"balance takes no options (got {sorted(v)}); write `- balance: {{}}`")
        return v


class MultiplyPolicy(StrictConfig):
    """K images per real train row of each class (K may be fractional: round(K x rows) per class)."""

    multiply: float = Field(..., gt=0, le=1000, description="Synthetic rows per real train row, per class.")


class PerClassPolicy(StrictConfig):
    """Exact numbers of images per label (labels of the real train split)."""

    per_class: dict[str, int] = Field(..., description="label -> number of images (>= 1).")

    @field_validator("per_class")
    @classmethod
    def _counts(cls, v: dict[str, int]) -> dict[str, int]:
        if not v:
            raise ValueError("per_class is empty; give at least one `label: count`")
        bad = {k: n for k, n in v.items() if n < 1}
        if bad:
            raise ValueError(f"per_class counts must be >= 1, got {bad}")
        return v


class FromRecordsPolicy(StrictConfig):
    """Every real train record's prompts again, with new seeds (``repeats`` images per record)."""

    class Options(StrictConfig):
        repeats: int = Field(1, ge=1, le=1000)

    from_records: Options = Field(default_factory=Options)


class SwapGridPolicy(StrictConfig):
    """Anatomy prompts x style prompts, ``seeds_per_cell`` images per cell (no class: label is null)."""

    class Options(StrictConfig):
        anatomy_prompts: list[str] = Field(..., min_length=1)
        style_prompts: list[str] = Field(..., min_length=1)
        seeds_per_cell: int = Field(1, ge=1, le=1000)

        @field_validator("anatomy_prompts", "style_prompts")
        @classmethod
        def _prompts(cls, v: list[str]) -> list[str]:
            return [check_prompt(p) for p in v]

    swap_grid: Options


class PromptsCsvPolicy(StrictConfig):
    """A user's CSV: columns ``anatomy_prompt`` + ``style_prompt``, or ``caption``; optional ``label``,
    ``seed`` and ``n`` (images of the row, default 1)."""

    class Options(StrictConfig):
        path: Path

    prompts_csv: Options


_POLICIES = {
    "balance": BalancePolicy,
    "multiply": MultiplyPolicy,
    "per_class": PerClassPolicy,
    "from_records": FromRecordsPolicy,
    "swap_grid": SwapGridPolicy,
    "prompts_csv": PromptsCsvPolicy,
}


def _policy_kind(value: Any) -> str | None:
    # A policy is a one-key mapping naming its kind; anything else gets one message listing the kinds.
    if isinstance(value, StrictConfig):
        return next(iter(type(value).model_fields))
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _POLICIES:
        return next(iter(value))
    return None


Policy = Annotated[
    Annotated[BalancePolicy, Tag("balance")]
    | Annotated[MultiplyPolicy, Tag("multiply")]
    | Annotated[PerClassPolicy, Tag("per_class")]
    | Annotated[FromRecordsPolicy, Tag("from_records")]
    | Annotated[SwapGridPolicy, Tag("swap_grid")]
    | Annotated[PromptsCsvPolicy, Tag("prompts_csv")],
    Discriminator(
        _policy_kind,
        custom_error_type="policy",
        custom_error_message="a policy is a one-key mapping, one of: "
        + ", ".join(f"`{k}`" for k in _POLICIES)
        + " (e.g. `- balance: {}` or `- multiply: 2`)",
    ),
]


class ActorOptions(StrictConfig):
    """One actor pool of the Ray Data job (the samplers, or the scorers)."""

    size: int = Field(1, ge=1, le=4096, description="Actors in the pool.")
    num_cpus: float = Field(
        0.5,
        gt=0,
        description="Ray CPUs per actor; fractional on small machines, so that both pools fit on one node.",
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (1 on GPU clusters).")
    threads: int | None = Field(
        None, ge=1, le=1024, description="torch threads per actor; default max(1, int(num_cpus))."
    )


class FilterConfig(StrictConfig):
    """Quality filters; each is off when None. A rejected row stays in the output with its reason."""

    min_confidence: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Reject images whose real-data classifier gives the intended label less than this "
        "probability (not for single-class datasets).",
    )
    memorisation_percentile: float | None = Field(
        None,
        gt=0,
        lt=100,
        description="Reject images nearer to a train image (domain features) than this percentile of the real "
        "test-to-train nearest distances.",
    )
    property_quantiles: tuple[float, float] | None = Field(
        None,
        description="Reject images whose lesion area, position or mean lesion/skin colour lies outside these "
        "quantiles of the real train rows of the same class, e.g. [0.01, 0.99].",
    )

    @field_validator("property_quantiles")
    @classmethod
    def _band(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0.0 <= v[0] < v[1] <= 1.0:
            raise ValueError(
                f"property_quantiles must be [low, high] with 0 <= low < high <= 1, got {list(v)}"
            )
        return v


class GenerateConfig(StrictConfig):
    """The generation job: ``python jobs/generate.py --config <experiment>.yaml [generate.* overrides]``."""

    model: str | None = Field(
        None,
        description="A model version directory or `<name>@<alias>`; default: the experiment's registered model "
        "at tracking.alias.",
    )
    policies: list[Policy] = Field(default_factory=lambda: [BalancePolicy()], min_length=1)
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Output name under <output_root>/generated/<experiment>/; default: the plan's name.",
    )
    seed: int = Field(
        0, ge=0, lt=2**31, description="First seed of the plan; each row's seed derives from it."
    )
    num_steps: int | None = Field(None, description="Sampler steps (default: the model version's).")
    guidance_anatomy: float | None = None
    guidance_style: float | None = None
    batch_size: int = Field(16, ge=1, le=4096, description="Images per sampler batch (and per scorer batch).")
    shard_size: int = Field(
        256, ge=1, description="Plan rows per shard: the unit of resumption and of the per-shard statistics."
    )
    sampler: ActorOptions = ActorOptions()
    scorer: ActorOptions = ActorOptions()
    filters: FilterConfig = FilterConfig()
    export: Literal["none", "imagefolder"] = Field(
        "none", description="imagefolder: also write imagefolder/<class>/<sample_id>.png with metadata.csv."
    )
    contact_sheet_tiles: int = Field(
        64,
        ge=1,
        le=1024,
        description="Most images on each class's contact sheet (accepted first, then rejected).",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("num_steps")
    @classmethod
    def _steps(cls, v: int | None) -> int | None:
        return None if v is None else check_steps(v)

    @field_validator("guidance_anatomy", "guidance_style")
    @classmethod
    def _guidance(cls, v: float | None) -> float | None:
        return None if v is None else check_guidance(v)

    @model_validator(mode="after")
    def _batch_fits_shard(self) -> GenerateConfig:
        if self.batch_size > self.shard_size:
            raise ValueError(
                f"batch_size {self.batch_size} is larger than shard_size {self.shard_size}; a shard is resumed "
                "whole, so raise generate.shard_size or lower generate.batch_size"
            )
        return self
