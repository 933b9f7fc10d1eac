"""Prompt adherence: generated images measured, never judged by eye, in the vocabulary that wrote their prompts.

**Vocabularies.** A prompt is scored in the words it was written in (:func:`prompt_vocabulary`):

- ``synthderm``: SynthDerm's own factors (its records' texts, the demo's swap grid). Size is read
  back with :func:`~vgmedgen.platform.datasets.synthderm.size_of_area_fraction`, position with
  :func:`~vgmedgen.platform.datasets.synthderm.position_of_centroid` (centre and four quadrants),
  colour as the calibrated pigment nearest to the mean lesion RGB;
- ``caption``: the caption measurement every other dataset's prompts are written from
  (:mod:`vgmedgen.platform.datasets.measure`): ``size_bin`` and the 9-cell ``position_bin``.

:func:`anatomy_bins` is the only place a measured mask is binned for adherence and :func:`adherence`
the only place measured factors are compared with requested ones: the demo's swap grid
(:func:`score`) and the evaluate job's anatomy adherence
(:func:`vgmedgen.platform.evaluation.control.anatomy_adherence`) both go through them. Metric names
carry the vocabulary and the instrument: ``adherence/synthderm/size`` (the ruler, the headline),
``adherence/synthderm/pseudo_mask/size`` (the model's own segmentor), ``adherence/caption/pseudo_mask/position``.

**Instruments.** Two models are compared with one ruler, so the headline figures come from an
instrument that does not depend on the model under test: a segmentation network trained once on
the real train records (:func:`train_ruler`; its run name is a hash of its spec and the records,
cached under the output root) and reused for every model. The stage-1 segmentor's pseudo-mask (the
mask ``generate`` returns) is the model's own reading; its figures stay beside, labelled
``pseudo_mask``, computed exactly as before the ruler existed.

Which ruler (measured on the 600 real validation records of ``configs/demo.yaml``, 4,800 train
records at 32 px, 2 CPU threads; size / position / pigment agreement with the true factors):

============================================  =====================  ========
instrument                                    size / pos / pigment   training
============================================  =====================  ========
the true masks (the ceiling)                  1.00 / 1.00 / 0.83     -
segmentor ``tiny``, 150 steps (Dice 0.84)     0.89 / 0.95 / 0.71     18 s
segmentor ``tiny``, 400 steps (Dice 0.91)     0.97 / 0.98 / 0.81     27 s
segmentor ``tiny``, 600 steps (Dice 0.92)     0.97 / 0.98 / 0.82     41 s
segmentor ``tiny`` width 16, 400 steps        0.98 / 0.98 / 0.81     129 s
segmentor ``demo``, 300 steps (Dice 0.95)     0.99 / 0.99 / 0.81     256 s
judges ``demo`` (3 heads, coordinates), 300   0.90 / 0.96 / 0.70     40 s
judges ``tiny``, 400 steps                    0.65 / 0.40 / 0.51     9 s
the demo's stage-1 segmentor, 300 steps       0.91 / 0.96 / 0.73     (the model)
============================================  =====================  ========

The segmentor wins on every factor at equal cost: it measures the quantities the factors are
defined by (area, centroid, the colour inside the lesion, with SynthDerm's own functions), while a
judge must learn each factor's boundaries from examples. ``tiny`` at 400 steps is the default
(:class:`~vgmedgen.platform.evaluation.config.RulerConfig`): within 0.02 of the largest network and
0.02 of the true masks on pigment, for ~30 s once.

**Colour references** are calibrated from real SynthDerm records measured through their true masks
(mean RGB inside the mask), per pigment and per *context*: the other style factors that shift a
rendered lesion's colour (skin tone, through the anti-aliased and blurred borders; illumination,
through vignetting; device, through saturation and glare). ``PIGMENT_RGB`` is the paint before all
of that and would misplace every reference (a "light brown" lesion measures about 15% darker and
bluer than its paint), so it is only the last fallback when no real record of a pigment exists.

Chance levels: size 1/3 in both vocabularies; position 1/5 (synthderm) or 1/9 (caption); colour 1/5
(five pigments). The default thresholds (0.6 each) were set before any tuning, well above chance.

Shape legend: N images, H/W image size.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from vgmedgen.model.domain_nets import domain_net_config
from vgmedgen.platform.datasets.measure import SIZE_THRESHOLDS, position_bin, size_bin
from vgmedgen.platform.datasets.synthderm import (
    FACTORS,
    PIGMENT_RGB,
    anatomy_text_of,
    position_of_centroid,
    size_of_area_fraction,
    style_text_of,
)
from vgmedgen.platform.evaluation.config import AdherenceConfig, RulerConfig
from vgmedgen.platform.evaluation.mosaic import mosaic_index
from vgmedgen.platform.generation.grid import SwapGrid
from vgmedgen.platform.generation.sample import generate_samples
from vgmedgen.platform.training.classify import ClassifierSpec, TrainedNet, fit_classifier, segment

if TYPE_CHECKING:
    from vgmedgen.model.vgmedgen import VGMedGen

__all__ = [
    "FACTOR_CHANCE",
    "MEASURED_FACTORS",
    "PSEUDO_MASK",
    "RULER",
    "VOCABULARIES",
    "VOCABULARY_VALUES",
    "Adherence",
    "AdherenceConfig",
    "AdherenceResult",
    "ColourReference",
    "ImageMeasurement",
    "anatomy_bins",
    "adherence",
    "calibrate_colours",
    "column_prompts",
    "load_calibration",
    "measure_adherence",
    "measure_images",
    "measure_masks",
    "metric_name",
    "prompt_vocabulary",
    "row_prompts",
    "ruler_accuracy",
    "ruler_masks",
    "ruler_spec",
    "score",
    "swap_grid",
    "train_ruler",
    "write_payload",
]

Vocabulary = Literal["synthderm", "caption"]
VOCABULARIES: tuple[str, ...] = ("synthderm", "caption")

# The values each vocabulary names; the caption bins are read off measure.py's own functions, so
# they cannot drift from the bins that wrote the captions.
VOCABULARY_VALUES: dict[str, dict[str, tuple[str, ...]]] = {
    "synthderm": {"size": FACTORS["size"], "position": FACTORS["position"]},
    "caption": {
        "size": tuple(dict.fromkeys(size_bin(a) for a in (0.0, *SIZE_THRESHOLDS))),
        "position": tuple(position_bin(x, y) for y in (1 / 6, 1 / 2, 5 / 6) for x in (1 / 6, 1 / 2, 5 / 6)),
    },
}

# Chance agreement of a factor (uniform guessing over its values), per vocabulary.
FACTOR_CHANCE: dict[str, dict[str, float]] = {
    v: {
        "size": 1 / len(values["size"]),
        "position": 1 / len(values["position"]),
        "colour": 1 / len(FACTORS["pigment"]),
    }
    for v, values in VOCABULARY_VALUES.items()
}
MEASURED_FACTORS: tuple[str, ...] = ("size", "position", "colour")

# Instruments: the model-independent ruler (the headline) and the model's own stage-1 pseudo-mask.
RULER = "ruler"
PSEUDO_MASK = "pseudo_mask"


def prompt_vocabulary(dataset: str) -> Vocabulary:
    """The vocabulary a dataset's prompts are written in: SynthDerm's factors for ``synthderm``, the
    caption measurement's bins for every dataset prepared from real data."""
    return "synthderm" if dataset == "synthderm" else "caption"


