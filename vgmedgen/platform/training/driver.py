"""The train job: prepare records if needed, run the configured stages, assemble the model version, write its
model card and register it."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from vgmedgen.model.vgmedgen import assemble_model_version
from vgmedgen.platform.config import ExperimentConfig
from vgmedgen.platform.modelcard import write_model_card
from vgmedgen.platform.runs import encoder_name, job_key, version_name
from vgmedgen.platform.storage import atomic_directory
from vgmedgen.platform.training.runner import (
    PARTS,
    StageResult,
    check_real_records,
    check_visual_masks,
    run_stage,
)

__all__ = [
    "TrainSummary",
    "assemble_version",
    "ensure_text_encoder",
    "parts_from",
    "stage_inputs",
    "train_experiment",
]

log = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    model_version: Path
    stages: list[StageResult]
    seconds: float
    mlflow_run_id: str | None = None
    registered: str | None = None
    tracking_uri: str | None = None
    artifacts: list[Path] = field(default_factory=list)


def ensure_text_encoder(cfg: ExperimentConfig) -> Path:
    """The text encoder directory: ``model.text.encoder_dir`` when set, else a small random BERT whose
    word-level vocabulary comes from the training records' texts (built once, reused)."""
    from vgmedgen.model.text import build_text_encoder, vocabulary_from_texts
    from vgmedgen.platform.records import read_records

    text = cfg.model.text
    if text.encoder_dir is not None:
        if not Path(text.encoder_dir).is_dir():
            raise FileNotFoundError(
                f"model.text.encoder_dir {text.encoder_dir} does not exist; point it at a local BERT-family encoder "
                "(e.g. Bio_ClinicalBERT) or leave it unset to build a small one from the captions"
            )
        return Path(text.encoder_dir)
    table = read_records(cfg.records_dir, columns=["split", "caption", "anatomy_text", "style_text"])
    texts = [
        t
        for split, *row in zip(
            *(table.column(c).to_pylist() for c in ("split", "caption", "anatomy_text", "style_text"))
        )
        if split == "train"
        for t in row
    ]
    words = vocabulary_from_texts(texts)
    out = cfg.root / "encoders" / encoder_name(cfg, words)
    if not (out / "config.json").is_file():
        with atomic_directory(out) as tmp:
            build_text_encoder(
                words,
                tmp,
                hidden=text.encoder_hidden,
                layers=text.encoder_layers,
                heads=text.encoder_heads,
                seed=cfg.seed,
                max_position=max(text.max_length, 64),
            )
    return out


def assemble_version(cfg: ExperimentConfig, parts: dict[str, Path]) -> Path:
    """The model version of these parts under ``<output_root>/models/<experiment>/``, assembled if new.

    Its name is a hash of its content (each part's manifest of file hashes, and the model config it is
    assembled with), so a retrained part (``--fresh``, a changed stage) is always a new version, and the
    same parts are always the same version, whatever the run names.
    """
    version = version_name(cfg, parts)
    version_dir = cfg.root / "models" / cfg.name / version
    if not (version_dir / "manifest.json").is_file():
        with atomic_directory(version_dir) as tmp:
            for part in ("visual", "text", "generator"):
                shutil.copytree(parts[part], tmp / part)
            assemble_model_version(cfg.model, tmp)
    return version_dir


def stage_inputs(stage: str, parts: dict[str, Path]) -> dict[str, Path]:
    """What ``stage`` consumes of the parts at hand: nothing (visual, autoencoder); the visual export and the
    text encoder (align); the visual and text exports, and the trained autoencoder when there is one (dit)."""
    if stage in ("visual", "autoencoder"):
        return {}
    wanted = ("visual", "text", "autoencoder") if stage == "dit" else ("visual", "text")
    inputs = {k: v for k, v in parts.items() if k in wanted}
    if stage == "align":
        inputs["text_encoder"] = parts["text_encoder"]
    return inputs


