"""SynthDerm: determinism, schema, class balance, factor adherence of the rendered masks and colours,
groups, captions, and that the classes overlap (unit tier: a few seconds in all)."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from vgmedgen.platform.datasets.synthderm import (
    ANATOMY_FACTORS,
    CLASS_NAMES,
    CLASSES,
    FACTOR_PHRASES,
    FACTORS,
    GROUP_BLOCK,
    HAM10000_COUNTS,
    SIZE_AREA_FRACTION,
    STYLE_FACTORS,
    SynthDermError,
    contact_sheet,
    iter_synthderm,
    lesion_of_index,
    position_of_centroid,
    sample_factors,
    size_of_area_fraction,
    synthderm_record,
)
from vgmedgen.platform.records import decode_png, records_to_table

SIZE = 32


@pytest.fixture(scope="module")
def sample() -> list[dict]:
    """200 records at 32 px, shared by the tests that measure images."""
    return list(iter_synthderm(5, 0, 200, SIZE))


def _measure(record: dict) -> tuple[np.ndarray, np.ndarray]:
    image = decode_png(record["image"], "RGB").astype(np.float64)
    mask = decode_png(record["mask"], "L") > 127
    return image, mask


def test_factor_names_are_the_documented_constants() -> None:
    assert ANATOMY_FACTORS == ("shape", "size", "position", "border", "count")
    assert STYLE_FACTORS == ("skin_tone", "pigment", "illumination", "artefact", "device")
    assert set(FACTORS) == set(ANATOMY_FACTORS) | set(STYLE_FACTORS)
    assert FACTORS["position"] == ("centre", "upper left", "upper right", "lower left", "lower right")
    assert FACTORS["pigment"] == ("light brown", "dark brown", "black", "pink", "blue-grey")
    assert CLASS_NAMES == ("nv", "mel", "bkl", "bcc", "akiec", "vasc", "df")
    for cls in CLASSES.values():
        for factor, values in FACTORS.items():
            probs = cls.factor_probs[factor]
            assert len(probs) == len(values) and min(probs) > 0 and sum(probs) == pytest.approx(1.0)
    # Size bins are disjoint, so a measured area names its bin.
    bins = [SIZE_AREA_FRACTION[s] for s in FACTORS["size"]]
    assert all(hi < next_lo for (_, hi), (next_lo, _) in zip(bins, bins[1:]))


def test_determinism_and_seed_dependence() -> None:
    a = synthderm_record(3, 17, SIZE)
    b = synthderm_record(3, 17, SIZE)
    assert a == b  # every column, image and mask bytes included
    other_seed = synthderm_record(4, 17, SIZE)
    assert (
        other_seed["image"] != a["image"]
        and other_seed["id"] != a["id"]
        and other_seed["group"] != a["group"]
    )
    assert synthderm_record(3, 18, SIZE)["image"] != a["image"]
    assert (
        a["id"] == "synthderm-3-000017" and a["source"] == "synthderm://3/17" and a["dataset"] == "synthderm"
    )
    # Factors do not depend on the rendered size; only the pixels do.
    big = synthderm_record(3, 17, 64)
    keys = list(FACTORS) + ["class", "lesion", "view"]
    assert {k: big["attributes"][k] for k in keys} == {k: a["attributes"][k] for k in keys}
    assert big["caption"] == a["caption"] and big["group"] == a["group"]
    # The factor-only path agrees with the full record.
    drawn = sample_factors(3, 17)
    assert drawn["label"] == a["label"] and drawn["factors"] == {k: a["attributes"][k] for k in FACTORS}


def test_records_validate_and_decode(sample: list[dict]) -> None:
    rows = [{**r, "split": "train"} for r in sample[:50]]
    table = records_to_table(rows)
    assert table.num_rows == 50
    assert "split" not in sample[0]
    for r in sample[:50]:
        image, mask = decode_png(r["image"], "RGB"), decode_png(r["mask"], "L")
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}
        with Image.open(__import__("io").BytesIO(r["image"])) as im:
            assert im.mode == "RGB"
        attrs = json.loads(json.dumps(r["attributes"]))
        assert attrs["class"] == r["label"] and all(attrs[f] in FACTORS[f] for f in FACTORS)


def test_iter_matches_single_records_on_any_range() -> None:
    got = list(iter_synthderm(2, 13, 17, 16))
    assert [r["id"] for r in got] == [f"synthderm-2-{i:06d}" for i in range(13, 17)]
    assert got[2] == synthderm_record(2, 15, 16)


def test_class_histogram_follows_ham10000() -> None:
    n = 2000
    counts = Counter(sample_factors(0, i)["label"] for i in range(n))
    total = sum(HAM10000_COUNTS.values())
    for name, ham in HAM10000_COUNTS.items():
        expected = ham / total
        # Binomial standard error at n=2000 is at most ~0.011 (nv); allow about 3 of them.
        assert abs(counts[name] / n - expected) < max(0.035, 3 * np.sqrt(expected * (1 - expected) / n)), name
    assert counts["nv"] > counts["mel"] > counts["vasc"] > 0 and counts["df"] > 0


@pytest.mark.parametrize("size", [32, 64])
def test_mask_area_and_centroid_match_size_and_position(size: int) -> None:
    for index in range(120 if size == 32 else 60):
        r = synthderm_record(8, index, size)
        attrs = r["attributes"]
        _, mask = _measure(r)
        area = mask.mean()
        ys, xs = np.nonzero(mask)
        cx, cy = (xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size
        assert size_of_area_fraction(area) == attrs["size"], (index, area, attrs)
        lo, hi = SIZE_AREA_FRACTION[attrs["size"]]
        # Rasterisation at 32 px moves the area by a few percent at most.
        assert lo * 0.85 < area < hi * 1.15, (index, area, attrs["size"])
        assert position_of_centroid(cx, cy) == attrs["position"], (index, cx, cy, attrs["position"])
        if attrs["position"] != "centre":
            assert min(abs(cx - 0.5), abs(cy - 0.5)) > 0.06, (index, cx, cy)
        assert attrs["area_fraction"] == pytest.approx(area, abs=1e-4)
        assert (attrs["centroid_x"], attrs["centroid_y"]) == pytest.approx((cx, cy), abs=1e-3)
        # count: a satellite is a second connected component of the mask.
        n_components = ndimage.label(mask)[1]
        assert n_components == (2 if attrs["count"] == "satellite" else 1), (index, n_components, attrs)


def test_pigment_is_the_lesion_colour(sample: list[dict]) -> None:
    colours: dict[str, list[np.ndarray]] = {p: [] for p in FACTORS["pigment"]}
    for r in sample:
        image, mask = _measure(r)
        colours[r["attributes"]["pigment"]].append(image[mask].mean(0))
    mean = {p: np.mean(v, axis=0) for p, v in colours.items() if v}
    assert set(mean) == set(FACTORS["pigment"])
    luma = {p: float(c @ [0.299, 0.587, 0.114]) for p, c in mean.items()}
    assert luma["black"] < luma["dark brown"] < luma["light brown"] < luma["pink"]
    assert max(luma["black"], luma["dark brown"]) + 20 < min(luma["light brown"], luma["pink"])
    assert mean["blue-grey"][2] > mean["blue-grey"][0] + 10  # bluish
    assert mean["pink"][0] > mean["pink"][1] + 50  # reddish
    assert mean["light brown"][0] > mean["light brown"][2] + 50  # warm brown


def test_vignetting_darkens_the_corners(sample: list[dict]) -> None:
    for r in sample[:80]:
        image, _ = _measure(r)
        gray = image.mean(2)
        corners = np.mean(
            [gray[:2, :2].mean(), gray[:2, -2:].mean(), gray[-2:, :2].mean(), gray[-2:, -2:].mean()]
        )
        ratio = corners / np.median(gray)
        assert (ratio < 0.5) == (r["attributes"]["illumination"] == "vignetted"), (r["id"], ratio)


def test_lesion_view_mapping_is_consistent() -> None:
    seen: dict[int, list[tuple[int, int]]] = {}
    for index in range(5 * GROUP_BLOCK):
        lesion, view, partner = lesion_of_index(1, index)
        seen.setdefault(lesion, []).append((index, view))
        if partner is not None:
            assert lesion_of_index(1, partner)[0] == lesion and lesion_of_index(1, partner)[1] == 1 - view
    # Lesion numbers are consecutive, and one lesion per block has two views.
    assert sorted(seen) == list(range(5 * (GROUP_BLOCK - 1)))
    assert sum(len(v) == 2 for v in seen.values()) == 5
    assert all(sorted(v for _, v in views) == [0, 1] for views in seen.values() if len(views) == 2)
    with pytest.raises(SynthDermError, match="index must be >= 0"):
        lesion_of_index(0, -1)


def test_two_views_share_label_and_anatomy_but_not_style(sample: list[dict]) -> None:
    groups: dict[str, list[dict]] = {}
    for r in sample:
        groups.setdefault(r["group"], []).append(r)
    shared = sum(len(g) for g in groups.values() if len(g) > 1)
    assert 0.15 <= shared / len(sample) <= 0.25
    pairs = [g for g in groups.values() if len(g) == 2]
    assert len(pairs) >= 15 and all(len(g) <= 2 for g in groups.values())
    for first, second in pairs:
        a, b = first["attributes"], second["attributes"]
        assert first["label"] == second["label"]
        assert {f: a[f] for f in ANATOMY_FACTORS} == {f: b[f] for f in ANATOMY_FACTORS}
        assert first["anatomy_text"] == second["anatomy_text"]
        assert any(a[f] != b[f] for f in STYLE_FACTORS), (a, b)
        assert first["style_text"] != second["style_text"]
        assert {a["view"], b["view"]} == {0, 1}
        assert a["paired_index"] == int(second["id"].rsplit("-", 1)[1])
        assert first["image"] != second["image"]


_CONNECTIVES = {"a", "in", "the", "on", "with", "lesion", "pigment"}


def _has_phrase(text: str, phrase: str) -> bool:
    # Whole-phrase match: "polarised dermoscopy" must not match inside "non-polarised dermoscopy".
    return re.search(r"(?<![\w-])" + re.escape(phrase) + r"(?![\w-])", text.lower()) is not None


def test_captions_carry_the_factor_texts_in_varied_interleaved_templates(sample: list[dict]) -> None:
    templates = Counter()
    for r in sample[:80]:
        attrs, caption = r["attributes"], r["caption"]
        templates[attrs["template"]] += 1
        anatomy_pos, style_pos = [], []
        for factor, value in attrs.items():
            if factor not in FACTORS:
                continue
            phrase = FACTOR_PHRASES[factor][value]
            assert _has_phrase(caption, phrase), (phrase, caption)
            own, other = (
                (r["anatomy_text"], r["style_text"])
                if factor in ANATOMY_FACTORS
                else (r["style_text"], r["anatomy_text"])
            )
            assert _has_phrase(own, phrase), (phrase, own)
            assert not _has_phrase(other, phrase), (phrase, other)
            # Values of the same factor that were not drawn are absent from the caption.
            for alt in FACTORS[factor]:
                if alt != value:
                    assert not _has_phrase(caption, FACTOR_PHRASES[factor][alt]), (alt, caption)
            (anatomy_pos if factor in ANATOMY_FACTORS else style_pos).append(caption.lower().index(phrase))
        # Interleaved: neither stream's phrases all come before the other's.
        assert min(style_pos) < max(anatomy_pos) and min(anatomy_pos) < max(style_pos), caption
        # Every content word of the per-factor texts is in the caption (connectives may differ).
        caption_words = set(re.findall(r"[a-z-]+", caption.lower()))
        for text in (r["anatomy_text"], r["style_text"]):
            assert set(re.findall(r"[a-z-]+", text)) - _CONNECTIVES <= caption_words, (text, caption)
    assert len(templates) >= 5
    assert len({r["caption"] for r in sample[:80]}) > 70


def test_classes_overlap_but_are_informative() -> None:
    """The Bayes classifier on the true factors is well above chance yet far from perfect."""
    rows = [sample_factors(9, i) for i in range(3000)]
    labels = np.array([CLASS_NAMES.index(r["label"]) for r in rows])
    loglik = np.zeros((len(rows), len(CLASS_NAMES)))
    for c, name in enumerate(CLASS_NAMES):
        probs = CLASSES[name].factor_probs
        for i, r in enumerate(rows):
            loglik[i, c] = sum(np.log(probs[f][FACTORS[f].index(v)]) for f, v in r["factors"].items())
    prior = np.log([CLASSES[c].prior for c in CLASS_NAMES])
    map_acc = ((loglik + prior).argmax(1) == labels).mean()
    pred = loglik.argmax(1)  # equal priors: balanced accuracy
    recalls = [(pred[labels == c] == c).mean() for c in range(len(CLASS_NAMES)) if (labels == c).any()]
    balanced = float(np.mean(recalls))
    assert map_acc < 0.9  # not separable
    assert map_acc > (labels == 0).mean() + 0.03  # beats always answering "nv"
    assert 2.5 / len(CLASS_NAMES) < balanced < 0.75


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(SynthDermError, match=r"size must be in \[8, 2048\], got 4"):
        synthderm_record(0, 0, 4)
    with pytest.raises(SynthDermError, match="seed must be >= 0"):
        synthderm_record(-1, 0, 32)
    with pytest.raises(SynthDermError, match="index must be an integer"):
        synthderm_record(0, "3", 32)  # type: ignore[arg-type]
    with pytest.raises(SynthDermError, match="stop must be >= 5"):
        list(iter_synthderm(0, 5, 2, 32))


def test_tiny_sizes_still_render() -> None:
    for index in range(20):
        r = synthderm_record(0, index, 8)
        image, mask = _measure(r)
        assert image.shape == (8, 8, 3) and mask.shape == (8, 8)


def test_contact_sheet(sample: list[dict], tmp_path) -> None:
    path = contact_sheet(sample[:10], tmp_path / "sheet" / "s.png", columns=4, scale=2)
    with Image.open(path) as im:
        # 4 columns of 64 px tiles with 2 px gutters; 3 rows of tile + 12 px label strip.
        assert im.size == (4 * (64 + 2) + 2, 3 * (64 + 12 + 2) + 2)
        sheet = np.asarray(im.convert("RGB"))
    first = np.asarray(Image.fromarray(decode_png(sample[0]["image"])).resize((64, 64), Image.NEAREST))
    assert np.array_equal(sheet[2:66, 2:66], first)
    with pytest.raises(SynthDermError, match="at least one record"):
        contact_sheet([], tmp_path / "empty.png")
