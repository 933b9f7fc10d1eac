"""Exact, mergeable feature statistics and the distances computed from them (FD, KD).

The evaluation of a generated set runs in shards (Ray tasks, one per block of images); each shard
returns small sufficient statistics that merge exactly, so the sharded Frechet distance equals the
single-pass one to rounding. Kernel distances need samples, not moments: a :class:`FeatureReservoir`
keeps a seeded, order-independent sample of rows across shards.

Both distances follow torch-fidelity 0.4.0 (``torch_fidelity/metric_fid.py``, ``metric_kid.py``)
formula for formula; the tests prove parity with its own ``calculate_metrics``.

Shape legend: N rows (images), D feature width, M subset size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vgmedgen.platform.storage import row_key

__all__ = [
    "FeatureReservoir",
    "FeatureStats",
    "FeatureSummary",
    "KernelDistance",
    "MetricsError",
    "SmallSampleWarning",
    "frechet_distance",
    "kernel_distance",
    "relative_difference",
    "row_keys",
]


class MetricsError(ValueError):
    """An evaluation input or setting is wrong; the message says which and how to fix it."""


class SmallSampleWarning(UserWarning):
    """A set is too small for a stable estimate; the number is still computed and returned."""


def _as_float64_2d(features: Any, what: str = "features") -> np.ndarray:
    """Features as a C-contiguous float64 (N, D) array; torch tensors are detached and moved to CPU."""
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise MetricsError(
            f"{what} must be a 2-D (N, D) array of feature rows, got shape {tuple(array.shape)}"
        )
    if not np.all(np.isfinite(array)):
        raise MetricsError(
            f"{what} contain NaN or infinity: the feature extractor produced non-finite values "
            "(check the network weights and that images are uint8 in 0..255)"
        )
    return np.ascontiguousarray(array)


def _width(features: Any) -> int:
    shape = tuple(features.shape) if hasattr(features, "shape") else np.asarray(features).shape
    if len(shape) != 2:
        raise MetricsError(f"features must be a 2-D (N, D) array of feature rows, got shape {shape}")
    return int(shape[1])


# --------------------------------------------------------------------------------------------------
# Moments: count, shifted sums, centred sum of outer products
# --------------------------------------------------------------------------------------------------


class FeatureStats:
    """Mergeable sufficient statistics of feature rows for the Frechet distance.

    Within one set or shard, batches accumulate in float64 the count ``n`` and the sums
    ``s1 = sum_i (x_i - c)`` (D,) and ``s2 = sum_i (x_i - c)(x_i - c)^T`` (D, D), shifted by
    ``c`` = the first batch's mean. The shift keeps the sums small, so the covariance
    ``(s2 - n d d^T) / (n - 1)`` with ``d = s1 / n`` loses no digits to cancellation even for
    features far from zero (raw sums of x x^T would lose ~8 digits at an offset of 1e4), and each
    batch costs one in-place (D, N) x (N, D) product: the same work as ``numpy.cov`` on all rows.

    Across shards, statistics travel as (count, mean, centred m2) (:meth:`to_dict`) and merge with
    the pairwise update of Chan, Golub and LeVeque (1979):
    ``mean = mean_a + delta n_b / n``, ``m2 = m2_a + m2_b + delta delta^T n_a n_b / n`` with
    ``delta = mean_b - mean_a``. Merged mean and covariance equal single-pass ones (``numpy.cov``)
    to about 1e-13 relative, in any shard order. ``cov`` is unbiased (divides by n - 1), as
    ``numpy.cov`` and torch-fidelity.
    """

    def __init__(self, dim: int) -> None:
        if int(dim) < 1:
            raise MetricsError(f"FeatureStats needs a positive feature width, got dim={dim}")
        self.dim = int(dim)
        self.count = 0
        # Allocated by the first batch: an empty shard costs nothing (the (D, D) sum is 32 MB at D=2048).
        # numpy owns the arrays (torch's allocator is several times slower for 32 MB blocks here);
        # torch only runs the in-place product on a view of the same memory.
        self._shift: np.ndarray | None = None  # (D,) c
        self._s1: np.ndarray | None = None  # (D,)
        self._s2: np.ndarray | None = None  # (D, D)

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_features(cls, features: Any) -> FeatureStats:
        """Statistics of one (N, D) block of features in a single pass."""
        stats = cls(_width(features))
        stats.update(features)
        return stats

    @classmethod
    def _from_moments(cls, count: int, mean: np.ndarray, m2: np.ndarray) -> FeatureStats:
        """Take ownership of (mean, m2) arrays (no copy): shift = mean, so s1 = 0."""
        out = cls(mean.shape[0])
        if count:
            out.count, out._shift, out._s2 = int(count), mean, m2
            out._s1 = np.zeros_like(mean)
        return out

    def update(self, features: Any) -> FeatureStats:
        """Add a batch of feature rows (N, D) (numpy or torch, any float dtype); returns self."""
        x = _as_float64_2d(features)  # (N, D)
        if x.shape[1] != self.dim:
            raise MetricsError(
                f"feature width {x.shape[1]} does not match these statistics' width {self.dim}"
            )
        if x.shape[0] == 0:
            return self
        if self._shift is None or self._s1 is None or self._s2 is None:
            self._shift = x.mean(axis=0)
            self._s1 = np.zeros(self.dim)
            self._s2 = np.zeros((self.dim, self.dim))
        centred = torch.from_numpy(x - self._shift)  # (N, D)
        self._s1 += centred.sum(dim=0).numpy()
        torch.from_numpy(self._s2).addmm_(centred.T, centred)  # in place: no (D, D) temporary per batch
        self.count += x.shape[0]
        return self

    def _moments(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(count, mean (D,), centred m2 (D, D)) in float64; m2 may alias the internal sum: do not modify it."""
        if self.count == 0 or self._shift is None or self._s1 is None or self._s2 is None:
            return 0, np.zeros(self.dim), np.zeros((self.dim, self.dim))
        d = self._s1 / self.count  # (D,) mean minus shift: small
        mean = self._shift + d
        if not np.any(d):  # merged or rebuilt statistics: the shift is the mean already
            return self.count, mean, self._s2
        m2 = np.outer(d, d)  # the one (D, D) allocation
        m2 *= -self.count
        m2 += self._s2
        return self.count, mean, m2

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new FeatureStats holding the rows of both (neither input is changed)."""
        if not isinstance(other, FeatureStats):
            raise MetricsError(f"can only merge FeatureStats with FeatureStats, got {type(other).__name__}")
        if other.dim != self.dim:
            raise MetricsError(
                f"cannot merge statistics of width {self.dim} and {other.dim}: different extractors?"
            )
        if self.count == 0 or other.count == 0:
            return (other if self.count == 0 else self).copy()
        n_a, mean_a, m2_a = self._moments()
        n_b, mean_b, m2_b = other._moments()
        n = n_a + n_b
        delta = mean_b - mean_a  # (D,)
        mean = mean_a + delta * (n_b / n)
        m2 = np.outer(delta, delta)  # the one (D, D) allocation; the rest in place
        m2 *= n_a * n_b / n
        m2 += m2_a
        m2 += m2_b
        return FeatureStats._from_moments(n, mean, m2)

    __add__ = merge

    @classmethod
    def merge_all(cls, parts: Iterable[FeatureStats]) -> FeatureStats:
        """Merge any number of shards' statistics (at least one)."""
        parts = list(parts)
        if not parts:
            raise MetricsError("merge_all needs at least one FeatureStats")
        out = parts[0].copy()
        for part in parts[1:]:
            out = out.merge(part)
        return out

    def copy(self) -> FeatureStats:
        if self.count == 0:
            return FeatureStats(self.dim)
        count, mean, m2 = self._moments()
        return FeatureStats._from_moments(count, mean.copy(), m2.copy())

    # -- reading ------------------------------------------------------------------------------
    @property
    def mean(self) -> np.ndarray:
        """The mean feature (D,), float64."""
        if self.count == 0:
            raise MetricsError("the mean of an empty feature set is undefined: no rows were added")
        return self._moments()[1].copy()

    @property
    def cov(self) -> np.ndarray:
        """The unbiased covariance (D, D), float64, equal to ``numpy.cov(features, rowvar=False)``."""
        if self.count < 2:
            raise MetricsError(f"the covariance needs at least 2 feature rows, got {self.count}")
        return self._moments()[2] / (self.count - 1)

    # -- transport ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays (count, mean, centred m2) for transport across Ray tasks or ``np.savez``."""
        count, mean, m2 = self._moments()
        return {
            "count": np.asarray(count, dtype=np.int64),
            "mean": mean.copy(),
            "m2": m2.copy(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureStats:
        """Rebuild from :meth:`to_dict` output."""
        try:
            mean = np.asarray(data["mean"], dtype=np.float64)
            m2 = np.asarray(data["m2"], dtype=np.float64)
            count = int(np.asarray(data["count"]))
        except KeyError as err:
            raise MetricsError(f"FeatureStats dict lacks key {err}; expected keys count, mean, m2") from None
        if mean.ndim != 1 or m2.shape != (mean.shape[0], mean.shape[0]) or count < 0:
            raise MetricsError(
                f"inconsistent FeatureStats dict: mean {mean.shape}, m2 {m2.shape}, count {count}"
            )
        return cls._from_moments(count, mean.copy(), m2.copy())

    def __repr__(self) -> str:
        return f"FeatureStats(dim={self.dim}, count={self.count})"


def frechet_distance(stats_a: FeatureStats, stats_b: FeatureStats) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID when features are Inception's).

    ``FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``, with the trace of the matrix
    square root computed exactly as torch-fidelity 0.4.0 does: the sum of the real parts of the
    complex square roots of the eigenvalues of ``S_a S_b`` (``metric_fid.fid_statistics_to_metric``).
    That avoids ``scipy.linalg.sqrtm``'s iterations and its complex residue on singular covariances.

    Args:
        stats_a: statistics of the first set.
        stats_b: statistics of the second set (same width).

    Returns:
        The distance (float; may be a tiny negative number for identical sets due to rounding).

    Warns:
        SmallSampleWarning: when a set has no more rows than the feature width: the covariance is
            then singular and FD is strongly biased upwards (compare only at equal N).
    """
    if stats_a.dim != stats_b.dim:
        raise MetricsError(f"cannot compare features of width {stats_a.dim} and {stats_b.dim}")
    for name, stats in (("first", stats_a), ("second", stats_b)):
        if stats.count < 2:
            raise MetricsError(
                f"the {name} set has {stats.count} feature rows; the Frechet distance needs >= 2"
            )
        if stats.count <= stats.dim:
            warnings.warn(
                f"the {name} set has {stats.count} rows for {stats.dim}-D features: its covariance is singular "
                "and the Frechet distance is biased upwards; compare distances only at the same N",
                SmallSampleWarning,
                stacklevel=2,
            )
    mu_a, mu_b = stats_a.mean, stats_b.mean
    sigma_a, sigma_b = stats_a.cov, stats_b.cov
    diff = mu_a - mu_b  # (D,)
    eigenvalues = np.linalg.eigvals(sigma_a.dot(sigma_b)).astype(np.complex128)
    tr_covmean = float(np.sum(np.sqrt(eigenvalues).real))
    return float(diff.dot(diff) + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_covmean)


# --------------------------------------------------------------------------------------------------
# Kernel distance (KID) on samples
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelDistance:
    """The kernel distance over random subsets: mean and std of the unbiased MMD^2 estimates."""

    mean: float
    std: float
    subsets: int
    subset_size: int
    n_a: int
    n_b: int


def _polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    """``k(x, y) = (gamma <x, y> + coef0) ** degree`` (torch-fidelity ``kernel_poly``)."""
    return (np.matmul(x, y.T) * gamma + coef0) ** degree  # (M, M)


def _mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 estimate (torch-fidelity ``mmd2`` with ``mmd_est="unbiased"``).

    ``MMD^2 = (sum_{i!=j} k(x_i,x_j) + sum_{i!=j} k(y_i,y_j)) / (m (m-1)) - 2 sum_{i,j} k(x_i,y_j) / m^2``.
    """
    m = k_xx.shape[0]
    # Summed in torch-fidelity's order (row sums minus the diagonal, then the total), so that in
    # float32 the result is the same number, not just the same value to rounding.
    kt_xx_sum = (k_xx.sum(axis=1) - np.diagonal(k_xx)).sum()
    kt_yy_sum = (k_yy.sum(axis=1) - np.diagonal(k_yy)).sum()
    k_xy_sum = k_xy.sum(axis=0).sum()
    mmd2 = (kt_xx_sum + kt_yy_sum) / (m * (m - 1))
    mmd2 -= 2 * k_xy_sum / (m * m)
    return float(mmd2)


def kernel_distance(
    features_a: Any,
    features_b: Any,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 2020,
    dtype: Any = np.float64,
) -> KernelDistance:
    """Kernel distance (KID when features are Inception's): polynomial-kernel MMD^2 over random subsets.

    Matches torch-fidelity 0.4.0 ``kid_features_to_metric``: for each of ``subsets`` rounds, draw
    ``subset_size`` rows of each set without replacement from one ``numpy.random.RandomState(seed)``
    (first set, then second set), compute the unbiased MMD^2 with
    ``k(x, y) = (gamma <x, y> + coef0) ** degree`` (``gamma`` defaults to 1 / D), and report the mean
    and the (population) std over rounds. torch-fidelity computes the kernels in float32; we compute
    them in ``dtype`` (float64 by default, more accurate; pass ``numpy.float32`` for bit-level parity).

    Where a set has fewer rows than ``subset_size`` the subset size shrinks to the smaller set size
    (torch-fidelity would refuse) and a :class:`SmallSampleWarning` says so: with subsets as large as
    the set, every round sees the same rows, so ``std`` no longer measures the estimate's spread.

    Args:
        features_a: (N_a, D) features of the first set (numpy or torch).
        features_b: (N_b, D) features of the second set.
        subsets: number of random subsets (rounds).
        subset_size: rows per subset, adapted down to min(N_a, N_b).
        degree: polynomial kernel degree.
        gamma: kernel scale; None means 1 / D.
        coef0: kernel offset.
        seed: RandomState seed of the subset draws (torch-fidelity's ``rng_seed``, default 2020).
        dtype: numpy float dtype of the kernel arithmetic.

    Returns:
        A :class:`KernelDistance`.
    """
    if isinstance(features_a, torch.Tensor):
        features_a = features_a.detach().cpu().numpy()
    if isinstance(features_b, torch.Tensor):
        features_b = features_b.detach().cpu().numpy()
    a = np.asarray(features_a, dtype=dtype)
    b = np.asarray(features_b, dtype=dtype)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise MetricsError(
            f"kernel_distance needs (N, D) features of equal width, got {a.shape} and {b.shape}"
        )
    if int(subsets) < 1:
        raise MetricsError(f"subsets must be >= 1, got {subsets}")
    if int(subset_size) < 2:
        raise MetricsError(
            f"subset_size must be >= 2 (the unbiased MMD divides by m (m - 1)), got {subset_size}"
        )
    n_a, n_b = a.shape[0], b.shape[0]
    if min(n_a, n_b) < 2:
        raise MetricsError(f"the kernel distance needs at least 2 rows per set, got {n_a} and {n_b}")
    m = int(subset_size)
    if min(n_a, n_b) < m:
        m = min(n_a, n_b)
        warnings.warn(
            f"kernel distance: subset_size {subset_size} exceeds the smaller set ({n_a} vs {n_b} rows); using "
            f"subsets of {m}. The estimate is unstable at this size and its std is not a spread across "
            "independent subsets; generate more images for a reliable KID",
            SmallSampleWarning,
            stacklevel=2,
        )
    g = (1.0 / a.shape[1]) if gamma is None else float(gamma)
    rng = np.random.RandomState(seed)
    mmds = np.zeros(int(subsets))
    for i in range(int(subsets)):
        # Same draw order as torch-fidelity: first set, then second set, per round.
        x = a[rng.choice(n_a, m, replace=False)]
        y = b[rng.choice(n_b, m, replace=False)]
        mmds[i] = _mmd2_unbiased(
            _polynomial_kernel(x, x, degree, g, coef0),
            _polynomial_kernel(x, y, degree, g, coef0),
            _polynomial_kernel(y, y, degree, g, coef0),
        )
    return KernelDistance(float(np.mean(mmds)), float(np.std(mmds)), int(subsets), m, n_a, n_b)


# --------------------------------------------------------------------------------------------------
# Seeded, order-independent sample of rows across shards
# --------------------------------------------------------------------------------------------------

_KEY_BYTES = 8


def row_keys(seed: int, row_ids: Sequence[Any]) -> np.ndarray:
    """A uint64 pseudo-random key per row: the first 8 bytes of BLAKE2b(seed, row id).

    Keys depend only on (seed, row id), so the rows with the k smallest keys are a uniform random
    sample of size k that no shard order, shard size or worker count can change. Row ids are compared
    as their ``str``: ``7`` and ``"7"`` are the same row.
    """
    return np.fromiter((row_key(seed, row_id, _KEY_BYTES) for row_id in row_ids), np.uint64, len(row_ids))


def _bottom_k(keys: np.ndarray, ids: list[str], k: int) -> np.ndarray:
    """Indices of the k smallest (key, id) pairs, in that order.

    Ties of 64-bit keys are astronomically rare; the id breaks them so the kept set stays exact.
    """
    if not ids:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.asarray(ids, dtype=np.str_), keys))  # last key is the primary one
    return order[:k]


