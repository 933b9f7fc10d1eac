"""Dataset readers (HAM10000, Kvasir-SEG, BUSI, user CSV), captions join, process_item, grouping."""

from __future__ import annotations

import io
import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from layouts import (  # noqa: E402
    disc_mask,
    make_busi_tree,
    make_captions_csv,
    make_csv_dataset,
    make_ham10000_tree,
    make_kvasir_tree,
)

from vgmedgen.model.configbase import ConfigError  # noqa: E402
from vgmedgen.platform.datasets import (  # noqa: E402
    READERS,
    CorruptInputError,
    DatasetError,
    DatasetWarning,
    ReaderOptions,
    SourceItem,
    group_near_duplicates,
    phash_distance,
    process_item,
    read_source_items,
)
from vgmedgen.platform.records import RECORD_SCHEMA, decode_png, records_to_table  # noqa: E402


def read_quietly(dataset: str, root: Path, options: ReaderOptions | None = None) -> list[SourceItem]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        return read_source_items(dataset, root, options or ReaderOptions())


def as_table(records: list[dict]) -> object:
    return records_to_table([{**r, "split": "train"} for r in records])


def png_mode(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as im:
        return im.mode


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_registry_names_and_unknown_dataset(tmp_path: Path) -> None:
    assert set(READERS) == {"ham10000", "kvasir_seg", "busi", "csv"}
    with pytest.raises(ConfigError, match="Did you mean 'kvasir_seg'.*busi, csv, ham10000, kvasir_seg"):
        read_source_items("kvasir", tmp_path, ReaderOptions())


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere.*does not exist"):
        read_source_items("busi", tmp_path / "nowhere", ReaderOptions())


def test_reader_options_are_strict() -> None:
    with pytest.raises(ValueError, match="extra"):
        ReaderOptions(caption_csv="x.csv")


# ---------------------------------------------------------------------------------------------
# HAM10000
# ---------------------------------------------------------------------------------------------


def test_ham10000_items_labels_groups_metadata(tmp_path: Path) -> None:
    facts = make_ham10000_tree(tmp_path)
    with pytest.warns(DatasetWarning, match="1 of 6 HAM10000 images have no lesion mask"):
        items = read_source_items("ham10000", facts.root, ReaderOptions())
    assert [it.id for it in items] == facts.ids
    by_id = {it.id: it for it in items}
    for item_id in facts.ids:
        it = by_id[item_id]
        assert it.label == facts.labels[item_id]
        assert it.group == facts.groups[item_id]
        assert it.mask_policy == facts.mask_policies[item_id]
        assert it.metadata["age"] == facts.extra["age"][item_id]
        assert it.metadata["sex"] == facts.extra["sex"][item_id]
        assert it.metadata["localization"] == facts.extra["localization"][item_id]
        assert it.metadata["dx_type"] == facts.extra["dx_type"][item_id]
        assert Path(it.image_path).is_file() and it.source.endswith(f"{item_id}.jpg")
        assert it.official_split is None
    # The lesion imaged twice: one group. Blank age and sex "unknown" become None.
    assert by_id["ISIC_0027419"].group == by_id["ISIC_0025030"].group == "HAM_0000118"
    assert by_id["ISIC_0026769"].metadata["age"] is None
    assert by_id["ISIC_0031633"].metadata["sex"] is None
    assert by_id["ISIC_0029176"].mask_paths == () and by_id["ISIC_0029176"].mask_policy == "none"
    assert (
        by_id["ISIC_0027419"]
        .mask_paths[0]
        .endswith("HAM10000_segmentations_lesion_tschandl/ISIC_0027419_segmentation.png")
    )
    assert by_id["ISIC_0027419"].source.startswith("HAM10000_images_part_1/")
    assert by_id["ISIC_0025030"].source.startswith("HAM10000_images_part_2/")


def test_ham10000_dataverse_tab_variant_with_cohort(tmp_path: Path) -> None:
    facts = make_ham10000_tree(tmp_path, variant="dataverse")
    items = read_quietly("ham10000", facts.root)
    assert [it.id for it in items] == facts.ids
    for it in items:
        assert it.metadata["cohort"] == facts.extra["cohort"][it.id]
        assert it.label == facts.labels[it.id]
    rec = process_item(next(it for it in items if it.id == "ISIC_0026769"), 32, "center_crop")
    # Cohort reaches the style text, body site the anatomy text, dx_type no text at all.
    assert "rosendahl cohort" in rec["style_text"]
    assert "on the back" in rec["anatomy_text"]
    for text in (rec["caption"], rec["anatomy_text"], rec["style_text"]):
        assert "histo" not in text and "mel" not in text.split()
    assert rec["attributes"]["metadata"]["dx_type"] == "histo"


def test_ham10000_process_validates_and_measures(tmp_path: Path) -> None:
    facts = make_ham10000_tree(tmp_path, corrupt=True)
    items = read_quietly("ham10000", facts.root)
    records = []
    for it in items:
        if it.id in facts.corrupt_ids:
            with pytest.raises(CorruptInputError, match="ISIC_0025837.jpg"):
                process_item(it, 30, "center_crop")
            continue
        records.append(process_item(it, 30, "center_crop"))
    table = as_table(records)
    assert table.num_rows == len(facts.ids) - 1
    assert set(records[0]) == set(RECORD_SCHEMA.names) - {"split"}
    rec = {r["id"]: r for r in records}
    # ISIC_0027419: disc (12, 8, r=6) in 40x30; center_crop 30 -> the same disc at x-5, scale 1.
    expected = disc_mask(facts.discs["ISIC_0027419"])[:, 5:35]
    mask = decode_png(rec["ISIC_0027419"]["mask"], "L")
    assert mask.shape == (30, 30) and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask > 127, expected)
    attrs = rec["ISIC_0027419"]["attributes"]
    assert attrs["area"] == pytest.approx(expected.mean())
    assert attrs["centroid_x"] == pytest.approx(7 / 30, abs=0.01)
    assert attrs["centroid_y"] == pytest.approx(8 / 30, abs=0.01)
    assert attrs["n_components"] == 1 and attrs["position"] == "upper left"
    assert len(attrs["phash"]) == 16 and attrs["mask_policy"] == "files"
    assert attrs["original_size"] == [40, 30]
    # No mask file: null mask, anatomy from metadata only.
    assert rec["ISIC_0029176"]["mask"] is None
    assert rec["ISIC_0029176"]["anatomy_text"] == "a lesion, on the face"
    assert rec["ISIC_0027419"]["group"] == "HAM_0000118"
    assert decode_png(rec["ISIC_0027419"]["image"]).shape == (30, 30, 3)


