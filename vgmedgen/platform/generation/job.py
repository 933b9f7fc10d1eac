"""The generation job on Ray Data: plan shards -> sampler actors -> scorer actors -> one Parquet table.

Exactly once, with images equal to an undisturbed run's:

- The dataset's input is one row per *shard* of the plan. A sampler actor reads its shard's plan rows
  and samples them in fixed sub-batches of ``generate.batch_size`` in plan order, so the composition of
  every sampler batch is set by the plan alone (never by how Ray bundles blocks): an image's bytes do
  not depend on the run that made it.
- The table is keyed by ``sample_id`` (Ray Data names files with random uuids). Before a run, every
  complete Parquet file of the table is read for its ids (a file is complete once its footer, written
  last, is readable; an unreadable file is a killed write and is deleted). A shard whose ids are all
  present is skipped; a partial shard is sampled whole again and only its missing ids are emitted, so
  their bytes equal the undisturbed run's.
- After the write, duplicated ids (a write task Ray retried) are removed, so every id is in the table
  exactly once; then the derived outputs, and last a done-marker: a finished job run again writes
  nothing and says so.

Shape legend: N images, H/W image size.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.config import ExperimentConfig
from vgmedgen.platform.runs import read_done, write_done

__all__ = ["GenerationOutcome", "SamplerActor", "ScorerActor", "complete_ids", "generate_experiment"]

TABLE_DIR = "table"
PLAN_FILE = "plan.parquet"
ASSETS_DIR = "scorer_assets"
STATS_FILE = "statistics.json"


def _threads(threads: int | None, num_cpus: float) -> None:
    import torch

    torch.set_num_threads(threads or max(1, int(num_cpus)))


class SamplerActor:
    """Ray Data actor: a batch of shard numbers -> the images of those shards' pending plan rows."""

    def __init__(
        self,
        model_dir: str,
        model_id: str,
        plan_path: str,
        done_ids: Sequence[str],
        batch_size: int,
        device: str = "cpu",
        threads: int | None = None,
        num_cpus: float = 1.0,
    ) -> None:
        from vgmedgen.platform.generation.sample import load_model

        _threads(threads, num_cpus)
        self.model = load_model(model_dir, device="cuda" if device == "cuda" else "cpu").eval()
        self.model_id = model_id
        self.plan_path = plan_path
        self.done = set(done_ids)
        self.batch_size = batch_size

    def __call__(self, batch: Mapping[str, Any]) -> pa.Table:
        from vgmedgen.platform.generation.plan import plan_requests
        from vgmedgen.platform.generation.sample import generate_samples
        from vgmedgen.platform.images import png_bytes

        out = []
        for shard in [int(s) for s in batch["shard"]]:
            rows = pq.read_table(self.plan_path, filters=[("shard", "==", shard)])
            requests = plan_requests(rows)
            # The whole shard, in fixed sub-batches: the same composition in every run.
            samples = generate_samples(self.model, requests, batch_size=self.batch_size)
            images, masks = samples.images_uint8(), samples.masks_uint8()
            keep = [i for i, sid in enumerate(rows.column("sample_id").to_pylist()) if sid not in self.done]
            if not keep:
                continue
            part = rows.take(keep)
            png = [png_bytes(images[i], samples.provenance(i, self.model_id, kind="image")) for i in keep]
            masks_png = [
                png_bytes(masks[i], samples.provenance(i, self.model_id, kind="pseudo-mask")) for i in keep
            ]
            part = part.append_column("image", pa.array(png, pa.binary()))
            out.append(part.append_column("mask", pa.array(masks_png, pa.binary())))
        if not out:
            return pa.table({})
        return pa.concat_tables(out)


class ScorerActor:
    """Ray Data actor around :class:`~vgmedgen.platform.generation.score.Scorer`."""

    def __init__(
        self,
        assets_dir: str,
        filters: Mapping[str, Any],
        device: str = "cpu",
        threads: int | None = None,
        num_cpus: float = 1.0,
    ) -> None:
        from vgmedgen.platform.generation.score import Scorer

        _threads(threads, num_cpus)
        self.scorer = Scorer(assets_dir, filters, device="cuda" if device == "cuda" else "cpu")

    def __call__(self, batch: pa.Table) -> pa.Table:
        from vgmedgen.platform.generation.score import SCORER_SCHEMA, scored_to_arrow

        # The plan and sampler columns keep their (plan-schema) types; the scorer's are typed by its schema,
        # so every file of the table has one schema whatever its rows hold.
        scored = self.scorer(batch.to_pydict())
        extra = scored_to_arrow({k: scored[k] for k in SCORER_SCHEMA.names})
        for name in extra.column_names:
            batch = batch.append_column(extra.schema.field(name), extra.column(name))
        return batch


