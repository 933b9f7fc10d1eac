"""The LoRA contract (exact targets, only adapters train, merge == unmerged) and adapter I/O."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vgmedgen.model.configbase import ConfigError
from vgmedgen.model.generator import PixArtBackbone, build_generator, build_generator_config
from vgmedgen.model.lora import REFERENCE_LORA_TARGETS, LoraSettings, apply_lora, lora_module_names

COND = {"resolution": None, "aspect_ratio": None}

# What the reference target list must hit in a 2-block PixArt, written out by hand.
PER_BLOCK = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
]
GLOBAL = [
    "pos_embed.proj",  # patch embedding
    "proj_out",
    "adaln_single.linear",  # adaLN-single
    "adaln_single.emb.timestep_embedder.linear_1",
    "adaln_single.emb.timestep_embedder.linear_2",
    "caption_projection.linear_1",
    "caption_projection.linear_2",
]
EXPECTED = sorted(GLOBAL + [f"transformer_blocks.{i}.{m}" for i in range(2) for m in PER_BLOCK])


def _backbone(seed: int = 0) -> PixArtBackbone:
    cfg = build_generator_config("tiny")
    torch.manual_seed(seed)
    return PixArtBackbone(**cfg.backbone.diffusers_kwargs())


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 3, 32, generator=g)


def _randomise_lora(model: torch.nn.Module, seed: int = 2) -> None:
    """peft starts B at zero (a no-op adapter); give every adapter weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _run(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, encoder_hidden_states=enc, timestep=t, added_cond_kwargs=COND, return_dict=False)[0]


def test_exactly_the_named_modules_get_adapters() -> None:
    backbone = _backbone()
    names = apply_lora(backbone, LoraSettings())
    assert names == EXPECTED
    assert lora_module_names(backbone) == EXPECTED
    assert "proj_in" not in REFERENCE_LORA_TARGETS  # PixArt has none; it would match nothing


def test_a_narrower_target_list_adapts_only_those() -> None:
    backbone = _backbone()
    names = apply_lora(backbone, LoraSettings(target_modules=("to_q", "to_v")))
    assert names == sorted(
        f"transformer_blocks.{i}.attn{a}.to_{p}" for i in range(2) for a in (1, 2) for p in "qv"
    )


def test_only_adapters_require_grad_and_start_as_no_op() -> None:
    backbone = _backbone()
    x, t, enc = _inputs()
    before = _run(backbone, x, t, enc)
    apply_lora(backbone, LoraSettings(r=4, alpha=8))
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(EXPECTED)
    # B = 0 at init: the adapted model computes exactly what the base did.
    torch.testing.assert_close(_run(backbone, x, t, enc), before, rtol=0, atol=0)
    a = backbone.transformer_blocks[0].attn1.to_q.lora_A["default"].weight
    assert a.shape == (4, 16) and a.abs().sum() > 0


def test_merged_output_equals_unmerged() -> None:
    backbone = _backbone()
    x, t, enc = _inputs()
    base = _run(backbone, x, t, enc)
    apply_lora(backbone, LoraSettings())
    _randomise_lora(backbone)
    unmerged = _run(backbone, x, t, enc)
    assert (unmerged - base).abs().max() > 1e-3  # the adapter does something
    backbone.fuse_lora()
    merged = _run(backbone, x, t, enc)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_unknown_target_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"\['to_qq'\] match no module"):
        apply_lora(_backbone(), LoraSettings(target_modules=("to_q", "to_qq")))
    with pytest.raises(ValueError, match="at least one target"):
        LoraSettings(target_modules=())


def test_save_and_load_lora_adapter_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "pixart"
    _backbone(seed=0).save_pretrained(src / "transformer")
    cfg = build_generator_config("tiny", {"init": "pretrained", "pretrained_dir": str(src), "train": "lora"})
    gen = build_generator(cfg)
    _randomise_lora(gen.backbone, seed=5)
    gen.save_lora_adapter(tmp_path / "adapter")

    # The file holds stock diffusers names, loadable by diffusers' own API into a fresh backbone.
    saved = load_file(tmp_path / "adapter" / "pytorch_lora_weights.safetensors")
    assert "transformer_blocks.0.attn1.to_q.lora_A.weight" in saved
    assert "pos_embed.proj.lora_B.weight" in saved
    assert len(saved) == 2 * len(EXPECTED)

    fresh = PixArtBackbone.from_pretrained(src, subfolder="transformer")
    fresh.load_lora_adapter(
        tmp_path / "adapter",
        prefix=None,
        adapter_name="default",
        weight_name="pytorch_lora_weights.safetensors",
    )
    ours = {n: p for n, p in gen.backbone.named_parameters() if ".lora_" in n}
    theirs = {n: p for n, p in fresh.named_parameters() if ".lora_" in n}
    assert ours.keys() == theirs.keys()
    for n in ours:
        torch.testing.assert_close(theirs[n], ours[n], rtol=0, atol=0)
    x, t, enc = _inputs()
    torch.testing.assert_close(_run(fresh, x, t, enc), _run(gen.backbone, x, t, enc), rtol=0, atol=0)

    # And back into a Generator (replacing its fresh adapter), with the same outputs.
    other = build_generator(cfg)
    other.hffm.load_state_dict(gen.hffm.state_dict())
    other.load_lora_adapter(tmp_path / "adapter")
    assert other.lora_modules == EXPECTED
    assert all(p.requires_grad == (".lora_" in n) for n, p in other.backbone.named_parameters())
    g = torch.Generator().manual_seed(0)
    t_a, t_s = torch.randn(2, 36, generator=g), torch.randn(2, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(other(x, t, t_a, t_s), gen(x, t, t_a, t_s), rtol=0, atol=0)
