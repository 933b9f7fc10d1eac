"""Sweep files: the shipped ones load, and a bad space fails before any trial starts, naming the path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.tuning.config import load_sweep
from vgmedgen.platform.tuning.space import search_algorithm, tune_space

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_shipped_sweeps_load_with_a_header(path: Path) -> None:
    sweep = load_sweep(path)
    assert sweep.base.name and sweep.config.trials >= 1
    header = {
        line.split(":")[0] for line in path.read_text().splitlines() if line.startswith("# ") and ":" in line
    }
    assert {"# What", "# Command", "# Runtime", "# Result"} <= header


def _write(tmp_path: Path, **fields) -> Path:
    data = {
        "base": str(REPO / "configs" / "tiny.yaml"),
        "space": {"train.dit.lr": {"loguniform": [1e-4, 1e-2]}},
    }
    data.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_space_becomes_tune_distributions_with_inclusive_randint(tmp_path: Path) -> None:
    space = {
        "train.dit.lr": {"loguniform": [1e-4, 1e-2]},
        "train.dit.warmup_steps": {"randint": [0, 3]},
        "model.sampler.guidance_style": {"uniform": [1.0, 5.0]},
        "model.generator.hffm.mode": {"choice": ["separate", "hybrid"]},
    }
    sweep = load_sweep(_write(tmp_path, space=space, search={"algorithm": "random", "seed": 3}))
    tune = tune_space(sweep)
    assert (tune["train.dit.warmup_steps"].lower, tune["train.dit.warmup_steps"].upper) == (0, 4)
    assert tune["train.dit.lr"].lower == 1e-4 and tune["model.generator.hffm.mode"].categories == [
        "separate",
        "hybrid",
    ]
    assert type(search_algorithm(sweep)).__name__ == "BasicVariantGenerator"
    trial = sweep.experiment({"train.dit.lr": 3e-3, "model.generator.hffm.mode": "hybrid"})
    assert trial.train.dit.lr == 3e-3 and trial.model.generator.hffm.mode == "hybrid"
    assert sweep.config.objective.direction == "min"


def test_overrides_of_the_sweep_file_and_of_its_base(tmp_path: Path) -> None:
    sweep = load_sweep(_write(tmp_path, overrides=["train.dit.steps=7"]), ["trials=3"])
    assert sweep.base.train.dit.steps == 7 and sweep.config.trials == 3


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (
            {"space": {"train.dit.lrr": {"uniform": [0.1, 0.2]}}},
            "train.dit.lrr does not exist.*did you mean train.dit.lr",
        ),
        ({"space": {"train.dit.lr.x": {"uniform": [0.1, 0.2]}}}, "train.dit.lr is a value"),
        ({"space": {"train.dit.lr": {"uniform": [0.1, 0.2], "choice": [1]}}}, "exactly one distribution"),
        ({"space": {"train.dit.lr": {"normal": [0, 1]}}}, "normal"),
        ({"space": {"train.dit.lr": {"uniform": [0.2, 0.1]}}}, "low < high"),
        ({"space": {"train.dit.lr": {"loguniform": [0, 0.1]}}}, "positive low bound"),
        ({"space": {"train.dit.lr": {"choice": []}}}, "at least one value"),
        ({"space": {"train.dit.lr": {"choice": [1e-3, -1.0]}}}, "train.dit.lr: the value -1.0 .*refuses"),
        (
            {"space": {"model.generator.hffm.mode": {"choice": ["separate", "fused"]}}},
            "hffm.mode: the value 'fused'",
        ),
        ({"space": {"model.generator.hffm.mode": {"grid": ["separate", "hybrid"]}}}, "Optuna cannot draw"),
        ({"space": {}}, "space"),
        ({"objective": {"metric": "psnr"}}, "unknown objective 'psnr'"),
        ({"objective": {"metric": "kid", "mode": "max"}}, "set mode: min"),
        ({"trails": 4}, "trails"),
    ],
)
def test_bad_sweeps_fail_before_any_trial_naming_the_path(tmp_path: Path, fields: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_sweep(_write(tmp_path, **fields))
