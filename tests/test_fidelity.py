"""FID/KID and domain FD/KD: our sharded path equals torch-fidelity's own calculate_metrics.

The Inception test builds a weights file from torch-fidelity's architecture with Kaiming-initialised
convolutions (the real file cannot be downloaded here; default init gives near-constant features).
It runs Inception on 48 images in all: about 20-40 s on 2 idle CPU cores (Inception runs at 299 px whatever the input size).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from vgmedgen.model.configbase import ConfigError
from vgmedgen.model.domain_nets import (
    DomainClassifier,
    SegmentationEncoder,
    build_domain_net,
    domain_net_config,
    load_domain_net,
    save_domain_net,
)
from vgmedgen.platform.metrics import fidelity
from vgmedgen.platform.metrics.stats import (
    FeatureStats,
    FeatureSummary,
    MetricsError,
    SmallSampleWarning,
    frechet_distance,
    kernel_distance,
)


def _images(n: int, seed: int, size: int = 32, shift: float = 0.0, contrast: float = 1.0) -> torch.Tensor:
    """Smooth random uint8 images (N, 3, size, size); shift/contrast move the second distribution."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=gen)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.15 * torch.rand(n, 3, size, size, generator=gen)
    x = (x - 0.5) * contrast + 0.5 + shift
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _sharded_summary(
    extractor: torch.nn.Module,
    images: torch.Tensor,
    bounds: list[int],
    reservoir_size: int,
    batch_size: int = 5,
) -> FeatureSummary:
    """Summaries of uneven shards (row ids = image index), merged in reverse order."""
    parts = [
        fidelity.summarise_images(
            extractor,
            images[a:b],
            row_ids=list(range(a, b)),
            batch_size=batch_size,
            reservoir_size=reservoir_size,
            seed=1,
        )
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return FeatureSummary.merge_all(
        [FeatureSummary.from_dict(p.to_dict()) for p in reversed(parts)]  # as shipped from Ray tasks
    )


def _in_row_order(summary: FeatureSummary) -> np.ndarray:
    """The reservoir's rows back in image order (it holds every row when capacity >= N)."""
    order = np.argsort([int(i) for i in summary.reservoir.row_ids])
    return summary.reservoir.features[order]


# ---------------------------------------------------------------------------------------------
# Inception FID/KID
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "kaiming-inception.pth"
    torch.save(fidelity.kaiming_inception_state_dict(seed=0), path)
    return path


def test_fid_kid_equal_torch_fidelity_calculate_metrics(inception_weights: Path) -> None:
    torch.manual_seed(0)
    real, fake = _images(12, seed=1), _images(12, seed=2, shift=0.1, contrast=0.6)
    theirs = fidelity.torch_fidelity_metrics(
        real,
        fake,
        weights_path=inception_weights,
        kid_subsets=5,
        kid_subset_size=8,
        seed=3,
        batch_size=12,
        device="cpu",
    )
    extractor = fidelity.create_inception_extractor(inception_weights, device="cpu")
    ours_real = _sharded_summary(extractor, real, [0, 3, 11, 12], reservoir_size=64)
    ours_fake = _sharded_summary(extractor, fake, [0, 7, 12], reservoir_size=64)
    assert ours_real.stats.dim == 2048 and ours_real.count == 12

    with pytest.warns(SmallSampleWarning):  # 12 rows for 2048-D features
        fid = frechet_distance(ours_real.stats, ours_fake.stats)
    assert fid > 1.0  # Kaiming weights give informative features (default init gives ~1e-16)
    # torch-fidelity keeps the mean in float32; the covariances agree to rounding.
    assert fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)

    kid32 = kernel_distance(
        _in_row_order(ours_real), _in_row_order(ours_fake), subsets=5, subset_size=8, seed=3, dtype=np.float32
    )
    assert kid32.mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert kid32.std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-5)
    kid = kernel_distance(
        _in_row_order(ours_real), _in_row_order(ours_fake), subsets=5, subset_size=8, seed=3
    )
    assert kid.mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert kid.mean > 1e-3


def test_fidelity_config_validates() -> None:
    from vgmedgen.model.configbase import build_config

    with pytest.raises(ConfigError, match="reservoir_size"):
        build_config(fidelity.FidelityConfig, {"reservoir_size": 100, "kid_subset_size": 1000})
    with pytest.raises(ConfigError, match="fid"):
        build_config(fidelity.FidelityConfig, {"fid": "maybe"})


