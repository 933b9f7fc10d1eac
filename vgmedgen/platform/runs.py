"""Run identity: the one scheme that names every piece of work the platform may reuse.

A name is ``<what>-<hash of its identity>``, where the identity holds everything that determines the
result and nothing else (not logging cadence, fault drills, tracking or sampler settings). The same
name therefore means the same work: a finished run is reused, an interrupted one resumes, and a
changed setting starts a new one. Every name and fingerprint below is built here, with
:func:`vgmedgen.platform.storage.stable_hash`; nothing else hashes configs into names.

Names:

- stage runs ``<experiment>-<stage>-<hash12>`` (:func:`stage_run_name`), from :func:`stage_identity`;
- evaluation networks ``<net>-<hash12>`` (:func:`net_run_name`): the spec plus its records' part files;
- the train job's MLflow parent run ``<experiment>-job-<hash12>`` (:func:`job_key`);
- model versions, by content (:func:`version_name`), and the built text encoder (:func:`encoder_name`);
- records (:func:`records_key`, and :func:`records_fingerprint` of their part files), low-data subsets (:func:`subset_name`) and the generation scorer's assets (:func:`scorer_assets_name`);
- sweeps ``<sweep>-<hash12>`` (:func:`sweep_key`), from the checked sweep file and its base experiment, and
  their trials ``<sweep key>-trial-<hash12>`` (:func:`trial_name`), from the overrides a trial applies;
- generation plans ``<model id>-plan-<hash12>`` (:func:`plan_name`) and their shards
  ``<plan>-shard-<index>-of-<count>`` (:func:`shard_name`), which sort in index order.

A finished stage run holds a done-marker, ``DONE.json`` (:func:`write_done`, :func:`read_done`),
written last, with its metrics and kept checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgmedgen.platform.storage import stable_hash

if TYPE_CHECKING:
    from vgmedgen.platform.config import ExperimentConfig

__all__ = [
    "DONE",
    "dir_fingerprint",
    "encoder_name",
    "job_key",
    "net_run_name",
    "plan_name",
    "read_done",
    "records_files",
    "records_fingerprint",
    "records_key",
    "shard_name",
    "stage_identity",
    "stage_run_name",
    "scorer_assets_name",
    "subset_name",
    "sweep_key",
    "trial_name",
    "version_name",
    "write_done",
]

DONE = "DONE.json"

# Per-stage settings that do not change what a stage computes (logging cadence, fault drills).
_NOT_IDENTITY = ("log_every", "fail_at_step", "fail_mode", "sample_every")
# The model sections each stage's result depends on. Sampler settings are in none of them.
_MODEL_PARTS = {
    "visual": ("visual",),
    "align": ("visual", "text"),
    "autoencoder": (),  # its own section of the generator's config, alone (stage_identity)
    "dit": ("visual", "text", "generator"),
}
# Sections of the experiment config that change no trained weight: out of the train job's key.
_NOT_TRAINING = {"tracking", "evaluate", "adherence", "serve"}
# Settings of the train section that only guard what may run (a refusal) or how fast it runs, never what it
# computes.
_TRAIN_GUARDS = {"min_mask_fraction", "find_unused_parameters", "cache_conditions"}
# Data settings added after run names were pinned, left out of every identity while at the default that
# reproduces what ran before they existed, so adding one renames no one's records or runs.
_DATA_NEUTRAL_DEFAULTS = {"mask_source": "dataset"}


def _model_identity(model: Any) -> dict[str, Any]:
    """The model section as it enters identities: a generator without a trained autoencoder (the setting
    added after run names were pinned) keeps the names it had."""
    dump = model.model_dump(mode="json")
    if dump["generator"].get("autoencoder") is None:
        dump["generator"].pop("autoencoder", None)
    return dump


def _data_identity(data: Any) -> dict[str, Any]:
    """The data section as it enters identities (records, stages, the job)."""
    dump = data.model_dump(mode="json")
    return {
        k: v for k, v in dump.items() if k not in _DATA_NEUTRAL_DEFAULTS or v != _DATA_NEUTRAL_DEFAULTS[k]
    }


def dir_fingerprint(directory: Path) -> str:
    """A hash of a stage export's manifest (content hashes) or, lacking one, of its file names and sizes."""
    directory = Path(directory)
    manifest = directory / "manifest.json"
    if manifest.is_file():
        return stable_hash(manifest.read_text())
    return stable_hash(
        sorted((str(p.relative_to(directory)), p.stat().st_size) for p in directory.rglob("*") if p.is_file())
    )


