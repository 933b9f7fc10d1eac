"""The canonical record: schema, validation and a round trip through plain pyarrow."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from vgmedgen.platform.records import (
    RECORD_SCHEMA,
    RecordError,
    decode_images,
    decode_masks,
    decode_png,
    encode_png,
    read_records,
    read_split,
    records_to_table,
)
from vgmedgen.platform.training.data import RecordArrays


def _row(i: int, split: str = "train", group: str | None = None) -> dict:
    img = np.full((8, 8, 3), i, np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    return {
        "id": f"r{i}",
        "dataset": "t",
        "split": split,
        "group": group or f"g{i}",
        "label": "a",
        "image": encode_png(img),
        "mask": encode_png(mask) if i % 2 else None,
        "caption": "c",
        "anatomy_text": "a",
        "style_text": "s",
        "attributes": {"k": i},
        "source": f"x/{i}.png",
    }


def test_round_trip_through_plain_pyarrow(tmp_path):
    table = records_to_table([_row(i) for i in range(4)])
    pq.write_table(table, tmp_path / "part-00000.parquet")
    plain = pq.read_table(tmp_path / "part-00000.parquet")
    assert plain.schema.remove_metadata() == RECORD_SCHEMA.remove_metadata()
    back = read_records(tmp_path)
    assert back.column("id").to_pylist() == ["r0", "r1", "r2", "r3"]
    assert decode_png(back.column("image")[1].as_py()).shape == (8, 8, 3)
    assert decode_png(back.column("mask")[1].as_py(), "L")[3, 3] == 255
    assert back.column("mask")[0].as_py() is None


def test_duplicate_ids_rejected():
    rows = [_row(1), _row(1)]
    with pytest.raises(RecordError, match="more than once"):
        records_to_table(rows)


def test_bad_split_and_cut_group_rejected():
    with pytest.raises(RecordError, match="split 'dev'"):
        records_to_table([_row(1, split="dev")])
    with pytest.raises(RecordError, match="spans splits"):
        records_to_table([_row(1, "train", "g"), _row(2, "test", "g")])


def test_non_png_and_missing_column_rejected():
    row = _row(1)
    row["image"] = b"JFIF..."
    with pytest.raises(RecordError, match="not PNG"):
        records_to_table([row])
    row = _row(1)
    del row["caption"]
    with pytest.raises(RecordError, match="lacks columns"):
        records_to_table([row])


def test_missing_records_dir_says_how_to_make_it(tmp_path):
    with pytest.raises(RecordError, match="jobs/prepare.py"):
        read_records(tmp_path / "nothing")


def test_read_split_and_decoding(tmp_path):
    splits = ["train", "val", "train", "train", "val"]
    pq.write_table(
        records_to_table([_row(i, s) for i, s in enumerate(splits)]), tmp_path / "part-00000.parquet"
    )
    train = read_split(tmp_path, "train", ["id", "mask"])
    assert train.column("id").to_pylist() == ["r0", "r2", "r3"] and "split" in train.column_names
    assert read_split(tmp_path, "train", limit=2).column("id").to_pylist() == ["r0", "r2"]
    with pytest.raises(ValueError, match="no rows in split 'test'"):
        read_split(tmp_path, "test")
    images = decode_images(read_split(tmp_path, "val").column("image").to_pylist())
    assert images.dtype == np.uint8 and images.shape == (2, 8, 8, 3) and images[1, 0, 0, 0] == 4
    masks, has = decode_masks(train.column("mask").to_pylist())  # r0 has none, r3 has one: size from r3
    assert masks.dtype == bool and masks.shape == (3, 8, 8) and has.tolist() == [False, False, True]
    assert not masks[0].any() and masks[2].sum() == 9


def test_record_arrays_hold_uint8_and_batch_floats(tmp_path):
    pq.write_table(records_to_table([_row(v) for v in (1, 60, 121, 180)]), tmp_path / "part-00000.parquet")
    arrays = RecordArrays.load(tmp_path, "train")
    assert arrays.images.dtype == torch.uint8 and arrays.images.shape == (4, 3, 8, 8)
    assert arrays.masks.dtype == torch.bool and arrays.masks.shape == (4, 1, 8, 8)
    batch = arrays.batch(np.array([3, 0]))
    assert batch["image"].dtype == torch.float32
    # the same float32 arithmetic as converting the whole split up front
    expected = torch.tensor([[180] * 3, [1] * 3], dtype=torch.uint8).float().div(127.5).sub(1.0)
    assert torch.equal(batch["image"][:, :, 0, 0], expected)
    assert batch["mask"].dtype == torch.float32 and set(batch["mask"].unique().tolist()) == {0.0, 1.0}
    assert batch["mask"][0].sum() == 0 and batch["mask"][1].sum() == 9  # row 3 has no mask, row 0 a 3x3 one
    assert batch["has_mask"].tolist() == [False, True]


def test_records_directory_opens_in_pandas_and_pyarrow(tmp_path):
    import json

    import pandas as pd
    import pyarrow as pa

    from vgmedgen.platform.records import RECORDS_MANIFEST, read_records_manifest, write_records_manifest
    from vgmedgen.platform.runs import records_files

    rec = tmp_path / "records"
    rec.mkdir()
    pq.write_table(records_to_table([_row(i) for i in range(3)]), rec / "part-00000.parquet")
    pq.write_table(records_to_table([_row(i) for i in range(3, 5)]), rec / "part-00001.parquet")
    # A directory written before 2026-12: its manifest.json breaks pyarrow's directory discovery.
    (rec / "manifest.json").write_text(json.dumps({"config_hash": "abc", "summary": {"total": 5}}))
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(rec)
    assert read_records_manifest(rec) == {"config_hash": "abc", "summary": {"total": 5}}
    assert (rec / "manifest.json").is_file()  # reading alone changes nothing
    assert read_records_manifest(rec, migrate=True)["config_hash"] == "abc"
    assert not (rec / "manifest.json").exists() and (rec / RECORDS_MANIFEST).is_file()

    write_records_manifest(rec, {"config_hash": "def"})
    assert read_records_manifest(rec) == {"config_hash": "def"}
    table = pq.read_table(rec)
    frame = pd.read_parquet(rec)
    assert sorted(table.column("id").to_pylist()) == sorted(frame["id"]) == [f"r{i}" for i in range(5)]
    assert set(frame.columns) == set(RECORD_SCHEMA.names)
    assert decode_png(frame.loc[frame["id"] == "r1", "image"].iloc[0]).shape == (8, 8, 3)
    # The platform's own readers and fingerprints see the part files only.
    assert read_records(rec).num_rows == 5
    assert [name for name, _ in records_files([rec])] == ["part-00000.parquet", "part-00001.parquet"]
