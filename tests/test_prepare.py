"""The prepare job end to end on a real local Ray: SynthDerm and each public layout -> valid records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from layouts import make_busi_tree, make_csv_dataset, make_ham10000_tree, make_kvasir_tree

from vgmedgen.platform.config import load_experiment
from vgmedgen.platform.prepare import PrepareError, prepare_records
from vgmedgen.platform.records import RECORD_SCHEMA, decode_png, read_records

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[1]


def _job():
    spec = importlib.util.spec_from_file_location("prepare_job", REPO / "jobs" / "prepare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _groups_ok(table) -> bool:
    seen: dict[str, str] = {}
    return all(
        seen.setdefault(g, s) == s
        for g, s in zip(table.column("group").to_pylist(), table.column("split").to_pylist())
    )


def test_synthderm_job_writes_reproducible_records(ray_cluster, output_root: Path, capsys):
    args = [
        "--config",
        str(REPO / "configs/synthderm.yaml"),
        f"output_root={output_root}",
        "data.synthderm.num_records=300",
        "data.resolution=32",
        "data.items_per_task=100",
    ]
    assert _job().main(args) == 0
    out = capsys.readouterr().out
    assert "300 synthderm records written" in out and "train" in out
    rec_dir = output_root / "records" / "synthderm-32"
    table = read_records(rec_dir)
    assert table.num_rows == 300 and _groups_ok(table)
    assert decode_png(table.column("image")[0].as_py()).shape == (32, 32, 3)
    counts = {s: pc.sum(pc.equal(table.column("split"), s)).as_py() for s in ("train", "val", "test")}
    assert counts["train"] > 200 and counts["val"] > 10 and counts["test"] > 10
    # plain pyarrow reads the same schema
    assert (
        pq.read_table(sorted(rec_dir.glob("*.parquet"))[0]).schema.remove_metadata()
        == RECORD_SCHEMA.remove_metadata()
    )
    manifest = json.loads((rec_dir / "_manifest.json").read_text())
    assert manifest["summary"]["total"] == 300
    # the whole directory opens in the usual tools (the manifest's "_" keeps it out of discovery)
    assert pq.read_table(rec_dir).num_rows == 300 and len(pd.read_parquet(rec_dir)) == 300

    # same inputs again: reused, nothing rewritten
    assert _job().main(args) == 0
    assert "reused" in capsys.readouterr().out
    # forced rebuild: identical records
    assert _job().main([*args, "--fresh"]) == 0
    again = read_records(rec_dir)
    assert again.sort_by("id").equals(table.sort_by("id"))
    assert not [p for p in rec_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def _cfg(output_root: Path, dataset: str, root: Path | None, *extra: str):
    over = [f"output_root={output_root}", f"data.dataset={dataset}", "data.resolution=32", *extra]
    if root is not None:
        over.append(f"data.root={root}")
    return load_experiment(None, over)


def test_ham10000_layout_skips_corrupt_and_keeps_lesions_together(
    ray_cluster, tmp_path: Path, output_root: Path
):
    facts = make_ham10000_tree(tmp_path, variant="dataverse", corrupt=True)
    summary = prepare_records(_cfg(output_root, "ham10000", facts.root))
    assert summary.total == len(facts.ids) - len(facts.corrupt_ids)
    assert [s["path"] for s in summary.skipped] and all(
        any(c in s["path"] for c in facts.corrupt_ids) for s in summary.skipped
    )
    table = read_records(output_root / "records" / "ham10000-32")
    assert _groups_ok(table)
    groups = dict(zip(table.column("id").to_pylist(), table.column("group").to_pylist()))
    lesion_pairs = [g for g in set(groups.values()) if list(groups.values()).count(g) > 1]
    assert lesion_pairs, "the lesion imaged twice must share a group"
    assert any(
        json.loads(a)["metadata"].get("cohort") for a in table.column("attributes").to_pylist()
    )  # Dataverse column kept
    assert "dx_type" not in " ".join(table.column("caption").to_pylist())


def test_strict_mode_fails_and_writes_nothing(ray_cluster, tmp_path: Path, output_root: Path):
    facts = make_ham10000_tree(tmp_path, corrupt=True)
    with pytest.raises(PrepareError) as e:
        prepare_records(_cfg(output_root, "ham10000", facts.root, "data.strict=true"))
    assert facts.corrupt_ids[0] in str(e.value) and "data.strict=false" in str(e.value)
    records = output_root / "records"
    assert not (records / "ham10000-32").exists()
    assert not list(records.iterdir()) if records.exists() else True


def test_kvasir_keeps_official_split_lists(ray_cluster, tmp_path: Path, output_root: Path):
    facts = make_kvasir_tree(tmp_path)
    prepare_records(_cfg(output_root, "kvasir_seg", facts.root))
    table = read_records(output_root / "records" / "kvasir_seg-32")
    split = dict(zip(table.column("id").to_pylist(), table.column("split").to_pylist()))
    official = {i: s for i, s in facts.extra["splits"].items() if s}
    assert official and all(split[i] == s for i, s in official.items())  # the shipped lists are kept
    masks = [decode_png(m, "L") for m in table.column("mask").to_pylist()]
    assert all(set(m.ravel().tolist()) <= {0, 255} for m in masks)


def test_busi_groups_near_duplicates_and_makes_rgb(ray_cluster, tmp_path: Path, output_root: Path):
    facts = make_busi_tree(tmp_path)
    prepare_records(_cfg(output_root, "busi", facts.root, "data.resize=pad"))
    table = read_records(output_root / "records" / "busi-32")
    groups = dict(zip(table.column("id").to_pylist(), table.column("group").to_pylist()))
    a, b = facts.extra["near_duplicates"]
    assert groups[a] == groups[b]
    assert len(set(groups.values())) < len(groups)
    assert decode_png(table.column("image")[0].as_py()).shape == (32, 32, 3)
    assert _groups_ok(table)


def test_user_csv_dataset(ray_cluster, tmp_path: Path, output_root: Path):
    facts = make_csv_dataset(tmp_path)
    csv_file = facts.extra["csv_file"]
    summary = prepare_records(_cfg(output_root, "csv", None, f"data.reader.csv_file={csv_file}"))
    assert summary.total == len(facts.ids)


def test_missing_dataset_dir_is_a_clear_error(ray_cluster, tmp_path: Path, output_root: Path, capsys):
    from vgmedgen.platform.cli import run_job

    code = run_job(
        _job().main,
        [
            "--config",
            str(REPO / "configs/busi.yaml"),
            f"output_root={output_root}",
            f"data.root={tmp_path / 'nowhere'}",
        ],
    )
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and "Traceback" not in err


def test_ham10000_without_masks_is_reported_refused_and_auto_masked(
    ray_cluster, tmp_path: Path, output_root: Path, capsys, caplog
):
    """The new user's path: HAM10000 without its separate mask archive."""
    from vgmedgen.platform.datasets.masks import AUTO_MASK_SOURCE, MaskSupervisionError
    from vgmedgen.platform.training.driver import train_experiment

    facts = make_ham10000_tree(tmp_path, masks=False)
    args = [f"output_root={output_root}", "data.dataset=ham10000", f"data.root={facts.root}"]
    args += ["data.resolution=16", "data.split.train=0.6", "data.split.val=0.2", "data.split.test=0.2"]
    # 1. prepare says so: in its printed summary, as a logged warning, and in the manifest's summary.
    with caplog.at_level("WARNING", logger="vgmedgen.platform.prepare"):
        assert _job().main(args) == 0
    out = capsys.readouterr().out
    assert (
        "Lesion masks: 0 of 6 records" in out
        and "WARNING: 6 of 6 ham10000 records have no lesion mask" in out
    )
    assert "HAM10000_segmentations_lesion_tschandl" in out and "data.mask_source=auto" in out
    assert any("have no lesion mask" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    manifest = json.loads((output_root / "records" / "ham10000-16" / "_manifest.json").read_text())
    masks = manifest["summary"]["masks"]
    assert sum(c["none"] for c in masks.values()) == 6 and masks["train"]["none"] >= 1

    # 2. the train job refuses stage 1 before any training, naming the count, the minimum and the options.
    train_args = ["train.scaling.num_workers=0", "tracking.enabled=false"]
    cfg = load_experiment(REPO / "configs/tiny.yaml", [*args, *train_args])
    with pytest.raises(MaskSupervisionError, match=r"only 0 of the \d train records.*data\.mask_source=auto"):
        train_experiment(cfg)
    assert not (output_root / "runs").exists()

    # 3. data.mask_source=auto: every record gets a labelled automatic mask and a prompt with size and position.
    summary = prepare_records(load_experiment(None, [*args, "data.mask_source=auto"]))
    assert not summary.reused and sum(c.get(AUTO_MASK_SOURCE, 0) for c in summary.masks.values()) == 6
    table = read_records(summary.records_dir)
    attrs = [json.loads(a) for a in table.column("attributes").to_pylist()]
    assert all(m is not None for m in table.column("mask").to_pylist())
    assert all(a["mask_source"] == AUTO_MASK_SOURCE for a in attrs)
    assert all(a["size"] in text for a, text in zip(attrs, table.column("anatomy_text").to_pylist()))
