"""Generation-job throughput and memory: the Ray Data job against one process doing the same work, in one run.

It builds everything in a temporary directory: SynthDerm records at 32 px (``configs/demo.yaml`` with
``--records`` records), a model version of the ``demo`` preset (freshly initialised, a little noise on
the generator so that its images are not flat; sampling costs what a trained one's does: 20 DPM-Solver++
steps, three guided transformer passes per step, EMA weights), and the scorer's assets (the ``tiny``
domain network, 5 training steps on Ray Train). Then, on one local Ray instance (``ray.init(num_cpus=2)``):

* (a) images/s. ``ray``: ``generate_experiment`` (plan shards -> SamplerActor pool -> ScorerActor pool
  -> ``write_parquet``), its time being the job's own ``throughput.seconds`` (from building the dataset
  to the end of the write: actor start-up and model loading included; the plan, the scorer assets, the
  statistics and the derived outputs before and after it are not). ``baseline``: the same
  ``SamplerActor`` and ``ScorerActor`` classes instantiated in this process, the plan's shards looped
  over (sampler per shard, scorer in sub-batches of ``--batch-size``), each shard's scored table written
  with ``pq.write_table``; timed from constructing the two classes to the last write. Both run at N and
  4N images with the same batch size, shard size and torch threads (1: two OpenMP threads per process
  spin-wait on 2 cores). Steady rate = 3N / (t(4N) - t(N)); start-up = t(N) - N / rate. The Ray job may
  overlap sampling and scoring on the two cores, the baseline cannot. Target: ray / baseline >= 0.9.
* (b) peak RSS at N and 4N: this process (its high-water mark reset before each run through
  ``/proc/self/clear_refs``; a polled peak where that is refused) and the actors, polled every ``--poll``
  s (psutil, this process's descendants, by process title: Ray 2.60 names an actor pool's worker
  ``ray::MapWorker(MapBatches(<class>))``). The write tasks (``ray::Write``) last a fraction of a second,
  too short to poll. Target: every 4N / N ratio within 10 % of 1 (memory flat as the plan grows).
* (writes) when each Ray run's table files were written: spread over the run when the writes stream,
  together at the end when the write tasks wait for the actor pools' CPUs. At Ray's default of 1 CPU
  per write task, ``--sampler-cpus 1`` on 2 CPUs wrote nothing until sampling and scoring ended (an
  interrupted job kept nothing, every row waited in the object store); the job now gives its write
  tasks 0.1 CPU, and this line shows whether they stream.
* (c) the wall time of one ``--images`` run of the job at the same settings: the job's pipeline seconds
  and its whole ``generate_experiment`` time (plan, scorer assets, statistics and outputs included).
  2,000 images took 522 s (3.83 images/s) on 2 shared CPU cores, hence a default of 1,000.

Not timed: making records, the model version and the domain network (once, before everything); each
Ray run's plan and scorer assets (computed once, then loaded from their cache), statistics and
outputs; building the baseline's plan. Every run writes
a fresh output directory (``generate.name``). No figure is asserted: the targets are printed beside them.
The actor CPUs default to the job's own (``ActorOptions.num_cpus`` 0.5 each).

Usage (about 9 minutes on 2 CPU cores with the defaults, half of it the 1,000-image run; it starts its
own local Ray, so run it where no other Ray instance runs):
    .venv/bin/python benchmarks/generate_throughput.py
    .venv/bin/python benchmarks/generate_throughput.py --images 2000
    .venv/bin/python benchmarks/generate_throughput.py --n 32 --images 0   # (a), (b) only
    .venv/bin/python benchmarks/generate_throughput.py --sampler-cpus 1 --images 0
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vgmedgen.platform.config import ExperimentConfig, load_experiment
from vgmedgen.platform.generation.job import TABLE_DIR, SamplerActor, ScorerActor, generate_experiment

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
ROLES = ("SamplerActor", "ScorerActor")  # in the titles of the actors' worker processes
MB = 1 << 20


# -- memory -------------------------------------------------------------------------------------------


def _status_kb(pid: int | str, key: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/<pid>/status in kB (None where unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _actor_title(title: str) -> str:
    """``ray::MapWorker(MapBatches(SamplerActor)).submit`` -> ``ray::MapWorker(MapBatches(SamplerActor))``."""
    head = title.split(" ")[0]
    return head[: head.rfind(")") + 1] or head


@dataclass
class Peaks:
    """Peak RSS (bytes) of one run: this process, and each role's largest process."""

    driver: int = 0
    driver_source: str = "polled"
    roles: dict[str, int] = field(default_factory=dict)
    titles: dict[str, set[str]] = field(default_factory=dict)


