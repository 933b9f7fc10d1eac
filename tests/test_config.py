"""Experiment configs: every shipped YAML loads; typos, wrong types and bad values fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from vgmedgen.model.configbase import ConfigError, choose_preset
from vgmedgen.platform.config import apply_overrides, load_experiment, resolve_output_root

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_documents_itself(path: Path):
    cfg = load_experiment(path)
    assert cfg.name
    head = path.read_text().splitlines()[0]
    assert head.startswith("# "), f"{path.name} must start with a comment saying what it runs"
    text = path.read_text()
    missing = [field for field in ("Command:", "Runtime:", "Result:") if field not in text]
    assert not missing, f"{path.name}'s header lacks {missing} (what it runs, how, how long, what comes out)"


def test_defaults_are_synthderm(tmp_path: Path):
    cfg = load_experiment(None, [f"output_root={tmp_path}"])
    assert cfg.data.dataset == "synthderm"
    assert cfg.records_dir == tmp_path / "records" / "synthderm-64"


def test_override_changes_nested_field():
    cfg = load_experiment(REPO / "configs/synthderm.yaml", ["data.resolution=32", "data.synthderm.seed=7"])
    assert cfg.data.resolution == 32 and cfg.data.synthderm.seed == 7


def test_typo_names_field_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_experiment(None, ["data.resolutoin=32"])
    msg = str(e.value)
    assert "data.resolutoin" in msg and "Did you mean 'resolution'" in msg and "Valid fields here" in msg


@pytest.mark.parametrize(
    "override", ["model.visual.lr=1e-3", "model.visual.betas=[0.9,0.99]", "model.text.lr=1e-3"]
)
def test_optimiser_settings_of_the_models_are_gone(override: str):
    """The loop optimises with train.<stage>; a model-level lr would be accepted and silently ignored."""
    with pytest.raises(ConfigError) as e:
        load_experiment(REPO / "configs/tiny.yaml", [override])
    assert override.split("=")[0] in str(e.value)


def test_wrong_type_names_path_and_value():
    with pytest.raises(ConfigError) as e:
        load_experiment(None, ["data.resolution=big"])
    assert "data.resolution" in str(e.value) and "'big'" in str(e.value)


def test_unknown_dataset_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_experiment(None, ["data.dataset=ham1000"])
    msg = str(e.value)
    assert "data.dataset" in msg and "ham10000" in msg and "synthderm" in msg


def test_split_must_sum_to_one():
    with pytest.raises(ConfigError, match="must be 1"):
        load_experiment(None, ["data.split.train=0.5"])


def test_real_dataset_needs_root():
    with pytest.raises(ConfigError, match="data.root"):
        load_experiment(None, ["data.dataset=busi"])


def test_missing_config_file_lists_shipped_configs(tmp_path: Path):
    with pytest.raises(ConfigError) as e:
        load_experiment(tmp_path / "nope.yaml")
    assert "does not exist" in str(e.value) and "synthderm.yaml" in str(e.value)


def test_bad_yaml_is_reported(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(bad)


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"name": "x"}, ["name.sub=1"])
    with pytest.raises(ConfigError, match="dotted.path=value"):
        apply_overrides({}, ["no_equals_sign"])


def test_configs_are_frozen():
    cfg = load_experiment(None)
    with pytest.raises(Exception, match="frozen"):
        cfg.data.resolution = 3  # type: ignore[misc]


def test_output_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("VGMEDGEN_OUTPUT_ROOT", raising=False)
    assert resolve_output_root(None) == Path("~/vgmedgen").expanduser()
    monkeypatch.setenv("VGMEDGEN_OUTPUT_ROOT", str(tmp_path / "env"))
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"# c\noutput_root: {tmp_path / 'yaml'}\n")
    assert load_experiment(yaml_file).root == tmp_path / "env"  # environment beats the YAML
    assert (
        load_experiment(yaml_file, [f"output_root={tmp_path / 'cli'}"]).root == tmp_path / "cli"
    )  # CLI beats both
    with pytest.raises(ConfigError, match="absolute"):
        load_experiment(None, ["output_root=relative/dir"])


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        choose_preset({"tiny": 1, "demo": 2}, "dmeo", "model")
    assert "Did you mean 'demo'" in str(e.value) and "demo, tiny" in str(e.value)
