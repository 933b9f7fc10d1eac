"""Training throughput of the `demo` preset's dit stage: Ray Train (1 worker) vs the same loop in-process, or
(--compare step) the dit step's layouts on two workers against the step as it was (LAYOUTS).

    python benchmarks/train_throughput.py [--steps 30 --batch 32 --threads N --repeats 5]
    python benchmarks/train_throughput.py --compare step --steps 40 --records 320 --repeats 3

--compare step, measured 2026-12-07 on a 2-core box: the pixel demo model 0.489 -> 0.424 s/step (median of 3 rounds,
0.89 paired; FLOP/s share 25.6 -> 29.6 %), the latent demo model 0.531 -> 0.482 (0.91, 2 rounds); one worker with
both threads is no faster (0.503 and 0.524). --records 320 keeps the demo's ratio of train rows to steps, so the
cache's one-off cost weighs as in `make demo`.

Both runs use the same thread count (Ray sets a worker's threads from its CPUs, so the worker gets
--threads CPUs and the in-process run torch.set_num_threads(--threads)). Samples/s is measured inside
the loop (excluding start-up). The two runs alternate --repeats times (in-process, Ray, Ray, in-process,
...) and the ratio of each adjacent pair is printed, with their mean +- standard error and median: on a
small shared box the step time jumps between two regimes (about 0.58 and 0.80 s at 1 thread, for 5-20 s
at a time, in either run and in a bare matmul loop alike), more than the effect being measured, so one
pair proves little. Prints the mean ratio Ray/in-process (target >= 0.95), peak RSS of each, and the
achieved FLOP/s of a training step against a large fp32 matmul measured in this process.

--threads defaults to the machine's cores minus one: a Ray node's own processes (raylet, GCS, the Train
controller, its preemption watcher, placement-group cleaner and synchronisation actors) take 10-15 % of
a core between them, and when the torch threads hold every core the OpenMP team stalls whenever one of
them is preempted. Measured on a 2-core box, 1 thread each: the default run (5 pairs, 30 steps)
1.075 / 1.253 / 1.025 / 0.919 / 0.997, mean 1.054 +- 0.056, median 1.025; all 19 pairs over two days
(30-40 steps) 0.851-1.253, mean 0.999 +- 0.022, median 0.997; the fastest step of each run (what Ray
adds to an undisturbed step) 0.97-1.04 of the in-process one. 2 threads each: 0.861 median of 3 pairs
(0.737 / 0.861 / 1.126, 60 steps), single runs 0.815-0.881.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def matmul_flops(threads: int, n: int = 2048, reps: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def step_flops(cfg, batch: int) -> float:
    """FLOPs of one dit forward+backward at this batch size (torch's FLOP counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vgmedgen.model.generator import build_generator

    gen = build_generator(cfg.model.generator, load_weights=False)  # random weights count the same FLOPs
    size = cfg.model.image_size
    a_dim, s_dim = cfg.model.text.anatomy_dim, cfg.model.text.style_dim
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        terms = gen.training_loss(images, torch.randn(batch, a_dim), torch.randn(batch, s_dim), generator=g)
        gen.reduce_loss(terms).backward()
    return float(counter.get_total_flops())


# The dit step as `make demo` ran it before the step work of the demo issue, and the layouts since: the global
# batch over two Ray Train workers of one thread each, or one worker with both threads.
LAYOUTS = {
    "before": [
        "train.scaling.num_workers=2",
        "train.find_unused_parameters=true",
        "train.cache_conditions=false",
    ],
    "after": ["train.scaling.num_workers=2"],
    "one-worker": ["train.scaling.num_workers=1", "train.scaling.cpus_per_worker=2"],
}


def layout_report(
    seconds: dict[str, list[float]],
    flops: float,
    matmul: float,
    *,
    cores: int,
    batch: int,
    steps: int,
    records: int,
) -> str:
    """The ``--compare step`` table: each layout's median step time, its ratio to ``before``, the rounds, and the
    FLOP/s its step reaches as a share of ``cores`` x a large one-thread matmul's (``flops``: one step's FLOPs)."""
    rounds = len(seconds["before"])
    lines = [
        f"demo dit stage, global batch {batch}, {steps} steps per run (conditions cached inside the timed loop: "
        f"{records} records), {rounds} rounds",
        f"{'layout':<12} {'median s/step':>14} {'ratio':>7} {'per round':>30} {'FLOP/s share':>13}",
    ]
    ref = statistics.median(seconds["before"])
    for name, values in seconds.items():
        med = statistics.median(values)
        share = flops / med / (cores * matmul)
        per_round = " ".join(f"{x:.3f}" for x in values)
        lines.append(f"{name:<12} {med:>14.3f} {med / ref:>7.3f} {per_round:>30} {share:>13.1%}")
    paired = [a / b for a, b in zip(seconds["after"], seconds["before"])]
    lines.append(
        f"after/before per round: {', '.join(f'{x:.3f}' for x in paired)}; median "
        f"{statistics.median(paired):.3f} (target <= 0.75)"
    )
    return "\n".join(lines)


def compare_layouts(args: argparse.Namespace, base_overrides: list[str], inputs: dict, flops: float) -> None:
    """``--compare step``: the dit step time of each layout (Ray Train, the demo's settings), in alternating
    rounds, as ratios to ``before``."""
    import torch

    from vgmedgen.platform.config import load_experiment
    from vgmedgen.platform.training.runner import run_stage

    names = list(LAYOUTS)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    k = 0
    for r in range(max(args.repeats, 1)):
        for name in names if r % 2 == 0 else names[::-1]:
            k += 1
            cfg = load_experiment(
                REPO / "configs/demo.yaml",
                [*base_overrides, "train.scaling.cpus_per_worker=1", *LAYOUTS[name], f"seed={k}"],
            )
            res = run_stage(cfg, "dit", inputs)
            seconds[name].append(args.batch / res.metrics["dit/samples_per_s"])
            print(f"  round {r + 1} {name}: {seconds[name][-1]:.3f} s/step", flush=True)
    print(
        layout_report(
            seconds, flops, matmul_flops(1), cores=2, batch=args.batch, steps=args.steps, records=args.records
        )
    )
    torch.set_num_threads(1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="torch threads of each run"
    )
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="pairs of runs (alternating order)")
    parser.add_argument(
        "--compare",
        choices=("ray", "step"),
        default="ray",
        help="ray: Ray Train (1 worker) vs in-process; step: the dit step's layouts (LAYOUTS) on 2 workers",
    )
    args = parser.parse_args()

    import ray
    import torch

    from vgmedgen.platform.config import load_experiment
    from vgmedgen.platform.prepare import prepare_records
    from vgmedgen.platform.training.driver import ensure_text_encoder
    from vgmedgen.platform.training.runner import run_stage

    root = Path(tempfile.mkdtemp(prefix="vgmedgen-bench-"))
    common = [
        f"output_root={root}",
        f"data.synthderm.num_records={args.records}",
        "tracking.enabled=false",
        "train.visual.steps=2",
        "train.align.steps=2",
        "train.visual.batch_size=8",
        "train.align.batch_size=8",
        "train.autoencoder.steps=2",
        "train.autoencoder.batch_size=8",
        f"train.dit.steps={args.steps}",
        f"train.dit.batch_size={args.batch}",
        f"train.dit.checkpoint_every={args.steps}",
        f"train.dit.val_every={args.steps}",
        f"train.dit.log_every={args.steps}",
        "train.dit.sample_every=0",
        f"train.scaling.cpus_per_worker={args.threads}",
    ]
    ray.init(num_cpus=max(args.threads, 2), include_dashboard=False, log_to_driver=False)
    base = load_experiment(REPO / "configs/demo.yaml", [*common, "train.scaling.num_workers=0"])
    prepare_records(base)
    torch.set_num_threads(args.threads)
    parts = {"text_encoder": ensure_text_encoder(base)}
    parts["visual"] = run_stage(base, "visual", {}).export_dir
    parts["text"] = run_stage(
        base, "align", {"visual": parts["visual"], "text_encoder": parts["text_encoder"]}
    ).export_dir
    inputs = {"visual": parts["visual"], "text": parts["text"]}
    if base.model.generator.autoencoder is not None:  # the latent demo: the dit stage diffuses its latents
        inputs["autoencoder"] = run_stage(base, "autoencoder", {}).export_dir
    if args.compare == "step":
        compare_layouts(args, common, inputs, step_flops(base, args.batch))
        ray.shutdown()
        return

    order = []
    for r in range(max(args.repeats, 1)):
        pair = [("in-process", 0), ("ray-1-worker", 1)]
        order += pair if r % 2 == 0 else pair[::-1]
    runs: list[tuple[str, float, float, float]] = []  # (name, samples/s, peak RSS MB, wall s)
    for k, (name, workers) in enumerate(order):
        cfg = load_experiment(
            REPO / "configs/demo.yaml",
            [*common, f"train.scaling.num_workers={workers}", f"seed={k + 1}"],  # a new run name each time
        )
        t0 = time.perf_counter()
        res = run_stage(cfg, "dit", inputs)
        runs.append(
            (name, res.metrics["dit/samples_per_s"], res.metrics["dit/peak_rss_mb"], time.perf_counter() - t0)
        )
        print(f"  run {k + 1}/{len(order)} {name}: {runs[-1][1]:.1f} samples/s", flush=True)
    flops = step_flops(base, args.batch)
    mm = matmul_flops(args.threads)
    ratios = []
    for i in range(0, len(runs), 2):
        by_name = {runs[i][0]: runs[i][1], runs[i + 1][0]: runs[i + 1][1]}
        ratios.append(by_name["ray-1-worker"] / by_name["in-process"])
    local = [r for r in runs if r[0] == "in-process"]
    sps_local = statistics.median(r[1] for r in local)
    print(f"\ndemo dit stage, batch {args.batch}, {args.steps} steps, {args.threads} threads each")
    print(f"{'run':<14} {'samples/s':>10} {'peak RSS MB':>12} {'wall s':>8}")
    for name, sps, rss, wall in runs:
        print(f"{name:<14} {sps:>10.1f} {rss:>12.0f} {wall:>8.1f}")
    print(f"ratio ray/in-process per pair: {', '.join(f'{r:.3f}' for r in ratios)}")
    mean = statistics.fmean(ratios)
    se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
    print(
        f"ratio ray/in-process: mean {mean:.3f} +- {se:.3f} (standard error of {len(ratios)} pairs), "
        f"median {statistics.median(ratios):.3f}; target >= 0.95: {'met' if mean >= 0.95 else 'NOT met'}"
    )
    achieved = flops / args.batch * sps_local
    print(
        f"training FLOP/s (in-process): {achieved / 1e9:.2f} GFLOP/s; large fp32 matmul: {mm / 1e9:.1f} GFLOP/s "
        f"({achieved / mm:.1%} of it)"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
