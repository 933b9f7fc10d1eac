"""Sampling from the generator: DPM-Solver++ with separate anatomy and style guidance.

Guidance (docs/method.md, section "Sampling and compositional guidance"), with 0 the learned null tokens of a stream::

    eps = e(0, 0) + g_a (e(a, 0) - e(0, 0)) + g_s (e(a, s) - e(a, 0))

The three predictions are one batched forward pass of 3N samples. In ``hybrid`` mode the caption
tokens are present only in ``e(a, s)`` (they carry both factors, and training drops them whenever
a stream is dropped), so ``g_s`` also scales their effect. With ``g_a = g_s = 1`` the formula is
``e(a, s)`` and a single pass is run.

Reproducibility: image ``i``'s initial noise is drawn from its own CPU generator seeded with
``seeds[i]``, DPM-Solver++ (``algorithm_type="dpmsolver++"``) is deterministic and its dynamic
thresholding works per image, so an image depends only on its own condition and seed, not on its
batch neighbours or on the device that drew the noise.

Shape legend: N images, C/h/w diffused sample, H/W image size, A/S stream widths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from pydantic import Field

from vgmedgen.model.configbase import StrictConfig

if TYPE_CHECKING:
    from diffusers import DPMSolverMultistepScheduler

    from vgmedgen.model.generator import Generator

__all__ = ["SamplerConfig", "combine_guidance", "initial_noise", "make_scheduler", "sample"]


class SamplerConfig(StrictConfig):
    """How images are sampled.

    Attributes:
        num_steps: DPM-Solver++ steps (20 in the paper).
        guidance_anatomy: g_a (1 = no anatomy guidance).
        guidance_style: g_s (1 = no style guidance).
        solver_order: DPM-Solver++ order (2 = the usual multistep solver).
        thresholding: dynamic thresholding of the predicted clean sample; None = on in pixel
            space (without it pixel-space samples saturate), off for VAE latents (whose range is
            not [-1, 1]).
        sample_max_value: the thresholding bound (1.0 for images in [-1, 1]).
    """

    num_steps: int = Field(20, ge=1)
    guidance_anatomy: float = 4.5
    guidance_style: float = 4.5
    solver_order: int = Field(2, ge=1, le=3)
    thresholding: bool | None = None
    sample_max_value: float = Field(1.0, gt=0)


def combine_guidance(
    e00: torch.Tensor,
    ea0: torch.Tensor,
    eas: torch.Tensor,
    g_a: float | torch.Tensor,
    g_s: float | torch.Tensor,
) -> torch.Tensor:
    """``e00 + g_a (ea0 - e00) + g_s (eas - ea0)`` (all (N, C, h, w); ``g_a``/``g_s`` scalars or one per
    row, (N, 1, 1, 1))."""
    return e00 + g_a * (ea0 - e00) + g_s * (eas - ea0)


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """One standard normal sample per seed, drawn on CPU so it is device independent.

    Args:
        seeds: N integer seeds.
        shape: (C, h, w) of one sample.
        device: where the result goes.

    Returns:
        (N, C, h, w) float32 noise.
    """
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


def make_scheduler(model: Generator, cfg: SamplerConfig) -> DPMSolverMultistepScheduler:
    """A fresh DPM-Solver++ scheduler on the generator's training noise schedule."""
    from diffusers import (
        DPMSolverMultistepScheduler,  # here: a config that names the sampler imports no diffusers
    )

    pixel_space = model.vae is None
    thresholding = pixel_space if cfg.thresholding is None else cfg.thresholding
    return DPMSolverMultistepScheduler(
        **model.cfg.schedule.scheduler_kwargs(),
        algorithm_type="dpmsolver++",
        solver_order=cfg.solver_order,
        prediction_type="epsilon",
        thresholding=thresholding,
        sample_max_value=cfg.sample_max_value,
    )


