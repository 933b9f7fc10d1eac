"""Unit tests of the generator (config, backbone wrapper, HFFM modes, losses, EMA); tiny sizes."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel

from vgmedgen.model.autoencoder import ComponentNotFoundError
from vgmedgen.model.configbase import ConfigError
from vgmedgen.model.ema import EMA
from vgmedgen.model.generator import (
    GENERATOR_PRESETS,
    GeneratorConfig,
    PixArtBackbone,
    build_generator,
    build_generator_config,
)
from vgmedgen.model.losses import colour_distribution_loss, epsilon_mse
from vgmedgen.model.schedule import (
    add_noise,
    epsilon_from_v,
    min_snr_weight,
    predict_x0,
    split_learned_sigma,
    v_target,
    x0_from_v,
)

A, S, N = 36, 8, 3


def _tiny_pretrained_dir(root: Path, **backbone_overrides: object) -> Path:
    """A tiny PixArt pipeline dir (transformer/ only) with diffusers' default random init."""
    cfg = build_generator_config("tiny", {"backbone": dict(backbone_overrides)})
    torch.manual_seed(0)
    PixArtBackbone(**cfg.backbone.diffusers_kwargs()).save_pretrained(root / "transformer")
    return root


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_pretrained_dir(tmp_path_factory.mktemp("pixart"))


@pytest.fixture(scope="module")
def pretrained_sigma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_pretrained_dir(tmp_path_factory.mktemp("pixart_sigma"), learned_sigma=True)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(root / "vae")
    return root


def _pretrained_cfg(path: Path, **over: object) -> GeneratorConfig:
    return build_generator_config("tiny", {"init": "pretrained", "pretrained_dir": str(path), **over})


def _inputs(seed: int = 0, n: int = N, size: int = 16, channels: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x, t, torch.randn(n, A, generator=g), torch.randn(n, S, generator=g)


# ---- config ---------------------------------------------------------------------------------


def test_presets_are_the_three_named_and_cpu_presets_validate() -> None:
    assert set(GENERATOR_PRESETS) == {"tiny", "demo", "pixart-512"}
    tiny = build_generator_config("tiny")
    assert (tiny.backbone.sample_size, tiny.backbone.patch_size, tiny.backbone.num_layers) == (16, 2, 2)
    assert (tiny.init, tiny.train, tiny.vae_dir) == ("scratch", "full", None)
    demo = build_generator_config("demo")
    assert demo.backbone.sample_size == 32 and demo.backbone.inner_dim == 128
    assert demo.hffm.mode == "separate"


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="Valid presets: demo, pixart-512, tiny"):
        build_generator_config("tiyn")


def test_scratch_with_lora_is_rejected_with_reason() -> None:
    with pytest.raises(ConfigError, match="learns nothing"):
        build_generator_config("tiny", {"train": "lora"})


def test_pretrained_without_dir_is_rejected() -> None:
    with pytest.raises(ConfigError, match="init='pretrained' needs pretrained_dir"):
        build_generator_config("pixart-512")


def test_pixel_space_needs_three_channels() -> None:
    with pytest.raises(ConfigError, match="in_channels must be 3"):
        build_generator_config("tiny", {"backbone": {"in_channels": 4}})


def test_condition_dropouts_must_sum_to_at_most_one_and_text_dropout_at_least_03() -> None:
    with pytest.raises(ConfigError, match="sum to at most 1"):
        build_generator_config(
            "tiny", {"conditioning": {"drop_all": 0.5, "drop_anatomy": 0.4, "drop_style": 0.2}}
        )
    with pytest.raises(ConfigError, match="hffm.text_dropout"):
        build_generator_config("tiny", {"hffm": {"text_dropout": 0.2}})
    with pytest.raises(ConfigError, match="unknown field"):
        build_generator_config("tiny", {"hffm": {"mdoe": "tokens"}})


def test_missing_pretrained_dir_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_pixart"
    cfg = _pretrained_cfg(missing)
    with pytest.raises(ComponentNotFoundError, match=str(missing)):
        build_generator(cfg)


def test_checkpoint_with_other_architecture_is_a_config_error(pretrained_dir: Path) -> None:
    cfg = build_generator_config(
        "tiny", {"init": "pretrained", "pretrained_dir": str(pretrained_dir), "backbone": {"num_layers": 3}}
    )
    with pytest.raises(ConfigError, match="num_layers: checkpoint 2 vs config 3"):
        build_generator(cfg)


