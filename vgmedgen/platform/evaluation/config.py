"""The ``evaluate`` and ``adherence`` sections of an experiment: what to score, against what, and how the
evaluation nets (the ruler of the adherence check among them) train."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from vgmedgen.model.configbase import StrictConfig
from vgmedgen.model.domain_nets import DOMAIN_NET_PRESETS
from vgmedgen.model.sampler import SamplerConfig
from vgmedgen.platform.datasets.synthderm.config import ANATOMY_FACTORS, FACTORS, STYLE_FACTORS
from vgmedgen.platform.training.config import ScalingOptions, StageTrainConfig

__all__ = [
    "AdherenceConfig",
    "ControllabilityConfig",
    "DownstreamConfig",
    "EvaluateConfig",
    "PLANS",
    "RulerConfig",
]

# Augmentation plans of the downstream benchmark: balance the minority classes up to the largest
# class, or add synthetic rows equal to x0.5 / x1 / x2 the real train split (real class mix).
PLANS = ("balance", "x0.5", "x1", "x2")

_NET_TRAIN = StageTrainConfig(
    steps=300, batch_size=64, lr=2e-3, warmup_steps=20, weight_decay=1e-4, checkpoint_every=100, val_every=100
)


def _preset(v: str) -> str:
    if v not in DOMAIN_NET_PRESETS:
        raise ValueError(f"unknown domain network preset {v!r}; presets are {', '.join(DOMAIN_NET_PRESETS)}")
    return v


# torch-fidelity's Inception weights file (the name its URL ends with; metrics/fidelity.py checks they agree).
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


class FidelityConfig(StrictConfig):
    """How FID/KID and the domain distances are computed."""

    fid: Literal["auto", "required", "off"] = Field(
        "auto",
        description="auto: compute FID/KID when the Inception weights file exists, else warn and skip; "
        "required: fail without it; off: never.",
    )
    feature_extractor_weights_path: Path | None = Field(
        None, description=f"Local copy of torch-fidelity's Inception weights ({INCEPTION_WEIGHTS_FILE})."
    )
    batch_size: int = Field(64, ge=1, le=4096, description="Images per feature-extraction batch.")
    kid_subsets: int = Field(100, ge=1, le=100_000, description="Random subsets of the kernel distance.")
    kid_subset_size: int = Field(
        1000, ge=2, description="Rows per KID subset (adapted down for small sets, with a warning)."
    )
    reservoir_size: int = Field(
        10_000,
        ge=2,
        description="Rows per set kept (seeded, shard-order independent) for kernel distances and floors.",
    )
    seed: int = Field(
        2020, description="Seed of the KID subsets and the reservoir sample (2020 = torch-fidelity's)."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def inception_weights_present(self) -> bool:
        """Whether ``feature_extractor_weights_path`` names an existing file (FID/KID can then run)."""
        path = self.feature_extractor_weights_path
        return path is not None and Path(path).expanduser().is_file()

    @model_validator(mode="after")
    def _reservoir_holds_a_subset(self) -> FidelityConfig:
        if self.reservoir_size < self.kid_subset_size:
            raise ValueError(
                f"reservoir_size ({self.reservoir_size}) must be >= kid_subset_size ({self.kid_subset_size}): "
                "kernel distances draw their subsets from the reservoir"
            )
        return self


class ControllabilityConfig(StrictConfig):
    """SynthDerm judges and the matched/swapped factor accuracy of generated images."""

    enabled: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: on for SynthDerm (the only dataset whose true factors are known)."
    )
    num_prompts: int = Field(
        200, ge=1, description="Prompts of each kind (matched, swapped), from the val split."
    )
    judge_net: str = "demo"
    # 1,200 steps: position needs them (0.46 at 600 steps without coordinate channels, 0.99 at 1,200 with them).
    judge_train: StageTrainConfig = _NET_TRAIN.model_copy(update={"steps": 1200})
    judge_target: float = Field(
        0.9, ge=0, le=1, description="Judge accuracy each factor should reach on real val."
    )

    @field_validator("enabled", mode="before")
    @classmethod
    def _yaml_booleans(cls, v: object) -> object:
        # YAML reads on/off (unquoted) as booleans
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("judge_net")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        return _preset(v)


class DownstreamConfig(StrictConfig):
    """The augmentation benchmark: real only versus real plus synthetic, evaluated on the real test split."""

    enabled: bool = False
    plans: tuple[Literal["balance", "x0.5", "x1", "x2"], ...] = PLANS
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1)
    task: Literal["auto", "classification", "segmentation"] = Field(
        "auto", description="auto: classification when the train split has >= 2 labels, else segmentation."
    )
    net: str = "demo"
    train: StageTrainConfig = _NET_TRAIN
    real_per_class: int | None = Field(
        None, ge=1, description="Low-data setting: keep at most this many real train rows per class (seeded)."
    )
    cpus_per_run: float = Field(1.0, gt=0, description="Ray CPUs of one (plan, seed) training run.")

    @field_validator("net")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        return _preset(v)


class EvaluateConfig(StrictConfig):
    """How ``jobs/evaluate.py`` scores a model version (or a folder of generated images)."""

    model: str | None = Field(
        None,
        description="A model version directory or '<registered name>@<alias>'; None: this experiment's "
        "registered model at tracking.alias.",
    )
    generated_dir: Path | None = Field(
        None,
        description="Score these PNG files instead of generating (no controllability or downstream then).",
    )
    num_images: int = Field(512, ge=2, description="Generated images scored against the reference split.")
    reference_split: str = "test"
    seed: int = 0
    instrument_seed: int = Field(
        0,
        ge=0,
        description="Seed of the evaluation networks (the domain network, the judges). Never the experiment's "
        "seed: models trained with different seeds are measured with the same instruments.",
    )
    sampler: SamplerConfig | None = Field(None, description="Sampler settings (None: the model's own).")
    batch_size: int = Field(64, ge=1, description="Images per generate call.")
    fidelity: FidelityConfig = FidelityConfig()
    domain_net: str = Field("demo", description="Domain extractor preset (tiny / demo / paper).")
    domain_train: StageTrainConfig = _NET_TRAIN
    memorisation_percentile: float = Field(5.0, gt=0, lt=100)
    scaling: ScalingOptions = Field(
        ScalingOptions(num_workers=0),
        description="Ray Train workers of the evaluation nets (0: in-process, right for small nets).",
    )
    controllability: ControllabilityConfig = ControllabilityConfig()
    downstream: DownstreamConfig = DownstreamConfig()

    @field_validator("domain_net")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        return _preset(v)


# ---------------------------------------------------------------------------------------------
# The adherence check of a swap grid (jobs/demo.py)
# ---------------------------------------------------------------------------------------------


class RulerConfig(StrictConfig):
    """The instrument that reads lesion size, position and colour of swap-grid images.

    A segmentation network trained once on the real train records (at their resolution, through the
    shared loop) and reused for every model measured: its run name is a hash of this section and the
    records, never of the model under test. Defaults measured on the 600 real validation records of
    ``configs/demo.yaml`` (true masks: 1.00 / 1.00 / 0.83): ``tiny`` at 400 steps reads size 0.97,
    position 0.98, pigment 0.81 (Dice 0.91) in ~30 s on 2 cores; see
    :mod:`vgmedgen.platform.evaluation.adherence` for the alternatives measured.
    """

    net: str = Field("tiny", description="Domain network preset of the segmentor (tiny / demo / paper).")
    train: StageTrainConfig = _NET_TRAIN.model_copy(
        update={"steps": 400, "checkpoint_every": 200, "val_every": 200}
    )
    seed: int = 0
    scaling: ScalingOptions = Field(
        ScalingOptions(num_workers=0), description="Ray Train workers (0: in the driver's process)."
    )

    @field_validator("net")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        return _preset(v)


def _check_factor_cells(cells: Sequence[Mapping[str, str]], allowed: tuple[str, ...], what: str) -> None:
    for k, cell in enumerate(cells):
        for factor, value in cell.items():
            if factor not in allowed:
                raise ValueError(f"{what}[{k}]: {factor!r} is not one of the factors {', '.join(allowed)}")
            if value not in FACTORS[factor]:
                raise ValueError(
                    f"{what}[{k}]: {factor}={value!r} is not a SynthDerm value; allowed: {', '.join(FACTORS[factor])}"
                )


class AdherenceConfig(StrictConfig):
    """The swap grid the demo samples, the agreement each factor must reach, and the ruler that measures it.

    Out of every training identity (like ``evaluate``): changing it re-measures, never retrains.

    Attributes:
        rows: one anatomy factor combination per grid row (must name ``size`` and ``position``);
            the anatomy factors a row leaves out come from ``anatomy_defaults``.
        columns: one style factor combination per grid column (must name ``pigment``); the
            style factors a column leaves out come from ``style_defaults``.
        anatomy_defaults: the other anatomy factors of every row prompt.
        style_defaults: the other style factors of every column prompt.
        seeds_per_cell: images per (row, column) cell: seeds ``seed, ..., seed + seeds_per_cell - 1``
            in every cell, so that along a row or a column only the prompt changes.
        seed: the first seed.
        size_threshold: the size agreement needed to pass (chance 1/3).
        position_threshold: the position agreement needed to pass (chance 1/5).
        colour_threshold: the colour agreement needed to pass (chance 1/5).
        mask_threshold: mask probability above which a pixel is lesion (size, position).
        colour_mask_threshold: the lesion colour is the mean over pixels of at least this
            mask probability (the confident core). Measured on 500 real validation images
            through a 300-step demo segmentor, references from true masks: pigment agreement
            0.73 at 0.5, 0.77 at 0.8, 0.78 at 0.9, 0.76 at 0.97 (0.84 with the true masks).
        colour_context: style factors the reference colours are conditioned on (besides the
            pigment), matched to each column's prompt.
        min_calibration_records: a (context, pigment) reference needs at least this many real
            records; with fewer, the context is coarsened (its last factor dropped), down to the
            pigment alone.
        calibration_records: how many real records (from ``calibration_split``) calibrate the
            reference colours.
        calibration_split: the split the references come from.
        sampler: sampler settings for the grid (None: the model's own).
        batch_size: images per ``generate`` call.
        ruler: the model-independent instrument whose figures are the headline.
    """

    rows: tuple[dict[str, str], ...] = (
        {"size": "small", "position": "centre"},
        {"size": "medium", "position": "upper left"},
        {"size": "large", "position": "lower right"},
        {"size": "small", "position": "upper right"},
        {"size": "medium", "position": "lower left"},
        {"size": "large", "position": "centre"},
    )
    columns: tuple[dict[str, str], ...] = (
        {"pigment": "light brown", "skin_tone": "light"},
        {"pigment": "dark brown", "skin_tone": "medium"},
        {"pigment": "black", "skin_tone": "light"},
        {"pigment": "pink", "skin_tone": "medium"},
        {"pigment": "blue-grey", "skin_tone": "light"},
    )
    anatomy_defaults: dict[str, str] = {"shape": "round", "border": "sharp", "count": "one"}
    style_defaults: dict[str, str] = {
        "skin_tone": "light",
        "illumination": "even",
        "artefact": "none",
        "device": "polarised",
    }
    seeds_per_cell: int = Field(2, ge=1, le=64)
    seed: int = Field(0, ge=0)
    size_threshold: float = Field(0.6, ge=0.0, le=1.0)
    position_threshold: float = Field(0.6, ge=0.0, le=1.0)
    colour_threshold: float = Field(0.6, ge=0.0, le=1.0)
    mask_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    colour_mask_threshold: float = Field(0.9, gt=0.0, lt=1.0)
    colour_context: tuple[str, ...] = ("skin_tone", "illumination", "device")
    min_calibration_records: int = Field(8, ge=1)
    calibration_records: int = Field(4000, ge=1)
    calibration_split: str = "train"
    sampler: SamplerConfig | None = None
    batch_size: int = Field(64, ge=1)
    ruler: RulerConfig = RulerConfig()

    @field_validator("colour_context")
    @classmethod
    def _context_factors(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [f for f in v if f not in STYLE_FACTORS or f == "pigment"]
        if bad:
            allowed = ", ".join(f for f in STYLE_FACTORS if f != "pigment")
            raise ValueError(
                f"colour_context factors {bad} are not style factors other than pigment; allowed: {allowed}"
            )
        return v

    @model_validator(mode="after")
    def _check_cells(self) -> AdherenceConfig:
        if not self.rows or not self.columns:
            raise ValueError(
                "adherence needs at least one row (anatomy prompt) and one column (style prompt)"
            )
        _check_factor_cells(self.rows, ANATOMY_FACTORS, "rows")
        _check_factor_cells(self.columns, STYLE_FACTORS, "columns")
        _check_factor_cells([self.anatomy_defaults], ANATOMY_FACTORS, "anatomy_defaults")
        _check_factor_cells([self.style_defaults], STYLE_FACTORS, "style_defaults")
        for k, row in enumerate(self.rows):
            missing = {"size", "position"} - set(row)
            if missing:
                raise ValueError(
                    f"rows[{k}] must name {' and '.join(sorted(missing))}: they are what the rows measure"
                )
            if not set(ANATOMY_FACTORS) <= set(row) | set(self.anatomy_defaults):
                raise ValueError(
                    f"rows[{k}] with anatomy_defaults does not give every anatomy factor {ANATOMY_FACTORS}"
                )
        for k, col in enumerate(self.columns):
            if "pigment" not in col:
                raise ValueError(f"columns[{k}] must name a pigment: it is what the columns measure")
            if not set(STYLE_FACTORS) <= set(col) | set(self.style_defaults):
                raise ValueError(
                    f"columns[{k}] with style_defaults does not give every style factor {STYLE_FACTORS}"
                )
        return self

    @property
    def thresholds(self) -> dict[str, float]:
        """Factor -> agreement needed to pass."""
        return {
            "size": self.size_threshold,
            "position": self.position_threshold,
            "colour": self.colour_threshold,
        }

    def row_factors(self) -> list[dict[str, str]]:
        """Every row's complete anatomy factors."""
        return [{**self.anatomy_defaults, **row} for row in self.rows]

    def column_factors(self) -> list[dict[str, str]]:
        """Every column's complete style factors."""
        return [{**self.style_defaults, **col} for col in self.columns]
