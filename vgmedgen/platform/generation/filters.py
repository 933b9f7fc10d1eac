"""Quality filters of the generation job: confidence, memorisation guard and property bands.

A rejected row is never dropped: it keeps ``accepted=False`` and a ``reason`` naming every failed
check, joined by ``"; "``, e.g.
``"confidence 0.31 < 0.50 for 'nevus'; lesion_area 0.62 above the 0.99 quantile 0.41 of 'nevus'"``.

The bands are the configured quantiles of the real train rows of the row's class (rows without a
class: of all train rows), for the scalar properties lesion area and centroid (cx, cy) and, per
channel, the mean lesion and skin colour. Pure numpy; no file access.

Shape legend: N rows of a batch, R real train rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vgmedgen.platform.generation.config import FilterConfig

__all__ = [
    "ALL_ROWS",
    "PROPERTIES",
    "PropertyBands",
    "apply_filters",
    "filter_summary",
    "reason_kind",
]

# Scorer columns the bands apply to; colour columns are (3,) lists checked per channel.
PROPERTIES: tuple[str, ...] = ("lesion_area", "lesion_cx", "lesion_cy", "lesion_rgb", "skin_rgb")
ALL_ROWS = "__all__"  # the band key of rows without a class (all train rows)
_CHANNELS = ("R", "G", "B")


def _values(column: Sequence[Any]) -> list[np.ndarray | None]:
    """A property column as per-row float64 arrays ((1,) scalars, (3,) colours), None where null."""
    out: list[np.ndarray | None] = []
    for v in column:
        if v is None or (np.isscalar(v) and not np.isfinite(float(v))):
            out.append(None)
        else:
            out.append(np.atleast_1d(np.asarray(v, dtype=np.float64)))
    return out


@dataclass
class PropertyBands:
    """Per class and property: the real train values (R, C), from which quantile bands are read."""

    values: dict[str, dict[str, np.ndarray]]  # class (or ALL_ROWS) -> property -> (R, C) float64

    @classmethod
    def from_rows(
        cls, labels: Sequence[str | None], properties: Mapping[str, Sequence[Any]]
    ) -> PropertyBands:
        """Collect the real train rows' measured properties by class (and all rows under :data:`ALL_ROWS`).

        Args:
            labels: (R,) class of each real train row (None for unlabelled datasets).
            properties: property name -> (R,) values (floats, (3,) colours, or None where unmeasured).
        """
        missing = [p for p in PROPERTIES if p not in properties]
        if missing:
            raise ValueError(f"property bands need the train rows' {missing}; got only {sorted(properties)}")
        groups: dict[str, list[int]] = {ALL_ROWS: list(range(len(labels)))}
        for i, lab in enumerate(labels):
            if lab is not None:
                groups.setdefault(str(lab), []).append(i)
        values: dict[str, dict[str, np.ndarray]] = {}
        for key, idx in groups.items():
            values[key] = {}
            for prop in PROPERTIES:
                column = _values([properties[prop][i] for i in idx])
                present = [v for v in column if v is not None]
                width = 3 if prop.endswith("_rgb") else 1
                values[key][prop] = np.asarray(present, dtype=np.float64).reshape(-1, width)
        return cls(values)

    def band(
        self, label: str | None, prop: str, quantiles: tuple[float, float]
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """(low (C,), high (C,), what) for a row of ``label``: that class's rows, else all rows."""
        key = ALL_ROWS if label is None or str(label) not in self.values else str(label)
        real = self.values[key][prop]
        what = "all train rows" if key == ALL_ROWS else repr(key)
        if real.shape[0] == 0:
            return np.full(real.shape[1], -np.inf), np.full(real.shape[1], np.inf), what
        low, high = np.quantile(real, quantiles, axis=0)  # (2, C)
        return low, high, what

    def to_dict(self) -> dict[str, np.ndarray]:
        return {f"{key}/{prop}": arr for key, props in self.values.items() for prop, arr in props.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PropertyBands:
        values: dict[str, dict[str, np.ndarray]] = {}
        for name, arr in data.items():
            key, prop = str(name).rsplit("/", 1)
            values.setdefault(key, {})[prop] = np.asarray(arr, dtype=np.float64)
        if ALL_ROWS not in values:
            raise ValueError(f"property bands lack the '{ALL_ROWS}' group; rebuild the scorer assets")
        return cls(values)


def _fmt(v: float) -> str:
    return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.3g}"


