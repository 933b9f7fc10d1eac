"""Every loss term of VG-MedGen (the two disentanglers and the generator), as pure functions of tensors.

Every function returns one value per sample (shape ``(N,)``) and leaves the reduction to the
caller, so that per-sample weights (e.g. records without a mask) and logging of each term stay
possible. The one exception is :func:`decorrelation`, which is a property of a batch and returns a
0-d tensor.

Shape legend: N batch, C channels, H/W size, D vector size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "colour_distribution_loss",
    "cosine_alignment",
    "decorrelation",
    "dice_loss",
    "epsilon_mse",
    "kl_divergence",
    "l1_recon",
    "mse",
]


def _per_sample_mean(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: ``(N, ...) -> (N,)``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Soft Dice loss of sigmoid probabilities against a binary mask, per sample.

    ``p = sigmoid(logits)``; per sample and channel
    ``loss = 1 - (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)``, then the mean over
    channels. Wraps ``monai.losses.DiceLoss(sigmoid=True, reduction="none")``. An empty target
    with an empty prediction scores ~0 (the smoothing terms), as MONAI defines it.

    Args:
        logits: ``(N, C, H, W)`` mask logits.
        target: ``(N, C, H, W)`` mask in {0, 1}.
        smooth: numerator and denominator smoothing.

    Returns:
        ``(N,)`` Dice loss in [0, 1].
    """
    # Imported here: `import monai` loads all of MONAI (~10 s); importing this module for the
    # other losses should not pay for it.
    from monai.losses import DiceLoss

    loss_fn = DiceLoss(sigmoid=True, reduction="none", smooth_nr=smooth, smooth_dr=smooth)
    per_channel = loss_fn(logits, target.to(logits.dtype))  # (N, C, 1, 1)
    return _per_sample_mean(per_channel)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL divergence of ``N(mu, exp(logvar))`` from the standard normal, summed over dimensions.

    ``KL = -0.5 * sum_d (1 + logvar_d - mu_d^2 - exp(logvar_d))`` (as the reference's
    ``KL_divergence``, before its batch mean).

    Args:
        mu: ``(N, D)`` means.
        logvar: ``(N, D)`` log variances.

    Returns:
        ``(N,)`` KL in nats.
    """
    return -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def cosine_alignment(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """One minus the cosine similarity, per sample: ``1 - <p, t> / (|p| |t|)``.

    Args:
        pred: ``(N, D)`` predicted vectors.
        target: ``(N, D)`` target vectors.
        eps: floor on the norms (a zero vector gets cosine 0, loss 1).

    Returns:
        ``(N,)`` loss in [0, 2].
    """
    return 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=eps)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample: ``mean((p - t)^2)`` over every non-batch dimension.

    Args:
        pred: ``(N, ...)`` prediction.
        target: same shape as ``pred``.

    Returns:
        ``(N,)`` MSE.
    """
    return _per_sample_mean((pred - target).pow(2))


def l1_recon(recon: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error per sample: ``mean(|r - x|)`` over channels and pixels.

    Args:
        recon: ``(N, C, H, W)`` reconstruction.
        target: ``(N, C, H, W)`` original.

    Returns:
        ``(N,)`` L1 distance.
    """
    return _per_sample_mean((recon - target).abs())


def decorrelation(a: Tensor, b: Tensor, eps: float = 1e-5) -> Tensor:
    """Mean squared cross-correlation between the dimensions of two batches of vectors.

    Each column is standardised over the batch, ``a_hat = (a - mean) / sqrt(var + eps)`` (same
    for ``b``), then ``C = a_hat^T b_hat / N`` is the ``(Da, Db)`` matrix of Pearson correlations
    and the loss is ``mean(C^2)``: 0 when every anatomy dimension is uncorrelated with every
    style dimension over the batch. It is a batch property, so it returns a 0-d tensor; a batch
    of fewer than two rows has no correlation and gives 0.

    Args:
        a: ``(N, Da)`` vectors (e.g. ``t_a``).
        b: ``(N, Db)`` vectors (e.g. ``t_s``).
        eps: variance floor, so that a constant column gives 0 instead of NaN.

    Returns:
        0-d tensor, in [0, 1].
    """
    n = a.shape[0]
    if n < 2:
        return a.new_zeros(()) + 0.0 * (a.sum() + b.sum())  # keeps the graph connected
    a_hat = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + eps)  # (N, Da)
    b_hat = (b - b.mean(0)) / torch.sqrt(b.var(0, unbiased=False) + eps)  # (N, Db)
    corr = a_hat.T @ b_hat / n  # (Da, Db)
    return corr.pow(2).mean()


def epsilon_mse(eps_pred: Tensor, eps: Tensor) -> Tensor:
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


def colour_distribution_loss(pred: Tensor, target: Tensor) -> Tensor:
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
