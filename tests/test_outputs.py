"""The outputs derived from a generation's table: synthetic records, the image-folder export (read by
torchvision and Hugging Face datasets), contact sheets, the summary; and the train job's refusal of
synthetic rows. The table is built here with the generation job's columns; no Ray."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vgmedgen.model.configbase import ConfigError
from vgmedgen.model.domain_nets import domain_net_config
from vgmedgen.platform.config import load_experiment
from vgmedgen.platform.datasets.synthderm import synthderm_record
from vgmedgen.platform.generation.config import GenerateConfig
from vgmedgen.platform.generation.outputs import (
    PSEUDO_MASK,
    REJECTED_RGB,
    UNLABELLED,
    OutputTableError,
    export_imagefolder,
    summarize_outputs,
    write_accepted_records,
    write_contact_sheets,
    write_outputs,
)
from vgmedgen.platform.generation.request import REQUEST_SCHEMA
from vgmedgen.platform.images import provenance_fields, read_provenance
from vgmedgen.platform.records import (
    SYNTHETIC_SOURCE,
    decode_png,
    encode_png,
    read_records,
    records_to_table,
    write_records_manifest,
)
from vgmedgen.platform.runs import records_key
from vgmedgen.platform.training.classify import ClassifierSpec, ClassifierTask, HeadSpec, load_labelled
from vgmedgen.platform.training.config import StageTrainConfig
from vgmedgen.platform.training.driver import train_experiment
from vgmedgen.platform.training.runner import SyntheticRecordsError, check_real_records

REPO = Path(__file__).resolve().parents[1]
SIZE = 16
MODEL_ID = "3f" * 32
LABELS = ("mel", "nv")

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("policy", pa.string()),
        pa.field("label", pa.string()),
        pa.field("source_id", pa.string()),
        pa.field("model_id", pa.string()),
        pa.field("shard", pa.int64()),
        *REQUEST_SCHEMA,
        pa.field("image", pa.binary()),
        pa.field("mask", pa.binary()),
        pa.field("domain_features", pa.list_(pa.float32())),
        pa.field("inception_features", pa.list_(pa.float32())),
        pa.field("confidence", pa.float64()),
        pa.field("nn_distance", pa.float64()),
        pa.field("lesion_area", pa.float64()),
        pa.field("lesion_cx", pa.float64()),
        pa.field("lesion_cy", pa.float64()),
        pa.field("lesion_rgb", pa.list_(pa.float64())),
        pa.field("skin_rgb", pa.list_(pa.float64())),
        pa.field("accepted", pa.bool_()),
        pa.field("reason", pa.string()),
    ]
)
REASONS = (
    "memorised (nn_distance below the 5th percentile)",
    "confidence below 0.5",
    "lesion_area outside [0.01, 0.6]",
)


def output_rows(n: int = 15, seed: int = 0) -> list[dict]:
    """Rows as the generation job writes them: two classes from records, a few unlabelled swap-grid cells
    (one caption-only request), some rejected for one or two reasons."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = None if i % 5 == 4 else LABELS[i % 2]
        accepted = bool(rng.random() < 0.6)
        reason = (
            None if accepted else "; ".join(rng.choice(REASONS, size=int(rng.integers(1, 3)), replace=False))
        )
        anatomy, style, caption = f"a {i} mm lesion, centred", f"pink skin, dermoscopy {i}", None
        if i == 9:
            anatomy, style, caption = None, None, "one whole caption: a small dark lesion on pale skin"
        sample_id = f"plan7-{i % 3:03d}-{i:05d}"
        image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        mask = (rng.random((SIZE, SIZE)) > 0.7).astype(np.uint8) * 255
        fields = provenance_fields(
            model_version=MODEL_ID, seed=1000 + i, anatomy_prompt=anatomy, style_prompt=style
        )
        rows.append(
            {
                "sample_id": sample_id,
                "policy": "swap_grid" if label is None else "balance",
                "label": label,
                "source_id": None if label is None else f"synthderm-0-{i:06d}",
                "model_id": MODEL_ID,
                "shard": i % 3,
                "anatomy_prompt": anatomy,
                "style_prompt": style,
                "caption": caption,
                "reference": None,
                "seed": 1000 + i,
                "n": 1,
                "num_steps": 20,
                "guidance_anatomy": 4.5,
                "guidance_style": 4.5,
                "image": encode_png(image, {**fields, "kind": "image"}),
                "mask": encode_png(mask, {**fields, "kind": "pseudo-mask"}),
                "domain_features": rng.standard_normal(8).astype(np.float32).tolist(),
                "inception_features": None,
                "confidence": None if label is None else float(rng.random()),
                "nn_distance": float(rng.random()),
                "lesion_area": float(mask.mean() / 255),
                "lesion_cx": 0.5,
                "lesion_cy": 0.5,
                "lesion_rgb": [120.0, 60.0, 50.0],
                "skin_rgb": [200.0, 150.0, 140.0],
                "accepted": accepted,
                "reason": reason,
            }
        )
    return rows