def apply_filters(
    columns: Mapping[str, Sequence[Any]],
    filters: FilterConfig,
    *,
    memorisation_threshold: float | None = None,
    bands: PropertyBands | None = None,
) -> tuple[np.ndarray, list[str | None]]:
    """Judge each row: (accepted (N,) bool, reason per row (None when accepted)).

    Args:
        columns: the scored batch: ``label``, ``confidence``, ``nn_distance`` and the :data:`PROPERTIES`.
        filters: the configured filters; each is off when None.
        memorisation_threshold: the ``filters.memorisation_percentile``-th percentile of real
            test-to-train nearest distances (needed when the guard is on).
        bands: real train property values (needed when ``filters.property_quantiles`` is set).

    Raises:
        ValueError: a configured filter lacks its reference (threshold or bands).
    """
    if filters.memorisation_percentile is not None and memorisation_threshold is None:
        raise ValueError("filters.memorisation_percentile is set but no memorisation threshold was given")
    if filters.property_quantiles is not None and bands is None:
        raise ValueError("filters.property_quantiles is set but no property bands were given")
    labels = list(columns["label"])
    n = len(labels)
    reasons: list[list[str]] = [[] for _ in range(n)]
    if filters.min_confidence is not None:
        for i, conf in enumerate(columns["confidence"]):
            # Null confidence: single-class dataset or unlabelled row, where the filter does not apply.
            if conf is not None and np.isfinite(conf) and conf < filters.min_confidence:
                reasons[i].append(f"confidence {conf:.2f} < {filters.min_confidence:.2f} for {labels[i]!r}")
    if filters.memorisation_percentile is not None:
        assert memorisation_threshold is not None  # checked above
        for i, dist in enumerate(columns["nn_distance"]):
            if dist < memorisation_threshold:
                reasons[i].append(
                    f"memorisation: nn_distance {_fmt(dist)} < {_fmt(memorisation_threshold)}, the "
                    f"{filters.memorisation_percentile:g}th percentile of real test-to-train distances"
                )
    if filters.property_quantiles is not None:
        assert bands is not None  # checked above
        q_lo, q_hi = filters.property_quantiles
        for prop in PROPERTIES:
            for i, value in enumerate(_values(columns[prop])):
                if value is None:
                    continue  # empty mask: no lesion colour/centre; the area band judges the row
                low, high, what = bands.band(labels[i], prop, (q_lo, q_hi))
                for c in range(value.shape[0]):
                    name = f"{prop}[{_CHANNELS[c]}]" if value.shape[0] == 3 else prop
                    if value[c] < low[c]:
                        reasons[i].append(
                            f"{name} {_fmt(value[c])} below the {q_lo:g} quantile {_fmt(low[c])} of {what}"
                        )
                    elif value[c] > high[c]:
                        reasons[i].append(
                            f"{name} {_fmt(value[c])} above the {q_hi:g} quantile {_fmt(high[c])} of {what}"
                        )
    accepted = np.array([not r for r in reasons], dtype=bool)
    return accepted, [("; ".join(r) if r else None) for r in reasons]


def reason_kind(reason: str) -> str:
    """The filter a single reason comes from: ``confidence``, ``memorisation`` or a property name."""
    head = reason.split(" ", 1)[0].rstrip(":")
    return head.split("[", 1)[0]


def filter_summary(table: Any) -> dict[str, Any]:
    """Accepted and rejected counts overall, per class and per reason kind.

    Args:
        table: a pyarrow Table, a pandas DataFrame or a mapping of columns with ``label``, ``accepted``
            and ``reason``.

    Returns:
        ``{"total", "accepted", "rejected", "per_class": {label: {"accepted", "rejected"}},
        "per_reason": {kind: rows rejected for it}}``; unlabelled rows count under ``None``.
    """
    if hasattr(table, "column_names"):  # pyarrow
        cols = {k: table.column(k).to_pylist() for k in ("label", "accepted", "reason")}
    elif hasattr(table, "to_dict") and hasattr(table, "columns"):  # pandas
        cols = {k: list(table[k]) for k in ("label", "accepted", "reason")}
    else:
        cols = {k: list(table[k]) for k in ("label", "accepted", "reason")}
    per_class: dict[Any, dict[str, int]] = {}
    per_reason: Counter[str] = Counter()
    for label, ok, reason in zip(cols["label"], cols["accepted"], cols["reason"]):
        entry = per_class.setdefault(label, {"accepted": 0, "rejected": 0})
        entry["accepted" if ok else "rejected"] += 1
        if not ok and reason:
            # A row rejected for two channels of one colour counts once for that property.
            per_reason.update({reason_kind(r) for r in str(reason).split("; ")})
    accepted = sum(e["accepted"] for e in per_class.values())
    total = len(cols["label"])
    return {
        "total": total,
        "accepted": accepted,
        "rejected": total - accepted,
        "per_class": per_class,
        "per_reason": dict(sorted(per_reason.items())),
    }
