"""What the benchmarks compute from their measurements (the measurements themselves are run by hand: see each
benchmark's docstring and the figures it records)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_throughput_layout_report_prints_ratios_and_flops_shares(tmp_path: Path) -> None:
    bench = _benchmark("train_throughput")
    seconds = {"before": [0.5, 0.4, 0.6], "after": [0.3, 0.36, 0.3], "one-worker": [0.5, 0.5, 0.5]}
    report = bench.layout_report(seconds, 4e9, 10e9, cores=2, batch=32, steps=40, records=320)
    rows = {line.split()[0]: line.split() for line in report.splitlines()[2:5]}
    assert rows["before"][1:3] == ["0.500", "1.000"]
    assert rows["after"][1:3] == ["0.300", "0.600"]
    # 4 GFLOP per step in 0.3 s over two cores of 10 GFLOP/s each: 66.7 %.
    assert rows["after"][-1] == "66.7%" and rows["before"][-1] == "40.0%"
    assert "after/before per round: 0.600, 0.900, 0.500; median 0.600 (target <= 0.75)" in report


def test_train_throughput_counts_the_flops_of_a_latent_step(tmp_path: Path) -> None:
    from vgmedgen.platform.config import load_experiment

    bench = _benchmark("train_throughput")
    pixel = load_experiment(REPO / "configs/tiny.yaml", [f"output_root={tmp_path}"])
    latent = load_experiment(
        REPO / "configs/tiny.yaml",
        [
            f"output_root={tmp_path}",
            "model.generator.autoencoder.block_out_channels=[16,32]",
            "model.generator.autoencoder.norm_num_groups=8",
            "model.generator.backbone.sample_size=8",
            "model.generator.backbone.in_channels=4",
        ],
    )
    flops_pixel, flops_latent = bench.step_flops(pixel, 4), bench.step_flops(latent, 4)
    assert flops_pixel > 1e6
    assert flops_latent > flops_pixel  # the autoencoder's encoder (and the colour loss's decoder) count
    assert bench.step_flops(pixel, 8) == pytest.approx(2 * flops_pixel, rel=0.05)