def parts_from(directory: Path) -> dict[str, Path]:
    """The parts (visual, text, generator) a model version directory holds."""
    return {
        p: directory / p
        for p in ("visual", "text", "generator")
        if (directory / p / "manifest.json").is_file()
    }


def train_experiment(
    cfg: ExperimentConfig, *, address: str | None = None, fresh: bool = False
) -> TrainSummary:
    """Run ``cfg.train.stages`` and return the assembled model version.

    Args:
        cfg: the experiment.
        address: Ray cluster address (None: ``RAY_ADDRESS`` or a local instance).
        fresh: retrain stages that finished earlier.
    """
    from vgmedgen.platform.cluster import connect
    from vgmedgen.platform.prepare import prepare_records
    from vgmedgen.platform.tracking import Tracker, open_run, resolve_model

    t0 = time.perf_counter()
    cfg.check_trainable()
    if address or cfg.train.scaling.num_workers > 0:
        connect(address)  # an unreachable cluster fails here, before any work
    prepare_records(
        cfg, address=address
    )  # reuses existing records; connects to Ray only when it must build them
    check_real_records(cfg)  # generated rows in the records: refused before any run, encoder or MLflow entry
    # Too few lesion masks fails here, before any MLflow run is opened (run_stage checks again for its callers).
    census = check_visual_masks(cfg) if "visual" in cfg.train.stages else None
    tracker = Tracker(cfg.tracking, cfg.root, cfg.name) if cfg.tracking.enabled else None
    parts: dict[str, Path] = {}
    if cfg.train.init_from:
        parts.update(parts_from(resolve_model(cfg.train.init_from, cfg, tracker=tracker).path))
    parts["text_encoder"] = ensure_text_encoder(cfg)
    # The job's MLflow parent run: one per config (scaling included: it is part of every stage's identity).
    # It ends FINISHED with the job, KILLED if the job is interrupted, FAILED if it raises; a resubmitted
    # job reopens it.
    key = job_key(cfg)
    if tracker is not None and fresh:  # retrained stages make a new model version: a new parent run for it
        tracker.retire(key, f"{key}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    with open_run(tracker, key=key, name=f"{cfg.name}-train", tags={"job": "train"}) as parent:
        if tracker is not None:
            tracker.log_params(parent, cfg.model_dump(mode="json", exclude={"evaluate"}))
            if census is not None:  # what the segmentor learnt from: dataset masks, automatic ones, or none
                from vgmedgen.platform.datasets.masks import mask_line

                tracker.client.set_tag(parent, "lesion_masks", mask_line(census))
        results = []
        for stage in cfg.train_stages:
            inputs = stage_inputs(stage, parts)
            res = run_stage(cfg, stage, inputs, tracker=tracker, parent_run_id=parent, fresh=fresh)
            parts[PARTS[stage]] = res.export_dir
            results.append(res)

        missing = [p for p in ("visual", "text", "generator") if p not in parts]
        if missing:
            raise FileNotFoundError(f"No {', '.join(missing)} part: run those stages or set train.init_from")
        version_dir = assemble_version(cfg, parts)
        version = version_dir.name
        card = write_model_card(version_dir, cfg, results, train_run_id=parent)
        summary = TrainSummary(version_dir, results, time.perf_counter() - t0, parent)
        if tracker is not None:
            summary.tracking_uri = tracker.uri
            client = tracker.client
            client.set_tag(parent, "model_version", version)  # the evaluate job finds this run by it
            logged = {a.path for a in client.list_artifacts(parent)}
            if "model_version" not in logged:
                print(f"[train] logging model version {version} to MLflow ...", flush=True)
                tracker.log_artifacts(parent, version_dir, "model_version")
            summary.registered = (
                f"{tracker.model_name} v{tracker.register(parent, 'model_version')} @{cfg.tracking.alias}"
            )
            # The card names its registry entry; the registered copy gets the card too (it is outside the
            # manifest, so the registered version's files and id are unchanged).
            write_model_card(version_dir, cfg, results, train_run_id=parent, registered=summary.registered)
            tracker.log_artifact(parent, card, "model_version")
    return summary