class RssPoller:
    """A thread sampling the RSS of this process and of its descendants (the local Ray's workers)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.me = psutil.Process()
        self.lock = threading.Lock()
        self.peaks: Peaks | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="rss-poller", daemon=True)
        self.thread.start()

    @staticmethod
    def role(title: str) -> str | None:
        return next((name for name in ROLES if name in title), None)

    def _sample(self) -> None:
        rss = self.me.memory_info().rss
        seen: list[tuple[str, str, int]] = []
        for child in self.me.children(recursive=True):
            try:
                title = " ".join(child.cmdline())
                child_rss = child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            role = self.role(title)
            if role is not None:
                seen.append((role, _actor_title(title), child_rss))
        with self.lock:
            if self.peaks is None:
                return
            self.peaks.driver = max(self.peaks.driver, rss)
            for role, title, child_rss in seen:
                self.peaks.roles[role] = max(self.peaks.roles.get(role, 0), child_rss)
                self.peaks.titles.setdefault(role, set()).add(title)

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            self._sample()

    def begin(self) -> None:
        with self.lock:
            self.peaks = Peaks()
            self.hwm_reset = _reset_peak()

    def end(self) -> Peaks:
        self._sample()
        with self.lock:
            peaks, self.peaks = self.peaks, None
        assert peaks is not None
        hwm = _status_kb("self", "VmHWM") if self.hwm_reset else None
        if hwm is not None:
            peaks.driver, peaks.driver_source = hwm * 1024, "VmHWM"
        return peaks

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


# -- setup --------------------------------------------------------------------------------------------


def experiment(root: Path, args: argparse.Namespace, extra: Sequence[str] = ()) -> ExperimentConfig:
    """configs/demo.yaml with the benchmark's data, scorer and job settings (and ``extra`` overrides)."""
    threads = args.threads
    overrides = [
        f"output_root={root}",
        f"data.synthderm.num_records={args.records}",
        "tracking.enabled=false",
        "evaluate.domain_net=tiny",
        "evaluate.domain_train.steps=5",
        f"generate.batch_size={args.batch_size}",
        f"generate.shard_size={args.shard_size}",
        f"generate.sampler.num_cpus={args.sampler_cpus}",
        f"generate.scorer.num_cpus={args.scorer_cpus}",
        f"generate.sampler.threads={threads}",
        f"generate.scorer.threads={threads}",
        "generate.device=cpu",
    ]
    if args.steps is not None:
        overrides.append(f"generate.num_steps={args.steps}")
    return load_experiment(CONFIG, [*overrides, *extra])


def make_model_version(cfg: ExperimentConfig, directory: Path) -> Path:
    """A freshly initialised model of ``cfg.model`` (the demo preset), saved as a version directory."""
    from vgmedgen.model.ema import EMA
    from vgmedgen.model.vgmedgen import build_model
    from vgmedgen.platform.training.driver import ensure_text_encoder

    torch.manual_seed(0)
    model = build_model(cfg.model, ensure_text_encoder(cfg))
    with torch.no_grad():  # PixArt's init zeroes the output layer; noise makes the images non-trivial
        for _, p in model.generator.named_trainable_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.ema = EMA(model.generator, cfg.model.generator.ema_decay)
    model.eval().save_pretrained(directory)
    return directory


def policy(n: int) -> str:
    """A plan of exactly ``n`` images over two classes."""
    return f"generate.policies=[{{per_class: {{mel: {n // 2}, nv: {n - n // 2}}}}}]"


# -- the two ways -------------------------------------------------------------------------------------


@dataclass
class Run:
    images: int
    seconds: float  # the timed part (see the module docstring)
    peaks: Peaks
    total_seconds: float | None = None  # generate_experiment's whole wall time (ray only)
    files: int = 0  # table files written (ray only)
    write_spread: float = 0.0  # seconds between the first and the last table file's mtime (ray only)


