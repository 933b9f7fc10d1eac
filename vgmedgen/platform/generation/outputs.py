"""What the generation job derives from its one output table: synthetic records, an image-folder export,
contact sheets and a summary.

The Ray Data job writes a single table (a directory of Parquet files, one row per image keyed by
``sample_id``: the plan's columns, ``image`` and ``mask`` PNG bytes, the scorer's features and scores,
``accepted`` and ``reason``). That single write is what makes the job exactly-once; everything here is a
pure function of it, run by the driver afterwards and safe to run again. Each function streams over the
table's record batches, reading only the columns it needs, so a run of any size never holds all its
images in memory.

Layout written by :func:`write_outputs` under the generation's directory ``<out>``::

    <out>/records/part-00000.parquet    canonical records of the accepted rows (split train, synthetic://)
    <out>/contact_sheets/<class>.png    accepted images first, rejected ones with a red border
    <out>/summary.json                  totals, per class, per reason, per policy, plan, model, throughput
    <out>/imagefolder/<class>/<sample_id>.png   (export: imagefolder) accepted images ...
    <out>/imagefolder/metadata.csv              ... one row per image: file_name, label, seed, prompts, ...
    <out>/masks/<class>/<sample_id>.png         ... their pseudo-masks, outside the image folder

Rows without a label (``swap_grid`` cells, ``prompts_csv`` rows without one) go to the class
:data:`UNLABELLED`, in the records and in the export alike.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.generation.config import GenerateConfig
from vgmedgen.platform.generation.filters import reason_kind
from vgmedgen.platform.images import provenance_fields
from vgmedgen.platform.records import (
    RECORD_SCHEMA,
    SYNTHETIC_SOURCE,
    RecordError,
    decode_png,
    records_to_table,
    write_records_manifest,
)
from vgmedgen.platform.storage import atomic_directory

__all__ = [
    "CONTACT_SHEETS_DIR",
    "IMAGEFOLDER_DIR",
    "MASKS_DIR",
    "METADATA_FILE",
    "PSEUDO_MASK",
    "RECORDS_DIR",
    "SUMMARY_FILE",
    "UNLABELLED",
    "GenerationOutputs",
    "OutputTableError",
    "export_imagefolder",
    "iter_output_batches",
    "summarize_outputs",
    "synthetic_record",
    "write_accepted_records",
    "write_contact_sheets",
    "write_outputs",
    "write_record_batches",
    "write_summary",
]

RECORDS_DIR = "records"
IMAGEFOLDER_DIR = "imagefolder"
MASKS_DIR = "masks"
METADATA_FILE = "metadata.csv"
CONTACT_SHEETS_DIR = "contact_sheets"
SUMMARY_FILE = "summary.json"
#: The class of rows generated without a label: their folder in the export, their ``label`` in the records.
UNLABELLED = "unlabelled"
#: ``attributes.mask_source`` of a synthetic record: the stage-1 segmentor's mask of the generated image.
PSEUDO_MASK = "pseudo-mask"
log = logging.getLogger(__name__)

# Reasons are joined by the scorer with this separator when a row fails several filters.
REASON_SEPARATOR = "; "
# The rejected tiles' border on a contact sheet.
REJECTED_RGB = (220, 20, 20)

# Batches of the output table: small enough that a batch of PNGs stays a few MB, large enough that
# pyarrow's per-batch overhead does not matter.
DEFAULT_BATCH_ROWS = 64
# Scores copied into the records' attributes and the export's metadata (each only when the table has it).
_SCORES = ("confidence", "nn_distance", "lesion_area", "lesion_cx", "lesion_cy")


class OutputTableError(ConfigError):
    """The generation job's output table is missing, incomplete or holds values its outputs cannot take."""


# ---------------------------------------------------------------------------------------------
# Reading the output table
# ---------------------------------------------------------------------------------------------


