"""The model card of a model version: ``MODEL_CARD.md``, in Hugging Face's conventions.

YAML front matter (licence, tags, ``library_name``, ``pipeline_tag``, ``datasets`` and the measured
metrics as ``model-index``) written through ``huggingface_hub``'s :class:`~huggingface_hub.ModelCard`,
then sections: the data and its records fingerprint, the model config, the training stages and their
runs, the measured metrics, intended use and limits, and the licence of the training data.

The card is rendered from facts kept in its own front matter (under ``vgmedgen``), so it can always be
regenerated: the train job writes it when it assembles or reuses a version (keeping measurements
already recorded), and the demo and evaluate jobs add their measurements with
:func:`record_measurements`. It lies outside the version's manifest (see
:data:`vgmedgen.model.vgmedgen.MODEL_CARD`): the version's id (the sha256 of ``manifest.json``)
stays that of its weights and config while the card grows, and the card names that id, so a card
copied beside other weights is seen to describe another version.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from vgmedgen.model.vgmedgen import MODEL_CARD, ModelVersionError
from vgmedgen.platform.datasets.masks import AUTO_MASK_SOURCE, NO_MASK, mask_line, records_mask_census
from vgmedgen.platform.records import read_records, read_records_manifest
from vgmedgen.platform.runs import records_fingerprint
from vgmedgen.platform.storage import file_digest

if TYPE_CHECKING:
    from vgmedgen.platform.config import ExperimentConfig
    from vgmedgen.platform.training.runner import StageResult

__all__ = ["DATA_LICENCES", "card_facts", "read_model_card", "record_measurements", "write_model_card"]

# dataset -> (licence id for the front matter, or None when unknown; what the terms say).
DATA_LICENCES: dict[str, tuple[str | None, str]] = {
    "synthderm": (
        "apache-2.0",
        "SynthDerm is rendered by this project's own code (Apache-2.0); it holds no patient data.",
    ),
    "ham10000": (
        "cc-by-nc-4.0",
        "HAM10000 (Tschandl et al., 2018) is released under CC BY-NC 4.0: attribution, non-commercial use "
        "only. A model trained on it inherits that restriction.",
    ),
    "kvasir_seg": (
        "other",
        "Kvasir-SEG (Jha et al., 2020) may be used for research and educational purposes only; any other "
        "use needs the authors' permission. A model trained on it inherits that restriction.",
    ),
    "busi": (
        None,
        "BUSI (Al-Dhabyani et al., 2020): check the terms of the copy the records were made from.",
    ),
    "csv": (None, "A user's own dataset (data.dataset=csv): its licence is whatever its owner granted."),
}

_INTENDED_USE = """\
This model generates synthetic medical images with pseudo-masks from anatomy and style prompts, for
**research on data augmentation**: enlarging or rebalancing the training sets of segmentation and
classification models, and studying how controllable such generation is.

It is **not for diagnosis**, clinical decision making, or any use on patients, and its images must never
be presented as real patient images. The images the platform's jobs write carry their provenance (model
version id, seed, prompts) in PNG text chunks and are marked synthetic; keep those marks.

Limits:

- It reproduces the training data's distribution, biases and gaps (devices, sites, skin tones, classes);
  rare findings may be rendered poorly or not at all.
- Prompts are followed only as far as the measured adherence and controllability (Metrics) show; a pseudo-mask
  is the model's own segmentation, not a ground truth.
- The metrics were measured at the resolution and with the instruments named beside them; they do not
  transfer to other datasets or sizes.
