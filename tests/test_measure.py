"""Prompts from data: mask and image measurements, bins, and the text builders."""

from __future__ import annotations

import numpy as np
import pytest

from vgmedgen.platform.datasets import measure
from vgmedgen.platform.datasets.captions import (
    anatomy_phrases,
    anatomy_text,
    caption,
    style_phrases,
    style_text,
)
from vgmedgen.platform.datasets.measure import (
    colour_name,
    describe_bins,
    measure_image,
    measure_mask,
    position_bin,
    size_bin,
)


def disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    """(h, w) bool disc with pixel centres at +0.5."""
    y, x = np.mgrid[:h, :w]
    return (x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 <= r * r


def test_disc_area_centroid_bbox_shape() -> None:
    mask = disc(60, 80, cx=20, cy=15, r=10)
    m = measure_mask(mask)
    assert m["area"] == pytest.approx(mask.sum() / (60 * 80))
    assert m["area"] == pytest.approx(np.pi * 100 / 4800, rel=0.03)
    assert m["centroid_x"] == pytest.approx(20 / 80, abs=1e-9)
    assert m["centroid_y"] == pytest.approx(15 / 60, abs=1e-9)
    assert m["bbox"] == pytest.approx([10 / 80, 5 / 60, 30 / 80, 25 / 60])
    assert m["n_components"] == 1
    assert m["eccentricity"] < 0.1
    assert m["solidity"] > 0.97
    assert 0.95 < m["border_irregularity"] < measure.IRREGULAR_BORDER_THRESHOLD
    # Spread = mean distance from the centroid; for a uniform disc that is 2r/3.
    assert measure_mask(disc(100, 100, 50, 50, 30))["spread"] == pytest.approx(0.2, rel=0.02)
    bins = describe_bins(m, None)
    assert bins == {
        "size": "small",  # area 0.065
        "position": "upper left",
        "shape": "round",
        "border": "regular",
        "count": "one",
    }


def test_uint8_and_01_masks_measure_alike() -> None:
    mask = disc(30, 40, 20, 15, 6)
    as_bool = measure_mask(mask)
    assert measure_mask(mask.astype(np.uint8) * 255) == as_bool
    assert measure_mask(mask.astype(np.uint8)) == as_bool


def test_satellite_counts_two_components() -> None:
    main, satellite = disc(30, 40, 12, 10, 6), disc(30, 40, 32, 22, 2)
    m = measure_mask(main | satellite)
    assert m["n_components"] == 2
    assert m["area"] == pytest.approx((main.sum() + satellite.sum()) / 1200)
    assert m["largest_component_area"] == pytest.approx(main.sum() / 1200)
    # Centroid of all lesion pixels, pulled towards the satellite.
    ys, xs = np.nonzero(main | satellite)
    assert m["centroid_x"] == pytest.approx((xs.mean() + 0.5) / 40)
    # Shape measures describe the largest component only (the satellite does not make it irregular).
    assert m["solidity"] > 0.97
    assert describe_bins(m, None)["count"] == "two"
    assert anatomy_text(m).startswith("two lesions of medium total extent, the largest round")


def test_tiny_specks_are_not_components() -> None:
    mask = disc(100, 100, 50, 50, 10)
    mask[2, 2] = True  # a one-pixel JPEG speck
    assert measure_mask(mask)["n_components"] == 1


def test_empty_mask() -> None:
    m = measure_mask(np.zeros((20, 20), np.uint8))
    assert m["area"] == 0.0 and m["n_components"] == 0
    assert (m["centroid_x"], m["centroid_y"], m["spread"]) == (0.5, 0.5, 0.0)
    assert m["bbox"] is None and m["eccentricity"] is None and m["solidity"] is None
    assert anatomy_text(m) == "no visible lesion"
    assert anatomy_text(m, site="back") == "no visible lesion, on the back"
    assert describe_bins(m, None)["count"] == "none"


def test_ellipse_is_oval_and_star_is_irregular() -> None:
    y, x = np.mgrid[:100, :100]
    ellipse = ((x + 0.5 - 50) / 30) ** 2 + ((y + 0.5 - 50) / 12) ** 2 <= 1
    m = measure_mask(ellipse)
    # Axis ratio 0.4 -> eccentricity sqrt(1 - 0.16) = 0.917.
    assert m["eccentricity"] == pytest.approx(np.sqrt(1 - 0.4**2), abs=0.02)
    assert describe_bins(m, None)["shape"] == "oval"
    theta, radius = np.arctan2(y - 50, x - 50), np.hypot(x - 50, y - 50)
    star = radius < 25 + 10 * np.cos(6 * theta)
    s = measure_mask(star)
    assert s["solidity"] < measure.IRREGULAR_SOLIDITY
    assert s["border_irregularity"] > 1.3
    assert describe_bins(s, None)["shape"] == "irregular"
    assert describe_bins(s, None)["border"] == "irregular"


def test_size_bins_agree_with_synthderm_ranges() -> None:
    from vgmedgen.platform.datasets.synthderm import SIZE_AREA_FRACTION

    for name, (lo, hi) in SIZE_AREA_FRACTION.items():
        assert size_bin(lo) == name and size_bin(hi) == name


def test_size_and_position_bins() -> None:
    lo, hi = measure.SIZE_THRESHOLDS
    assert (size_bin(0.0), size_bin(lo - 1e-6), size_bin(lo), size_bin(hi - 1e-6), size_bin(hi)) == (
        "small",
        "small",
        "medium",
        "medium",
        "large",
    )
    grid = [[position_bin(cx, cy) for cx in (0.1, 0.5, 0.9)] for cy in (0.1, 0.5, 0.9)]
    assert grid == [
        ["upper left", "upper", "upper right"],
        ["left", "centre", "right"],
        ["lower left", "lower", "lower right"],
    ]


def test_measure_image_colours_and_statistics() -> None:
    mask = disc(30, 40, 20, 15, 6)
    image = np.zeros((30, 40, 3), np.uint8)
    image[:] = (240, 200, 190)
    image[mask] = (70, 40, 25)
    s = measure_image(image, mask)
    assert s["lesion_rgb"] == [70.0, 40.0, 25.0] and s["background_rgb"] == [240.0, 200.0, 190.0]
    assert s["lesion_colour"] == "dark brown" and s["background_colour"] == "light pink"
    luma = image.astype(float) @ np.array([0.2126, 0.7152, 0.0722]) / 255
    assert s["brightness"] == pytest.approx(luma.mean())
    assert s["contrast"] == pytest.approx(luma.std())
    # The lesion is central and dark, but vignetting looks at background only: even.
    assert s["vignetting"] == pytest.approx(1.0)
    no_mask = measure_image(image, None)
    assert no_mask["lesion_rgb"] is None and no_mask["lesion_colour"] is None


def test_vignetting_detected() -> None:
    y, x = np.mgrid[:60, :60]
    falloff = 1.0 - 0.8 * (np.hypot(x - 30, y - 30) / 42.0) ** 2  # dark corners
    image = (np.clip(falloff, 0, 1)[:, :, None] * np.array([220, 180, 160])).astype(np.uint8)
    s = measure_image(image)
    assert s["vignetting"] > measure.VIGNETTING_THRESHOLD
    assert describe_bins(None, s)["illumination"] == "vignetted"
    flat = np.full((60, 60, 3), 150, np.uint8)
    assert describe_bins(None, measure_image(flat))["illumination"] == "even"


def test_colour_names_from_palette() -> None:
    for name, rgb in measure.COLOUR_PALETTE.items():
        assert colour_name(rgb) == name
    assert colour_name((5, 5, 5)) == "black"
    assert colour_name((200, 40, 40)) == "red"


def test_text_builders_site_cohort_and_caption() -> None:
    mask = disc(30, 40, 8, 6, 3)  # area 0.024: small
    image = np.full((30, 40, 3), (240, 200, 190), np.uint8)
    image[mask] = (20, 20, 20)
    m, s = measure_mask(mask), measure_image(image, mask)
    a = anatomy_text(m, site="lower extremity")
    assert (
        a
        == "a single small round lesion in the upper left of the frame with a regular border, on the lower extremity"
    )
    assert anatomy_text(m, site="unknown").endswith("regular border")  # unknown site left out
    st = style_text(s, modality="dermoscopic image", background="skin", cohort="vidir_molemax")
    assert st.startswith("dermoscopic image, black lesion on light pink skin")
    assert st.endswith("vidir molemax cohort")
    ap = anatomy_phrases(m, site="back")
    sp = style_phrases(s, modality="dermoscopic image", background="skin", cohort="rosendahl")
    texts = {caption(ap, sp, f"ISIC_{i:07d}") for i in range(40)}
    assert len(texts) > 1  # several templates in use
    for text in texts:
        # Every phrase of both factors is in every caption.
        for phrase in [*ap.values(), *sp.values()]:
            assert phrase.lower() in text.lower()
        assert text[0].isupper() and text.endswith(".")
    assert caption(ap, sp, "ISIC_0000001") == caption(ap, sp, "ISIC_0000001")


def test_anatomy_without_mask_and_other_nouns() -> None:
    assert anatomy_text(None, site="face") == "a lesion, on the face"
    assert anatomy_text(measure_mask(disc(30, 30, 15, 15, 12)), noun="polyp").startswith(
        "a single large round polyp"
    )
    assert anatomy_text(measure_mask(np.zeros((8, 8), bool)), noun="polyp") == "no visible polyp"


def test_measure_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"mask must be \(H, W\)"):
        measure_mask(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        measure_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="differs from image shape"):
        measure_image(np.zeros((4, 4, 3), np.uint8), np.zeros((5, 5), bool))