def _dataset(table_dir: str | Path) -> pads.Dataset:
    table_dir = Path(table_dir)
    # Ray Data names the part files with random uuids; names starting "_" or "." are not data (pyarrow's
    # own discovery skips them too).
    files = sorted(
        p
        for p in table_dir.rglob("*.parquet")
        if not any(part.startswith(("_", ".")) for part in p.relative_to(table_dir).parts)
    )
    if not table_dir.is_dir() or not files:
        raise OutputTableError(
            f"{table_dir} holds no Parquet files, so it is not the output table of a generation run; run "
            "`python jobs/generate.py --config <experiment>.yaml` first, or give the table directory it printed"
        )
    # One schema for all files: a block whose rows were all accepted may carry `reason` as Arrow's null
    # type, which a scan with the first file's schema alone would fail to read (or to promote).
    schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
    return pads.dataset([str(f) for f in files], schema=schema.remove_metadata(), format="parquet")


def iter_output_batches(
    table_dir: str | Path,
    columns: Sequence[str],
    *,
    accepted_only: bool = False,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    optional: Sequence[str] = (),
) -> Iterator[pa.Table]:
    """The output table in batches of at most ``batch_rows`` rows, with only the columns asked for.

    Args:
        table_dir: the directory of Parquet files the generation job wrote.
        columns: columns to read; each must be in the table.
        accepted_only: keep only the rows whose ``accepted`` is true.
        batch_rows: rows per batch (batches never cross a Parquet file, so some are shorter).
        optional: further columns read when the table has them (scores a scorer may not write).

    Raises:
        OutputTableError: no table there, or a required column is missing.
    """
    dataset = _dataset(table_dir)
    names = set(dataset.schema.names)
    missing = [c for c in (*columns, *(["accepted"] if accepted_only else [])) if c not in names]
    if missing:
        raise OutputTableError(
            f"the output table at {table_dir} lacks the columns {missing} (it has {sorted(names)}); it was "
            "written by another version of the generation job: run it again into a new output directory"
        )
    wanted = list(dict.fromkeys([*columns, *(c for c in optional if c in names)]))
    # Read-ahead of one file and two batches: the default (4 files x 16 batches) would hold hundreds of
    # images per file in memory at once, which is what streaming is meant to avoid.
    scanner = dataset.scanner(
        columns=wanted,
        filter=pads.field("accepted") if accepted_only else None,
        batch_size=batch_rows,
        batch_readahead=2,
        fragment_readahead=1,
    )
    for batch in scanner.to_batches():
        if batch.num_rows:
            yield pa.Table.from_batches([batch])


def _class_of(label: str | None) -> str:
    return UNLABELLED if label is None else label


def _path_part(value: str, what: str, fix: str) -> str:
    """``value`` as one path component, or an error naming it: a class folder or a file name must not
    climb out of the export or be hidden (image-folder readers skip dot-names)."""
    if not value or value in (".", "..") or value.startswith(".") or re.search(r"[/\\\x00]", value):
        raise OutputTableError(f"{what} {value!r} cannot be a file or folder name; {fix}")
    return value


# ---------------------------------------------------------------------------------------------
# Synthetic records (one home: the generation job and evaluation's in-process writer both use it)
# ---------------------------------------------------------------------------------------------


def synthetic_record(
    *,
    record_id: str,
    dataset: str,
    label: str,
    image: bytes,
    mask: bytes | None,
    anatomy_text: str,
    style_text: str,
    caption: str,
    source: str,
    attributes: Mapping[str, Any],
) -> dict[str, Any]:
    """One canonical record of a generated image: train split, its own group, flagged synthetic.

    Args:
        record_id: the record's id (also its group: a generated image has no sibling views).
        dataset: the experiment's dataset, so that the records join that dataset's real ones.
        label: the class the image was generated for.
        image: RGB PNG bytes (with provenance, :func:`vgmedgen.platform.images.png_bytes`).
        mask: single-channel 0/255 PNG bytes of its pseudo-mask, or None.
        anatomy_text, style_text, caption: the prompts it was generated from.
        source: ``synthetic://<model>/<which>``; anything else is refused.
        attributes: what the generation knows of the image (seed, source record, ...).

    Returns:
        A dict of :data:`~vgmedgen.platform.records.RECORD_SCHEMA`'s columns (``attributes`` as JSON).

    Raises:
        RecordError: ``source`` is not a ``synthetic://`` source.
    """
    if not source.startswith(SYNTHETIC_SOURCE):
        raise RecordError(f"a synthetic record's source must start with {SYNTHETIC_SOURCE!r}, got {source!r}")
    return {
        "id": record_id,
        "dataset": dataset,
        # Generated rows only ever join a train split (docs/datasets.md, "Synthetic records").
        "split": "train",
        "group": record_id,
        "label": label,
        "image": image,
        "mask": mask,
        "caption": caption,
        "anatomy_text": anatomy_text,
        "style_text": style_text,
        "attributes": json.dumps({"synthetic": True, **attributes}),
        "source": source,
    }


