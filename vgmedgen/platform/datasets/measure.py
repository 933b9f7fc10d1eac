"""Measurement of masks and images: what a mask and an image can verify, as numbers and bins.

The captions written from these bins are in :mod:`vgmedgen.platform.datasets.captions`.

docs/datasets.md, section "Captions written from measurements": *anatomy* is what a lesion mask can verify (size,
position, shape, border, number of components, plus the body site from metadata); *style* is
what image statistics or acquisition metadata can verify (lesion and background colour,
brightness, contrast, vignetting, source cohort or device). The same functions later score
whether a generated image obeyed its prompt, so they take plain arrays, return plain
JSON-able dicts, and hold every threshold in a module constant.

Pure numpy/scipy; no file access. Shape legend: H, W image height and width.

Typical use::

    m = measure_mask(mask)                      # mask: (H, W) bool or 0/255 uint8
    s = measure_image(image, mask)              # image: (H, W, 3) uint8 RGB
    bins = describe_bins(m, s)                  # {"size": "medium", "position": "upper left", ...}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

__all__ = [
    "BRIGHTNESS_THRESHOLDS",
    "COLOUR_PALETTE",
    "CONTRAST_THRESHOLDS",
    "IRREGULAR_BORDER_THRESHOLD",
    "MIN_COMPONENT_FRACTION",
    "OVAL_ECCENTRICITY",
    "IRREGULAR_SOLIDITY",
    "SIZE_THRESHOLDS",
    "VIGNETTING_THRESHOLD",
    "border_bin",
    "colour_name",
    "count_bin",
    "describe_bins",
    "measure_image",
    "measure_mask",
    "position_bin",
    "shape_bin",
    "size_bin",
]

# ---------------------------------------------------------------------------------------------
# Thresholds (one place; the judges that score generated images read the same constants)
# ---------------------------------------------------------------------------------------------

#: Area-fraction bin edges: area < 0.07 -> "small", 0.07 <= area < 0.17 -> "medium", else
#: "large" (at 512 px: discs of radius ~76 and ~119 px). The edges sit in the gaps between
#: SynthDerm's size ranges (0.025-0.055, 0.085-0.14, 0.20-0.30; vgmedgen.platform.datasets.synthderm),
#: so a judge reading generated SynthDerm lesions with these bins agrees with the true factor.
SIZE_THRESHOLDS: tuple[float, float] = (0.07, 0.17)

#: Eccentricity of the largest component at or above which a convex shape is "oval" rather
#: than "round" (0.7 is an axis ratio of about 0.71).
OVAL_ECCENTRICITY = 0.7

#: Solidity (area / convex-hull area) below which a shape is "irregular" whatever its
#: eccentricity. A digitised disc or ellipse has solidity ~1.0.
IRREGULAR_SOLIDITY = 0.85

#: Border irregularity (perimeter / convex-hull perimeter) above which the border is
#: "irregular". A digitised disc measures ~1.0-1.05; a notched or star-like outline > 1.2.
IRREGULAR_BORDER_THRESHOLD = 1.15

#: Components smaller than this fraction of the image (and never smaller than 2 pixels) are
#: not counted: lossy JPEG masks leave specks that are not lesions.
MIN_COMPONENT_FRACTION = 0.0002

#: Mean luminance (0..1) edges: below the first "dark", above the second "bright".
BRIGHTNESS_THRESHOLDS: tuple[float, float] = (0.35, 0.65)

#: RMS contrast (std of luminance, 0..1) edges: below the first "low", above the second "high".
CONTRAST_THRESHOLDS: tuple[float, float] = (0.08, 0.20)

#: Centre-to-corner brightness ratio above which the image counts as vignetted.
VIGNETTING_THRESHOLD = 1.25

#: Small fixed palette for colour names (sRGB). Chosen to cover dermoscopy (skin tones and
#: pigments), endoscopy (pinks and reds) and ultrasound (greys); matched in CIELAB.
COLOUR_PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "dark grey": (80, 80, 80),
    "grey": (128, 128, 128),
    "light grey": (190, 190, 190),
    "white": (240, 240, 240),
    "dark brown": (70, 40, 25),
    "brown": (120, 75, 45),
    "light brown": (175, 125, 85),
    "tan": (210, 170, 130),
    "light pink": (240, 200, 190),
    "pink": (225, 150, 150),
    "red": (190, 50, 45),
    "dark red": (120, 25, 30),
    "orange": (220, 130, 60),
    "yellow": (220, 200, 90),
    "blue-grey": (100, 115, 135),
    "purple": (120, 70, 120),
}


# ---------------------------------------------------------------------------------------------
# Mask measurements
# ---------------------------------------------------------------------------------------------


def _as_bool_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool from a bool or 0/255 (or 0/1) mask; rejects other shapes."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be (H, W), got shape {mask.shape}")
    if mask.dtype == bool:
        return mask
    # 0/255 masks threshold at 127 (as stored in records); 0/1 masks at 0.
    return mask > (127 if mask.max(initial=0) > 1 else 0)


def _perimeter(component: np.ndarray) -> float:
    """Length of a binary region's outline through its boundary pixel centres.

    Benkrid-Crookes style estimate: straight runs of boundary pixels count 1 per pixel,
    diagonal runs sqrt(2), corners the mean of both. Counting pixel edges instead would
    overestimate a digital disc's perimeter by 4/pi and make every disc look irregular.
    """
    cross = ndimage.generate_binary_structure(2, 1)
    eroded = ndimage.binary_erosion(component, cross, border_value=0)
    border = (component & ~eroded).astype(np.uint8)  # (H, W) 0/1
    # Each border pixel gets 1 + 2 * (4-neighbours on the border) + 10 * (diagonal ones); the
    # centre weight is the only odd one, so only border pixels land on the odd codes below.
    kernel = np.array([[10, 2, 10], [2, 1, 2], [10, 2, 10]], dtype=np.int32)
    codes = ndimage.convolve(border.astype(np.int32), kernel, mode="constant", cval=0)
    weights = np.zeros(50)
    weights[[5, 7, 15, 17, 25, 27]] = 1.0
    weights[[21, 33]] = np.sqrt(2.0)
    weights[[13, 23]] = (1.0 + np.sqrt(2.0)) / 2.0
    histogram = np.bincount(codes.ravel(), minlength=50)[:50]
    return float(histogram @ weights)


def _hull_stats(component: np.ndarray) -> tuple[float, float]:
    """(solidity, border irregularity) of one connected region.

    Solidity = pixels / pixels whose centres lie in the convex hull of the region's pixel
    centres (<= 1, and 1 for a digitised convex shape). Border irregularity = perimeter /
    convex-hull perimeter (~1 for convex shapes, larger for notched or lobed outlines).
    """
    ys, xs = np.nonzero(component)
    n = len(xs)
    cross = ndimage.generate_binary_structure(2, 1)
    boundary = component & ~ndimage.binary_erosion(component, cross, border_value=0)
    by, bx = np.nonzero(boundary)
    points = np.stack([bx, by], axis=1).astype(np.float64)  # (P, 2) x, y
    try:
        hull = ConvexHull(points)
    except (QhullError, ValueError):
        # Fewer than 3 points or all on one line: a segment is its own hull.
        return 1.0, 1.0
    # Pixels inside the hull: a point p is inside iff a x + b y + c <= 0 for every facet
    # (a, b, c). The hull is convex, so each row's inside pixels form one x interval; bound it
    # facet by facet instead of testing every pixel of the bounding box (10x faster at 512 px).
    rows = np.arange(ys.min(), ys.max() + 1, dtype=np.float64)  # (R,)
    a, b, c = hull.equations[:, 0], hull.equations[:, 1], hull.equations[:, 2]  # (F,) each
    tol = 1e-9
    rhs = -(c[None, :] + b[None, :] * rows[:, None]) + tol  # (R, F): a x <= rhs
    lo = np.full(len(rows), -np.inf)
    hi = np.full(len(rows), np.inf)
    pos, neg, flat = a > tol, a < -tol, np.abs(a) <= tol
    if pos.any():
        hi = np.minimum(hi, (rhs[:, pos] / a[pos]).min(axis=1))
    if neg.any():
        lo = np.maximum(lo, (rhs[:, neg] / a[neg]).max(axis=1))
    if flat.any():
        # Horizontal facets constrain rows only.
        hi = np.where((rhs[:, flat] >= 0).all(axis=1), hi, -np.inf)
    counts = np.floor(hi) - np.ceil(lo) + 1  # (R,) pixel centres are integer coordinates
    hull_pixels = int(np.clip(np.nan_to_num(counts, neginf=0.0, posinf=0.0), 0, None).sum())
    solidity = n / max(hull_pixels, n)
    irregularity = _perimeter(component) / hull.area if hull.area > 0 else 1.0
    return float(solidity), float(irregularity)


def measure_mask(mask: np.ndarray) -> dict[str, Any]:
    """Anatomy measurements of a lesion mask.

    Args:
        mask: (H, W) bool, or uint8 0/255 (thresholded at 127) or 0/1.

    Returns:
        JSON-able dict:
        ``area`` (fraction of the image), ``centroid_x``/``centroid_y`` (of all lesion pixels,
        in [0, 1], x to the right, y downwards), ``spread`` (mean distance of lesion pixels from
        the centroid, in image fractions; 2r/3 for a disc of radius r), ``bbox`` ([x0, y0, x1, y1] as fractions, x1/y1
        exclusive), ``n_components`` (8-connected regions larger than
        :data:`MIN_COMPONENT_FRACTION`), ``largest_component_area``, and for the largest
        component ``eccentricity`` (0 disc .. 1 line, from second moments), ``solidity``
        (area / convex-hull area) and ``border_irregularity`` (perimeter / hull perimeter).
        An empty mask gives area 0, centroid (0.5, 0.5), spread 0, zero components, and
        ``None`` for the measures that need a lesion.
    """
    fg = _as_bool_mask(mask)  # (H, W)
    h, w = fg.shape
    total = fg.sum()
    labels, n_raw = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n_raw + 1)[1:]  # (n_raw,)
    min_pixels = max(2, int(np.ceil(MIN_COMPONENT_FRACTION * h * w)))
    n_components = int((sizes >= min_pixels).sum())
    if total == 0:
        return {
            "area": 0.0,
            "centroid_x": 0.5,
            "centroid_y": 0.5,
            "spread": 0.0,
            "bbox": None,
            "n_components": 0,
            "largest_component_area": 0.0,
            "eccentricity": None,
            "solidity": None,
            "border_irregularity": None,
        }
    ys, xs = np.nonzero(fg)
    # Pixel centres at +0.5, so a full-image mask has its centroid at exactly 0.5.
    cx = (xs.mean() + 0.5) / w
    cy = (ys.mean() + 0.5) / h
    spread = np.sqrt(((xs + 0.5) / w - cx) ** 2 + ((ys + 0.5) / h - cy) ** 2).mean()
    largest = labels == (int(np.argmax(sizes)) + 1)  # (H, W)
    ly, lx = np.nonzero(largest)
    cov = np.cov(np.stack([lx, ly]).astype(np.float64)) if len(lx) > 1 else np.zeros((2, 2))
    eig = np.sort(np.linalg.eigvalsh(cov))[::-1]  # (2,) largest first
    eccentricity = float(np.sqrt(max(0.0, 1.0 - eig[1] / eig[0]))) if eig[0] > 1e-12 else 0.0
    solidity, irregularity = _hull_stats(largest)
    return {
        "area": float(total / (h * w)),
        "centroid_x": float(cx),
        "centroid_y": float(cy),
        "spread": float(spread),
        "bbox": [
            float(xs.min() / w),
            float(ys.min() / h),
            float((xs.max() + 1) / w),
            float((ys.max() + 1) / h),
        ],
        "n_components": max(n_components, 1),
        "largest_component_area": float(len(lx) / (h * w)),
        "eccentricity": eccentricity,
        "solidity": solidity,
        "border_irregularity": irregularity,
    }


# ---------------------------------------------------------------------------------------------
# Image measurements
# ---------------------------------------------------------------------------------------------


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in 0..255 -> (..., 3) CIELAB (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PALETTE_NAMES = list(COLOUR_PALETTE)
_PALETTE_LAB = _srgb_to_lab(np.array([COLOUR_PALETTE[n] for n in _PALETTE_NAMES]))  # (K, 3)


def colour_name(rgb: Any) -> str:
    """Name of the :data:`COLOUR_PALETTE` entry nearest to an sRGB colour (0..255) in CIELAB."""
    lab = _srgb_to_lab(np.asarray(rgb, dtype=np.float64).reshape(1, 3))  # (1, 3)
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE_LAB - lab) ** 2).sum(axis=1)))]


def _luminance(image: np.ndarray) -> np.ndarray:
    """(H, W) Rec. 709 luma of an (H, W, 3) uint8 image, in 0..1 (on gamma-encoded values)."""
    return image.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722]) / 255.0


def measure_image(image: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Any]:
    """Style measurements of an image, split by the lesion mask when there is one.

    Args:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) lesion mask (bool, 0/255 or 0/1), or None when the dataset has none.

    Returns:
        JSON-able dict: ``lesion_rgb``/``background_rgb`` (mean RGB 0..255; lesion ``None``
        without lesion pixels; background = the whole image without a mask),
        ``lesion_colour``/``background_colour`` (palette names), ``brightness`` (mean luma,
        0..1), ``contrast`` (std of luma), ``vignetting`` (mean background luma in the central
        third over that in the four corner squares of side min(H, W) / 6; > 1 means darker
        corners; lesion pixels are left out so a dark central lesion does not hide it).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"an image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    h, w, _ = image.shape
    fg = np.zeros((h, w), dtype=bool) if mask is None else _as_bool_mask(mask)
    if fg.shape != (h, w):
        raise ValueError(f"mask shape {fg.shape} differs from image shape {(h, w)}")
    pixels = image.reshape(-1, 3).astype(np.float64)  # (H*W, 3)
    flat = fg.ravel()
    lesion_rgb = pixels[flat].mean(axis=0) if flat.any() else None
    background_rgb = pixels[~flat].mean(axis=0) if (~flat).any() else pixels.mean(axis=0)
    luma = _luminance(image)  # (H, W)

    side = max(1, min(h, w) // 6)
    corners = np.zeros((h, w), dtype=bool)
    corners[:side, :side] = corners[:side, -side:] = corners[-side:, :side] = corners[-side:, -side:] = True
    centre = np.zeros((h, w), dtype=bool)
    centre[h // 3 : h - h // 3, w // 3 : w - w // 3] = True

    def region_mean(region: np.ndarray) -> float:
        # Prefer background pixels; fall back to all pixels where the lesion covers the region.
        bg = region & ~fg
        return float(luma[bg].mean() if bg.any() else luma[region].mean())

    vignetting = region_mean(centre) / max(region_mean(corners), 1e-3)
    return {
        "lesion_rgb": None if lesion_rgb is None else [round(float(v), 2) for v in lesion_rgb],
        "background_rgb": [round(float(v), 2) for v in background_rgb],
        "lesion_colour": None if lesion_rgb is None else colour_name(lesion_rgb),
        "background_colour": colour_name(background_rgb),
        "brightness": float(luma.mean()),
        "contrast": float(luma.std()),
        "vignetting": float(vignetting),
    }


# ---------------------------------------------------------------------------------------------
# Bins
# ---------------------------------------------------------------------------------------------


def size_bin(area: float) -> str:
    """Size bin "small" / "medium" / "large" by area fraction (edges in :data:`SIZE_THRESHOLDS`)."""
    lo, hi = SIZE_THRESHOLDS
    return "small" if area < lo else ("medium" if area < hi else "large")


def position_bin(cx: float, cy: float) -> str:
    """Name of the cell of a 3x3 grid holding (cx, cy) in [0, 1] (y downwards).

    One of "upper left", "upper", "upper right", "left", "centre", "right", "lower left",
    "lower", "lower right".
    """
    col = "left" if cx < 1 / 3 else ("right" if cx > 2 / 3 else "")
    row = "upper" if cy < 1 / 3 else ("lower" if cy > 2 / 3 else "")
    return " ".join(p for p in (row, col) if p) or "centre"


def shape_bin(eccentricity: float | None, solidity: float | None) -> str | None:
    """Shape bin "round" / "oval" / "irregular" (None without a lesion); irregular wins over oval."""
    if eccentricity is None or solidity is None:
        return None
    if solidity < IRREGULAR_SOLIDITY:
        return "irregular"
    return "oval" if eccentricity >= OVAL_ECCENTRICITY else "round"


def border_bin(border_irregularity: float | None) -> str | None:
    """Border bin "regular" / "irregular" (None without a lesion)."""
    if border_irregularity is None:
        return None
    return "irregular" if border_irregularity > IRREGULAR_BORDER_THRESHOLD else "regular"


def count_bin(n_components: int) -> str:
    """Count bin "none" / "one" / "two" / "three" / "multiple"."""
    return {0: "none", 1: "one", 2: "two", 3: "three"}.get(n_components, "multiple")


def describe_bins(
    mask_measures: Mapping[str, Any] | None, image_measures: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The categorical attributes that prompts name and that judges score.

    Keys: ``size``, ``position``, ``shape``, ``border``, ``count`` (from the mask; absent when
    ``mask_measures`` is None; ``None`` values for an empty mask except count "none"),
    ``lesion_colour``, ``background_colour``, ``brightness`` ("dark"/"medium"/"bright"),
    ``contrast`` ("low"/"moderate"/"high"), ``illumination`` ("even"/"vignetted").
    """
    out: dict[str, Any] = {}
    if mask_measures is not None:
        empty = mask_measures["n_components"] == 0
        out["size"] = None if empty else size_bin(mask_measures["area"])
        out["position"] = (
            None if empty else position_bin(mask_measures["centroid_x"], mask_measures["centroid_y"])
        )
        out["shape"] = shape_bin(mask_measures["eccentricity"], mask_measures["solidity"])
        out["border"] = border_bin(mask_measures["border_irregularity"])
        out["count"] = count_bin(mask_measures["n_components"])
    if image_measures is not None:
        b_lo, b_hi = BRIGHTNESS_THRESHOLDS
        c_lo, c_hi = CONTRAST_THRESHOLDS
        b, c = image_measures["brightness"], image_measures["contrast"]
        out["lesion_colour"] = image_measures["lesion_colour"]
        out["background_colour"] = image_measures["background_colour"]
        out["brightness"] = "dark" if b < b_lo else ("bright" if b > b_hi else "medium")
        out["contrast"] = "low" if c < c_lo else ("high" if c > c_hi else "moderate")
        out["illumination"] = "vignetted" if image_measures["vignetting"] > VIGNETTING_THRESHOLD else "even"
    return out
