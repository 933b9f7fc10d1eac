"""Stage 1 of VG-MedGen: the visual disentangler that turns an image into visual priors.

Paper: Huang et al., "Visually-Guided Controllable Medical Image Generation via Fine-Grained
Semantic Disentanglement" (arXiv 2603.10519); reference code hx111/VG-MedGen ``models/sdnet.py``,
itself after SDNet (Chartsias et al., "Factorised representation learning in cardiac image
analysis", 2019). See docs/method.md, section "Stage 1", for what follows the reference code and
what is ours.

An image is split into
- an *anatomy map*: K one-hot channels from a U-Net (hard Gumbel-softmax in training, argmax in
  evaluation), from which a segmentor predicts the lesion mask, and
- a *style* vector z of size S from a variational encoder that sees the image and the map.
A decoder rebuilds the image from the map modulated by z (AdaIN). The visual priors handed to
stage 2 are a summary of the anatomy map and mask (``moments`` or ``area``) and the style mean mu
(``style_prior="mu"``), optionally followed by the colour moments of the lesion and of the rest of
the image (``style_prior="mu_colour"``).

Shape legend: N batch, C image channels, K anatomy channels, S style size, H/W image size,
A anatomy prior size (``4 * (K + 1)`` for ``moments``, ``K`` for ``area``), P style prior size
(``S`` for ``mu``, ``S + 4 * C`` for ``mu_colour``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from vgmedgen.model.configbase import ConfigError, StrictConfig
from vgmedgen.model.losses import dice_loss, kl_divergence, l1_recon

__all__ = [
    "VISUAL_PRESETS",
    "AdaIN",
    "AnatomyEncoder",
    "PerceptualLoss",
    "PerceptualWeightsError",
    "Segmentor",
    "StyleDecoder",
    "StyleEncoder",
    "VisualConfig",
    "VisualDisentangler",
    "VisualInputError",
    "VisualOutput",
    "area_prior",
    "colour_moments",
    "gumbel_one_hot",
    "moments_prior",
    "region_moments",
]

# Per-channel moments of an empty region: no area, centred, no spread (docs/method.md, section "Stage 1").
EMPTY_REGION_MOMENTS = (0.0, 0.5, 0.5, 0.0)
# The predicted lesion mask is binarised at this probability before its moments are taken.
MASK_THRESHOLD = 0.5
# Number of torchvision VGG16 ``features`` layers the perceptual loss uses: up to relu3_1, the
# same depth as the reference's VGG19 ``features[:12]``.
VGG_LAYERS = 12


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


class VisualConfig(StrictConfig):
    """Everything that defines the visual disentangler and its stage-1 training defaults.

    The loss weights and optimiser values follow the reference (``main2.py``); ``adain="linear"``
    and ``prior="moments"`` are ours, ``adain="scalar"`` and ``prior="area"`` the reference's.
    """

    image_channels: int = Field(3, ge=1)
    anatomy_channels: int = Field(8, ge=2, description="K, the number of one-hot anatomy channels")
    style_size: int = Field(8, ge=1, description="S, the size of the style vector z")
    unet_channels: tuple[int, ...] = Field((16, 32, 64, 128), min_length=2)
    unet_strides: tuple[int, ...] = (2, 2, 2)
    unet_res_units: int = Field(2, ge=0)
    style_widths: tuple[int, ...] = Field((16, 32, 64, 128), min_length=1)
    style_hidden: int = Field(32, ge=1, description="width of the layer between pooling and mu/logvar")
    style_pool: Literal["global", "regions"] = Field(
        "global",
        description="global (reference): the style encoder sees its conv features averaged over the "
        "image; regions (ours): also the mean and std of the image's RGB inside each anatomy "
        "channel, so that a small region's colour (a lesion's pigment) is not averaged away by the skin",
    )
    segmentor_width: int = Field(64, ge=1)
    decoder_widths: tuple[int, ...] = Field((128, 64, 32), min_length=1)
    gumbel_tau: float = Field(1.0, gt=0.0)
    adain: Literal["linear", "scalar"] = Field(
        "linear",
        description="linear (ours): per-channel scale and shift from z through a linear layer; "
        "scalar (reference): the scalar mean and std of z for every channel",
    )
    prior: Literal["moments", "area"] = Field(
        "moments",
        description="moments (ours): area, centroid and spread of the mask and each anatomy "
        "channel; area (reference): the K area fractions",
    )
    style_prior: Literal["mu", "mu_colour"] = Field(
        "mu",
        description="mu (reference): the style prior is the style mean mu; mu_colour (ours): mu followed by "
        "the mean and std of the image's channels inside the predicted lesion mask and outside it (4 C "
        "numbers), the style counterpart of the anatomy `moments`: a pigment that covers 1 % of the image "
        "is a direct reading there instead of something the VAE must learn to keep through its KL",
    )
    recon_weight: float = Field(1.0, ge=0.0)
    perceptual_weight: float = Field(0.1, ge=0.0)
    kl_weight: float = Field(0.01, ge=0.0)
    dice_weight: float = Field(10.0, ge=0.0)
    z_regression_weight: float = Field(1.0, ge=0.0)
    perceptual_weights: Path | None = Field(
        None,
        description="local torchvision VGG16 weights (.pth/.pt via torch.load(weights_only=True), "
        "or .safetensors); the perceptual loss is off when unset",
    )

    @model_validator(mode="after")
    def _check(self) -> VisualConfig:
        if len(self.unet_strides) != len(self.unet_channels) - 1:
            raise ValueError(
                f"unet_strides needs one entry fewer than unet_channels (MONAI UNet): got "
                f"{len(self.unet_strides)} strides for {len(self.unet_channels)} channels"
            )
        for name in ("unet_channels", "unet_strides", "style_widths", "decoder_widths"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name} must be positive integers, got {getattr(self, name)}")
        return self

    @property
    def total_stride(self) -> int:
        """Image height and width must be multiples of this (the U-Net's total downsampling)."""
        return math.prod(self.unet_strides)

    @property
    def anatomy_prior_dim(self) -> int:
        """A, the size of the anatomy prior; stage 2's ``anatomy_dim`` must equal it."""
        return 4 * (self.anatomy_channels + 1) if self.prior == "moments" else self.anatomy_channels

    @property
    def style_prior_dim(self) -> int:
        """The size of the style prior (S, plus 4 C for ``mu_colour``); stage 2's ``style_dim`` must equal it."""
        return self.style_size + (4 * self.image_channels if self.style_prior == "mu_colour" else 0)

    @property
    def perceptual_enabled(self) -> bool:
        return self.perceptual_weights is not None and self.perceptual_weight > 0.0


VISUAL_PRESETS: dict[str, VisualConfig] = {
    # CPU unit tests and smoke runs at 16-64 px (total stride 4).
    "tiny": VisualConfig(
        unet_channels=(8, 16, 32),
        unet_strides=(2, 2),
        unet_res_units=1,
        style_widths=(8, 16, 32),
        style_hidden=16,
        segmentor_width=16,
        decoder_widths=(16, 16),
    ),
    # The CPU demo at 32-128 px (total stride 8). Region pooling and a 10x smaller KL weight, so that
    # the style prior carries the lesion's pigment: a linear probe (3,000 train / 600 val records,
    # 5 pigments, majority class 0.40) read it from the 300-step prior at 0.43 with the reference's
    # global pool and KL 0.01, 0.48 with region pooling, 0.52 with KL 0.001 (0.48 at 0.0001), and
    # 0.63 after 900 steps; skin tone stayed at 0.93 throughout. The colour moments of the lesion
    # (style_prior=mu_colour) read the pigment at 0.93 after 900 steps (skin tone 0.99), and the
    # text heads' t_s from the style text at 0.80 with a frozen text encoder (0.62 with mu alone) and
    # 1.00 with the encoder trained (the demo text preset).
    "demo": VisualConfig(
        unet_channels=(16, 32, 64, 128),
        unet_strides=(2, 2, 2),
        unet_res_units=2,
        style_widths=(16, 32, 64, 128),
        style_hidden=32,
        style_pool="regions",
        style_prior="mu_colour",
        segmentor_width=32,
        decoder_widths=(64, 32, 32),
        kl_weight=0.001,
    ),
    # The paper's setting at 512 px on a GPU (reference widths: ndf 64, decoder 128-64-32).
    "pixart-512": VisualConfig(
        unet_channels=(32, 64, 128, 256, 512),
        unet_strides=(2, 2, 2, 2),
        unet_res_units=2,
        style_widths=(16, 32, 64, 128, 128),
        style_hidden=32,
        segmentor_width=64,
        decoder_widths=(128, 64, 32),
    ),
}


class VisualInputError(ValueError):
    """Images or masks given to the visual disentangler have the wrong shape or size."""


class PerceptualWeightsError(ConfigError):
    """The configured VGG weights file for the perceptual loss is missing or unusable."""


# ----------------------------------------------------------------------------------------------
# Pure helpers: Gumbel straight-through, visual priors
# ----------------------------------------------------------------------------------------------


def gumbel_one_hot(logits: Tensor, tau: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Hard Gumbel-softmax over dim 1 with the straight-through gradient.

    The forward value is exactly one-hot (``y_hard + (y_soft - y_soft.detach())`` adds an exact
    zero, whereas ``torch.nn.functional.gumbel_softmax``'s ``y_hard - y_soft.detach() + y_soft``
    can round to 0.99999994); the gradient is that of ``softmax((logits + g) / tau)``.

    Args:
        logits: ``(N, K, H, W)`` unnormalised scores.
        tau: softmax temperature.
        generator: optional RNG for the Gumbel noise (on ``logits``' device).

    Returns:
        ``(N, K, H, W)`` one-hot map.
    """
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    tiny = torch.finfo(logits.dtype).tiny
    neg_log_u = (-torch.log(uniform.clamp_min(tiny))).clamp_min(tiny)  # Exp(1) sample, > 0
    gumbel = -torch.log(neg_log_u)  # (N, K, H, W)
    y_soft = torch.softmax((logits + gumbel) / tau, dim=1)
    y_hard = F.one_hot(y_soft.argmax(dim=1), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    return y_hard + (y_soft - y_soft.detach())


def argmax_one_hot(logits: Tensor) -> Tensor:
    """Deterministic one-hot map of the highest logit over dim 1: ``(N, K, H, W) -> (N, K, H, W)``."""
    return F.one_hot(logits.argmax(dim=1), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)


def region_moments(maps: Tensor, eps: float = 1e-6) -> Tensor:
    """Area, centroid and spread of each channel of a batch of (soft or binary) region maps.

    With pixel-centre coordinates ``x_j = (j + 0.5) / W`` and ``y_i = (i + 0.5) / H`` in [0, 1]
    (x along the width, y down the height) and weights ``m_ij >= 0``:
    ``area = sum(m) / (H * W)``, ``cx = sum(m x) / sum(m)``, ``cy = sum(m y) / sum(m)``,
    ``spread = sqrt(sum(m ((x - cx)^2 + (y - cy)^2)) / sum(m))`` (RMS distance to the centroid,
    in image widths). A channel with ``sum(m) <= eps`` is empty and gives ``(0, 0.5, 0.5, 0)``.

    Args:
        maps: ``(N, C, H, W)`` non-negative weights.
        eps: mass below which a channel counts as empty.

    Returns:
        ``(N, C, 4)``: area, cx, cy, spread.
    """
    n, c, h, w = maps.shape
    maps = maps.float()
    ys = (torch.arange(h, device=maps.device, dtype=torch.float32) + 0.5) / h  # (H,)
    xs = (torch.arange(w, device=maps.device, dtype=torch.float32) + 0.5) / w  # (W,)
    mass = maps.sum(dim=(2, 3))  # (N, C)
    empty = mass <= eps
    safe = mass.clamp_min(eps)
    cx = (maps.sum(dim=2) * xs).sum(dim=2) / safe  # (N, C)
    cy = (maps.sum(dim=3) * ys).sum(dim=2) / safe  # (N, C)
    dx2 = (xs.view(1, 1, 1, w) - cx.view(n, c, 1, 1)).pow(2)  # (N, C, 1, W)
    dy2 = (ys.view(1, 1, h, 1) - cy.view(n, c, 1, 1)).pow(2)  # (N, C, H, 1)
    spread = ((maps * (dx2 + dy2)).sum(dim=(2, 3)) / safe).clamp_min(0.0).sqrt()  # (N, C)
    area = mass / (h * w)
    moments = torch.stack([area, cx, cy, spread], dim=-1)  # (N, C, 4)
    empty_value = torch.tensor(EMPTY_REGION_MOMENTS, device=maps.device, dtype=moments.dtype)
    return torch.where(empty.unsqueeze(-1), empty_value, moments)


def moments_prior(mask: Tensor, anatomy: Tensor) -> Tensor:
    """The ``moments`` anatomy prior (ours): mask moments first, then each anatomy channel's.

    Args:
        mask: ``(N, 1, H, W)`` lesion mask in {0, 1} (or soft weights in [0, 1]).
        anatomy: ``(N, K, H, W)`` anatomy map (one-hot in evaluation).

    Returns:
        ``(N, 4 * (K + 1))``: ``[area, cx, cy, spread]`` of the mask, then of channels 0..K-1.
    """
    regions = torch.cat([mask.to(anatomy.dtype), anatomy], dim=1)  # (N, K + 1, H, W)
    return region_moments(regions).flatten(1)  # (N, 4 * (K + 1))


def colour_moments(images: Tensor, mask: Tensor) -> Tensor:
    """The colour part of the ``mu_colour`` style prior: channel mean and std inside and outside a mask.

    Args:
        images: ``(N, C, H, W)`` in [-1, 1].
        mask: ``(N, 1, H, W)`` lesion mask in {0, 1} (or soft weights in [0, 1]).

    Returns:
        ``(N, 4 * C)``: the lesion's C means and C stds, then the rest's C means and C stds. An
        empty lesion gives means and stds of 0 (as :meth:`StyleEncoder.region_stats`).
    """
    regions = torch.cat([mask, 1.0 - mask], dim=1)  # (N, 2, H, W)
    return StyleEncoder.region_stats(images, regions)  # (N, 2 * 2 * C)


def area_prior(anatomy: Tensor) -> Tensor:
    """The ``area`` anatomy prior (reference): each channel's share of the pixels.

    Args:
        anatomy: ``(N, K, H, W)`` anatomy map; for a one-hot map the K fractions sum to 1.

    Returns:
        ``(N, K)`` area fractions.
    """
    return anatomy.float().mean(dim=(2, 3))


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class AnatomyEncoder(nn.Module):
    """MONAI U-Net from the image to K anatomy logits, and their one-hot map."""

    def __init__(self, config: VisualConfig) -> None:
        super().__init__()
        # Imported here: `import monai` loads all of MONAI (~10 s, and it pulls in mlflow and
        # matplotlib), which code that only reads a VisualConfig should not pay for.
        from monai.networks.nets import UNet

        self.tau = config.gumbel_tau
        self.unet = UNet(
            spatial_dims=2,
            in_channels=config.image_channels,
            out_channels=config.anatomy_channels,
            channels=config.unet_channels,
            strides=config.unet_strides,
            num_res_units=config.unet_res_units,
        )

    def forward(
        self, images: Tensor, stochastic: bool, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(N, C, H, W) -> (logits (N, K, H, W), one-hot map (N, K, H, W))``.

        Gumbel noise only when ``stochastic`` (training); otherwise the argmax, so that priors
        and pseudo-masks are deterministic (the reference samples noise even at extraction).
        """
        logits = self.unet(images)  # (N, K, H, W)
        if stochastic:
            return logits, gumbel_one_hot(logits, self.tau, generator)
        return logits, argmax_one_hot(logits)


class Segmentor(nn.Module):
    """Lesion mask logits from the anatomy map: two 3x3 conv blocks and a 1x1 prediction."""

    def __init__(self, anatomy_channels: int, width: int) -> None:
        super().__init__()
        # InstanceNorm (no running statistics) rather than the reference's BatchNorm: training
        # and evaluation then compute the same function, and a batch of one is fine.
        self.body = nn.Sequential(
            nn.Conv2d(anatomy_channels, width, 3, padding=1),
            nn.InstanceNorm2d(width, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1),
            nn.InstanceNorm2d(width, affine=True),
            nn.ReLU(inplace=True),
        )
        self.pred = nn.Conv2d(width, 1, 1)

    def forward(self, anatomy: Tensor) -> Tensor:
        """``(N, K, H, W) -> (N, 1, H, W)`` mask logits."""
        return self.pred(self.body(anatomy))


class StyleEncoder(nn.Module):
    """Variational style encoder: (image, anatomy map) -> mu, logvar of size S.

    Strided convolutions then a global average pool, so any input size works (the reference
    flattens into a ``Linear(25088, 32)`` that fixes 224 px). No normalisation layers: instance
    or group norm would subtract the per-image colour statistics that *are* the style.

    With ``style_pool='regions'`` the pooled features are joined by the mean and standard deviation
    of the image's channels inside each anatomy channel (the map's values as weights): AdaIN
    statistics per region. A global pool sees a lesion covering 5 % of the image through 5 % of
    its features, next to the skin's 95 %; measured on the demo (32 px, 300 stage-1 steps), a
    linear probe read the pigment from the global-pool prior no better than the majority class.
    """

    def __init__(self, config: VisualConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = config.image_channels + config.anatomy_channels
        for width in config.style_widths:
            layers += [nn.Conv2d(in_ch, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            in_ch = width
        self.convs = nn.Sequential(*layers)
        self.regions = config.style_pool == "regions"
        if self.regions:
            in_ch += 2 * config.image_channels * config.anatomy_channels
        self.fc = nn.Sequential(nn.Linear(in_ch, config.style_hidden), nn.LeakyReLU(0.03, inplace=True))
        self.mu = nn.Linear(config.style_hidden, config.style_size)
        self.logvar = nn.Linear(config.style_hidden, config.style_size)

    @staticmethod
    def region_stats(images: Tensor, anatomy: Tensor) -> Tensor:
        """Weighted mean and std of each image channel inside each anatomy channel: (N, 2*K*C).

        An empty channel gives mean 0 and std 0 (its weight sum is clamped, not divided by zero).
        """
        w = anatomy.float().flatten(2)  # (N, K, HW)
        x = images.float().flatten(2)  # (N, C, HW)
        mass = w.sum(dim=2, keepdim=True).clamp(min=1.0)  # (N, K, 1): at least one pixel's weight
        mean = torch.einsum("nkp,ncp->nkc", w, x) / mass  # (N, K, C)
        sq = torch.einsum("nkp,ncp->nkc", w, x * x) / mass  # (N, K, C)
        std = (sq - mean * mean).clamp(min=0.0).add(1e-6).sqrt()  # (N, K, C)
        return torch.cat([mean, std], dim=2).flatten(1)  # (N, 2*K*C)

    def forward(self, images: Tensor, anatomy: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, C, H, W), (N, K, H, W) -> mu (N, S), logvar (N, S)``."""
        x = self.convs(torch.cat([images, anatomy], dim=1)).mean(dim=(2, 3))  # (N, W_last)
        if self.regions:
            x = torch.cat([x, self.region_stats(images, anatomy)], dim=1)  # (N, W_last + 2*K*C)
        x = self.fc(x)  # (N, style_hidden)
        # The clamp only guards exp(logvar) against overflow from a bad step early in training.
        return self.mu(x), self.logvar(x).clamp(-10.0, 10.0)


class AdaIN(nn.Module):
    """Adaptive instance normalisation of a feature map by the style vector z.

    ``y = gamma(z) * (x - mean_hw(x)) / std_hw(x) + beta(z)``. ``linear`` (ours): per-channel
    ``gamma = 1 + W_g z + b_g`` and ``beta = W_b z + b_b``. ``scalar`` (reference): one
    ``gamma = std(z)`` and ``beta = mean(z)`` per sample, shared by all channels.
    """

    def __init__(self, channels: int, style_size: int, mode: Literal["linear", "scalar"]) -> None:
        super().__init__()
        self.mode = mode
        self.channels = channels
        self.proj = nn.Linear(style_size, 2 * channels) if mode == "linear" else None

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """``(N, Ch, H, W), (N, S) -> (N, Ch, H, W)``."""
        normed = F.instance_norm(x, eps=1e-5)
        if self.proj is None:
            gamma = torch.sqrt(z.var(dim=1, unbiased=False) + 1e-5).view(-1, 1, 1, 1)  # (N, 1, 1, 1)
            beta = z.mean(dim=1).view(-1, 1, 1, 1)  # (N, 1, 1, 1)
            return gamma * normed + beta
        scale, shift = self.proj(z).chunk(2, dim=1)  # (N, Ch) each
        return (1.0 + scale)[:, :, None, None] * normed + shift[:, :, None, None]


class StyleDecoder(nn.Module):
    """Rebuild the image from the anatomy map and z: (AdaIN -> conv -> ReLU) per width, then
    AdaIN -> conv -> tanh, in the reference's order (AdaIN before each convolution)."""

    def __init__(self, config: VisualConfig) -> None:
        super().__init__()
        widths = (config.anatomy_channels, *config.decoder_widths)
        self.norms = nn.ModuleList(AdaIN(w, config.style_size, config.adain) for w in widths)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Conv2d(widths[-1], config.image_channels, 3, padding=1)

    def forward(self, anatomy: Tensor, z: Tensor) -> Tensor:
        """``(N, K, H, W), (N, S) -> (N, C, H, W)`` in [-1, 1]."""
        x = anatomy
        for norm, conv in zip(self.norms[:-1], self.convs):
            x = F.relu(conv(norm(x, z)))  # (N, width, H, W)
        return torch.tanh(self.out(self.norms[-1](x, z)))


class PerceptualLoss(nn.Module):
    """L1 distance between frozen VGG16 features (up to relu3_1) of two images, per sample.

    The weights come only from a local file: torchvision's VGG16 state dict (``features.*``
    and optionally ``classifier.*`` keys, e.g. ``vgg16-397923af.pth``) or just its ``features``
    (keys ``0.weight`` ...), as ``.pth``/``.pt`` (read with ``torch.load(weights_only=True)``) or
    ``.safetensors``.
    """

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_file(cls, path: Path | str) -> PerceptualLoss:
        """Build VGG16's first layers and load their weights from ``path``."""
        path = Path(path)
        if not path.is_file():
            raise PerceptualWeightsError(
                f"Perceptual loss weights file not found: '{path}'. Point "
                "`perceptual_weights` at a local torchvision VGG16 state dict (e.g. "
                "vgg16-397923af.pth or a .safetensors copy), or set it to null to train "
                "without the perceptual loss."
            )
        # Lazy: torchvision matters only when this loss is on. ``make_layers(cfgs["D"])`` is
        # exactly ``vgg16().features``, without allocating the 120 M-parameter classifier.
        from torchvision.models.vgg import cfgs, make_layers

        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # any read failure becomes one clear message
            raise PerceptualWeightsError(
                f"Could not read perceptual loss weights from '{path}': {err}. Expected a "
                "torchvision VGG16 state dict (.pth/.pt or .safetensors)."
            ) from err
        if not isinstance(state, dict):
            raise PerceptualWeightsError(
                f"'{path}' does not hold a state dict (got {type(state).__name__}); expected "
                "torchvision VGG16 weights."
            )
        if any(k.startswith("features.") for k in state):
            state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        features = make_layers(cfgs["D"])[:VGG_LAYERS]
        wanted = set(features.state_dict())
        missing = sorted(wanted - set(state))
        if missing:
            raise PerceptualWeightsError(
                f"'{path}' is not a torchvision VGG16 state dict: missing {missing[:4]} "
                f"(expected keys like 'features.0.weight')."
            )
        try:
            features.load_state_dict({k: state[k] for k in wanted})
        except RuntimeError as err:
            raise PerceptualWeightsError(f"'{path}' does not fit torchvision VGG16: {err}") from err
        return cls(features.eval())

    def forward(self, recon: Tensor, target: Tensor) -> Tensor:
        """``(N, 3, H, W), (N, 3, H, W)`` in [-1, 1] -> ``(N,)`` mean L1 over VGG features."""
        both = torch.cat([recon, target], dim=0)
        both = ((both + 1.0) / 2.0 - self.mean) / self.std  # ImageNet normalisation
        feats = self.features(both)  # (2N, 256, H/4, W/4)
        f_recon, f_target = feats.chunk(2, dim=0)
        return (f_recon - f_target).abs().flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


@dataclass
class VisualOutput:
    """What one pass of the visual disentangler produces."""

    anatomy: Tensor  # (N, K, H, W) one-hot map
    anatomy_logits: Tensor  # (N, K, H, W)
    mask_logits: Tensor  # (N, 1, H, W)
    mu: Tensor  # (N, S)
    logvar: Tensor  # (N, S)
    z: Tensor  # (N, S): a sample in training, mu in evaluation
    recon: Tensor  # (N, C, H, W) in [-1, 1]


class VisualDisentangler(nn.Module):
    """The stage-1 model: anatomy encoder + segmentor + style VAE + AdaIN decoder.

    Images are float ``(N, C, H, W)`` in [-1, 1] with H and W multiples of
    ``config.total_stride``; masks are ``(N, 1, H, W)`` in {0, 1}.

    When ``config.perceptual_weights`` is set, a frozen VGG is loaded from that file at
    construction. It is an auxiliary like a VAE: it never enters this module's ``state_dict``
    and is not expected by ``load_state_dict``, so checkpoints hold only the trained weights.
    """

    def __init__(self, config: VisualConfig) -> None:
        super().__init__()
        self.config = config
        self.anatomy_encoder = AnatomyEncoder(config)
        self.segmentor = Segmentor(config.anatomy_channels, config.segmentor_width)
        self.style_encoder = StyleEncoder(config)
        self.decoder = StyleDecoder(config)
        self.perceptual: PerceptualLoss | None = None
        if config.perceptual_enabled:
            self.perceptual = PerceptualLoss.from_file(config.perceptual_weights)  # type: ignore[arg-type]
        self.register_state_dict_post_hook(_drop_perceptual_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_perceptual_keys)
        self._init_weights()

    def _init_weights(self) -> None:
        """Initialise the modules that are ours; the U-Net keeps MONAI's defaults."""
        for module in [self.segmentor, self.style_encoder, self.decoder]:
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
                    nn.init.zeros_(m.bias)
        # logvar starts at 0 (unit variance, KL 0) so early samples of z are not wild.
        nn.init.zeros_(self.style_encoder.logvar.weight)
        nn.init.zeros_(self.style_encoder.logvar.bias)
        for norm in self.decoder.norms:
            if norm.proj is not None:
                # Small, not zero: z modulates the decoder from the first step (z-regression
                # and reconstruction then see a gradient through z), close to identity AdaIN.
                nn.init.normal_(norm.proj.weight, std=0.02)
                nn.init.zeros_(norm.proj.bias)

    # -- checks ----------------------------------------------------------------------------------

    def _check_images(self, images: Tensor) -> None:
        c = self.config
        if images.ndim != 4 or images.shape[1] != c.image_channels:
            raise VisualInputError(
                f"images must be (N, {c.image_channels}, H, W) floats in [-1, 1], got shape "
                f"{tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        if h % c.total_stride or w % c.total_stride:
            raise VisualInputError(
                f"image size {h}x{w} is not divisible by the U-Net's total stride "
                f"{c.total_stride} (unet_strides={c.unet_strides}); resize or crop the images "
                f"to a multiple of {c.total_stride}"
            )

    # -- building blocks -------------------------------------------------------------------------

    def encode_anatomy(
        self, images: Tensor, stochastic: bool = False, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(N, C, H, W) -> (logits (N, K, H, W), one-hot anatomy map (N, K, H, W))``."""
        self._check_images(images)
        return self.anatomy_encoder(images, stochastic, generator)

    def encode_style(self, images: Tensor, anatomy: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, C, H, W), (N, K, H, W) -> mu (N, S), logvar (N, S)``."""
        return self.style_encoder(images, anatomy)

    def decode(self, anatomy: Tensor, z: Tensor) -> Tensor:
        """``(N, K, H, W), (N, S) -> (N, C, H, W)`` reconstruction in [-1, 1]."""
        return self.decoder(anatomy, z)

    def forward(
        self, images: Tensor, stochastic: bool | None = None, generator: torch.Generator | None = None
    ) -> VisualOutput:
        """One pass: anatomy, mask, style and reconstruction.

        Args:
            images: ``(N, C, H, W)`` in [-1, 1].
            stochastic: Gumbel noise and a sampled z; defaults to ``self.training``.
            generator: optional RNG for both noises (on the images' device).
        """
        stochastic = self.training if stochastic is None else stochastic
        logits, anatomy = self.encode_anatomy(images, stochastic, generator)
        mask_logits = self.segmentor(anatomy)  # (N, 1, H, W)
        mu, logvar = self.encode_style(images, anatomy)  # (N, S) each
        if stochastic:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + torch.exp(0.5 * logvar) * eps
        else:
            z = mu
        recon = self.decode(anatomy, z)
        return VisualOutput(anatomy, logits, mask_logits, mu, logvar, z, recon)

    # -- training --------------------------------------------------------------------------------

    def losses(
        self,
        images: Tensor,
        masks: Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        has_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The stage-1 loss terms, one value per sample, and their weighted ``total``.

        ``total = recon_w * L1(recon, x) + perceptual_w * VGG-L1 (when configured)
        + kl_w * KL(mu, logvar) + dice_w * has_mask * Dice(mask_logits, mask)
        + z_regression_w * L1(mu(re-encoded recon), z.detach())``. The re-encoding runs the
        anatomy and style encoders on the reconstruction (the reference's ``mu_out_tilde``).

        Args:
            images: ``(N, C, H, W)`` in [-1, 1].
            masks: ``(N, 1, H, W)`` in {0, 1}, or None when the dataset has no masks (Dice is
                then 0 for every sample). Rows whose record has no mask may hold anything.
            generator: optional RNG for the Gumbel and reparameterisation noise.
            has_mask: ``(N,)`` bool or {0, 1}; False zeroes Dice for that sample. Defaults to
                all True when ``masks`` is given.

        Returns:
            ``recon``, ``kl``, ``dice``, ``z_regression``, ``perceptual`` (only when enabled) and
            ``total``, each ``(N,)``. The caller reduces (e.g. ``.mean()``).
        """
        c = self.config
        out = self(images, generator=generator)
        stochastic = self.training
        n = images.shape[0]
        terms: dict[str, Tensor] = {
            "recon": l1_recon(out.recon, images),
            "kl": kl_divergence(out.mu, out.logvar),
        }
        if masks is None:
            terms["dice"] = images.new_zeros(n)
        else:
            if masks.shape != (n, 1, *images.shape[-2:]):
                raise VisualInputError(
                    f"masks must be (N, 1, H, W) = {(n, 1, *images.shape[-2:])} matching the "
                    f"images, got {tuple(masks.shape)}"
                )
            flags = torch.ones(n, device=images.device) if has_mask is None else has_mask.to(images.device)
            if flags.shape != (n,):
                raise VisualInputError(f"has_mask must have shape ({n},), got {tuple(flags.shape)}")
            # Rows without a mask may carry NaN or junk placeholders: zero them before the loss.
            safe_masks = torch.where(
                flags.bool().view(n, 1, 1, 1), masks.float(), torch.zeros_like(masks.float())
            )
            terms["dice"] = dice_loss(out.mask_logits, safe_masks) * flags.to(out.mask_logits.dtype)
        _, anatomy_tilde = self.encode_anatomy(out.recon, stochastic, generator)
        mu_tilde, _ = self.encode_style(out.recon, anatomy_tilde)
        terms["z_regression"] = (mu_tilde - out.z.detach()).abs().mean(dim=1)
        total = (
            c.recon_weight * terms["recon"]
            + c.kl_weight * terms["kl"]
            + c.dice_weight * terms["dice"]
            + c.z_regression_weight * terms["z_regression"]
        )
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(out.recon, images)
            total = total + c.perceptual_weight * terms["perceptual"]
        terms["total"] = total
        return terms

    # -- deterministic feature extraction --------------------------------------------------------

    @torch.no_grad()
    def priors(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Visual priors for stage 2, deterministic whatever the module's mode.

        Args:
            images: ``(N, C, H, W)`` in [-1, 1].

        Returns:
            ``anatomy_prior (N, A)`` (``moments``: mask then channel moments, ``area``: the K area
            fractions) and ``style_prior (N, P)`` (the style mean mu; ``mu_colour``: then the
            :func:`colour_moments` of the image in the predicted lesion mask).
        """
        _, anatomy = self.encode_anatomy(images, stochastic=False)
        mu, _ = self.encode_style(images, anatomy)
        style = mu.float()  # (N, S)
        mask = (torch.sigmoid(self.segmentor(anatomy)) > MASK_THRESHOLD).float()  # (N, 1, H, W)
        if self.config.style_prior == "mu_colour":
            style = torch.cat([style, colour_moments(images, mask)], dim=1)  # (N, S + 4 C)
        anatomy_prior = area_prior(anatomy) if self.config.prior == "area" else moments_prior(mask, anatomy)
        return anatomy_prior, style

    @torch.no_grad()
    def segment(self, images: Tensor) -> Tensor:
        """Lesion mask probabilities ``(N, 1, H, W)`` (pseudo-masks for generated images)."""
        _, anatomy = self.encode_anatomy(images, stochastic=False)
        return torch.sigmoid(self.segmentor(anatomy))


def _drop_perceptual_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """The frozen VGG comes from its own file: keep it out of checkpoints."""
    for key in [k for k in state_dict if k.startswith(prefix + "perceptual.")]:
        del state_dict[key]


def _ignore_missing_perceptual_keys(module: nn.Module, incompatible_keys: Any) -> None:
    """A checkpoint never holds the VGG (see :func:`_drop_perceptual_keys`): do not ask for it."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if ".perceptual.features." not in f".{k}"]