def write_record_batches(
    batches: Iterable[Iterable[Mapping[str, Any]]],
    out_dir: str | Path,
    *,
    manifest: Mapping[str, Any] | None = None,
) -> int:
    """Write record dicts, a batch at a time, as one records directory that appears all at once.

    Each batch is validated (:func:`~vgmedgen.platform.records.records_to_table`) and appended to
    ``part-00000.parquet`` as a row group; ids must be unique across batches too.

    Returns:
        The number of records written.
    """
    out_dir = Path(out_dir)
    seen: set[str] = set()
    rows = 0
    with atomic_directory(out_dir) as tmp:
        with pq.ParquetWriter(tmp / "part-00000.parquet", RECORD_SCHEMA) as writer:
            for batch in batches:
                table = records_to_table(batch)
                ids = table.column("id").to_pylist()
                again = seen.intersection(ids)
                if again:
                    raise RecordError(f"records {sorted(again)[:3]} occur more than once; ids must be unique")
                seen.update(ids)
                if table.num_rows:
                    writer.write_table(table)
                    rows += table.num_rows
        if manifest is not None:
            write_records_manifest(tmp, {**manifest, "rows": rows})
    return rows


def _texts(anatomy: str | None, style: str | None, caption: str | None) -> tuple[str, str, str]:
    """(anatomy_text, style_text, caption) of a request: a caption-only request has no separate parts,
    so those stay empty rather than a guess; without a caption the two parts make one."""
    anatomy_text, style_text = anatomy or "", style or ""
    if caption is None:
        caption = "; ".join(t for t in (anatomy_text, style_text) if t)
    return anatomy_text, style_text, caption


# What the plan says of a row, in the records' attributes and in the export's metadata alike.
_PLAN_COLUMNS = ("policy", "source_id", "model_id", "seed", "anatomy_prompt", "style_prompt", "caption")
_RECORD_COLUMNS = ("sample_id", "label", *_PLAN_COLUMNS, "reference", "image", "mask")


def _records_of(batch: pa.Table, dataset: str) -> Iterator[dict[str, Any]]:
    for row in batch.to_pylist():
        anatomy, style, caption = _texts(row["anatomy_prompt"], row["style_prompt"], row["caption"])
        attributes = {
            "sample_id": row["sample_id"],
            "model_id": row["model_id"],
            "policy": row["policy"],
            "from_record": row["source_id"],
            "seed": row["seed"],
            "mask_source": PSEUDO_MASK if row["mask"] is not None else None,
            "reference": row["reference"],
            **{k: row[k] for k in _SCORES if k in row},
        }
        yield synthetic_record(
            record_id=row["sample_id"],
            dataset=dataset,
            label=_class_of(row["label"]),
            image=row["image"],
            mask=row["mask"],
            anatomy_text=anatomy,
            style_text=style,
            caption=caption,
            source=f"{SYNTHETIC_SOURCE}{row['model_id']}/{row['sample_id']}",
            attributes={k: v for k, v in attributes.items() if v is not None},
        )