class FeatureReservoir:
    """A seeded bottom-k sample of feature rows, mergeable across shards (for KD and floors).

    Each row gets a key from (seed, row id) (:func:`row_keys`); the reservoir keeps the ``capacity``
    rows with the smallest (key, id). The kept set is therefore a uniform sample of all rows seen,
    identical for any split into shards and any merge order. Rows are kept sorted by (key, id), so
    even the order of :attr:`features` is deterministic. A row id found twice among the kept rows is
    an error: it means a shard was counted twice, which would also double its weight in
    :class:`FeatureStats` (rows that fall outside the sample cannot be checked).
    """

    def __init__(self, capacity: int, dim: int, seed: int = 0) -> None:
        if int(capacity) < 1:
            raise MetricsError(f"reservoir capacity must be >= 1, got {capacity}")
        if int(dim) < 1:
            raise MetricsError(f"reservoir feature width must be >= 1, got {dim}")
        self.capacity, self.dim, self.seed = int(capacity), int(dim), int(seed)
        self.seen = 0  # rows offered in total, kept or not
        # The compacted sample, sorted by (key, id).
        self._features = np.zeros((0, self.dim), dtype=np.float32)  # (K, D)
        self._keys = np.zeros(0, dtype=np.uint64)  # (K,)
        self._ids: list[str] = []
        # Candidate rows not yet compacted into the sample. Compacting on every batch would copy the
        # whole sample (up to capacity x D floats) per batch; batching it keeps the cost per row O(D).
        self._pending: list[tuple[np.ndarray, np.ndarray, list[str]]] = []
        self._pending_rows = 0

    @property
    def features(self) -> np.ndarray:
        """The kept rows (K, D), K = min(capacity, seen), ordered by key."""
        self._compact()
        return self._features.copy()

    @property
    def row_ids(self) -> list[str]:
        self._compact()
        return list(self._ids)

    def __len__(self) -> int:
        self._compact()
        return len(self._ids)

    def _compact(self) -> None:
        """Fold pending rows into the sample: keep the bottom-k by (key, id)."""
        if not self._pending:
            return
        all_ids = self._ids + [i for _, _, ids in self._pending for i in ids]
        if len(set(all_ids)) != len(all_ids):
            counts: dict[str, int] = {}
            for i in all_ids:
                counts[i] = counts.get(i, 0) + 1
            dupes = sorted(i for i, c in counts.items() if c > 1)[:5]
            self._pending, self._pending_rows = [], 0
            raise MetricsError(
                f"row ids {dupes} were added to the reservoir twice: each row must be counted once "
                "(was a shard merged twice, or do two shards reuse ids?)"
            )
        feats = np.concatenate([self._features, *(f for f, _, _ in self._pending)])  # (K + P, D)
        all_keys = np.concatenate([self._keys, *(k for _, k, _ in self._pending)])
        order = _bottom_k(all_keys, all_ids, self.capacity)
        self._features = np.ascontiguousarray(feats[order])
        self._keys = all_keys[order]
        self._ids = [all_ids[i] for i in order]
        self._pending, self._pending_rows = [], 0

    def _add_candidates(self, features: np.ndarray, keys: np.ndarray, ids: list[str]) -> None:
        if len(self._ids) == self.capacity:
            # Full: a row whose key exceeds the largest kept key can never enter (the common case once
            # the sample has filled, so a long stream costs little more than the hashing).
            enter = np.flatnonzero(keys <= self._keys[-1])
            if len(enter) < len(ids):
                features, keys, ids = features[enter], keys[enter], [ids[i] for i in enter]
        # The bottom-k of a union lies within the union of the parts' bottom-k.
        if len(ids) > self.capacity:
            cut = _bottom_k(keys, ids, self.capacity)
            features, keys, ids = features[cut], keys[cut], [ids[i] for i in cut]
        if ids:
            self._pending.append((np.ascontiguousarray(features, dtype=np.float32), keys, ids))
            self._pending_rows += len(ids)
        if self._pending_rows >= self.capacity:
            self._compact()

    def update(self, features: Any, row_ids: Sequence[Any]) -> FeatureReservoir:
        """Offer rows (N, D) with their globally unique ids; returns self."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        array = np.asarray(features, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise MetricsError(f"reservoir expects (N, {self.dim}) features, got {array.shape}")
        if len(row_ids) != array.shape[0]:
            raise MetricsError(f"got {array.shape[0]} feature rows but {len(row_ids)} row ids")
        ids = [str(i) for i in row_ids]
        self.seen += len(ids)
        self._add_candidates(array, row_keys(self.seed, ids), ids)
        return self

    def merge(self, other: FeatureReservoir) -> FeatureReservoir:
        """A new reservoir with the bottom-k rows of both (neither input is changed)."""
        if not isinstance(other, FeatureReservoir):
            raise MetricsError(
                f"can only merge FeatureReservoir with FeatureReservoir, got {type(other).__name__}"
            )
        if (other.capacity, other.dim, other.seed) != (self.capacity, self.dim, self.seed):
            raise MetricsError(
                "cannot merge reservoirs with different (capacity, dim, seed): "
                f"{(self.capacity, self.dim, self.seed)} vs {(other.capacity, other.dim, other.seed)}"
            )
        other._compact()
        out = self.copy()
        out.seen += other.seen
        out._add_candidates(other._features, other._keys, list(other._ids))
        out._compact()
        return out

    __add__ = merge

    def copy(self) -> FeatureReservoir:
        self._compact()
        out = FeatureReservoir(self.capacity, self.dim, self.seed)
        out.seen = self.seen
        out._features, out._keys, out._ids = self._features.copy(), self._keys.copy(), list(self._ids)
        return out

    def to_stats(self) -> FeatureStats:
        """FeatureStats of the kept rows (e.g. a real-train sample of the generated set's size: the floor)."""
        return FeatureStats.from_features(self.features) if len(self) else FeatureStats(self.dim)

    def to_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays for transport (exact round trip)."""
        self._compact()
        return {
            "capacity": np.asarray(self.capacity, dtype=np.int64),
            "seed": np.asarray(self.seed, dtype=np.int64),
            "seen": np.asarray(self.seen, dtype=np.int64),
            "features": self._features.copy(),
            "keys": self._keys.copy(),
            "ids": np.asarray(self._ids, dtype=np.str_),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureReservoir:
        try:
            features = np.asarray(data["features"], dtype=np.float32)
            out = cls(int(np.asarray(data["capacity"])), features.shape[1], int(np.asarray(data["seed"])))
            out.seen = int(np.asarray(data["seen"]))
            out._features = features.copy()
            out._keys = np.asarray(data["keys"], dtype=np.uint64).copy()
            out._ids = [str(i) for i in np.asarray(data["ids"]).tolist()]
        except KeyError as err:
            raise MetricsError(
                f"FeatureReservoir dict lacks key {err}; expected capacity, seed, seen, features, keys, ids"
            ) from None
        if not (len(out._ids) == len(out._keys) == features.shape[0] <= out.capacity):
            raise MetricsError("inconsistent FeatureReservoir dict: ids, keys and features differ in length")
        return out

    def __repr__(self) -> str:
        return (
            f"FeatureReservoir(capacity={self.capacity}, dim={self.dim}, seed={self.seed}, "
            f"kept={len(self)}, seen={self.seen})"
        )


# --------------------------------------------------------------------------------------------------
# One shard's (or one set's) summary
# --------------------------------------------------------------------------------------------------


@dataclass
class FeatureSummary:
    """What one shard of images contributes: exact moments (for FD) and a seeded sample (for KD)."""

    stats: FeatureStats
    reservoir: FeatureReservoir

    @classmethod
    def empty(cls, dim: int, reservoir_size: int, seed: int) -> FeatureSummary:
        return cls(FeatureStats(dim), FeatureReservoir(reservoir_size, dim, seed))

    def update(self, features: Any, row_ids: Sequence[Any]) -> FeatureSummary:
        """Add a batch of rows with their ids; returns self."""
        self.stats.update(features)
        self.reservoir.update(features, row_ids)
        return self

    def merge(self, other: FeatureSummary) -> FeatureSummary:
        return FeatureSummary(self.stats.merge(other.stats), self.reservoir.merge(other.reservoir))

    __add__ = merge

    @classmethod
    def merge_all(cls, parts: Iterable[FeatureSummary]) -> FeatureSummary:
        parts = list(parts)
        if not parts:
            raise MetricsError("merge_all needs at least one FeatureSummary")
        out = parts[0]
        for part in parts[1:]:
            out = out.merge(part)
        return out

    @property
    def count(self) -> int:
        return self.stats.count

    def to_dict(self) -> dict[str, np.ndarray]:
        out = {f"stats.{k}": v for k, v in self.stats.to_dict().items()}
        out.update({f"reservoir.{k}": v for k, v in self.reservoir.to_dict().items()})
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSummary:
        stats = {k.split(".", 1)[1]: v for k, v in data.items() if k.startswith("stats.")}
        reservoir = {k.split(".", 1)[1]: v for k, v in data.items() if k.startswith("reservoir.")}
        return cls(FeatureStats.from_dict(stats), FeatureReservoir.from_dict(reservoir))


def relative_difference(a: Any, b: Any) -> float:
    """``max |a - b| / max |b|`` (0 when both are zero): the equality measure the tests and benchmark use."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale
