"""The generation scorer: columns and null rules, each filter's reason, exact sharded statistics, summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from vgmedgen.model.domain_nets import build_domain_net, domain_net_config, save_domain_net
from vgmedgen.platform.evaluation.generate import prompt_rows
from vgmedgen.platform.generation.config import FilterConfig
from vgmedgen.platform.generation.filters import PropertyBands, apply_filters, filter_summary
from vgmedgen.platform.generation.score import (
    ALL_CLASSES,
    SCORER_COLUMNS,
    SCORER_SCHEMA,
    Scorer,
    ScorerAssets,
    ShardStats,
    measure_rows,
    score_accepted,
    scored_to_arrow,
)
from vgmedgen.platform.metrics.stats import FeatureStats, relative_difference
from vgmedgen.platform.records import encode_png
from vgmedgen.platform.training.classify import HeadSpec

SIZE = 32
CLASSES = ("melanoma", "nevus")


def disc_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, H, W, 3) uint8 skin-coloured images with one dark disc each, and the (n, H, W) bool masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    masks = np.zeros((n, SIZE, SIZE), bool)
    for i in range(n):
        cx, cy, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(3, 8)
        masks[i] = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        skin = rng.integers(170, 230, 3)
        lesion = rng.integers(40, 120, 3)
        images[i] = np.where(masks[i][..., None], lesion, skin) + rng.integers(0, 10, (SIZE, SIZE, 3))
    return images, masks


@pytest.fixture(scope="module")
def assets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Assets from a tiny (untrained, seeded) classifier on 40 train and 20 test disc images."""
    root = tmp_path_factory.mktemp("scorer")
    torch.manual_seed(0)
    net = build_domain_net(domain_net_config("tiny", kind="classifier", num_classes=2, input_size=SIZE))
    net_dir = root / "net"
    net_dir.mkdir()
    save_domain_net(net, net_dir / "net.safetensors")
    heads = [HeadSpec(name="label", classes=CLASSES, source="label").model_dump(mode="json")]
    (net_dir / "heads.json").write_text(json.dumps(heads))
    (net_dir / "metrics.json").write_text("{}")
    train, train_masks = disc_images(40, seed=1)
    test, _ = disc_images(20, seed=2)
    ScorerAssets.from_arrays(
        root / "assets",
        domain_net_dir=net_dir,
        train_images=train,
        train_masks=train_masks,
        train_labels=[CLASSES[i % 2] for i in range(40)],
        reference_images=test,
        reference_labels=[CLASSES[i % 2] for i in range(20)],
        reservoir_size=64,
        seed=7,
    )
    return root / "assets"


def make_batch(n: int, seed: int, labels: list[str | None]) -> dict:
    images, masks = disc_images(n, seed)
    masks[-1] = False  # the last row has an empty pseudo-mask
    return {
        "sample_id": np.array([f"s{seed}-{i}" for i in range(n)], dtype=object),
        "label": np.array(labels, dtype=object),
        "seed": np.arange(n, dtype=np.int64),
        "image": np.array([encode_png(im) for im in images], dtype=object),
        "mask": np.array([encode_png(m.astype(np.uint8) * 255) for m in masks], dtype=object),
    }


def test_scorer_columns_types_and_null_rules(assets_dir: Path) -> None:
    batch = make_batch(4, seed=5, labels=["nevus", "melanoma", None, "nevus"])
    for v in batch.values():
        v.setflags(write=False)  # Ray Data hands out read-only views
    before = {k: v.copy() for k, v in batch.items()}
    out = Scorer(assets_dir, FilterConfig())(batch)
    assert set(SCORER_COLUMNS) <= set(out)
    for k, v in before.items():  # the input columns pass through unchanged
        assert list(out[k]) == list(v) and list(batch[k]) == list(v)
    assert all(f.dtype == np.float32 and f.shape == (16,) for f in out["domain_features"])
    assert out["inception_features"] == [None] * 4  # no Inception weights configured
    conf = out["confidence"]
    assert conf[2] is None and all(0.0 < c < 1.0 for c in (conf[0], conf[1], conf[3]))
    assert out["nn_distance"].dtype == np.float64 and (out["nn_distance"] > 0).all()
    assert all(0.0 < a < 1.0 for a in out["lesion_area"][:3]) and out["lesion_area"][3] == 0.0
    assert out["lesion_cx"][3] is None and out["lesion_rgb"][3] is None and out["skin_rgb"][3] is None
    assert len(out["lesion_rgb"][0]) == 3 and out["lesion_rgb"][0][0] < out["skin_rgb"][0][0]
    assert out["accepted"].all() and out["reason"] == [None] * 4  # no filters configured


