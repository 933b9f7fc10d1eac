"""The generator's typed config and presets (``GeneratorConfig`` and its parts, ``GENERATOR_PRESETS``).

Kept apart from :mod:`vgmedgen.model.generator` so that loading an experiment config imports no diffusers:
every Ray worker that only reads a config (data tasks, the trainer's controller, the visual and align
stages) starts seconds sooner. :mod:`vgmedgen.model.generator` re-exports everything here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from vgmedgen.model.autoencoder import AutoencoderConfig
from vgmedgen.model.configbase import StrictConfig, build_config, choose_preset, deep_merge
from vgmedgen.model.hffm import HFFMConfig
from vgmedgen.model.lora import LoraSettings

__all__ = [
    "GENERATOR_PRESETS",
    "PIXEL_CHANNELS",
    "BackboneConfig",
    "ColourLossConfig",
    "ConditioningConfig",
    "GeneratorConfig",
    "NoiseScheduleConfig",
    "build_generator_config",
]

PIXEL_CHANNELS = 3

# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


class BackboneConfig(StrictConfig):
    """``PixArtTransformer2DModel`` architecture (the diffusers constructor's names).

    Attributes:
        sample_size: side of the diffused sample (latent side with a VAE, image side without).
        patch_size: patch side; the transformer sees ``(sample_size / patch_size)^2`` tokens.
        num_layers: transformer blocks.
        num_attention_heads: heads per attention.
        attention_head_dim: width per head; the backbone width is ``heads * head_dim``.
        in_channels: channels of the diffused sample (3 in pixel space, the VAE's latent channels).
        learned_sigma: the output has ``2 * in_channels`` channels (epsilon, then a variance
            that this project does not train, as the reference); only the first half is used.
        caption_channels: width of the caption tokens entering PixArt's caption projection
            (4096, T5's width, for the pretrained checkpoint).
        dropout: dropout inside the blocks.
        norm_eps: LayerNorm epsilon.
        activation_fn: feed-forward activation.
        interpolation_scale: position-embedding scale (diffusers default: ``max(sample_size // 64, 1)``).
    """

    sample_size: int = Field(ge=1)
    patch_size: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    attention_head_dim: int = Field(ge=1)
    in_channels: int = Field(ge=1)
    learned_sigma: bool = False
    caption_channels: int = Field(ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    norm_eps: float = Field(1e-6, gt=0)
    activation_fn: str = "gelu-approximate"
    interpolation_scale: int | None = None

    @property
    def inner_dim(self) -> int:
        """Backbone width D."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_channels(self) -> int:
        """Output channels (doubled with learned sigma)."""
        return 2 * self.in_channels if self.learned_sigma else self.in_channels

    @model_validator(mode="after")
    def _check(self) -> BackboneConfig:
        if self.sample_size % self.patch_size:
            raise ValueError(
                f"sample_size {self.sample_size} is not a multiple of patch_size {self.patch_size}; "
                "choose sizes so that sample_size / patch_size is an integer"
            )
        return self

    def diffusers_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``PixArtTransformer2DModel(**kwargs)``."""
        return {
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "dropout": self.dropout,
            "cross_attention_dim": self.inner_dim,
            "sample_size": self.sample_size,
            "patch_size": self.patch_size,
            "activation_fn": self.activation_fn,
            "norm_eps": self.norm_eps,
            "interpolation_scale": self.interpolation_scale,
            # Resolution/aspect micro-conditions exist only in the 1024-px checkpoints; we pass None.
            "use_additional_conditions": False,
            "caption_channels": self.caption_channels,
        }


class NoiseScheduleConfig(StrictConfig):
    """DDPM noise schedule shared by training and the DPM-Solver++ sampler (PixArt-alpha's), and
    what the network predicts.

    Attributes:
        num_train_timesteps: diffusion steps T.
        beta_schedule: diffusers' beta schedule name.
        beta_start: first beta (linear schedules).
        beta_end: last beta (linear schedules).
        prediction_type: the network's output: ``epsilon`` (the noise, PixArt-alpha's) or
            ``v_prediction`` (``v = sqrt(a) eps - sqrt(1 - a) x0``, Salimans & Ho 2022): a usable
            clean estimate at every noise level, where an epsilon network's ``x0`` estimate at high
            noise divides its error by ``sqrt(a)``. :meth:`Generator.forward` returns epsilon
            either way (converted exactly), so sampling and guidance do not change.
        loss_weighting: ``none`` (plain MSE of the prediction) or ``min_snr`` (Min-SNR-gamma,
            Hang et al. 2023: each timestep's MSE weighted so that low-noise steps, whose easy
            targets otherwise dominate the gradient, count at most as much as SNR = ``gamma``).
        min_snr_gamma: gamma of ``min_snr``.
    """

    num_train_timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = Field(1e-4, gt=0)
    beta_end: float = Field(0.02, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    loss_weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = Field(5.0, gt=0)

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for diffusers schedulers (``DDPMScheduler``, ``DPMSolverMultistepScheduler``)."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }


class ConditioningConfig(StrictConfig):
    """Condition dropout (classifier-free guidance training) and the condition source.

    One uniform draw per sample picks: whole condition dropped (``drop_all``), anatomy alone
    dropped (``drop_anatomy``), style alone dropped (``drop_style``), or nothing dropped.

    Attributes:
        drop_all: probability that both streams become their learned nulls.
        drop_anatomy: probability that the anatomy stream alone becomes null.
        drop_style: probability that the style stream alone becomes null.
        condition_source: probability that a sample is conditioned on the image's own visual
            priors instead of the text heads' (t_a, t_s) (0.5 in ours, 0 in the reference).
    """

    drop_all: float = Field(0.1, ge=0.0, le=1.0)
    drop_anatomy: float = Field(0.1, ge=0.0, le=1.0)
    drop_style: float = Field(0.1, ge=0.0, le=1.0)
    condition_source: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> ConditioningConfig:
        total = self.drop_all + self.drop_anatomy + self.drop_style
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"drop_all + drop_anatomy + drop_style = {total:.3f} > 1; they are exclusive events, "
                "lower them so that they sum to at most 1"
            )
        return self


class ColourLossConfig(StrictConfig):
    """The colour distribution loss on the differentiable one-step clean estimate.

    Attributes:
        weight: weight of the loss in the total (0 turns it off).
        t_min: smallest timestep (inclusive) at which it is applied.
        t_max: largest timestep (inclusive): at high noise ``x0_hat`` is unreliable.
        every_k: apply it on steps where ``step % every_k == 0``.
        decode_max_images: with a VAE, decode at most this many in-range images per step.
        latent_crop: with a VAE, decode a random ``latent_crop x latent_crop`` latent window
            instead of the whole latent (None: whole latent).
    """

    weight: float = Field(0.05, ge=0.0)
    t_min: int = Field(0, ge=0)
    t_max: int = Field(500, ge=0)
    every_k: int = Field(1, ge=1)
    decode_max_images: int = Field(2, ge=1)
    latent_crop: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> ColourLossConfig:
        if self.t_min > self.t_max:
            raise ValueError(f"t_min {self.t_min} > t_max {self.t_max}; the timestep range is empty")
        return self


class GeneratorConfig(StrictConfig):
    """Everything that defines the generator (stage 3) and how it trains.

    Attributes:
        backbone: the PixArt transformer's architecture.
        init: ``pretrained`` (load ``pretrained_dir``) or ``scratch`` (PixArt's own random init).
        train: ``lora`` (adapters + HFFM train) or ``full`` (backbone + HFFM train).
        pretrained_dir: a local diffusers pipeline dir (transformer in ``transformer/``) or the
            transformer dir itself; required with ``init='pretrained'``.
        vae_dir: a local pipeline dir (``vae/``) or VAE dir; None = pixel-space diffusion.
        autoencoder: diffuse the latents of an autoencoder trained on the dataset (the ``autoencoder``
            training stage; kept in the generator part as ``vae/``) instead; exclusive with ``vae_dir``.
        hffm: the fusion of the anatomy and style streams.
        conditioning: condition dropout and condition source.
        lora: LoRA settings (``train='lora'``).
        schedule: the DDPM noise schedule.
        colour: the colour distribution loss.
        ema_decay: decay of the EMA of the trained parameters (sampled from).
        gradient_checkpointing: recompute block activations in backward (saves memory on GPU).
        dtype: ``float32``, or ``bfloat16`` (CUDA only: frozen weights stored in bf16, trained
            weights kept in fp32, forward under autocast).
    """

    backbone: BackboneConfig
    init: Literal["pretrained", "scratch"] = "scratch"
    train: Literal["lora", "full"] = "full"
    pretrained_dir: Path | None = None
    vae_dir: Path | None = None
    autoencoder: AutoencoderConfig | None = None
    hffm: HFFMConfig = HFFMConfig()
    conditioning: ConditioningConfig = ConditioningConfig()
    lora: LoraSettings = LoraSettings()
    schedule: NoiseScheduleConfig = NoiseScheduleConfig()
    colour: ColourLossConfig = ColourLossConfig()
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0)
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _check(self) -> GeneratorConfig:
        if self.init == "scratch" and self.train == "lora":
            raise ValueError(
                "init='scratch' with train='lora' would train adapters on a random frozen base, which "
                "learns nothing; use train='full' for scratch, or init='pretrained' with pretrained_dir"
            )
        if self.init == "pretrained" and self.pretrained_dir is None:
            raise ValueError(
                "init='pretrained' needs pretrained_dir: a local PixArt pipeline directory (with "
                "'transformer/') or the transformer directory itself; or use init='scratch'"
            )
        if self.vae_dir is not None and self.autoencoder is not None:
            raise ValueError(
                "vae_dir (a pretrained VAE) and autoencoder (one trained on the dataset) both given; keep one"
            )
        if self.autoencoder is not None and self.backbone.in_channels != self.autoencoder.latent_channels:
            raise ValueError(
                f"the generator diffuses the trained autoencoder's {self.autoencoder.latent_channels}-channel "
                f"latents, so backbone.in_channels must be {self.autoencoder.latent_channels} "
                f"(got {self.backbone.in_channels})"
            )
        if self.vae_dir is None and self.autoencoder is None and self.backbone.in_channels != PIXEL_CHANNELS:
            raise ValueError(
                f"without vae_dir the generator diffuses RGB pixels, so backbone.in_channels must be "
                f"{PIXEL_CHANNELS} (got {self.backbone.in_channels}); set vae_dir to diffuse VAE latents, or "
                "autoencoder to train one on the dataset"
            )
        if self.colour.t_max >= self.schedule.num_train_timesteps:
            raise ValueError(
                f"colour.t_max {self.colour.t_max} must be below schedule.num_train_timesteps "
                f"{self.schedule.num_train_timesteps}"
            )
        return self

    @property
    def downscale(self) -> int:
        """Image pixels per diffused sample along each side: 1 in pixel space, the autoencoder's factor, or 8 for
        a pretrained (Stable Diffusion family) VAE."""
        if self.autoencoder is not None:
            return self.autoencoder.downscale
        return 1 if self.vae_dir is None else 8


# --------------------------------------------------------------------------------------------
# Presets (overrides of GeneratorConfig; merge more overrides with build_generator_config)
# --------------------------------------------------------------------------------------------

GENERATOR_PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: a forward+backward in milliseconds on one CPU core.
    "tiny": {
        "backbone": {
            "sample_size": 16,
            "patch_size": 2,
            "num_layers": 2,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "in_channels": 3,
            "caption_channels": 32,
        },
        "hffm": {"hidden_dim": 32, "tokens_per_stream": 2, "branch_width": 16, "text_width": 32},
        "ema_decay": 0.99,
    },
    # CPU demo in pixel space: 32x32 images, PixArt of width 128 (4 heads of 32), 6 blocks,
    # patch 4 (64 image tokens). About 1.4 M backbone parameters; see benchmarks/dit_step_time.py.
    "demo": {
        "backbone": {
            "sample_size": 32,
            "patch_size": 4,
            "num_layers": 6,
            "num_attention_heads": 4,
            "attention_head_dim": 32,
            "in_channels": 3,
            "caption_channels": 128,
        },
        "hffm": {
            "hidden_dim": 128,
            "tokens_per_stream": 2,
            "branch_width": 32,
            "text_width": 128,
            "standardize": True,
        },
        # v-prediction: in a 4,000-step sweep on the demo (same stages 1-2, batch 32) anatomy adherence
        # reached 0.60 / 0.81 (size / position) by step 2,300 against 0.35 / 0.24 with epsilon.
        "schedule": {"prediction_type": "v_prediction"},
        "ema_decay": 0.995,
    },
    # The paper's setting: PixArt-XL-2-512x512 (28 blocks, width 1152 = 16 x 72, patch 2,
    # learned sigma) + LoRA r=8, bf16 with gradient checkpointing on GPU. pretrained_dir and
    # vae_dir (e.g. both the local PixArt-XL-2-512x512 pipeline directory) must be given.
    "pixart-512": {
        "backbone": {
            "sample_size": 64,
            "patch_size": 2,
            "num_layers": 28,
            "num_attention_heads": 16,
            "attention_head_dim": 72,
            "in_channels": 4,
            "learned_sigma": True,
            "caption_channels": 4096,
        },
        "init": "pretrained",
        "train": "lora",
        "hffm": {"tokens_per_stream": 4, "branch_width": 64},
        "colour": {"every_k": 4, "decode_max_images": 2, "latent_crop": 32},
        "gradient_checkpointing": True,
        "dtype": "bfloat16",
    },
}


def build_generator_config(preset: str, overrides: Mapping[str, Any] | None = None) -> GeneratorConfig:
    """A preset from :data:`GENERATOR_PRESETS`, deep-merged with ``overrides``, validated.

    Args:
        preset: ``tiny``, ``demo`` or ``pixart-512``.
        overrides: nested dict of fields to change, e.g. ``{"hffm": {"mode": "tokens"}}``.

    Raises:
        ConfigError: unknown preset or invalid values (the message names the field and the fix).
    """
    base = choose_preset(GENERATOR_PRESETS, preset, "generator")
    return build_config(
        GeneratorConfig, deep_merge(base, overrides or {}), where=f"generator preset '{preset}'"
    )
