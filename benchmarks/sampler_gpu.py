"""Bare-sampler throughput on CUDA: the ``pixart-512`` generator (random weights, bf16) at 512 px, 20 steps.

What is timed: ``vgmedgen.model.sampler.sample`` on a batch of random anatomy/style vectors, i.e. the
initial noise, 20 DPM-Solver++ steps with our compositional guidance (each step runs the transformer on
the three conditionings (0, 0), (a, 0), (a, s): one batched call of 3N rows) and the VAE decode of the
latents. Not timed: the text encoder (random t_a/t_s are the input), the stage-1 pseudo-masks, PNG
encoding, moving images off the GPU. The model is the paper's architecture built without its weights
(``build_generator(load_weights=False)``): PixArt-XL-2 (28 blocks, width 1152, patch 2 on 64x64 latents)
with the LoRA adapters and HFFM, frozen weights stored in bf16 and the forward under bf16 autocast, and
an SD-architecture VAE; the compute does not depend on the weights' values.

The transformer's passes are counted, not assumed: a forward pre-hook and hook on the generator's
backbone count its calls and the rows (images) each call takes, and time the calls (CUDA events).
``passes/image/step`` is rows / (images x steps): 3 for our guidance (2 for PixArt's classifier-free
guidance, 1 with g_a = g_s = 1). It prints, per batch size, images/s, transformer calls/s and image
passes/s (rows/s), the transformer's share of the sampling time and the peak GPU memory, beside the
1.5 images/s at 512 px on an A100 published for PixArt-alpha (taken here as 20 steps with two passes per
step: 60 image passes/s; at equal passes/s our sampler makes 2/3 of PixArt's images/s). On another GPU
compare the passes/s, not the images/s alone.

Usage (a GPU machine; not yet run on one: the CPU check below is what ran when it was written):
    .venv/bin/python benchmarks/sampler_gpu.py
    .venv/bin/python benchmarks/sampler_gpu.py --batch 1 8 32 --repeats 5
Without CUDA it exits with a message. The code path runs on a CPU with a small preset:
    .venv/bin/python benchmarks/sampler_gpu.py --device cpu --preset tiny --steps 2 --batch 2 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from vgmedgen.model.generator import GENERATOR_PRESETS, PIXEL_CHANNELS, Generator, build_generator
from vgmedgen.model.sampler import SamplerConfig, sample
from vgmedgen.model.vgmedgen import PRESET_NAMES, ModelConfig

PIXART_A100_IMAGES_PER_S = 1.5  # PixArt-alpha's published rate at 512 px on one A100
PIXART_STEPS = 20
PIXART_PASSES_PER_STEP = 2  # classifier-free guidance: conditional and unconditional
PLACEHOLDER_DIR = "/nonexistent/pixart-weights"  # the preset requires weight directories; never read here


class PassCounter:
    """Counts and times the forward calls of a module (its rows: the first argument's batch size)."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.calls = 0
        self.rows = 0
        self._open: Any = None
        self._spans: list[Any] = []
        self._handles = [
            module.register_forward_pre_hook(self._before),
            module.register_forward_hook(self._after),
        ]

    def _before(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.calls += 1
        self.rows += int(args[0].shape[0])
        if self.cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()
        else:
            self._open = time.perf_counter()

    def _after(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._spans.append((self._open, end))
        else:
            self._spans.append((self._open, time.perf_counter()))

    def reset(self) -> None:
        self.calls, self.rows, self._spans = 0, 0, []

    def seconds(self) -> float:
        """Time inside the module's calls (synchronise first on CUDA)."""
        if self.cuda:
            return sum(a.elapsed_time(b) for a, b in self._spans) / 1000.0
        return sum(b - a for a, b in self._spans)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def build(preset: str, dtype: str | None, device: torch.device) -> Generator:
    """The preset's generator with random weights (weight directories the preset requires are placeholders
    that ``load_weights=False`` never reads)."""
    base = GENERATOR_PRESETS[preset]
    overrides: dict[str, Any] = {}
    if base.get("init") == "pretrained":
        overrides["pretrained_dir"] = PLACEHOLDER_DIR
    if base["backbone"]["in_channels"] != PIXEL_CHANNELS:
        overrides["vae_dir"] = PLACEHOLDER_DIR  # latent diffusion: a random VAE of the SD architecture
    if dtype is not None:
        overrides["dtype"] = dtype
    cfg = ModelConfig.model_validate({"preset": preset, "generator": overrides})  # derives the HFFM widths
    torch.manual_seed(0)
    return build_generator(cfg.generator, load_weights=False).to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", default="cuda", help="cuda (the benchmark) or cpu (a check of the code path)"
    )
    parser.add_argument("--preset", default="pixart-512", choices=PRESET_NAMES)
    parser.add_argument(
        "--dtype", default=None, choices=["bfloat16", "float32"], help="default: the preset's"
    )
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16], help="images per sampler call")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls per batch size (after one warm-up)"
    )
    parser.add_argument("--guidance", type=float, default=4.5, help="g_a = g_s (1: one pass per step)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "sampler_gpu.py: CUDA is not available on this machine (torch "
            f"{torch.__version__}, torch.cuda.is_available() is False); run it on a GPU machine, or check "
            "the code path on the CPU with: --device cpu --preset tiny --steps 2"
        )
    if device.type == "cpu" and (args.dtype or "") == "bfloat16":
        sys.exit("sampler_gpu.py: bf16 runs only on CUDA here; use --dtype float32 on the CPU")

    t0 = time.perf_counter()
    dtype = args.dtype if args.dtype or device.type == "cuda" else "float32"
    generator = build(args.preset, dtype, device)
    sync(device)
    build_s = time.perf_counter() - t0
    counts = generator.parameter_counts()
    hffm = generator.cfg.hffm
    size = generator.image_size
    sampler = SamplerConfig(
        num_steps=args.steps, guidance_anatomy=args.guidance, guidance_style=args.guidance
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{name}, torch {torch.__version__}: preset {args.preset} (parameters: "
        + ", ".join(f"{counts[k] / 1e6:.3g} M {k}" for k in ("backbone", "lora", "hffm", "vae"))
        + "), "
        f"{generator.cfg.dtype}, {size} px, {args.steps} steps, g_a = g_s = {args.guidance:g}; built in {build_s:.1f} s"
    )
    print(
        f"{'batch':>5} {'s/call':>8} {'images/s':>9} {'tf calls/s':>11} {'passes/s':>9} "
        f"{'passes/img/step':>16} {'tf share':>9} {'peak GiB':>9}"
    )
    counter = PassCounter(generator.backbone, device)
    rows: list[tuple[float, float, float]] = []  # (images/s, image passes/s, passes per image per step)
    for batch in args.batch:
        gen = torch.Generator().manual_seed(batch)
        t_a = torch.randn(batch, hffm.anatomy_dim, generator=gen).to(device)
        t_s = torch.randn(batch, hffm.style_dim, generator=gen).to(device)
        seeds = list(range(batch))
        sample(generator, t_a, t_s, seeds, cfg=sampler)  # warm-up: kernels, autotuning, allocator
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        counter.reset()
        start = time.perf_counter()
        for _ in range(args.repeats):
            images = sample(generator, t_a, t_s, seeds, cfg=sampler)  # (B, 3, H, W)
        sync(device)
        seconds = time.perf_counter() - start
        made = batch * args.repeats
        per_step = counter.rows / (made * args.steps)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append((made / seconds, counter.rows / seconds, per_step))
        print(
            f"{batch:>5} {seconds / args.repeats:>8.3f} {made / seconds:>9.2f} {counter.calls / seconds:>11.1f} "
            f"{counter.rows / seconds:>9.1f} {per_step:>16.2f} {counter.seconds() / seconds:>9.0%} {peak:>9.1f}",
            flush=True,
        )
        if not torch.isfinite(images).all():
            print(
                f"      note: batch {batch} gave non-finite pixels (random weights in {generator.cfg.dtype})"
            )
    counter.remove()

    pixart_passes = PIXART_A100_IMAGES_PER_S * PIXART_STEPS * PIXART_PASSES_PER_STEP
    images_s, passes_s, per_step = max(rows)
    print(
        f"PixArt-alpha, published: {PIXART_A100_IMAGES_PER_S} images/s at 512 px on an A100, i.e. "
        f"{pixart_passes:.0f} image passes/s at {PIXART_STEPS} steps x {PIXART_PASSES_PER_STEP} passes "
        "(classifier-free guidance)."
    )
    print(
        f"Here, best batch: {images_s:.2f} images/s ({images_s / PIXART_A100_IMAGES_PER_S:.2f} x PixArt's), "
        f"{passes_s:.1f} image passes/s ({passes_s / pixart_passes:.2f} x PixArt's); at PixArt's passes/s, "
        f"{args.steps} steps of {per_step:.0f} passes would give {pixart_passes / (args.steps * per_step):.2f} images/s."
    )


if __name__ == "__main__":
    main()