"""


def _data_facts(cfg: ExperimentConfig) -> dict[str, Any]:
    """The training records: dataset, name, identity (config hash and part files) and rows per split."""
    records = cfg.records_dir
    manifest = read_records_manifest(records) or {}
    counts = (manifest.get("summary") or {}).get("counts")
    if counts is None:  # records written without prepare's manifest (e.g. by hand): count them
        splits = read_records(records, columns=["split"]).column("split").to_pylist()
        counts = {s: {"all": splits.count(s)} for s in ("train", "val", "test")}
    licence, terms = DATA_LICENCES.get(cfg.data.dataset, (None, "unknown"))
    masks = (manifest.get("summary") or {}).get("masks") or records_mask_census(records)
    return {
        "dataset": cfg.data.dataset,
        "records": cfg.data.records_name,
        "resolution": cfg.data.resolution,
        "records_config_hash": manifest.get("config_hash"),
        "records_files_fingerprint": records_fingerprint([records]),
        "rows_per_split": {s: int(sum(c.values())) for s, c in counts.items()},
        "licence": licence,
        "licence_terms": terms,
        "lesion_masks": masks,
    }


def _stage_facts(stages: Sequence[StageResult], earlier: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each stage's run, its MLflow run and final metrics; what a job that reused a finished stage does
    not know (its MLflow run) is kept from the card's earlier facts about the same run."""
    known = {s["run"]: s for s in earlier}
    out = []
    for s in stages:
        old = known.get(s.run_name, {})
        out.append(
            {
                "stage": s.stage,
                "run": s.run_name,
                "mlflow_run_id": s.mlflow_run_id or old.get("mlflow_run_id"),
                "metrics": {k: float(v) for k, v in sorted(s.metrics.items())} or old.get("metrics", {}),
            }
        )
    return out


def card_facts(version_dir: Path) -> dict[str, Any]:
    """The facts of an existing card (its ``vgmedgen`` front matter), or {} when the version has no card."""
    path = Path(version_dir) / MODEL_CARD
    if not path.is_file():
        return {}
    facts = ModelCard.load(path).data.to_dict().get("vgmedgen") or {}
    return dict(facts)


def read_model_card(version_dir: Path) -> ModelCard:
    """The model card of a version (raises :class:`ModelVersionError` when it has none)."""
    path = Path(version_dir) / MODEL_CARD
    if not path.is_file():
        raise ModelVersionError(
            f"{version_dir} has no {MODEL_CARD}; the train job writes it when it assembles a version"
        )
    return ModelCard.load(path)


def write_model_card(
    version_dir: Path,
    cfg: ExperimentConfig,
    stages: Sequence[StageResult],
    *,
    train_run_id: str | None = None,
    registered: str | None = None,
) -> Path:
    """Write (or regenerate) the card of the version in ``version_dir``, trained by ``cfg`` in ``stages``.

    Args:
        version_dir: the assembled model version.
        cfg: the experiment that trained it (its data section names the training records).
        stages: the train job's stage results (run names, MLflow runs, final metrics).
        train_run_id: the train job's MLflow parent run.
        registered: its name in the MLflow registry (``<name> v<N> @<alias>``), when registered.

    Measurements already on the card of this same version (same id) are kept; so are the MLflow runs
    of stages this job found finished.
    """
    version_dir = Path(version_dir)
    model_id = file_digest(version_dir / "manifest.json")
    old = card_facts(version_dir)
    if old.get("model_id") != model_id:
        old = {}
    facts = {
        "model_id": model_id,
        "version": version_dir.name,
        "experiment": cfg.name,
        "seed": cfg.seed,
        "train_run_id": train_run_id or old.get("train_run_id"),
        "registered": registered or old.get("registered"),
        "data": _data_facts(cfg),
        "stages": _stage_facts(stages, old.get("stages") or []),
        "measurements": old.get("measurements") or {},
    }
    return _save(version_dir, facts)


