"""Experiment configuration: a YAML file in ``configs/`` plus dotted command-line overrides.

An experiment config is one frozen, validated :class:`ExperimentConfig`; each component owns its
own sub-config class (and its defaults). ``load_experiment`` reads the YAML, applies overrides such
as ``data.resolution=32``, validates, and raises one :class:`ConfigError` naming the field path,
the bad value and what is allowed.

Where outputs go: every file the platform writes (records, runs, checkpoints, the MLflow store) is
under one absolute ``output_root``. Precedence: a command-line override ``output_root=...`` >
the ``VGMEDGEN_OUTPUT_ROOT`` environment variable > the YAML value > ``~/vgmedgen``. It is never
relative to the current directory, because ``ray job submit --working-dir .`` runs jobs in a
temporary copy whose files vanish.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from vgmedgen.model.configbase import ConfigError, StrictConfig, build_config
from vgmedgen.model.model_config import ModelConfig
from vgmedgen.platform.datasets.config import ReaderOptions
from vgmedgen.platform.evaluation.config import AdherenceConfig, EvaluateConfig
from vgmedgen.platform.generation.config import GenerateConfig
from vgmedgen.platform.serving.config import ServeConfig
from vgmedgen.platform.training.config import TrainConfig

__all__ = [
    "ConfigError",
    "DATASET_NAMES",
    "ExperimentConfig",
    "PrepareConfig",
    "SplitConfig",
    "SynthDermOptions",
    "apply_overrides",
    "load_experiment",
    "resolve_output_root",
    "experiment_data",
]

OUTPUT_ROOT_ENV = "VGMEDGEN_OUTPUT_ROOT"
DEFAULT_OUTPUT_ROOT = "~/vgmedgen"
DATASET_NAMES = ("synthderm", "ham10000", "kvasir_seg", "busi", "csv")


class TrackingConfig(StrictConfig):
    """Where runs are recorded and under what names."""

    enabled: bool = True
    uri: str | None = Field(
        None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI or sqlite under output_root."
    )
    experiment: str | None = Field(None, description="MLflow experiment name; default the experiment's name.")
    registered_model: str | None = Field(
        None, description="Model Registry name; default vgmedgen-<experiment name>."
    )
    alias: str = Field(
        "current", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$", description="Registry alias of the newest version."
    )

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v.lower() == "latest" or (v[0] in "vV" and v[1:].isdigit()):
            raise ValueError(
                f"MLflow reserves the alias {v!r} ('latest' and v<N>); use e.g. 'current' or 'champion'"
            )
        return v


class SplitConfig(StrictConfig):
    """Fractions of the train/val/test split, made per class and never cutting a group."""

    train: float = Field(0.8, gt=0, lt=1)
    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    use_official: bool = Field(
        True, description="Use the dataset's own split lists where it ships them (Kvasir-SEG)."
    )

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train + val + test must be 1, got {self.train} + {self.val} + {self.test} = {total:g}"
            )
        return self


class SynthDermOptions(StrictConfig):
    """How many SynthDerm records to draw, and from which seed (deterministic from (seed, index))."""

    num_records: int = Field(2000, ge=10, le=10_000_000)
    seed: int = 0


class PrepareConfig(StrictConfig):
    """The ``data`` section: which dataset to prepare into records, and how."""

    dataset: Literal["synthderm", "ham10000", "kvasir_seg", "busi", "csv"] = "synthderm"
    root: Path | None = Field(
        None, description="Raw dataset directory in its public layout (not for synthderm)."
    )
    name: str | None = Field(
        None,
        description="Records directory name under <output_root>/records; default <dataset>-<resolution>.",
    )
    resolution: int = Field(64, ge=8, le=4096)
    resize: Literal["center_crop", "pad", "stretch"] = "center_crop"
    synthderm: SynthDermOptions = SynthDermOptions()
    reader: ReaderOptions = ReaderOptions()
    split: SplitConfig = SplitConfig()
    near_duplicate_distance: int = Field(
        6,
        ge=0,
        le=64,
        description="BUSI: images whose 64-bit perceptual hashes differ in at most this many bits share a group.",
    )
    mask_source: Literal["dataset", "auto"] = Field(
        "dataset",
        description="dataset: lesion masks only from the dataset's own files (records without one get a null mask, "
        "which the prepare job reports); auto: an image without a mask gets an automatic one (Otsu threshold of "
        "its colour distance to the skin, morphology, largest component: a dermoscopy baseline), labelled "
        "attributes.mask_source='auto:otsu' in its record, so its prompt states size and position.",
    )
    strict: bool = Field(
        False, description="Fail on the first corrupt image or mask instead of skipping and counting it."
    )
    items_per_task: int = Field(256, ge=1, description="Images per Ray Data task (and per Parquet file).")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v.startswith(".")):
            raise ValueError("must be a plain directory name (no '/', not starting with '.')")
        return v

    @model_validator(mode="after")
    def _root_for_real_data(self) -> PrepareConfig:
        if self.dataset not in ("synthderm", "csv") and self.root is None:
            raise ValueError(f"dataset '{self.dataset}' needs data.root: the directory of its public release")
        if self.dataset == "csv" and self.reader.csv_file is None:
            raise ValueError(
                "dataset 'csv' needs data.reader.csv_file: a CSV with columns image,label[,mask,caption,group]"
            )
        return self

    @property
    def records_name(self) -> str:
        return self.name or f"{self.dataset}-{self.resolution}"


class ExperimentConfig(StrictConfig):
    """One experiment: what data, what model, how to train and where to write."""

    name: str = Field("vgmedgen", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    output_root: Path | None = None
    seed: int = 0
    data: PrepareConfig = PrepareConfig()
    model: ModelConfig = Field(default_factory=lambda: ModelConfig.model_validate({"preset": "tiny"}))
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    # The demo's swap-grid adherence check; like evaluate and tracking, in no training identity.
    adherence: AdherenceConfig = AdherenceConfig()
    # The generation job (jobs/generate.py); in no training identity.
    generate: GenerateConfig = GenerateConfig()
    # The Serve application (jobs/serve.py, infra/serve.yaml); in no training identity.
    serve: ServeConfig = ServeConfig()

    def check_trainable(self) -> None:
        """Raise :class:`ConfigError` unless the records' resolution is the model's image size."""
        if self.model.image_size != self.data.resolution:
            raise ConfigError(
                f"model preset '{self.model.preset}' generates {self.model.image_size}x{self.model.image_size} images "
                f"but data.resolution is {self.data.resolution}; set data.resolution={self.model.image_size} "
                "(or change model.generator.backbone.sample_size)"
            )

    @model_validator(mode="after")
    def _autoencoder_stage_has_an_autoencoder(self) -> ExperimentConfig:
        if "autoencoder" in self.train.stages and self.model.generator.autoencoder is None:
            raise ValueError(
                "train.stages names 'autoencoder', but model.generator.autoencoder is not set: the stage trains "
                "the autoencoder whose latents the generator diffuses. Set model.generator.autoencoder (e.g. {}) "
                "or leave the stage out"
            )
        return self

    @property
    def train_stages(self) -> tuple[str, ...]:
        """The stages the train job runs: ``train.stages``, with the autoencoder stage before dit when the
        generator diffuses the latents of an autoencoder trained on the dataset (``model.generator.autoencoder``)."""
        stages = tuple(self.train.stages)
        if self.model.generator.autoencoder is not None and "dit" in stages and "autoencoder" not in stages:
            i = stages.index("dit")
            stages = (*stages[:i], "autoencoder", *stages[i:])
        return stages

    @property
    def root(self) -> Path:
        """The absolute output root this experiment writes under."""
        return resolve_output_root(self.output_root)

    @property
    def records_dir(self) -> Path:
        return self.root / "records" / self.data.records_name

    @property
    def evaluation_storage(self) -> Path:
        """Where the networks that measure this dataset's images live (the domain network, the judges, the
        adherence ruler): trained once per records set, shared by the evaluate job, the demo, the generation
        scorer and sweeps."""
        return self.root / "evaluation" / self.data.records_name


def resolve_output_root(configured: Path | str | None) -> Path:
    """The absolute output root: the configured value, else ``$VGMEDGEN_OUTPUT_ROOT``, else ``~/vgmedgen``."""
    value = (
        str(configured) if configured is not None else os.environ.get(OUTPUT_ROOT_ENV) or DEFAULT_OUTPUT_ROOT
    )
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise ConfigError(
            f"output_root must be an absolute path (or start with ~), got {value!r}: jobs under "
            "`ray job submit --working-dir .` run in a temporary copy of the directory, so relative outputs would vanish."
        )
    return path


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"Override {text!r} is not of the form dotted.path=value (e.g. data.resolution=32)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"Override {text!r} has an empty path component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted ``path=value`` overrides applied (values parsed as YAML)."""
    result: dict[str, Any] = _deep_copy(data)
    for text in overrides:
        parts, value = _parse_override(text)
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"Override {text!r}: {'.'.join(parts[: i + 1])} is a value ({child!r}), not a section"
                )
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        configs = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
        listing = f" Configs shipped in configs/: {', '.join(configs)}" if configs else ""
        raise ConfigError(f"Config file {path} does not exist.{listing}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file {path} must hold a mapping at the top level, got {type(data).__name__}"
        )
    return data


def experiment_data(path: str | Path | None, overrides: Sequence[str]) -> dict[str, Any]:
    """An experiment's raw data: the YAML file (or nothing) with ``overrides`` applied and the output root's
    precedence (an ``output_root=`` override > ``$VGMEDGEN_OUTPUT_ROOT`` > the YAML value)."""
    data = read_yaml(path) if path is not None else {}
    explicit_root = any(o.split("=", 1)[0].strip() == "output_root" for o in overrides)
    data = apply_overrides(data, overrides)
    if not explicit_root and os.environ.get(OUTPUT_ROOT_ENV):
        data["output_root"] = os.environ[OUTPUT_ROOT_ENV]
    return data


def load_experiment(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load and validate an experiment from a YAML file (or defaults when ``path`` is None) plus overrides.

    Args:
        path: a YAML file, e.g. ``configs/demo.yaml``.
        overrides: dotted ``path=value`` strings, e.g. ``["data.resolution=32"]``.

    Raises:
        ConfigError: naming the file or field path, the bad value and what is allowed.
    """
    data = experiment_data(path, overrides)
    cfg = build_config(ExperimentConfig, data, where=str(path) if path else "")
    resolve_output_root(cfg.output_root)  # an output root that is not absolute fails here, at load time
    return cfg