def _guided_eps(
    model: Generator,
    x: torch.Tensor,
    t: torch.Tensor,
    t_a: torch.Tensor,
    t_s: torch.Tensor,
    text_tokens: torch.Tensor | None,
    text_mask: torch.Tensor | None,
    cfg: SamplerConfig,
    guidance: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    n = x.shape[0]
    timesteps = t.to(x.device).expand(n)
    g_a, g_s = guidance if guidance is not None else (cfg.guidance_anatomy, cfg.guidance_style)
    if guidance is None and g_a == 1.0 and g_s == 1.0:
        return model(x, timesteps, t_a, t_s, text_tokens=text_tokens, text_mask=text_mask)
    yes = torch.ones(n, dtype=torch.bool, device=x.device)
    no = torch.zeros(n, dtype=torch.bool, device=x.device)
    # Passes: (0, 0), (a, 0), (a, s).
    drop_a = torch.cat([yes, no, no])  # (3N,)
    drop_s = torch.cat([yes, yes, no])  # (3N,)
    drop_text = torch.cat([yes, yes, no])  # (3N,)
    eps = model(
        x.repeat(3, 1, 1, 1),
        timesteps.repeat(3),
        t_a.repeat(3, 1),
        t_s.repeat(3, 1),
        text_tokens=None if text_tokens is None else text_tokens.repeat(3, 1, 1),
        text_mask=None if text_mask is None else text_mask.repeat(3, 1),
        drop_anatomy=drop_a,
        drop_style=drop_s,
        drop_text=None if text_tokens is None else drop_text,
    )  # (3N, C, h, w)
    e00, ea0, eas = eps.chunk(3)
    if guidance is not None:  # the output keeps eps's dtype, as with scalar guidance
        g_a, g_s = g_a.to(eps.dtype), g_s.to(eps.dtype)
    return combine_guidance(e00, ea0, eas, g_a, g_s)


@torch.no_grad()
def sample(
    model: Generator,
    t_a: torch.Tensor,
    t_s: torch.Tensor,
    seeds: Sequence[int],
    *,
    text_tokens: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    cfg: SamplerConfig | None = None,
    image_size: int | None = None,
    guidance: tuple[Sequence[float], Sequence[float]] | None = None,
) -> torch.Tensor:
    """Generate one image per (t_a, t_s, seed).

    Sample from the EMA weights with ``with ema.swapped_in(model): sample(model, ...)``.

    Args:
        model: the generator.
        t_a: (N, A) anatomy vectors (text heads, or a reference image's visual prior).
        t_s: (N, S) style vectors.
        seeds: N integer seeds; image i depends only on (t_a[i], t_s[i], seeds[i]).
        text_tokens: (N, L, B) caption token features (``hybrid`` only).
        text_mask: (N, L) caption mask.
        cfg: sampler settings (defaults: 20 steps, g_a = g_s = 4.5).
        image_size: square image side in pixels (default: the model's native size).
        guidance: per-row ``(g_a, g_s)``, N values each, in place of ``cfg``'s two scalars, so that rows
            with different guidance share one batch (a row's image equals the one sampled alone with
            its guidance in ``cfg``).

    Returns:
        (N, 3, H, W) float32 images in [0, 1] on the model's device.
    """
    cfg = cfg or SamplerConfig()
    n = t_a.shape[0]
    if len(seeds) != n or t_s.shape[0] != n:
        raise ValueError(
            f"need one seed and one t_s per t_a: {n} t_a, {t_s.shape[0]} t_s, {len(seeds)} seeds"
        )
    device = next(model.parameters()).device
    t_a, t_s = t_a.to(device), t_s.to(device)
    if text_tokens is not None:
        text_tokens = text_tokens.to(device)
        text_mask = None if text_mask is None else text_mask.to(device)
    if not model.hffm.uses_text:
        text_tokens, text_mask = None, None
    per_row = None
    if guidance is not None:
        if len(guidance[0]) != n or len(guidance[1]) != n:
            raise ValueError(
                f"need one g_a and one g_s per row: {n} rows, {len(guidance[0])} g_a, {len(guidance[1])} g_s"
            )
        # float32 like the scalars a kernel casts cfg's guidance to, so both paths round alike.
        per_row = tuple(
            torch.tensor([float(g) for g in gs], dtype=torch.float32, device=device).view(n, 1, 1, 1)
            for gs in guidance
        )  # 2 x (N, 1, 1, 1)

    scheduler = make_scheduler(model, cfg)
    scheduler.set_timesteps(cfg.num_steps, device=device)
    x = (
        initial_noise(seeds, model.sample_shape(image_size), device) * scheduler.init_noise_sigma
    )  # (N, C, h, w)
    was_training = model.training
    model.eval()
    try:
        for t in scheduler.timesteps:
            eps = _guided_eps(model, x, t, t_a, t_s, text_tokens, text_mask, cfg, per_row)  # (N, C, h, w)
            x = scheduler.step(eps, t, x, return_dict=False)[0]  # (N, C, h, w)
        images = model.decode(x)  # (N, 3, H, W) in about [-1, 1]
    finally:
        model.train(was_training)
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
