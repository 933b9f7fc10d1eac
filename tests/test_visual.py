"""The stage-1 visual disentangler: shapes, gradients, determinism, priors, perceptual file, training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vgmedgen.model.configbase import ConfigError, build_config, choose_preset
from vgmedgen.model.visual import (
    VISUAL_PRESETS,
    PerceptualWeightsError,
    VisualConfig,
    VisualDisentangler,
    VisualInputError,
    area_prior,
    colour_moments,
    gumbel_one_hot,
    moments_prior,
    region_moments,
)

TINY = VISUAL_PRESETS["tiny"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on the shared 2-core box, two OpenMP threads competing with other
    processes made a training step ~40x slower (spin-waiting), one thread keeps it at ~0.07 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(seed: int = 0, **overrides: object) -> VisualDisentangler:
    torch.manual_seed(seed)
    config = TINY.model_copy(update=overrides) if overrides else TINY
    return VisualDisentangler(config)


def disc_batch(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Coloured discs of random centre and radius on a skin-like background, with their masks."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    images, masks = [], []
    for _ in range(n):
        cx, cy = (torch.rand(2, generator=g) * 0.5 + 0.25) * size
        r = (torch.rand(1, generator=g) * 0.15 + 0.12) * size
        mask = (((xs - cx) ** 2 + (ys - cy) ** 2) <= r**2).float()
        skin = torch.tensor([0.6, 0.2, 0.0]) + 0.1 * torch.rand(3, generator=g)
        lesion = torch.tensor([-0.6, -0.7, -0.8]) + 0.2 * torch.rand(3, generator=g)
        img = skin.view(3, 1, 1) * (1 - mask) + lesion.view(3, 1, 1) * mask
        img = img + 0.05 * torch.randn(3, size, size, generator=g)
        images.append(img.clamp(-1, 1))
        masks.append(mask[None])
    return torch.stack(images), torch.stack(masks)


# -- config -----------------------------------------------------------------------------------------


def test_presets_and_config_validation() -> None:
    assert set(VISUAL_PRESETS) == {"tiny", "demo", "pixart-512"}
    assert choose_preset(VISUAL_PRESETS, "demo", "visual") is VISUAL_PRESETS["demo"]
    with pytest.raises(ConfigError, match="Did you mean 'tiny'"):
        choose_preset(VISUAL_PRESETS, "tiyn", "visual")
    with pytest.raises(ConfigError, match="unet_strides needs one entry fewer"):
        build_config(VisualConfig, {"unet_channels": [8, 16], "unet_strides": [2, 2]})
    with pytest.raises(ConfigError, match="Did you mean 'prior'"):
        build_config(VisualConfig, {"priors": "area"})
    with pytest.raises(ConfigError, match="prior"):
        build_config(VisualConfig, {"prior": "centroid"})
    cfg = VisualConfig()
    assert (cfg.anatomy_channels, cfg.style_size) == (8, 8)
    assert (cfg.recon_weight, cfg.perceptual_weight, cfg.kl_weight, cfg.dice_weight) == (1.0, 0.1, 0.01, 10.0)
    assert cfg.z_regression_weight == 1.0 and cfg.prior == "moments" and cfg.adain == "linear"
    assert cfg.anatomy_prior_dim == 36 and cfg.model_copy(update={"prior": "area"}).anatomy_prior_dim == 8
    assert VISUAL_PRESETS["pixart-512"].total_stride == 16 and 512 % 16 == 0
    assert not cfg.perceptual_enabled


def test_size_not_divisible_by_stride_is_a_clear_error() -> None:
    model = make_model()
    with pytest.raises(VisualInputError, match=r"30x32 is not divisible by the U-Net's total stride 4"):
        model(torch.zeros(1, 3, 30, 32))
    with pytest.raises(VisualInputError, match=r"images must be \(N, 3, H, W\)"):
        model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(VisualInputError, match="masks must be"):
        model.losses(torch.zeros(2, 3, 16, 16), torch.zeros(2, 16, 16))


def test_style_encoder_pools_globally_any_size() -> None:
    model = make_model()
    for h, w in [(8, 8), (16, 40), (64, 64), (100, 60)]:
        mu, logvar = model.encode_style(torch.zeros(3, 3, h, w), torch.zeros(3, 8, h, w))
        assert mu.shape == logvar.shape == (3, 8)


def test_region_style_pool_sees_a_small_region_colour() -> None:
    from vgmedgen.model.visual import StyleEncoder

    # Exact statistics: channel 1 covers a 2x2 corner of value 0.5 and 1.5 (mean 1, std 0.5).
    img = torch.zeros(1, 3, 4, 4)
    img[0, :, 0, 0], img[0, :, 0, 1], img[0, :, 1, 0], img[0, :, 1, 1] = 0.5, 1.5, 0.5, 1.5
    amap = torch.zeros(1, 2, 4, 4)
    amap[0, 1, :2, :2] = 1.0
    amap[0, 0] = 1.0 - amap[0, 1]
    stats = StyleEncoder.region_stats(img, amap).view(1, 2, 2, 3)  # (N, K, mean|std, C)
    torch.testing.assert_close(stats[0, 1, 0], torch.ones(3))
    torch.testing.assert_close(stats[0, 1, 1], torch.full((3,), 0.5), atol=1e-3, rtol=0)
    torch.testing.assert_close(stats[0, 0, 0], torch.zeros(3))  # the other 12 px are 0
    # An empty channel gives zeros, not NaN.
    assert torch.isfinite(StyleEncoder.region_stats(img, torch.zeros(1, 2, 4, 4))).all()
    # A 3x3 lesion (0.9 % of 32x32) changing colour: the region features see the whole change, the
    # global mean of the image under 1 % of it.
    images = torch.full((1, 3, 32, 32), 0.5)
    lesion = torch.zeros(1, 32, 32, dtype=torch.bool)
    lesion[0, 10:13, 20:23] = True
    images[:, :, 10:13, 20:23] = -0.5
    recoloured = torch.where(lesion[:, None], torch.tensor(0.3), images)
    one_hot = torch.stack([~lesion, lesion], dim=1).float()  # (N, 2, H, W)
    d_regions = StyleEncoder.region_stats(recoloured, one_hot) - StyleEncoder.region_stats(images, one_hot)
    d_global = recoloured.mean(dim=(2, 3)) - images.mean(dim=(2, 3))
    torch.testing.assert_close(d_regions.view(2, 2, 3)[1, 0], torch.full((3,), 0.8))
    assert float(d_global.abs().max()) < 0.01 * 0.8
    images = images.expand(2, -1, -1, -1)
    model = make_model(style_pool="regions")
    mu, logvar = model.encode_style(images, torch.zeros(2, 8, 32, 32))
    assert mu.shape == logvar.shape == (2, 8)
    assert model.style_encoder.fc[0].in_features == 32 + 2 * 3 * 8


def test_colour_moments_and_the_mu_colour_style_prior() -> None:
    # A 2x2 lesion of colour (1, 0, -1) on a 4x4 image of colour (0.5, 0.5, 0.5), one lesion pixel
    # brighter in the red channel: means and stds inside and outside the mask, in that order.
    img = torch.full((1, 3, 4, 4), 0.5)
    img[0, :, :2, :2] = torch.tensor([1.0, 0.0, -1.0]).view(3, 1, 1)
    img[0, 0, 0, 0] = 0.6
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, :2, :2] = 1.0
    out = colour_moments(img, mask).view(2, 2, 3)  # (lesion|rest, mean|std, C)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.9, 0.0, -1.0]))
    torch.testing.assert_close(out[0, 1], torch.tensor([math.sqrt(0.03), 0.0, 0.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[1, 0], torch.full((3,), 0.5))
    torch.testing.assert_close(out[1, 1], torch.zeros(3), atol=1e-3, rtol=0)
    # An empty mask gives zeros for the lesion, not NaN.
    empty = colour_moments(img, torch.zeros(1, 1, 4, 4)).view(2, 2, 3)
    torch.testing.assert_close(empty[0], torch.tensor([[0.0] * 3, [1e-3] * 3]))  # std = sqrt(0 + 1e-6)
    # The model's style prior: mu first (the same numbers as the plain prior), then the colour
    # moments of the image in its own binarised pseudo-mask; the width is derived in the config.
    images, _ = disc_batch(3, 32)
    plain, coloured = make_model().eval(), make_model(style_prior="mu_colour").eval()
    assert coloured.config.style_prior_dim == 8 + 12 and plain.config.style_prior_dim == 8
    a_plain, s_plain = plain.priors(images)
    a_col, s_col = coloured.priors(images)
    assert s_col.shape == (3, 20)
    torch.testing.assert_close(a_col, a_plain)
    torch.testing.assert_close(s_col[:, :8], s_plain)
    pseudo = (coloured.segment(images) > 0.5).float()
    torch.testing.assert_close(s_col[:, 8:], colour_moments(images, pseudo))


def test_512_px_and_the_pixart_preset() -> None:
    # Any size divisible by the total stride works, 512 px included (tiny model: cheap on CPU).
    model = make_model().eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 512, 512))
    assert out.anatomy.shape == (1, 8, 512, 512) and out.recon.shape == (1, 3, 512, 512)
    # The pixart-512 preset (total stride 16) builds and runs; 64 px keeps the test in seconds.
    torch.manual_seed(0)
    big = VisualDisentangler(VISUAL_PRESETS["pixart-512"]).eval()
    anatomy_prior, style_prior = big.priors(torch.zeros(1, 3, 64, 64))
    assert anatomy_prior.shape == (1, 36) and style_prior.shape == (1, 8)


# -- Gumbel straight-through, determinism -----------------------------------------------------------


def test_gumbel_one_hot_is_exact_and_passes_gradient() -> None:
    logits = torch.randn(2, 5, 4, 4, requires_grad=True)
    y = gumbel_one_hot(logits, tau=0.5, generator=torch.Generator().manual_seed(1))
    assert set(y.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(y.detach().sum(dim=1), torch.ones(2, 4, 4))
    (y * torch.randn_like(y)).sum().backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    again = gumbel_one_hot(logits, tau=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, again)


def test_training_map_is_one_hot_and_gradient_reaches_unet() -> None:
    model = make_model().train()
    images, masks = disc_batch(2, 16)
    out = model(images)
    assert set(out.anatomy.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out.anatomy.detach().sum(dim=1), torch.ones(2, 16, 16))
    # Dice depends on the U-Net only through the one-hot map: its gradient must pass through.
    terms = model.losses(images, masks)
    terms["dice"].mean().backward()
    unet_grad = sum(
        float(p.grad.abs().sum()) for p in model.anatomy_encoder.parameters() if p.grad is not None
    )
    assert unet_grad > 0


def test_training_noise_follows_the_generator() -> None:
    model = make_model().train()
    images, masks = disc_batch(2, 16)
    a = model.losses(images, masks, generator=torch.Generator().manual_seed(3))
    b = model.losses(images, masks, generator=torch.Generator().manual_seed(3))
    c = model.losses(images, masks, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a["total"], b["total"])
    assert not torch.equal(a["recon"], c["recon"])


def test_eval_is_deterministic_and_priors_ignore_the_mode() -> None:
    model = make_model()
    images, _ = disc_batch(3, 32)
    model.eval()
    with torch.no_grad():
        one, two = model(images), model(images)
    for field in ("anatomy", "mask_logits", "mu", "z", "recon"):
        assert torch.equal(getattr(one, field), getattr(two, field)), field
    assert torch.equal(one.z, one.mu)
    assert torch.equal(
        one.anatomy, torch.nn.functional.one_hot(one.anatomy_logits.argmax(1), 8).permute(0, 3, 1, 2).float()
    )
    prior_eval = model.priors(images)
    model.train()  # priors are the eval path whatever the mode
    prior_train = model.priors(images)
    assert torch.equal(prior_eval[0], prior_train[0]) and torch.equal(prior_eval[1], prior_train[1])
    assert torch.equal(model.segment(images), model.segment(images))


def test_construction_is_deterministic_under_a_seed() -> None:
    a, b = make_model(seed=5), make_model(seed=5)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_state_dict_round_trip() -> None:
    a, b = make_model(seed=1).eval(), make_model(seed=2).eval()
    images, _ = disc_batch(2, 16)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.priors(images)[1], b.priors(images)[1], rtol=0, atol=0)
    torch.testing.assert_close(a.segment(images), b.segment(images), rtol=0, atol=0)


# -- masks that are missing ---------------------------------------------------------------------------


def test_has_mask_zeroes_dice_and_missing_masks_are_allowed() -> None:
    model = make_model().train()
    images, masks = disc_batch(3, 16)
    masks_with_junk = masks.clone()
    masks_with_junk[1] = float("nan")  # a record without a mask may carry any placeholder
    flags = torch.tensor([True, False, True])
    terms = model.losses(images, masks_with_junk, has_mask=flags, generator=torch.Generator().manual_seed(0))
    dice = terms["dice"].detach()
    assert float(dice[1]) == 0.0 and float(dice[0]) > 0 and float(dice[2]) > 0
    assert torch.isfinite(terms["total"]).all()
    terms["total"].mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    no_masks = model.losses(images, None)
    assert torch.equal(no_masks["dice"], torch.zeros(3))


# -- priors as pure functions -------------------------------------------------------------------------


def test_region_moments_hand_drawn() -> None:
    maps = torch.zeros(1, 4, 4, 4)
    maps[0, 0, :2, :2] = 1  # 2x2 block in the upper left
    maps[0, 1, 3, 2] = 1  # one pixel: row 3, column 2
    # channel 2 stays empty
    maps[0, 3] = 1  # the whole image
    got = region_moments(maps)[0]  # (4, 4)
    torch.testing.assert_close(got[0], torch.tensor([0.25, 0.25, 0.25, math.sqrt(2) * 0.125]))
    torch.testing.assert_close(got[1], torch.tensor([1 / 16, 2.5 / 4, 3.5 / 4, 0.0]))
    torch.testing.assert_close(got[2], torch.tensor([0.0, 0.5, 0.5, 0.0]))
    # Pixel centres 1/8, 3/8, 5/8, 7/8: variance per axis (1/64 + 9/64) / 2 = 5/64.
    torch.testing.assert_close(got[3], torch.tensor([1.0, 0.5, 0.5, math.sqrt(10 / 64)]))


def test_region_moments_non_square_axes() -> None:
    maps = torch.zeros(1, 1, 2, 4)  # H=2, W=4
    maps[0, 0, 1, 3] = 1  # lower row, rightmost column
    torch.testing.assert_close(region_moments(maps)[0, 0], torch.tensor([1 / 8, 7 / 8, 3 / 4, 0.0]))


def test_moments_prior_layout_mask_first() -> None:
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2, :2] = 1
    anatomy = torch.zeros(2, 3, 4, 4)
    anatomy[:, 0] = 1  # channel 0 everywhere, channels 1 and 2 empty
    prior = moments_prior(mask, anatomy)
    assert prior.shape == (2, 16)
    torch.testing.assert_close(prior[0, :4], torch.tensor([0.25, 0.25, 0.25, math.sqrt(2) * 0.125]))
    torch.testing.assert_close(prior[1, :4], torch.tensor([0.0, 0.5, 0.5, 0.0]))  # empty mask
    torch.testing.assert_close(prior[:, 4:8], torch.tensor([[1.0, 0.5, 0.5, math.sqrt(10 / 64)]] * 2))
    torch.testing.assert_close(prior[:, 8:], torch.tensor([[0.0, 0.5, 0.5, 0.0] * 2] * 2))


def test_area_prior_sums_to_one() -> None:
    labels = torch.randint(0, 5, (3, 8, 8))
    anatomy = torch.nn.functional.one_hot(labels, 5).permute(0, 3, 1, 2).float()
    prior = area_prior(anatomy)
    torch.testing.assert_close(prior.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(prior[0, 2], (labels[0] == 2).float().mean())


def test_model_priors_in_both_modes() -> None:
    images, _ = disc_batch(3, 32)
    moments = make_model().eval()
    a_prior, s_prior = moments.priors(images)
    assert a_prior.shape == (3, 36) and s_prior.shape == (3, 8)
    _, anatomy = moments.encode_anatomy(images)
    mask = (moments.segment(images) > 0.5).float()
    torch.testing.assert_close(a_prior, moments_prior(mask, anatomy))
    area = make_model(prior="area").eval()
    a_prior, s_prior = area.priors(images)
    assert a_prior.shape == (3, 8) and s_prior.shape == (3, 8)
    torch.testing.assert_close(a_prior.sum(dim=1), torch.ones(3))
    probs = area.segment(images)
    assert probs.shape == (3, 1, 32, 32) and 0 <= float(probs.min()) <= float(probs.max()) <= 1


def test_scalar_adain_reference_mode_uses_only_mean_and_std_of_z() -> None:
    model = make_model(adain="scalar").eval()
    assert all(norm.proj is None for norm in model.decoder.norms)
    anatomy = torch.nn.functional.one_hot(torch.randint(0, 8, (1, 16, 16)), 8).permute(0, 3, 1, 2).float()
    z = torch.randn(1, 8)
    # A permutation of z has the same mean and std: the reference decoder cannot tell them apart.
    same = model.decode(anatomy, z[:, torch.randperm(8)])
    torch.testing.assert_close(model.decode(anatomy, z), same)
    ours = make_model(adain="linear").eval()
    assert not torch.allclose(ours.decode(anatomy, z), ours.decode(anatomy, z.flip(1)))


# -- perceptual loss from a local file ----------------------------------------------------------------


def test_missing_perceptual_file_is_a_clear_error(tmp_path: Path) -> None:
    absent = tmp_path / "vgg16-missing.pth"
    with pytest.raises(PerceptualWeightsError, match=r"vgg16-missing\.pth.*set it to null"):
        make_model(perceptual_weights=absent)


def test_perceptual_loss_from_local_files_stays_out_of_checkpoints(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"])[:12]
    full_keys = {f"features.{k}": v for k, v in features.state_dict().items()}
    torch.save(full_keys, tmp_path / "vgg16.pth")
    save_file(features.state_dict(), str(tmp_path / "vgg16_features.safetensors"))
    torch.save({"something": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(PerceptualWeightsError, match="not a torchvision VGG16 state dict"):
        make_model(perceptual_weights=tmp_path / "wrong.pth")

    images, masks = disc_batch(2, 16)
    for name in ("vgg16.pth", "vgg16_features.safetensors"):
        model = make_model(perceptual_weights=tmp_path / name).train()
        assert torch.equal(model.perceptual.features[0].weight, features[0].weight)
        terms = model.losses(images, masks, generator=torch.Generator().manual_seed(0))
        assert terms["perceptual"].shape == (2,) and float(terms["perceptual"].detach().min()) > 0
        expected = (
            terms["recon"]
            + 0.1 * terms["perceptual"]
            + 0.01 * terms["kl"]
            + 10 * terms["dice"]
            + terms["z_regression"]
        )
        torch.testing.assert_close(terms["total"], expected)
        terms["total"].mean().backward()
        assert all(p.grad is None for p in model.perceptual.parameters())  # frozen
        state = model.state_dict()
        assert not any("perceptual" in k for k in state)
        # The checkpoint loads strictly into a model with or without the perceptual loss.
        make_model(seed=9).load_state_dict(state)
        make_model(seed=9, perceptual_weights=tmp_path / name).load_state_dict(state)


# -- a short training run ---------------------------------------------------------------------------


def test_short_training_run_lowers_dice() -> None:
    model = make_model(seed=0)
    images, masks = disc_batch(6, 24, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.5, 0.999))  # the stage-1 reference betas

    def eval_dice() -> float:
        model.eval()
        with torch.no_grad():
            return float(model.losses(images, masks)["dice"].mean())

    before = eval_dice()
    gen = torch.Generator().manual_seed(0)
    model.train()
    train_dice = []
    for _ in range(30):
        opt.zero_grad()
        terms = model.losses(images, masks, generator=gen)
        terms["total"].mean().backward()
        opt.step()
        train_dice.append(float(terms["dice"].detach().mean()))
    after = eval_dice()
    assert sum(train_dice[-5:]) / 5 < sum(train_dice[:5]) / 5 - 0.05
    assert after < before - 0.1, (before, after)
