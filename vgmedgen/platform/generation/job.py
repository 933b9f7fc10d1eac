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
import os
import re
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

__all__ = [
    "GenerationOutcome",
    "SamplerActor",
    "ScorerActor",
    "complete_ids",
    "generate_experiment",
    "check_plan_sampler",
    "read_generated",
    "run_generation",
    "set_config",
]

TABLE_DIR = "table"
PLAN_FILE = "plan.parquet"
WRITTEN_FILE = ".written_ids.json"  # the ids already in the table when a run starts (for the samplers)
ASSETS_DIR = "_scorer_assets"


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
        written_path: str,
        batch_size: int,
        device: str = "cpu",
        threads: int | None = None,
        num_cpus: float = 1.0,
    ) -> None:
        from vgmedgen.platform.generation.sample import load_model
        from vgmedgen.platform.metrics.fidelity import resolve_device

        _threads(threads, num_cpus)
        self.model = load_model(model_dir, device=resolve_device(device)).eval()
        self.model_id = model_id
        self.plan_path = plan_path
        # The ids already in the table, from a file (not a constructor argument: Ray would keep a list that
        # grows with the plan in the object store for the actor's restarts).
        self.done = set(json.loads(Path(written_path).read_text()))
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
        self.scorer = Scorer(assets_dir, filters, device=device)

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
            tmp = f.with_name(f".{f.name}.tmp")  # dot-named: no reader of the table takes it for a part
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


def generate_experiment(
    cfg: ExperimentConfig, *, address: str | None = None, fresh: bool = False
) -> GenerationOutcome:
    """Run the generation job of ``cfg.generate`` (see the module docstring); resumable, exactly once.
    ``fresh`` removes the generation's directory first (``--fresh``): every image is made again."""
    from vgmedgen.platform.tracking import Tracker, model_reference, open_run, resolve_model

    tracker = Tracker(cfg.tracking, cfg.root, cfg.name) if cfg.tracking.enabled else None
    model = model_reference(cfg.generate.model, cfg, tracker, "generate.model")
    ref = resolve_model(model, cfg, tracker=tracker)
    pending = _Pending.start(cfg, ref, address=address, fresh=fresh)
    if pending.done is not None:
        return pending.reused()
    # The generation's MLflow run, a child of the model version's training run when the store knows it;
    # it ends FINISHED, KILLED (interrupted) or FAILED with the job, and a resumed job reopens it.
    with open_run(
        tracker,
        key=f"{cfg.name}-generate-{pending.key}",
        name=f"{cfg.name}-generate",
        parent_id=ref.run_id,
        tags={"job": "generate", "model_version": ref.id, "plan": pending.key},
    ) as run_id:
        outcome = pending.run()
        if tracker is not None:
            _log_generation(tracker, run_id, cfg, outcome)
    return outcome


def run_generation(
    cfg: ExperimentConfig, ref: Any, *, address: str | None = None, records_dir: Path | None = None
) -> GenerationOutcome:
    """The generation pipeline of ``cfg.generate`` for a resolved model version ``ref``, without an MLflow
    run of its own: the evaluate job and the downstream benchmark make their sets through it.

    Args:
        records_dir: the records whose train split gives prompts and labels (default: the experiment's;
            the downstream benchmark passes its low-data subset).
    """
    pending = _Pending.start(cfg, ref, address=address, records_dir=records_dir)
    return pending.reused() if pending.done is not None else pending.run()


