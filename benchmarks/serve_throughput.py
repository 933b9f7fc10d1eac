"""Serve throughput: images/s and latency of ``POST /v1/generate`` over HTTP with dynamic batching and
without, against the bare pipeline in this same process.

It builds a model version with random weights in a temporary directory (the tests' helpers: the
``tiny`` preset, or ``demo`` with the tests' tiny text encoder; sampler steps ``--steps``), starts a
local Ray (``ray.init(num_cpus=--ray-cpus)``) and the Serve application (:func:`vgmedgen.serve.app.start`,
HTTP on 127.0.0.1 and a free port, one model replica of ``--model-cpus`` CPUs; its torch uses that many
threads) and then measures, one after the other:

* ``batched``: the application with ``serve.batching.max_batch_size=--batch`` (16);
* ``unbatched``: the same application redeployed with ``max_batch_size=1`` (same port: Serve's HTTP
  options are cluster-wide);
* ``bare``: after the application is deleted, :func:`generate_samples` on the same model version
  (:func:`load_model`, torch threads as the replica's) over the same number of images, in batches of
  ``--batch`` single-image requests, and in batches of one (the latency of one image).

Over HTTP the load is ``benchmarks/locustfile.py`` in a locust subprocess: ``--users`` users (16), all
started at once, each sending ``--requests`` single-image requests back to back (a fixed total of
users x requests images, the same for every way), after a warm-up of one request per user. images/s =
images / (end of the last request - start of the first), latency = each request's time as locust
measured it (p50/p95/p99 by numpy), and the sampler batch each request shared (``timing.batch_images``
of its answer). The bare pipeline's time has no HTTP, JSON, PNG encoding, Ray or batching wait in it,
and the locust process shares the machine's CPUs with the server. No figure is asserted: the targets
are printed beside them (batching / unbatched >= 2x, Serve / bare >= 0.85).

Usage (it starts its own local Ray: run it where no other Ray instance runs):
    .venv/bin/python benchmarks/serve_throughput.py                                   # tiny, 20 steps
    .venv/bin/python benchmarks/serve_throughput.py --preset demo --steps 10 --requests 10
    .venv/bin/python benchmarks/serve_throughput.py --out serve_throughput.json
It prints one line per way (images, seconds, images/s, p50/p95/p99 latency in ms, mean sampler batch,
sampling ms per image: inside the replica from each answer's ``timing.sample_s``, or bare), the CPU
seconds each process used during each Serve run (model replica, ingress, HTTP proxy, the other Ray
processes, locust with its start-up), the bare pipeline's ms per batch at ``--batch`` and per image at
batch 1, and the two ratios; ``--out`` writes them as JSON (with the load average before each way).
The pixart-512 version was built and loaded on a CPU here (27 s, 2.6 GB of random weights); its
sampling and Serve runs were not.

Measured on 2 CPU cores shared with other work (2026-12-06, Ray 2.60, 16 users, replica 1 CPU; batched
images/s moved by +-30 % between runs with the machine's load):
    way / images/s / p50, p95, p99 ms / mean sampler batch
    tiny, 20 steps, 320 images:  batched 26.4 / 596, 678, 711 / 5.8;  unbatched 7.5 / 2162, 2564, 2695;
                                 bare 50.5  ->  batched/unbatched 3.5 (2.1-3.5 over 3 runs), Serve/bare 0.52
    demo, 10 steps, 160 images:  batched 5.75 / 2779, 3036, 3081 / 6.3;  unbatched 3.97 / 3933, 4383, 4486;
                                 bare 7.32  ->  batched/unbatched 1.45, Serve/bare 0.79
Why, from the figures it prints: the bare pipeline itself gains only 1.8x from batch 1 to 16 with the
demo model on a CPU (5.3x with tiny), which caps batched/unbatched; with tiny the HTTP path (proxy,
ingress, JSON and PNGs: ~20 ms of CPU per request) costs as much CPU as sampling an image and shares the
2 cores with it, which caps Serve/bare. Batches average ~6 images, not 16, at ``--batch-wait 0.05``:
Ray Serve 2.60 forms the next batch while the previous one samples (``max_concurrent_batches`` only
gates running it), so a batch holds what arrived within the wait. ``--batch-wait 0.5`` fills them
(16.0) but gains nothing here (demo: 5.60 images/s): sampling is then serialised with the round trip,
and sampling inside the replica ran ~17 % slower per image than in this process.

GPU mode (not run: this machine has no GPU). ``--device cuda --preset pixart-512`` builds the paper's
architecture with random weights (PixArt-XL-2 at 512 px, frozen weights in bf16, a random VAE of the SD
architecture and a random 12-layer BERT, written to the temporary directory first, as the version's
``pretrained_dir``/``vae_dir``), gives the model replica one GPU and samples with the preset's sampler
(20 steps unless ``--steps``, compositional guidance: three transformer passes per step). The figures
to read there are the bare pipeline's latency at batch 1 (ms per image) and the batched images/s:
    .venv/bin/python benchmarks/serve_throughput.py --device cuda --preset pixart-512 --requests 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO / "benchmarks" / "locustfile.py"
sys.path.insert(0, str(REPO / "tests"))  # the tests' model helpers and free_port

from raycluster import free_port  # noqa: E402
from test_model_version import ANATOMY, STYLE, make_text_encoder, make_trained_model  # noqa: E402

from vgmedgen.platform.config import ExperimentConfig  # noqa: E402

PROMPTS = {"VGMEDGEN_LOAD_ANATOMY": ANATOMY[1], "VGMEDGEN_LOAD_STYLE": STYLE[1]}


# -- the model version ----------------------------------------------------------------------------


def make_version(preset: str, steps: int | None, root: Path) -> Path:
    """A model version of ``preset`` with random (non-trivial) weights, saved under ``root``."""
    if preset == "pixart-512":
        return make_pixart_version(steps, root)
    encoder = make_text_encoder(root / "encoder")
    overrides: dict[str, Any] = {"preset": preset}
    if steps is not None:
        overrides["sampler"] = {"num_steps": steps}
    if preset == "demo":  # the demo's generator with the tests' 2-layer text encoder of width 32
        overrides["text"] = {"encoder_hidden": 32, "encoder_layers": 2, "encoder_heads": 2}
    directory = root / f"version-{preset}"
    make_trained_model(encoder, overrides).save_pretrained(directory)
    return directory


def make_pixart_version(steps: int | None, root: Path) -> Path:
    """The ``pixart-512`` preset with random weights: a random PixArt-XL-2 transformer and SD VAE written
    as its pretrained directory, a random BERT of the preset's width as its text encoder."""
    from vgmedgen.model.autoencoder import FrozenAutoencoder
    from vgmedgen.model.generator import PixArtBackbone
    from vgmedgen.model.text import build_text_encoder, vocabulary_from_texts
    from vgmedgen.model.vgmedgen import ModelConfig, build_model

    weights = root / "pixart-random"
    generator = {"pretrained_dir": str(weights), "vae_dir": str(weights)}
    overrides: dict[str, Any] = {"preset": "pixart-512", "generator": generator}
    if steps is not None:
        overrides["sampler"] = {"num_steps": steps}
    config = ModelConfig.model_validate(overrides)
    torch.manual_seed(0)
    PixArtBackbone(**config.generator.backbone.diffusers_kwargs()).save_pretrained(weights / "transformer")
    FrozenAutoencoder.from_config().vae.save_pretrained(weights / "vae")
    text = config.text
    encoder = build_text_encoder(
        vocabulary_from_texts([*ANATOMY, *STYLE]),
        root / "encoder",
        hidden=text.encoder_hidden,
        layers=text.encoder_layers,
        heads=text.encoder_heads,
        max_position=max(text.max_length, 64),
    )
    directory = root / "version-pixart-512"
    build_model(config, encoder).eval().save_pretrained(directory)
    return directory


