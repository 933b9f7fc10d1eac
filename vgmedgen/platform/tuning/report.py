"""What a sweep shows: the live table of trials in the terminal, the final table (CSV and Markdown) and the
plots (the objective against the dit step per trial; each swept parameter against the objective)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrialRow", "live_table", "write_plots", "write_tables"]

STATES = ("PENDING", "RUNNING", "DONE", "STOPPED", "ERROR")


@dataclass
class TrialRow:
    """One trial: its run key, sampled values, state, reported history and final scores.

    ``state``: PENDING, RUNNING, DONE (trained every dit step), STOPPED (by ASHA) or ERROR.
    """

    name: str
    values: dict[str, Any]
    state: str = "PENDING"
    trial_id: str | None = None
    history: list[tuple[int, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    stage_runs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    evaluation: dict[str, float] = field(default_factory=dict)  # the comparison report's figures
    evaluated_with: str | None = None  # the report settings (JSON) those figures were measured with

    @property
    def short(self) -> str:
        """The trial's hash: its name without the sweep key."""
        return self.name.rsplit("-", 1)[-1]

    @property
    def step(self) -> int | None:
        return self.history[-1][0] if self.history else None

    @property
    def objective(self) -> float | None:
        return self.history[-1][1] if self.history else None

    def record(self, step: int, value: float) -> None:
        """Add a report (a step seen before is replaced: a resumed trial reports it again)."""
        self.history = sorted({**dict(self.history), step: value}.items())

    def to_json(self) -> dict[str, Any]:
        return {
            "trial": self.name,
            "values": self.values,
            "state": self.state,
            "trial_id": self.trial_id,
            "history": [list(h) for h in self.history],
            "final": self.final,
            "mlflow_run_id": self.mlflow_run_id,
            "stage_runs": sorted(self.stage_runs.values()),
            "stages": self.stage_runs,
            "error": self.error,
            "evaluation": self.evaluation,
            "evaluated_with": self.evaluated_with,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialRow:
        return cls(
            name=data["trial"],
            values=data["values"],
            state=data.get("state", "PENDING"),
            trial_id=data.get("trial_id"),
            history=[(int(s), float(v)) for s, v in data.get("history", [])],
            final=data.get("final", {}),
            mlflow_run_id=data.get("mlflow_run_id"),
            stage_runs=dict(data.get("stages", {})),
            error=data.get("error"),
            evaluation=data.get("evaluation", {}),
            evaluated_with=data.get("evaluated_with"),
        )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def live_table(rows: list[TrialRow], metric: str, trials: int, max_t: int) -> str:
    """The terminal's table: one line per trial (state, dit step of max, the last objective), best first."""
    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    head = f"[sweep] {len(rows)}/{trials} trials: " + ", ".join(
        f"{n} {s.lower()}" for s, n in counts.items() if n
    )
    params = sorted({k for r in rows for k in r.values})
    body = [
        [
            r.short,
            r.state,
            f"{r.step or 0}/{max_t}",
            "-" if r.objective is None else _fmt(r.objective),
            *(_fmt(r.values.get(p, "")) for p in params),
        ]
        for r in rows
    ]
    return "\n".join([head, *_grid(["trial", "state", "dit step", metric, *params], body)])


def _ranked(rows: list[TrialRow], best: TrialRow | None) -> list[TrialRow]:
    return sorted(rows, key=lambda r: (r is not best, r.objective is None, r.objective or 0.0))


def write_tables(rows: list[TrialRow], directory: Path, metric: str, best: TrialRow | None) -> list[Path]:
    """``trials.csv`` and ``trials.md``: per trial its values, state, last step, last objective and final
    scores; the best trial first, marked."""
    params = sorted({k for r in rows for k in r.values})
    finals = sorted({k for r in rows for k in r.final})
    header = ["trial", "best", "state", "dit_step", metric, *(f"final_{k}" for k in finals), *params]
    table = [
        [
            r.short,
            "*" if r is best else "",
            r.state,
            "" if r.step is None else str(r.step),
            "" if r.objective is None else _fmt(r.objective),
            *(_fmt(r.final[k]) if k in r.final else "" for k in finals),
            *(_fmt(r.values.get(p, "")) for p in params),
        ]
        for r in _ranked(rows, best)
    ]
    csv_path, md_path = directory / "trials.csv", directory / "trials.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(table)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table]
    md_path.write_text("\n".join(md) + "\n")
    return [csv_path, md_path]


def write_plots(rows: list[TrialRow], directory: Path, metric: str, params: list[str]) -> list[Path]:
    """``objective_by_step.png`` (one line per trial; a stopped trial's line ends where ASHA stopped it) and
    ``parameters.png`` (each swept parameter against the last objective, one panel per parameter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r.history:
            steps, values = zip(*r.history)
            ax.plot(steps, values, marker="o", label=f"{r.short} ({r.state.lower()})")
    ax.set_xlabel("dit step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    if any(r.history for r in rows):
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(directory / "objective_by_step.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)

    scored = [r for r in rows if r.objective is not None]
    fig, axes = plt.subplots(1, max(len(params), 1), figsize=(3.6 * max(len(params), 1), 3.4), squeeze=False)
    for ax, p in zip(axes[0], params):
        xs = [r.values.get(p) for r in scored]
        labels = None
        if any(isinstance(x, str) or isinstance(x, bool) for x in xs):
            labels = sorted({str(x) for x in xs})
            xs = [labels.index(str(x)) for x in xs]
        ax.scatter(
            xs,
            [r.objective for r in scored],
            c=["tab:blue" if r.state == "DONE" else "tab:grey" for r in scored],
        )
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        elif p.endswith(".lr") or p.endswith("_lr"):
            ax.set_xscale("log")
        ax.set_xlabel(p, fontsize=8)
        ax.set_ylabel(metric)
    fig.suptitle("each parameter against the last objective (grey: stopped early)", fontsize=9)
    fig.tight_layout()
    out.append(directory / "parameters.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    return out
