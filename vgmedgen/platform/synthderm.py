"""SynthDerm: a procedural dermoscopy look-alike with known factors (shared/DATASETS.md, "SynthDerm").

Every record is a pure function of ``(seed, index)`` (and the rendered ``size``): no global random
state, no files. Each record draws its factors from the distribution of its class, renders an RGB
image and a 0/255 lesion mask with numpy (vectorised over pixels), and writes a free caption whose
anatomy and style phrases are interleaved in one of several templates, plus the per-factor texts.

Factors (the names are constants: judges and prompts use them):

- anatomy: shape, size, position, border, count. They are properties of the lesion and are
  verifiable from the mask (area fraction bins :data:`SIZE_AREA_FRACTION`, centroid regions,
  border softness, number of components).
- style: skin_tone, pigment, illumination, artefact, device. Skin tone and pigment belong to the
  lesion (same patient, same lesion); illumination, artefact and device belong to the image.

Groups: indices come in blocks of :data:`GROUP_BLOCK`; in every block one lesion is imaged twice
(``GROUP_BLOCK - 1`` lesions per block), so 2 of every 10 records (20%) share their group with one
other record, as HAM10000 lesions are imaged several times. The second view keeps the label, the
anatomy factors, skin tone and pigment, and differs in at least one of illumination, artefact and
device (a different acquisition of the same lesion), with a slight rotation of the lesion.

Coordinates: pixel centres at ``i + 0.5``; x grows rightwards, y downwards ("upper" = small y).
Shapes are star-shaped around the lesion origin and described by a radius per angle
``r(theta)`` sampled at :data:`_N_THETA` angles, which makes area and centroid analytic (so the
rendered mask hits its size bin and position exactly up to pixel quantisation) and rendering one
interpolation per pixel. Lobulated outlines are unions of discs that contain the origin, which
are star-shaped too.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from vgmedgen.platform.records import decode_png, encode_png

__all__ = [
    "ANATOMY_FACTORS",
    "CLASSES",
    "CLASS_NAMES",
    "FACTORS",
    "FACTOR_PHRASES",
    "GROUP_BLOCK",
    "HAM10000_COUNTS",
    "PIGMENT_RGB",
    "SIZE_AREA_FRACTION",
    "SKIN_RGB",
    "STYLE_FACTORS",
    "LesionClass",
    "SynthDermError",
    "anatomy_text_of",
    "attributes_of",
    "contact_sheet",
    "iter_synthderm",
    "lesion_of_index",
    "position_of_centroid",
    "sample_factors",
    "size_of_area_fraction",
    "style_text_of",
    "synthderm_record",
]

# ---------------------------------------------------------------------------------------------
# Factors and their words
# ---------------------------------------------------------------------------------------------

FACTORS: dict[str, tuple[str, ...]] = {
    # anatomy
    "shape": ("round", "oval", "irregular", "lobulated"),
    "size": ("small", "medium", "large"),
    "position": ("centre", "upper left", "upper right", "lower left", "lower right"),
    "border": ("sharp", "blurred"),
    "count": ("one", "satellite"),
    # style
    "skin_tone": ("light", "medium", "dark"),
    "pigment": ("light brown", "dark brown", "black", "pink", "blue-grey"),
    "illumination": ("even", "vignetted"),
    "artefact": ("none", "hair", "ruler", "bubbles"),
    "device": ("polarised", "non-polarised"),
}
ANATOMY_FACTORS: tuple[str, ...] = ("shape", "size", "position", "border", "count")
STYLE_FACTORS: tuple[str, ...] = ("skin_tone", "pigment", "illumination", "artefact", "device")
# Style factors of the lesion (shared by both views) and of the acquisition (may differ per view).
_LESION_STYLE = ("skin_tone", "pigment")
_ACQUISITION_STYLE = ("illumination", "artefact", "device")
_LESION_FACTORS = ANATOMY_FACTORS + _LESION_STYLE

# The phrase of each factor value. Captions, anatomy_text and style_text all contain exactly these
# phrases (templates only vary the words around them and the order), so a text head can learn
# them and a test can check them.
FACTOR_PHRASES: dict[str, dict[str, str]] = {
    "shape": {"round": "round", "oval": "oval", "irregular": "irregular", "lobulated": "lobulated"},
    "size": {"small": "small", "medium": "medium-sized", "large": "large"},
    "position": {p: p for p in FACTORS["position"]},
    "border": {"sharp": "sharp border", "blurred": "blurred border"},
    "count": {"one": "solitary", "satellite": "with a satellite lesion"},
    "skin_tone": {"light": "light skin", "medium": "medium skin", "dark": "dark skin"},
    "pigment": {p: p for p in FACTORS["pigment"]},
    "illumination": {"even": "even illumination", "vignetted": "vignetted illumination"},
    "artefact": {
        "none": "no artefacts",
        "hair": "hair artefacts",
        "ruler": "ruler marks",
        "bubbles": "gel bubbles",
    },
    "device": {"polarised": "polarised dermoscopy", "non-polarised": "non-polarised dermoscopy"},
}

# Mask area / image area per size bin. The bins are disjoint with wide gaps, so a measured area
# fraction names its bin unambiguously (see size_of_area_fraction).
SIZE_AREA_FRACTION: dict[str, tuple[float, float]] = {
    "small": (0.025, 0.055),
    "medium": (0.085, 0.14),
    "large": (0.20, 0.30),
}
# Target centroid offsets from the image centre, as fractions of the side. Quadrant lesions sit at
# least _QUADRANT_MIN_OFFSET off-centre on both axes, centred ones within _CENTRE_MAX_OFFSET.
_QUADRANT_MIN_OFFSET = 0.12
_QUADRANT_MAX_OFFSET = 0.28
_CENTRE_MAX_OFFSET = 0.04
# The boundary used to read a measured centroid back into a position (between the two ranges).
_CENTRE_BOX = 0.08

# Colours (RGB, 0-255), chosen after dermoscopy photographs: skin under a dermatoscope is a warm
# pinkish beige; pigments from tan to black, pink/red for vascular and amelanotic lesions, and the
# blue-grey of deep melanin.
SKIN_RGB: dict[str, tuple[float, float, float]] = {
    "light": (232.0, 190.0, 172.0),
    "medium": (200.0, 146.0, 114.0),
    "dark": (128.0, 86.0, 64.0),
}
PIGMENT_RGB: dict[str, tuple[float, float, float]] = {
    "light brown": (162.0, 100.0, 82.0),
    "dark brown": (100.0, 58.0, 46.0),
    "black": (44.0, 32.0, 36.0),
    "pink": (222.0, 118.0, 132.0),
    "blue-grey": (108.0, 116.0, 146.0),
}
_HAIR_RGB = np.array([30.0, 22.0, 18.0], dtype=np.float32)
_RULER_RGB = np.array([34.0, 34.0, 38.0], dtype=np.float32)
# Secondary colours inside heterogeneous lesions (regression white, deep red lacunae, ...).
_SECONDARY_RGB: dict[str, tuple[float, float, float]] = {
    "darker": (0.0, 0.0, 0.0),  # placeholder: "darker" means 0.6 x the pigment colour
    "black": (40.0, 30.0, 34.0),
    "blue-grey": (104.0, 114.0, 150.0),
    "white": (236.0, 222.0, 220.0),
    "red": (176.0, 44.0, 58.0),
    "purple": (112.0, 52.0, 92.0),
    "tan": (186.0, 132.0, 100.0),
}


class SynthDermError(ValueError):
    """A bad argument to a SynthDerm function; the message says which and what is allowed."""


# ---------------------------------------------------------------------------------------------
# Classes: HAM10000's seven diagnoses, each a distribution over every factor
# ---------------------------------------------------------------------------------------------

HAM10000_COUNTS: dict[str, int] = {
    "nv": 6705,
    "mel": 1113,
    "bkl": 1099,
    "bcc": 514,
    "akiec": 327,
    "vasc": 142,
    "df": 115,
}


@dataclass(frozen=True)
class LesionClass:
    """One diagnosis: its prior and a categorical distribution over the values of every factor.

    Attributes:
        name: the HAM10000 ``dx`` code.
        full_name: the diagnosis in words.
        prior: the class frequency in HAM10000 (counts / 10015).
        factor_probs: factor -> probabilities over ``FACTORS[factor]`` (in that order, sum 1).
        heterogeneity: (low, high) of the uniform draw of internal colour variation in [0, 1].
        secondary: probability that the lesion shows a second colour, and the colours to pick from.
        central_secondary: the second colour sits in the centre (dermatofibroma's white patch)
            rather than in patches.
        centre_darkening: how much darker the lesion centre is than its rim (nevus-like).
    """

    name: str
    full_name: str
    prior: float
    factor_probs: Mapping[str, tuple[float, ...]]
    heterogeneity: tuple[float, float]
    secondary: tuple[float, tuple[str, ...]]
    central_secondary: bool
    centre_darkening: float


def _class(
    name: str,
    full_name: str,
    weights: Mapping[str, Sequence[float]],
    heterogeneity: tuple[float, float],
    secondary: tuple[float, tuple[str, ...]],
    central_secondary: bool = False,
    centre_darkening: float = 0.06,
) -> LesionClass:
    """Build a class from unnormalised weights; factors not given use the shared nuisance weights."""
    probs: dict[str, tuple[float, ...]] = {}
    for factor, values in FACTORS.items():
        if factor not in weights and factor not in _SHARED_WEIGHTS:
            raise SynthDermError(f"class {name!r}: no weights for factor {factor!r} and no shared default")
        w = np.asarray(weights[factor] if factor in weights else _SHARED_WEIGHTS[factor], dtype=np.float64)
        if w.shape != (len(values),) or (w <= 0).any():
            # A zero weight would make a factor value perfectly diagnostic; keep every class overlapping.
            raise SynthDermError(
                f"class {name!r}: factor {factor!r} needs {len(values)} positive weights, got {w}"
            )
        probs[factor] = tuple(float(p) for p in w / w.sum())
    prior = HAM10000_COUNTS[name] / sum(HAM10000_COUNTS.values())
    return LesionClass(
        name, full_name, prior, probs, heterogeneity, secondary, central_secondary, centre_darkening
    )


# Factors that do not depend on the diagnosis (position, acquisition) share these weights. Most
# HAM10000 images are centred, hence the heavier centre.
_SHARED_WEIGHTS: dict[str, tuple[float, ...]] = {
    "position": (40, 15, 15, 15, 15),
    "skin_tone": (45, 35, 20),
    "illumination": (60, 40),
    "artefact": (50, 22, 14, 14),
    "device": (50, 50),
}

# Order of weights follows FACTORS: shape (round, oval, irregular, lobulated), size (small,
# medium, large), border (sharp, blurred), count (one, satellite), pigment (light brown, dark
# brown, black, pink, blue-grey). The distributions overlap on purpose: no factor value is
# exclusive to a class, so a classifier cannot be perfect: the Bayes classifier on the true
# factors reaches about 0.74 accuracy (always "nv" gives 0.67) and, with equal priors, about 0.48
# balanced accuracy (chance 0.14). Minority classes keep their own profile, so images of them
# (augmentation) carry information. Heterogeneity and second colours add a weaker image-only cue.
CLASSES: dict[str, LesionClass] = {
    c.name: c
    for c in (
        _class(
            "nv",
            "melanocytic nevus",
            {
                "shape": (45, 35, 10, 10),
                "size": (55, 35, 10),
                "border": (80, 20),
                "count": (90, 10),
                "pigment": (45, 38, 6, 6, 5),
            },
            heterogeneity=(0.05, 0.4),
            secondary=(0.25, ("darker", "tan")),
            centre_darkening=0.18,
        ),
        _class(
            "mel",
            "melanoma",
            {
                "shape": (10, 18, 52, 20),
                "size": (12, 33, 55),
                "border": (32, 68),
                "count": (60, 40),
                "pigment": (8, 34, 36, 5, 17),
                "skin_tone": (55, 32, 13),
            },
            heterogeneity=(0.5, 1.0),
            secondary=(0.9, ("black", "blue-grey", "white", "darker")),
        ),
        _class(
            "bkl",
            "benign keratosis-like lesion",
            {
                "shape": (15, 40, 30, 15),
                "size": (22, 45, 33),
                "border": (62, 38),
                "count": (85, 15),
                "pigment": (48, 28, 12, 8, 4),
            },
            heterogeneity=(0.3, 0.7),
            secondary=(0.5, ("tan", "darker", "white")),
        ),
        _class(
            "bcc",
            "basal cell carcinoma",
            {
                "shape": (20, 18, 20, 42),
                "size": (30, 50, 20),
                "border": (65, 35),
                "count": (78, 22),
                "pigment": (8, 8, 5, 48, 31),
                "skin_tone": (55, 33, 12),
            },
            heterogeneity=(0.3, 0.7),
            secondary=(0.6, ("blue-grey", "red", "white")),
        ),
        _class(
            "akiec",
            "actinic keratosis / intraepithelial carcinoma",
            {
                "shape": (15, 30, 40, 15),
                "size": (35, 45, 20),
                "border": (35, 65),
                "count": (85, 15),
                "pigment": (32, 8, 3, 52, 5),
                "skin_tone": (60, 30, 10),
            },
            heterogeneity=(0.3, 0.6),
            secondary=(0.5, ("red", "white", "tan")),
        ),
        _class(
            "vasc",
            "vascular lesion",
            {
                "shape": (40, 25, 10, 25),
                "size": (50, 38, 12),
                "border": (75, 25),
                "count": (70, 30),
                "pigment": (3, 8, 5, 68, 16),
            },
            heterogeneity=(0.2, 0.5),
            secondary=(0.7, ("red", "purple")),
        ),
        _class(
            "df",
            "dermatofibroma",
            {
                "shape": (55, 30, 10, 5),
                "size": (65, 30, 5),
                "border": (40, 60),
                "count": (92, 8),
                "pigment": (46, 20, 3, 26, 5),
            },
            heterogeneity=(0.2, 0.5),
            secondary=(0.7, ("white",)),
            central_secondary=True,
            centre_darkening=-0.05,
        ),
    )
}
CLASS_NAMES: tuple[str, ...] = tuple(CLASSES)
# Cumulative probabilities as plain lists: bisect on a list is ~20x cheaper than numpy on 5 values.
_CLASS_CDF: list[float] = np.cumsum([CLASSES[c].prior for c in CLASS_NAMES]).tolist()
_FACTOR_CDF: dict[str, dict[str, list[float]]] = {
    c: {f: np.cumsum(p).tolist() for f, p in CLASSES[c].factor_probs.items()} for c in CLASS_NAMES
}

# ---------------------------------------------------------------------------------------------
# Index -> (lesion, view)
# ---------------------------------------------------------------------------------------------

GROUP_BLOCK = 10  # indices per block; one lesion per block is imaged twice
_LESIONS_PER_BLOCK = GROUP_BLOCK - 1

# Stream tags: each random stream of a record has its own tag, so adding draws to one stream
# never shifts another (and factors do not depend on the rendered size).
_TAG_BLOCK, _TAG_LESION, _TAG_VIEW, _TAG_PIXELS = 101, 202, 303, 404  # _TAG_PIXELS seeds the noise bank


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise SynthDermError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise SynthDermError(f"{name} must be {bound}, got {value}")
    return int(value)


def lesion_of_index(seed: int, index: int) -> tuple[int, int, int | None]:
    """Map a record index to ``(lesion, view, partner_index)``.

    Indices come in blocks of :data:`GROUP_BLOCK`. In each block a seeded choice picks two
    positions ``p < q``: position ``q`` is the second view of the lesion at ``p``; the other
    positions are single-view lesions. Lesion numbers run consecutively over the block's
    ``GROUP_BLOCK - 1`` lesions, so any index range gives consistent groups.

    Returns:
        ``lesion`` (unique per seed), ``view`` (0 or 1), and the index of the other view of the
        same lesion, or None for a single-view lesion.
    """
    seed = _check_int("seed", seed, 0)
    index = _check_int("index", index, 0)
    block, pos = divmod(index, GROUP_BLOCK)
    p, q = _pair_positions(seed, block)
    slot = pos - (pos > q) if pos != q else p - (p > q)
    lesion = block * _LESIONS_PER_BLOCK + slot
    if pos == p:
        return lesion, 0, block * GROUP_BLOCK + q
    if pos == q:
        return lesion, 1, block * GROUP_BLOCK + p
    return lesion, 0, None


@lru_cache(maxsize=4096)
def _pair_positions(seed: int, block: int) -> tuple[int, int]:
    rng = np.random.default_rng([seed, block, _TAG_BLOCK])
    p, q = sorted(int(v) for v in rng.choice(GROUP_BLOCK, size=2, replace=False))
    return p, q


# ---------------------------------------------------------------------------------------------
# Factors
# ---------------------------------------------------------------------------------------------


def _pick(u: float, cdf: list[float], values: tuple[str, ...]) -> str:
    """The value whose cumulative-probability interval holds the uniform draw ``u``."""
    return values[min(bisect.bisect_right(cdf, u), len(values) - 1)]


def _acquisition(rng: np.random.Generator, label: str) -> dict[str, str]:
    """The image-level style factors: the first draw of a view's stream (view 1 recomputes view 0's)."""
    cdfs = _FACTOR_CDF[label]
    u = rng.random(len(_ACQUISITION_STYLE))
    return {f: _pick(u[i], cdfs[f], FACTORS[f]) for i, f in enumerate(_ACQUISITION_STYLE)}


def sample_factors(seed: int, index: int) -> dict[str, Any]:
    """The class, the ten factors, lesion, view and partner index of record ``index``, without rendering.

    Cheap (about 0.1 ms): use it to plan, or to study the factor distribution, without drawing
    images. Returns ``{"label", "factors", "lesion", "view", "partner"}``.
    """
    drawn = _draw_factors(seed, index)
    return {k: drawn[k] for k in ("label", "factors", "lesion", "view", "partner")}


def _draw_factors(seed: int, index: int) -> dict[str, Any]:
    """:func:`sample_factors` plus the lesion and view random streams, positioned after the factor draws."""
    lesion, view, partner = lesion_of_index(seed, index)
    lrng = np.random.default_rng([seed, lesion, _TAG_LESION])
    u = lrng.random(1 + len(_LESION_FACTORS)).tolist()
    label = _pick(u[0], _CLASS_CDF, CLASS_NAMES)
    cdfs = _FACTOR_CDF[label]
    factors: dict[str, Any] = {f: _pick(u[i + 1], cdfs[f], FACTORS[f]) for i, f in enumerate(_LESION_FACTORS)}
    vrng = np.random.default_rng([seed, lesion, view, _TAG_VIEW])
    acq = _acquisition(vrng, label)
    if view == 1:
        first = _acquisition(np.random.default_rng([seed, lesion, 0, _TAG_VIEW]), label)
        if acq == first:
            # Another acquisition of the same lesion: change one image-level factor.
            factor = _ACQUISITION_STYLE[int(vrng.integers(len(_ACQUISITION_STYLE)))]
            others = [v for v in FACTORS[factor] if v != first[factor]]
            acq[factor] = others[int(vrng.integers(len(others)))]
    factors.update(acq)
    return {
        "label": label,
        "factors": {f: factors[f] for f in FACTORS},
        "lesion": lesion,
        "view": view,
        "partner": partner,
        "lesion_rng": lrng,
        "view_rng": vrng,
    }


# ---------------------------------------------------------------------------------------------
# Texts
# ---------------------------------------------------------------------------------------------


def anatomy_text_of(factors: Mapping[str, str]) -> str:
    """The anatomy-only text of a factor dict (only anatomy phrases, fixed order)."""
    ph = {f: FACTOR_PHRASES[f][factors[f]] for f in ANATOMY_FACTORS}
    return f"{ph['size']} {ph['shape']} lesion in the {ph['position']}, {ph['border']}, {ph['count']}"


def style_text_of(factors: Mapping[str, str]) -> str:
    """The style-only text of a factor dict (only style phrases, fixed order)."""
    ph = {f: FACTOR_PHRASES[f][factors[f]] for f in STYLE_FACTORS}
    return f"{ph['pigment']} pigment on {ph['skin_tone']}, {ph['illumination']}, {ph['artefact']}, {ph['device']}"


# Caption templates: anatomy (size, shape, position, border, count) and style (pigment, skin,
# illum, artefact, device) phrases interleaved in different orders, as a clinician might dictate.
_CAPTION_TEMPLATES: tuple[str, ...] = (
    "{device} of a {size} {shape} {pigment} lesion on {skin_tone} in the {position}, {count}, with a {border}; "
    "{illumination}, {artefact}.",
    "{size} {pigment} lesion, {shape} with a {border}, in the {position} on {skin_tone}, {count}. "
    "{device}, {illumination}, {artefact}.",
    "On {skin_tone}, a {shape} lesion with {pigment} pigment and a {border} sits in the {position}; "
    "{size}, {count}. Imaged by {device} under {illumination} with {artefact}.",
    "{pigment} {shape} lesion in the {position} ({size}, {count}) on {skin_tone}, {border}, "
    "{device} with {artefact} and {illumination}.",
    "In the {position}: a {size} lesion, {pigment}, {shape}, {count}, with a {border}; {skin_tone}, "
    "{artefact}, {illumination}, {device}.",
    "{illumination}, {device}: {shape} {size} lesion of {pigment} colour with a {border} on {skin_tone}, "
    "{count}, located in the {position}; {artefact}.",
)
_ARTICLE_FIX = re.compile(r"\ba (?=[aeiouAEIOU])")


def _caption(factors: Mapping[str, str], template: int) -> str:
    ph = {f: FACTOR_PHRASES[f][factors[f]] for f in FACTORS}
    text = _CAPTION_TEMPLATES[template].format(**ph)
    text = _ARTICLE_FIX.sub("an ", text)
    # Capitalise sentence starts only (phrases stay lower case inside sentences).
    return re.sub(r"(^|[.:] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


# ---------------------------------------------------------------------------------------------
# Geometry: star-shaped outlines r(theta)
# ---------------------------------------------------------------------------------------------

_N_THETA = 128
_DTHETA = 2 * np.pi / _N_THETA
_THETA = -np.pi + _DTHETA * np.arange(_N_THETA)
_COS, _SIN = np.cos(_THETA), np.sin(_THETA)
_K = np.arange(2, 9)  # harmonics of border noise (k=1 would only shift the shape)
_COS_K = np.cos(_K[:, None] * _THETA[None, :])  # (K, N_THETA)
_SIN_K = np.sin(_K[:, None] * _THETA[None, :])
# Rendering looks r(theta) up in a finer periodic table (nearest sample), one gather per pixel.
_N_FINE = 1024
_FINE_POS = np.arange(_N_FINE) * (_N_THETA / _N_FINE)  # fine sample -> fractional coarse index
_FINE_I0 = _FINE_POS.astype(np.intp)
_FINE_I1 = (_FINE_I0 + 1) % _N_THETA
_FINE_W = (_FINE_POS - _FINE_I0).astype(np.float32)


def _harmonics(rng: np.random.Generator, std: float, decay: float) -> np.ndarray:
    """Low-frequency radial noise ``(N_THETA,)`` with standard deviation ``std`` (log-radius units)."""
    a, b = rng.standard_normal((2, _K.size)) / _K**decay
    # The std of sum_k a_k cos(k t) + b_k sin(k t) over a period is sqrt(sum(a^2 + b^2) / 2).
    norm = std / max(float(np.sqrt(0.5 * (a @ a + b @ b))), 1e-9)
    return (a * norm) @ _COS_K + (b * norm) @ _SIN_K


def _outline(rng: np.random.Generator, shape: str) -> np.ndarray:
    """Unit-scale radius per angle ``(N_THETA,)`` for a shape factor."""
    if shape == "round":
        return np.exp(_harmonics(rng, 0.015, 1.5))
    if shape in ("oval", "irregular"):
        ratio, phi, std = rng.uniform((0.5, 0.0, 0.13), (0.72, np.pi, 0.2))
        if shape == "irregular":
            # Asymmetric, notched blobs: a milder elongation plus strong low harmonics.
            ratio = 0.7 + (ratio - 0.5)
            noise = _harmonics(rng, std, 1.6)
        else:
            noise = _harmonics(rng, 0.02, 1.5)
        c, s = np.cos(_THETA - phi), np.sin(_THETA - phi)
        return np.exp(noise) / np.sqrt(c * c + (s / ratio) ** 2)
    # lobulated: a union of discs that all contain the origin; along direction u the boundary of
    # disc (d, r) is at u.d + sqrt(r^2 - |d|^2 + (u.d)^2), and the union's radius is the max.
    n = int(rng.integers(3, 6))
    start = rng.uniform(0, 2 * np.pi)
    jitter, dist, extra = rng.uniform((-0.3, 0.42, 0.18), (0.3, 0.6, 0.32), (n, 3)).T
    ang = start + 2 * np.pi * np.arange(n) / n + jitter
    rad = dist + extra
    dx, dy = dist * np.cos(ang), dist * np.sin(ang)
    ud = _COS[None, :] * dx[:, None] + _SIN[None, :] * dy[:, None]  # (n, N_THETA)
    exit_r = ud + np.sqrt(rad[:, None] ** 2 - dist[:, None] ** 2 + ud**2)
    return np.maximum(exit_r.max(0), 0.55)  # a central disc of radius 0.55 fills the middle


def _area_centroid(r: np.ndarray) -> tuple[float, float, float]:
    """Area and centroid (relative to the origin) of a star-shaped outline r(theta)."""
    r2 = r * r
    area = 0.5 * _DTHETA * float(r2.sum())
    r3 = r2 * r
    return area, _DTHETA / 3 * float(r3 @ _COS) / area, _DTHETA / 3 * float(r3 @ _SIN) / area


@dataclass(frozen=True)
class _Geometry:
    """Where the lesion is, in pixels (per view: the second view is rotated)."""

    r: np.ndarray  # (N_THETA,) radius per angle, px
    origin: tuple[float, float]
    r_eq: float  # radius of the disc of the main lesion's area, px
    sat: tuple[float, float, float] | None  # (x, y, radius) px


def _geometry(lrng: np.random.Generator, f: Mapping[str, str], view_turn: int, size: int) -> _Geometry:
    """Lay out the lesion: outline, scale to the area bin, satellite, centroid in the position region.

    Every draw here comes from the lesion stream in a fixed order, so both views (and every
    rendered size) share the same lesion; ``view_turn`` rotates the outline by whole angle steps.
    """
    lo, hi = SIZE_AREA_FRACTION[f["size"]]
    u_area, sat_share, sat_dir, sat_gap, ux, uy = lrng.random(6).tolist()
    area_total = (lo + u_area * (hi - lo)) * size * size
    sat_share, sat_dir, sat_gap = 0.05 + 0.05 * sat_share, 2 * sat_dir - 1, 0.3 + 0.3 * sat_gap
    unit = _outline(lrng, f["shape"])
    if view_turn:
        unit = np.roll(unit, view_turn)
    # The satellite needs a visible radius even at 32 px; its area comes out of the total.
    r_sat = max(np.sqrt(sat_share * area_total / np.pi), 0.9) if f["count"] == "satellite" else 0.0
    area_main = max(area_total - np.pi * r_sat * r_sat, 0.5 * area_total)
    a_unit, cx_unit, cy_unit = _area_centroid(unit)
    scale = float(np.sqrt(area_main / a_unit))
    r = unit * scale
    r_eq = float(np.sqrt(area_main / np.pi))
    # Direction signs of the position (x: -1 left, +1 right; y: -1 upper, +1 lower).
    pos = f["position"]
    sx = -1.0 if "left" in pos else (1.0 if "right" in pos else 0.0)
    sy = -1.0 if "upper" in pos else (1.0 if "lower" in pos else 0.0)
    # Satellite relative to the origin; towards the image centre for corner lesions so it stays in view.
    if r_sat > 0:
        psi = np.arctan2(-sy, -sx) + sat_dir * 1.2 if pos != "centre" else sat_dir * np.pi
        j = int(round((psi + np.pi) / _DTHETA)) % _N_THETA
        d = r[j] + sat_gap * r_eq + r_sat
        sat_rel = (d * np.cos(psi), d * np.sin(psi))
    else:
        sat_rel = (0.0, 0.0)
    a_sat = np.pi * r_sat * r_sat
    a_all = area_main + a_sat
    # Combined centroid relative to the origin (main outline's own centroid + satellite).
    cen_x = (area_main * cx_unit * scale + a_sat * sat_rel[0]) / a_all
    cen_y = (area_main * cy_unit * scale + a_sat * sat_rel[1]) / a_all

    def target(sign: float, u: float, along: np.ndarray, sat_c: float, cen: float) -> float:
        if sign == 0.0:
            return size * (0.5 + _CENTRE_MAX_OFFSET * (2 * u - 1))
        # Reach of the lesion beyond its centroid towards the near edge, to keep it in the image.
        reach = max(float((sign * along).max()), sign * sat_c + r_sat) - sign * cen + 0.5
        top = min(_QUADRANT_MAX_OFFSET * size, 0.5 * size - reach)
        low = _QUADRANT_MIN_OFFSET * size
        off = low + u * (top - low) if top > low else low  # too large to fit: the border clips it
        return size * 0.5 + sign * off

    tx = target(sx, ux, r * _COS, sat_rel[0], cen_x)
    ty = target(sy, uy, r * _SIN, sat_rel[1], cen_y)
    origin = (tx - cen_x, ty - cen_y)
    sat = (origin[0] + sat_rel[0], origin[1] + sat_rel[1], r_sat) if r_sat > 0 else None
    return _Geometry(r=r, origin=origin, r_eq=r_eq, sat=sat)


# ---------------------------------------------------------------------------------------------
# Rendering (images are (3, H, W) float32 while drawn: per-channel planes broadcast fast)
# ---------------------------------------------------------------------------------------------

_Q = 4  # centres are snapped to 1/_Q px so that polar coordinates come from cached tables
_TABLE_MAX_SIZE = 160  # above this, polar coordinates are computed per record (tables grow as size^2)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_NOISE_STD = 1.6  # sensor noise, grey levels


@lru_cache(maxsize=16)
def _grid(size: int) -> dict[str, Any]:
    """Per-size constants: pixel centres, radius from the image centre, upsamplers, a noise bank."""
    c = np.arange(size, dtype=np.float32) + 0.5
    margin = min(size, 64)
    # Distance from the image centre in units of the half side: 1 at the edge midpoints.
    rad = np.sqrt((c[None, :] - size / 2) ** 2 + (c[:, None] - size / 2) ** 2) / (size / 2)
    return {
        "c": c,
        "rad2": (rad * rad).astype(np.float32),
        "even_light": (1 - 0.04 * rad * rad).astype(np.float32),
        "up6": _upsampler(size, 6),
        "up12": _upsampler(size, 12),
        "up24": _upsampler(size, 24),
        # A fixed bank of sensor noise, sliced at a random offset (< margin) per record: drawing
        # 3 x H x W normals per record costs more than the rest of the rendering.
        "noise": np.random.default_rng(_TAG_PIXELS).standard_normal(
            (3, size + margin, size + margin), dtype=np.float32
        )
        * _NOISE_STD,
        "noise_margin": margin,
    }


@lru_cache(maxsize=4)
def _polar_tables(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fine angle index (int16) and distance (float32) from a centre, each (Q, Q, 2H, 2W).

    Entry ``[ky, kx, S + j, S + i]`` holds the polar coordinates of pixel offset ``(j, i)`` from a
    centre at sub-pixel phase ``(ky/Q, kx/Q)``; a record slices an (H, W) window out of it.
    """
    d = np.arange(-size, size, dtype=np.float64)[None, :] + 0.5 - np.arange(_Q)[:, None] / _Q  # (Q, 2S)
    dy, dx = d[:, None, :, None], d[None, :, None, :]
    ang = np.arctan2(dy, dx)  # (Q, Q, 2S, 2S)
    idx = (np.rint((ang + np.pi) * (_N_FINE / (2 * np.pi))).astype(np.int32) % _N_FINE).astype(np.int16)
    return idx, np.sqrt(dx * dx + dy * dy).astype(np.float32)


