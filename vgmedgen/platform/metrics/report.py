"""The evaluation report: JSON for machines, a Markdown table for people, PNG plots for both.

Every distance is shown beside its floor: the same distance between real training and real test
images at the same N. FD and KD are biased by sample size and have no absolute scale, so "FID 51"
means little alone; "51 against a floor of 12 at N=500" says how far from real data the model is.

Plots use matplotlib's object API on the Agg canvas (no pyplot, no global backend switch), so
writing a report never touches another thread's figures or needs a display.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vgmedgen.platform.metrics.memorisation import MemorisationResult
from vgmedgen.platform.metrics.stats import MetricsError

__all__ = ["DistanceRow", "EvaluationReport", "distance_rows", "markdown_report", "write_report"]


@dataclass(frozen=True)
class DistanceRow:
    """One distance (FID, KID, HFD, ...) of the generated set, with its real-vs-real floor.

    ``floor`` is the same distance between real train (``n_generated`` rows) and real test; NaN where
    it could not be computed (then ``note`` says why). ``std`` is the KD spread over subsets.
    """

    metric: str
    value: float
    floor: float
    n_generated: int
    n_reference: int
    std: float | None = None
    floor_std: float | None = None
    extractor: str = ""
    note: str = ""

    @property
    def ratio(self) -> float:
        """value / floor (NaN when the floor is missing or not positive)."""
        if not math.isfinite(self.floor) or self.floor <= 0:
            return math.nan
        return self.value / self.floor


def distance_rows(
    fd_name: str, kd_name: str, generated: Any, floor: Any | None, extractor: str = ""
) -> list[DistanceRow]:
    """The FD and KD rows of one extractor from two ``fidelity.Distances`` (generated vs test, train vs test).

    Args:
        fd_name: e.g. "FID" or "HFD"; kd_name: e.g. "KID" or "HKD".
        generated: distances of the generated set to the real test set.
        floor: distances of ``generated.n_a`` real train rows to the same test set; None if unavailable.
        extractor: the feature extractor's name, shown in the table.
    """
    note = "; ".join(generated.warnings)
    floor_fd = math.nan if floor is None else floor.fd
    floor_kd = math.nan if floor is None else floor.kd_mean
    floor_kd_std = None if floor is None else floor.kd_std
    n_gen, n_ref = generated.n_a, generated.n_b
    return [
        DistanceRow(fd_name, generated.fd, floor_fd, n_gen, n_ref, extractor=extractor, note=note),
        DistanceRow(
            kd_name,
            generated.kd_mean,
            floor_kd,
            n_gen,
            n_ref,
            std=generated.kd_std,
            floor_std=floor_kd_std,
            extractor=extractor,
            note=note,
        ),
    ]


@dataclass
class EvaluationReport:
    """What one evaluation of one model version found."""

    title: str
    dataset: str
    distances: list[DistanceRow]
    model_version: str | None = None
    memorisation: MemorisationResult | None = None
    scalars: dict[str, float] = field(
        default_factory=dict
    )  # other numbers (controllability, downstream, ...)
    warnings: list[str] = field(default_factory=list)
    # Named tables (controllability per factor, downstream per plan, ...): lists of rows with the same keys.
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Nearest-neighbour distances for the memorisation histogram (not written to JSON).
    generated_nearest: np.ndarray | None = None
    test_nearest: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; NaN and infinity become None (JSON has no NaN)."""
        data = {
            "title": self.title,
            "dataset": self.dataset,
            "model_version": self.model_version,
            "distances": [{**asdict(r), "ratio": r.ratio} for r in self.distances],
            "memorisation": self.memorisation.to_dict() if self.memorisation else None,
            "scalars": dict(self.scalars),
            "warnings": list(self.warnings),
            "tables": {k: [dict(r) for r in rows] for k, rows in self.tables.items()},
        }
        return _json_clean(data)


