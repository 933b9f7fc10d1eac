"""Diffusion training losses of the generator: pure functions, unreduced over the batch.

Notation: ``x0`` clean sample (pixels in [-1, 1] or VAE latents), ``eps`` unit Gaussian noise,
``a = alpha_bar_t`` the cumulative product of ``1 - beta`` at the sample's timestep.
Shape legend: N batch, C channels, H/W size.
"""

from __future__ import annotations

import torch

__all__ = [
    "add_noise",
    "colour_distribution_loss",
    "epsilon_from_v",
    "epsilon_mse",
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


def epsilon_mse(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Epsilon-prediction loss per sample: ``mean_{c,h,w} (eps_pred - eps)^2``.

    Args:
        eps_pred: (N, C, H, W) predicted noise (the first half of a learned-sigma output).
        eps: (N, C, H, W) the noise that was added.

    Returns:
        (N,) float32 loss per sample.
    """
    if eps_pred.shape != eps.shape:
        raise ValueError(f"eps_pred {tuple(eps_pred.shape)} and eps {tuple(eps.shape)} differ in shape")
    return (eps_pred.float() - eps.float()).pow(2).flatten(1).mean(dim=1)


def colour_distribution_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Colour distribution loss per sample: match per-channel mean and standard deviation.

    ``L = mean_c (mu_c(pred) - mu_c(target))^2 + mean_c (sigma_c(pred) - sigma_c(target))^2``

    with ``mu_c`` the mean and ``sigma_c = sqrt(var_c + 1e-12)`` the population standard deviation
    (no Bessel correction) of channel ``c`` over the image; the 1e-12 keeps the gradient finite
    on a flat channel. This is the
    reference's statistic (VG-MedGen, "color distribution loss"), kept differentiable in ``pred``
    so that it trains the model.

    Args:
        pred: (N, 3, H, W) generated (decoded one-step estimate) images.
        target: (N, 3, H, W) real images, same value range as ``pred``.

    Returns:
        (N,) float32 loss per sample.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    p = pred.float().flatten(2)  # (N, 3, H*W)
    t = target.float().flatten(2)  # (N, 3, H*W)
    mean_term = (p.mean(dim=2) - t.mean(dim=2)).pow(2).mean(dim=1)  # (N,)
    p_std = (p.var(dim=2, correction=0) + 1e-12).sqrt()  # (N, 3)
    t_std = (t.var(dim=2, correction=0) + 1e-12).sqrt()  # (N, 3)
    std_term = (p_std - t_std).pow(2).mean(dim=1)  # (N,)
    return mean_term + std_term