def _polar(size: int, x: float, y: float, want_angle: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """(H, W) fine angle index (or None) and distance of every pixel centre from the point (x, y), snapped to 1/Q px."""
    qx, qy = int(round(x * _Q)), int(round(y * _Q))
    nx, kx = divmod(qx, _Q)
    ny, ky = divmod(qy, _Q)
    if size <= _TABLE_MAX_SIZE and 0 <= nx <= size and 0 <= ny <= size:
        idx, rho = _polar_tables(size)
        rows, cols = slice(size - ny, 2 * size - ny), slice(size - nx, 2 * size - nx)
        return (idx[ky, kx, rows, cols] if want_angle else None), rho[ky, kx, rows, cols]
    c = _grid(size)["c"]
    dx = c[None, :] - np.float32(qx / _Q)
    dy = c[:, None] - np.float32(qy / _Q)
    rho = np.sqrt(dx * dx + dy * dy)
    if not want_angle:
        return None, rho
    ang = np.arctan2(dy, dx)
    return (np.rint((ang + np.pi) * (_N_FINE / (2 * np.pi))).astype(np.int32) % _N_FINE), rho


_BLAS_MAX_SIZE = 96  # above this, upsample by gathers: OpenBLAS threads there and stalls on busy cores


def _upsampler(size: int, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear upsampling of a (g, g) grid to (size, size), in two equivalent forms.

    Returns ``(U, U.T, i0, i1, frac)``: the (size, g) interpolation matrix with its contiguous
    transpose (``U @ G @ U.T``), and the per-pixel node indices and weights for the gather form.
    """
    pos = (np.arange(size) + 0.5) / size * (g - 1)
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, g - 2)
    frac = (pos - i0).astype(np.float32)
    u = np.zeros((size, g), dtype=np.float32)
    u[np.arange(size), i0] = 1 - frac
    u[np.arange(size), i0 + 1] = frac
    return u, np.ascontiguousarray(u.T), i0, i0 + 1, frac


def _smooth_fields(up: tuple[np.ndarray, ...], grids: np.ndarray) -> np.ndarray:
    """(k, g, g) random grids -> (k, H, W) smooth fields with unit standard deviation (approx.)."""
    u, ut, i0, i1, frac = up
    grids = grids.astype(np.float32)
    if u.shape[0] <= _BLAS_MAX_SIZE:
        f = u @ grids @ ut  # (k, H, W)
    else:
        rows = u @ grids  # (k, H, g): small
        f = rows[:, :, i0] * (1 - frac) + rows[:, :, i1] * frac  # (k, H, W)
    return f * np.float32(1.0 / 0.62)  # bilinear averaging of N(0,1) nodes leaves a std of about 0.62


def _saturate(img: np.ndarray, factor: float) -> np.ndarray:
    """Scale the chroma of a (3, H, W) image around its luma."""
    # Written out rather than a tensordot: BLAS would thread on large images and stall on busy cores.
    gray = img[0] * _LUMA[0] + img[1] * _LUMA[1] + img[2] * _LUMA[2]  # (H, W)
    return gray + (img - gray) * np.float32(factor)


def _splat(size: int, pts: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Bilinear splat of (M, 2) points (x, y in px) with weights (M,) into an (H, W) map."""
    x = pts[:, 0] - 0.5
    y = pts[:, 1] - 0.5
    x0 = np.floor(x)
    y0 = np.floor(y)
    fx, fy = x - x0, y - y0
    x0 = x0.astype(np.int64)
    y0 = y0.astype(np.int64)
    acc = np.zeros(size * size + 1, dtype=np.float64)  # the last cell collects points off the image
    for ox, oy, w in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        xi, yi = x0 + ox, y0 + oy
        flat = np.where((xi >= 0) & (xi < size) & (yi >= 0) & (yi < size), yi * size + xi, size * size)
        acc += np.bincount(flat, weights=w * weight, minlength=size * size + 1)
    return acc[:-1].reshape(size, size).astype(np.float32)


def _hairs(vrng: np.random.Generator, size: int) -> np.ndarray:
    """(H, W) hair coverage in [0, 0.95]: dark curved strands (quadratic Bezier curves)."""
    n = int(vrng.integers(3, 8))
    p0 = vrng.uniform(-0.1, 1.1, (n, 2)) * size
    ang, length, bend, strength = vrng.uniform((0, 0.5, -0.3, 0.7), (2 * np.pi, 1.3, 0.3, 1.0), (n, 4)).T
    length = length * size
    direction = np.stack([np.cos(ang), np.sin(ang)], 1)
    p2 = p0 + direction * length[:, None]
    normal = np.stack([-direction[:, 1], direction[:, 0]], 1)
    p1 = (p0 + p2) / 2 + normal * (bend * length)[:, None]
    m = int(2.5 * size)  # samples per hair: about 2 per pixel of its length
    t = np.linspace(0, 1, m)[None, :, None]
    pts = (1 - t) ** 2 * p0[:, None] + 2 * (1 - t) * t * p1[:, None] + t**2 * p2[:, None]  # (n, m, 2)
    w = np.broadcast_to((strength * length * 1.1 / m)[:, None], (n, m))  # ink per px of length ~ strength
    width = max(1.0, size / 72)  # about 1 px at 64 px, thicker at higher resolution
    cover = _splat(size, pts.reshape(-1, 2), w.reshape(-1))
    if width > 1.2:
        cover += _splat(size, (pts + normal[:, None, :] * (width - 1.0)).reshape(-1, 2), w.reshape(-1))
    return np.minimum(cover * 1.1, 0.95)


def _ruler(vrng: np.random.Generator, size: int) -> np.ndarray:
    """(H, W) ruler coverage: a line with ticks along one edge (a long tick every fifth)."""
    edge, spacing, inset, start = vrng.random(4).tolist()
    spacing = size / (9.0 + 4.0 * spacing)
    inset = int(round(0.04 * inset * size))
    thick = max(1, int(round(size / 64)))
    m = np.zeros((size, size), dtype=np.float32)
    short, long_ = max(2, int(round(0.05 * size))), max(3, int(round(0.1 * size)))
    m[inset + long_ : inset + long_ + thick, :] = 0.8  # the ruler's base line
    for k, x in enumerate(np.arange(start * spacing, size, spacing)):
        xi = int(x)
        m[inset + (0 if k % 5 == 0 else long_ - short) : inset + long_, xi : xi + thick] = 0.9
    return np.rot90(m, int(edge * 4))


def _bubbles(vrng: np.random.Generator, size: int) -> np.ndarray:
    """(H, W) brightening in [0, 1]: gel bubbles as bright rings with a faintly bright inside."""
    n = int(vrng.integers(1, 5))
    cx, cy, rad = vrng.uniform((0.05, 0.05, 0.04), (0.95, 0.95, 0.12), (n, 3)).T * size
    width = max(0.5, size / 110)
    out = np.zeros((size, size), dtype=np.float32)
    for i in range(n):
        _, d = _polar(size, cx[i], cy[i], want_angle=False)
        ring = np.exp(-(((d - max(rad[i], 1.5)) * np.float32(1 / width)) ** 2))
        out = np.maximum(out, 0.75 * ring + 0.1 * (d < rad[i]))
    return out


def _glints(vrng: np.random.Generator, geo: _Geometry, size: int) -> np.ndarray:
    """(H, W) specular glare of non-polarised (contact) dermoscopy: small white spots, mostly on the lesion."""
    n = int(vrng.integers(3, 8))
    ang, dist, sigma, amp = vrng.uniform((0, 0, 0.4, 0.5), (2 * np.pi, 1.2, 0.9, 0.9), (n, 4)).T
    x0 = np.clip(geo.origin[0] + dist * geo.r_eq * np.cos(ang), 0, size)
    y0 = np.clip(geo.origin[1] + dist * geo.r_eq * np.sin(ang), 0, size)
    sigma = np.maximum(sigma * size / 64, 0.45)
    c = _grid(size)["c"]
    gx = np.exp(-((c[None, :] - x0[:, None]) ** 2) / (2 * sigma[:, None] ** 2))  # (n, W)
    gy = np.exp(-((c[None, :] - y0[:, None]) ** 2) / (2 * sigma[:, None] ** 2)) * amp[:, None]  # (n, H)
    # Separable gaussians: sum_n gy[n, i] gx[n, j] (einsum's own loop, no BLAS threads).
    return np.minimum(np.einsum("ni,nj->ij", gy.astype(np.float32), gx.astype(np.float32)), 1.0)


def _render(
    label: str,
    f: Mapping[str, str],
    geo: _Geometry,
    lrng: np.random.Generator,
    vrng: np.random.Generator,
    size: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Draw the image (H, W, 3) uint8 and mask (H, W) uint8 0/255; return measured attributes too.

    Every random draw is size-independent (the lesion stream for what belongs to the lesion, the
    view stream for the acquisition), so one record rendered at 32 and 128 px shows the same scene.
    """
    cls = CLASSES[label]
    g = _grid(size)
    # Lesion-level draws (shared by both views), in a fixed order.
    het, has_sec, sec_pick = lrng.random(3).tolist()
    het = cls.heterogeneity[0] + het * (cls.heterogeneity[1] - cls.heterogeneity[0])
    has_sec = has_sec < cls.secondary[0]
    sec_name = cls.secondary[1][min(int(sec_pick * len(cls.secondary[1])), len(cls.secondary[1]) - 1)]
    jit = lrng.standard_normal(7).astype(np.float32)
    pig_jitter = 1.0 + 0.05 * jit[:3]
    skin_jitter = 1.0 + 0.03 * jit[3] + 0.02 * jit[4:]
    lesion_grids = lrng.standard_normal((2, 6, 6))
    texture_grids = (lrng.standard_normal((1, 12, 12)), lrng.standard_normal((1, 24, 24)))
    # View-level draws.
    skin_grids = vrng.standard_normal((2, 6, 6))
    vignette, aperture, noise_x, noise_y = vrng.random(4).tolist()

    # --- signed distance to the lesion border (px, positive inside) ---
    ang, rho = _polar(size, *geo.origin)
    r = geo.r.astype(np.float32)
    r_fine = r[_FINE_I0] * (1 - _FINE_W) + r[_FINE_I1] * _FINE_W  # periodic linear interpolation
    sd = r_fine[ang] - rho  # (H, W)
    if geo.sat is not None:
        sd = np.maximum(
            sd, np.float32(geo.sat[2]) - _polar(size, geo.sat[0], geo.sat[1], want_angle=False)[1]
        )
    mask = sd > 0
    # Feathered alpha: about one pixel of anti-aliasing for sharp borders, a wide ramp for blurred.
    width = 1.0 if f["border"] == "sharp" else max(1.5, 0.55 * geo.r_eq)
    a = np.clip(sd * np.float32(1 / width) + np.float32(0.5), 0.0, 1.0)
    alpha = a * a * (3 - 2 * a)

    # --- skin: tone, blotchy redness, fine texture ---
    skin_fields = _smooth_fields(g["up6"], skin_grids)  # (2, H, W)
    skin = (np.asarray(SKIN_RGB[f["skin_tone"]], dtype=np.float32) * skin_jitter)[:, None, None]  # (3, 1, 1)
    img = skin * (1 + np.float32(0.03) * skin_fields[0])  # (3, H, W)
    img[1:] -= np.float32(5.0) * np.maximum(skin_fields[1], 0)  # erythema lowers green and blue

    # --- lesion colour with internal variation ---
    lf = _smooth_fields(g["up6"], lesion_grids)  # (2, H, W)
    # Clods (12 x 12 cells) and finer dots / network (24 x 24), fixed to the lesion at every size.
    texture = (
        _smooth_fields(g["up12"], texture_grids[0])[0] + 0.8 * _smooth_fields(g["up24"], texture_grids[1])[0]
    )
    depth = np.clip(sd * np.float32(1 / max(geo.r_eq, 1.0)), 0, 1)  # 0 at the border, 1 deep inside
    # Dots, clods and network are darker than the pigment around them: a one-sided texture term.
    dots = np.float32(0.03) * texture - np.float32(0.07 + 0.1 * het) * np.maximum(texture, 0)
    shade = (1 + np.float32(0.07 + 0.18 * het) * lf[0] + dots) * (
        1 - np.float32(cls.centre_darkening) * depth
    )
    pig = (np.asarray(PIGMENT_RGB[f["pigment"]], dtype=np.float32) * pig_jitter)[:, None, None]
    lesion = pig * shade  # (3, H, W)
    if has_sec:
        sec = (
            pig * 0.6
            if sec_name == "darker"
            else np.asarray(_SECONDARY_RGB[sec_name], dtype=np.float32)[:, None, None]
        )
        if cls.central_secondary:
            w2 = np.clip(depth * 2.2 - 0.9, 0, 1) * np.float32(0.5 + 0.4 * het)
        else:
            w2 = np.clip((lf[1] - 0.5) * 1.5, 0, 1) * np.float32(0.35 + 0.45 * het)
        lesion += (sec - lesion) * w2
    img += (lesion - img) * (alpha * np.float32(0.94))

    # --- artefacts on the skin surface ---
    art = f["artefact"]
    if art == "hair":
        img += (_HAIR_RGB[:, None, None] - img) * _hairs(vrng, size)
    elif art == "ruler":
        img += (_RULER_RGB[:, None, None] - img) * _ruler(vrng, size)
    elif art == "bubbles":
        img += (255.0 - img) * _bubbles(vrng, size)

    # --- device look: polarised = saturated, no glare; non-polarised = paler, specular glints ---
    if f["device"] == "polarised":
        img = (_saturate(img, 1.1) - 128.0) * np.float32(1.06) + np.float32(128.0)
    else:
        img = _saturate(img, 0.86) + np.float32(8.0)
        img += (250.0 - img) * _glints(vrng, geo, size)

    # --- illumination: even (a trace of falloff) or vignetted (falloff + dark circular aperture) ---
    if f["illumination"] == "even":
        light = g["even_light"]
    else:
        rad2 = g["rad2"]
        edge = 2 * (0.52 + 0.12 * aperture)  # aperture radius, in units of the half side
        ap = np.clip((edge * edge - rad2) * np.float32(size / (12.0 * edge)), 0, 1)  # ~3 px soft edge
        light = (1 - np.float32(0.25 + 0.2 * vignette) * rad2) * (np.float32(0.08) + np.float32(0.92) * ap)
    img *= light

    # --- sensor noise, then (H, W, 3) uint8 ---
    ox, oy = int(noise_x * g["noise_margin"]), int(noise_y * g["noise_margin"])
    img += g["noise"][:, oy : oy + size, ox : ox + size]
    img += np.float32(0.5)  # round to nearest on the cast below
    np.clip(img, 0, 255, out=img)
    image = np.empty((size, size, 3), dtype=np.uint8)
    np.copyto(image, img.transpose(1, 2, 0), casting="unsafe")
    mask_u8 = mask.view(np.uint8) * np.uint8(255)
    n_px = int(np.count_nonzero(mask))
    c = g["c"]
    extra = {
        "heterogeneity": round(het, 4),
        "secondary_colour": sec_name if has_sec else None,
        "area_fraction": round(n_px / (size * size), 5),
        "centroid_x": round(float(mask.sum(0) @ c) / n_px / size, 4) if n_px else None,
        "centroid_y": round(float(mask.sum(1) @ c) / n_px / size, 4) if n_px else None,
    }
    return image, mask_u8, extra


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def synthderm_record(seed: int, index: int, size: int) -> dict[str, Any]:
    """One SynthDerm record: every column of ``RECORD_SCHEMA`` except ``split``.

    Args:
        seed: dataset seed (>= 0); records of different seeds differ.
        index: record index (>= 0); the record depends only on (seed, index) and ``size``.
        size: image side in pixels (8 to 2048); factors do not depend on it.

    Returns:
        A dict with id, dataset, group, label, image (PNG bytes, RGB), mask (PNG bytes, 0/255),
        caption, anatomy_text, style_text, attributes (a JSON-serialisable dict with the true
        factors, class, lesion, view and measured area fraction and centroid) and source.
    """
    seed, index = _check_int("seed", seed, 0), _check_int("index", index, 0)  # numpy ints become ints
    size = _check_int("size", size, 8, 2048)
    drawn = _draw_factors(seed, index)
    label, f, lesion, view = drawn["label"], drawn["factors"], drawn["lesion"], drawn["view"]
    lrng, vrng = drawn["lesion_rng"], drawn["view_rng"]
    # The second view is turned by 10-25 degrees (whole angle steps), so it is not a pixel copy.
    turn = 0
    if view == 1:
        steps = int(vrng.integers(4, 10))
        turn = steps if vrng.random() < 0.5 else -steps
    geo = _geometry(lrng, f, turn, size)
    template = int(vrng.integers(len(_CAPTION_TEMPLATES)))
    image, mask, extra = _render(label, f, geo, lrng, vrng, size)
    attributes = {
        **f,
        "class": label,
        "lesion": lesion,
        "view": view,
        "n_views": 1 if drawn["partner"] is None else 2,
        "paired_index": drawn["partner"],
        "template": template,
        **extra,
    }
    return {
        "id": f"synthderm-{seed}-{index:06d}",
        "dataset": "synthderm",
        "group": f"synthderm-{seed}-lesion-{lesion:06d}",
        "label": label,
        "image": encode_png(image),
        "mask": encode_png(mask),
        "caption": _caption(f, template),
        "anatomy_text": anatomy_text_of(f),
        "style_text": style_text_of(f),
        "attributes": attributes,
        "source": f"synthderm://{seed}/{index}",
    }


def iter_synthderm(seed: int, start: int, stop: int, size: int) -> Iterator[dict[str, Any]]:
    """Records ``start <= index < stop`` in order (see :func:`synthderm_record`)."""
    start = _check_int("start", start, 0)
    stop = _check_int("stop", stop, start)
    for index in range(start, stop):
        yield synthderm_record(seed, index, size)


# ---------------------------------------------------------------------------------------------
# Reading factors back from measurements (for adherence checks)
# ---------------------------------------------------------------------------------------------


def size_of_area_fraction(area_fraction: float) -> str:
    """The size bin nearest (in log area) to a measured mask area fraction."""
    bounds = [
        np.sqrt(SIZE_AREA_FRACTION["small"][1] * SIZE_AREA_FRACTION["medium"][0]),
        np.sqrt(SIZE_AREA_FRACTION["medium"][1] * SIZE_AREA_FRACTION["large"][0]),
    ]
    return FACTORS["size"][int(np.searchsorted(bounds, area_fraction))]


def position_of_centroid(cx: float, cy: float) -> str:
    """The position factor of a measured centroid (fractions of width and height, y downwards)."""
    if abs(cx - 0.5) < _CENTRE_BOX and abs(cy - 0.5) < _CENTRE_BOX:
        return "centre"
    return ("upper " if cy < 0.5 else "lower ") + ("left" if cx < 0.5 else "right")


# ---------------------------------------------------------------------------------------------
# Contact sheet
# ---------------------------------------------------------------------------------------------


def contact_sheet(
    records: Sequence[Mapping[str, Any]], path: str | Path, columns: int = 8, scale: int = 1
) -> Path:
    """Write a PNG grid of the records' images with each label drawn under its tile.

    Args:
        records: record dicts (or rows) with ``image`` PNG bytes and ``label``.
        path: output PNG path (parent directories are created).
        columns: tiles per row.
        scale: nearest-neighbour upscaling of each tile (small images are easier to inspect).

    Returns:
        The written path.
    """
    from PIL import Image, ImageDraw

    columns = _check_int("columns", columns, 1)
    scale = _check_int("scale", scale, 1, 16)
    if not records:
        raise SynthDermError("contact_sheet needs at least one record")
    tiles = [decode_png(r["image"]) for r in records]
    th = max(t.shape[0] for t in tiles) * scale
    tw = max(t.shape[1] for t in tiles) * scale
    label_h, pad = 12, 2
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (tw + pad) + pad, rows * (th + label_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (rec, tile) in enumerate(zip(records, tiles)):
        x = pad + (i % columns) * (tw + pad)
        y = pad + (i // columns) * (th + label_h + pad)
        im = Image.fromarray(tile)
        if scale > 1:
            im = im.resize((tile.shape[1] * scale, tile.shape[0] * scale), Image.NEAREST)
        sheet.paste(im, (x, y))
        draw.text((x + 1, y + th), str(rec.get("label", "")), fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


def attributes_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes of a record as a dict, whether stored as a dict or as a JSON string."""
    attrs = record["attributes"]
    return json.loads(attrs) if isinstance(attrs, str) else dict(attrs)