def _check_vocabulary(vocabulary: str) -> None:
    if vocabulary not in VOCABULARIES:
        raise ValueError(
            f"unknown adherence vocabulary {vocabulary!r}; vocabularies are {', '.join(VOCABULARIES)}"
        )


def anatomy_bins(
    area_fraction: float, centroid: tuple[float, float] | None, vocabulary: str
) -> tuple[str | None, str | None]:
    """(size, position) of a measured lesion in ``vocabulary``; (None, None) without a lesion.

    The one binning of adherence: SynthDerm's factor functions for ``synthderm``, the caption
    bins of :mod:`vgmedgen.platform.datasets.measure` for ``caption``.
    """
    _check_vocabulary(vocabulary)
    if centroid is None:
        return None, None
    if vocabulary == "synthderm":
        return size_of_area_fraction(area_fraction), position_of_centroid(*centroid)
    return size_bin(area_fraction), position_bin(*centroid)


def metric_name(vocabulary: str, factor: str, instrument: str = RULER) -> str:
    """``adherence/<vocabulary>/<factor>`` for the ruler, ``adherence/<vocabulary>/<instrument>/<factor>`` else."""
    return (
        f"adherence/{vocabulary}/{factor}"
        if instrument == RULER
        else f"adherence/{vocabulary}/{instrument}/{factor}"
    )


# ---------------------------------------------------------------------------------------------
# Measuring images
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageMeasurement:
    """What one image shows through a lesion mask: area fraction, centroid and mean lesion RGB.

    ``centroid`` and ``mean_rgb`` are None when the mask is empty (no lesion found), which counts as
    disagreement with any prompt; ``mean_rgb`` is also None for a mask measured without its image.
    """

    area_fraction: float
    centroid: tuple[float, float] | None
    mean_rgb: tuple[float, float, float] | None


def _masks_nhw(masks: torch.Tensor | np.ndarray) -> torch.Tensor:
    m = torch.as_tensor(masks).detach().float().cpu()
    return m[:, 0] if m.ndim == 4 else m  # (N, H, W)