def _json_clean(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def markdown_report(report: EvaluationReport) -> str:
    """The report as Markdown: distances beside floors, memorisation, other scalars, warnings."""
    lines = [f"# {report.title}", "", f"Dataset: `{report.dataset}`"]
    if report.model_version:
        lines.append(f"Model version: `{report.model_version}`")
    lines += [
        "",
        "## Distances (lower is better; floor = real train vs real test at the same N)",
        "",
        "| metric | generated | floor | generated / floor | N generated | N reference | extractor | note |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report.distances:
        value = _fmt(r.value) + (f" ± {_fmt(r.std, 2)}" if r.std is not None else "")
        floor = _fmt(r.floor) + (
            f" ± {_fmt(r.floor_std, 2)}" if r.floor_std is not None and math.isfinite(r.floor) else ""
        )
        lines.append(
            f"| {r.metric} | {value} | {floor} | {_fmt(r.ratio, 3)} | {r.n_generated} | {r.n_reference} | "
            f"{r.extractor} | {r.note} |"
        )
    if report.memorisation is not None:
        m = report.memorisation
        lines += [
            "",
            "## Memorisation",
            "",
            f"{m.flagged} of {m.generated} generated images ({100 * m.share:.2f}%) are nearer to a training image "
            f"({m.metric} distance in domain features) than the {m.percentile:g}th percentile of real-test-to-train "
            f"nearest distances ({_fmt(m.threshold)}); real test images under the same bar: {100 * m.test_share:.2f}%.",
        ]
    if report.scalars:
        lines += ["", "## Other results", "", "| name | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in report.scalars.items()]
    for name, rows in report.tables.items():
        if not rows:
            continue
        keys = list(rows[0])
        lines += ["", f"## {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += [
            "| " + " | ".join(_fmt(r[k]) if isinstance(r[k], float) else str(r[k]) for k in keys) + " |"
            for r in rows
        ]
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report.warnings]
    return "\n".join(lines) + "\n"


def _plot_distances(rows: Sequence[DistanceRow], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # One panel per metric: FID (~10s) and KID (~0.01s) share no scale.
    fig = Figure(figsize=(2.6 * max(1, len(rows)), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(rows)), squeeze=False)[0]
    for ax, r in zip(axes, rows):
        values = [r.value, r.floor if math.isfinite(r.floor) else 0.0]
        errors = [r.std or 0.0, (r.floor_std or 0.0) if math.isfinite(r.floor) else 0.0]
        ax.bar(
            ["generated", "floor"],
            values,
            yerr=errors if any(errors) else None,
            color=["#c0504d", "#4f81bd"],
            capsize=3,
        )
        ax.set_title(f"{r.metric} (N={r.n_generated})", fontsize=9)
        if not math.isfinite(r.floor):
            ax.text(1, 0, "n/a", ha="center", va="bottom", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _plot_memorisation(m: MemorisationResult, gen: np.ndarray, test: np.ndarray, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    bins = np.histogram_bin_edges(np.concatenate([gen, test]), bins=30)
    ax.hist(test, bins=bins, alpha=0.6, density=True, label="real test -> train", color="#4f81bd")
    ax.hist(gen, bins=bins, alpha=0.6, density=True, label="generated -> train", color="#c0504d")
    ax.axvline(
        m.threshold,
        color="k",
        linestyle="--",
        label=f"{m.percentile:g}th pct ({100 * m.share:.1f}% gen. below)",
    )
    ax.set_xlabel(f"nearest training image ({m.metric} distance)", fontsize=9)
    ax.set_ylabel("density", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def write_report(report: EvaluationReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``distances.png`` and (with memorisation data) ``memorisation.png``.

    Returns:
        The written paths by kind ("json", "markdown", "distances_png", "memorisation_png").
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not report.distances and report.memorisation is None and not report.scalars:
        raise MetricsError("the evaluation report is empty: no distances, memorisation or scalars to write")
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown_report(report))
    if report.distances:
        paths["distances_png"] = out / "distances.png"
        _plot_distances(report.distances, paths["distances_png"])
    if (
        report.memorisation is not None
        and report.generated_nearest is not None
        and report.test_nearest is not None
    ):
        paths["memorisation_png"] = out / "memorisation.png"
        _plot_memorisation(
            report.memorisation, report.generated_nearest, report.test_nearest, paths["memorisation_png"]
        )
    return paths