def test_ham10000_missing_columns_named(tmp_path: Path) -> None:
    facts = make_ham10000_tree(tmp_path, drop_column="dx_type")
    with pytest.raises(DatasetError, match=r"lacks required column\(s\) dx_type; found: lesion_id,"):
        read_source_items("ham10000", facts.root, ReaderOptions())


def test_ham10000_missing_image_error_or_skip(tmp_path: Path) -> None:
    facts = make_ham10000_tree(tmp_path, missing_image=True)
    with pytest.raises(DatasetError, match="1 HAM10000 metadata rows .* ISIC_0099999.*skip_missing_files"):
        read_quietly("ham10000", facts.root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = read_source_items("ham10000", facts.root, ReaderOptions(skip_missing_files=True))
    assert any(
        "Skipping 1 HAM10000 metadata rows" in str(w.message) and "ISIC_0099999" in str(w.message)
        for w in caught
    )
    assert [it.id for it in items] == facts.ids


def test_ham10000_duplicate_mirror_folders_and_no_metadata(tmp_path: Path) -> None:
    facts = make_ham10000_tree(tmp_path)
    # A Kaggle-style mirror holds the same images twice under two folder names.
    dup = facts.root / "ham10000_images_part_1"
    dup.mkdir()
    src = facts.root / "HAM10000_images_part_1" / "ISIC_0027419.jpg"
    (dup / src.name).write_bytes(src.read_bytes())
    items = read_quietly("ham10000", facts.root)
    assert [it.id for it in items] == facts.ids
    assert (
        next(it for it in items if it.id == "ISIC_0027419").source
        == "HAM10000_images_part_1/ISIC_0027419.jpg"
    )
    facts.extra["metadata_path"].unlink()
    with pytest.raises(DatasetError, match="No HAM10000 metadata.*HAM10000_metadata.csv"):
        read_quietly("ham10000", facts.root)


# ---------------------------------------------------------------------------------------------
# Kvasir-SEG
# ---------------------------------------------------------------------------------------------


def test_kvasir_items_splits_bboxes_from_both_roots(tmp_path: Path) -> None:
    facts = make_kvasir_tree(tmp_path)
    items = read_source_items("kvasir_seg", facts.root, ReaderOptions())
    assert [it.id for it in items] == facts.ids
    for it in items:
        assert it.label == "polyp" and it.group is None and it.mask_policy == "files"
        assert it.official_split == facts.extra["splits"][it.id]
        assert it.metadata["bbox_count"] == facts.extra["bbox_count"][it.id]
        assert it.source.startswith("Kvasir-SEG/images/")
    # The Kvasir-SEG folder itself is a valid root too (split lists then are out of reach).
    inner = read_quietly("kvasir_seg", facts.extra["kvasir_dir"])
    assert [it.id for it in inner] == facts.ids
    assert inner[0].metadata["bbox_count"] == items[0].metadata["bbox_count"]


def test_kvasir_jpeg_masks_thresholded_to_single_channel(tmp_path: Path) -> None:
    facts = make_kvasir_tree(tmp_path)
    items = read_quietly("kvasir_seg", facts.root)
    it = items[0]
    raw = np.asarray(Image.open(it.mask_paths[0]))
    # The edge case is real: 3-channel, lossy (values other than 0 and 255).
    assert raw.ndim == 3 and raw.shape[2] == 3
    assert len(set(np.unique(raw)) - {0, 255}) > 0
    rec = process_item(it, 30, "center_crop")
    assert png_mode(rec["mask"]) == "L"
    mask = decode_png(rec["mask"], "L")
    assert set(np.unique(mask)) <= {0, 255}
    expected = disc_mask(facts.discs[it.id])[:, 5:35]
    assert ((mask > 127) != expected).mean() < 0.01  # a '> 0' threshold would miss by ~10%
    assert rec["attributes"]["official_split"] == facts.extra["splits"][it.id]
    as_table([process_item(i, 16, "pad") for i in items])


def test_kvasir_split_list_conflicts_and_missing_ids(tmp_path: Path) -> None:
    facts = make_kvasir_tree(tmp_path)
    (facts.root / "test.txt").write_text(facts.ids[0] + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="in two split lists"):
        read_quietly("kvasir_seg", facts.root)
    (facts.root / "test.txt").write_text("cjunotthere000000000000000\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="split-list ids.*cjunotthere"):
        read_quietly("kvasir_seg", facts.root)


def test_kvasir_missing_mask_and_wrong_layout(tmp_path: Path) -> None:
    facts = make_kvasir_tree(tmp_path, split_lists=False)
    victim = sorted((facts.extra["kvasir_dir"] / "masks").iterdir())[0]
    victim.unlink()
    with pytest.raises(DatasetError, match=f"{victim.stem}.*Every Kvasir-SEG image needs its mask"):
        read_quietly("kvasir_seg", facts.root)
    items = read_quietly("kvasir_seg", facts.root, ReaderOptions(skip_missing_files=True))
    assert len(items) == len(facts.ids) - 1 and all(it.official_split is None for it in items)
    with pytest.raises(DatasetError, match="No Kvasir-SEG layout"):
        read_quietly("kvasir_seg", tmp_path / "kvasir" / "Kvasir-SEG" / "images")


# ---------------------------------------------------------------------------------------------
# BUSI
# ---------------------------------------------------------------------------------------------


def test_busi_items_ids_policies(tmp_path: Path) -> None:
    facts = make_busi_tree(tmp_path)
    items = read_source_items("busi", facts.root, ReaderOptions())
    assert [it.id for it in items] == facts.ids
    by_id = {it.id: it for it in items}
    for item_id in facts.ids:
        assert by_id[item_id].label == facts.labels[item_id]
        assert by_id[item_id].group is None
        assert by_id[item_id].mask_policy == facts.mask_policies[item_id]
        assert list(by_id[item_id].mask_paths) == [str(p) for p in facts.extra["mask_files"][item_id]]
    assert by_id["benign_1"].source == "Dataset_BUSI_with_GT/benign/benign (1).png"
    assert by_id["normal_1"].mask_policy == "empty" and by_id["normal_1"].mask_paths == ()


def test_busi_masks_merged_by_or(tmp_path: Path) -> None:
    facts = make_busi_tree(tmp_path)
    item = next(it for it in read_quietly("busi", facts.root) if it.id == "benign_1")
    assert len(item.mask_paths) == 2 and item.mask_paths[1].endswith("benign (1)_mask_1.png")
    both = decode_png(process_item(item, 30, "center_crop")["mask"], "L") > 127
    first = decode_png(
        process_item(replace(item, mask_paths=item.mask_paths[:1]), 30, "center_crop")["mask"], "L"
    )
    second = decode_png(
        process_item(replace(item, mask_paths=item.mask_paths[1:]), 30, "center_crop")["mask"], "L"
    )
    np.testing.assert_array_equal(both, (first > 127) | (second > 127))
    np.testing.assert_array_equal(both, disc_mask(facts.discs["benign_1"])[:, 5:35])
    assert (first > 127).sum() > 0 and (second > 127).sum() > 0 and not ((first > 127) & (second > 127)).any()
    attrs = process_item(item, 30, "center_crop")["attributes"]
    assert attrs["n_components"] == 2 and attrs["count"] == "two"


def test_busi_grayscale_to_rgb_and_empty_normal(tmp_path: Path) -> None:
    facts = make_busi_tree(tmp_path)
    by_id = {it.id: it for it in read_quietly("busi", facts.root)}
    gray_item = by_id[facts.extra["grayscale_id"]]
    assert Image.open(gray_item.image_path).mode == "L"
    rec = process_item(gray_item, 24, "stretch")
    assert png_mode(rec["image"]) == "RGB" and png_mode(rec["mask"]) == "L"
    image = decode_png(rec["image"])
    assert image.shape == (24, 24, 3)
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    normal = process_item(by_id["normal_1"], 24, "stretch")
    assert normal["mask"] is not None and not decode_png(normal["mask"], "L").any()
    assert normal["anatomy_text"] == "no visible lesion"
    assert normal["attributes"]["n_components"] == 0
    as_table([process_item(it, 24, "stretch") for it in by_id.values()])


def test_busi_near_duplicates_grouped(tmp_path: Path) -> None:
    facts = make_busi_tree(tmp_path)
    records = [process_item(it, 24, "center_crop") for it in read_quietly("busi", facts.root)]
    ids = [r["id"] for r in records]
    hashes = [r["attributes"]["phash"] for r in records]
    a, b = facts.extra["near_duplicates"]
    ha, hb = hashes[ids.index(a)], hashes[ids.index(b)]
    assert phash_distance(ha, hb) <= 6
    groups = group_near_duplicates(ids, hashes, max_distance=8)
    assert groups[a] == groups[b] == min(a, b)
    others = [i for i in ids if i not in (a, b)]
    for i in others:
        assert groups[i] == i  # unrelated images stay alone
    # Order of the input does not change the answer.
    assert group_near_duplicates(ids[::-1], hashes[::-1], max_distance=8) == groups


def test_busi_wrong_layout(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="No BUSI layout.*Dataset_BUSI_with_GT"):
        read_source_items("busi", tmp_path / "empty", ReaderOptions())


# ---------------------------------------------------------------------------------------------
# User CSV and captions CSV
# ---------------------------------------------------------------------------------------------


def test_csv_dataset_items_and_records(tmp_path: Path) -> None:
    facts = make_csv_dataset(tmp_path)
    items = read_source_items("csv", facts.root, ReaderOptions(csv_file=Path("dataset.csv")))
    assert [it.id for it in items] == facts.ids
    # The root may also be the CSV file itself.
    assert [it.id for it in read_source_items("csv", facts.extra["csv_file"], ReaderOptions())] == facts.ids
    by_id = {it.id: it for it in items}
    for item_id in facts.ids:
        assert by_id[item_id].label == facts.labels[item_id]
        assert by_id[item_id].group == facts.groups[item_id]
        assert by_id[item_id].mask_policy == facts.mask_policies[item_id]
    assert by_id["a"].caption == facts.extra["captions"]["a"] and by_id["b"].caption is None
    assert by_id["a"].metadata == {"site": "arm"}
    assert len(by_id["d"].mask_paths) == 2 and by_id["d"].source == "images/d.jpg"
    records = {r["id"]: r for r in (process_item(it, 30, "center_crop") for it in items)}
    as_table(list(records.values()))
    assert records["a"]["caption"] == "a dark lesion on the arm"
    assert records["a"]["attributes"]["caption_source"] == "supplied"
    assert "on the arm" in records["a"]["anatomy_text"]
    assert records["b"]["mask"] is None  # blank mask cell: unknown
    assert not decode_png(records["c"]["mask"], "L").any()  # "empty"
    assert records["b"]["group"] == "p1" and records["c"]["group"] == "c"
    # RGBA and palette images decode to RGB.
    assert png_mode(records["a"]["image"]) == "RGB" and png_mode(records["b"]["image"]) == "RGB"
    np.testing.assert_array_equal(
        decode_png(records["d"]["mask"], "L") > 127, disc_mask(facts.discs["d"])[:, 5:35]
    )


def test_csv_missing_columns_named(tmp_path: Path) -> None:
    facts = make_csv_dataset(tmp_path, columns=["image", "mask", "caption"])
    with pytest.raises(DatasetError, match=r"lacks required column\(s\) label; found: image, mask, caption"):
        read_source_items("csv", facts.root, ReaderOptions(csv_file=facts.extra["csv_file"]))
    with pytest.raises(DatasetError, match="set csv_file"):
        read_source_items("csv", facts.root, ReaderOptions())


def test_captions_csv_join_and_unmatched_warning(tmp_path: Path) -> None:
    facts = make_busi_tree(tmp_path)
    captions = make_captions_csv(
        tmp_path / "captions.csv",
        {
            "benign (1).png": "two hypoechoic masses, benign",
            "Dataset_BUSI_with_GT/normal/normal (2).png": "normal breast tissue,\nno mass",
            "missing (9).png": "never matched",
        },
    )
    with pytest.warns(DatasetWarning) as record:
        items = read_source_items("busi", facts.root, ReaderOptions(captions_csv=captions))
    messages = " | ".join(str(w.message) for w in record)
    assert "1 match no image (e.g. missing (9).png)" in messages
    assert "covers 2 of 6 images" in messages
    by_id = {it.id: it for it in items}
    assert by_id["benign_1"].caption == "two hypoechoic masses, benign"
    assert by_id["normal_2"].caption == "normal breast tissue,\nno mass"  # quoted line break kept
    assert by_id["benign_2"].caption is None
    rec = process_item(by_id["benign_1"], 16, "pad")
    assert rec["caption"] == "two hypoechoic masses, benign"
    assert rec["anatomy_text"].startswith("two lesions")  # per-factor texts are still measured


def test_captions_csv_missing_columns(tmp_path: Path) -> None:
    facts = make_busi_tree(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,description\nbenign (1).png,x\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"file_name, text; found: image, description"):
        read_source_items("busi", facts.root, ReaderOptions(captions_csv=bad))


# ---------------------------------------------------------------------------------------------
# process_item details
# ---------------------------------------------------------------------------------------------


def test_resize_policies_keep_mask_geometry(tmp_path: Path) -> None:
    facts = make_busi_tree(tmp_path)
    item = next(it for it in read_quietly("busi", facts.root) if it.id == "benign_2")
    full = disc_mask(facts.discs["benign_2"])  # (30, 40)
    pad = decode_png(process_item(item, 40, "pad")["mask"], "L") > 127  # 40x30 centred in 40x40
    np.testing.assert_array_equal(pad[5:35], full)
    assert not pad[:5].any() and not pad[35:].any()
    pad_img = decode_png(process_item(item, 40, "pad")["image"])
    assert (pad_img[:5] == 0).all()
    for policy in ("center_crop", "pad", "stretch"):
        rec = process_item(item, 20, policy)
        assert decode_png(rec["image"]).shape == (20, 20, 3)
        assert decode_png(rec["mask"], "L").shape == (20, 20)
    with pytest.raises(ConfigError, match="resize policy 'squash'"):
        process_item(item, 20, "squash")  # type: ignore[arg-type]


def test_process_item_is_deterministic(tmp_path: Path) -> None:
    facts = make_ham10000_tree(tmp_path, variant="dataverse")
    item = read_quietly("ham10000", facts.root)[0]
    a, b = process_item(item, 32, "center_crop"), process_item(item, 32, "center_crop")
    assert a == b
    assert json.loads(json.dumps(a["attributes"])) == a["attributes"]


def test_corrupt_mask_and_mismatched_mask(tmp_path: Path) -> None:
    facts = make_busi_tree(tmp_path)
    item = next(it for it in read_quietly("busi", facts.root) if it.id == "malignant_2")
    Path(item.mask_paths[0]).write_bytes(b"not a png at all")
    with pytest.raises(CorruptInputError, match=r"mask .*malignant \(2\)_mask.png"):
        process_item(item, 16, "pad")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(item.mask_paths[0])
    with pytest.raises(CorruptInputError, match="is 40x40 but its image is 40x30"):
        process_item(item, 16, "pad")
    # Same aspect ratio at another size: resized to the image.
    Image.fromarray(disc_mask(facts.discs["malignant_2"], 80, 60).astype(np.uint8) * 255).save(
        item.mask_paths[0]
    )
    assert process_item(item, 16, "pad")["attributes"]["n_components"] == 1


def test_group_near_duplicates_transitive_and_validated() -> None:
    ids = ["c", "a", "b", "d"]
    hashes = ["0000000000000000", "0000000000000003", "000000000000000f", "ffffffffffffffff"]
    # c-a: 2 bits, a-b: 2 bits, c-b: 4 bits; d is far from all.
    assert phash_distance(hashes[0], hashes[2]) == 4
    assert phash_distance(hashes[0], hashes[3]) == 64
    groups = group_near_duplicates(ids, hashes, max_distance=2)
    assert groups == {"a": "a", "b": "a", "c": "a", "d": "d"}
    assert group_near_duplicates(ids, hashes, max_distance=0) == {i: i for i in ids}
    with pytest.raises(ValueError, match="3 ids but 4 hashes"):
        group_near_duplicates(ids[:3], hashes, 2)


def test_source_item_row_round_trip(tmp_path: Path) -> None:
    facts = make_ham10000_tree(tmp_path, variant="dataverse")
    for item in read_quietly("ham10000", facts.root):
        row = item.to_row()
        assert isinstance(row["metadata"], str)
        assert SourceItem.from_row(row) == item
        # Ray Data hands list columns back as numpy arrays.
        assert SourceItem.from_row({**row, "mask_paths": np.array(row["mask_paths"], dtype=object)}) == item