def record_measurements(
    version_dir: Path,
    kind: str,
    metrics: Mapping[str, float],
    *,
    dataset: str,
    records: str,
    split: str | None = None,
    source: str,
    files: Mapping[str, str] | None = None,
) -> Path:
    """Add (or replace) one kind of measurement on the card of ``version_dir`` and regenerate it.

    Args:
        version_dir: the model version.
        kind: ``adherence`` (the demo's swap grid) or ``evaluation`` (the evaluate job); a later
            measurement of the same kind replaces the earlier one.
        metrics: name -> value, named as in MLflow; non-finite values are left out.
        dataset: the dataset the measurement used (``synthderm``, ``ham10000``, ...).
        records: the name of its records.
        split: the real split compared against, if any.
        source: what measured it (job and settings), one line.
        files: name -> path of reports written beside (shown on the card).
    """
    import math

    version_dir = Path(version_dir)
    facts = card_facts(version_dir)
    model_id = file_digest(version_dir / "manifest.json")
    if not facts or facts.get("model_id") != model_id:
        # No card (a version assembled before cards existed) or one of another version: start afresh.
        facts = {"model_id": model_id, "version": version_dir.name, "measurements": {}}
    facts.setdefault("measurements", {})[kind] = {
        "dataset": dataset,
        "records": records,
        "split": split,
        "source": source,
        "metrics": {k: float(v) for k, v in sorted(metrics.items()) if math.isfinite(float(v))},
        "files": {k: str(v) for k, v in sorted((files or {}).items())},
    }
    return _save(version_dir, facts)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _eval_results(facts: Mapping[str, Any]) -> list[EvalResult]:
    """Every measured metric as a ``model-index`` entry (the Hub shows them as the card's results)."""
    out = []
    for kind, m in sorted(facts.get("measurements", {}).items()):
        for name, value in m["metrics"].items():
            out.append(
                EvalResult(
                    task_type="text-to-image",
                    task_name=kind,
                    dataset_type=m["dataset"],
                    dataset_name=m["records"],
                    dataset_split=m.get("split"),
                    metric_type=name,
                    metric_name=name,
                    metric_value=value,
                )
            )
    return out


def _card_data(facts: Mapping[str, Any]) -> ModelCardData:
    data = facts.get("data") or {}
    licence = data.get("licence") or "other"
    tags = [
        "vgmedgen",
        "medical-imaging",
        "text-to-image",
        "diffusion",
        "synthetic-data",
        "data-augmentation",
    ]
    if data.get("dataset"):
        tags.append(data["dataset"])
    extra: dict[str, Any] = {}
    if licence == "other":
        extra["license_name"] = "training-data-terms"
    results = _eval_results(facts)
    return ModelCardData(
        license=licence,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=tags,
        datasets=[data["dataset"]] if data.get("dataset") else None,
        model_name=f"vgmedgen-{facts['version']}",
        eval_results=results or None,
        vgmedgen=dict(facts),
        **extra,
    )


