"""Prompt adherence of a trained VG-MedGen, measured on a swap grid of SynthDerm prompts.

The swap grid crosses anatomy prompts (rows) with style prompts (columns): row ``i`` asks for a
lesion size and position, column ``j`` for a pigment on a skin tone, and every cell is sampled
with several seeds. Each generated image is then *measured*, never judged by eye:

- size and position come from the stage-1 segmentor's pseudo-mask (the mask ``generate``
  returns), binarised at ``mask_threshold``: its area fraction is read back into a size bin with
  SynthDerm's own :func:`~vgmedgen.platform.datasets.synthderm.size_of_area_fraction` and its centroid into
  a position with :func:`~vgmedgen.platform.datasets.synthderm.position_of_centroid`, the functions that
  define those factors in the data;
- colour is the mean RGB inside that mask, matched to the nearest *reference colour* among the
  pigments; it agrees when the nearest pigment is the one the column asked for.

Reference colours are calibrated from real SynthDerm records measured the same way (mean RGB of
the image inside the mask the same segmentor draws on them, or the true mask when no segmentor is
given), per pigment and per *context*: the other style factors that
shift a rendered lesion's colour (skin tone, through the anti-aliased and blurred borders;
illumination, through vignetting; device, through saturation and glare). ``PIGMENT_RGB`` is the
paint before all of that and would misplace every reference (a "light brown" lesion measures
about 15% darker and bluer than its paint), so it is only the last fallback when no real record
of a pigment exists.

Chance levels: size 1/3, position 1/5 (centre and four quadrants), colour 1/5 (five pigments).
The default thresholds (0.6 each) were set before any tuning, well above chance.

Shape legend: N images, H/W image size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from vgmedgen.model.configbase import StrictConfig
from vgmedgen.model.sampler import SamplerConfig
from vgmedgen.platform.datasets.synthderm import (
    ANATOMY_FACTORS,
    FACTORS,
    PIGMENT_RGB,
    STYLE_FACTORS,
    anatomy_text_of,
    position_of_centroid,
    size_of_area_fraction,
    style_text_of,
)

if TYPE_CHECKING:
    from vgmedgen.model.vgmedgen import VGMedGen

__all__ = [
    "AdherenceConfig",
    "AdherenceResult",
    "ColourReference",
    "FACTOR_CHANCE",
    "ImageMeasurement",
    "calibrate_colours",
    "measure_adherence",
    "measure_images",
    "score",
]

# Chance agreement of a factor (uniform guessing over its values).
FACTOR_CHANCE: dict[str, float] = {
    "size": 1 / len(FACTORS["size"]),
    "position": 1 / len(FACTORS["position"]),
    "colour": 1 / len(FACTORS["pigment"]),
}
MEASURED_FACTORS: tuple[str, ...] = ("size", "position", "colour")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _check_factor_cells(cells: Sequence[Mapping[str, str]], allowed: tuple[str, ...], what: str) -> None:
    for k, cell in enumerate(cells):
        for factor, value in cell.items():
            if factor not in allowed:
                raise ValueError(f"{what}[{k}]: {factor!r} is not one of the factors {', '.join(allowed)}")
            if value not in FACTORS[factor]:
                raise ValueError(
                    f"{what}[{k}]: {factor}={value!r} is not a SynthDerm value; allowed: {', '.join(FACTORS[factor])}"
                )


class AdherenceConfig(StrictConfig):
    """The swap grid to sample and the agreement each factor must reach.

    Attributes:
        rows: one anatomy factor combination per grid row (must name ``size`` and ``position``);
            the anatomy factors a row leaves out come from ``anatomy_defaults``.
        columns: one style factor combination per grid column (must name ``pigment``); the
            style factors a column leaves out come from ``style_defaults``.
        anatomy_defaults: the other anatomy factors of every row prompt.
        style_defaults: the other style factors of every column prompt.
        seeds_per_cell: images per (row, column) cell: seeds ``seed, ..., seed + seeds_per_cell - 1``
            in every cell, so that along a row or a column only the prompt changes.
        seed: the first seed.
        size_threshold: the size agreement needed to pass (chance 1/3).
        position_threshold: the position agreement needed to pass (chance 1/5).
        colour_threshold: the colour agreement needed to pass (chance 1/5).
        mask_threshold: pseudo-mask probability above which a pixel is lesion (size, position).
        colour_mask_threshold: the lesion colour is the mean over pixels of at least this
            pseudo-mask probability (the confident core). Measured on 500 real validation images
            through a 300-step demo segmentor, references from true masks: pigment agreement
            0.73 at 0.5, 0.77 at 0.8, 0.78 at 0.9, 0.76 at 0.97 (0.84 with the true masks).
        colour_context: style factors the reference colours are conditioned on (besides the
            pigment), matched to each column's prompt.
        min_calibration_records: a (context, pigment) reference needs at least this many real
            records; with fewer, the context is coarsened (its last factor dropped), down to the
            pigment alone.
        calibration_records: how many real records (from ``calibration_split``) calibrate the
            reference colours.
        calibration_split: the split the references come from.
        sampler: sampler settings for the grid (None: the model's own).
        batch_size: images per ``generate`` call.
    """

    rows: tuple[dict[str, str], ...] = (
        {"size": "small", "position": "centre"},
        {"size": "medium", "position": "upper left"},
        {"size": "large", "position": "lower right"},
        {"size": "small", "position": "upper right"},
        {"size": "medium", "position": "lower left"},
        {"size": "large", "position": "centre"},
    )
    columns: tuple[dict[str, str], ...] = (
        {"pigment": "light brown", "skin_tone": "light"},
        {"pigment": "dark brown", "skin_tone": "medium"},
        {"pigment": "black", "skin_tone": "light"},
        {"pigment": "pink", "skin_tone": "medium"},
        {"pigment": "blue-grey", "skin_tone": "light"},
    )
    anatomy_defaults: dict[str, str] = {"shape": "round", "border": "sharp", "count": "one"}
    style_defaults: dict[str, str] = {
        "skin_tone": "light",
        "illumination": "even",
        "artefact": "none",
        "device": "polarised",
    }
    seeds_per_cell: int = Field(2, ge=1, le=64)
    seed: int = Field(0, ge=0)
    size_threshold: float = Field(0.6, ge=0.0, le=1.0)
    position_threshold: float = Field(0.6, ge=0.0, le=1.0)
    colour_threshold: float = Field(0.6, ge=0.0, le=1.0)
    mask_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    colour_mask_threshold: float = Field(0.9, gt=0.0, lt=1.0)
    colour_context: tuple[str, ...] = ("skin_tone", "illumination", "device")
    min_calibration_records: int = Field(8, ge=1)
    calibration_records: int = Field(4000, ge=1)
    calibration_split: str = "train"
    sampler: SamplerConfig | None = None
    batch_size: int = Field(64, ge=1)

    @field_validator("colour_context")
    @classmethod
    def _context_factors(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [f for f in v if f not in STYLE_FACTORS or f == "pigment"]
        if bad:
            allowed = ", ".join(f for f in STYLE_FACTORS if f != "pigment")
            raise ValueError(
                f"colour_context factors {bad} are not style factors other than pigment; allowed: {allowed}"
            )
        return v

    @model_validator(mode="after")
    def _check_cells(self) -> AdherenceConfig:
        if not self.rows or not self.columns:
            raise ValueError(
                "adherence needs at least one row (anatomy prompt) and one column (style prompt)"
            )
        _check_factor_cells(self.rows, ANATOMY_FACTORS, "rows")
        _check_factor_cells(self.columns, STYLE_FACTORS, "columns")
        _check_factor_cells([self.anatomy_defaults], ANATOMY_FACTORS, "anatomy_defaults")
        _check_factor_cells([self.style_defaults], STYLE_FACTORS, "style_defaults")
        for k, row in enumerate(self.rows):
            missing = {"size", "position"} - set(row)
            if missing:
                raise ValueError(
                    f"rows[{k}] must name {' and '.join(sorted(missing))}: they are what the rows measure"
                )
            if not set(ANATOMY_FACTORS) <= set(row) | set(self.anatomy_defaults):
                raise ValueError(
                    f"rows[{k}] with anatomy_defaults does not give every anatomy factor {ANATOMY_FACTORS}"
                )
        for k, col in enumerate(self.columns):
            if "pigment" not in col:
                raise ValueError(f"columns[{k}] must name a pigment: it is what the columns measure")
            if not set(STYLE_FACTORS) <= set(col) | set(self.style_defaults):
                raise ValueError(
                    f"columns[{k}] with style_defaults does not give every style factor {STYLE_FACTORS}"
                )
        return self

    @property
    def thresholds(self) -> dict[str, float]:
        """Factor -> agreement needed to pass."""
        return {
            "size": self.size_threshold,
            "position": self.position_threshold,
            "colour": self.colour_threshold,
        }

    def row_factors(self) -> list[dict[str, str]]:
        """Every row's complete anatomy factors."""
        return [{**self.anatomy_defaults, **row} for row in self.rows]

    def column_factors(self) -> list[dict[str, str]]:
        """Every column's complete style factors."""
        return [{**self.style_defaults, **col} for col in self.columns]

    def row_prompts(self) -> list[str]:
        """The anatomy prompts, in SynthDerm's own anatomy-text form (what the text heads trained on)."""
        return [anatomy_text_of(f) for f in self.row_factors()]

    def column_prompts(self) -> list[str]:
        """The style prompts, in SynthDerm's own style-text form."""
        return [style_text_of(f) for f in self.column_factors()]


# ---------------------------------------------------------------------------------------------
# Measuring images
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageMeasurement:
    """What one image shows: mask area fraction and centroid, mean lesion RGB, and their bins.

    ``size``, ``position`` and ``mean_rgb`` are None when the mask is empty (no lesion found),
    which counts as disagreement with any prompt.
    """

    area_fraction: float
    centroid: tuple[float, float] | None
    mean_rgb: tuple[float, float, float] | None
    size: str | None
    position: str | None


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
    m = torch.as_tensor(masks).detach().float().cpu()
    if m.ndim == 4:
        m = m[:, 0]  # (N, H, W)
    if imgs.ndim != 4 or imgs.shape[1] != 3 or m.shape != (imgs.shape[0], *imgs.shape[2:]):
        raise ValueError(
            f"images must be (N, 3, H, W) and masks (N, [1,] H, W) of the same N, H, W; got {tuple(imgs.shape)} and "
            f"{tuple(torch.as_tensor(masks).shape)}"
        )
    n, _, h, w = imgs.shape
    lesion = (m > threshold).float()  # (N, H, W)
    mass = lesion.sum((1, 2))  # (N,)
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w  # (W,)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h  # (H,)
    cx = (lesion.sum(1) * xs).sum(1) / mass.clamp_min(1)  # (N,)
    cy = (lesion.sum(2) * ys).sum(1) / mass.clamp_min(1)  # (N,)
    colour_px = lesion
    if core_threshold is not None:
        core = (m > max(core_threshold, threshold)).float()  # (N, H, W)
        has_core = core.sum((1, 2)) > 0  # (N,)
        colour_px = torch.where(has_core[:, None, None], core, lesion)
    n_px = colour_px.sum((1, 2)).clamp_min(1)  # (N,)
    rgb = (imgs * 255.0 * colour_px[:, None]).sum((2, 3)) / n_px[:, None]  # (N, 3)
    out = []
    for i in range(n):
        area = float(mass[i]) / (h * w)
        if mass[i] == 0:
            out.append(ImageMeasurement(0.0, None, None, None, None))
            continue
        c = (float(cx[i]), float(cy[i]))
        out.append(
            ImageMeasurement(
                area_fraction=area,
                centroid=c,
                mean_rgb=tuple(float(v) for v in rgb[i]),  # type: ignore[arg-type]
                size=size_of_area_fraction(area),
                position=position_of_centroid(*c),
            )
        )
    return out


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


def load_calibration(records_dir: Path, cfg: AdherenceConfig) -> ColourReference:
    """Calibrate reference colours on the first ``cfg.calibration_records`` records of a split.

    The real images are measured through their true masks. Measuring them through the stage-1
    segmentor instead (the instrument of the generated images) was tried and matched pigments
    worse on real validation images (0.66 against 0.73 at mask threshold 0.5): where the segmentor
    misses part of a lesion, its references drift towards the skin.
    """
    import pyarrow.compute as pc

    from vgmedgen.platform.records import decode_png, read_records

    table = read_records(records_dir, columns=["split", "image", "mask", "attributes"])
    table = table.filter(pc.equal(table.column("split"), cfg.calibration_split))
    table = table.filter(pc.invert(pc.is_null(table.column("mask")))).slice(0, cfg.calibration_records)
    if table.num_rows == 0:
        raise ValueError(
            f"the records at {records_dir} have no '{cfg.calibration_split}' rows with masks to calibrate colours on"
        )
    images = np.stack([decode_png(b) for b in table.column("image").to_pylist()])  # (N, H, W, 3)
    masks = np.stack([decode_png(b, "L") for b in table.column("mask").to_pylist()]) > 127  # (N, H, W)
    attrs = [json.loads(a) for a in table.column("attributes").to_pylist()]
    if not all("pigment" in a for a in attrs):
        raise ValueError(
            f"the records at {records_dir} carry no SynthDerm factors (attributes.pigment): adherence needs SynthDerm"
        )
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    mask_tensor = torch.from_numpy(masks).float().unsqueeze(1)  # (N, 1, H, W)
    return calibrate_colours(tensor, mask_tensor, attrs, cfg.colour_context, cfg.min_calibration_records)


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


@dataclass
class AdherenceResult:
    """Agreement of measured with requested factors, overall, per row and per column.

    Attributes:
        agreement: factor -> share of images whose measured value equals the requested one.
        thresholds: factor -> the agreement needed.
        passed: factor -> agreement >= threshold.
        rows: per row: prompt, requested size/position, their agreement, measured size/position counts.
        columns: per column: prompt, requested pigment, colour agreement, measured pigment counts.
        images: per image: row, column, seed, measurement and the measured pigment.
        grid_path: the swap-grid PNG (first seed of every cell), when written.
        samples_path: all sampled images (cells in grid order, seeds side by side), when written.
    """

    agreement: dict[str, float]
    thresholds: dict[str, float]
    passed: dict[str, bool]
    rows: list[dict[str, Any]]
    columns: list[dict[str, Any]]
    images: list[dict[str, Any]] = field(default_factory=list)
    grid_path: Path | None = None
    samples_path: Path | None = None

    @property
    def all_passed(self) -> bool:
        return all(self.passed.values())

    def metrics(self, prefix: str = "adherence/") -> dict[str, float]:
        """Flat numbers for MLflow: overall, per-row and per-column agreement, and pass flags."""
        out = {f"{prefix}{k}": v for k, v in self.agreement.items()}
        out.update({f"{prefix}{k}_passed": float(v) for k, v in self.passed.items()})
        for i, r in enumerate(self.rows):
            out[f"{prefix}row{i}_size"] = r["size_agreement"]
            out[f"{prefix}row{i}_position"] = r["position_agreement"]
        for j, c in enumerate(self.columns):
            out[f"{prefix}col{j}_colour"] = c["colour_agreement"]
        return out

    def table(self) -> str:
        """A plain-text report: the factor table with PASS/FAIL, then per-row and per-column tables."""
        lines = [f"{'factor':<10}{'agreement':>10}{'threshold':>10}{'chance':>8}  result"]
        for k in MEASURED_FACTORS:
            verdict = "PASS" if self.passed[k] else "FAIL"
            lines.append(
                f"{k:<10}{self.agreement[k]:>10.2f}{self.thresholds[k]:>10.2f}{FACTOR_CHANCE[k]:>8.2f}  {verdict}"
            )
        lines.append("")
        lines.append(f"{'row (anatomy prompt)':<58}{'size':>6}{'pos':>6}  measured size / position")
        for r in self.rows:
            sizes = ", ".join(f"{k}:{v}" for k, v in r["measured_size"].items())
            pos = ", ".join(f"{k}:{v}" for k, v in r["measured_position"].items())
            lines.append(
                f"{r['prompt'][:57]:<58}{r['size_agreement']:>6.2f}{r['position_agreement']:>6.2f}  {sizes} / {pos}"
            )
        lines.append("")
        lines.append(f"{'column (style prompt)':<58}{'colour':>7}  measured pigment")
        for c in self.columns:
            pig = ", ".join(f"{k}:{v}" for k, v in c["measured_pigment"].items())
            lines.append(f"{c['prompt'][:57]:<58}{c['colour_agreement']:>7.2f}  {pig}")
        return "\n".join(lines)


def _counts(values: Sequence[str | None]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        key = v if v is not None else "none"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def score(
    measurements: Sequence[ImageMeasurement],
    row_of: Sequence[int],
    col_of: Sequence[int],
    cfg: AdherenceConfig,
    colours: ColourReference,
) -> AdherenceResult:
    """Compare each image's measurement with what its row and column asked for.

    Args:
        measurements: one per image.
        row_of: the grid row of each image (its anatomy prompt).
        col_of: the grid column of each image (its style prompt).
        cfg: the grid and the thresholds.
        colours: reference colours for the nearest-pigment match.

    Returns:
        The :class:`AdherenceResult` (without grid paths).
    """
    if not (len(measurements) == len(row_of) == len(col_of)) or not measurements:
        raise ValueError(
            f"need one row and column per measurement, got {len(measurements)}, {len(row_of)}, {len(col_of)}"
        )
    rows, cols = cfg.row_factors(), cfg.column_factors()
    per_image = []
    for m, i, j in zip(measurements, row_of, col_of):
        pigment = colours.nearest(m.mean_rgb, cols[j]) if m.mean_rgb is not None else None
        per_image.append(
            {
                "row": i,
                "column": j,
                "area_fraction": m.area_fraction,
                "centroid": m.centroid,
                "mean_rgb": m.mean_rgb,
                "size": m.size,
                "position": m.position,
                "pigment": pigment,
                "size_ok": m.size == rows[i]["size"],
                "position_ok": m.position == rows[i]["position"],
                "colour_ok": pigment == cols[j]["pigment"],
            }
        )

    def mean(flags: Sequence[bool]) -> float:
        return float(np.mean(flags)) if flags else math.nan

    agreement = {
        "size": mean([p["size_ok"] for p in per_image]),
        "position": mean([p["position_ok"] for p in per_image]),
        "colour": mean([p["colour_ok"] for p in per_image]),
    }
    thresholds = cfg.thresholds
    passed = {k: bool(agreement[k] >= thresholds[k]) for k in MEASURED_FACTORS}
    row_prompts, col_prompts = cfg.row_prompts(), cfg.column_prompts()
    row_table = []
    for i, f in enumerate(rows):
        mine = [p for p in per_image if p["row"] == i]
        row_table.append(
            {
                "prompt": row_prompts[i],
                "size": f["size"],
                "position": f["position"],
                "size_agreement": mean([p["size_ok"] for p in mine]),
                "position_agreement": mean([p["position_ok"] for p in mine]),
                "measured_size": _counts([p["size"] for p in mine]),
                "measured_position": _counts([p["position"] for p in mine]),
            }
        )
    col_table = []
    for j, f in enumerate(cols):
        mine = [p for p in per_image if p["column"] == j]
        col_table.append(
            {
                "prompt": col_prompts[j],
                "pigment": f["pigment"],
                "skin_tone": f["skin_tone"],
                "colour_agreement": mean([p["colour_ok"] for p in mine]),
                "measured_pigment": _counts([p["pigment"] for p in mine]),
            }
        )
    return AdherenceResult(agreement, thresholds, passed, row_table, col_table, per_image)


# ---------------------------------------------------------------------------------------------
# The swap grid of a model
# ---------------------------------------------------------------------------------------------


def measure_adherence(
    model: VGMedGen,
    cfg: AdherenceConfig,
    colours: ColourReference,
    out_dir: Path | None = None,
) -> AdherenceResult:
    """Sample the swap grid from ``model``, measure every image, and score agreement.

    Image ``k`` of every cell uses seed ``cfg.seed + k``: the cells differ only in their prompts, so
    the grid shows what each prompt changes (a model that ignores its anatomy prompt draws the same
    image down a column), and every image is reproducible from its cell and ``k``.

    Args:
        model: the trained model (its EMA weights are sampled when present).
        cfg: grid, seeds, thresholds and sampler.
        colours: reference colours (:func:`load_calibration` on the training records).
        out_dir: where to write ``swap_grid.png`` (first seed per cell, rows = anatomy prompts,
            columns = style prompts), ``samples.png`` (every image, one grid row per prompt row)
            and ``adherence.json``; None writes nothing.

    Returns:
        The :class:`AdherenceResult`.
    """
    from vgmedgen.platform.visualize import save_grid, save_swap_grid

    row_prompts, col_prompts = cfg.row_prompts(), cfg.column_prompts()
    n_r, n_c, k = len(row_prompts), len(col_prompts), cfg.seeds_per_cell
    row_of = [i for i in range(n_r) for _ in range(n_c) for _ in range(k)]
    col_of = [j for _ in range(n_r) for j in range(n_c) for _ in range(k)]
    seeds = [cfg.seed + s for _ in range(n_r * n_c) for s in range(k)]
    images, masks = [], []
    for start in range(0, len(seeds), cfg.batch_size):
        sl = slice(start, start + cfg.batch_size)
        cond = model.conditions_from_prompts(
            [row_prompts[i] for i in row_of[sl]], [col_prompts[j] for j in col_of[sl]]
        )
        im, mk = model.generate(cond, seeds[sl], sampler=cfg.sampler)
        images.append(im.cpu())
        masks.append(mk.cpu())
    all_images = torch.cat(images)  # (R*C*k, 3, H, W), cell-major, seeds innermost
    all_masks = torch.cat(masks)  # (R*C*k, 1, H, W)
    measured = measure_images(all_images, all_masks, cfg.mask_threshold, cfg.colour_mask_threshold)
    result = score(measured, row_of, col_of, cfg, colours)
    for p, s in zip(result.images, seeds):
        p["seed"] = s
    if out_dir is not None:
        out_dir = Path(out_dir)
        result.grid_path = save_swap_grid(
            all_images[::k], row_prompts, col_prompts, out_dir / "swap_grid.png"
        )
        result.samples_path = save_grid(all_images, out_dir / "samples.png", ncol=n_c * k)
        payload = {
            "agreement": result.agreement,
            "thresholds": result.thresholds,
            "passed": result.passed,
            "rows": result.rows,
            "columns": result.columns,
            "images": result.images,
        }
        (out_dir / "adherence.json").write_text(json.dumps(payload, indent=2))
    return result
