"""Memorisation on constructed features, and the evaluation report files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vgmedgen.platform.metrics import (
    DistanceRow,
    EvaluationReport,
    MetricsError,
    count_memorised,
    distance_rows,
    markdown_report,
    memorisation_share,
    memorisation_threshold,
    nearest_distances,
    write_report,
)

DIM = 6


def _sets(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, test (fresh draws of the same distribution) and generated (10 copies, 10 far points)."""
    rng = np.random.default_rng(seed)
    train = rng.normal(size=(300, DIM))
    test = rng.normal(size=(80, DIM))
    copies = train[rng.choice(300, 10, replace=False)] + rng.normal(scale=1e-6, size=(10, DIM))
    far = rng.normal(size=(10, DIM)) + 50.0
    return train, test, np.concatenate([copies, far])


def _brute_force(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.sqrt(((q[:, None, :] - r[None, :, :]) ** 2).sum(-1)).min(axis=1)


def test_copies_are_flagged_and_far_points_are_not() -> None:
    train, test, generated = _sets()
    result, gen_nn, test_nn = memorisation_share(generated, train, test, percentile=5.0)
    assert result.flagged == 10 and result.generated == 20 and result.share == pytest.approx(0.5)
    assert np.all(gen_nn[:10] < 1e-5) and np.all(gen_nn[10:] > 40.0)
    assert result.threshold == pytest.approx(np.percentile(_brute_force(test, train), 5.0), rel=1e-12)
    assert result.test_share == pytest.approx(np.mean(test_nn < result.threshold))
    assert 0.0 < result.test_share <= 0.05 + 1e-9
    assert result.metric == "euclidean"


def test_fresh_samples_are_flagged_at_about_the_percentile_rate() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(size=(400, DIM))
    test = rng.normal(size=(400, DIM))
    fresh = rng.normal(size=(2000, DIM))
    result, _, _ = memorisation_share(fresh, train, test, percentile=5.0)
    assert 0.02 < result.share < 0.09  # a generaliser is flagged about as often as real test data


def test_chunked_distances_equal_brute_force_and_exact_copies_are_zero() -> None:
    train, test, _ = _sets(seed=2)
    chunked = nearest_distances(test, train, chunk_size=7)
    whole = nearest_distances(torch.from_numpy(test), torch.from_numpy(train), chunk_size=100_000)
    np.testing.assert_allclose(chunked, _brute_force(test, train), rtol=1e-10)
    np.testing.assert_allclose(chunked, whole, rtol=1e-12)
    assert np.all(nearest_distances(train[:50] * 1e3 + 1e4, train * 1e3 + 1e4, chunk_size=16) < 1e-4)


def test_cosine_metric_ignores_scale() -> None:
    train, test, _ = _sets(seed=3)
    scaled_copies = train[:5] * 7.0  # same directions, other norms: copies under cosine, not Euclidean
    cos = nearest_distances(scaled_copies, train, metric="cosine")
    euc = nearest_distances(scaled_copies, train, metric="euclidean")
    assert np.all(cos < 1e-12) and np.all(euc > 1.0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    expected = (1.0 - unit(test) @ unit(train).T).min(axis=1)
    np.testing.assert_allclose(
        nearest_distances(test, train, metric="cosine", chunk_size=13), expected, atol=1e-12
    )
    result, _, _ = memorisation_share(scaled_copies, train, test, metric="cosine")
    assert result.flagged == 5 and result.metric == "cosine"


def test_sharded_counts_sum_to_the_whole() -> None:
    train, test, generated = _sets(seed=4)
    threshold, _ = memorisation_threshold(test, train)
    total = sum(count_memorised(part, train, threshold)[0] for part in np.array_split(generated, 3))
    assert total == memorisation_share(generated, train, test)[0].flagged == 10


def test_memorisation_input_errors_and_leakage_warning() -> None:
    train, test, generated = _sets(seed=5)
    with pytest.raises(MetricsError, match="differ in width"):
        nearest_distances(generated, train[:, :3])
    with pytest.raises(MetricsError, match="'euclidean' or 'cosine'"):
        nearest_distances(generated, train, metric="manhattan")  # type: ignore[arg-type]
    with pytest.raises(MetricsError, match="percentile"):
        memorisation_threshold(test, train, percentile=0.0)
    leaked = np.concatenate([train[:10], test])  # 10 test rows duplicate training rows
    with pytest.warns(UserWarning, match="split leakage"):
        threshold, _ = memorisation_threshold(leaked, train)
    assert threshold == 0.0


def test_report_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    train, test, generated = _sets(seed=6)
    result, gen_nn, test_nn = memorisation_share(generated, train, test)
    report = EvaluationReport(
        title="tiny evaluation",
        dataset="synthderm",
        model_version="demo@3",
        distances=[
            DistanceRow("SFD", 4.5, 1.5, n_generated=20, n_reference=80, extractor="vgmedgen-domain"),
            DistanceRow("SKD", 0.031, 0.004, n_generated=20, n_reference=80, std=0.002, floor_std=0.001),
            DistanceRow("FID", 51.2, math.nan, n_generated=20, n_reference=80, note="floor not computed"),
        ],
        memorisation=result,
        scalars={"downstream_bacc": 0.61},
        warnings=["KID subset size adapted to 20"],
        generated_nearest=gen_nn,
        test_nearest=test_nn,
    )
    paths = write_report(report, tmp_path / "eval")
    assert set(paths) == {"json", "markdown", "distances_png", "memorisation_png"}
    data = json.loads(paths["json"].read_text())
    rows = {r["metric"]: r for r in data["distances"]}
    assert rows["SFD"]["floor"] == 1.5 and rows["SFD"]["ratio"] == pytest.approx(3.0)
    assert rows["FID"]["floor"] is None and rows["FID"]["ratio"] is None  # NaN -> null, valid JSON
    assert data["memorisation"]["flagged"] == 10 and data["model_version"] == "demo@3"
    md = paths["markdown"].read_text()
    assert md == markdown_report(report)
    assert "| metric | generated | floor | generated / floor |" in md
    assert "| SFD | 4.5 | 1.5 | 3 | 20 | 80 | vgmedgen-domain |" in md
    assert "| FID | 51.2 | n/a | n/a |" in md
    assert "10 of 20 generated images (50.00%)" in md
    for key in ("distances_png", "memorisation_png"):
        head = paths[key].read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" and paths[key].stat().st_size > 2000
    with pytest.raises(MetricsError, match="empty"):
        write_report(EvaluationReport(title="x", dataset="y", distances=[]), tmp_path / "empty")


def test_distance_rows_pair_each_distance_with_its_floor() -> None:
    from vgmedgen.platform.metrics.fidelity import Distances

    generated = Distances(
        4.0, 0.03, 0.002, n_a=200, n_b=150, kd_subset_size=150, kd_subsets=100, warnings=["small"]
    )
    floor = Distances(1.0, 0.005, 0.001, n_a=200, n_b=150, kd_subset_size=150, kd_subsets=100)
    fd, kd = distance_rows("HFD", "HKD", generated, floor, extractor="vgmedgen-domain")
    assert (fd.metric, fd.value, fd.floor, fd.ratio, fd.n_generated, fd.n_reference) == (
        "HFD",
        4.0,
        1.0,
        4.0,
        200,
        150,
    )
    assert (kd.metric, kd.value, kd.floor, kd.std, kd.floor_std) == ("HKD", 0.03, 0.005, 0.002, 0.001)
    assert fd.note == "small" and kd.extractor == "vgmedgen-domain"
    no_floor = distance_rows("FID", "KID", generated, None)
    assert math.isnan(no_floor[0].floor) and math.isnan(no_floor[0].ratio) and no_floor[1].floor_std is None
