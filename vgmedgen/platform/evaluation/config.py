"""The ``evaluate`` section of an experiment: what to score, against what, and how the evaluation nets train."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from vgmedgen.model.configbase import StrictConfig
from vgmedgen.model.domain_nets import DOMAIN_NET_PRESETS
from vgmedgen.model.sampler import SamplerConfig
from vgmedgen.platform.metrics.fidelity import FidelityConfig
from vgmedgen.platform.training.config import ScalingOptions, StageTrainConfig

__all__ = ["ControllabilityConfig", "DownstreamConfig", "EvaluateConfig", "PLANS"]

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
