"""Training configs: scaling (workers, GPUs) and the optimisation settings of each stage."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from vgmedgen.model.configbase import StrictConfig

__all__ = ["STAGES", "ScalingOptions", "StageTrainConfig", "TrainConfig", "check_batch_shares"]

# Every stage, in the order they run. The autoencoder stage runs only for a generator that diffuses the latents
# of an autoencoder trained on the dataset (model.generator.autoencoder); it needs neither visual nor align.
STAGES = ("visual", "align", "autoencoder", "dit")
# The validation metric (``<stage>/val_<name>``) that ranks each stage's checkpoints, and its better direction.
STAGE_SCORES = {
    "visual": ("dice", "max"),
    "align": ("cos", "max"),
    "autoencoder": ("psnr", "max"),
    "dit": ("loss", "min"),
}
Stage = Literal["visual", "align", "autoencoder", "dit"]
# Each stage's optimisation defaults where they differ from StageTrainConfig's; they hold for every field a config
# leaves out, also when it sets others of the same stage.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "visual": {"lr": 1e-4, "betas": (0.5, 0.999)},
    "align": {"lr": 1e-4},
    "autoencoder": {"steps": 400, "batch_size": 64, "lr": 1e-3, "val_every": 100},
    "dit": {"lr": 1e-4, "weight_decay": 1e-2, "warmup_steps": 500},
}


class ScalingOptions(StrictConfig):
    """How many Ray Train workers, with what resources. ``num_workers=0`` runs in-process without Ray."""

    num_workers: int = Field(2, ge=0, le=4096)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(
        2, ge=0, description="Worker-group restarts from the latest checkpoint before giving up."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    threads_per_worker: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch threads in each worker; default int(cpus_per_worker), at least 1. Part of every "
        "stage's identity: the thread count changes floating-point reduction order, so results.",
    )

    @property
    def world_size(self) -> int:
        """Training processes: ``num_workers``, or 1 for the in-process run of ``num_workers=0``."""
        return max(self.num_workers, 1)

    @property
    def threads(self) -> int:
        """The torch thread count each worker sets (``threads_per_worker`` or ``int(cpus_per_worker)``)."""
        return self.threads_per_worker or max(int(self.cpus_per_worker), 1)


def check_batch_shares(batch_size: int, grad_accum: int, world: int, where: str) -> None:
    """Refuse a global batch that ``world`` ranks x ``grad_accum`` micro-batches cannot share equally.

    Unequal shares change the algorithm (a rank's mean weighs its rows differently) and a rank with no
    rows crashes while the others wait in the gradient all-reduce.
    """
    if batch_size % (world * grad_accum):
        lower = (batch_size // (world * grad_accum)) * world * grad_accum
        upper = lower + world * grad_accum
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(
            f"{where}batch_size {batch_size} is the global batch, shared by num_workers {world} x grad_accum "
            f"{grad_accum} = {world * grad_accum} micro-batch shares, which it must be a multiple of: set "
            f"batch_size to {nearest}, or change train.scaling.num_workers / grad_accum"
        )


class StageTrainConfig(StrictConfig):
    """Optimisation of one stage. ``batch_size`` is global per optimiser step (all workers, all micro-batches)."""

    steps: int = Field(200, ge=1)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    clip_norm: float | None = Field(1.0, gt=0)
    checkpoint_every: int = Field(100, ge=1)
    num_to_keep: int = Field(2, ge=1)
    val_every: int = Field(100, ge=1)
    val_batches: int = Field(2, ge=1)
    sample_every: int = Field(
        0, ge=0, description="dit: write a sample grid every N steps (0: only at the end)."
    )
    log_every: int = Field(10, ge=1)
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA only."
    )
    fail_at_step: int | None = Field(
        None,
        ge=0,
        description="Fault injection (tests, drills): fail once when this many steps have finished.",
    )
    fail_mode: Literal["raise", "sigkill"] = Field(
        "raise",
        description="raise: an exception in the loop before the step; sigkill: rank 0 kills its own process "
        "right after reporting the checkpoint of that step, as a lost node would (fail_at_step must then be a "
        "multiple of checkpoint_every).",
    )

    @model_validator(mode="after")
    def _batch_divides(self) -> StageTrainConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}"
            )
        if self.fail_mode == "sigkill" and self.fail_at_step is not None:
            if self.fail_at_step % self.checkpoint_every or not 0 < self.fail_at_step < self.steps:
                raise ValueError(
                    f"fail_mode=sigkill kills a worker after a checkpoint: fail_at_step {self.fail_at_step} must be a "
                    f"multiple of checkpoint_every {self.checkpoint_every} below steps {self.steps}"
                )
        return self


class TrainConfig(StrictConfig):
    """Which stages run, on what resources, and each stage's optimisation."""

    stages: tuple[Stage, ...] = ("visual", "align", "dit")
    ingest: Literal["memory", "ray_data"] = Field(
        "memory",
        description="memory: each worker decodes the split once and draws batches that are a pure function of "
        "(seed, step, rank), best for datasets that fit in RAM (and on small boxes, where Ray Data ingestion "
        "starves when workers hold every CPU); ray_data: stream each worker's shard through Ray Data, for large datasets.",
    )
    init_from: str | None = Field(
        None, description="A model version directory or registry alias providing the stages that are not run."
    )
    min_mask_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="The visual stage refuses to train when fewer than this fraction of the train records have a "
        "lesion mask (its segmentor learns from them, and prompts state size and position only where one exists); "
        "0 trains on any number, none included.",
    )
    find_unused_parameters: Literal["auto"] | bool = Field(
        "auto",
        description="DDP's search for parameters a step left unused (an extra autograd traversal every step). "
        "auto: on for visual and align (align's BERT pooler trains no parameter), off for dit, where every "
        "trainable parameter takes part in every step in every HFFM mode (tests/test_generator.py checks it). "
        "Set true if a customised generator leaves parameters out of some steps (DDP then says so).",
    )
    cache_conditions: bool = Field(
        True,
        description="dit: compute the frozen stages' conditions (visual priors, text-encoder outputs) of the "
        "train split once per worker instead of in every step (memory ingest, when they fit in "
        "CONDITION_CACHE_MB); the same values either way, a shorter step.",
    )
    scaling: ScalingOptions = ScalingOptions()
    visual: StageTrainConfig = StageTrainConfig(**STAGE_DEFAULTS["visual"])
    align: StageTrainConfig = StageTrainConfig(**STAGE_DEFAULTS["align"])
    autoencoder: StageTrainConfig = StageTrainConfig(**STAGE_DEFAULTS["autoencoder"])
    dit: StageTrainConfig = StageTrainConfig(**STAGE_DEFAULTS["dit"])

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults_under_overrides(cls, data: Any) -> Any:
        """A stage section given in part (``train.dit.steps=100``) keeps the stage's own defaults for the rest."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        for stage, defaults in STAGE_DEFAULTS.items():
            given = data.get(stage)
            if isinstance(given, Mapping):
                data[stage] = {**defaults, **given}
        return data

    @model_validator(mode="after")
    def _stages_in_order(self) -> TrainConfig:
        if not self.stages:
            raise ValueError(f"train.stages is empty; name at least one of {', '.join(STAGES)}")
        order = [STAGES.index(s) for s in self.stages]
        if order != sorted(set(order)):
            raise ValueError(
                f"train.stages must be in the order {', '.join(STAGES)} without repeats, got {list(self.stages)}"
            )
        if self.stages[0] not in ("visual", "autoencoder") and self.init_from is None:
            raise ValueError(
                f"train.stages starts at '{self.stages[0]}', which needs the earlier stages: set train.init_from to a "
                "model version directory or registry alias"
            )
        for stage in STAGES:
            cfg: StageTrainConfig = getattr(self, stage)
            check_batch_shares(cfg.batch_size, cfg.grad_accum, self.scaling.world_size, f"train.{stage}.")
        return self
