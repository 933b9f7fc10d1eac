"""GPU smoke test: a randomly initialised pixart-512-sized generator, one LoRA step, one short sample.

The ``gpu`` test runs only where CUDA is present: bf16 with gradient checkpointing, one LoRA
optimiser step at 512 px (after one warm-up step) and one 4-step guided sample, printing s/step
and peak memory. The same routine also runs on CPU with a tiny latent-space config (float32,
gradient checkpointing on, the random SD-architecture VAE), so that the code path is checked on
every machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from vgmedgen.model.generator import GeneratorConfig, PixArtBackbone, build_generator, build_generator_config
from vgmedgen.model.sampler import SamplerConfig, sample


def _smoke(
    cfg: GeneratorConfig, device: torch.device, batch: int, image_size: int, *, load_weights: bool
) -> dict[str, float]:
    """One warm-up step, one timed LoRA step and one 4-step sample; returns timings and memory."""
    with torch.device(device):
        torch.manual_seed(0)
        gen = build_generator(cfg, load_weights=load_weights)  # weights created on the device directly
    gen = gen.to(device).train()  # and any tensor a library made on CPU follows
    assert gen.image_size == image_size
    trainable = [p for _, p in gen.named_trainable_parameters()]
    assert all(p.dtype == torch.float32 for p in trainable)  # trained weights stay fp32
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-2)
    rng = torch.Generator(device=device).manual_seed(0)
    a, s = cfg.hffm.anatomy_dim, cfg.hffm.style_dim
    images = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
    t_a, t_s = torch.randn(batch, a, device=device), torch.randn(batch, s, device=device)
    lora_b = next(p for n, p in gen.backbone.named_parameters() if ".lora_B." in n)
    assert float(lora_b.detach().abs().sum()) == 0.0  # peft's zero init

    def step(i: int) -> float:
        terms = gen.training_loss(images, t_a, t_s, t_a, t_s, generator=rng, step=i)
        loss = gen.reduce_loss(terms)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return float(loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step(0)  # warm-up (kernel selection, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    loss = step(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    s_per_step = time.perf_counter() - t0
    assert torch.isfinite(torch.tensor(loss))
    assert float(lora_b.detach().abs().sum()) > 0  # the adapter trained

    t0 = time.perf_counter()
    out = sample(gen, t_a[:2], t_s[:2], [0, 1], cfg=SamplerConfig(num_steps=4))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sample_s = time.perf_counter() - t0
    assert out.shape == (2, 3, image_size, image_size)
    assert torch.isfinite(out).all() and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"loss": loss, "s_per_step": s_per_step, "sample_4_steps_s": sample_s, "peak_gib": peak_gib}


def test_smoke_routine_on_cpu_tiny_latent_with_checkpointing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backbone = {"in_channels": 4, "sample_size": 8, "learned_sigma": True}
    cfg = build_generator_config(
        "tiny",
        {
            "backbone": backbone,
            "init": "pretrained",
            "train": "lora",
            "pretrained_dir": str(tmp_path),
            "vae_dir": str(tmp_path),
            "gradient_checkpointing": True,
            "colour": {"t_max": 999, "latent_crop": 4, "decode_max_images": 1},
        },
    )
    # A tiny pipeline directory: random PixArt transformer and a 2x VAE (the SD VAE is slow on CPU).
    PixArtBackbone(**cfg.backbone.diffusers_kwargs()).save_pretrained(tmp_path / "transformer")
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    ).save_pretrained(tmp_path / "vae")
    stats = _smoke(cfg, torch.device("cpu"), batch=2, image_size=16, load_weights=True)
    with capsys.disabled():
        print(f"\ncpu smoke (tiny latent, checkpointed): {stats}")
    assert stats["s_per_step"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pixart_512_lora_step_and_sample_on_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = build_generator_config("pixart-512", {"pretrained_dir": "/unused", "vae_dir": "/unused"})
    assert cfg.dtype == "bfloat16" and cfg.gradient_checkpointing and cfg.train == "lora"
    stats = _smoke(cfg, torch.device("cuda"), batch=4, image_size=512, load_weights=False)
    with capsys.disabled():
        print(
            f"\npixart-512 (random init, bf16, checkpointed, LoRA r=8, batch 4, 512 px): "
            f"{stats['s_per_step']:.3f} s/step, 4-step sample of 2 images {stats['sample_4_steps_s']:.2f} s, "
            f"peak {stats['peak_gib']:.1f} GiB, loss {stats['loss']:.4f}"
        )
    assert stats["peak_gib"] < 70
