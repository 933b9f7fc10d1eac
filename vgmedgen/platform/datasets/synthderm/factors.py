"""SynthDerm factors and their words: the classes, the draw of a record's factors, its texts, and reading
factors back from measurements. Rendering is in :mod:`vgmedgen.platform.datasets.synthderm.render`."""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from vgmedgen.platform.datasets.synthderm.config import ANATOMY_FACTORS, FACTORS, STYLE_FACTORS

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
    "lesion_of_index",
    "position_of_centroid",
    "sample_factors",
    "size_of_area_fraction",
    "style_text_of",
]

# ---------------------------------------------------------------------------------------------
# Factors and their words
# ---------------------------------------------------------------------------------------------

# FACTORS, ANATOMY_FACTORS, STYLE_FACTORS: in synthderm/config.py, the table configs validate against.
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


def attributes_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes of a record as a dict, whether stored as a dict or as a JSON string."""
    attrs = record["attributes"]
    return json.loads(attrs) if isinstance(attrs, str) else dict(attrs)