def _lesion_geometry(
    m: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lesion, mass, cx, cy) of (N, H, W) mask values: the pixels above ``threshold`` and their centroid."""
    _, h, w = m.shape
    lesion = (m > threshold).float()  # (N, H, W)
    mass = lesion.sum((1, 2))  # (N,)
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w  # (W,)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h  # (H,)
    cx = (lesion.sum(1) * xs).sum(1) / mass.clamp_min(1)  # (N,)
    cy = (lesion.sum(2) * ys).sum(1) / mass.clamp_min(1)  # (N,)
    return lesion, mass, cx, cy


def measure_images(
    images: torch.Tensor | np.ndarray,
    masks: torch.Tensor | np.ndarray,
    threshold: float = 0.5,
    core_threshold: float | None = None,
) -> list[ImageMeasurement]:
    """Measure a batch of images through their lesion masks.

    Args:
        images: (N, 3, H, W) RGB in [0, 1] (what ``VGMedGen.generate`` returns).
        masks: (N, 1, H, W) or (N, H, W) lesion probabilities (or {0, 1}).
        threshold: a pixel is lesion where its mask value is above this (area, centroid).
        core_threshold: the mean colour is taken over pixels whose mask value is above this (the
            lesion's confident core, away from a rim of skin that soft masks include), or over the
            whole lesion where no pixel is that confident; None: the whole lesion.

    Returns:
        One :class:`ImageMeasurement` per image. Coordinates follow SynthDerm: pixel centres at
        ``(i + 0.5) / side``, x to the right, y downwards; RGB is on the 0-255 scale.
    """
    imgs = torch.as_tensor(images).detach().float().cpu()
    m = _masks_nhw(masks)
    if imgs.ndim != 4 or imgs.shape[1] != 3 or m.shape != (imgs.shape[0], *imgs.shape[2:]):
        raise ValueError(
            f"images must be (N, 3, H, W) and masks (N, [1,] H, W) of the same N, H, W; got {tuple(imgs.shape)} and "
            f"{tuple(torch.as_tensor(masks).shape)}"
        )
    n, _, h, w = imgs.shape
    lesion, mass, cx, cy = _lesion_geometry(m, threshold)
    colour_px = lesion
    if core_threshold is not None:
        core = (m > max(core_threshold, threshold)).float()  # (N, H, W)
        has_core = core.sum((1, 2)) > 0  # (N,)
        colour_px = torch.where(has_core[:, None, None], core, lesion)
    n_px = colour_px.sum((1, 2)).clamp_min(1)  # (N,)
    rgb = (imgs * 255.0 * colour_px[:, None]).sum((2, 3)) / n_px[:, None]  # (N, 3)
    out = []
    for i in range(n):
        if mass[i] == 0:
            out.append(ImageMeasurement(0.0, None, None))
            continue
        out.append(
            ImageMeasurement(
                area_fraction=float(mass[i]) / (h * w),
                centroid=(float(cx[i]), float(cy[i])),
                mean_rgb=tuple(float(v) for v in rgb[i]),  # type: ignore[arg-type]
            )
        )
    return out


def measure_masks(masks: torch.Tensor | np.ndarray, threshold: float = 0.5) -> list[ImageMeasurement]:
    """Area fraction and centroid of (N, [1,] H, W) lesion masks (no colour: ``mean_rgb`` is None)."""
    m = _masks_nhw(masks)
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, [1,] H, W), got {tuple(torch.as_tensor(masks).shape)}")
    _, h, w = m.shape
    _, mass, cx, cy = _lesion_geometry(m, threshold)
    return [
        ImageMeasurement(
            float(mass[i]) / (h * w), (float(cx[i]), float(cy[i])) if mass[i] > 0 else None, None
        )
        for i in range(m.shape[0])
    ]


# ---------------------------------------------------------------------------------------------
# Reference colours
# ---------------------------------------------------------------------------------------------


@dataclass
class ColourReference:
    """Reference lesion colours per (context, pigment), calibrated on real records.

    Attributes:
        context: the style factors a reference is conditioned on, in order.
        table: ``(context values..., pigment) -> (mean RGB, count)`` for every context prefix
            (the full context, then with its last factor dropped, ..., then the pigment alone).
        min_count: fewest records a reference may rest on.
    """

    context: tuple[str, ...]
    table: dict[tuple[str, ...], tuple[tuple[float, float, float], int]]
    min_count: int = 1

    def references(self, style: Mapping[str, str]) -> dict[str, tuple[float, float, float]]:
        """Pigment -> reference RGB for a requested style, using the finest context with enough records.

        Each pigment is looked up on its own: the full context when it has ``min_count`` records,
        else coarser prefixes, else ``PIGMENT_RGB`` (the paint, when no real record of it exists).
        """
        ctx = [style[f] for f in self.context]
        refs = {}
        for pigment in FACTORS["pigment"]:
            for depth in range(len(ctx), -1, -1):
                hit = self.table.get((*ctx[:depth], pigment))
                if hit is not None and hit[1] >= self.min_count:
                    refs[pigment] = hit[0]
                    break
            else:
                refs[pigment] = PIGMENT_RGB[pigment]
        return refs

    def nearest(self, rgb: Sequence[float], style: Mapping[str, str]) -> str:
        """The pigment whose reference (for ``style``'s context) is nearest to ``rgb`` (Euclidean RGB)."""
        refs = self.references(style)
        v = np.asarray(rgb, dtype=np.float64)
        return min(refs, key=lambda p: float(np.sum((v - np.asarray(refs[p])) ** 2)))


def calibrate_colours(
    images: torch.Tensor | np.ndarray,
    masks: torch.Tensor | np.ndarray,
    factors: Sequence[Mapping[str, str]],
    context: Sequence[str] = ("skin_tone", "illumination", "device"),
    min_count: int = 5,
) -> ColourReference:
    """Reference colours from real images with known factors, measured as generated images are.

    Args:
        images: (N, 3, H, W) RGB in [0, 1].
        masks: (N, [1,] H, W) true lesion masks ({0, 1} or probabilities).
        factors: N factor dicts (with ``pigment`` and the ``context`` factors).
        context: style factors to condition on.
        min_count: fewest records a (context, pigment) reference may rest on.

    Returns:
        A :class:`ColourReference` holding means for every context prefix.
    """
    sums: dict[tuple[str, ...], list[Any]] = {}
    for meas, f in zip(measure_images(images, masks), factors, strict=True):
        if meas.mean_rgb is None:
            continue
        values = [f[c] for c in context]
        for depth in range(len(values) + 1):
            key = (*values[:depth], f["pigment"])
            acc = sums.setdefault(key, [np.zeros(3), 0])
            acc[0] += np.asarray(meas.mean_rgb)
            acc[1] += 1
    table = {k: (tuple(float(x) for x in s / c), c) for k, (s, c) in sums.items()}
    return ColourReference(tuple(context), table, min_count)  # type: ignore[arg-type]


def _real_rows(
    records_dir: Path, split: str, limit: int
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Images (N, 3, H, W) in [0, 1], true masks (N, 1, H, W) and factors of a split's first rows with masks."""
    import pyarrow.compute as pc

    from vgmedgen.platform.records import decode_png, read_records

    table = read_records(records_dir, columns=["split", "image", "mask", "attributes"])
    table = table.filter(pc.equal(table.column("split"), split))
    table = table.filter(pc.invert(pc.is_null(table.column("mask")))).slice(0, limit)
    if table.num_rows == 0:
        raise ValueError(f"the records at {records_dir} have no '{split}' rows with masks to measure")
    images = np.stack([decode_png(b) for b in table.column("image").to_pylist()])  # (N, H, W, 3)
    masks = np.stack([decode_png(b, "L") for b in table.column("mask").to_pylist()]) > 127  # (N, H, W)
    attrs = [json.loads(a) for a in table.column("attributes").to_pylist()]
    if not all("pigment" in a for a in attrs):
        raise ValueError(
            f"the records at {records_dir} carry no SynthDerm factors (attributes.pigment): the swap-grid "
            "adherence check needs SynthDerm records (data.dataset=synthderm)"
        )
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    return tensor, torch.from_numpy(masks).float().unsqueeze(1), attrs


def load_calibration(records_dir: Path, cfg: AdherenceConfig) -> ColourReference:
    """Calibrate reference colours on the first ``cfg.calibration_records`` records of a split.

    The real images are measured through their true masks. Measuring them through the stage-1
    segmentor instead (the instrument of the generated images) was tried and matched pigments
    worse on real validation images (0.66 against 0.73 at mask threshold 0.5): where the segmentor
    misses part of a lesion, its references drift towards the skin.
    """
    images, masks, attrs = _real_rows(records_dir, cfg.calibration_split, cfg.calibration_records)
    return calibrate_colours(images, masks, attrs, cfg.colour_context, cfg.min_calibration_records)


# ---------------------------------------------------------------------------------------------
# The one scoring: measured against requested, in one vocabulary
# ---------------------------------------------------------------------------------------------


def _mean(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if flags else math.nan


@dataclass
class Adherence:
    """Measured against requested factors of a set of images, read by one instrument in one vocabulary.

    Attributes:
        vocabulary: ``synthderm`` or ``caption``.
        instrument: ``ruler`` (model-independent, the headline) or ``pseudo_mask`` (the model's own).
        images: per image: ``area_fraction``, ``centroid``, ``mean_rgb``, the measured ``size``,
            ``position`` and ``pigment``, and ``size_ok`` / ``position_ok`` / ``colour_ok`` (None where
            that factor was not requested of the image).
    """

    vocabulary: str
    instrument: str
    images: list[dict[str, Any]]

    def agreement(self, factor: str, subset: Sequence[int] | None = None) -> float:
        """Share of the images (of ``subset``) asked for ``factor`` whose measured value is the one asked."""
        rows = self.images if subset is None else [self.images[i] for i in subset]
        return _mean([p[f"{factor}_ok"] for p in rows if p[f"{factor}_ok"] is not None])

    def factors(self) -> tuple[str, ...]:
        """The factors asked of at least one image, in ``MEASURED_FACTORS`` order."""
        return tuple(f for f in MEASURED_FACTORS if any(p[f"{f}_ok"] is not None for p in self.images))

    def metrics(self) -> dict[str, float]:
        """Agreement per factor, the share of images with no lesion found, and the image count."""
        out = {metric_name(self.vocabulary, f, self.instrument): self.agreement(f) for f in self.factors()}
        empty = [p["centroid"] is None for p in self.images]
        out[metric_name(self.vocabulary, "empty", self.instrument)] = _mean(empty)
        out[metric_name(self.vocabulary, "n", self.instrument)] = float(len(self.images))
        return out


def adherence(
    measured: Sequence[ImageMeasurement],
    requested: Sequence[Mapping[str, Any]],
    vocabulary: str,
    instrument: str,
    colours: ColourReference | None = None,
) -> Adherence:
    """Compare each image's measurement with the factors its prompt asked for, in the prompt's vocabulary.

    Args:
        measured: one measurement per image (through the instrument's mask).
        requested: per image, the factors that wrote its prompt: ``size`` and ``position`` in
            ``vocabulary`` (absent or None: not asked), and for colour ``pigment`` with the
            reference's context factors (only read when ``colours`` is given).
        vocabulary: ``synthderm`` or ``caption`` (:func:`prompt_vocabulary`).
        instrument: what drew the masks: :data:`RULER` or :data:`PSEUDO_MASK`; it names the metrics.
        colours: reference colours for the nearest-pigment match (SynthDerm); None scores no colour.

    Raises:
        ValueError: counts differ, or a requested value is not a value of ``vocabulary`` (the prompts
            were written in another vocabulary).
    """
    _check_vocabulary(vocabulary)
    if len(measured) != len(requested):
        raise ValueError(f"need one request per measurement, got {len(measured)} and {len(requested)}")
    values = VOCABULARY_VALUES[vocabulary]
    other = [v for v in VOCABULARIES if v != vocabulary]
    per_image = []
    for m, want in zip(measured, requested):
        for f in ("size", "position"):
            if want.get(f) is not None and want[f] not in values[f]:
                raise ValueError(
                    f"requested {f} {want[f]!r} is not a {vocabulary} value ({', '.join(values[f])}): the prompt was "
                    f"written in another vocabulary; score it in {' or '.join(other)}"
                )
        size, position = anatomy_bins(m.area_fraction, m.centroid, vocabulary)
        asks_colour = colours is not None and want.get("pigment") is not None
        pigment = None
        if colours is not None and asks_colour and m.mean_rgb is not None:
            pigment = colours.nearest(m.mean_rgb, want)
        per_image.append(
            {
                "area_fraction": m.area_fraction,
                "centroid": m.centroid,
                "mean_rgb": m.mean_rgb,
                "size": size,
                "position": position,
                "pigment": pigment,
                "size_ok": None if want.get("size") is None else size == want["size"],
                "position_ok": None if want.get("position") is None else position == want["position"],
                "colour_ok": pigment == want["pigment"] if asks_colour else None,
            }
        )
    return Adherence(vocabulary, instrument, per_image)


# ---------------------------------------------------------------------------------------------
# The swap grid's report
# ---------------------------------------------------------------------------------------------


@dataclass
class AdherenceResult:
    """Agreement of measured with requested factors on a swap grid, overall, per row and per column.

    Attributes:
        agreement: factor -> share of images whose measured value equals the requested one.
        thresholds: factor -> the agreement needed.
        passed: factor -> agreement >= threshold.
        rows: per row: prompt, requested size/position, their agreement, measured size/position counts.
        columns: per column: prompt, requested pigment, colour agreement, measured pigment counts.
        images: per image: row, column, seed, measurement and the measured pigment.
        vocabulary: the vocabulary the prompts were written and scored in.
        instrument: what read the images (:data:`RULER` or :data:`PSEUDO_MASK`).
        pseudo_mask: the same images read by the model's own pseudo-mask (beside a ruler's result).
        ruler_run: the ruler's export directory (its run name is the directory above it).
        ruler_on_real: the ruler's agreement on real validation records (its own ceiling).
        grid_path: the swap-grid PNG (first seed of every cell), when written.
        samples_path: all sampled images (cells in grid order, seeds side by side), when written.
        mosaic: the mosaic index (:func:`~vgmedgen.platform.evaluation.mosaic.mosaic_index`) of the samples on
            the model's patch grid in pixels (``block``), and of real records (``real``) when measured.
    """

    agreement: dict[str, float]
    thresholds: dict[str, float]
    passed: dict[str, bool]
    rows: list[dict[str, Any]]
    columns: list[dict[str, Any]]
    images: list[dict[str, Any]] = field(default_factory=list)
    vocabulary: str = "synthderm"
    instrument: str = RULER
    pseudo_mask: AdherenceResult | None = None
    ruler_run: Path | None = None
    ruler_on_real: dict[str, float] | None = None
    grid_path: Path | None = None
    samples_path: Path | None = None
    mosaic: dict[str, float] | None = None

    @property
    def all_passed(self) -> bool:
        return all(self.passed.values())

    def headline_metrics(self) -> dict[str, float]:
        """:meth:`metrics` without the per-row and per-column figures (what a model card or a comparison shows)."""
        return {k: v for k, v in self.metrics().items() if not re.search(r"/(row|col)\d+_", k)}

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow, named by vocabulary and instrument: overall, per-row and per-column
        agreement and pass flags; then the pseudo-mask's figures and the ruler's figures on real records."""
        v, ins = self.vocabulary, self.instrument
        out = {metric_name(v, k, ins): a for k, a in self.agreement.items()}
        out.update({metric_name(v, f"{k}_passed", ins): float(ok) for k, ok in self.passed.items()})
        for i, r in enumerate(self.rows):
            out[metric_name(v, f"row{i}_size", ins)] = r["size_agreement"]
            out[metric_name(v, f"row{i}_position", ins)] = r["position_agreement"]
        for j, c in enumerate(self.columns):
            out[metric_name(v, f"col{j}_colour", ins)] = c["colour_agreement"]
        if self.pseudo_mask is not None:
            beside = self.pseudo_mask.metrics()
            out.update({k: x for k, x in beside.items() if not k.endswith("_passed")})
        for k, a in (self.ruler_on_real or {}).items():
            out[metric_name(v, k, "ruler_on_real")] = a
        if self.mosaic is not None:
            out[f"{v}/mosaic_index"] = self.mosaic["samples"]
            if "real" in self.mosaic:
                out[f"{v}/mosaic_index_real"] = self.mosaic["real"]
        return out

    def table(self) -> str:
        """A plain-text report: the factor table with PASS/FAIL, then per-row and per-column tables."""
        pm = self.pseudo_mask
        chance = FACTOR_CHANCE[self.vocabulary]
        lines = [
            f"{'factor':<10}{self.instrument:>10}{'pseudo-mask':>13}{'threshold':>11}{'chance':>8}  result"
        ]
        for k in MEASURED_FACTORS:
            verdict = "PASS" if self.passed[k] else "FAIL"
            beside = f"{pm.agreement[k]:>13.2f}" if pm is not None else f"{'-':>13}"
            lines.append(
                f"{k:<10}{self.agreement[k]:>10.2f}{beside}{self.thresholds[k]:>11.2f}{chance[k]:>8.2f}  {verdict}"
            )
        lines.append("")
        lines.append(
            f"{'row (anatomy prompt)':<58}{'size':>6}{'pos':>6}{'(mask)':>13}  measured size / position ({self.instrument})"
        )
        for i, r in enumerate(self.rows):
            sizes = ", ".join(f"{k}:{n}" for k, n in r["measured_size"].items())
            pos = ", ".join(f"{k}:{n}" for k, n in r["measured_position"].items())
            own = (
                f"{pm.rows[i]['size_agreement']:>6.2f} /{pm.rows[i]['position_agreement']:>5.2f}"
                if pm is not None
                else f"{'-':>13}"
            )
            lines.append(
                f"{r['prompt'][:57]:<58}{r['size_agreement']:>6.2f}{r['position_agreement']:>6.2f}{own:>13}  "
                f"{sizes} / {pos}"
            )
        lines.append("")
        lines.append(
            f"{'column (style prompt)':<58}{'colour':>7}{'(mask)':>8}  measured pigment ({self.instrument})"
        )
        for j, c in enumerate(self.columns):
            pig = ", ".join(f"{k}:{n}" for k, n in c["measured_pigment"].items())
            own = f"{pm.columns[j]['colour_agreement']:>8.2f}" if pm is not None else f"{'-':>8}"
            lines.append(f"{c['prompt'][:57]:<58}{c['colour_agreement']:>7.2f}{own}  {pig}")
        if self.ruler_on_real:
            real = ", ".join(f"{k} {a:.2f}" for k, a in self.ruler_on_real.items() if k in MEASURED_FACTORS)
            lines.append("")
            lines.append(f"ruler on real validation records ({int(self.ruler_on_real.get('n', 0))}): {real}")
        if self.mosaic is not None:
            real = f", real records {self.mosaic['real']:.2f}" if "real" in self.mosaic else ""
            lines.append("")
            lines.append(
                f"mosaic index on {int(self.mosaic['block'])}-px blocks (the patch grid; 1 = no visible blocks): "
                f"samples {self.mosaic['samples']:.2f}{real}"
            )
        return "\n".join(lines)

    def payload(self) -> dict[str, Any]:
        """The JSON written as ``adherence.json``."""
        out: dict[str, Any] = {
            "vocabulary": self.vocabulary,
            "instrument": self.instrument,
            "agreement": self.agreement,
            "thresholds": self.thresholds,
            "passed": self.passed,
            "rows": self.rows,
            "columns": self.columns,
            "images": self.images,
        }
        if self.ruler_run is not None:
            out["ruler_run"] = str(self.ruler_run)
        if self.ruler_on_real is not None:
            out["ruler_on_real"] = self.ruler_on_real
        if self.mosaic is not None:
            out["mosaic"] = self.mosaic
        if self.pseudo_mask is not None:
            out[PSEUDO_MASK] = self.pseudo_mask.payload()
        return out


def _counts(values: Sequence[str | None]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        key = v if v is not None else "none"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def row_prompts(cfg: AdherenceConfig) -> list[str]:
    """The anatomy prompts, in SynthDerm's own anatomy-text form (what the text heads trained on)."""
    return [anatomy_text_of(f) for f in cfg.row_factors()]


def column_prompts(cfg: AdherenceConfig) -> list[str]:
    """The style prompts, in SynthDerm's own style-text form."""
    return [style_text_of(f) for f in cfg.column_factors()]


def score(
    measurements: Sequence[ImageMeasurement],
    row_of: Sequence[int],
    col_of: Sequence[int],
    cfg: AdherenceConfig,
    colours: ColourReference,
    instrument: str = RULER,
) -> AdherenceResult:
    """Compare each swap-grid image's measurement with what its row and column asked for (SynthDerm words).

    Args:
        measurements: one per image, through ``instrument``'s masks.
        row_of: the grid row of each image (its anatomy prompt).
        col_of: the grid column of each image (its style prompt).
        cfg: the grid and the thresholds.
        colours: reference colours for the nearest-pigment match.
        instrument: what drew the masks (names the metrics).

    Returns:
        The :class:`AdherenceResult` (without grid paths).
    """
    if not (len(measurements) == len(row_of) == len(col_of)) or not measurements:
        raise ValueError(
            f"need one row and column per measurement, got {len(measurements)}, {len(row_of)}, {len(col_of)}"
        )
    rows, cols = cfg.row_factors(), cfg.column_factors()
    # The swap grid's prompts are SynthDerm texts, so they are scored in SynthDerm's words.
    scored = adherence(
        measurements,
        [{**rows[i], **cols[j]} for i, j in zip(row_of, col_of)],
        "synthderm",
        instrument,
        colours,
    )
    per_image = [{"row": i, "column": j, **p} for p, i, j in zip(scored.images, row_of, col_of)]
    agreement = {k: scored.agreement(k) for k in MEASURED_FACTORS}
    thresholds = cfg.thresholds
    passed = {k: bool(agreement[k] >= thresholds[k]) for k in MEASURED_FACTORS}
    r_prompts, c_prompts = row_prompts(cfg), column_prompts(cfg)
    row_table = []
    for i, f in enumerate(rows):
        mine = [k for k, p in enumerate(per_image) if p["row"] == i]
        row_table.append(
            {
                "prompt": r_prompts[i],
                "size": f["size"],
                "position": f["position"],
                "size_agreement": scored.agreement("size", mine),
                "position_agreement": scored.agreement("position", mine),
                "measured_size": _counts([per_image[k]["size"] for k in mine]),
                "measured_position": _counts([per_image[k]["position"] for k in mine]),
            }
        )
    col_table = []
    for j, f in enumerate(cols):
        mine = [k for k, p in enumerate(per_image) if p["column"] == j]
        col_table.append(
            {
                "prompt": c_prompts[j],
                "pigment": f["pigment"],
                "skin_tone": f["skin_tone"],
                "colour_agreement": scored.agreement("colour", mine),
                "measured_pigment": _counts([per_image[k]["pigment"] for k in mine]),
            }
        )
    return AdherenceResult(
        agreement, thresholds, passed, row_table, col_table, per_image, scored.vocabulary, instrument
    )


# ---------------------------------------------------------------------------------------------
# The ruler: one instrument for every model
# ---------------------------------------------------------------------------------------------


def ruler_spec(records_dir: Path, resolution: int, cfg: RulerConfig) -> ClassifierSpec:
    """The ruler's training spec: a lesion segmentor on the real train records at their resolution.

    Nothing of the model under test enters it, so its run name (a hash of this spec and the
    records' part files) is the same for every model measured on these records.
    """
    net = domain_net_config(cfg.net, kind="segmentation", num_classes=1, input_size=resolution)
    return ClassifierSpec(net=net, records_dir=Path(records_dir), train=cfg.train, seed=cfg.seed)


def train_ruler(records_dir: Path, storage: Path, resolution: int, cfg: RulerConfig) -> TrainedNet:
    """The ruler, trained once through the shared loop (``fit_classifier``) and reused afterwards.

    Args:
        records_dir: the real records (their train split trains it, val scores it).
        storage: where evaluation networks live (``<output_root>/evaluation/<records>``); the ruler is
            ``<storage>/ruler-<hash>/export``.
        resolution: the records' image side.
        cfg: network, optimisation, seed and workers.
    """
    return fit_classifier(ruler_spec(records_dir, resolution, cfg), Path(storage), RULER, cfg.scaling)


def ruler_masks(ruler: TrainedNet, images: torch.Tensor) -> torch.Tensor:
    """Lesion probabilities (N, 1, H, W) the ruler draws on images (N, 3, H, W) in [0, 1].

    The images are quantised to 8 bits first, as the records it trained on are.
    """
    quantised = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)  # (N, 3, H, W)
    return segment(ruler.net, quantised)


def ruler_accuracy(
    ruler: TrainedNet,
    records_dir: Path,
    cfg: AdherenceConfig,
    colours: ColourReference,
    split: str = "val",
    limit: int = 600,
) -> dict[str, float]:
    """The ruler's agreement with the true factors of real records: size, position, colour and ``n``.

    The same measurement and scoring as generated images get, so it is the ceiling of the headline
    figures (a generated image can only be read as well as a real one).
    """
    images, _, attrs = _real_rows(records_dir, split, limit)
    measured = measure_images(
        images, ruler_masks(ruler, images), cfg.mask_threshold, cfg.colour_mask_threshold
    )
    scored = adherence(measured, attrs, "synthderm", RULER, colours)
    return {**{k: scored.agreement(k) for k in MEASURED_FACTORS}, "n": float(len(attrs))}


# ---------------------------------------------------------------------------------------------
# The swap grid of a model
# ---------------------------------------------------------------------------------------------


def swap_grid(cfg: AdherenceConfig) -> SwapGrid:
    """The swap grid that adherence samples: image ``k`` of every cell uses seed ``cfg.seed + k``, so
    the cells differ only in their prompts (a model that ignores its anatomy prompt draws the same
    image down a column)."""
    return SwapGrid(
        anatomy_prompts=tuple(row_prompts(cfg)),
        style_prompts=tuple(column_prompts(cfg)),
        seeds_per_cell=cfg.seeds_per_cell,
        seed=cfg.seed,
    )


def measure_adherence(
    model: VGMedGen,
    cfg: AdherenceConfig,
    colours: ColourReference,
    ruler: TrainedNet,
    out_dir: Path | None = None,
    ruler_on_real: dict[str, float] | None = None,
) -> AdherenceResult:
    """Sample the swap grid from ``model``, measure every image with the ruler and with the model's own
    pseudo-mask, and score both.

    Args:
        model: the trained model (its EMA weights are sampled when present).
        cfg: grid, seeds, thresholds and sampler.
        colours: reference colours (:func:`load_calibration` on the training records).
        ruler: the model-independent segmentor (:func:`train_ruler`); its figures are the headline.
        out_dir: where to write ``swap_grid.png`` (first seed per cell, rows = anatomy prompts,
            columns = style prompts), ``samples.png`` (every image, one grid row per prompt row)
            and ``adherence.json``; None writes nothing.
        ruler_on_real: the ruler's figures on real records (:func:`ruler_accuracy`), reported beside.

    Returns:
        The ruler's :class:`AdherenceResult`, with the pseudo-mask's beside it (``.pseudo_mask``).
    """
    grid = swap_grid(cfg)
    cells = grid.cells()
    row_of, col_of = [c.row for c in cells], [c.column for c in cells]
    samples = generate_samples(model, grid.requests(), base_sampler=cfg.sampler, batch_size=cfg.batch_size)
    all_images, all_masks = samples.images, samples.masks  # (R*C*k, 3|1, H, W), cells() order
    by_mask = measure_images(all_images, all_masks, cfg.mask_threshold, cfg.colour_mask_threshold)
    by_ruler = measure_images(
        all_images, ruler_masks(ruler, all_images), cfg.mask_threshold, cfg.colour_mask_threshold
    )
    result = score(by_ruler, row_of, col_of, cfg, colours, RULER)
    result.pseudo_mask = score(by_mask, row_of, col_of, cfg, colours, PSEUDO_MASK)
    result.ruler_run = ruler.directory
    result.ruler_on_real = ruler_on_real
    block = patch_block(model)
    if block is not None and block >= 2:
        result.mosaic = {"block": block, "samples": mosaic_index(all_images, block)}
    for res in (result, result.pseudo_mask):
        for p, c in zip(res.images, cells):
            p["seed"] = c.seed
    if out_dir is not None:
        out_dir = Path(out_dir)
        result.grid_path = grid.save(all_images, out_dir / "swap_grid.png")
        result.samples_path = grid.save_all(all_images, out_dir / "samples.png")
        write_payload(result, out_dir)
    return result


def patch_block(model: VGMedGen) -> int | None:
    """The side in pixels of the image block one transformer token draws (patch size x autoencoder downscale);
    None for an image source without a generator (a stand-in that draws real images)."""
    generator = getattr(model, "generator", None)
    if generator is None:
        return None
    return generator.cfg.backbone.patch_size * generator.downscale


def write_payload(result: AdherenceResult, out_dir: Path) -> Path:
    """Write ``adherence.json`` (both instruments, the ruler's run and its figures on real records)."""
    path = Path(out_dir) / "adherence.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.payload(), indent=2))
    return path
