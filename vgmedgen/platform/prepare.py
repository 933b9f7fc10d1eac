"""``prepare``: a raw dataset directory (or SynthDerm) -> canonical Parquet records.

Ray Data runs the heavy part in parallel: each task takes a chunk of source items (or a range of
SynthDerm indices), decodes, resizes, measures and captions them, and writes one Parquet part
file named by its chunk index, returning only light metadata (id, group, label, errors). The
driver then assigns group-safe splits from that metadata and rewrites each part with its
``split`` column. Everything is written into a temporary directory beside the destination and
renamed into place at the end, so an interrupted run leaves no half dataset that a later job
would read, and the same inputs give the same records.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vgmedgen.platform.config import ExperimentConfig, PrepareConfig
from vgmedgen.platform.records import (
    RECORD_SCHEMA,
    RecordError,
    read_records_manifest,
    records_to_table,
    write_records_manifest,
)
from vgmedgen.platform.runs import records_key
from vgmedgen.platform.splits import assign_splits

__all__ = ["PrepareError", "PrepareSummary", "prepare_records"]

log = logging.getLogger(__name__)

_META_COLUMNS = ("status", "id", "group", "label", "official_split", "phash", "mask_source", "path", "error")


class PrepareError(RuntimeError):
    """The prepare job cannot produce records; the message names the inputs at fault and the fix."""


@dataclass
class PrepareSummary:
    """What ``prepare`` wrote: counts per split and class, lesion masks per split and source, the skipped
    inputs and the time taken.

    ``masks`` is :func:`vgmedgen.platform.datasets.masks.mask_census` of the records (split -> mask
    source or ``"none"`` -> count); empty in summaries written before it existed.
    """

    records_dir: str
    dataset: str
    total: int
    counts: dict[str, dict[str, int]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    reused: bool = False
    config_hash: str = ""
    masks: dict[str, dict[str, int]] = field(default_factory=dict)
    mask_source: str = "dataset"

    def table(self) -> str:
        """A plain-text table of counts per class (rows) and split (columns)."""
        labels = sorted({label for per in self.counts.values() for label in per})
        splits = ["train", "val", "test"]
        width = max([len(x) for x in labels] + [5])
        lines = [f"{'class':<{width}} " + " ".join(f"{s:>7}" for s in splits) + f" {'total':>7}"]
        for label in labels:
            row = [self.counts.get(s, {}).get(label, 0) for s in splits]
            lines.append(f"{label:<{width}} " + " ".join(f"{n:>7}" for n in row) + f" {sum(row):>7}")
        totals = [sum(self.counts.get(s, {}).values()) for s in splits]
        lines.append(f"{'all':<{width}} " + " ".join(f"{n:>7}" for n in totals) + f" {sum(totals):>7}")
        return "\n".join(lines)

    def mask_line(self) -> str:
        """One line: records with a lesion mask, per split and by source."""
        from vgmedgen.platform.datasets.masks import mask_line

        return (
            mask_line(self.masks)
            if self.masks
            else "Lesion masks: not counted (records from an older prepare)"
        )

    def mask_report(self) -> str | None:
        """The warning about records without a mask (what it costs, where masks come from); None if all have one."""
        from vgmedgen.platform.datasets.masks import mask_report

        return mask_report(self.dataset, self.masks, self.mask_source) if self.masks else None


# ---------------------------------------------------------------------------------------------
# The Ray Data task: one chunk -> one Parquet part file + metadata rows
# ---------------------------------------------------------------------------------------------


def _chunk_records(payload: dict[str, Any], data: PrepareConfig) -> tuple[list[dict], list[dict]]:
    """Build the records of one chunk; return (records, error rows)."""
    records, errors = [], []
    if payload["kind"] == "synthderm":
        from vgmedgen.platform.datasets.synthderm import synthderm_record

        for index in range(payload["start"], payload["stop"]):
            records.append(synthderm_record(data.synthderm.seed, index, data.resolution))
        return records, errors

    from vgmedgen.platform.datasets.common import CorruptInputError, SourceItem
    from vgmedgen.platform.datasets.process import process_item

    for raw in payload["items"]:
        item = SourceItem.from_row(raw)
        try:
            rec = process_item(item, data.resolution, data.resize, data.mask_source)
        except CorruptInputError as exc:
            errors.append({"id": item.id, "path": item.source, "error": str(exc)})
            continue
        records.append(rec)
    return records, errors


def _process_chunk(batch: dict[str, Any], data_json: str, stage_dir: str) -> dict[str, list]:
    """Ray Data ``map_batches`` function (batch of one chunk row)."""
    from vgmedgen.platform.datasets.masks import mask_sources_of

    data = PrepareConfig.model_validate_json(data_json)
    out: dict[str, list] = {k: [] for k in _META_COLUMNS}
    for chunk_index, payload_json in zip(batch["chunk"], batch["payload"]):
        records, errors = _chunk_records(json.loads(payload_json), data)
        for rec in records:
            attrs = rec["attributes"]
            official = attrs.get("official_split") if isinstance(attrs, dict) else None
            out["status"].append("ok")
            out["id"].append(rec["id"])
            out["group"].append(rec["group"])
            out["label"].append(rec["label"])
            out["official_split"].append(official or "")
            out["phash"].append(str(attrs.get("phash", "")) if isinstance(attrs, dict) else "")
            out["mask_source"].append(mask_sources_of([rec["mask"]], [attrs])[0] or "")
            out["path"].append(rec["source"])
            out["error"].append("")
            rec["split"] = "train"  # placeholder; the driver assigns the real split
        for err in errors:
            out["status"].append("skipped")
            out["id"].append(err["id"])
            out["group"].append("")
            out["label"].append("")
            out["official_split"].append("")
            out["phash"].append("")
            out["mask_source"].append("")
            out["path"].append(err["path"])
            out["error"].append(err["error"])
        if records:
            table = records_to_table(records)
            pq.write_table(table, Path(stage_dir) / f"stage-{int(chunk_index):06d}.parquet")
    return out


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def _plan_chunks(data: PrepareConfig) -> list[dict[str, Any]]:
    if data.dataset == "synthderm":
        n, step = data.synthderm.num_records, data.items_per_task
        return [{"kind": "synthderm", "start": s, "stop": min(s + step, n)} for s in range(0, n, step)]
    from vgmedgen.platform.datasets.common import read_source_items

    root = data.root
    if root is None and data.reader.csv_file is not None:  # a user CSV: paths are relative to its folder
        root = data.reader.csv_file.parent
    items = read_source_items(data.dataset, root, data.reader)
    if not items:
        raise PrepareError(f"No images found for dataset '{data.dataset}' under {root}")
    rows = [item.to_row() for item in items]
    step = data.items_per_task
    return [{"kind": "items", "items": rows[s : s + step]} for s in range(0, len(rows), step)]


def prepare_records(
    cfg: ExperimentConfig, *, address: str | None = None, fresh: bool = False
) -> PrepareSummary:
    """Prepare the records of ``cfg.data`` under ``<output_root>/records/<name>``.

    Args:
        cfg: the experiment; only ``cfg.data`` and the output root matter here.
        address: Ray cluster address (None: ``RAY_ADDRESS`` or a local instance).
        fresh: rebuild even when records with the same data config already exist.

    Returns:
        The summary (also written as ``summary`` inside ``_manifest.json`` next to the records; its
        leading underscore keeps it out of ``pandas.read_parquet(dir)`` and ``pyarrow.parquet.read_table(dir)``).

    Raises:
        PrepareError: unreadable inputs in strict mode, no images, or nothing usable left.
    """
    from vgmedgen.platform.cluster import connect

    data = cfg.data
    dest = cfg.records_dir
    chash = records_key(data)
    # Records written before 2026-12 carry the manifest as manifest.json: reusing them renames it.
    manifest = None if fresh else read_records_manifest(dest, migrate=True)
    if manifest and manifest.get("config_hash") == chash:
        summary = PrepareSummary(**{**manifest["summary"], "reused": True})
        log.info("Records at %s already match this data config (hash %s); reusing them", dest, chash)
        _warn_masks(summary)
        return summary

    t0 = time.perf_counter()
    chunks = _plan_chunks(data)
    ray = connect(address)
    # Ray Data shows its own progress of the tasks below (one per chunk) on the driver.
    print(
        f"[prepare] {data.dataset}: {len(chunks)} chunks of at most {data.items_per_task} inputs -> {dest}",
        flush=True,
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    stage = tmp / "stage"
    stage.mkdir(parents=True)
    try:
        ds = ray.data.from_items(
            [{"chunk": i, "payload": json.dumps(c)} for i, c in enumerate(chunks)],
            override_num_blocks=len(chunks),
        )
        ds = ds.map_batches(
            _process_chunk,
            batch_size=1,
            fn_kwargs={"data_json": data.model_dump_json(), "stage_dir": str(stage)},
            num_cpus=1,
        )
        meta = ds.take_all()
        print(f"[prepare] splitting and writing {len(meta)} records ...", flush=True)
        summary = _finalise(meta, data, stage, tmp)
        summary.seconds = round(time.perf_counter() - t0, 2)
        summary.records_dir = str(dest)
        summary.config_hash = chash
        write_records_manifest(
            tmp,
            {
                "config_hash": chash,
                "data_config": data.model_dump(mode="json"),
                "record_version": RECORD_SCHEMA.metadata[b"vgmedgen.record_version"].decode(),
                "summary": asdict(summary),
            },
        )
        shutil.rmtree(stage)
        _swap_into_place(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _warn_masks(summary)
    return summary


def _warn_masks(summary: PrepareSummary) -> None:
    """Log the lesion-mask line, and the missing-mask report as a warning (every run, reused ones too)."""
    log.info("%s", summary.mask_line())
    report = summary.mask_report()
    if report:
        log.warning("%s", report)


def _finalise(meta: list[dict], data: PrepareConfig, stage: Path, out_dir: Path) -> PrepareSummary:
    ok = sorted((m for m in meta if m["status"] == "ok"), key=lambda m: m["id"])
    skipped = sorted(
        ({"path": m["path"], "error": m["error"]} for m in meta if m["status"] == "skipped"),
        key=lambda s: s["path"],
    )
    if skipped and data.strict:
        listing = "\n".join(f"  {s['path']}: {s['error']}" for s in skipped[:20])
        raise PrepareError(
            f"{len(skipped)} input file(s) could not be read (data.strict=true, so nothing was written):\n{listing}\n"
            "Fix or remove these files, or set data.strict=false to skip them."
        )
    if not ok:
        raise PrepareError(
            f"None of the {len(meta)} inputs could be read; see the errors above ({skipped[:3]})"
        )
    for s in skipped:
        log.warning("Skipped %s: %s", s["path"], s["error"])

    ids = [m["id"] for m in ok]
    groups = [m["group"] for m in ok]
    if data.dataset == "busi":
        from vgmedgen.platform.datasets.process import group_near_duplicates

        near = group_near_duplicates(ids, [m["phash"] for m in ok], data.near_duplicate_distance)
        groups = [near[i] for i in ids]
    labels = [m["label"] for m in ok]
    official = {m["id"]: m["official_split"] or None for m in ok} if data.split.use_official else None
    fractions = {"train": data.split.train, "val": data.split.val, "test": data.split.test}
    split_of = assign_splits(ids, groups, labels, fractions, data.split.seed, official)
    group_of = dict(zip(ids, groups))

    files = sorted(stage.glob("stage-*.parquet"))
    for n, f in enumerate(files):
        table = pq.read_table(f).cast(RECORD_SCHEMA)
        rid = table.column("id").to_pylist()
        table = table.set_column(
            table.schema.get_field_index("split"),
            RECORD_SCHEMA.field("split"),
            pa.array([split_of[i] for i in rid], pa.string()),
        )
        table = table.set_column(
            table.schema.get_field_index("group"),
            RECORD_SCHEMA.field("group"),
            pa.array([group_of[i] for i in rid], pa.string()),
        )
        table = table.sort_by("id")
        pq.write_table(table, out_dir / f"part-{n:05d}.parquet")

    counts: dict[str, Counter] = {s: Counter() for s in ("train", "val", "test")}
    for m in ok:
        counts[split_of[m["id"]]][m["label"]] += 1
    _check_groups(ids, groups, split_of)
    from vgmedgen.platform.datasets.masks import mask_census

    masks = mask_census([split_of[i] for i in ids], [m["mask_source"] or None for m in ok])
    return PrepareSummary(
        records_dir="",
        dataset=data.dataset,
        total=len(ok),
        counts={s: dict(sorted(c.items())) for s, c in counts.items()},
        skipped=skipped,
        masks=masks,
        mask_source=data.mask_source,
    )


def _check_groups(ids: list[str], groups: list[str], split_of: dict[str, str]) -> None:
    seen: dict[str, str] = {}
    for rid, gid in zip(ids, groups):
        if seen.setdefault(gid, split_of[rid]) != split_of[rid]:
            raise RecordError(f"internal error: group {gid!r} was cut across splits")


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Replace ``dest`` by ``tmp`` with renames only; the old records go only after the new are in place."""
    old = None
    if dest.exists():
        old = dest.parent / f".old-{dest.name}-{uuid.uuid4().hex[:8]}"
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
