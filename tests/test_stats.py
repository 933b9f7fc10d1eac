"""Exact sharded statistics, FD/KD formulas against torch-fidelity's own, and the seeded reservoir."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from vgmedgen.platform.metrics.stats import (
    FeatureReservoir,
    FeatureStats,
    FeatureSummary,
    MetricsError,
    SmallSampleWarning,
    frechet_distance,
    kernel_distance,
    relative_difference,
    row_keys,
)

DIM = 8


def _features(n: int, seed: int, offset: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(DIM, DIM))
    # A large offset stresses the numerics: naive sum-of-squares would lose ~8 digits at 1e4.
    return (rng.normal(size=(n, DIM)) @ mixing * scale + offset).astype(np.float32)


SHARD_SIZES = [1, 7, 33, 100, 59, 2]


def _shards(features: np.ndarray) -> list[np.ndarray]:
    bounds = np.cumsum([0, *SHARD_SIZES])
    assert bounds[-1] == len(features)
    return [features[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def test_single_pass_equals_numpy() -> None:
    x = _features(202, seed=0, offset=1e4)
    stats = FeatureStats.from_features(x)
    x64 = x.astype(np.float64)
    assert stats.count == 202
    assert relative_difference(stats.mean, x64.mean(axis=0)) < 1e-13
    assert relative_difference(stats.cov, np.cov(x64, rowvar=False)) < 1e-12


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffled", "tree"])
def test_sharded_merge_equals_single_pass(order: str) -> None:
    x = _features(sum(SHARD_SIZES), seed=1, offset=1e4, scale=3.0)
    single = FeatureStats.from_features(x)
    parts = []
    for shard in _shards(x):
        stats = FeatureStats(DIM)
        for start in range(0, len(shard), 16):  # several batches per shard
            stats.update(torch.from_numpy(shard[start : start + 16]))
        parts.append(FeatureStats.from_dict(stats.to_dict()))  # as if shipped from a Ray task
    if order == "reverse":
        parts = parts[::-1]
    elif order == "shuffled":
        random.Random(3).shuffle(parts)
    if order == "tree":
        while len(parts) > 1:
            parts = [
                parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)
            ]
        merged = parts[0]
    else:
        merged = FeatureStats.merge_all(parts)
    assert merged.count == single.count
    assert relative_difference(merged.mean, single.mean) < 1e-9
    assert relative_difference(merged.cov, single.cov) < 1e-9
    reference = FeatureStats.from_features(_features(150, seed=2, offset=1e4))
    fd_single = frechet_distance(single, reference)
    fd_merged = frechet_distance(merged, reference)
    assert fd_single > 1.0
    assert abs(fd_merged - fd_single) / fd_single < 1e-9


def test_merge_leaves_inputs_unchanged_and_checks_width() -> None:
    a = FeatureStats.from_features(_features(10, seed=3))
    b = FeatureStats.from_features(_features(12, seed=4))
    before = a.to_dict()
    c = a.merge(b)
    assert c.count == 22 and a.count == 10
    np.testing.assert_array_equal(a.to_dict()["m2"], before["m2"])
    with pytest.raises(MetricsError, match="width"):
        a.merge(FeatureStats.from_features(np.zeros((3, DIM + 1))))
    with pytest.raises(MetricsError, match="does not match"):
        a.update(np.zeros((3, DIM + 1)))
    with pytest.raises(MetricsError, match="empty"):
        _ = FeatureStats(DIM).mean
    with pytest.raises(MetricsError, match="at least 2"):
        _ = FeatureStats.from_features(np.zeros((1, DIM))).cov
    with pytest.raises(MetricsError, match="NaN"):
        FeatureStats(DIM).update(np.full((2, DIM), np.nan))


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    stats = FeatureStats.from_features(_features(300, seed=5, offset=3.0))
    fd = frechet_distance(stats, stats)
    assert abs(fd) < 1e-9 * np.trace(stats.cov)


def test_frechet_distance_closed_form_for_diagonal_gaussians() -> None:
    def stats_of(mean: np.ndarray, var: np.ndarray) -> FeatureStats:
        # cov = m2 / (count - 1)
        return FeatureStats.from_dict({"count": 10, "mean": mean, "m2": np.diag(var) * 9})

    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(stats_of(mu_a, var_a), stats_of(mu_b, var_b)) == pytest.approx(
        expected, rel=1e-12
    )


def test_frechet_distance_matches_torch_fidelity_formula() -> None:
    a, b = _features(120, seed=6), _features(90, seed=7, offset=0.5, scale=1.3)
    ours = frechet_distance(FeatureStats.from_features(a), FeatureStats.from_features(b))
    s1, s2 = fid_features_to_statistics(torch.from_numpy(a)), fid_features_to_statistics(torch.from_numpy(b))
    theirs = fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"]
    # torch-fidelity keeps the mean in float32 (np.mean of float32 features); we keep float64.
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_frechet_distance_warns_when_rows_do_not_exceed_width() -> None:
    a = FeatureStats.from_features(_features(DIM, seed=8))
    b = FeatureStats.from_features(_features(50, seed=9))
    with pytest.warns(SmallSampleWarning, match="singular"):
        frechet_distance(a, b)
    with pytest.raises(MetricsError, match=">= 2"):
        frechet_distance(FeatureStats.from_features(_features(1, seed=1)), b)


def test_kernel_distance_equals_torch_fidelity() -> None:
    a = torch.from_numpy(_features(60, seed=10))
    b = torch.from_numpy(_features(45, seed=11, offset=0.3))
    theirs = kid_features_to_metric(a, b, kid_subsets=25, kid_subset_size=30, rng_seed=4, verbose=False)
    same = kernel_distance(a, b, subsets=25, subset_size=30, seed=4, dtype=np.float32)
    # Same draws, same kernel, same summation order: the same float32 number.
    assert same.mean == theirs["kernel_inception_distance_mean"]
    assert same.std == theirs["kernel_inception_distance_std"]
    exact = kernel_distance(a, b, subsets=25, subset_size=30, seed=4)
    assert exact.mean == pytest.approx(theirs["kernel_inception_distance_mean"], abs=1e-5)
    assert (exact.subsets, exact.subset_size, exact.n_a, exact.n_b) == (25, 30, 60, 45)
    assert exact.mean > 0.01  # the sets differ: the test is not comparing two zeros


def test_kernel_distance_adapts_subset_size_for_small_sets() -> None:
    a, b = _features(12, seed=12), _features(9, seed=13, offset=1.0)
    with pytest.warns(SmallSampleWarning, match="using subsets of 9"):
        kd = kernel_distance(a, b, subsets=5, subset_size=1000, seed=1, dtype=np.float32)
    assert kd.subset_size == 9
    theirs = kid_features_to_metric(
        torch.from_numpy(a), torch.from_numpy(b), kid_subsets=5, kid_subset_size=9, rng_seed=1, verbose=False
    )
    assert kd.mean == theirs["kernel_inception_distance_mean"]
    with pytest.raises(MetricsError, match="subset_size must be >= 2"):
        kernel_distance(a, b, subset_size=1)
    with pytest.raises(MetricsError, match="equal width"):
        kernel_distance(a, b[:, :3])


def test_kernel_distance_separates_same_from_different_distributions() -> None:
    x = _features(800, seed=16)  # two disjoint halves of one distribution
    far = _features(400, seed=16, offset=2.0)
    near = kernel_distance(x[:400], x[400:], subsets=20, subset_size=200, seed=0)
    distant = kernel_distance(x[:400], far, subsets=20, subset_size=200, seed=0)
    assert distant.mean > 0.05
    assert abs(near.mean) < 0.1 * distant.mean


# ---------------------------------------------------------------------------------------------
# Reservoir
# ---------------------------------------------------------------------------------------------


def _reservoir_over(parts: list[tuple[np.ndarray, list[int]]], capacity: int, seed: int) -> FeatureReservoir:
    out = FeatureReservoir(capacity, DIM, seed)
    for feats, ids in parts:
        shard = FeatureReservoir(capacity, DIM, seed).update(feats, ids)
        out = out.merge(FeatureReservoir.from_dict(shard.to_dict()))
    return out


def test_reservoir_is_independent_of_shard_order_and_split() -> None:
    x = _features(sum(SHARD_SIZES), seed=20)
    ids = list(range(1000, 1000 + len(x)))
    bounds = np.cumsum([0, *SHARD_SIZES])
    parts = [(x[a:b], ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    reference = _reservoir_over(parts, capacity=40, seed=7)
    for perm in itertools.islice(itertools.permutations(range(len(parts))), 0, 720, 97):
        other = _reservoir_over([parts[i] for i in perm], capacity=40, seed=7)
        assert other.row_ids == reference.row_ids
        np.testing.assert_array_equal(other.features, reference.features)
    # Another split of the same rows (one shard, then rows one by one) keeps the same sample.
    one = FeatureReservoir(40, DIM, 7).update(x, ids)
    assert one.row_ids == reference.row_ids
    singles = FeatureReservoir(40, DIM, 7)
    for i in reversed(range(len(x))):
        singles.update(x[i : i + 1], [ids[i]])
    assert singles.row_ids == reference.row_ids
    assert reference.seen == len(x) and len(reference) == 40
    # It is the bottom-40 of the keys, and each kept row carries its own features.
    keys = row_keys(7, ids)
    expected = [str(ids[i]) for i in np.argsort(keys)[:40]]
    assert reference.row_ids == expected
    kept = {str(i): row for i, row in zip(ids, x)}
    np.testing.assert_array_equal(reference.features, np.stack([kept[i] for i in reference.row_ids]))


def test_reservoir_seed_changes_sample_and_head_is_smaller_sample() -> None:
    x = _features(150, seed=21)
    ids = [f"rec-{i}" for i in range(150)]
    a = FeatureReservoir(30, DIM, seed=1).update(x, ids)
    b = FeatureReservoir(30, DIM, seed=2).update(x, ids)
    assert set(a.row_ids) != set(b.row_ids)
    # The first n rows of a bottom-k sample are the bottom-n sample.
    small = FeatureReservoir(10, DIM, seed=1).update(x, ids)
    assert a.row_ids[:10] == small.row_ids
    with pytest.raises(MetricsError, match="different"):
        a.merge(b)


def test_reservoir_refuses_rows_counted_twice() -> None:
    x = _features(20, seed=22)
    shard = FeatureReservoir(50, DIM, 0).update(x, list(range(20)))
    with pytest.raises(MetricsError, match="twice"):
        shard.merge(shard)
    with pytest.raises(MetricsError, match="row ids"):
        FeatureReservoir(5, DIM, 0).update(x, list(range(19)))


def test_feature_summary_round_trip_and_merge() -> None:
    x = _features(60, seed=23)
    a = FeatureSummary.empty(DIM, 25, seed=3).update(x[:35], list(range(35)))
    b = FeatureSummary.empty(DIM, 25, seed=3).update(x[35:], list(range(35, 60)))
    merged = FeatureSummary.from_dict(a.to_dict()) + FeatureSummary.from_dict(b.to_dict())
    whole = FeatureSummary.empty(DIM, 25, seed=3).update(x, list(range(60)))
    assert merged.count == 60
    assert relative_difference(merged.stats.cov, whole.stats.cov) < 1e-12
    assert merged.reservoir.row_ids == whole.reservoir.row_ids
    assert relative_difference(merged.reservoir.to_stats().mean, whole.reservoir.features.mean(axis=0)) < 1e-6
