"""Seconds per training step of the generator presets in pixel space (CPU or GPU).

One step = ``Generator.training_loss`` (noise, timesteps, condition dropout, colour loss) +
``reduce_loss`` + backward + ``AdamW.step``, at batch 32 by default, for the ``tiny`` and
``demo`` presets at 32, 48 and 64 px (the preset's ``sample_size`` is set to the size, so the
transformer sees ``(size / patch)^2`` tokens).

Run (about 2 minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/dit_step_time.py
    .venv/bin/python benchmarks/dit_step_time.py --presets demo --sizes 32 --batch 32 --steps 10

On a machine shared with other jobs, pass ``--threads 1``: two OpenMP threads competing with
other processes spin-wait and ran 10x slower here (5.2 vs 0.52 s/step for ``demo`` at 32 px).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from vgmedgen.model.generator import build_generator, build_generator_config


def step_time(preset: str, size: int, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    """Median seconds per optimiser step and the parameter count of one configuration."""
    cfg = build_generator_config(preset, {"backbone": {"sample_size": size}})
    torch.manual_seed(0)
    gen = build_generator(cfg).to(device).train()
    params = [p for _, p in gen.named_trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    rng = torch.Generator(device=device).manual_seed(0)
    a, s = cfg.hffm.anatomy_dim, cfg.hffm.style_dim
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    t_a, t_s = torch.randn(batch, a, device=device), torch.randn(batch, s, device=device)
    p_a, p_s = torch.randn(batch, a, device=device), torch.randn(batch, s, device=device)
    times, cpu_times = [], []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        terms = gen.training_loss(images, t_a, t_s, p_a, p_s, generator=rng, step=i)
        loss = gen.reduce_loss(terms)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    counts = gen.parameter_counts()
    return {
        "preset": preset,
        "size": size,
        "tokens": (size // cfg.backbone.patch_size) ** 2,
        "params_m": (counts["backbone"] + counts["hffm"]) / 1e6,
        "s_per_step": statistics.median(times),
        "cpu_s_per_step": statistics.median(cpu_times),
        "loss": float(loss.detach()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "demo"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 48, 64])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; on a machine shared with other jobs 1 thread avoids OpenMP spin contention",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} steps={args.steps}")
    # cpu s/step is process CPU time: with --threads 1 it is the compute cost even when other jobs
    # take turns on the cores (wall-clock s/step then overstates it).
    print(
        f"{'preset':<8} {'px':>4} {'tokens':>7} {'params(M)':>10} {'s/step':>8} {'cpu s/step':>11} {'img/s':>7}"
    )
    for preset in args.presets:
        for size in args.sizes:
            r = step_time(preset, size, args.batch, args.steps, args.warmup, device)
            print(
                f"{r['preset']:<8} {r['size']:>4} {r['tokens']:>7} {r['params_m']:>10.2f} "
                f"{r['s_per_step']:>8.3f} {r['cpu_s_per_step']:>11.3f} {args.batch / r['s_per_step']:>7.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