def test_scorer_confidence_is_null_for_unknown_labels_and_filters_reject(assets_dir: Path) -> None:
    batch = make_batch(3, seed=6, labels=["nevus", "melanoma", "nevus"])
    out = Scorer(assets_dir, {"min_confidence": 0.99, "memorisation_percentile": 50})(batch)
    # An untrained net cannot be 99 % sure: every labelled row fails the confidence bar.
    assert not out["accepted"].any()
    assert all("confidence" in r and "< 0.99 for" in r for r in out["reason"])


def test_each_filter_names_its_reason() -> None:
    rng = np.random.default_rng(0)
    n = 100
    labels = ["nevus"] * n
    props = {
        "lesion_area": rng.uniform(0.1, 0.3, n).tolist(),
        "lesion_cx": rng.uniform(0.4, 0.6, n).tolist(),
        "lesion_cy": rng.uniform(0.4, 0.6, n).tolist(),
        "lesion_rgb": rng.uniform(50, 80, (n, 3)).tolist(),
        "skin_rgb": rng.uniform(180, 200, (n, 3)).tolist(),
    }
    bands = PropertyBands.from_rows(labels, props)
    hi_area = float(np.quantile(props["lesion_area"], 0.99))
    rows = {
        "label": ["nevus", "nevus", "nevus", None],
        "confidence": [0.31, 0.9, 0.9, None],
        "nn_distance": [5.0, 0.001, 5.0, 5.0],
        "lesion_area": [0.2, 0.2, 0.62, 0.2],
        "lesion_cx": [0.5, 0.5, 0.5, 0.95],
        "lesion_cy": [0.5, 0.5, 0.5, 0.5],
        "lesion_rgb": [[60.0] * 3, [60.0] * 3, [60.0] * 3, [60.0, 60.0, 250.0]],
        "skin_rgb": [[190.0] * 3] * 4,
    }
    cfg = FilterConfig(min_confidence=0.5, memorisation_percentile=5, property_quantiles=(0.01, 0.99))
    accepted, reasons = apply_filters(rows, cfg, memorisation_threshold=0.05, bands=bands)
    assert accepted.tolist() == [False, False, False, False]
    assert reasons[0] == "confidence 0.31 < 0.50 for 'nevus'"
    assert reasons[1].startswith("memorisation: nn_distance 0.001 < 0.05, the 5th percentile")
    assert reasons[2] == f"lesion_area 0.62 above the 0.99 quantile {hi_area:.2f} of 'nevus'"
    # An unlabelled row is judged against all train rows, and every failed check is named.
    assert reasons[3].startswith("lesion_cx 0.95 above the 0.99 quantile")
    assert (
        "; lesion_rgb[B] 250.00 above the 0.99 quantile" in reasons[3] and "of all train rows" in reasons[3]
    )
    # The same rows pass with the filters off.
    ok, none = apply_filters(rows, FilterConfig(), bands=bands)
    assert ok.all() and none == [None] * 4
    summary = filter_summary({"label": rows["label"], "accepted": accepted, "reason": reasons})
    assert summary["accepted"] == 0 and summary["rejected"] == 4
    assert summary["per_class"] == {
        "nevus": {"accepted": 0, "rejected": 3},
        None: {"accepted": 0, "rejected": 1},
    }
    assert summary["per_reason"] == {
        "confidence": 1,
        "lesion_area": 1,
        "lesion_cx": 1,
        "lesion_rgb": 1,
        "memorisation": 1,
    }


def test_measure_rows_match_the_masks() -> None:
    images, masks = disc_images(3, seed=9)
    got = measure_rows(images, masks)
    for i in range(3):
        ys, xs = np.nonzero(masks[i])
        assert got["lesion_area"][i] == pytest.approx(masks[i].mean())
        assert got["lesion_cx"][i] == pytest.approx((xs.mean() + 0.5) / SIZE, abs=0.02)
        assert got["lesion_rgb"][i] == pytest.approx(images[i][masks[i]].mean(0).tolist(), abs=0.01)