def test_missing_inception_weights_message(tmp_path: Path) -> None:
    cfg = fidelity.FidelityConfig(fid="required")
    with pytest.raises(MetricsError) as info:
        fidelity.check_inception_weights(cfg)
    message = str(info.value)
    assert fidelity.WEIGHTS_FIELD in message and "is not set" in message
    assert (
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
        in message
    )
    assert "`evaluate.fidelity.fid=auto`" in message

    missing = tmp_path / "nope.pth"
    optional = fidelity.FidelityConfig(feature_extractor_weights_path=missing)
    assert not fidelity.inception_available(optional)
    warning = fidelity.check_inception_weights(optional)
    assert warning is not None and warning.startswith("FID/KID skipped") and str(missing) in warning
    assert "fid=auto" not in warning  # it is already auto: the warning does not tell the user to set it
    with pytest.raises(MetricsError, match="does not exist"):
        fidelity.check_inception_weights(optional, required=True)
    assert fidelity.check_inception_weights(fidelity.FidelityConfig(fid="off")) is None
    with pytest.raises(MetricsError, match="feature_extractor_weights_path"):
        fidelity.create_inception_extractor(missing)

    present = tmp_path / "weights.pth"
    torch.save({"x": torch.zeros(1)}, present)
    assert (
        fidelity.check_inception_weights(
            fidelity.FidelityConfig(fid="required", feature_extractor_weights_path=present)
        )
        is None
    )
    with pytest.raises(MetricsError, match="does not hold torch-fidelity's Inception"):
        fidelity.create_inception_extractor(present)


class _NotWeights:
    pass


def test_inception_file_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"obj": _NotWeights()}, handle, protocol=2)
    with pytest.raises(MetricsError, match="not a plain PyTorch state dict"):
        fidelity.create_inception_extractor(path)


# ---------------------------------------------------------------------------------------------
# Domain extractor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["classifier", "segmentation"])
def test_domain_distances_equal_torch_fidelity(kind: str, tmp_path: Path) -> None:
    net = build_domain_net(
        domain_net_config("tiny", kind=kind, num_classes=3 if kind == "classifier" else 1, seed=5)
    )
    weights = tmp_path / "domain.safetensors"
    save_domain_net(net, weights)
    real, fake = _images(40, seed=11, size=24), _images(36, seed=12, size=40, shift=0.15)
    theirs = fidelity.torch_fidelity_metrics(
        real,
        fake,
        feature_extractor=fidelity.DOMAIN_EXTRACTOR_NAME,
        weights_path=weights,
        kid_subsets=10,
        kid_subset_size=20,
        seed=4,
        batch_size=16,
        device="cpu",
    )
    extractor = fidelity.create_domain_extractor(net, device="cpu")
    ours_real = _sharded_summary(extractor, real, [0, 1, 17, 40], reservoir_size=100)
    ours_fake = _sharded_summary(extractor, fake, [0, 20, 36], reservoir_size=100)
    assert ours_real.stats.dim == net.feature_dim == 16
    fd = frechet_distance(ours_real.stats, ours_fake.stats)
    assert fd > 1e-3
    assert fd == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    kd = kernel_distance(
        _in_row_order(ours_real),
        _in_row_order(ours_fake),
        subsets=10,
        subset_size=20,
        seed=4,
        dtype=np.float32,
    )
    assert kd.mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)


def test_domain_fd_of_a_set_with_itself_is_zero_and_shards_match_single_pass() -> None:
    net = DomainClassifier(domain_net_config("tiny", num_classes=4))
    extractor = fidelity.create_domain_extractor(net, device="cpu")
    images = _images(60, seed=20)
    # One image per batch on both sides: CPU convolutions round differently at different batch sizes
    # (~1e-8), and this test is about the statistics, not the network.
    single = fidelity.summarise_images(extractor, images, batch_size=1)
    sharded = _sharded_summary(extractor, images, [0, 7, 30, 31, 60], reservoir_size=100, batch_size=1)
    torch.testing.assert_close(
        torch.from_numpy(_in_row_order(sharded)),
        fidelity.extract_features(extractor, images, batch_size=1),
        rtol=0,
        atol=0,
    )
    assert abs(frechet_distance(single.stats, single.stats)) < 1e-9
    np.testing.assert_allclose(sharded.stats.mean, single.stats.mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sharded.stats.cov, single.stats.cov, rtol=1e-9, atol=1e-12)
    other = fidelity.summarise_images(extractor, _images(50, seed=21, shift=0.2), batch_size=16)
    fd_single, fd_sharded = (
        frechet_distance(single.stats, other.stats),
        frechet_distance(sharded.stats, other.stats),
    )
    assert fd_single > 1e-3 and fd_sharded == pytest.approx(fd_single, rel=1e-9)


def test_compute_distances_collects_small_sample_warnings_and_floor() -> None:
    net = DomainClassifier(domain_net_config("tiny", num_classes=3))
    extractor = fidelity.create_domain_extractor(net, device="cpu")
    train = fidelity.summarise_images(
        extractor, _images(50, seed=30), batch_size=25, reservoir_size=50, seed=2
    )
    test = fidelity.summarise_images(
        extractor, _images(30, seed=31), batch_size=25, reservoir_size=50, seed=2
    )
    fake = fidelity.summarise_images(
        extractor, _images(12, seed=32, shift=0.3), batch_size=25, reservoir_size=50, seed=2
    )
    with pytest.warns(SmallSampleWarning):
        result = fidelity.compute_distances(fake, test, kid_subsets=4, kid_subset_size=100, seed=0)
    assert result.kd_subset_size == 12 and result.n_a == 12 and result.n_b == 30
    assert any("subset_size 100" in w for w in result.warnings)
    assert any("singular" in w for w in result.warnings)  # 12 rows for 16-D features
    with pytest.warns(SmallSampleWarning):
        floor = fidelity.distance_floor(train, test, n=12, kid_subsets=4, kid_subset_size=100, seed=0)
    assert floor.n_a == 12
    with pytest.warns(SmallSampleWarning):
        expected = frechet_distance(FeatureStats.from_features(train.reservoir.features[:12]), test.stats)
    assert floor.fd == pytest.approx(expected, rel=1e-12)
    assert result.fd > floor.fd  # shifted images are further from the test set than real train images
    with pytest.raises(MetricsError, match="reservoir_size"):
        fidelity.distance_floor(train, test, n=51)