def set_config(
    cfg: ExperimentConfig,
    policies: Sequence[Mapping[str, Any]],
    *,
    seed: int,
    sampler: Any = None,
    batch_size: int | None = None,
) -> ExperimentConfig:
    """``cfg`` with the generate section of a set another job makes through the pipeline (the evaluate
    job's generated set, the downstream benchmark's synthetic rows): ``policies`` and ``seed``, no
    filters (every image counts), no export, the output named by its plan; the experiment's actor
    options (a single sampler actor without ``threads`` gets the driver node's cores), shard size and
    device.

    Args:
        sampler: a :class:`~vgmedgen.model.sampler.SamplerConfig` whose steps and guidance the plan rows
            carry (None: the model version's own).
        batch_size: images per sampler batch (capped at the shard size; None: the generate section's).
    """
    from vgmedgen.platform.generation.config import GenerateConfig

    base = cfg.generate
    fields = base.model_dump(mode="json", exclude={"model", "name", "filters", "export", "policies", "seed"})
    fields.update(policies=[dict(p) for p in policies], seed=seed)
    if base.sampler.threads is None and base.sampler.size == 1:
        # One sampler actor makes the whole set: let it use this node's cores, as the in-process sampler
        # did (its fractional Ray CPU share would give it one thread: half the speed on 2 cores).
        fields["sampler"]["threads"] = max(1, os.cpu_count() or 1)
    if batch_size is not None:
        fields["batch_size"] = min(batch_size, base.shard_size)
    if sampler is not None:
        fields.update(
            num_steps=sampler.num_steps,
            guidance_anatomy=sampler.guidance_anatomy,
            guidance_style=sampler.guidance_style,
        )
    return cfg.model_copy(update={"generate": GenerateConfig.model_validate(fields)})


def check_plan_sampler(sampler: Any, model_sampler: Any, where: str) -> None:
    """A plan row carries steps and guidance only; the solver settings are the model version's. Raise
    ConfigError when ``sampler`` asks for other solver settings than ``model_sampler`` has."""
    if sampler is None:
        return
    carried = {"num_steps", "guidance_anatomy", "guidance_style"}
    differ = [
        k for k, v in sampler.model_dump().items() if k not in carried and v != getattr(model_sampler, k)
    ]
    if differ:
        raise ConfigError(
            f"{where} sets {', '.join(differ)}, which generated sets take from the model version "
            f"({', '.join(f'{k}={getattr(model_sampler, k)!r}' for k in differ)}); remove them from {where}"
        )


def _log_generation(tracker: Any, run_id: str, cfg: ExperimentConfig, outcome: GenerationOutcome) -> None:
    summary = outcome.summary
    tracker.log_params(run_id, {"generate": cfg.generate.model_dump(mode="json"), "plan": outcome.plan})
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
            # MLflow keys allow letters, digits and _-./ and spaces; a class name may hold anything else.
            name = re.sub(r"[^A-Za-z0-9_\-./ ]", "_", f"generate/fd_{row['extractor']}_{row['class']}")
            scalars[name] = float(row["fd"])
    tracker.sink(run_id)([(0, scalars)])
    tracker.log_artifact(run_id, outcome.out_dir / "summary.json", "generation")
    tracker.log_artifacts(run_id, outcome.out_dir / "contact_sheets", "generation/contact_sheets")


@dataclass
class _Pending:
    """A generation whose plan is built and written down, before any image."""

    cfg: ExperimentConfig
    ref: Any
    plan: pa.Table
    key: str
    out_dir: Path
    done: dict[str, Any] | None
    address: str | None
    t0: float

    @classmethod
    def start(
        cls,
        cfg: ExperimentConfig,
        ref: Any,
        *,
        address: str | None,
        records_dir: Path | None = None,
        fresh: bool = False,
    ) -> _Pending:
        from vgmedgen.platform.cluster import connect
        from vgmedgen.platform.generation.plan import build_plan, plan_key
        from vgmedgen.platform.prepare import prepare_records

        t0 = time.perf_counter()
        connect(address)
        prepare_records(cfg, address=address)
        plan = build_plan(cfg, ref.id, records_dir=records_dir)
        key = plan_key(plan)
        out_dir = cfg.root / "generated" / cfg.name / (cfg.generate.name or key)
        if fresh and out_dir.exists():
            import shutil

            print(f"[generate] --fresh: removing {out_dir}", flush=True)
            shutil.rmtree(out_dir)
        done = read_done(out_dir)
        if done is not None and done.get("plan") != key:
            raise ConfigError(
                f"{out_dir} holds a finished generation of another plan ({done.get('plan')}, this config's is "
                f"{key}); set generate.name to a new name or remove that directory"
            )
        return cls(cfg, ref, plan, key, out_dir, done, address, t0)

    def reused(self) -> GenerationOutcome:
        print(f"[generate] {self.out_dir} is complete (plan {self.key}); nothing to write", flush=True)
        summary = json.loads((self.out_dir / "summary.json").read_text())
        return GenerationOutcome(
            self.out_dir, self.key, 0, time.perf_counter() - self.t0, summary, reused=True
        )

    def run(self) -> GenerationOutcome:
        todo, summary = _generate(self.cfg, self.ref, self.plan, self.key, self.out_dir, self.address)
        return GenerationOutcome(self.out_dir, self.key, todo, time.perf_counter() - self.t0, summary)


