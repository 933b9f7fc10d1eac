"""The canonical record: schema, validation and a round trip through plain pyarrow."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from vgmedgen.platform.records import (
    RECORD_SCHEMA,
    RecordError,
    decode_png,
    encode_png,
    read_records,
    records_to_table,
)


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
