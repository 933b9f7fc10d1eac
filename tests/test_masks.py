"""Lesion masks: automatic masks (Otsu), their label in records, the prepare report and the train refusal.

No Ray here: process_item builds records directly and the train-time check runs on records written with
plain pyarrow. The prepare job's report end to end is in test_prepare.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from layouts import disc_mask, make_ham10000_tree

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.config import load_experiment
from vgmedgen.platform.datasets import DatasetWarning, process_item, read_source_items
from vgmedgen.platform.datasets.masks import (
    AUTO_MASK_SOURCE,
    MaskSupervisionError,
    check_mask_supervision,
    mask_census,
    mask_line,
    mask_report,
    otsu_lesion_mask,
    records_mask_census,
)
from vgmedgen.platform.datasets.synthderm import synthderm_record
from vgmedgen.platform.records import decode_png, records_to_table
from vgmedgen.platform.training.runner import check_visual_masks

REPO = Path(__file__).resolve().parents[1]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def _ham_items(tmp_path: Path, masks: bool):
    facts = make_ham10000_tree(tmp_path, masks=masks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        return facts, read_source_items("ham10000", facts.root)


# ---------------------------------------------------------------------------------------------
# The automatic segmentation
# ---------------------------------------------------------------------------------------------


def test_otsu_finds_synthderm_lesions() -> None:
    """SynthDerm's true masks score the automatic ones: 40 images with hair, rulers, bubbles, vignetting."""
    dice = []
    for index in range(40):
        rec = synthderm_record(0, index, 64)
        truth = decode_png(rec["mask"], "L") > 127
        found = otsu_lesion_mask(decode_png(rec["image"]))
        dice.append(_dice(found if found is not None else np.zeros_like(truth), truth))
    # Measured: mean 0.87, median 0.94 (a plain Otsu threshold of lightness: about 0.72 on SynthDerm).
    assert np.mean(dice) > 0.85 and np.median(dice) > 0.9


def test_otsu_on_a_flat_image_finds_nothing_and_rejects_bad_input() -> None:
    assert otsu_lesion_mask(np.full((32, 32, 3), 200, np.uint8)) is None
    with pytest.raises(ValueError, match="uint8"):
        otsu_lesion_mask(np.zeros((32, 32), np.uint8))


def test_auto_masks_fill_only_missing_masks_and_are_labelled(tmp_path: Path) -> None:
    _, with_masks = _ham_items(tmp_path / "a", masks=True)
    facts, without = _ham_items(tmp_path / "b", masks=False)
    for item in without:
        plain = process_item(item, 30, "center_crop")
        auto = process_item(item, 30, "center_crop", "auto")
        # Without masks: no mask, no source, an anatomy text without size or position.
        assert plain["mask"] is None and plain["attributes"]["mask_source"] is None
        assert "size" not in plain["attributes"] and plain["anatomy_text"].startswith("a lesion")
        # Automatic: the drawn disc is found (40x30 center-cropped to 30x30 keeps columns 5..34), the record
        # says where its mask came from, and the prompt now states the measured size and position.
        assert auto["attributes"]["mask_source"] == AUTO_MASK_SOURCE
        found = decode_png(auto["mask"], "L") > 127
        assert _dice(found, disc_mask(facts.discs[item.id])[:, 5:35]) > 0.75, item.id
        assert auto["attributes"]["size"] in auto["anatomy_text"]
        assert auto["attributes"]["position"] in auto["anatomy_text"]
        assert auto["image"] == plain["image"]
    # A dataset mask is never replaced: the automatic option only fills the gaps.
    item = next(it for it in with_masks if it.mask_policy == "files")
    rec = process_item(item, 30, "center_crop", "auto")
    assert rec["attributes"]["mask_source"] == "dataset"
    assert rec["mask"] == process_item(item, 30, "center_crop")["mask"]


# ---------------------------------------------------------------------------------------------
# Counting, reporting, refusing
# ---------------------------------------------------------------------------------------------


