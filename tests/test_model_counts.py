"""The paper preset's size, counted on the meta device (no weights): about 0.833 B parameters in `tokens` mode."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from vgmedgen.model.generator import build_generator
from vgmedgen.model.text import TextHeads
from vgmedgen.model.vgmedgen import ModelConfig
from vgmedgen.model.visual import VisualDisentangler


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_pixart_512_tokens_mode_totals_near_the_papers_0833b(capsys: pytest.CaptureFixture[str]):
    cfg = ModelConfig.model_validate(
        {
            "preset": "pixart-512",
            "generator": {
                "pretrained_dir": "/models/PixArt-XL-2-512x512",
                "vae_dir": "/models/PixArt-XL-2-512x512",
                "hffm": {"mode": "tokens"},
            },
        }
    )
    with torch.device("meta"):
        gen = build_generator(cfg.generator, load_weights=False)
        # Bio_ClinicalBERT: bert-base-cased geometry (vocab 28,996, width 768, 12 layers)
        bert = BertModel(
            BertConfig(vocab_size=28996, hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
        )
        heads = TextHeads(768, cfg.text)
        visual = VisualDisentangler(cfg.visual)
    counts = gen.parameter_counts()
    parts = {
        "transformer": counts["backbone"],
        "vae": counts["vae"],
        "bert": _count(bert),
        "text heads": _count(heads),
        "visual": _count(visual),
        "hffm": counts["hffm"],
        "lora": counts["lora"],
    }
    total = sum(v for k, v in parts.items() if k != "lora")
    with capsys.disabled():
        print(
            "\npixart-512 (tokens mode): "
            + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in parts.items())
            + f"; total without LoRA {total / 1e9:.3f} B"
        )
    assert 0.60e9 < parts["transformer"] < 0.62e9
    assert 0.10e9 < parts["bert"] < 0.115e9
    assert abs(total - 0.833e9) / 0.833e9 < 0.05
    assert 6.8e6 < parts["lora"] < 7.0e6
