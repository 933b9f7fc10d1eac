"""Frozen VAE behind a small ``encode``/``decode`` wrapper (latent-space presets only).

PixArt-alpha diffuses in the latent space of the Stable Diffusion VAE (``AutoencoderKL``,
8x down-sampling, 4 latent channels). The constants (scaling factor, optional shift factor,
down-sampling factor) are read from the VAE's own config, never hard-coded. A modality with no
pretrained VAE (and the CPU demo) trains a small one on its own records: :class:`AutoencoderConfig`
describes it, the ``autoencoder`` training stage fits it, and the generator part of the model version
keeps it (``generator/vae/``).

Shape legend: N batch, H/W image size, h/w latent size (H / f), c latent channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from vgmedgen.model.configbase import StrictConfig

__all__ = [
    "AutoencoderConfig",
    "ComponentNotFoundError",
    "FrozenAutoencoder",
    "SD_VAE_KWARGS",
    "resolve_component_dir",
]

# The Stable Diffusion / PixArt-alpha VAE architecture (sd-vae-ft-ema), for building it without
# weights (parameter counts on the meta device, GPU smoke tests).
SD_VAE_KWARGS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


class AutoencoderConfig(StrictConfig):
    """A small ``AutoencoderKL`` trained on the dataset (the ``autoencoder`` stage), whose latents the generator
    diffuses, as PixArt diffuses the Stable Diffusion VAE's.

    Attributes:
        block_out_channels: channels of each resolution level; the latents are ``2^(levels - 1)`` times smaller
            than the images (three levels: 32 px images, 8 x 8 latents).
        layers_per_block: ResNet blocks per level.
        latent_channels: channels of the latents (the backbone's ``in_channels``).
        norm_num_groups: GroupNorm groups (divides every entry of ``block_out_channels``).
        kl_weight: weight of the KL term beside the L1 reconstruction (small: the latents stay informative,
            the scaling factor, 1 / std of the train latents, brings them to unit scale).
    """

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = Field(1, ge=1, le=8)
    latent_channels: int = Field(4, ge=1, le=64)
    norm_num_groups: int = Field(16, ge=1)
    kl_weight: float = Field(1e-6, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> AutoencoderConfig:
        if not self.block_out_channels:
            raise ValueError(
                "block_out_channels is empty; give one width per resolution level, e.g. [32, 64, 64]"
            )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"norm_num_groups {self.norm_num_groups} must divide every block_out_channels entry; {bad} do not"
            )
        return self

    @property
    def downscale(self) -> int:
        """How many image pixels one latent covers along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_kwargs(self) -> dict[str, Any]:
        """``AutoencoderKL`` arguments (scaling factor 1 until the stage measures it on the train latents)."""
        levels = len(self.block_out_channels)
        return {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * levels,
            "up_block_types": ("UpDecoderBlock2D",) * levels,
            "block_out_channels": tuple(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": 1.0,
        }

    def build(self) -> nn.Module:
        """A randomly initialised ``AutoencoderKL`` of this architecture (trainable)."""
        from diffusers import AutoencoderKL

        return AutoencoderKL(**self.diffusers_kwargs())


class ComponentNotFoundError(FileNotFoundError):
    """A configured model directory (VAE or transformer) does not hold a diffusers component."""


def resolve_component_dir(path: Path, subfolder: str, what: str, field: str) -> tuple[Path, str | None]:
    """Find a diffusers component either in ``path/subfolder`` or in ``path`` itself.

    Args:
        path: a pipeline directory (with ``subfolder/config.json``) or the component directory.
        subfolder: ``"vae"`` or ``"transformer"``.
        what: human name for the error message.
        field: the config field that holds ``path``, for the error message.

    Returns:
        ``(path, subfolder or None)`` for ``from_pretrained``.

    Raises:
        ComponentNotFoundError: neither location has a ``config.json``.
    """
    path = Path(path).expanduser()
    if (path / subfolder / "config.json").is_file():
        return path, subfolder
    if (path / "config.json").is_file():
        return path, None
    state = "does not exist" if not path.exists() else f"has neither {subfolder}/config.json nor config.json"
    raise ComponentNotFoundError(
        f"{field}: the {what} directory '{path}' {state}. Point {field} at a local diffusers pipeline "
        f"directory (with a '{subfolder}' subfolder) or at the {what} directory itself; nothing is downloaded."
    )


class FrozenAutoencoder(nn.Module):
    """A frozen ``AutoencoderKL`` mapping images in [-1, 1] to scaled latents and back.

    Args:
        vae: the diffusers VAE; it is frozen and kept in eval mode.
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.vae.requires_grad_(False)
        self.vae.eval()
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor) if getattr(cfg, "shift_factor", None) is not None else 0.0
        self.scale_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)

    @classmethod
    def from_dir(
        cls, path: Path, *, dtype: torch.dtype = torch.float32, field: str = "generator.vae_dir"
    ) -> FrozenAutoencoder:
        """Load from a local directory (a pipeline dir with ``vae/`` or the VAE dir itself); ``field`` names
        where the directory came from in the error when it holds no VAE."""
        from diffusers import AutoencoderKL

        root, subfolder = resolve_component_dir(path, "vae", "VAE", field)
        vae = AutoencoderKL.from_pretrained(
            root, subfolder=subfolder, torch_dtype=dtype, local_files_only=True
        )
        return cls(vae)

    @classmethod
    def from_config(cls, **kwargs: Any) -> FrozenAutoencoder:
        """Build a randomly initialised VAE (tests, meta-device counts); defaults to the SD architecture."""
        from diffusers import AutoencoderKL

        return cls(AutoencoderKL(**{**SD_VAE_KWARGS, **kwargs}))

    def train(self, mode: bool = True) -> FrozenAutoencoder:
        """The VAE stays in eval mode whatever the parent's mode."""
        super().train(mode)
        self.vae.eval()
        return self

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images to scaled latents, sampled from the posterior with ``generator``.

        Args:
            images: (N, 3, H, W) in [-1, 1].
            generator: draws the posterior sample (deterministic given the generator).

        Returns:
            (N, c, H / f, W / f) latents ``(z - shift) * scaling_factor``.
        """
        return self.sample(*self.moments(images), generator=generator)

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and standard deviation of ``images`` (N, 3, H, W), unscaled: (N, c, h, w) each."""
        dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(images.to(dtype)).latent_dist
        return dist.mean, dist.std

    def sample(
        self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latents drawn from the posterior ``(mean, std)`` (:meth:`moments`), the draw as the VAE's own
        ``latent_dist.sample(generator)`` makes it; ``encode(x, g)`` equals ``sample(*moments(x), g)``."""
        noise = torch.randn(
            mean.shape,
            generator=generator,
            device=generator.device if generator else mean.device,
            dtype=mean.dtype,
        ).to(mean.device)
        z = mean + std * noise  # (N, c, h, w)
        return (z - self.shift_factor) * self.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor + self.shift_factor  # (N, c, h, w)
        return self.vae.decode(z, return_dict=False)[0]  # (N, 3, H, W)

    def decode(self, latents: torch.Tensor, *, checkpointed: bool = False) -> torch.Tensor:
        """Scaled latents to images in roughly [-1, 1]; differentiable in ``latents``.

        Args:
            latents: (N, c, h, w) scaled latents.
            checkpointed: recompute the decoder in backward instead of storing its activations
                (the colour loss at 512 px: the decoder's activations dwarf the DiT's).

        Returns:
            (N, 3, h * f, w * f) images.
        """
        dtype = next(self.vae.parameters()).dtype
        latents = latents.to(dtype)
        if checkpointed and torch.is_grad_enabled():
            return checkpoint(self._decode, latents, use_reentrant=False)
        return self._decode(latents)