def test_bf16_on_cpu_is_a_clear_error() -> None:
    gen = build_generator(build_generator_config("tiny", {"dtype": "bfloat16"}))
    x, t, t_a, t_s = _inputs()
    with pytest.raises(ValueError, match="dtype='float32' for CPU"):
        gen(x, t, t_a, t_s)


# ---- backbone wrapper, HFFM modes -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tokens", "separate", "hybrid"])
def test_forward_shapes_and_backward(mode: str) -> None:
    gen = build_generator(build_generator_config("tiny", {"hffm": {"mode": mode}}))
    x, t, t_a, t_s = _inputs()
    text = torch.randn(N, 5, 32) if mode == "hybrid" else None
    eps = gen(x, t, t_a, t_s, text_tokens=text)
    assert eps.shape == (N, 3, 16, 16) and eps.dtype == torch.float32
    (eps - torch.randn_like(eps)).square().mean().backward()
    # Scratch init zeroes proj_out, so its gradient is the one that is surely non-zero.
    assert gen.backbone.proj_out.weight.grad.abs().sum() > 0
    # Every trained parameter is reached, except the stream nulls (nothing was dropped).
    missing = [n for n, p in gen.named_trainable_parameters() if p.grad is None]
    assert missing == ["hffm.anatomy.null_tokens", "hffm.style.null_tokens"]