def write_accepted_records(
    table_dir: str | Path, out_dir: str | Path, *, dataset: str, batch_rows: int = DEFAULT_BATCH_ROWS
) -> Path:
    """Canonical records of the accepted rows of a generation's output table (written atomically).

    Every record is in the train split with ``source = synthetic://<model_id>/<sample_id>`` and id (and
    group) ``sample_id``; its image and mask bytes are the table's own (they already carry provenance).
    ``attributes`` holds ``synthetic: true``, ``sample_id``, ``model_id``, ``policy``, ``from_record``
    (the real train record whose prompts were used), ``seed``, ``mask_source: "pseudo-mask"``, the
    reference image if any, and the scores the table has. A row without a label is labelled
    :data:`UNLABELLED`; a caption-only request keeps empty ``anatomy_text`` and ``style_text``.

    These are the rows the downstream benchmark adds to a classifier's train split
    (``ClassifierSpec.extra_train``); the train job refuses them for VG-MedGen itself.

    Args:
        table_dir: the output table (a directory of Parquet files).
        out_dir: the records directory to write (replaced as a whole).
        dataset: the experiment's dataset (``data.dataset``).
        batch_rows: rows read, validated and written at a time.

    Returns:
        ``out_dir``.
    """
    batches = iter_output_batches(
        table_dir, _RECORD_COLUMNS, accepted_only=True, optional=_SCORES, batch_rows=batch_rows
    )
    write_record_batches(
        (_records_of(batch, dataset) for batch in batches),
        out_dir,
        manifest={"synthetic": True, "dataset": dataset, "from_table": Path(table_dir).name},
    )
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------
# export: imagefolder
# ---------------------------------------------------------------------------------------------

_EXPORT_COLUMNS = ("sample_id", "label", "accepted", "reason", *_PLAN_COLUMNS, "image", "mask")


