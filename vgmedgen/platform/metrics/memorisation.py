"""Memorisation: how many generated images sit closer to a training image than real test images do.

docs/method.md, section Evaluation: the share of generated images whose nearest training image (in domain
features) is nearer than the 5th percentile of the real-test-to-train nearest-neighbour distances.
A model that copies its training set scores near 1; a model that generalises like fresh real data
scores near the percentile itself (about 0.05), since 5% of real test images pass the same bar.

Distance: Euclidean in the domain network's pooled features by default (the space the domain
FD/KD are measured in); ``metric="cosine"`` uses 1 - cosine similarity instead, which ignores the
feature norm. Distances are computed in float64, centred on the training mean, in chunks of
queries x reference rows, so an exact copy of a training image has distance ~0 (float32
``|a|^2 + |b|^2 - 2ab`` would leave ~1e-3 noise) and memory stays bounded (``chunk_size^2`` doubles)
however large the sets.

Shape legend: Q query rows, R reference (training) rows, D feature width.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from vgmedgen.platform.metrics.stats import MetricsError

__all__ = [
    "MemorisationResult",
    "count_memorised",
    "memorisation_share",
    "memorisation_threshold",
    "nearest_distances",
]

Metric = Literal["euclidean", "cosine"]


def _as_float64(features: Any, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(
        np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features)
    )
    tensor = tensor.to(torch.float64)
    if tensor.ndim != 2 or tensor.shape[0] == 0:
        raise MetricsError(
            f"{what} must be a non-empty (N, D) feature array, got shape {tuple(tensor.shape)}"
        )
    if not torch.isfinite(tensor).all():
        raise MetricsError(f"{what} contain NaN or infinity")
    return tensor


def nearest_distances(
    queries: Any, reference: Any, *, metric: Metric = "euclidean", chunk_size: int = 2048
) -> np.ndarray:
    """Distance (Q,) from each query row to its nearest reference row, computed in bounded chunks.

    Args:
        queries: (Q, D) features.
        reference: (R, D) features (e.g. the training set).
        metric: ``euclidean`` or ``cosine`` (1 - cosine similarity).
        chunk_size: rows per chunk on both sides.
    """
    if metric not in ("euclidean", "cosine"):
        raise MetricsError(f"memorisation metric must be 'euclidean' or 'cosine', got {metric!r}")
    if int(chunk_size) < 1:
        raise MetricsError(f"chunk_size must be >= 1, got {chunk_size}")
    q = _as_float64(queries, "query features")
    r = _as_float64(reference, "reference features")
    if q.shape[1] != r.shape[1]:
        raise MetricsError(f"query and reference features differ in width: {q.shape[1]} vs {r.shape[1]}")
    if metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
    else:
        # Euclidean distances ignore a common shift; centring on the reference mean keeps the norms in
        # the expansion below small, so a large feature offset cannot swamp the distances in rounding.
        shift = r.mean(dim=0, keepdim=True)  # (1, D)
        q, r = q - shift, r - shift
    out = torch.full((q.shape[0],), float("inf"), dtype=torch.float64)
    q_sq = (q * q).sum(dim=1)  # (Q,)
    r_sq = (r * r).sum(dim=1)  # (R,)
    for qs in range(0, q.shape[0], chunk_size):
        q_chunk = q[qs : qs + chunk_size]  # (q, D)
        best = out[qs : qs + chunk_size]
        for rs in range(0, r.shape[0], chunk_size):
            r_chunk = r[rs : rs + chunk_size]  # (r, D)
            # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b, in float64 (exact copies give ~1e-15, clamped at 0).
            d2 = (
                q_sq[qs : qs + chunk_size, None]
                + r_sq[None, rs : rs + chunk_size]
                - 2.0 * (q_chunk @ r_chunk.T)
            )
            best = torch.minimum(best, d2.min(dim=1).values)
        out[qs : qs + chunk_size] = best
    out = out.clamp_min(0.0)
    if metric == "euclidean":
        return out.sqrt().numpy()
    return (out / 2.0).numpy()  # unit vectors: |a - b|^2 = 2 (1 - cos)


def memorisation_threshold(
    test_features: Any,
    train_features: Any,
    *,
    percentile: float = 5.0,
    metric: Metric = "euclidean",
    chunk_size: int = 2048,
) -> tuple[float, np.ndarray]:
    """The bar: the ``percentile``-th percentile of real-test-to-train nearest distances.

    Returns:
        (threshold, the test rows' nearest distances (N_test,)).
    """
    if not 0.0 < percentile < 100.0:
        raise MetricsError(f"percentile must be in (0, 100), got {percentile}")
    test_nn = nearest_distances(test_features, train_features, metric=metric, chunk_size=chunk_size)
    threshold = float(np.percentile(test_nn, percentile))
    if threshold <= 0.0:
        warnings.warn(
            f"the {percentile:g}th percentile of test-to-train distances is 0: some test images duplicate "
            "training images (split leakage?), so no generated image can count as memorised",
            UserWarning,
            stacklevel=2,
        )
    return threshold, test_nn


def count_memorised(
    generated_features: Any,
    train_features: Any,
    threshold: float,
    *,
    metric: Metric = "euclidean",
    chunk_size: int = 2048,
) -> tuple[int, np.ndarray]:
    """How many generated rows are strictly nearer than ``threshold`` to a training row (per shard; sums merge).

    Returns:
        (count, the generated rows' nearest distances (N_gen,)).
    """
    gen_nn = nearest_distances(generated_features, train_features, metric=metric, chunk_size=chunk_size)
    return int(np.sum(gen_nn < threshold)), gen_nn


@dataclass(frozen=True)
class MemorisationResult:
    """Share of generated images nearer to a training image than the real-test bar."""

    share: float  # flagged / generated
    flagged: int
    generated: int
    threshold: float
    percentile: float
    metric: str
    test_share: float  # share of real test images under the same bar (~ percentile / 100 by construction)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def memorisation_share(
    generated_features: Any,
    train_features: Any,
    test_features: Any,
    *,
    percentile: float = 5.0,
    metric: Metric = "euclidean",
    chunk_size: int = 2048,
) -> tuple[MemorisationResult, np.ndarray, np.ndarray]:
    """Memorisation share of a generated set against the training split, with the real-test bar.

    Returns:
        (result, generated nearest distances (N_gen,), test nearest distances (N_test,)) - the
        distances feed the report's histogram.
    """
    threshold, test_nn = memorisation_threshold(
        test_features, train_features, percentile=percentile, metric=metric, chunk_size=chunk_size
    )
    flagged, gen_nn = count_memorised(
        generated_features, train_features, threshold, metric=metric, chunk_size=chunk_size
    )
    result = MemorisationResult(
        share=flagged / len(gen_nn),
        flagged=flagged,
        generated=len(gen_nn),
        threshold=threshold,
        percentile=float(percentile),
        metric=metric,
        test_share=float(np.mean(test_nn < threshold)),
    )
    return result, gen_nn, test_nn
