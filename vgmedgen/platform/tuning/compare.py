"""A sweep's comparison report: how groups of trials compare on the evaluate job's figures.

With ``report.evaluate: true`` in the sweep file, once the trials are done every trial that trained to its
last dit step goes through:

- the evaluate job on its model version (:func:`~vgmedgen.platform.evaluation.driver.evaluate_experiment`,
  with the sweep's ``report.overrides``): domain FD/KD (FID/KID with the Inception weights), memorisation,
  judged controllability under swapped prompts on SynthDerm, the low-data downstream benchmark when the
  experiment's ``evaluate.downstream`` is on. The trial's MLflow run is tagged with its version first, so
  the evaluation is logged there;
- on SynthDerm (``report.adherence``), the adherence swap grid read by the ruler, as the demo measures it
  (size, position, colour).

Trials are then grouped by what they were swept over apart from their ``seed`` (for a sweep of variants:
by variant), and each group gets the mean and standard deviation over its trials of each headline figure:
``comparison.csv``, ``comparison.md`` (the best group per column in bold) and ``comparison.png`` (one panel
per figure, a bar per group with its trials as dots), and on SynthDerm the judged controllability of every
factor under matched and swapped prompts (``controllability.md`` and ``controllability.png``), logged to the
sweep's MLflow run. Each trial's
figures are kept in ``sweep.json`` with the report settings they were measured with: a report cut short
continues where it stopped, and changed ``report.overrides`` measure every trial again.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vgmedgen.model.configbase import build_config
from vgmedgen.platform.config import ExperimentConfig, apply_overrides
from vgmedgen.platform.tuning.config import VARIANT, Sweep
from vgmedgen.platform.tuning.report import TrialRow
from vgmedgen.platform.tuning.trial import finished_trial, trial_experiment

__all__ = [
    "Column",
    "GroupSummary",
    "columns",
    "compare_trials",
    "group_name",
    "summarise",
    "write_comparison",
    "write_controllability",
]

SEED = "seed"  # the dimension a group's trials differ by
ADHERENCE_FACTORS = ("size", "position", "colour")


@dataclass(frozen=True)
class Column:
    """A headline figure: its metric key, its label, and which way is better."""

    key: str
    label: str
    better: str  # "min" or "max"


@dataclass
class GroupSummary:
    """One group of trials (e.g. a variant over its seeds): per figure, the mean, the standard deviation
    (ddof 1; 0 for a single trial) and the trials' values."""

    name: str
    trials: list[str]
    values: dict[str, list[float]]

    def mean(self, key: str) -> float | None:
        v = self.values.get(key) or []
        return float(np.mean(v)) if v else None

    def std(self, key: str) -> float | None:
        v = self.values.get(key) or []
        return float(np.std(v, ddof=1)) if len(v) > 1 else (0.0 if v else None)


def columns(dataset: str, keys: set[str]) -> list[Column]:
    """The headline figures present in ``keys`` (a trial's evaluation), in the report's order."""
    from vgmedgen.platform.evaluation.adherence import metric_name
    from vgmedgen.platform.metrics.fidelity import domain_metric_names

    fd, kd = domain_metric_names(dataset)
    fixed = [
        Column(f"eval/{fd}", f"domain FD ({fd})", "min"),
        Column(f"eval/{kd}", f"domain KD ({kd})", "min"),
        Column("eval/FID", "FID", "min"),
        Column("eval/KID", "KID", "min"),
        *(Column(metric_name("synthderm", f), f"adherence: {f}", "max") for f in ADHERENCE_FACTORS),
        Column("control/swapped_anatomy_mean", "controllability: anatomy, swapped", "max"),
        Column("control/swapped_style_mean", "controllability: style, swapped", "max"),
        Column("eval/memorisation_share", "memorisation share", "min"),
    ]
    downstream = sorted(
        k
        for k in keys
        if k.startswith("downstream/") and not k.endswith("_std") and k != "downstream/seconds"
    )
    return [c for c in fixed if c.key in keys] + [
        Column(k, "downstream: " + k.removeprefix("downstream/").replace("_", " "), "max") for k in downstream
    ]