# -- the ways -------------------------------------------------------------------------------------


@dataclass
class Figures:
    """One way's figures (latencies in ms)."""

    way: str
    images: int
    seconds: float
    images_per_s: float
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_batch: float | None = None
    statuses: dict[str, int] = field(default_factory=dict)
    failures: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds by process during the run
    extra: dict[str, float] = field(default_factory=dict)


def experiment(
    root: Path, version: Path, port: int, args: argparse.Namespace, batch: int
) -> ExperimentConfig:
    cuda = args.device == "cuda"
    serve = {
        "models": [str(version)],
        "port": port,
        "device": args.device,
        "num_cpus": args.model_cpus,
        "num_gpus": 1 if cuda else 0,
        "ingress_num_cpus": 0.1,
        "token_env": None,
        "request_timeout_s": 600,
        "batching": {"max_batch_size": batch, "batch_wait_timeout_s": args.batch_wait},
        "queue": {"max_ongoing_requests": max(args.users, args.batch), "max_queued_requests": 1024},
    }
    return ExperimentConfig.model_validate({"name": "serve-bench", "output_root": str(root), "serve": serve})


# Where the CPU goes during a measured run: this process's descendants (the local Ray's processes) by
# process title, and the locust subprocess (from the rusage of reaped children).
ROLES = {
    "model": "ServeReplica:vgmedgen:ModelServer",
    "ingress": "ServeReplica:vgmedgen:Ingress",
    "proxy": "ProxyActor",
}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) so far, by role: model, ingress, proxy, other Ray processes, locust."""
    import resource

    import psutil

    totals = dict.fromkeys([*ROLES, "ray other", "locust"], 0.0)
    for child in psutil.Process().children(recursive=True):
        try:
            title = " ".join(child.cmdline())
            times = child.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        role = next((r for r, marker in ROLES.items() if marker in title), "ray other")
        totals[role] += times.user + times.system
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # the locust runs, once they have exited
    totals["locust"] = reaped.ru_utime + reaped.ru_stime
    return totals


def locust(base: str, users: int, requests: int, workdir: Path, steps: int | None) -> dict[str, Any]:
    """Run the locustfile against ``base``; returns its record (see benchmarks/locustfile.py)."""
    record = workdir / "record.json"
    env = {
        **os.environ,
        **PROMPTS,
        "VGMEDGEN_LOAD_REQUESTS": str(requests),
        "VGMEDGEN_LOAD_N": "1",
        "VGMEDGEN_LOAD_STEPS": "" if steps is None else str(steps),
        "VGMEDGEN_LOAD_TIMEOUT_S": "600",
        "VGMEDGEN_LOAD_RECORD": str(record),
    }
    command = [
        str(Path(sys.executable).parent / "locust"),
        *("-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users)),
        *("--run-time", "3600s", "--stop-timeout", "30", "-H", base),
        *("--json-file", str(workdir / "stats"), "--only-summary", "--loglevel", "WARNING"),
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True)
    if not record.is_file():
        raise RuntimeError(f"locust wrote no record (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(record.read_text())


def serve_way(way: str, cfg: ExperimentConfig, args: argparse.Namespace, workdir: Path) -> Figures:
    from servehelpers import wait_ready

    from vgmedgen.serve.app import shutdown, start

    base = start(cfg)["url"].rstrip("/")
    try:
        wait_ready(base, timeout_s=600)
        locust(base, args.users, 1, workdir / f"{way}-warmup", args.steps)
        before = cpu_seconds()
        record = locust(base, args.users, args.requests, workdir / way, args.steps)
        cpu = {k: v - before[k] for k, v in cpu_seconds().items()}
    finally:
        shutdown(cfg)
    sent = record["requests"]
    ok = [r for r in sent if r["status"] == 200 and "error" not in r]
    latencies = np.array([r["ms"] for r in sent])
    seconds = max(r["start"] + r["ms"] / 1000 for r in sent) - min(r["start"] for r in sent)
    batches = [r["batch_images"] for r in ok if "batch_images" in r]
    per_image = [r["sample_s"] / r["batch_images"] for r in ok if r.get("sample_s") and r.get("batch_images")]
    statuses: dict[str, int] = {}
    for r in sent:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return Figures(
        way=way,
        images=len(ok),
        seconds=seconds,
        images_per_s=len(ok) / seconds,
        p50_ms=float(np.percentile(latencies, 50)),
        p95_ms=float(np.percentile(latencies, 95)),
        p99_ms=float(np.percentile(latencies, 99)),
        mean_batch=float(np.mean(batches)) if batches else None,
        statuses=statuses,
        failures=len(sent) - len(ok),
        cpu_s=cpu,
        extra={"replica_sample_ms_per_image": 1000 * float(np.mean(per_image))} if per_image else {},
    )


def bare_way(version: Path, images: int, args: argparse.Namespace) -> Figures:
    """generate_samples over ``images`` single-image requests in batches of ``--batch``, then a few at batch 1."""
    from vgmedgen.platform.generation.request import SampleRequest
    from vgmedgen.platform.generation.sample import generate_samples, load_model

    device = torch.device(args.device)
    torch.set_num_threads(max(1, int(args.model_cpus)))
    model = load_model(version, device).eval()

    def requests(first: int, count: int) -> list[SampleRequest]:
        return [
            SampleRequest(
                anatomy_prompt=ANATOMY[1], style_prompt=STYLE[1], seed=first + i, n=1, num_steps=args.steps
            )
            for i in range(count)
        ]

    def timed(first: int, count: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        generate_samples(model, requests(first, count), batch_size=args.batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed(0, args.batch)  # warm-up
    batch_times = [timed(1000 + i, min(args.batch, images - i)) for i in range(0, images, args.batch)]
    single_times = [timed(5000 + i, 1) for i in range(args.single)]
    seconds = sum(batch_times)
    return Figures(
        way="bare",
        images=images,
        seconds=seconds,
        images_per_s=images / seconds,
        extra={
            f"ms_per_batch_of_{args.batch}": 1000 * float(np.median(batch_times)),
            "ms_per_image_at_batch_1": 1000 * float(np.median(single_times)),
        },
    )


# -- report ---------------------------------------------------------------------------------------


def report(args: argparse.Namespace, ways: dict[str, Figures], device_name: str) -> dict[str, float]:
    steps = args.steps if args.steps is not None else "model's"
    print()
    print(
        f"{args.preset} model, {steps} steps, {device_name}; {args.users} users x {args.requests} single-image "
        f"requests; model replica {args.model_cpus:g} CPU; batch {args.batch}, wait {args.batch_wait:g} s"
    )
    print(
        f"  {'way':<10} {'images':>6} {'s':>7} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'batch':>6} {'sampling ms/image':>18}"
    )

    def cell(value: float | None, width: int, digits: int = 0) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    bare = ways["bare"].extra
    per_batch = bare[f"ms_per_batch_of_{args.batch}"]
    for f in ways.values():
        sampling = f.extra.get(
            "replica_sample_ms_per_image", per_batch / args.batch if f.way == "bare" else None
        )
        print(
            f"  {f.way:<10} {f.images:>6} {f.seconds:>7.1f} {f.images_per_s:>9.2f} {cell(f.p50_ms, 8)} "
            f"{cell(f.p95_ms, 8)} {cell(f.p99_ms, 8)} {cell(f.mean_batch, 6, 1)} {cell(sampling, 18, 1)}"
            + (f"  failures {f.failures} {f.statuses}" if f.failures else "")
        )
    print(f"  CPU seconds by process during each Serve run (wall x {os.cpu_count()} cores available):")
    for f in ways.values():
        if f.cpu_s:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in f.cpu_s.items())
            print(f"    {f.way:<10} {parts}  (of {f.seconds * (os.cpu_count() or 1):.1f})")
    single = bare["ms_per_image_at_batch_1"]
    print(
        f"  bare: {per_batch:.0f} ms per batch of {args.batch}, {single:.0f} ms per image at batch 1 "
        f"(batching gain of the bare pipeline: {args.batch * single / per_batch:.2f}x)"
    )
    ratios = {
        "batched_over_unbatched": ways["batched"].images_per_s / ways["unbatched"].images_per_s,
        "serve_over_bare": ways["batched"].images_per_s / ways["bare"].images_per_s,
    }
    print(f"  batched / unbatched images/s: {ratios['batched_over_unbatched']:.2f}  (target >= 2)")
    print(f"  Serve (batched) / bare images/s: {ratios['serve_over_bare']:.2f}  (target >= 0.85)")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", choices=["tiny", "demo", "pixart-512"], default="tiny", help="model preset"
    )
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (0: the preset's own)")
    parser.add_argument("--users", type=int, default=16, help="concurrent locust users")
    parser.add_argument("--requests", type=int, default=20, help="single-image requests per user")
    parser.add_argument(
        "--batch", type=int, default=16, help="serve.batching.max_batch_size of the batched way"
    )
    parser.add_argument("--batch-wait", type=float, default=0.05, help="serve.batching.batch_wait_timeout_s")
    parser.add_argument("--single", type=int, default=16, help="images timed one at a time (bare, batch 1)")
    parser.add_argument(
        "--model-cpus", type=float, default=1.0, help="CPUs (and torch threads) of the replica"
    )
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model samples")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    args.steps = args.steps or None
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; none is visible here")
    if args.preset == "pixart-512" and args.device != "cuda":
        parser.error("--preset pixart-512 samples 512 px images: run it with --device cuda")

    import ray
    from ray import serve

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    ways: dict[str, Figures] = {}
    with tempfile.TemporaryDirectory(prefix="vgmedgen-servebench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        version = make_version(args.preset, args.steps, root)
        print(f"[bench] model version ({args.preset}) built in {time.perf_counter() - t0:.1f} s", flush=True)
        ray.init(
            address="local",
            num_cpus=args.ray_cpus,
            num_gpus=1 if args.device == "cuda" else 0,
            include_dashboard=False,
            log_to_driver=False,
        )
        try:
            port = free_port()
            for way, batch in (("batched", args.batch), ("unbatched", 1)):
                cfg = experiment(root, version, port, args, batch)
                load = os.getloadavg()[0]  # other work on a shared machine shows here
                ways[way] = serve_way(way, cfg, args, root / "locust")
                ways[way].extra["load_average_before"] = load
                print(f"[bench] {way}: {ways[way].images_per_s:.2f} images/s", flush=True)
            serve.shutdown()
        finally:
            ray.shutdown()
        load = os.getloadavg()[0]
        ways["bare"] = bare_way(version, ways["batched"].images, args)
        ways["bare"].extra["load_average_before"] = load
        print(f"[bench] bare: {ways['bare'].images_per_s:.2f} images/s", flush=True)
    ratios = report(args, ways, device_name)
    if args.out is not None:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        figures = {
            "settings": settings,
            "device": device_name,
            "ways": {k: asdict(v) for k, v in ways.items()},
        }
        args.out.write_text(json.dumps({**figures, "ratios": ratios}, indent=2))
        print(f"  written to {args.out}")


if __name__ == "__main__":
    main()