def test_census_and_prepare_report_name_counts_cost_and_source() -> None:
    census = mask_census(["train"] * 4 + ["val", "test"], [None, None, None, "dataset", None, None])
    assert census == {"test": {"none": 1}, "train": {"dataset": 1, "none": 3}, "val": {"none": 1}}
    assert mask_line(census).startswith("Lesion masks: 1 of 6 records")
    report = mask_report("ham10000", census, "dataset")
    assert "5 of 6 ham10000 records have no lesion mask" in report
    assert "train 3 of 4" in report and "val 1 of 1" in report and "test 1 of 1" in report
    assert "without size, position" in report and "no Dice supervision" in report
    assert "HAM10000_segmentations_lesion_tschandl" in report and "Dataverse" in report
    assert "data.mask_source=auto" in report
    assert "'mask' column" in mask_report("csv", census, "dataset")
    full = mask_census(["train", "val"], ["dataset", "dataset"])
    assert mask_report("ham10000", full, "dataset") is None
    auto = mask_report("ham10000", mask_census(["train"], [AUTO_MASK_SOURCE]), "auto")
    assert "automatic" in auto and AUTO_MASK_SOURCE in auto


def test_check_refuses_too_few_masks_with_the_fix() -> None:
    census = mask_census(["train"] * 10 + ["val"] * 5, ["dataset"] * 2 + [None] * 8 + ["dataset"] * 5)
    with pytest.raises(MaskSupervisionError) as err:
        check_mask_supervision(census, 0.5, "ham10000", "/r/ham10000-32")
    msg = str(err.value)
    assert "only 2 of the 10 train records at /r/ham10000-32 have one (20%)" in msg
    assert "train.min_mask_fraction=0.5 asks for at least 5" in msg
    assert "HAM10000_segmentations_lesion_tschandl" in msg and "data.mask_source=auto" in msg
    assert "train.min_mask_fraction=0.2 " in msg  # the value that lets exactly these records train
    assert isinstance(err.value, ConfigError)  # jobs print it as a user error, without a traceback
    check_mask_supervision(census, 0.2, "ham10000")  # 2 of 10 is enough for 0.2
    check_mask_supervision(mask_census(["train"], [None]), 0.0, "ham10000")  # 0: train without masks


def _write_records(records: list[dict], directory: Path) -> None:
    directory.mkdir(parents=True)
    rows = [{**r, "split": "train" if i < len(records) - 1 else "val"} for i, r in enumerate(records)]
    pq.write_table(records_to_table(rows), directory / "part-00000.parquet")


def test_train_check_reads_the_records(tmp_path: Path) -> None:
    _, items = _ham_items(tmp_path, masks=False)
    overrides = [f"output_root={tmp_path / 'out'}", "data.dataset=ham10000", f"data.root={tmp_path}"]
    overrides += ["data.resolution=32"]
    cfg = load_experiment(None, overrides)
    _write_records([process_item(it, 32, "center_crop") for it in items], cfg.records_dir)
    with pytest.raises(MaskSupervisionError, match=r"only 0 of the 5 train records .* at least 3"):
        check_visual_masks(cfg)

    auto = load_experiment(None, [*overrides, "data.mask_source=auto", "data.name=ham10000-auto"])
    _write_records([process_item(it, 32, "center_crop", "auto") for it in items], auto.records_dir)
    census = check_visual_masks(auto)
    assert (
        census
        == records_mask_census(auto.records_dir)
        == {"train": {AUTO_MASK_SOURCE: 5}, "val": {AUTO_MASK_SOURCE: 1}}
    )


def test_mask_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="mask_source"):
        load_experiment(None, ["data.mask_source=otsu"])
    with pytest.raises(ConfigError, match="min_mask_fraction"):
        load_experiment(None, ["train.min_mask_fraction=1.5"])
    assert load_experiment(None, []).train.min_mask_fraction == 0.5


def test_mask_settings_in_identities(tmp_path: Path) -> None:
    """Automatic masks are other records (and other stage-1 runs); the minimum only guards, and the default
    mask source leaves every earlier name as it was (pinned in test_train.py)."""
    from vgmedgen.platform.runs import job_key, records_key, stage_run_name

    base = load_experiment(REPO / "configs/tiny.yaml", [f"output_root={tmp_path}"])
    auto = load_experiment(REPO / "configs/tiny.yaml", [f"output_root={tmp_path}", "data.mask_source=auto"])
    guard = load_experiment(
        REPO / "configs/tiny.yaml", [f"output_root={tmp_path}", "train.min_mask_fraction=0"]
    )
    assert records_key(auto.data) != records_key(base.data)
    assert stage_run_name(auto, "visual", {}) != stage_run_name(base, "visual", {})
    assert job_key(guard) == job_key(base) and stage_run_name(guard, "visual", {}) == stage_run_name(
        base, "visual", {}
    )