def records_files(directories: Iterable[str | Path]) -> list[tuple[str, int]]:
    """The Parquet part files of record directories, as sorted (name, size) pairs per directory, in order."""
    files: list[tuple[str, int]] = []
    for d in directories:
        files += sorted((p.name, p.stat().st_size) for p in Path(d).glob("*.parquet"))
    return files


def records_fingerprint(directories: Iterable[str | Path]) -> str:
    """A hash of the Parquet part files (names and sizes) of record directories: what a model card shows
    as the identity of the records a model was trained on."""
    return stable_hash(records_files(directories), 16)


def stage_identity(
    cfg: ExperimentConfig, stage: str, inputs: Mapping[str, Path] | None = None
) -> dict[str, Any]:
    """Everything that determines a stage's result, and nothing else.

    visual: data + model.visual + train.visual + seed; align adds model.text, train.align and the
    fingerprints of its inputs (the visual export, the text encoder); autoencoder: data +
    model.generator.autoencoder + train.autoencoder + seed; dit adds model.generator, train.dit and its
    inputs (the trained autoencoder among them). Every stage also carries the world size and threads per worker: each rank draws its own
    noise stream and the thread count changes reduction order, so a 1-worker and a 2-worker run differ.
    """
    model = _model_identity(cfg.model)
    stage_cfg = getattr(cfg.train, stage).model_dump(mode="json")
    sc = cfg.train.scaling
    return {
        "stage": stage,
        "data": _data_identity(cfg.data),
        "model": {part: model[part] for part in _MODEL_PARTS[stage]}
        if stage != "autoencoder"
        else {"autoencoder": model["generator"].get("autoencoder")},
        "train": {k: v for k, v in stage_cfg.items() if k not in _NOT_IDENTITY},
        "ingest": cfg.train.ingest,
        "world": {"workers": sc.world_size, "threads_per_worker": sc.threads},
        "seed": cfg.seed,
        "inputs": {k: dir_fingerprint(Path(v)) for k, v in sorted((inputs or {}).items())},
    }


def stage_run_name(cfg: ExperimentConfig, stage: str, inputs: Mapping[str, Path] | None = None) -> str:
    """``<experiment>-<stage>-<hash of its identity>``: the same name exactly when the same work is asked."""
    return f"{cfg.name}-{stage}-{stable_hash(stage_identity(cfg, stage, inputs), 12)}"


def net_run_name(name: str, spec: Mapping[str, Any], records_dirs: Sequence[str | Path]) -> str:
    """``<name>-<hash>`` of an evaluation network: its spec (a JSON dump, optimisation included, logging and
    fault drills left out) and the part files of the records it trains on."""
    data = json.loads(json.dumps(spec))
    data["train"] = {k: v for k, v in data["train"].items() if k not in ("log_every", "fail_at_step")}
    return f"{name}-{stable_hash([data, records_files(records_dirs)], 12)}"


def job_key(cfg: ExperimentConfig) -> str:
    """The train job's MLflow parent-run key: the config without the sections that change no weight
    (scaling is in: it is part of every stage's identity)."""
    dump = cfg.model_dump(mode="json", exclude={**dict.fromkeys(_NOT_TRAINING, True), "train": _TRAIN_GUARDS})
    dump["data"] = _data_identity(cfg.data)
    dump["model"] = _model_identity(cfg.model)
    if cfg.model.generator.autoencoder is None:  # no autoencoder stage: its settings change nothing
        dump["train"].pop("autoencoder")
    return f"{cfg.name}-job-{stable_hash(dump, 12)}"