def _sharded(features: np.ndarray, labels: list, ids: list, shards: int) -> ShardStats:
    parts = []
    for idx in np.array_split(np.arange(len(ids)), shards):
        part = ShardStats(reservoir_size=500, seed=3)
        part.add("domain", features[idx], [labels[i] for i in idx], [ids[i] for i in idx])
        parts.append(ShardStats.from_dict(part.to_dict()))  # as if written by a worker and read back
    return ShardStats.merge_all(parts)


def test_one_and_four_shards_agree_and_kid_is_reproducible() -> None:
    rng = np.random.default_rng(1)
    n, d = 3000, 512  # realistic scale: 512-D (paper domain net), offset far from zero, thousands of rows
    features = rng.normal(50.0, 3.0, (n, d)) + rng.normal(0, 1, d)
    labels = [CLASSES[i % 2] if i % 5 else None for i in range(n)]
    ids = [f"r{i}" for i in range(n)]
    one, four = _sharded(features, labels, ids, 1), _sharded(features, labels, ids, 4)
    for key in (ALL_CLASSES, *CLASSES):
        a, b = one.summaries["domain"][key].stats, four.summaries["domain"][key].stats
        assert a.count == b.count
        assert relative_difference(b.mean, a.mean) < 1e-9 and relative_difference(b.cov, a.cov) < 1e-9
        assert np.array_equal(
            one.summaries["domain"][key].reservoir.features, four.summaries["domain"][key].reservoir.features
        )
    exact = FeatureStats.from_features(features)
    assert relative_difference(four.summaries["domain"][ALL_CLASSES].stats.cov, exact.cov) < 1e-9
    ref = _sharded(
        rng.normal(50.0, 3.0, (1200, d)),
        [CLASSES[i % 2] for i in range(1200)],
        [f"t{i}" for i in range(1200)],
        1,
    )
    kw = {"kid_subsets": 10, "kid_subset_size": 100, "seed": 4}
    rows_one, rows_four = score_accepted(one, ref, **kw), score_accepted(four, ref, **kw)
    for r1, r4 in zip(rows_one, rows_four):
        assert r1["kd_mean"] == r4["kd_mean"] and r1["kd_std"] == r4["kd_std"]
        assert r1["fd"] == pytest.approx(r4["fd"], rel=1e-9)
    assert score_accepted(four, ref, **kw) == rows_four  # seeded: the same numbers again
    assert [r["class"] for r in rows_four] == [ALL_CLASSES, *CLASSES]
    assert all(r["fd"] > 0 and r["note"] is None for r in rows_four)


def test_per_class_rows_are_na_when_smaller_than_the_feature_width() -> None:
    rng = np.random.default_rng(2)
    d = 8
    gen = ShardStats(100, 0).add(
        "domain", rng.normal(size=(30, d)), ["a"] * 25 + ["b"] * 5, [f"g{i}" for i in range(30)]
    )
    ref = ShardStats(100, 0).add(
        "domain", rng.normal(size=(40, d)), ["a"] * 20 + ["b"] * 20, [f"r{i}" for i in range(40)]
    )
    rows = {r["class"]: r for r in score_accepted(gen, ref, kid_subsets=5, kid_subset_size=5)}
    assert rows[ALL_CLASSES]["fd"] is not None and rows["a"]["fd"] is not None
    assert rows["b"]["fd"] is None and rows["b"]["kd_mean"] is None
    assert (
        rows["b"]["note"]
        == "n/a: needs more rows than the 8 feature dimensions in both sets (accepted 5, reference 20)"
    )


def test_shard_stats_from_scored_batches_round_trip(assets_dir: Path, tmp_path: Path) -> None:
    scorer = Scorer(assets_dir, {"min_confidence": 0.0})
    out = scorer(make_batch(4, seed=8, labels=["nevus", "melanoma", None, "nevus"]))
    stats = ShardStats(64, 7).add_batch(out)
    back = ShardStats.load(stats.save(tmp_path / "shard.npz"))
    assert back.summaries["domain"][ALL_CLASSES].count == 4 and back.summaries["domain"]["nevus"].count == 2
    assert "inception" not in back.summaries  # not configured
    rows = score_accepted(back, scorer.assets.reference, kid_subsets=2, kid_subset_size=2)
    assert [r["class"] for r in rows] == [ALL_CLASSES, *CLASSES]
    assert rows[0]["fd"] is not None and rows[1]["note"].startswith("n/a")