def read_generated(out_dir: Path, columns: Sequence[str]) -> pa.Table:
    """``columns`` of a finished generation's table, one row per plan row, in plan order."""
    from vgmedgen.platform.generation.plan import read_plan

    order = read_plan(out_dir / PLAN_FILE).column("sample_id").to_pylist()
    names = list(dict.fromkeys(["sample_id", *columns]))
    table = pq.ParquetDataset(out_dir / TABLE_DIR).read(columns=names)
    where = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
    missing = [sid for sid in order if sid not in where]
    if missing:
        raise FileNotFoundError(
            f"{out_dir / TABLE_DIR} lacks {len(missing)} rows of its plan (e.g. {missing[0]}); "
            "run the same generation again to finish it"
        )
    return table.take([where[sid] for sid in order]).select(list(columns))


def plan_shard_ids(plan: pa.Table) -> dict[int, list[str]]:
    """Sample ids per shard (for tests and reports)."""
    out: dict[int, list[str]] = {}
    for s, i in zip(plan.column("shard").to_pylist(), plan.column("sample_id").to_pylist()):
        out.setdefault(int(s), []).append(i)
    return {k: out[k] for k in sorted(out)}


def _actor_pool(ds: Any, actor: type, pool: Any, batch_size: int, kwargs: Mapping[str, Any]) -> Any:
    """``ds.map_batches`` through a pool of ``actor`` sized by ``pool`` (an ActorOptions section)."""
    import ray

    return ds.map_batches(
        actor,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.size),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
        fn_constructor_kwargs={**kwargs, "threads": pool.threads, "num_cpus": pool.num_cpus},
    )


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
        raise ConfigError(
            f"{out_dir} holds another plan; set generate.name to a new name or remove that directory"
        )
    write_plan(plan, plan_path)
    print(plan_summary(plan), flush=True)
    # The real data's side of scoring, shared by every generation of the experiment with the same inputs.
    assets = ScorerAssets.cached(cfg, out_dir.parent / ASSETS_DIR, address=address)

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

        written_path = out_dir / WRITTEN_FILE
        tmp = written_path.with_name(f".{WRITTEN_FILE}.tmp")
        tmp.write_text(json.dumps(sorted(have)))
        tmp.replace(written_path)
        ds = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
        ds = _actor_pool(
            ds,
            SamplerActor,
            gen.sampler,
            1,  # one shard per call: the actor samples it in fixed sub-batches
            {
                "model_dir": str(ref.path),
                "model_id": ref.id,
                "plan_path": str(plan_path),
                "written_path": str(written_path),
                "batch_size": gen.batch_size,
                "device": gen.device,
            },
        )
        ds = _actor_pool(
            ds,
            ScorerActor,
            gen.scorer,
            gen.batch_size,
            {
                "assets_dir": str(assets.directory),
                "filters": gen.filters.model_dump(mode="json"),
                "device": gen.device,
            },
        )
        # A write task needs little CPU; at Ray's default of 1 CPU it waits for a free core, which a 2-CPU node
        # with both actor pools busy does not have until sampling ends: nothing would reach disk before.
        ds.write_parquet(str(table_dir), ray_remote_args={"num_cpus": 0.1})
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