def export_imagefolder(
    table_dir: str | Path,
    out_dir: str | Path,
    *,
    include_rejected: bool = False,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Path:
    """Export the images as an image folder that torchvision and Hugging Face datasets read as it is.

    Writes ``<out_dir>/imagefolder/<class>/<sample_id>.png`` (the table's PNG bytes, provenance kept),
    ``<out_dir>/imagefolder/metadata.csv`` and the pseudo-masks as ``<out_dir>/masks/<class>/<sample_id>.png``.
    The masks sit outside ``imagefolder/`` because ``torchvision.datasets.ImageFolder`` takes every
    sub-folder of its root as a class and every image below it as a sample. ``metadata.csv`` is the
    Hugging Face image-folder format: ``file_name`` relative to it, then ``label``, ``sample_id``,
    ``accepted``, ``reason``, ``policy``, ``source_id``, ``model_id``, ``seed``, the prompts, the scores the
    table has and ``mask_path`` (relative to ``imagefolder/``, empty without a mask). ImageFolder ignores
    the file (it reads only folders); ``datasets.load_dataset("imagefolder", data_dir=...)`` reads its
    columns, and, because a metadata file is present, takes ``label`` from it rather than from the
    folder names (a string column; ``.class_encode_column("label")`` makes it a ClassLabel).

    Rows without a label go to the folder :data:`UNLABELLED`. Class names that cannot be folder names
    (empty, with a slash, starting with a dot) raise. A class named ``train``, ``test`` or ``validation``
    would make Hugging Face read the folder as a split of that name.

    Args:
        table_dir: the output table.
        out_dir: the generation's output directory; ``imagefolder/`` and ``masks/`` are replaced there,
            each atomically (``imagefolder/`` last, so that it appears only once the masks are complete).
        include_rejected: also export the rejected rows (``accepted`` false in the metadata); by default
            only the accepted ones, so that a reader training on the folder gets what passed the filters.
        batch_rows: rows read at a time.

    Returns:
        The ``imagefolder`` directory.
    """
    out_dir = Path(out_dir)
    images_dir = out_dir / IMAGEFOLDER_DIR
    batches = iter_output_batches(
        table_dir,
        _EXPORT_COLUMNS,
        accepted_only=not include_rejected,
        optional=_SCORES,
        batch_rows=batch_rows,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    writer: pacsv.CSVWriter | None = None
    fix = "relabel those rows (a class is a folder name) or export without `export: imagefolder`"
    # The image folder is renamed into place last: when it exists, its masks are complete too.
    with atomic_directory(images_dir) as images_tmp, atomic_directory(out_dir / MASKS_DIR) as masks_tmp:
        try:
            for batch in batches:
                file_names, mask_paths = [], []
                for sample_id, label, image, mask in zip(
                    *(batch.column(c).to_pylist() for c in ("sample_id", "label", "image", "mask"))
                ):
                    klass = _path_part(_class_of(label), "class", fix)
                    name = _path_part(f"{sample_id}.png", "sample_id", "sample ids must be plain names")
                    (images_tmp / klass).mkdir(exist_ok=True)
                    (images_tmp / klass / name).write_bytes(image)
                    file_names.append(f"{klass}/{name}")
                    if mask is None:
                        mask_paths.append(None)
                        continue
                    (masks_tmp / klass).mkdir(exist_ok=True)
                    (masks_tmp / klass / name).write_bytes(mask)
                    mask_paths.append(f"../{MASKS_DIR}/{klass}/{name}")
                meta = batch.drop_columns(["image", "mask"])
                labels = [_class_of(v) for v in meta.column("label").to_pylist()]
                meta = meta.set_column(
                    meta.schema.get_field_index("label"), "label", pa.array(labels, pa.string())
                )
                meta = meta.add_column(0, "file_name", pa.array(file_names, pa.string()))
                meta = meta.append_column("mask_path", pa.array(mask_paths, pa.string()))
                if writer is None:
                    schema = meta.schema
                    writer = pacsv.CSVWriter(images_tmp / METADATA_FILE, schema)
                writer.write_table(meta.cast(schema))
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise OutputTableError(
                f"the output table at {table_dir} has no {'rows' if include_rejected else 'accepted rows'} to "
                "export; loosen generate.filters or generate more images"
            )
    return images_dir


# ---------------------------------------------------------------------------------------------
# Contact sheets
# ---------------------------------------------------------------------------------------------


@dataclass
class _Sheet:
    """The tiles of one class kept while streaming: the smallest sample ids, so the choice does not
    depend on how Ray split the table into files."""

    accepted: int = 0
    rejected: int = 0
    model_ids: set[str] | None = None
    tiles: dict[bool, list[tuple[str, bytes]]] | None = None

    def add(self, sample_id: str, accepted: bool, image: bytes, model_id: str | None, cap: int) -> None:
        if self.tiles is None:
            self.tiles, self.model_ids = {True: [], False: []}, set()
        self.accepted += accepted
        self.rejected += not accepted
        if model_id is not None:
            self.model_ids.add(model_id)
        kept = self.tiles[accepted]
        kept.append((sample_id, image))
        if len(kept) > 2 * cap:  # trim now and then: memory stays O(cap) PNGs per class
            kept.sort()
            del kept[cap:]

    def chosen(self, cap: int) -> list[tuple[str, bytes, bool]]:
        accepted = sorted(self.tiles[True])[:cap]
        rejected = sorted(self.tiles[False])[: cap - len(accepted)]
        return [(s, b, True) for s, b in accepted] + [(s, b, False) for s, b in rejected]


def _tile(png: bytes, rejected: bool) -> np.ndarray:
    """A tile as (3, H, W) uint8; a rejected one framed in red, inside its own pixels so that the frame
    cannot be taken for the neighbour's."""
    array = decode_png(png).copy()  # (H, W, 3)
    if rejected:
        h, w = array.shape[:2]
        b = max(1, min(h, w) // 16)
        for region in (array[:b], array[-b:], array[:, :b], array[:, -b:]):
            region[...] = REJECTED_RGB
    return array.transpose(2, 0, 1)


def write_contact_sheets(
    table_dir: str | Path,
    out_dir: str | Path,
    *,
    tiles: int = 64,
    plan: str | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> dict[str, Path]:
    """One PNG grid per class: accepted images first, then rejected ones framed in red, at most ``tiles``.

    Within each group the tiles are the smallest sample ids, so the same table always gives the same
    sheets. The band above the grid says the class, how many images were accepted and rejected and how
    many are shown; the PNG's provenance (:func:`vgmedgen.platform.images.provenance_fields`) marks it
    synthetic and records the model, the plan, the counts and the shown sample ids in tile order.

    Args:
        table_dir: the output table.
        out_dir: the directory of the sheets (``<class>.png``), replaced atomically.
        tiles: the most tiles per sheet.
        plan: the plan's id, for the provenance.
        batch_rows: rows read at a time.

    Returns:
        class -> sheet path.
    """
    import torch

    from vgmedgen.platform.visualize import save_grid

    if tiles < 1:
        raise ValueError(f"a contact sheet needs at least 1 tile, got tiles={tiles}")
    sheets: dict[str, _Sheet] = defaultdict(_Sheet)
    columns = ("sample_id", "label", "accepted", "image")
    for batch in iter_output_batches(table_dir, columns, optional=("model_id",), batch_rows=batch_rows):
        model_ids = batch.column("model_id").to_pylist() if "model_id" in batch.column_names else None
        for i, (sample_id, label, accepted, image) in enumerate(
            zip(*(batch.column(c).to_pylist() for c in columns))
        ):
            sheets[_class_of(label)].add(sample_id, bool(accepted), image, model_ids and model_ids[i], tiles)
    fix = "relabel those rows (a class names its contact sheet)"
    paths: dict[str, Path] = {}
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        for klass in sorted(sheets):
            sheet = sheets[klass]
            chosen = sheet.chosen(tiles)
            arrays = [_tile(png, not ok) for _, png, ok in chosen]
            if len({a.shape for a in arrays}) != 1:
                raise OutputTableError(
                    f"the images of class {klass!r} differ in size ({sorted({a.shape for a in arrays})[:3]}); "
                    "a contact sheet needs one size: generate them with one model version"
                )
            shown_ok = sum(ok for *_, ok in chosen)
            title = (
                f"{klass}: {sheet.accepted} accepted, {sheet.rejected} rejected (red border); "
                f"showing {shown_ok} accepted + {len(chosen) - shown_ok} rejected"
            )
            provenance = provenance_fields(
                kind="contact-sheet",
                model_version=",".join(sorted(sheet.model_ids)) or None,
                plan=plan,
                label=klass,
                accepted=sheet.accepted,
                rejected=sheet.rejected,
                sample_ids=[s for s, *_ in chosen],
            )
            images = torch.from_numpy(np.stack(arrays)).float() / 255  # (N, 3, H, W)
            size = arrays[0].shape[1]
            name = _path_part(f"{klass}.png", "class", fix)
            paths[klass] = out_dir / name
            save_grid(
                images,
                tmp / name,
                ncol=min(8, len(arrays)),
                scale=max(1, 96 // size),  # small images upscaled to ~100 px tiles, large ones as they are
                provenance=provenance,
                title=title,
            )
    return paths


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def summarize_outputs(
    table_dir: str | Path,
    *,
    plan: str | None = None,
    throughput: Mapping[str, Any] | None = None,
    batch_rows: int = 4096,
) -> dict[str, Any]:
    """Counts of a generation's output table (reads no image).

    Returns:
        ``{"plan", "model_ids", "rows", "accepted", "rejected", "acceptance_rate", "classes": {class:
        {"accepted", "rejected"}}, "policies": {policy: {...}}, "reasons": {filter: rows}, "class_reasons":
        {class: {filter: rows}}, "throughput"}``. Reasons count by the filter that gave them
        (:func:`~vgmedgen.platform.generation.filters.reason_kind`: ``confidence``, ``memorised``, a
        property name), not by their text, which holds each row's numbers. A row rejected for several
        reasons counts once under each; ``throughput`` is the caller's
        (images per second, seconds, actors, ...), copied as given.
    """
    classes: dict[str, Counter] = defaultdict(Counter)
    policies: dict[str, Counter] = defaultdict(Counter)
    reasons: Counter = Counter()
    class_reasons: dict[str, Counter] = defaultdict(Counter)
    model_ids: set[str] = set()
    columns = ("label", "accepted", "reason", "policy", "model_id")
    for batch in iter_output_batches(table_dir, columns, batch_rows=batch_rows):
        for label, accepted, reason, policy, model_id in zip(*(batch.column(c).to_pylist() for c in columns)):
            key = "accepted" if accepted else "rejected"
            classes[_class_of(label)][key] += 1
            policies[policy][key] += 1
            model_ids.add(model_id)
            if not accepted:
                kinds = [
                    reason_kind(r.strip())
                    for r in (reason or "unspecified").split(REASON_SEPARATOR)
                    if r.strip()
                ]
                reasons.update(kinds)
                class_reasons[_class_of(label)].update(kinds)
    accepted = sum(c["accepted"] for c in classes.values())
    rows = accepted + sum(c["rejected"] for c in classes.values())

    def counts(table: Mapping[str, Counter]) -> dict[str, dict[str, int]]:
        return {k: {"accepted": v["accepted"], "rejected": v["rejected"]} for k, v in sorted(table.items())}

    return {
        "plan": plan,
        "model_ids": sorted(m for m in model_ids if m is not None),
        "rows": rows,
        "accepted": accepted,
        "rejected": rows - accepted,
        "acceptance_rate": accepted / rows if rows else None,
        "classes": counts(classes),
        "policies": counts(policies),
        "reasons": dict(sorted(reasons.items())),
        "class_reasons": {c: dict(sorted(v.items())) for c, v in sorted(class_reasons.items())},
        "throughput": dict(throughput or {}),
    }


def write_summary(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``summary`` as indented JSON; readers see the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Everything the driver writes after the table
# ---------------------------------------------------------------------------------------------


@dataclass
class GenerationOutputs:
    """Where :func:`write_outputs` put each output."""

    records: Path
    contact_sheets: dict[str, Path]
    summary: Path
    imagefolder: Path | None = None


def write_outputs(
    table_dir: str | Path,
    out_dir: str | Path,
    config: GenerateConfig,
    *,
    dataset: str,
    plan: str | None = None,
    throughput: Mapping[str, Any] | None = None,
) -> GenerationOutputs:
    """Derive every output of a generation from its table: records, contact sheets, the export, summary.

    Args:
        table_dir: the output table the Ray Data job wrote.
        out_dir: the generation's output directory (see the module docstring for its layout).
        config: the experiment's ``generate`` section (``export``, ``contact_sheet_tiles``).
        dataset: the experiment's dataset (``data.dataset``), written into the records.
        plan: the plan's id (the summary and the sheets' provenance name it).
        throughput: the job's timings and rates, copied into the summary.

    Returns:
        The paths written. The summary is written last: its presence says the outputs are complete.
    """
    out_dir = Path(out_dir)
    summary = summarize_outputs(table_dir, plan=plan, throughput=throughput)  # no images: quick, and first
    records = write_accepted_records(table_dir, out_dir / RECORDS_DIR, dataset=dataset)
    sheets = write_contact_sheets(
        table_dir, out_dir / CONTACT_SHEETS_DIR, tiles=config.contact_sheet_tiles, plan=plan
    )
    folder = None
    if config.export == "imagefolder":
        if summary["accepted"]:
            folder = export_imagefolder(table_dir, out_dir)
        else:
            log.warning("export: imagefolder skipped: no image was accepted (see %s)", out_dir / SUMMARY_FILE)
    summary["outputs"] = {
        "records": RECORDS_DIR,
        "contact_sheets": CONTACT_SHEETS_DIR,
        "imagefolder": IMAGEFOLDER_DIR if folder is not None else None,
        "masks": MASKS_DIR if folder is not None else None,
    }
    path = write_summary(summary, out_dir / SUMMARY_FILE)
    return GenerationOutputs(records, sheets, path, folder)
