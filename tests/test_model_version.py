"""Model versions on disk: bit-exact round trips (full and LoRA), tampering, missing parts, wrong shapes, ModelConfig.

Also the helpers other tests import to get a small model with non-trivial weights::

    from test_model_version import CAPTIONS, make_text_encoder, make_trained_model
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vgmedgen.model.ema import EMA  # noqa: E402
from vgmedgen.model.generator import PixArtBackbone, build_generator  # noqa: E402
from vgmedgen.model.lora import LORA_ADAPTER_NAME, LORA_WEIGHT_NAME  # noqa: E402
from vgmedgen.model.sampler import SamplerConfig  # noqa: E402
from vgmedgen.model.text import build_text_encoder, vocabulary_from_texts  # noqa: E402
from vgmedgen.model.vgmedgen import (  # noqa: E402
    ModelConfig,
    ModelVersionError,
    VGMedGen,
    assemble_model_version,
    build_model,
    save_generator,
    save_visual,
    write_manifest,
)
from vgmedgen.model.visual import VisualDisentangler  # noqa: E402

CAPTIONS = [
    "A large irregular dark-brown lesion in the upper left, on light skin with hair.",
    "Small round pink lesion, centred; vignetted illumination, polarised device.",
]
ANATOMY = ["large irregular lesion, upper left", "small round lesion, centred"]
STYLE = ["dark-brown, light skin, hair", "pink, vignetted illumination"]
SAMPLER = SamplerConfig(num_steps=2)
SEEDS = [11, 12]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: two OpenMP threads on the shared 2-core box spin-wait badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- helpers (imported by test_pipeline.py and test_sample_job.py) -------------------------------


def make_text_encoder(directory: Path) -> Path:
    """A tiny random BERT whose vocabulary covers the test prompts."""
    words = vocabulary_from_texts(CAPTIONS + ANATOMY + STYLE)
    return build_text_encoder(words, directory, hidden=32, layers=2, heads=2, seed=0)


@torch.no_grad()
def _perturb(
    tensors: Mapping[str, torch.Tensor] | list[torch.Tensor], gen: torch.Generator, scale: float
) -> None:
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    for t in values:
        if t.is_floating_point():
            t.add_(torch.randn(t.shape, generator=gen) * scale)


def make_trained_model(
    encoder_dir: Path, overrides: Mapping[str, Any] | None = None, seed: int = 0, ema_warmup: bool = False
) -> VGMedGen:
    """A tiny model whose every saved tensor is non-trivial, with an EMA that differs from the weights.

    Visual and text parts (encoder included) get noise on their whole state (BatchNorm statistics
    too); the generator gets noise on what it trains (in LoRA mode the frozen base comes from the
    pretrained directory and is not part of the version), then EMA updates between more noise.
    """
    config = ModelConfig.model_validate({"preset": "tiny", **(overrides or {})})
    model = build_model(config, encoder_dir)
    gen = torch.Generator().manual_seed(seed)
    _perturb(model.visual.state_dict(), gen, 0.05)
    _perturb(model.text.state_dict(), gen, 0.05)
    trained = [p for _, p in model.generator.named_trainable_parameters()]
    _perturb(trained, gen, 0.05)  # LoRA B starts at zero: this makes the adapter do something
    model.ema = EMA(model.generator, 0.9, warmup=ema_warmup)
    for _ in range(2):
        _perturb(trained, gen, 0.05)
        model.ema.update(model.generator)
    _perturb(trained, gen, 0.05)
    return model.eval()


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb), f"{what}: different tensor names"
    differing = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert differing == [], f"{what}: tensors differ after the round trip: {differing[:5]}"


def assert_same_model(a: VGMedGen, b: VGMedGen) -> None:
    """Every state tensor of every part, and the EMA, identical."""
    _assert_same_state(a.visual, b.visual, "visual")
    _assert_same_state(a.text, b.text, "text")
    _assert_same_state(a.generator, b.generator, "generator")
    assert a.config == b.config
    assert (a.ema is None) == (b.ema is None)
    if a.ema is not None and b.ema is not None:
        ea, eb = a.ema.state_dict(), b.ema.state_dict()
        assert (ea["decay"], ea["warmup"], ea["num_updates"]) == (
            eb["decay"],
            eb["warmup"],
            eb["num_updates"],
        )
        assert sorted(ea["shadow"]) == sorted(eb["shadow"])
        assert all(torch.equal(ea["shadow"][k], eb["shadow"][k]) for k in ea["shadow"])


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_encoder(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def full_model(encoder_dir: Path) -> VGMedGen:
    return make_trained_model(encoder_dir)


@pytest.fixture(scope="module")
def full_version(full_model: VGMedGen, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("versions") / "full"
    full_model.save_pretrained(directory)
    return directory


@pytest.fixture()
def version_copy(full_version: Path, tmp_path: Path) -> Path:
    """A private copy of the saved version, for tests that damage it."""
    return Path(shutil.copytree(full_version, tmp_path / "copy"))


# -- round trips ---------------------------------------------------------------------------------


def test_full_mode_round_trip_is_bit_exact(full_model: VGMedGen, full_version: Path) -> None:
    loaded = VGMedGen.from_pretrained(full_version)
    assert_same_model(full_model, loaded)
    assert loaded.generator.cfg.train == "full" and loaded.generator.lora_modules == []
    assert not (full_version / "generator" / "lora").exists()

    for model in (full_model, loaded):
        assert not (model.visual.training or model.text.training or model.generator.training)
    cond_a = full_model.conditions_from_prompts(ANATOMY, STYLE)
    cond_b = loaded.conditions_from_prompts(ANATOMY, STYLE)
    assert all(torch.equal(cond_a[k], cond_b[k]) for k in ("t_a", "t_s"))
    images_a, masks_a = full_model.generate(cond_a, SEEDS, SAMPLER)
    images_b, masks_b = loaded.generate(cond_b, SEEDS, SAMPLER)
    assert images_a.shape == (2, 3, 16, 16) and masks_a.shape == (2, 1, 16, 16)
    assert torch.equal(images_a, images_b) and torch.equal(masks_a, masks_b)
    assert 0.0 <= float(images_a.min()) and float(images_a.max()) <= 1.0
    assert images_a.std() > 0.0  # not a constant image: the weights do something
    # The EMA is loaded and is what generate samples from: the live weights give other images.
    live, _ = loaded.generate(cond_b, SEEDS, SAMPLER, use_ema=False)
    live_orig, _ = full_model.generate(cond_a, SEEDS, SAMPLER, use_ema=False)
    assert torch.equal(live, live_orig) and not torch.equal(live, images_b)


def test_lora_mode_round_trip_and_adapter_loads_in_diffusers(encoder_dir: Path, tmp_path: Path) -> None:
    base = ModelConfig.model_validate({"preset": "tiny"}).generator.backbone
    pretrained = tmp_path / "pixart"
    PixArtBackbone(**base.diffusers_kwargs()).save_pretrained(pretrained / "transformer")
    overrides = {"generator": {"init": "pretrained", "train": "lora", "pretrained_dir": str(pretrained)}}
    model = make_trained_model(encoder_dir, overrides, seed=1, ema_warmup=True)
    assert model.generator.lora_modules, "LoRA mode must inject adapters"
    model.save_pretrained(tmp_path / "version")
    lora_dir = tmp_path / "version" / "generator" / "lora"
    assert (lora_dir / LORA_WEIGHT_NAME).is_file()

    loaded = VGMedGen.from_pretrained(tmp_path / "version")
    assert_same_model(model, loaded)
    assert loaded.generator.lora_modules == model.generator.lora_modules
    trainable = {n for n, _ in loaded.generator.named_trainable_parameters()}
    assert trainable and all(".lora_" in n or n.startswith("hffm.") for n in trainable)
    cond = loaded.conditions_from_captions(CAPTIONS)
    a = model.generate(model.conditions_from_captions(CAPTIONS), SEEDS, SAMPLER)
    b = loaded.generate(cond, SEEDS, SAMPLER)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    # The lora/ folder is a plain diffusers adapter: it loads into a stock backbone with the stock names.
    stock = PixArtBackbone.from_pretrained(pretrained, subfolder="transformer")
    stock.load_lora_adapter(
        lora_dir, prefix=None, adapter_name=LORA_ADAPTER_NAME, weight_name=LORA_WEIGHT_NAME
    )
    theirs = {n: p for n, p in stock.named_parameters() if ".lora_" in n}
    ours = {n: p for n, p in model.generator.backbone.named_parameters() if ".lora_" in n}
    assert theirs and sorted(theirs) == sorted(ours)
    assert all(torch.equal(theirs[n], ours[n]) for n in ours)
    assert any(float(p.detach().abs().max()) > 0 for n, p in theirs.items() if ".lora_B." in n)


def test_a_version_written_before_the_model_optimiser_fields_were_retired_still_loads(
    full_model: VGMedGen, version_copy: Path
) -> None:
    # Versions registered before 2026-12 carry model.visual.lr/betas and model.text.lr/batch_size,
    # which the model config now refuses in a config file; the saved version must keep loading.
    path = version_copy / "model_config.json"
    raw = json.loads(path.read_text())
    raw["visual"].update(lr=1e-4, betas=[0.5, 0.999])
    raw["text"].update(lr=1e-4, batch_size=32)
    path.write_text(json.dumps(raw))
    write_manifest(version_copy, {"kind": "vgmedgen-model-version", "preset": raw["preset"]})
    with pytest.raises(ValidationError, match="visual.lr"):
        ModelConfig.model_validate(raw)
    assert_same_model(full_model, VGMedGen.from_pretrained(version_copy))
    path.write_text("{not json")
    write_manifest(version_copy)
    with pytest.raises(ModelVersionError, match="not a readable model config"):
        VGMedGen.from_pretrained(version_copy)


def test_saving_over_a_version_drops_files_the_new_model_does_not_write(
    full_model: VGMedGen, encoder_dir: Path, tmp_path: Path
) -> None:
    full_model.save_pretrained(tmp_path / "v")
    assert (tmp_path / "v" / "generator" / "ema.safetensors").is_file()
    no_ema = make_trained_model(encoder_dir, seed=3)
    no_ema.ema = None
    no_ema.save_pretrained(tmp_path / "v")
    loaded = VGMedGen.from_pretrained(tmp_path / "v")
    assert loaded.ema is None  # the first model's EMA must not come back
    assert_same_model(no_ema, loaded)


# -- damaged versions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "relative",
    ["visual/model.safetensors", "text/heads.safetensors", "generator/ema.safetensors", "model_config.json"],
)
def test_tampered_file_is_named(version_copy: Path, relative: str) -> None:
    path = version_copy / relative
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelVersionError, match=re.escape(str(path)) + r" does not match its hash"):
        VGMedGen.from_pretrained(version_copy)


def test_missing_part_or_directory_is_a_clear_error(version_copy: Path, tmp_path: Path) -> None:
    shutil.rmtree(version_copy / "text")
    with pytest.raises(
        ModelVersionError, match=r"text/.* is listed in .*manifest.json but missing; .*incomplete"
    ):
        VGMedGen.from_pretrained(version_copy)
    with pytest.raises(ModelVersionError, match=r"does not exist"):
        VGMedGen.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelVersionError, match=r"manifest.json is missing"):
        VGMedGen.from_pretrained(tmp_path / "empty")
    (version_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ModelVersionError, match=r"not a valid manifest"):
        VGMedGen.from_pretrained(version_copy)


_SHAPE_MESSAGE = re.compile(
    r"tensor '([^']+)' has shape \(([^)]*)\),? (?:but the model expects|expected) \(([^)]*)\)"
)


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def test_visual_weights_of_another_config_name_tensor_and_expected_shape(
    full_model: VGMedGen, version_copy: Path
) -> None:
    other = ModelConfig.model_validate({"preset": "tiny", "visual": {"segmentor_width": 24}})
    other_visual = VisualDisentangler(other.visual)
    save_visual(other_visual, version_copy / "visual")
    assemble_model_version(full_model.config, version_copy)  # re-hash, so only the shapes are wrong
    with pytest.raises(ModelVersionError) as info:
        VGMedGen.from_pretrained(version_copy)
    found = _SHAPE_MESSAGE.search(str(info.value))
    assert found, str(info.value)
    name, got, expected = found.group(1), _shape(found.group(2)), _shape(found.group(3))
    assert got == tuple(other_visual.state_dict()[name].shape)
    assert expected == tuple(full_model.visual.state_dict()[name].shape) and got != expected
    assert "model.safetensors" in str(info.value)


def test_generator_weights_of_another_config_name_tensor_and_expected_shape(
    full_model: VGMedGen, version_copy: Path
) -> None:
    other = ModelConfig.model_validate({"preset": "tiny", "generator": {"hffm": {"hidden_dim": 48}}})
    save_generator(build_generator(other.generator), None, version_copy / "generator")
    assemble_model_version(full_model.config, version_copy)
    with pytest.raises(ModelVersionError) as info:
        VGMedGen.from_pretrained(version_copy)
    found = _SHAPE_MESSAGE.search(str(info.value))
    assert found, str(info.value)
    name, got, expected = found.group(1), _shape(found.group(2)), _shape(found.group(3))
    assert name.startswith("hffm.") and got != expected
    assert expected == tuple(dict(full_model.generator.named_parameters())[name].shape)
    assert 48 in got and "trainable.safetensors" in str(info.value)


# -- ModelConfig ---------------------------------------------------------------------------------


def test_derived_widths_follow_the_visual_and_text_configs() -> None:
    cfg = ModelConfig.model_validate({"preset": "tiny", "visual": {"anatomy_channels": 4, "style_size": 6}})
    assert cfg.visual.anatomy_prior_dim == 4 * (4 + 1)  # moments: mask + 4 channels, 4 numbers each
    assert cfg.text.anatomy_dim == cfg.generator.hffm.anatomy_dim == 20
    assert cfg.text.style_dim == cfg.generator.hffm.style_dim == 6
    assert cfg.generator.hffm.text_width == cfg.text.encoder_hidden == 32
    area = ModelConfig.model_validate({"preset": "tiny", "visual": {"anatomy_channels": 5, "prior": "area"}})
    assert area.text.anatomy_dim == area.generator.hffm.anatomy_dim == 5
    coloured = ModelConfig.model_validate({"preset": "tiny", "visual": {"style_prior": "mu_colour"}})
    assert (
        coloured.text.style_dim == coloured.generator.hffm.style_dim == 8 + 4 * 3
    )  # mu, then colour moments
    assert ModelConfig.model_validate({"preset": "demo"}).generator.hffm.style_dim == 20
    wide = ModelConfig.model_validate({"preset": "tiny", "text": {"encoder_hidden": 64, "encoder_heads": 4}})
    assert wide.generator.hffm.text_width == 64
    # Giving the derived value itself is allowed.
    same = ModelConfig.model_validate({"preset": "tiny", "text": {"anatomy_dim": 36}})
    assert same.text.anatomy_dim == 36
    # A saved config loads back to itself.
    assert ModelConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"text": {"anatomy_dim": 7}},
            "text.anatomy_dim=7 contradicts the visual/text configs, which give 36",
        ),
        ({"text": {"style_dim": 3}}, "text.style_dim=3 contradicts the visual/text configs, which give 8"),
        ({"generator": {"hffm": {"anatomy_dim": 9}}}, "generator.hffm.anatomy_dim=9 contradicts"),
        (
            {"generator": {"hffm": {"text_width": 128}}},
            "generator.hffm.text_width=128 contradicts .* give 32",
        ),
    ],
)
def test_contradicting_derived_width_is_rejected(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message + r".*leave it out \(it is derived\)"):
        ModelConfig.model_validate({"preset": "tiny", **overrides})


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValidationError,
        match=r"unknown model preset 'tinny' \(did you mean 'tiny'\?\); valid presets: tiny, demo, pixart-512",
    ):
        ModelConfig.model_validate({"preset": "tinny"})