def version_name(cfg: ExperimentConfig, parts: Mapping[str, Path]) -> str:
    """A model version's name: a hash of its content (each part's manifest and the model config), so a
    retrained part is always a new version and the same parts always the same one, whatever the run names."""
    return stable_hash(
        {
            "parts": {p: dir_fingerprint(parts[p]) for p in ("visual", "text", "generator")},
            "model": _model_identity(cfg.model),
        },
        12,
    )


def encoder_name(cfg: ExperimentConfig, words: Sequence[str]) -> str:
    """The directory name of the small text encoder built from the records' vocabulary."""
    text = cfg.model.text
    key = stable_hash(
        [list(words), text.encoder_hidden, text.encoder_layers, text.encoder_heads, cfg.seed], 12
    )
    return f"{cfg.data.records_name}-{key}"


def records_key(data: Any) -> str:
    """A hash of everything that determines the records (the data section of the config)."""
    return stable_hash(_data_identity(data), 16)


def subset_name(records_dir: str | Path, per_class: int, seed: int) -> str:
    """A low-data subset of a records directory: ``per_class`` train rows per class drawn with ``seed``."""
    files = sorted(p.name for p in Path(records_dir).glob("*.parquet"))
    return f"lowdata-{per_class}-{seed}-{stable_hash(files)}"


def scorer_assets_name(
    domain_net_dir: str | Path,
    records_dir: str | Path,
    reference_split: str,
    inception_weights: str | Path | None,
    reservoir_size: int,
    seed: int,
) -> str:
    """The generation scorer's real-data assets: the domain network, the records' part files, the reference
    split, the Inception weights file and the reservoir settings they are computed from."""
    return stable_hash(
        [
            str(Path(domain_net_dir).resolve()),
            records_fingerprint([records_dir]),
            reference_split,
            None if inception_weights is None else str(Path(inception_weights).resolve()),
            reservoir_size,
            seed,
        ],
        16,
    )


def sweep_key(name: str, identity: Mapping[str, Any]) -> str:
    """A sweep: ``<name>-<hash of its identity>`` (the sweep file's settings and the base experiment it
    resolves to), so the same command continues the same sweep and an edited sweep file starts a new one."""
    return f"{name}-{stable_hash(dict(identity), 12)}"


def trial_name(sweep: str, overrides: Mapping[str, Any]) -> str:
    """A sweep trial: ``<sweep>-trial-<hash of its overrides>`` (dotted config paths -> values; the
    order they are given in does not matter), so a re-submitted sweep finds the trials it has run."""
    if not overrides:
        raise ValueError(f"a trial of sweep {sweep!r} needs at least one override (dotted.path -> value)")
    return f"{sweep}-trial-{stable_hash(dict(overrides), 12)}"


def plan_name(model_version: str, requests: Iterable[Mapping[str, Any]]) -> str:
    """A generation plan: the model version's id (its manifest sha256, first 12) and a hash of every
    request in order, so the same requests from the same model are the same plan and resume."""
    return f"{model_version[:12]}-plan-{stable_hash([dict(r) for r in requests], 12)}"


def shard_name(plan: str, index: int, count: int) -> str:
    """Shard ``index`` of ``count`` of a plan, zero-padded so that names sort in index order."""
    if not 0 <= index < count:
        raise ValueError(f"shard index must lie in [0, {count}), got {index}")
    width = max(5, len(str(count - 1)))
    return f"{plan}-shard-{index:0{width}d}-of-{count:0{width}d}"


def write_done(run_dir: Path, payload: Mapping[str, Any]) -> None:
    """Mark a run finished (written last: a run without it is unfinished and resumes)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / DONE).write_text(json.dumps(payload))


def read_done(run_dir: Path) -> dict[str, Any] | None:
    """The done-marker of a finished run, or None for an unfinished one."""
    path = Path(run_dir) / DONE
    return json.loads(path.read_text()) if path.is_file() else None