def test_tokens_mode_reproduces_diffusers_forward(pretrained_sigma_dir: Path) -> None:
    """Parity: same weights, same conditioning tokens -> the stock diffusers module's output."""
    cfg = _pretrained_cfg(
        pretrained_sigma_dir,
        backbone={"learned_sigma": True},
        train="full",
        hffm={"mode": "tokens", "prior_layernorm": True},
    )
    gen = build_generator(cfg)
    stock = PixArtTransformer2DModel.from_pretrained(pretrained_sigma_dir, subfolder="transformer")
    x, t, t_a, t_s = _inputs()
    drop_a = torch.tensor([False, True, False])
    with torch.no_grad():
        ours = gen(x, t, t_a, t_s, drop_anatomy=drop_a)
        streams = gen.hffm.stream_tokens(t_a, t_s, drop_a, None)
        tokens = torch.cat([streams["anatomy"], streams["style"]], dim=1)  # (N, 2K, C)
        ref = stock(
            x,
            encoder_hidden_states=tokens,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
    assert ref.shape == (N, 6, 16, 16)  # learned sigma: 2 * 3 channels
    torch.testing.assert_close(ours, ref[:, :3], rtol=0, atol=0)
    assert tokens.shape == (N, 2 * cfg.hffm.tokens_per_stream, cfg.backbone.caption_channels)


@pytest.mark.parametrize("mode", ["separate", "hybrid"])
def test_zero_gates_equal_bare_backbone_on_null_tokens(pretrained_dir: Path, mode: str) -> None:
    gen = build_generator(_pretrained_cfg(pretrained_dir, train="full", hffm={"mode": mode}))
    stock = PixArtTransformer2DModel.from_pretrained(pretrained_dir, subfolder="transformer")
    x, t, t_a, t_s = _inputs()
    with torch.no_grad():
        ours = gen(x, t, t_a, t_s)
        null = gen.hffm.shared_null.expand(N, -1, -1)
        ref = stock(
            x,
            encoder_hidden_states=null,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        # Opening one gate makes the streams matter.
        gen.hffm.branches[0]["anatomy"].gate.fill_(0.5)
        opened = gen(x, t, t_a, t_s)
        other = gen(x, t, t_a + 1.0, t_s)
    assert (opened - ref).abs().max() > 1e-4
    assert (opened - other).abs().max() > 1e-4


def test_branch_gate_gets_gradient_at_zero(pretrained_dir: Path) -> None:
    gen = build_generator(_pretrained_cfg(pretrained_dir, train="full"))
    x, t, t_a, t_s = _inputs()
    gen(x, t, t_a, t_s).square().mean().backward()
    gates = [b[s].gate.grad for b in gen.hffm.branches for s in ("anatomy", "style")]
    assert all(g is not None and g.abs() > 0 for g in gates)


def test_hybrid_text_tokens_enter_once_projection_is_nonzero(pretrained_dir: Path) -> None:
    gen = build_generator(_pretrained_cfg(pretrained_dir, train="full", hffm={"mode": "hybrid"}))
    x, t, t_a, t_s = _inputs()
    text = torch.randn(N, 4, 32)
    mask = torch.ones(N, 4)
    with torch.no_grad():
        torch.nn.init.normal_(gen.hffm.text_proj.weight, std=0.5)
        with_text = gen(x, t, t_a, t_s, text_tokens=text, text_mask=mask)
        dropped = gen(
            x, t, t_a, t_s, text_tokens=text, text_mask=mask, drop_text=torch.ones(N, dtype=torch.bool)
        )
        no_text = gen(x, t, t_a, t_s)
    assert (with_text - no_text).abs().max() > 1e-4
    # Dropping the text masks the caption tokens out: only the null tokens remain.
    torch.testing.assert_close(dropped, no_text, rtol=1e-5, atol=1e-5)


def test_caption_mode_conditions_on_the_caption_alone(pretrained_dir: Path) -> None:
    """The baseline without disentanglement: the caption's tokens are the only condition, the streams enter
    nothing (and do not train), and training drops the caption whenever a stream dropout is drawn."""
    gen = build_generator(_pretrained_cfg(pretrained_dir, train="full", hffm={"mode": "caption"}))
    x, t, t_a, t_s = _inputs()
    text, mask = torch.randn(N, 4, 32), torch.ones(N, 4)
    with torch.no_grad():
        torch.nn.init.normal_(gen.hffm.text_proj.weight, std=0.5)
        base = gen(x, t, t_a, t_s, text_tokens=text, text_mask=mask)
        other_streams = gen(x, t, t_a + 3.0, t_s - 3.0, text_tokens=text, text_mask=mask)
        other_caption = gen(x, t, t_a, t_s, text_tokens=text + 1.0, text_mask=mask)
    torch.testing.assert_close(base, other_streams, rtol=0, atol=0)
    assert (base - other_caption).abs().max() > 1e-4
    assert gen.hffm.branches is None
    trained = [n for n, _ in gen.named_trainable_parameters()]
    assert (
        not any(n.startswith(("hffm.anatomy.", "hffm.style.")) for n in trained)
        and "hffm.text_proj.weight" in trained
    )
    with pytest.raises(ValueError, match="caption's tokens alone: pass text_tokens"):
        gen(x, t, t_a, t_s)
    images = torch.rand(N, 3, 16, 16) * 2 - 1
    terms = gen.training_loss(
        images, t_a, t_s, text_tokens=text, text_mask=mask, generator=torch.Generator().manual_seed(0)
    )
    terms["eps"].mean().backward()
    assert gen.hffm.text_proj.weight.grad.abs().sum() > 0


def test_text_tokens_outside_hybrid_is_an_error() -> None:
    gen = build_generator(build_generator_config("tiny"))
    x, t, t_a, t_s = _inputs()
    with pytest.raises(ValueError, match="only used in hffm.mode='hybrid'"):
        gen(x, t, t_a, t_s, text_tokens=torch.randn(N, 4, 32))


def test_dropped_stream_uses_learned_null(pretrained_dir: Path) -> None:
    gen = build_generator(_pretrained_cfg(pretrained_dir, train="full"))
    with torch.no_grad():
        for b in gen.hffm.branches:
            b["anatomy"].gate.fill_(1.0)
    x, t, t_a, t_s = _inputs()
    drop = torch.ones(N, dtype=torch.bool)
    with torch.no_grad():
        a = gen(x, t, t_a, t_s, drop_anatomy=drop)
        b = gen(x, t, t_a * 3.0, t_s, drop_anatomy=drop)  # anatomy ignored when dropped
        c = gen(x, t, t_a, t_s)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-4
    tokens = gen.hffm.anatomy(t_a, drop)
    torch.testing.assert_close(tokens, gen.hffm.anatomy.null_tokens.expand(N, -1, -1))


def test_reference_layernorm_erases_scale_and_default_keeps_it() -> None:
    ln = build_generator(
        build_generator_config("tiny", {"hffm": {"mode": "tokens", "prior_layernorm": True}})
    )
    plain = build_generator(build_generator_config("tiny"))
    t_a = torch.randn(2, A)
    with torch.no_grad():
        torch.testing.assert_close(ln.hffm.anatomy(t_a), ln.hffm.anatomy(4.0 * t_a), rtol=1e-4, atol=1e-4)
        assert (plain.hffm.anatomy(t_a) - plain.hffm.anatomy(4.0 * t_a)).abs().max() > 1e-3


def test_only_intended_parameters_train_in_lora_and_full_mode(pretrained_dir: Path) -> None:
    x, t, t_a, t_s = _inputs()
    # Drop one stream in one sample each, so that the learned nulls are used too.
    drops = {
        "drop_anatomy": torch.tensor([True, False, False]),
        "drop_style": torch.tensor([False, True, False]),
    }
    lora = build_generator(_pretrained_cfg(pretrained_dir, train="lora"))
    lora(x, t, t_a, t_s, **drops).square().mean().backward()
    for name, p in lora.named_parameters():
        intended = ".lora_" in name or name.startswith("hffm.")
        assert p.requires_grad == intended, name
        assert (p.grad is not None) == intended, name
    counts = lora.parameter_counts()
    assert counts["trainable"] == counts["lora"] + counts["hffm"] and counts["lora"] > 0

    full = build_generator(_pretrained_cfg(pretrained_dir, train="full"))
    full(x, t, t_a, t_s, **drops).square().mean().backward()
    assert all(p.requires_grad and p.grad is not None for p in full.parameters())
    assert full.parameter_counts()["lora"] == 0 and full.lora_modules == []


def test_pixart_512_parameter_counts_on_meta_device(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = build_generator_config(
        "pixart-512", {"pretrained_dir": "/nonexistent/pixart", "vae_dir": "/nonexistent"}
    )
    with torch.device("meta"):
        gen = build_generator(cfg, load_weights=False)
    counts = gen.parameter_counts()
    with capsys.disabled():
        print(f"\npixart-512 parameter counts: {counts}")
    assert 0.60e9 < counts["backbone"] < 0.62e9
    assert 6.8e6 < counts["lora"] < 7.0e6
    assert counts["hffm"] <= 10.0e6
    assert 80e6 < counts["vae"] < 90e6
    assert counts["trainable"] == counts["lora"] + counts["hffm"]
    assert gen.image_size == 512 and gen.sample_shape() == (4, 64, 64)


# ---- losses ---------------------------------------------------------------------------------


def test_epsilon_mse_hand_computed() -> None:
    pred = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])  # (2, 1, 1, 2)
    eps = torch.tensor([[[[0.0, 0.0]]], [[[3.0, -1.0]]]])
    torch.testing.assert_close(epsilon_mse(pred, eps), torch.tensor([2.5, 5.0]))


def test_colour_loss_hand_computed() -> None:
    # Channel values over two pixels. pred: ch0 [0, 2] (mean 1, std 1), ch1 [1, 1] (mean 1, std 0),
    # ch2 [0, 0]. target: ch0 [1, 1] (mean 1, std 0), ch1 [0, 2] (mean 1, std 1), ch2 [0, 0].
    pred = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]], [[0.0, 0.0]]]])  # (1, 3, 1, 2)
    target = torch.tensor([[[[1.0, 1.0]], [[0.0, 2.0]], [[0.0, 0.0]]]])
    # mean term 0; std term ((1-0)^2 + (0-1)^2 + 0) / 3 = 2/3 (up to the 1e-12 under the sqrt)
    torch.testing.assert_close(
        colour_distribution_loss(pred, target), torch.tensor([2 / 3]), atol=1e-5, rtol=0
    )
    shifted = target + torch.tensor([0.5, 0.0, -1.0]).view(1, 3, 1, 1)
    # mean term (0.25 + 0 + 1) / 3, std term 0
    torch.testing.assert_close(colour_distribution_loss(shifted, target), torch.tensor([1.25 / 3]))
    # A flat prediction (zero variance) still gets a finite gradient.
    flat = torch.zeros(1, 3, 2, 2, requires_grad=True)
    colour_distribution_loss(flat, torch.rand(1, 3, 2, 2)).sum().backward()
    assert torch.isfinite(flat.grad).all() and flat.grad.abs().sum() > 0