def complete_ids(table_dir: Path) -> list[str]:
    """The sample ids in the complete Parquet files of ``table_dir``; unreadable files (a write the
    job was killed in) are deleted, their rows are made again."""
    ids: list[str] = []
    if not table_dir.is_dir():
        return ids
    for f in sorted(table_dir.glob("*.parquet")):
        try:
            ids += pq.read_table(f, columns=["sample_id"]).column("sample_id").to_pylist()
        except (pa.ArrowInvalid, OSError):
            print(f"[generate] removing {f.name}: an unfinished write of an interrupted run", flush=True)
            f.unlink()
    return ids


def _dedupe(table_dir: Path) -> int:
    """Remove rows whose sample id an earlier file (in name order) already holds; returns how many."""
    seen: set[str] = set()
    removed = 0
    for f in sorted(table_dir.glob("*.parquet")):
        table = pq.read_table(f)
        ids = table.column("sample_id").to_pylist()
        keep = [i for i, s in enumerate(ids) if s not in seen]
        seen.update(ids)
        if len(keep) < len(ids):
            removed += len(ids) - len(keep)
            tmp = f.with_suffix(".tmp")
            pq.write_table(table.take(keep), tmp)
            tmp.replace(f)
    return removed


@dataclass
class GenerationOutcome:
    """What :func:`generate_experiment` did.

    Attributes:
        out_dir: the generation's directory.
        plan: the plan's id.
        written: images written by this run (0 when the plan was already complete).
        seconds: wall time of this run.
        summary: the summary (counts per class and reason, distances, throughput).
        reused: the plan was already complete; nothing was written.
    """

    out_dir: Path
    plan: str
    written: int
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)
    reused: bool = False


