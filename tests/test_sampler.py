"""Sampler: guidance formula, same-seed reproducibility, batch independence, output range."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from vgmedgen.model.generator import Generator, PixArtBackbone, build_generator, build_generator_config
from vgmedgen.model.sampler import (
    SamplerConfig,
    _guided_eps,
    combine_guidance,
    initial_noise,
    make_scheduler,
    sample,
)

A, S = 36, 8
FAST = SamplerConfig(num_steps=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Generator:
    """A tiny generator with non-trivial weights: pretrained init from diffusers' random init, open gates."""
    root = tmp_path_factory.mktemp("pixart")
    cfg = build_generator_config("tiny", {"init": "pretrained", "pretrained_dir": str(root), "train": "full"})
    torch.manual_seed(0)
    PixArtBackbone(**cfg.backbone.diffusers_kwargs()).save_pretrained(root / "transformer")
    gen = build_generator(cfg)
    with torch.no_grad():
        for b in gen.hffm.branches:
            b["anatomy"].gate.fill_(0.8)
            b["style"].gate.fill_(-0.6)
    return gen.eval()


def _cond(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, A, generator=g), torch.randn(n, S, generator=g)


def test_combine_guidance_formula() -> None:
    g = torch.Generator().manual_seed(0)
    e00, ea0, eas = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    out = combine_guidance(e00, ea0, eas, 4.5, 2.0)
    torch.testing.assert_close(out, e00 + 4.5 * (ea0 - e00) + 2.0 * (eas - ea0))
    torch.testing.assert_close(combine_guidance(e00, ea0, eas, 1.0, 1.0), eas)
    torch.testing.assert_close(combine_guidance(e00, ea0, eas, 0.0, 0.0), e00)
    # A value check on numbers: e00=1, ea0=2, eas=5, g_a=3, g_s=0.5 -> 1 + 3*1 + 0.5*3 = 5.5
    one = torch.ones(1)
    torch.testing.assert_close(combine_guidance(one, 2 * one, 5 * one, 3.0, 0.5), 5.5 * one)


def test_batched_guidance_equals_three_separate_passes(model: Generator) -> None:
    t_a, t_s = _cond(2)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor(500)
    cfg = SamplerConfig(guidance_anatomy=3.0, guidance_style=2.0)
    with torch.no_grad():
        guided = _guided_eps(model, x, t, t_a, t_s, None, None, cfg)
        yes, no = torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
        e00 = model(x, t, t_a, t_s, drop_anatomy=yes, drop_style=yes)
        ea0 = model(x, t, t_a, t_s, drop_anatomy=no, drop_style=yes)
        eas = model(x, t, t_a, t_s)
        single = _guided_eps(
            model, x, t, t_a, t_s, None, None, SamplerConfig(guidance_anatomy=1, guidance_style=1)
        )
    assert (ea0 - e00).abs().max() > 1e-4 and (eas - ea0).abs().max() > 1e-4  # the streams matter
    torch.testing.assert_close(guided, e00 + 3.0 * (ea0 - e00) + 2.0 * (eas - ea0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single, eas, rtol=0, atol=0)


def test_same_seed_same_image_and_shape_range(model: Generator) -> None:
    t_a, t_s = _cond(2)
    a = sample(model, t_a, t_s, [11, 12], cfg=FAST)
    b = sample(model, t_a, t_s, [11, 12], cfg=FAST)
    c = sample(model, t_a, t_s, [13, 12], cfg=FAST)
    assert a.shape == (2, 3, 16, 16) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a[0] - c[0]).abs().max() > 1e-3  # another seed, another image
    torch.testing.assert_close(a[1], c[1], rtol=0, atol=1e-4)  # row 1 unchanged (see batch test)


def test_image_does_not_depend_on_batch_neighbours(model: Generator) -> None:
    t_a, t_s = _cond(3, seed=4)
    batch = sample(model, t_a, t_s, [1, 2, 3], cfg=FAST)
    alone = sample(model, t_a[1:2], t_s[1:2], [2], cfg=FAST)
    swapped = sample(model, t_a[[2, 1]], t_s[[2, 1]], [3, 2], cfg=FAST)
    # Equal up to float rounding: BLAS blocks a batch of 1 and of 3 differently (~1e-5 after four
    # guided steps), far below one 8-bit grey level (3.9e-3).
    torch.testing.assert_close(alone[0], batch[1], rtol=0, atol=1e-4)
    torch.testing.assert_close(swapped[1], batch[1], rtol=0, atol=1e-4)
    torch.testing.assert_close(swapped[0], batch[2], rtol=0, atol=1e-4)
    assert (batch[1] - batch[2]).abs().max() > 1e-2  # different rows are different images


def test_per_row_guidance_equals_each_row_sampled_with_its_own_guidance(model: Generator) -> None:
    """Rows with different (g_a, g_s) share one batch; each equals the row sampled with its guidance in the
    sampler config (the serve batcher and the generation job rely on this)."""
    t_a, t_s = _cond(3, seed=5)
    guidance = ([4.5, 2.0, 1.0], [4.5, 3.0, 1.0])
    mixed = sample(model, t_a, t_s, [1, 2, 3], cfg=FAST, guidance=guidance)
    for i in range(3):
        cfg = FAST.model_copy(update={"guidance_anatomy": guidance[0][i], "guidance_style": guidance[1][i]})
        alone = sample(model, t_a, t_s, [1, 2, 3], cfg=cfg)
        # Same batch, same kernels: the per-row scales round exactly like the config's scalars...
        if i < 2:
            torch.testing.assert_close(mixed[i], alone[i], rtol=0, atol=0)
        else:  # ...except g = 1/1, which alone takes the single unguided pass: equal up to float rounding.
            torch.testing.assert_close(mixed[i], alone[i], rtol=0, atol=1e-4)
    assert (
        mixed[0]
        - sample(model, t_a, t_s, [1, 2, 3], cfg=FAST.model_copy(update={"guidance_anatomy": 2.0}))[0]
    ).abs().max() > 1e-3  # fmt: skip  (guidance matters)
    with pytest.raises(ValueError, match="one g_a and one g_s per row"):
        sample(model, t_a, t_s, [1, 2, 3], cfg=FAST, guidance=([1.0], [1.0]))


def test_scheduler_settings_and_noise() -> None:
    gen = build_generator(build_generator_config("tiny"))
    sched = make_scheduler(gen, SamplerConfig())
    assert sched.config.algorithm_type == "dpmsolver++" and sched.config.thresholding
    assert sched.config.sample_max_value == 1.0 and sched.config.beta_schedule == "linear"
    n1 = initial_noise([5, 6], (3, 4, 4), torch.device("cpu"))
    n2 = initial_noise([6], (3, 4, 4), torch.device("cpu"))
    torch.testing.assert_close(n1[1], n2[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="one seed"):
        sample(gen, *_cond(2), [1], cfg=FAST)


def test_latent_sampling_decodes_with_the_vae(tmp_path: Path) -> None:
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    ).save_pretrained(tmp_path / "vae")
    cfg = build_generator_config(
        "tiny", {"backbone": {"in_channels": 4, "sample_size": 8}, "vae_dir": str(tmp_path)}
    )
    gen = build_generator(cfg)
    assert not make_scheduler(gen, SamplerConfig()).config.thresholding  # latents are not in [-1, 1]
    images = sample(gen, *_cond(2), [0, 1], cfg=SamplerConfig(num_steps=2))
    assert images.shape == (2, 3, 16, 16)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