def group_name(values: Mapping[str, Any]) -> str:
    """The group of a trial: its variant (if any) and every swept value but its seed."""
    parts = [str(values[VARIANT])] if VARIANT in values else []
    parts += [f"{k}={values[k]}" for k in sorted(values) if k not in (VARIANT, SEED)]
    return ", ".join(parts) or "all trials"


def summarise(rows: Sequence[TrialRow], order: Sequence[str] = ()) -> list[GroupSummary]:
    """Group the evaluated trials (``order``: group names to put first, e.g. the variants as listed)."""
    groups: dict[str, GroupSummary] = {}
    for row in rows:
        if not row.evaluation:
            continue
        name = group_name(row.values)
        group = groups.setdefault(name, GroupSummary(name, [], {}))
        group.trials.append(row.short)
        for key, value in row.evaluation.items():
            if math.isfinite(value):
                group.values.setdefault(key, []).append(float(value))
    rank = {name: i for i, name in enumerate(order)}
    return sorted(groups.values(), key=lambda g: (rank.get(g.name, len(rank)), g.name))


def _best_group(groups: Sequence[GroupSummary], column: Column) -> str | None:
    scored = [(g.mean(column.key), g.name) for g in groups if g.mean(column.key) is not None]
    if len(scored) < 2:
        return None
    return (min if column.better == "min" else max)(scored)[1]


def write_comparison(groups: Sequence[GroupSummary], cols: Sequence[Column], directory: Path) -> list[Path]:
    """``comparison.csv`` (per group: trials, then mean and std of each figure), ``comparison.md`` (mean +- std,
    the best group of each figure in bold) and ``comparison.png``."""
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = directory / "comparison.csv", directory / "comparison.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "trials", *(f"{c.key}_{s}" for c in cols for s in ("mean", "std"))])
        for g in groups:
            cells = [g.mean(c.key) if s == "mean" else g.std(c.key) for c in cols for s in ("mean", "std")]
            writer.writerow([g.name, len(g.trials), *("" if v is None else f"{v:.6g}" for v in cells)])
    best = {c.key: _best_group(groups, c) for c in cols}
    header = ["group", "trials", *(f"{c.label} {'↓' if c.better == 'min' else '↑'}" for c in cols)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        cells = []
        for c in cols:
            mean, std = g.mean(c.key), g.std(c.key)
            text = "-" if mean is None else f"{mean:.4g} ± {std:.2g}"
            cells.append(f"**{text}**" if best[c.key] == g.name else text)
        lines.append("| " + " | ".join([g.name, str(len(g.trials)), *cells]) + " |")
    lines += [
        "",
        "Mean ± standard deviation over each group's trials (its seeds); ↓ lower is better, ↑ higher is better; "
        "the best group of each column in bold.",
    ]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path, _plot(groups, cols, directory / "comparison.png")]


def _figure(groups: Sequence[GroupSummary], cols: Sequence[Column]) -> Any:
    """One bar panel per figure, four to a row; long titles wrap inside their panel."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(cols), 1)
    per_row = min(n, 4)
    nrows = math.ceil(n / per_row)
    fig, axes = plt.subplots(
        nrows, per_row, figsize=(3.4 * per_row, 3.2 * nrows), squeeze=False, layout="constrained"
    )
    x = np.arange(len(groups))
    for ax, c in zip(axes.flat, cols):
        means = [g.mean(c.key) for g in groups]
        stds = [g.std(c.key) or 0.0 for g in groups]
        ax.bar(
            x, [m if m is not None else 0.0 for m in means], yerr=stds, capsize=3, color="tab:blue", alpha=0.6
        )
        for i, g in enumerate(groups):
            vals = g.values.get(c.key, [])
            ax.scatter([i] * len(vals), vals, color="black", s=10, zorder=3)
        ax.set_xticks(x, [g.name for g in groups], rotation=35, ha="right", fontsize=7)
        title = f"{c.label} ({'lower' if c.better == 'min' else 'higher'} is better)"
        ax.set_title(textwrap.fill(title, 40), fontsize=8)
    for ax in list(axes.flat)[len(cols) :]:
        ax.axis("off")
    fig.suptitle("per group: mean ± std over its trials (dots: each trial)", fontsize=9)
    return fig


def _plot(groups: Sequence[GroupSummary], cols: Sequence[Column], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = _figure(groups, cols)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _judged_factors(groups: Sequence[GroupSummary]) -> list[str]:
    """The factors the judges read in any group, in the dataset's order (anatomy, then style)."""
    from vgmedgen.platform.datasets.synthderm import ANATOMY_FACTORS, STYLE_FACTORS

    present = {
        k.removeprefix("control/matched_")
        for g in groups
        for k in g.values
        if k.startswith("control/matched_")
    }
    return [f for f in (*ANATOMY_FACTORS, *STYLE_FACTORS) if f in present]


