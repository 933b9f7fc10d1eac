"""Diffusion schedule arithmetic of the generator: noising, v and x0 conversions, loss weights.

Pure functions; the loss terms themselves are in :mod:`vgmedgen.model.losses`.

Notation: ``x0`` clean sample (pixels in [-1, 1] or VAE latents), ``eps`` unit Gaussian noise,
``a = alpha_bar_t`` the cumulative product of ``1 - beta`` at the sample's timestep.
Shape legend: N batch, C channels, H/W size.
"""

from __future__ import annotations

import torch

__all__ = [
    "add_noise",
    "epsilon_from_v",
    "min_snr_weight",
    "predict_x0",
    "split_learned_sigma",
    "v_target",
    "x0_from_v",
]


def _per_sample(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) broadcastable against ``like``, in float32."""
    return a.float().view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward diffusion ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``.

    Args:
        x0: (N, C, H, W) clean samples.
        eps: (N, C, H, W) noise.
        alpha_bar: (N,) ``a`` per sample.

    Returns:
        (N, C, H, W) noisy samples, in ``x0``'s dtype.
    """
    a = _per_sample(alpha_bar, x0)
    return (a.sqrt() * x0.float() + (1.0 - a).sqrt() * eps.float()).to(x0.dtype)


def predict_x0(x_t: torch.Tensor, eps_pred: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """One-step clean estimate ``x0_hat = (x_t - sqrt(1 - a) eps_pred) / sqrt(a)``, differentiable.

    Args:
        x_t: (N, C, H, W) noisy samples.
        eps_pred: (N, C, H, W) predicted noise.
        alpha_bar: (N,) ``a`` per sample.

    Returns:
        (N, C, H, W) float32 estimate of ``x0``.
    """
    a = _per_sample(alpha_bar, x_t)
    return (x_t.float() - (1.0 - a).sqrt() * eps_pred.float()) / a.sqrt()


def v_target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The v-prediction target ``v = sqrt(a) eps - sqrt(1 - a) x0``; (N, C, H, W) float32."""
    a = _per_sample(alpha_bar, x0)
    return a.sqrt() * eps.float() - (1.0 - a).sqrt() * x0.float()


def epsilon_from_v(x_t: torch.Tensor, v_pred: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Noise implied by a v prediction: ``eps = sqrt(a) v + sqrt(1 - a) x_t`` (exact, no division)."""
    a = _per_sample(alpha_bar, x_t)
    return a.sqrt() * v_pred.float() + (1.0 - a).sqrt() * x_t.float()


def x0_from_v(x_t: torch.Tensor, v_pred: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Clean estimate implied by a v prediction: ``x0 = sqrt(a) x_t - sqrt(1 - a) v``, differentiable."""
    a = _per_sample(alpha_bar, x_t)
    return a.sqrt() * x_t.float() - (1.0 - a).sqrt() * v_pred.float()


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight per sample (Hang et al. 2023), for the MSE of ``prediction_type``.

    With ``SNR = a / (1 - a)``: ``min(SNR, gamma) / SNR`` for epsilon, ``min(SNR, gamma) / (SNR + 1)``
    for v, i.e. both equal ``min(SNR, gamma)`` times the MSE of ``x0``.

    Args:
        alpha_bar: (N,) ``a`` per sample.
        gamma: the SNR cap.
        prediction_type: ``epsilon`` or ``v_prediction``.

    Returns:
        (N,) float32 weights.
    """
    a = alpha_bar.float()
    snr = a / (1.0 - a)
    capped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return capped / snr
    if prediction_type == "v_prediction":
        return capped / (snr + 1.0)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use 'epsilon' or 'v_prediction'")


def split_learned_sigma(out: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Take the epsilon half of a learned-sigma output.

    Args:
        out: (N, C_out, H, W) model output; ``C_out`` is ``2 * in_channels`` (epsilon then
            variance, as PixArt) or ``in_channels``.
        in_channels: channels of the diffused sample.

    Returns:
        (N, in_channels, H, W) epsilon prediction.
    """
    if out.shape[1] == 2 * in_channels:
        return out[:, :in_channels]
    if out.shape[1] != in_channels:
        raise ValueError(
            f"model output has {out.shape[1]} channels, expected {in_channels} or {2 * in_channels}"
        )
    return out