def write_output_table(directory: Path, rows: list[dict], files: int = 3, seed: int = 0) -> Path:
    """The rows shuffled over ``files`` Parquet files with random names, as Ray Data writes them."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    directory.mkdir(parents=True)
    for k, part in enumerate(np.array_split(order, files)):
        table = pa.Table.from_pylist([rows[i] for i in part], schema=OUTPUT_SCHEMA)
        pq.write_table(table, directory / f"{rng.integers(2**63):016x}_{k:06d}_000000.parquet")
    return directory


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> tuple[Path, list[dict]]:
    rows = output_rows()
    assert 0 < sum(r["accepted"] for r in rows) < len(rows)  # the fixture exercises both kinds
    return write_output_table(tmp_path_factory.mktemp("gen") / "table", rows), rows


def real_records(n: int) -> list[dict]:
    """SynthDerm records at SIZE, a quarter of the lesions (both views of one together) in val."""
    rows = [synthderm_record(0, i, SIZE) for i in range(n)]
    return [{**r, "split": "val" if int(r["group"].rsplit("-", 1)[1]) % 4 == 3 else "train"} for r in rows]


def _class(row: dict) -> str:
    return row["label"] or UNLABELLED


# ---------------------------------------------------------------------------------------------
# Synthetic records
# ---------------------------------------------------------------------------------------------


def test_records_hold_the_accepted_rows_flagged_synthetic_and_feed_a_classifier(
    table, tmp_path: Path
) -> None:
    table_dir, rows = table
    accepted = {r["sample_id"]: r for r in rows if r["accepted"]}
    out = write_accepted_records(table_dir, tmp_path / "records", dataset="synthderm", batch_rows=3)
    # streamed: several batches became several row groups of the one part file
    assert pq.ParquetFile(out / "part-00000.parquet").num_row_groups > 1
    records = read_records(out)  # validated against the canonical schema
    assert sorted(records.column("id").to_pylist()) == sorted(accepted)
    for rec in records.to_pylist():
        row = accepted[rec["id"]]
        attrs = json.loads(rec["attributes"])
        assert rec["split"] == "train" and rec["dataset"] == "synthderm" and rec["group"] == rec["id"]
        assert rec["source"] == f"{SYNTHETIC_SOURCE}{MODEL_ID}/{rec['id']}"
        assert rec["label"] == _class(row)
        assert rec["image"] == row["image"] and rec["mask"] == row["mask"]  # the provenance-carrying bytes
        assert (
            attrs["synthetic"] is True and attrs["sample_id"] == rec["id"] and attrs["model_id"] == MODEL_ID
        )
        assert attrs["policy"] == row["policy"] and attrs["seed"] == row["seed"]
        assert attrs.get("from_record") == row["source_id"] and attrs["mask_source"] == PSEUDO_MASK
        assert attrs["nn_distance"] == row["nn_distance"]
        if row["caption"] is None:
            assert (rec["anatomy_text"], rec["style_text"]) == (row["anatomy_prompt"], row["style_prompt"])
            assert rec["caption"] == f"{row['anatomy_prompt']}; {row['style_prompt']}"
        else:  # caption-only request: no separate parts are invented
            assert rec["caption"] == row["caption"] and rec["anatomy_text"] == rec["style_text"] == ""
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == len(accepted) and manifest["synthetic"] is True

    # the classifier's extra_train loader takes them (it refuses anything not flagged synthetic)
    heads = (HeadSpec(name="label", classes=LABELS, source="label"),)
    syn = load_labelled(out, "train", heads, synthetic_only=True)
    assert bool(syn.synthetic.all()) and len(syn) == len(accepted) and bool(syn.has_mask.all())
    labelled = [accepted[i]["label"] for i in syn.ids]
    assert [
        LABELS[t] if t >= 0 else None for t in syn.targets[:, 0].tolist()
    ] == labelled  # unlabelled: ignored

    real = tmp_path / "real"
    real.mkdir()
    pq.write_table(records_to_table(real_records(16)), real / "part-00000.parquet")
    with pytest.raises(ConfigError, match="never enter val or test"):  # real rows passed as synthetic
        load_labelled(real, "train", heads, synthetic_only=True)
    spec = ClassifierSpec(
        net=domain_net_config("tiny", num_classes=len(LABELS), input_size=SIZE),
        heads=heads,
        records_dir=real,
        extra_train=(out,),
        train=StageTrainConfig(steps=1),
    )
    task = ClassifierTask(spec, torch.device("cpu"))
    assert int(task.train_data.synthetic.sum()) == len(accepted) and not bool(task.val_data.synthetic.any())


def test_a_table_without_the_job_columns_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputTableError, match="holds no Parquet files"):
        write_accepted_records(tmp_path / "nothing", tmp_path / "out", dataset="synthderm")
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"sample_id": ["a"], "accepted": [True]}), bad / "x.parquet")
    with pytest.raises(OutputTableError, match=r"lacks the columns \['label'"):
        write_accepted_records(bad, tmp_path / "out", dataset="synthderm")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_part_files_whose_all_null_columns_have_the_null_type_read_as_one_table(tmp_path: Path) -> None:
    """A Ray block whose rows were all accepted can carry ``reason`` as Arrow's null type; the files are
    read with one unified schema whatever their order."""
    rows = output_rows(8)
    for r, ok in zip(rows, [True] * 4 + [False] * 4):
        r["accepted"], r["reason"] = ok, None if ok else "confidence below 0.5"
    table_dir = tmp_path / "table"
    table_dir.mkdir()
    first = pa.Table.from_pylist(rows[:4], schema=OUTPUT_SCHEMA)
    first = first.set_column(first.schema.get_field_index("reason"), "reason", pa.nulls(4))
    assert first.schema.field("reason").type == pa.null()
    pq.write_table(first, table_dir / "0a_000000_000000.parquet")
    pq.write_table(
        pa.Table.from_pylist(rows[4:], schema=OUTPUT_SCHEMA), table_dir / "0b_000001_000000.parquet"
    )
    leftover = table_dir / ".0c.tmp"  # a writer's leftover, not data
    leftover.mkdir()
    pq.write_table(pa.table({"x": [1]}), leftover / "part.parquet")
    summary = summarize_outputs(table_dir)
    assert (summary["accepted"], summary["rejected"], summary["reasons"]) == (
        4,
        4,
        {"confidence": 4},
    )
    assert (
        read_records(write_accepted_records(table_dir, tmp_path / "rec", dataset="synthderm")).num_rows == 4
    )


# ---------------------------------------------------------------------------------------------
# export: imagefolder
# ---------------------------------------------------------------------------------------------


def test_imagefolder_export_reads_with_torchvision_and_hugging_face(
    table, tmp_path: Path, monkeypatch
) -> None:
    # The libraries must read the folder from disk alone: no hub, no network.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    from torchvision.datasets import ImageFolder

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    table_dir, rows = table
    accepted = [r for r in rows if r["accepted"]]
    root = export_imagefolder(table_dir, tmp_path, batch_rows=4)
    assert root == tmp_path / "imagefolder"
    per_class = Counter(_class(r) for r in accepted)

    folder = ImageFolder(str(root))
    assert folder.classes == sorted(per_class)  # metadata.csv and the masks are not classes
    assert len(folder) == len(accepted)
    assert {c: folder.targets.count(folder.class_to_idx[c]) for c in folder.classes} == per_class
    path, target = folder.samples[0]
    assert folder.classes[target] == Path(path).parent.name and folder[0][0].size == (SIZE, SIZE)
    assert read_provenance(path)["synthetic"] == "true"  # the exported files still say what they are

    hf = datasets.load_dataset(
        "imagefolder", data_dir=str(root), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert len(hf) == len(accepted)
    assert {"image", "label", "sample_id", "seed", "accepted", "anatomy_prompt", "mask_path"} <= set(
        hf.column_names
    )
    by_id = {r["sample_id"]: r for r in accepted}
    for item in hf:
        row = by_id[item["sample_id"]]
        assert item["label"] == _class(row) and item["seed"] == row["seed"] and item["accepted"] is True
        assert item["image"].size == (SIZE, SIZE)
        assert np.array_equal(np.asarray(item["image"].convert("RGB")), decode_png(row["image"]))
        assert (root / item["mask_path"]).read_bytes() == row["mask"]
    assert Counter(hf["label"]) == per_class

    # rejected rows too, when asked: marked in the metadata
    everything = export_imagefolder(table_dir, tmp_path / "all", include_rejected=True)
    with open(everything / "metadata.csv", newline="") as f:
        meta = list(csv.DictReader(f))
    assert len(meta) == len(rows) == len(ImageFolder(str(everything)))
    reasons = {m["sample_id"]: (m["accepted"], m["reason"]) for m in meta}
    assert reasons == {r["sample_id"]: (str(r["accepted"]).lower(), r["reason"] or "") for r in rows}


def test_imagefolder_refuses_a_class_that_is_no_folder_name(tmp_path: Path) -> None:
    rows = output_rows(4)
    for r in rows:
        r["accepted"] = True
    rows[1]["label"] = "../escape"
    table_dir = write_output_table(tmp_path / "table", rows, files=1)
    with pytest.raises(
        OutputTableError, match=r"class '\.\./escape' cannot be a file or folder name; relabel"
    ):
        export_imagefolder(table_dir, tmp_path / "out")
    assert not (tmp_path / "out" / "imagefolder").exists() and not (tmp_path / "out" / "masks").exists()


# ---------------------------------------------------------------------------------------------
# Contact sheets and summary
# ---------------------------------------------------------------------------------------------


def _sheet_tiles(path: Path, count: int) -> tuple[list[np.ndarray], dict[str, str]]:
    """The tiles of a sheet (top-left pixel block of each), undoing save_grid's layout: padding 2,
    nearest upscaling, the title band on top."""
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
        provenance = read_provenance(path)
    scale, ncol = max(1, 96 // SIZE), min(8, count)
    nrow = -(-count // ncol)
    assert pixels.shape[1] == (ncol * (SIZE + 2) + 2) * scale
    band = pixels.shape[0] - (nrow * (SIZE + 2) + 2) * scale
    assert band > 0  # the title
    tiles = []
    for k in range(count):
        x0, y0 = (2 + (k % ncol) * (SIZE + 2)) * scale, band + (2 + (k // ncol) * (SIZE + 2)) * scale
        tiles.append(
            pixels[y0 : y0 + SIZE * scale : scale, x0 : x0 + SIZE * scale : scale]
        )  # (SIZE, SIZE, 3)
    return tiles, provenance


def test_contact_sheets_put_accepted_first_and_frame_the_rejected(table, tmp_path: Path) -> None:
    table_dir, rows = table
    cap = 3
    sheets = write_contact_sheets(table_dir, tmp_path / "sheets", tiles=cap, plan="plan7")
    by_class: dict[str, list[dict]] = {}
    for r in rows:
        by_class.setdefault(_class(r), []).append(r)
    assert set(sheets) == set(by_class) and all(p.is_file() for p in sheets.values())
    for klass, members in by_class.items():
        ok = sorted(r["sample_id"] for r in members if r["accepted"])[:cap]
        rejected = sorted(r["sample_id"] for r in members if not r["accepted"])[: cap - len(ok)]
        shown = ok + rejected
        tiles, provenance = _sheet_tiles(sheets[klass], len(shown))
        assert provenance["synthetic"] == "true" and provenance["kind"] == "contact-sheet"
        assert provenance["plan"] == "plan7" and provenance["model_version"] == MODEL_ID
        assert json.loads(provenance["sample_ids"]) == shown
        assert int(provenance["accepted"]) == sum(r["accepted"] for r in members)
        assert int(provenance["rejected"]) == sum(not r["accepted"] for r in members)
        images = {r["sample_id"]: decode_png(r["image"]) for r in members}
        for sample_id, tile in zip(shown, tiles):
            if sample_id in ok:
                assert np.array_equal(tile, images[sample_id])
            else:  # framed in red, the inside untouched
                assert (tile[0] == REJECTED_RGB).all() and (tile[:, -1] == REJECTED_RGB).all()
                assert np.array_equal(tile[4:-4, 4:-4], images[sample_id][4:-4, 4:-4])


def test_summary_counts_and_write_outputs(table, tmp_path: Path) -> None:
    table_dir, rows = table
    summary = summarize_outputs(table_dir, plan="plan7", throughput={"images_per_s": 12.5, "seconds": 3.0})
    accepted = sum(r["accepted"] for r in rows)
    assert (summary["rows"], summary["accepted"], summary["rejected"]) == (
        len(rows),
        accepted,
        len(rows) - accepted,
    )
    assert summary["plan"] == "plan7" and summary["model_ids"] == [MODEL_ID]
    assert summary["throughput"] == {"images_per_s": 12.5, "seconds": 3.0}
    for klass in {_class(r) for r in rows}:
        members = [r for r in rows if _class(r) == klass]
        assert summary["classes"][klass] == {
            "accepted": sum(r["accepted"] for r in members),
            "rejected": sum(not r["accepted"] for r in members),
        }
    reasons = Counter(part.split(" ")[0] for r in rows if r["reason"] for part in r["reason"].split("; "))
    assert summary["reasons"] == dict(reasons) and len(reasons) > 1
    assert set(summary["reasons"]) == {"memorised", "confidence", "lesion_area"}
    per_class = {
        k: sum(v.get(kind, 0) for v in summary["class_reasons"].values()) for kind in reasons for k in [kind]
    }
    assert per_class == dict(reasons)
    assert sum(v["accepted"] for v in summary["policies"].values()) == accepted

    config = GenerateConfig(export="imagefolder", contact_sheet_tiles=2)
    done = write_outputs(table_dir, tmp_path / "gen", config, dataset="synthderm", plan="plan7")
    written = json.loads(done.summary.read_text())
    assert written["outputs"]["imagefolder"] == "imagefolder" and written["accepted"] == accepted
    assert done.imagefolder is not None and (done.imagefolder / "metadata.csv").is_file()
    assert (tmp_path / "gen" / "masks").is_dir() and read_records(done.records).num_rows == accepted
    assert set(done.contact_sheets) == {_class(r) for r in rows}
    with pytest.raises(ConfigError, match="generate.contact_sheet_tiles"):
        load_experiment(None, ["generate.contact_sheet_tiles=0"])


# ---------------------------------------------------------------------------------------------
# The train job refuses synthetic rows for VG-MedGen itself
# ---------------------------------------------------------------------------------------------


def test_train_job_refuses_records_with_synthetic_rows(table, tmp_path: Path) -> None:
    table_dir, rows = table
    cfg = load_experiment(
        REPO / "configs/tiny.yaml",
        [f"output_root={tmp_path / 'root'}", "train.scaling.num_workers=0", "tracking.enabled=false"],
    )
    assert cfg.data.resolution == SIZE
    real = real_records(10)
    synthetic = read_records(write_accepted_records(table_dir, tmp_path / "syn", dataset="synthderm"))
    records = cfg.records_dir
    records.mkdir(parents=True)
    pq.write_table(records_to_table(real), records / "part-00000.parquet")
    pq.write_table(synthetic, records / "part-00001.parquet")  # someone copied generated rows in
    # a manifest matching the data config, so that prepare reuses these records as they are
    summary = {"records_dir": str(records), "dataset": "synthderm", "total": 10, "counts": {}}
    write_records_manifest(records, {"config_hash": records_key(cfg.data), "summary": summary})

    with pytest.raises(SyntheticRecordsError) as err:
        check_real_records(cfg)
    msg = str(err.value)
    assert f"hold {synthetic.num_rows} synthetic rows" in msg and f"train {synthetic.num_rows}" in msg
    assert synthetic.column("id")[0].as_py() in msg
    assert "must not train on its own output" in msg and "prepared from real data" in msg
    assert isinstance(err.value, ConfigError)  # the job prints it as one message, exit status 2

    with pytest.raises(SyntheticRecordsError):
        train_experiment(cfg)
    assert (
        not (cfg.root / "runs").exists() and not (cfg.root / "encoders").exists()
    )  # refused before any work

    (records / "part-00001.parquet").unlink()
    assert check_real_records(cfg) is None  # the real rows alone pass
