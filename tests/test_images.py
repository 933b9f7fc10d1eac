"""PNG provenance: synthetic images say so in their text chunks (file and bytes); real records do not."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.images import (
    DESCRIPTION,
    SOFTWARE,
    is_synthetic,
    png_bytes,
    provenance_fields,
    read_provenance,
    save_png,
)
from vgmedgen.platform.records import decode_png, encode_png
from vgmedgen.platform.visualize import save_grid, save_swap_grid

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (8, 10, 3), dtype=np.uint8)
MASK = (RNG.random((8, 10)) > 0.5).astype(np.uint8) * 255
FIELDS = provenance_fields(
    model_version="ab" * 32,
    seed=5,
    anatomy_prompt="a small round lesion, centred",
    style_prompt="rosa Läsion auf heller Haut — 皮膚",  # not Latin-1: stored as iTXt
    num_steps=20,
    guidance_anatomy=4.5,
    caption=None,  # left out
    sampler={"num_steps": 20},
    flag=True,
)


def test_provenance_fields_are_strings_and_none_is_left_out() -> None:
    assert "caption" not in FIELDS
    assert FIELDS["seed"] == "5" and FIELDS["guidance_anatomy"] == "4.5" and FIELDS["flag"] == "true"
    assert json.loads(FIELDS["sampler"]) == {"num_steps": 20}


def test_round_trip_through_bytes_and_file(tmp_path: Path) -> None:
    data = png_bytes(RGB, FIELDS)
    assert read_provenance(data) == {"synthetic": "true", **FIELDS} and is_synthetic(data)
    path = save_png(Image.fromarray(RGB), tmp_path / "deep" / "x.png", FIELDS)
    assert read_provenance(path) == read_provenance(str(path)) == {"synthetic": "true", **FIELDS}
    with Image.open(path) as im:
        # What viewers show, and the pixels untouched.
        assert im.text["Software"] == SOFTWARE and im.text["Description"] == DESCRIPTION
        assert np.array_equal(np.asarray(im), RGB)
    # An empty provenance still marks the image synthetic.
    assert read_provenance(png_bytes(MASK, {})) == {"synthetic": "true"}


def test_without_provenance_a_png_carries_none() -> None:
    plain = png_bytes(RGB)
    assert read_provenance(plain) == {} and not is_synthetic(plain)
    with Image.open(io.BytesIO(plain)) as im:
        assert "Software" not in im.text and "Description" not in im.text


def test_real_records_carry_no_provenance_and_synthetic_ones_do() -> None:
    real = encode_png(RGB)
    assert read_provenance(real) == {} and read_provenance(encode_png(MASK)) == {}
    synthetic = encode_png(RGB, FIELDS)
    assert is_synthetic(synthetic) and read_provenance(synthetic)["seed"] == "5"
    assert np.array_equal(decode_png(real), decode_png(synthetic))
    # Records keep their fast compression level: the same bytes as before provenance existed.
    buf = io.BytesIO()
    Image.fromarray(RGB, mode="RGB").save(buf, format="PNG", compress_level=1)
    assert real == buf.getvalue()


def test_grids_carry_the_provenance_they_are_given(tmp_path: Path) -> None:
    images = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    marked = save_grid(images, tmp_path / "g.png", ncol=2, provenance={"step": 3})
    assert read_provenance(marked) == {"synthetic": "true", "step": "3"}
    assert read_provenance(save_grid(images, tmp_path / "real.png", ncol=2)) == {}
    swap = save_swap_grid(images, ["a", "b"], ["c", "d"], tmp_path / "s.png", provenance={"seed": 0})
    assert is_synthetic(swap)


def test_bad_sources_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such PNG file"):
        read_provenance(tmp_path / "missing.png")
    with pytest.raises(ConfigError, match="is not a readable PNG"):
        read_provenance(b"not an image")
    jpeg = io.BytesIO()
    Image.fromarray(RGB).save(jpeg, format="JPEG")
    with pytest.raises(ConfigError, match="is a JPEG image, not a PNG"):
        read_provenance(jpeg.getvalue())
    with pytest.raises(ValueError, match="cannot be a PNG keyword"):
        png_bytes(RGB, {"x" * 80: "1"})