def test_inception_features_when_the_weights_file_is_configured(assets_dir: Path, tmp_path: Path) -> None:
    from vgmedgen.platform.metrics.fidelity import kaiming_inception_state_dict

    weights = tmp_path / "inception.pth"
    torch.save(kaiming_inception_state_dict(seed=0), weights)
    train, train_masks = disc_images(8, seed=1)
    test, _ = disc_images(4, seed=2)
    assets = ScorerAssets.from_arrays(
        tmp_path / "assets",
        domain_net_dir=ScorerAssets.load(assets_dir).domain_net_dir,
        train_images=train,
        train_masks=train_masks,
        train_labels=[CLASSES[i % 2] for i in range(8)],
        reference_images=test,
        reference_labels=[CLASSES[i % 2] for i in range(4)],
        inception_weights=weights,
        reservoir_size=16,
    )
    assert assets.reference.summaries["inception"][ALL_CLASSES].count == 4
    out = Scorer(assets.directory)(make_batch(2, seed=3, labels=["nevus", None]))
    feats = out["inception_features"]
    assert all(f.dtype == np.float32 and f.shape == (2048,) for f in feats)
    assert not np.array_equal(feats[0], feats[1])
    stats = ShardStats(16, 0).add_batch(out)
    assert stats.summaries["inception"][ALL_CLASSES].count == 2


def test_scored_batch_to_arrow_keeps_the_output_types(assets_dir: Path) -> None:
    out = Scorer(assets_dir, {"min_confidence": 0.99})(
        make_batch(3, seed=4, labels=["nevus", None, "melanoma"])
    )
    table = scored_to_arrow(out)
    for name in SCORER_COLUMNS:
        assert table.schema.field(name).type == SCORER_SCHEMA.field(name).type, name
    assert table.column("image").type == pa.binary() and table.column("sample_id").type == pa.string()
    assert table.column("inception_features").null_count == 3 and table.column("confidence").null_count == 1
    assert table.column("lesion_rgb").null_count == 1  # the empty mask of the last row
    assert table.column("accepted").to_pylist() == [
        False,
        True,
        False,
    ]  # the unlabelled row has no confidence
    back = np.asarray(table.column("domain_features")[0].as_py(), np.float32)
    assert np.array_equal(back, out["domain_features"][0])


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_assets_build_trains_the_evaluate_domain_net_once_and_reuses_it(
    ray_cluster, output_root: Path
) -> None:
    """The driver step on real (SynthDerm) records: the evaluate job's domain classifier, then saved assets."""
    from vgmedgen.platform.config import load_experiment
    from vgmedgen.platform.prepare import prepare_records

    repo = Path(__file__).resolve().parents[1]
    cfg = load_experiment(
        repo / "configs/tiny.yaml",
        [
            f"output_root={output_root}",
            "data.synthderm.num_records=160",
            "evaluate.domain_net=tiny",
            "evaluate.domain_train.steps=5",
            "evaluate.domain_train.batch_size=16",
        ],
    )
    prepare_records(cfg)
    assets = ScorerAssets.build(cfg, output_root / "scorer")
    again = ScorerAssets.build(cfg, output_root / "scorer-again")
    assert again.domain_net_dir == assets.domain_net_dir  # the trained net is reused, not retrained
    assert assets.domain_kind == "classifier" and assets.domain_net_dir.is_relative_to(
        output_root / "evaluation"
    )
    n_train = len(prompt_rows(cfg.records_dir, "train"))
    assert assets.train_features.shape[0] == n_train and np.isfinite(assets.test_nn).all()
    ref = assets.reference.summaries["domain"][ALL_CLASSES]
    assert ref.count == len(prompt_rows(cfg.records_dir, cfg.evaluate.reference_split))
    # cached: computed once per key under the root, then loaded as it is
    first = ScorerAssets.cached(cfg, output_root / "cache")
    stamp = (first.directory / "assets.json").stat().st_mtime_ns
    second = ScorerAssets.cached(cfg, output_root / "cache")
    assert second.directory == first.directory and first.directory.parent == output_root / "cache"
    assert (second.directory / "assets.json").stat().st_mtime_ns == stamp
    assert np.array_equal(second.train_features, assets.train_features)