def _statistics(table_dir: Path, assets: Any, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """FD/KD of the accepted rows against the reference split, from per-file statistics merged."""
    from vgmedgen.platform.generation.score import ShardStats, score_accepted

    fc = cfg.evaluate.fidelity
    parts = []
    for f in sorted(table_dir.glob("*.parquet")):
        table = pq.read_table(
            f, columns=["sample_id", "label", "accepted", "domain_features", "inception_features"]
        )
        stats = ShardStats(reservoir_size=fc.reservoir_size, seed=fc.seed)
        parts.append(stats.add_batch(table.to_pydict()))
    merged = ShardStats.merge_all(parts)
    return score_accepted(
        merged, assets.reference, kid_subsets=fc.kid_subsets, kid_subset_size=fc.kid_subset_size, seed=fc.seed
    )


def generate_experiment(cfg: ExperimentConfig, *, address: str | None = None) -> GenerationOutcome:
    """Run the generation job of ``cfg.generate`` (see the module docstring); resumable, exactly once."""
    from vgmedgen.platform.cluster import connect
    from vgmedgen.platform.generation.plan import build_plan, plan_key
    from vgmedgen.platform.prepare import prepare_records
    from vgmedgen.platform.tracking import Tracker, resolve_model

    t0 = time.perf_counter()
    gen = cfg.generate
    tracker = Tracker(cfg.tracking, cfg.root, cfg.name) if cfg.tracking.enabled else None
    model = gen.model
    if model is None:
        if tracker is None:
            raise ConfigError(
                "generate.model is not set and tracking is off; set generate.model to a model version directory"
            )
        model = f"{tracker.model_name}@{cfg.tracking.alias}"
    ref = resolve_model(model, cfg, tracker=tracker)
    connect(address)
    prepare_records(cfg, address=address)
    plan = build_plan(cfg, ref.id)
    key = plan_key(plan)
    out_dir = cfg.root / "generated" / cfg.name / (gen.name or key)
    done = read_done(out_dir)
    if done is not None:
        print(f"[generate] {out_dir} is complete (plan {key}); nothing to write", flush=True)
        return GenerationOutcome(out_dir, key, 0, time.perf_counter() - t0, done, reused=True)
    from vgmedgen.platform.tracking import open_run

    # The generation's MLflow run, a child of the model version's training run when the store knows it;
    # it ends FINISHED, KILLED (interrupted) or FAILED with the job, and a resumed job reopens it.
    with open_run(
        tracker,
        key=f"{cfg.name}-generate-{key}",
        name=f"{cfg.name}-generate",
        parent_id=ref.run_id,
        tags={"job": "generate", "model_version": ref.id, "plan": key},
    ) as run_id:
        todo, summary = _generate(cfg, ref, plan, key, out_dir, address)
        if tracker is not None:
            tracker.log_params(run_id, {"generate": cfg.generate.model_dump(mode="json"), "plan": key})
            scalars = {
                "generate/images": float(summary["rows"]),
                "generate/accepted": float(summary["accepted"]),
                "generate/rejected": float(summary["rejected"]),
            }
            rate = (summary.get("throughput") or {}).get("images_per_s")
            if rate:
                scalars["generate/images_per_s"] = float(rate)
            for row in summary.get("distances", []):
                if row.get("fd") is not None:
                    scalars[f"generate/fd_{row['extractor']}_{row['class']}"] = float(row["fd"])
            tracker.sink(run_id)([(0, scalars)])
            tracker.log_artifact(run_id, out_dir / "summary.json", "generation")
            tracker.log_artifacts(run_id, out_dir / "contact_sheets", "generation/contact_sheets")
    return GenerationOutcome(out_dir, key, todo, time.perf_counter() - t0, summary)


def plan_shard_ids(plan: pa.Table) -> dict[int, list[str]]:
    """Sample ids per shard (for tests and reports)."""
    out: dict[int, list[str]] = {}
    for s, i in zip(plan.column("shard").to_pylist(), plan.column("sample_id").to_pylist()):
        out.setdefault(int(s), []).append(i)
    return {k: out[k] for k in sorted(out)}


def _generate(
    cfg: ExperimentConfig, ref: Any, plan: pa.Table, key: str, out_dir: Path, address: str | None
) -> tuple[int, dict[str, Any]]:
    """Sample, score and write the pending rows of ``plan``, then the derived outputs and the done-marker."""
    from vgmedgen.platform.generation.outputs import write_outputs
    from vgmedgen.platform.generation.plan import plan_key, plan_summary, read_plan, write_plan
    from vgmedgen.platform.generation.score import ScorerAssets

    gen = cfg.generate
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path = out_dir / PLAN_FILE
    if plan_path.is_file() and plan_key(read_plan(plan_path)) != key:
        raise FileExistsError(
            f"{out_dir} holds another plan; set generate.name to a new name or remove that directory"
        )
    write_plan(plan, plan_path)
    print(plan_summary(plan), flush=True)
    assets = ScorerAssets.build(cfg, out_dir / ASSETS_DIR, address=address)

    table_dir = out_dir / TABLE_DIR
    have = set(complete_ids(table_dir))
    ids = plan.column("sample_id").to_pylist()
    shards = plan.column("shard").to_pylist()
    pending = sorted({s for s, i in zip(shards, ids) if i not in have})
    todo = sum(1 for i in ids if i not in have)
    print(f"[generate] {len(ids) - todo} of {len(ids)} images already written; {todo} to make", flush=True)
    t_run = time.perf_counter()
    if pending:
        import ray

        ds = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(
            SamplerActor,
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=gen.sampler.size),
            num_cpus=gen.sampler.num_cpus,
            num_gpus=gen.sampler.num_gpus,
            fn_constructor_kwargs={
                "model_dir": str(ref.path),
                "model_id": ref.id,
                "plan_path": str(plan_path),
                "done_ids": sorted(have),
                "batch_size": gen.batch_size,
                "device": gen.device,
                "threads": gen.sampler.threads,
                "num_cpus": gen.sampler.num_cpus,
            },
        )
        ds = ds.map_batches(
            ScorerActor,
            batch_size=gen.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=gen.scorer.size),
            num_cpus=gen.scorer.num_cpus,
            num_gpus=gen.scorer.num_gpus,
            fn_constructor_kwargs={
                "assets_dir": str(assets.directory),
                "filters": gen.filters.model_dump(mode="json"),
                "device": gen.device,
                "threads": gen.scorer.threads,
                "num_cpus": gen.scorer.num_cpus,
            },
        )
        ds.write_parquet(str(table_dir))
    run_s = time.perf_counter() - t_run
    removed = _dedupe(table_dir) if table_dir.is_dir() else 0
    if removed:
        print(f"[generate] removed {removed} duplicated rows (retried write tasks)", flush=True)
    distances = _statistics(table_dir, assets, cfg)
    throughput = {"images": todo, "seconds": run_s, "images_per_s": todo / run_s if run_s > 0 else None}
    outputs = write_outputs(
        table_dir, out_dir, gen, dataset=cfg.data.dataset, plan=key, throughput=throughput
    )
    summary = json.loads(outputs.summary.read_text())
    summary["distances"] = distances
    outputs.summary.write_text(json.dumps(summary, indent=2, default=float))
    print(
        f"[generate] {todo} images in {run_s:.1f} s ({throughput['images_per_s'] or 0:.2f} images/s)",
        flush=True,
    )
    write_done(out_dir, {"plan": key, "model_id": ref.id, "images": len(ids)})
    return todo, summary