def _mask_lines(census: Mapping[str, Mapping[str, int]] | None) -> list[str]:
    """The card's lines on where the records' lesion masks came from (none for cards written before)."""
    if not census:
        return []
    lines = [f"- {mask_line(census)}."]
    auto = sum(c.get(AUTO_MASK_SOURCE, 0) for c in census.values())
    if auto:
        lines.append(
            f"- {auto} of those masks are automatic (`{AUTO_MASK_SOURCE}`: Otsu thresholding at prepare time), not "
            "expert annotations: the segmentor learnt from them and the anatomy prompts were measured on them."
        )
    missing = sum(c.get(NO_MASK, 0) for c in census.values())
    if missing:
        lines.append(
            f"- {missing} {'record has' if missing == 1 else 'records have'} no mask: their prompts carry no size or position, and they gave stage 1 "
            "no segmentation supervision."
        )
    return lines


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _body(version_dir: Path, facts: Mapping[str, Any]) -> str:
    version = facts["version"]
    config = json.loads((version_dir / "model_config.json").read_text())
    data = facts.get("data")
    parts = [
        f"# VG-MedGen model version `{version}`",
        "",
        f"A VG-MedGen model (visual priors, text disentangler, HFFM generator), preset `{config.get('preset')}`"
        + (
            f", trained by experiment `{facts['experiment']}` (seed {facts['seed']})."
            if "experiment" in facts
            else "."
        ),
        "",
        f"- Model id: `{facts['model_id']}` (the sha256 of `manifest.json`, which holds the sha256 of every "
        "file of the version; this card lies outside it and may be updated as the version is measured).",
    ]
    if facts.get("train_run_id"):
        parts.append(f"- MLflow run of the train job: `{facts['train_run_id']}`.")
    if facts.get("registered"):
        parts.append(f"- Registered as `{facts['registered']}` in the MLflow Model Registry.")
    parts += [
        "",
        "## How to use",
        "",
        "```python",
        "from vgmedgen.model.pipeline import VGMedGenPipeline",
        f'pipe = VGMedGenPipeline.from_pretrained("path/to/{version}")  # content hashes checked',
        "# or, with diffusers' own loader (it runs vgmedgen_pipeline.py, one import of the installed vgmedgen):",
        "# from diffusers import DiffusionPipeline",
        f'# pipe = DiffusionPipeline.from_pretrained("path/to/{version}", trust_remote_code=True)',
        'out = pipe(anatomy_prompt="a small round lesion in the upper left", style_prompt="dark brown", seed=0)',
        "out.images[0].save('0.png'); out.masks[0].save('0_mask.png')",
        "```",
        "",
        "## Training data",
        "",
    ]
    if data:
        rows = data["rows_per_split"]
        parts += [
            f"- Dataset: `{data['dataset']}`, records `{data['records']}` at {data['resolution']} px; rows per split: "
            + ", ".join(f"{s} {n}" for s, n in rows.items())
            + ".",
            f"- Records fingerprint: data config hash `{data['records_config_hash']}`, part files "
            f"`{data['records_files_fingerprint']}` (names and sizes of the Parquet parts).",
            *_mask_lines(data.get("lesion_masks")),
            "",
            "### Licence of the training data",
            "",
            data["licence_terms"],
        ]
    else:
        parts.append("Not recorded: this version was assembled before model cards were written.")
    parts += [
        "",
        "## Config",
        "",
        "<details><summary>The resolved model config (<code>model_config.json</code>)</summary>",
    ]
    parts += ["", "```json", json.dumps(config, indent=2, sort_keys=True), "```", "", "</details>", ""]
    stages = facts.get("stages")
    if stages:
        parts += ["## Training stages and runs", ""]
        rows_ = [
            [
                f"`{s['stage']}`",
                f"`{s['run']}`",
                f"`{s['mlflow_run_id']}`" if s["mlflow_run_id"] else "-",
                ", ".join(f"{k} {v:.4g}" for k, v in s["metrics"].items()) or "-",
            ]
            for s in stages
        ]
        parts += [
            "Each stage is a run under `<output_root>/runs/<run>/` (its name is a hash of everything that "
            "determines its result).",
            "",
            _table(rows_, ["stage", "run", "MLflow run", "final metrics"]),
            "",
        ]
    parts += ["## Metrics", ""]
    measurements = facts.get("measurements") or {}
    if not measurements:
        parts += [
            "Not measured yet: `jobs/demo.py` adds the swap-grid adherence, `jobs/evaluate.py` the evaluation.",
            "",
        ]
    for kind, m in sorted(measurements.items()):
        where = f"`{m['records']}`" + (f", {m['split']} split" if m.get("split") else "")
        parts += [f"### {kind.capitalize()}", "", f"Measured by {m['source']} on {where}.", ""]
        parts += [_table([[f"`{k}`", f"{v:.4g}"] for k, v in m["metrics"].items()], ["metric", "value"]), ""]
        if m.get("files"):
            parts += ["Reports: " + ", ".join(f"{k} `{v}`" for k, v in m["files"].items()), ""]
    parts += ["## Intended use and limits", "", _INTENDED_USE]
    return "\n".join(parts)


def _save(version_dir: Path, facts: Mapping[str, Any]) -> Path:
    if not (version_dir / "model_config.json").is_file():
        raise ModelVersionError(f"{version_dir} is not a model version (model_config.json is missing)")
    card = ModelCard(f"---\n{_card_data(facts).to_yaml()}\n---\n\n{_body(version_dir, facts)}")
    path = version_dir / MODEL_CARD
    card.save(path)
    return path