def write_controllability(groups: Sequence[GroupSummary], directory: Path) -> list[Path]:
    """Per judged factor and group: the judges' accuracy on matched prompts (train captions) and on swapped
    ones (anatomy and style from different records), mean +- std over the group's trials, as
    ``controllability.md`` (a row per factor, a column per group; the best swapped accuracy in bold) and
    ``controllability.png`` (swapped as bars, matched as open markers). Nothing without judged factors."""
    factors = _judged_factors(groups)
    if not factors:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    md_path = directory / "controllability.md"

    def cell(g: GroupSummary, key: str) -> str:
        mean, std = g.mean(key), g.std(key)
        return "-" if mean is None else f"{mean:.2f} ± {std:.2f}"

    def reference(f: str, what: str) -> str:  # the same judges and prompts for every group: the first found
        found = [m for g in groups if (m := g.mean(f"control/{what}_{f}")) is not None]
        return f"{found[0]:.2f}" if found else "-"

    header = ["factor", "judge on real", "chance", *(g.name for g in groups)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for f in factors:
        best = _best_group(groups, Column(f"control/swapped_{f}", f, "max"))
        cells = [reference(f, "judge_on_real"), reference(f, "chance")]
        for g in groups:
            swapped = cell(g, f"control/swapped_{f}")
            swapped = f"**{swapped}**" if best == g.name else swapped
            cells.append(f"{cell(g, f'control/matched_{f}')} / {swapped}")
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The judges' accuracy on each factor: matched prompts (train captions) / swapped prompts (anatomy and "
        "style from different records); mean ± standard deviation over each group's trials; the best swapped "
        "accuracy of each factor in bold. A factor is measured only as well as its judge reads real images "
        "(judge on real); chance is always answering the most frequent requested value.",
    ]
    md_path.write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.25 * len(factors)), 4.0))
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(factors))
    for i, g in enumerate(groups):
        offset = x - 0.4 + width * (i + 0.5)
        swapped = [g.mean(f"control/swapped_{f}") or 0.0 for f in factors]
        stds = [g.std(f"control/swapped_{f}") or 0.0 for f in factors]
        matched = [g.mean(f"control/matched_{f}") for f in factors]
        bars = ax.bar(offset, swapped, width, yerr=stds, capsize=2, label=g.name, alpha=0.75)
        ax.scatter(
            offset,
            [np.nan if m is None else m for m in matched],
            facecolors="none",
            edgecolors=bars.patches[0].get_facecolor(),
            marker="o",
            s=22,
            zorder=3,
        )
    for j, f in enumerate(factors):  # what each factor's accuracy reads against
        for what, style in (("chance", "--"), ("judge_on_real", ":")):
            found = [m for g in groups if (m := g.mean(f"control/{what}_{f}")) is not None]
            if found:
                ax.hlines(found[0], j - 0.45, j + 0.45, colors="black", linestyles=style, linewidth=1)
    ax.set_xticks(x, factors, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("judged accuracy")
    ax.set_title(
        "judged accuracy per factor: swapped prompts (bars), matched (circles); "
        "chance (dashed), the judge on real images (dotted)",
        fontsize=8,
    )
    ax.legend(
        fontsize=7, ncol=min(len(groups), 5), loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False
    )
    fig.tight_layout()
    png_path = directory / "controllability.png"
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return [md_path, png_path]


def _report_experiment(sweep: Sweep, row: TrialRow) -> ExperimentConfig:
    cfg = trial_experiment(sweep, row.values)
    overrides = sweep.config.report.overrides
    if not overrides:
        return cfg
    return build_config(
        ExperimentConfig,
        apply_overrides(cfg.model_dump(mode="json"), overrides),
        where=f"sweep {sweep.name}, report.overrides",
    )


def _adherence_on(sweep: Sweep, cfg: ExperimentConfig) -> bool:
    mode = sweep.config.report.adherence
    return mode == "on" or (mode == "auto" and cfg.data.dataset == "synthderm")


def evaluate_trial(
    sweep: Sweep, row: TrialRow, tracker: Any, directory: Path, *, address: str | None = None
) -> dict[str, float]:
    """The figures of one finished trial: the evaluate job on its model version, and its swap-grid adherence."""
    from vgmedgen.platform.evaluation.driver import evaluate_experiment

    cfg = _report_experiment(sweep, row)
    version, _ = finished_trial(cfg, row.name)
    if tracker is not None and row.mlflow_run_id:
        # The evaluate job logs into the run that trained the version it finds by this tag.
        tracker.client.set_tag(row.mlflow_run_id, "model_version", version.name)
    cfg = build_config(
        ExperimentConfig,
        apply_overrides(cfg.model_dump(mode="json"), [f"evaluate.model={json.dumps(str(version))}"]),
        where=f"sweep {sweep.name}",
    )
    print(f"[sweep] evaluating trial {row.short} ({group_name(row.values)}) ...", flush=True)
    figures = dict(evaluate_experiment(cfg, address=address).metrics)
    if _adherence_on(sweep, cfg):
        figures.update(_adherence(cfg, version, directory / "evaluation" / row.short, tracker, row))
    return figures


def _adherence(
    cfg: ExperimentConfig, version: Path, out_dir: Path, tracker: Any, row: TrialRow
) -> dict[str, float]:
    import torch

    from vgmedgen.model.configbase import ConfigError
    from vgmedgen.model.vgmedgen import VGMedGen
    from vgmedgen.platform.evaluation.adherence import load_calibration, measure_adherence, train_ruler
    from vgmedgen.platform.tuning.config import measure_problem

    problem = measure_problem(cfg, report_adherence=True)
    if problem is not None:
        raise ConfigError(problem)
    adh = cfg.adherence
    ruler = train_ruler(cfg.records_dir, cfg.evaluation_storage, cfg.data.resolution, adh.ruler)
    colours = load_calibration(cfg.records_dir, adh)
    with torch.no_grad():
        result = measure_adherence(VGMedGen.from_pretrained(version), adh, colours, ruler, out_dir=out_dir)
    figures = result.headline_metrics()
    if tracker is not None and row.mlflow_run_id:
        tracker.sink(row.mlflow_run_id)([(0, figures)])
        tracker.log_artifacts(row.mlflow_run_id, out_dir, "adherence")
    return figures


def compare_trials(
    sweep: Sweep,
    rows: Sequence[TrialRow],
    tracker: Any,
    parent_run_id: str | None,
    directory: Path,
    save: Callable[[], None],
    *,
    address: str | None = None,
) -> list[Path]:
    """Evaluate every trial that trained to the end and has no figures yet (``save`` after each, so a report
    cut short continues), then write and log the comparison. Returns the files written."""
    settings = json.dumps(sweep.config.report.model_dump(mode="json", exclude={"evaluate"}), sort_keys=True)
    done = [r for r in rows if r.state == "DONE"]
    for row in done:
        if row.evaluated_with != settings:  # not evaluated yet, or with other report settings
            row.evaluation = evaluate_trial(sweep, row, tracker, directory, address=address)
            row.evaluated_with = settings
            save()
    evaluated = [r for r in done if r.evaluation]
    if not evaluated:
        return []
    keys = set().union(*(r.evaluation for r in evaluated))
    cols = columns(sweep.base.data.dataset, keys)
    variant = sweep.config.space.get(VARIANT)
    groups = summarise(evaluated, order=[str(v) for v in variant.ends()] if variant else ())
    paths = write_comparison(groups, cols, directory)
    print(f"[sweep] comparison of {len(groups)} groups over {len(evaluated)} trials: {paths[1]}", flush=True)
    print(paths[1].read_text(), flush=True)
    paths += write_controllability(groups, directory)
    if tracker is not None and parent_run_id is not None:
        for path in paths:
            tracker.log_artifact(parent_run_id, path, "comparison")
    return paths