def ray_run(root: Path, args: argparse.Namespace, model: Path, n: int, name: str, poller: RssPoller) -> Run:
    cfg = experiment(root, args, [f"generate.model={model}", f"generate.name={name}", policy(n)])
    poller.begin()
    outcome = generate_experiment(cfg)
    peaks = poller.end()
    if outcome.written != n:
        raise RuntimeError(f"the job wrote {outcome.written} images, not {n}")
    seconds = float(outcome.summary["throughput"]["seconds"])
    # Streamed writes land through the run; writes held back until the actor pools end land together.
    mtimes = sorted(f.stat().st_mtime for f in (outcome.out_dir / TABLE_DIR).glob("*.parquet"))
    return Run(n, seconds, peaks, outcome.seconds, len(mtimes), mtimes[-1] - mtimes[0])


def baseline_run(
    root: Path, args: argparse.Namespace, model: Path, assets: Path, n: int, name: str, poller: RssPoller
) -> Run:
    from vgmedgen.platform.generation.plan import build_plan, write_plan
    from vgmedgen.platform.tracking import resolve_model

    cfg = experiment(root, args, [f"generate.model={model}", f"generate.name={name}", policy(n)])
    gen = cfg.generate
    ref = resolve_model(str(model), cfg)
    out = root / "baseline" / name
    (out / "table").mkdir(parents=True)
    plan = build_plan(cfg, ref.id)
    write_plan(plan, out / "plan.parquet")
    shards = sorted(set(plan.column("shard").to_pylist()))
    empty_ids = out / "written_ids.json"
    empty_ids.write_text("[]")  # nothing written yet: the sampler makes every row
    poller.begin()
    start = time.perf_counter()
    sampler = SamplerActor(
        model_dir=str(ref.path),
        model_id=ref.id,
        plan_path=str(out / "plan.parquet"),
        written_path=str(empty_ids),
        batch_size=gen.batch_size,
        device=gen.device,
        threads=gen.sampler.threads,
        num_cpus=gen.sampler.num_cpus,
    )
    scorer = ScorerActor(
        assets_dir=str(assets),
        filters=gen.filters.model_dump(mode="json"),
        device=gen.device,
        threads=gen.scorer.threads,
        num_cpus=gen.scorer.num_cpus,
    )
    written = 0
    for shard in shards:
        images = sampler(pa.table({"shard": pa.array([shard], pa.int64())}))
        scored = [scorer(images.slice(i, gen.batch_size)) for i in range(0, images.num_rows, gen.batch_size)]
        table = pa.concat_tables(scored)
        pq.write_table(table, out / "table" / f"shard-{shard:05d}.parquet")
        written += table.num_rows
    seconds = time.perf_counter() - start
    peaks = poller.end()
    if written != n:
        raise RuntimeError(f"the baseline wrote {written} images, not {n}")
    return Run(n, seconds, peaks)


# -- report -------------------------------------------------------------------------------------------


def rates(small: Run, large: Run) -> tuple[float, float]:
    """Steady images/s and start-up seconds from runs of N and 4N images."""
    rate = (large.images - small.images) / (large.seconds - small.seconds)
    return rate, small.seconds - small.images / rate


def mb(value: int | None) -> str:
    return f"{value / MB:9.0f}" if value else f"{'-':>9}"


def ratio(a: int | None, b: int | None) -> str:
    return f"{b / a:6.2f}" if a and b else f"{'-':>6}"