def test_noise_and_x0_estimate_are_inverse() -> None:
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a = torch.tensor([0.9, 0.3])
    x_t = add_noise(x0, eps, a)
    torch.testing.assert_close(x_t[1], math.sqrt(0.3) * x0[1] + math.sqrt(0.7) * eps[1])
    torch.testing.assert_close(predict_x0(x_t, eps, a), x0, rtol=1e-5, atol=1e-5)
    out = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(split_learned_sigma(out, 3), out[:, :3])
    with pytest.raises(ValueError, match="expected 3 or 6"):
        split_learned_sigma(torch.randn(2, 5, 4, 4), 3)


def test_v_parameterisation_round_trips_and_min_snr_weights() -> None:
    x0, eps = torch.randn(3, 3, 4, 4, dtype=torch.float64), torch.randn(3, 3, 4, 4, dtype=torch.float64)
    a = torch.tensor([0.999, 0.5, 4e-5], dtype=torch.float64)  # near-clean, middle, almost pure noise
    x_t = add_noise(x0, eps, a)
    v = v_target(x0, eps, a)
    torch.testing.assert_close(v[1], math.sqrt(0.5) * eps[1].float() - math.sqrt(0.5) * x0[1].float())
    torch.testing.assert_close(epsilon_from_v(x_t, v, a), eps.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0_from_v(x_t, v, a), x0.float(), rtol=1e-5, atol=1e-5)
    # Both weightings equal min(SNR, gamma) times the x0 MSE of the same prediction error.
    x0_err = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    x0_hat = x0 + x0_err
    eps_hat = (x_t - a.sqrt().view(-1, 1, 1, 1) * x0_hat) / (1 - a).sqrt().view(-1, 1, 1, 1)
    v_hat = v_target(x0_hat, eps_hat, a)
    snr = (a / (1 - a)).float()
    want = snr.clamp(max=5.0) * epsilon_mse(x0_hat, x0)
    got_eps = min_snr_weight(a, 5.0, "epsilon") * epsilon_mse(eps_hat, eps)
    got_v = min_snr_weight(a, 5.0, "v_prediction") * epsilon_mse(v_hat, v)
    torch.testing.assert_close(got_eps, want, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(got_v, want, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        min_snr_weight(a, 5.0, "sample")


def test_v_prediction_generator_returns_epsilon_and_trains() -> None:
    cfg = build_generator_config(
        "tiny", {"schedule": {"prediction_type": "v_prediction", "loss_weighting": "min_snr"}}
    )
    torch.manual_seed(0)
    gen = build_generator(cfg)
    with torch.no_grad():  # a non-zero output layer, so that v and epsilon differ
        torch.nn.init.normal_(gen.backbone.proj_out.weight, std=0.1)
    x, t, t_a, t_s = _inputs()
    with torch.no_grad():
        raw = gen.predict(x, t, t_a, t_s)
        eps = gen(x, t, t_a, t_s)
    torch.testing.assert_close(eps, epsilon_from_v(x, raw, gen.alphas_cumprod[t]))
    assert not torch.allclose(eps, raw)
    # The loss is the (Min-SNR-weighted) v error, with a colour term on the v-based x0 estimate.
    images = x.clamp(-1, 1)
    params = [p for _, p in gen.named_trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for step in range(40):
        terms = gen.training_loss(
            images, t_a, t_s, generator=torch.Generator().manual_seed(step % 4), step=step
        )
        loss = gen.reduce_loss(terms)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4])  # the same 4 seeds: 0.82 measured


# ---- training loss ----------------------------------------------------------------------------


def test_training_loss_is_deterministic_under_a_seed() -> None:
    gen = build_generator(build_generator_config("tiny"))
    images, _, t_a, t_s = _inputs()
    images = images.clamp(-1, 1)

    def run(seed: int) -> dict[str, torch.Tensor]:
        return gen.training_loss(
            images, t_a, t_s, t_a + 1, t_s + 1, generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = run(7), run(7), run(8)
    for k in ("eps", "colour", "colour_mask"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not torch.equal(a["eps"], c["eps"])
    assert a["eps"].shape == (N,) and a["colour"].shape == (N,)


def test_condition_source_switches_to_visual_priors(pretrained_dir: Path) -> None:
    images, _, t_a, t_s = _inputs()
    prior_a, prior_s = torch.randn(N, A), torch.randn(N, S)

    def loss(source: float, *args: torch.Tensor) -> torch.Tensor:
        gen = build_generator(
            _pretrained_cfg(pretrained_dir, train="full", conditioning={"condition_source": source})
        )
        with torch.no_grad():
            for b in gen.hffm.branches:
                b["anatomy"].gate.fill_(1.0)
                b["style"].gate.fill_(1.0)
            return gen.training_loss(images, *args, generator=torch.Generator().manual_seed(3))["eps"]

    torch.manual_seed(0)
    always = loss(1.0, t_a, t_s, prior_a, prior_s)
    torch.manual_seed(0)
    priors_only = loss(1.0, prior_a, prior_s)
    torch.manual_seed(0)
    never = loss(0.0, t_a, t_s, prior_a, prior_s)
    torch.manual_seed(0)
    text_only = loss(0.0, t_a, t_s)
    torch.testing.assert_close(always, priors_only, rtol=0, atol=0)
    torch.testing.assert_close(never, text_only, rtol=0, atol=0)
    assert not torch.equal(always, never)


def test_colour_loss_trains_lora_b(pretrained_dir: Path) -> None:
    gen = build_generator(
        _pretrained_cfg(pretrained_dir, train="lora", colour={"weight": 1.0, "t_min": 0, "t_max": 999})
    )
    images, _, t_a, t_s = _inputs()
    terms = gen.training_loss(images.clamp(-1, 1), t_a, t_s, generator=torch.Generator().manual_seed(0))
    assert terms["colour_mask"].all() and (terms["colour"] > 0).all()
    terms["colour"].sum().backward()  # the colour term alone
    b_grads = [p.grad for n, p in gen.backbone.named_parameters() if ".lora_B." in n]
    assert b_grads and all(g is not None for g in b_grads)
    assert sum(float(g.abs().sum()) for g in b_grads) > 0
    # every_k: inactive on other steps
    off = gen.training_loss(images, t_a, t_s, generator=torch.Generator().manual_seed(0), step=1)
    assert gen.cfg.colour.every_k == 1 and off["colour_mask"].all()
    gen2 = build_generator(_pretrained_cfg(pretrained_dir, train="lora", colour={"every_k": 2}))
    off2 = gen2.training_loss(images, t_a, t_s, generator=torch.Generator().manual_seed(0), step=1)
    assert not off2["colour_mask"].any() and float(off2["colour"].abs().sum()) == 0.0


def test_reduce_loss_formula() -> None:
    gen = build_generator(build_generator_config("tiny", {"colour": {"weight": 0.5}}))
    terms = {
        "eps": torch.tensor([1.0, 2.0, 3.0]),
        "colour": torch.tensor([0.0, 4.0, 2.0]),
        "colour_mask": torch.tensor([False, True, True]),
    }
    torch.testing.assert_close(gen.reduce_loss(terms), torch.tensor(2.0 + 0.5 * 3.0))
    terms["colour_mask"] = torch.zeros(3, dtype=torch.bool)
    torch.testing.assert_close(gen.reduce_loss(terms), torch.tensor(2.0))


def test_latent_space_training_with_vae_crop(pretrained_dir: Path, tiny_vae_dir: Path) -> None:
    cfg = build_generator_config(
        "tiny",
        {
            "backbone": {"in_channels": 4, "sample_size": 8},
            "vae_dir": str(tiny_vae_dir),
            "colour": {"weight": 1.0, "t_max": 999, "decode_max_images": 2, "latent_crop": 4},
        },
    )
    gen = build_generator(cfg)
    assert gen.image_size == 16 and gen.sample_shape() == (4, 8, 8)
    images = torch.rand(N, 3, 16, 16) * 2 - 1
    _, _, t_a, t_s = _inputs()
    terms = gen.training_loss(images, t_a, t_s, generator=torch.Generator().manual_seed(0))
    assert int(terms["colour_mask"].sum()) == 2  # decode_max_images
    gen.reduce_loss(terms).backward()
    assert gen.backbone.proj_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in gen.vae.parameters())
    bad = build_generator_config(
        "tiny", {"backbone": {"in_channels": 4}, "vae_dir": str(tiny_vae_dir / "nope")}
    )
    with pytest.raises(ComponentNotFoundError, match="generator.vae_dir"):
        build_generator(bad)
    # Precomputed posterior moments (the dit stage's cache) give the loss terms that encoding gives.
    with_moments = gen.training_loss(
        images,
        t_a,
        t_s,
        generator=torch.Generator().manual_seed(0),
        latent_moments=gen.vae.moments(images),
    )
    for k in terms:
        torch.testing.assert_close(with_moments[k], terms[k], msg=k)


def test_trained_autoencoder_config_sets_the_latent_grid_and_is_checked() -> None:
    cfg = build_generator_config(
        "tiny",
        {
            "autoencoder": {"block_out_channels": [16, 16, 32], "norm_num_groups": 8},
            "backbone": {"in_channels": 4, "sample_size": 4},
        },
    )
    assert cfg.downscale == 4
    gen = build_generator(cfg, load_weights=False)  # the architecture, random: no export needed
    assert gen.image_size == 16 and gen.sample_shape() == (4, 4, 4)
    with pytest.raises(ConfigError, match="pass its export directory"):
        build_generator(cfg)
    for over, message in (
        ({"autoencoder": {}, "backbone": {"in_channels": 3}}, "backbone.in_channels must be 4"),
        ({"autoencoder": {}, "vae_dir": "/x", "backbone": {"in_channels": 4}}, "keep one"),
        ({"autoencoder": {"block_out_channels": [24, 32]}, "backbone": {"in_channels": 4}}, "must divide"),
    ):
        with pytest.raises(ConfigError, match=message):
            build_generator_config("tiny", over)


# ---- EMA ------------------------------------------------------------------------------------


def test_ema_tracks_trained_parameters_swaps_and_round_trips(pretrained_dir: Path) -> None:
    gen = build_generator(_pretrained_cfg(pretrained_dir, train="lora"))
    ema = EMA(gen, decay=0.5, warmup=False)
    assert set(ema.shadow) == {n for n, _ in gen.named_trainable_parameters()}
    name, p = next((n, p) for n, p in gen.named_trainable_parameters() if ".lora_B." in n)
    before = p.detach().clone()
    with torch.no_grad():
        p.add_(2.0)
    ema.update(gen)
    torch.testing.assert_close(ema.shadow[name], before + 1.0)  # 0.5 * old + 0.5 * (old + 2)
    with ema.swapped_in(gen):
        torch.testing.assert_close(p.detach(), before + 1.0)
    torch.testing.assert_close(p.detach(), before + 2.0)
    other = EMA(gen, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and other.num_updates == 1
    torch.testing.assert_close(other.shadow[name], ema.shadow[name])
    warm = EMA(gen, decay=0.999)
    assert warm.current_decay() == pytest.approx(0.1)


def test_gradient_checkpointing_gives_the_same_gradients(pretrained_dir: Path) -> None:
    """The branch tokens reach the recomputed blocks (they travel as a kwarg, not as state)."""
    x, t, t_a, t_s = _inputs()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)  # same LoRA A init in both
        gen = build_generator(_pretrained_cfg(pretrained_dir, train="lora", gradient_checkpointing=ckpt))
        with torch.no_grad():
            gen.hffm.branches[1]["style"].gate.fill_(0.3)
        gen.train()
        gen(x, t, t_a, t_s).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in gen.named_trainable_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert grads[1]["hffm.branches.1.style.to_k.weight"].abs().sum() > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def test_deepcopy_keeps_processors_bound_to_the_copy(pretrained_dir: Path) -> None:
    import copy

    gen = build_generator(_pretrained_cfg(pretrained_dir, train="full"))
    twin = copy.deepcopy(gen)
    with torch.no_grad():
        twin.hffm.branches[0]["anatomy"].gate.fill_(1.0)
        x, t, t_a, t_s = _inputs()
        assert (twin(x, t, t_a, t_s) - gen(x, t, t_a, t_s)).abs().max() > 1e-4
    assert float(gen.hffm.branches[0]["anatomy"].gate.detach()) == 0.0
    # The backbone's own state dict holds stock diffusers names only (no HFFM keys).
    assert not any("branch" in k or "hffm" in k or "processor" in k for k in gen.backbone.state_dict())


def test_scratch_branches_open_from_the_first_steps() -> None:
    """From scratch the gates start at 1 (the zeroed attn2.to_out keeps the condition out at init), so the
    branch projections learn as soon as the zero-initialised proj_out and attn2.to_out have moved (step 3);
    with a zero gate they would still get exactly no gradient then."""

    def to_v_grad_at_step_3(gate_init: float | None) -> float:
        cfg = build_generator_config("tiny", {"hffm": {"gate_init": gate_init}})
        torch.manual_seed(0)
        gen = build_generator(cfg)
        opt = torch.optim.SGD([p for _, p in gen.named_trainable_parameters()], lr=0.1)
        g = torch.Generator().manual_seed(0)
        images = torch.rand(4, 3, 16, 16) * 2 - 1
        for _ in range(3):
            opt.zero_grad()
            gen.reduce_loss(
                gen.training_loss(images, torch.randn(4, 36), torch.randn(4, 8), generator=g)
            ).backward()
            grad = sum(float(b["anatomy"].to_v.weight.grad.abs().sum()) for b in gen.hffm.branches)
            opt.step()
        return grad

    assert float(build_generator(build_generator_config("tiny")).hffm.branches[0]["anatomy"].gate) == 1.0
    assert to_v_grad_at_step_3(None) > 0
    assert to_v_grad_at_step_3(0.0) == 0.0


def test_stream_standardization_is_identity_until_set_from_data():
    from vgmedgen.model.hffm import StreamFusion

    torch.manual_seed(0)
    plain = StreamFusion(6, 16, 8, 2, layernorm=False)
    act = StreamFusion(6, 16, 8, 2, layernorm=False, standardize=True)
    act.load_state_dict(plain.state_dict(), strict=False)
    priors = torch.randn(500, 6) * 0.05 + torch.linspace(0.2, 0.8, 6)  # small spread around an offset
    assert torch.equal(act(priors), plain(priors))  # identity before the data init
    act.init_standardization(priors)
    z = (priors - act.shift) * torch.exp(-act.log_scale)
    assert torch.allclose(z.mean(0), torch.zeros(6), atol=1e-5) and torch.allclose(
        z.std(0), torch.ones(6), atol=1e-4
    )
    assert {n for n, p in act.named_parameters() if p.requires_grad} >= {"shift", "log_scale"}
    with pytest.raises(RuntimeError, match="standardize=True"):
        plain.init_standardization(priors)


# The dit stage runs DDP without its per-step search for unused parameters (train.find_unused_parameters=auto):
# a trainable parameter outside some step's graph would then stall the gradient all-reduce or raise. Every
# mode, under each extreme of the condition draws, must reach every trainable parameter.
@pytest.mark.parametrize("mode", ["tokens", "separate", "hybrid", "caption"])
@pytest.mark.parametrize(
    "draws",
    [
        {"drop_all": 1.0},  # every stream (and, in hybrid and caption, the caption) dropped
        {"drop_anatomy": 1.0},
        {"drop_style": 1.0},
        {"condition_source": 1.0},  # conditioned on the images' own priors: no caption in hybrid
        {"drop_all": 0.0, "drop_anatomy": 0.0, "drop_style": 0.0, "condition_source": 0.0},  # nothing dropped
    ],
    ids=["all-dropped", "anatomy-dropped", "style-dropped", "from-priors", "nothing-dropped"],
)
def test_every_trainable_parameter_takes_part_in_every_step(mode: str, draws: dict) -> None:
    conditioning = {"drop_all": 0.0, "drop_anatomy": 0.0, "drop_style": 0.0, "condition_source": 0.0, **draws}
    gen = build_generator(
        build_generator_config("tiny", {"hffm": {"mode": mode}, "conditioning": conditioning})
    )
    gen.train()
    size, width = gen.cfg.backbone.sample_size, gen.cfg.hffm.text_width
    g = torch.Generator().manual_seed(0)
    terms = gen.training_loss(
        torch.rand(N, 3, size, size) * 2 - 1,
        torch.randn(N, A),
        torch.randn(N, S),
        torch.randn(N, A),
        torch.randn(N, S),
        text_tokens=torch.randn(N, 5, width),
        text_mask=torch.ones(N, 5, dtype=torch.long),
        generator=g,
    )
    gen.reduce_loss(terms).backward()
    trainable = [n for n, p in gen.named_parameters() if p.requires_grad]
    assert len(trainable) > 50
    assert [n for n, p in gen.named_parameters() if p.requires_grad and p.grad is None] == []