def test_domain_metric_names_and_extractor_input_checks() -> None:
    assert fidelity.domain_metric_names("ham10000") == ("HFD", "HKD")
    assert fidelity.domain_metric_names("kvasir_seg") == ("KFD", "KKD")
    assert fidelity.domain_metric_names("busi") == ("BFD", "BKD")
    assert fidelity.domain_metric_names("csv") == ("DFD", "DKD")
    extractor = fidelity.create_domain_extractor(DomainClassifier(domain_net_config("tiny")), device="cpu")
    with pytest.raises(MetricsError, match="uint8"):
        fidelity.extract_features(extractor, torch.rand(2, 3, 8, 8))
    with pytest.raises(MetricsError, match="row ids"):
        fidelity.summarise_images(extractor, _images(4, seed=1), row_ids=[0, 1, 2])
    grey = _images(3, seed=2)[:, :1]
    assert fidelity.extract_features(extractor, grey).shape == (3, 16)


# ---------------------------------------------------------------------------------------------
# domain_nets
# ---------------------------------------------------------------------------------------------


def test_domain_nets_are_deterministic_from_seed_and_round_trip(tmp_path: Path) -> None:
    images = _images(5, seed=40, size=50)
    a = DomainClassifier(domain_net_config("tiny", num_classes=3, seed=7)).eval()
    b = DomainClassifier(domain_net_config("tiny", num_classes=3, seed=7)).eval()
    c = DomainClassifier(domain_net_config("tiny", num_classes=3, seed=8)).eval()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.head.weight, c.head.weight)
    x = a.prepare(images)
    assert x.shape == (5, 3, 32, 32) and x.min() >= -1.0 and x.max() <= 1.0
    assert a(x).shape == (5, 3) and a.features(x).shape == (5, 16)
    path = tmp_path / "net.safetensors"
    save_domain_net(a, path)
    loaded = load_domain_net(path)
    assert isinstance(loaded, DomainClassifier) and loaded.config == a.config
    torch.testing.assert_close(loaded.features(x), a.features(x), rtol=0, atol=0)

    seg = SegmentationEncoder(width=8, depth=3, input_size=36, groups=4).eval()
    xs = seg.prepare(images)
    assert seg(xs).shape == (5, 1, 36, 36) and seg.features(xs).shape == (5, 32)


def test_domain_net_config_errors() -> None:
    with pytest.raises(ConfigError, match="num_classes >= 2"):
        DomainClassifier(num_classes=1)
    with pytest.raises(ConfigError, match="Valid presets: demo, paper, tiny"):
        domain_net_config("tiyn")
    with pytest.raises(ConfigError, match="kind='segmentation'"):
        SegmentationEncoder(domain_net_config("tiny"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_domain_net("/nonexistent/net.safetensors")


def test_the_config_names_the_file_torch_fidelity_fetches() -> None:
    """The config module names the weights file without importing torch-fidelity; it must stay its file."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    from vgmedgen.platform.evaluation.config import INCEPTION_WEIGHTS_FILE

    assert URL_INCEPTION_V3.rsplit("/", 1)[-1] == INCEPTION_WEIGHTS_FILE


def test_feature_extraction_reports_progress_in_images(capfd: pytest.CaptureFixture[str]) -> None:
    """Inception on a CPU takes minutes per set: extraction shows a bar counting images on stderr
    (the terminal, and the job log under `ray job submit`); off when asked (inside Ray tasks)."""
    extractor = fidelity.create_domain_extractor(DomainClassifier(domain_net_config("tiny")), device="cpu")
    feats = fidelity.extract_features(extractor, _images(10, seed=1), batch_size=4, desc="domain, generated")
    err = capfd.readouterr().err
    assert feats.shape[0] == 10
    assert "domain, generated" in err and "10/10" in err and "image" in err

    blocks = [_images(6, seed=2), _images(5, seed=3)]  # a set in shards: the total is still known
    fidelity.summarise_images(extractor, blocks, batch_size=4, desc="real train")
    err = capfd.readouterr().err
    assert "real train" in err and "11/11" in err

    fidelity.extract_features(extractor, _images(3, seed=4), batch_size=2, progress=False)
    assert capfd.readouterr().err == ""