def report(args: argparse.Namespace, steps: int, runs: dict[tuple[str, int], Run], full: Run | None) -> None:
    n, big = args.n, 4 * args.n
    print()
    print(
        f"demo model at 32 px, {steps} steps, batch {args.batch_size}, shard {args.shard_size}, "
        f"torch threads {args.threads}; ray: {args.ray_cpus} CPUs, sampler {args.sampler_cpus:g} CPU, "
        f"scorer {args.scorer_cpus:g} CPU"
    )
    print("(a) throughput")
    print(f"  {'way':<9} {f't({n}) s':>10} {f't({big}) s':>10} {'images/s':>9} {'start-up s':>11}")
    steady = {}
    for way in ("baseline", "ray"):
        small, large = runs[way, n], runs[way, big]
        steady[way], startup = rates(small, large)
        print(
            f"  {way:<9} {small.seconds:>10.1f} {large.seconds:>10.1f} {steady[way]:>9.2f} {startup:>11.1f}"
        )
    print(f"  ray / baseline steady rate: {steady['ray'] / steady['baseline']:.2f}  (target >= 0.9)")

    print("(b) peak RSS, MB")
    print(f"  {'process':<24} {n:>9} {big:>9} {'4N/N':>6}")
    for way in ("baseline", "ray"):
        small, large = runs[way, n].peaks, runs[way, big].peaks
        label = f"{way} driver ({small.driver_source})"
        print(f"  {label:<24} {mb(small.driver)} {mb(large.driver)} {ratio(small.driver, large.driver)}")
    for role in ROLES:
        a, b = (runs["ray", size].peaks.roles.get(role) for size in (n, big))
        print(f"  {'ray ' + role:<24} {mb(a)} {mb(b)} {ratio(a, b)}")
    print("  (target: every 4N/N within 0.90-1.10)")
    titles = {t for size in (n, big) for ts in runs["ray", size].peaks.titles.values() for t in ts}
    print(f"  actor process titles: {', '.join(sorted(titles))}")

    print("(writes) table files of each ray run, seconds between the first and the last file's mtime")
    for run in [runs["ray", n], runs["ray", big], *([full] if full is not None else [])]:
        print(
            f"  {run.images:>6} images: {run.files:>3} files over {run.write_spread:6.1f} s of a {run.seconds:.1f} s run"
        )
    print("  (streamed writes spread over the run; writes that wait for the actor pools land together)")

    if full is not None:
        peaks = ", ".join(f"{r} {full.peaks.roles[r] / MB:.0f} MB" for r in ROLES if r in full.peaks.roles)
        print(
            f"(c) {full.images} images: pipeline {full.seconds:.1f} s ({full.images / full.seconds:.2f} images/s), "
            f"generate_experiment {full.total_seconds:.1f} s; peak RSS: driver {full.peaks.driver / MB:.0f} MB, {peaks}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=64, help="N of (a) and (b): runs of N and 4N images")
    parser.add_argument("--images", type=int, default=1000, help="images of the (c) run (0: skip it)")
    parser.add_argument("--records", type=int, default=200, help="SynthDerm records (32 px) to prepare")
    parser.add_argument("--batch-size", type=int, default=16, help="generate.batch_size (sampler and scorer)")
    parser.add_argument(
        "--shard-size", type=int, default=64, help="generate.shard_size (plan rows per shard)"
    )
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's, 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, baseline and every actor")
    parser.add_argument("--sampler-cpus", type=float, default=0.5, help="generate.sampler.num_cpus")
    parser.add_argument("--scorer-cpus", type=float, default=0.5, help="generate.scorer.num_cpus")
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between RSS samples")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = parser.parse_args()
    if args.n < 2 or args.images == 1:
        parser.error("--n and --images must be at least 2 (the plan spans two classes)")

    import ray
    import ray.data

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="vgmedgen-genbench-") as tmp:
        root = Path(tmp)
        ray.init(num_cpus=args.ray_cpus, log_to_driver=False)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        poller = RssPoller(args.poll)
        try:
            t0 = time.perf_counter()
            from vgmedgen.platform.generation.score import ScorerAssets
            from vgmedgen.platform.prepare import prepare_records

            cfg = experiment(root, args)
            prepare_records(cfg)
            model = make_model_version(cfg, root / "models" / "demo-random")
            assets = ScorerAssets.build(cfg, root / "baseline-assets").directory
            print(f"[bench] setup (records, model version, domain network) {time.perf_counter() - t0:.1f} s")

            n, big = args.n, 4 * args.n
            runs: dict[tuple[str, int], Run] = {}
            # Interleaved, so that a slow spell of a shared machine spreads over both ways.
            for size in (n, big):
                runs["baseline", size] = baseline_run(root, args, model, assets, size, f"base-{size}", poller)
                print(f"[bench] baseline {size} images: {runs['baseline', size].seconds:.1f} s", flush=True)
                runs["ray", size] = ray_run(root, args, model, size, f"ray-{size}", poller)
                print(f"[bench] ray {size} images: {runs['ray', size].seconds:.1f} s", flush=True)
            full = ray_run(root, args, model, args.images, "full", poller) if args.images else None
        finally:
            poller.stop()
            ray.shutdown()

    report(args, args.steps or cfg.model.sampler.num_steps, runs, full)


if __name__ == "__main__":
    main()
