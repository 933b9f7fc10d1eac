"""The model card of a model version: Hugging Face's format, its facts, measurements that update it, and
the manifest kept honest (the card lies outside the hashes; the version's id does not move)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from huggingface_hub import ModelCard  # noqa: E402
from test_model_version import make_text_encoder, make_trained_model  # noqa: E402

from vgmedgen.model.pipeline import VGMedGenPipeline  # noqa: E402
from vgmedgen.model.vgmedgen import MODEL_CARD, ModelVersionError, verify_manifest  # noqa: E402
from vgmedgen.platform.config import load_experiment  # noqa: E402
from vgmedgen.platform.datasets.synthderm import synthderm_record  # noqa: E402
from vgmedgen.platform.modelcard import read_model_card, record_measurements, write_model_card  # noqa: E402
from vgmedgen.platform.records import records_to_table, write_records_manifest  # noqa: E402
from vgmedgen.platform.runs import records_fingerprint, records_key  # noqa: E402
from vgmedgen.platform.storage import file_digest  # noqa: E402
from vgmedgen.platform.training.runner import StageResult  # noqa: E402


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = make_trained_model(
        make_text_encoder(tmp_path_factory.mktemp("bert")), {"sampler": {"num_steps": 1}}
    )
    directory = tmp_path_factory.mktemp("models") / "v0123456789a"
    model.save_pretrained(directory)
    return directory


@pytest.fixture()
def cfg(tmp_path: Path):
    cfg = load_experiment(None, [f"output_root={tmp_path}", "name=cardtest", "data.resolution=16", "seed=7"])
    rows = [synthderm_record(0, i, 16) for i in range(8)]
    groups = sorted({r["group"] for r in rows})  # whole groups go to one split
    split_of = {g: ("train", "train", "val", "test")[k % 4] for k, g in enumerate(groups)}
    rows = [{**r, "split": split_of[r["group"]]} for r in rows]
    cfg.records_dir.mkdir(parents=True)
    pq.write_table(records_to_table(rows), cfg.records_dir / "part-00000.parquet")
    counts = {"train": {"a": 3, "b": 1}, "val": {"a": 2}, "test": {"b": 2}}
    write_records_manifest(
        cfg.records_dir, {"config_hash": records_key(cfg.data), "summary": {"counts": counts}}
    )
    return cfg


def _front_matter(path: Path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_carries_data_config_stages_metrics_and_use(version: Path, cfg, tmp_path: Path) -> None:
    work = tmp_path / version.name
    shutil.copytree(version, work)
    model_id = file_digest(work / "manifest.json")
    stages = [
        StageResult("visual", "cardtest-visual-aaaaaaaaaaaa", tmp_path, True, {"loss": 0.25}, "run-visual"),
        StageResult("align", "cardtest-align-bbbbbbbbbbbb", tmp_path, True, {"loss": 0.5}, "run-align"),
        StageResult("dit", "cardtest-dit-cccccccccccc", tmp_path, True, {"loss": 0.125}, "run-dit"),
    ]
    path = write_model_card(
        work, cfg, stages, train_run_id="run-parent", registered="vgmedgen-cardtest v1 @current"
    )
    assert path == work / MODEL_CARD

    meta = _front_matter(path)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "text-to-image" and "medical-imaging" in meta["tags"]
    assert meta["datasets"] == ["synthderm"] and "model-index" not in meta  # nothing measured yet
    card = read_model_card(work)
    assert isinstance(card, ModelCard) and card.data.vgmedgen["model_id"] == model_id
    text = card.text
    for expected in (
        f"`{model_id}`",
        "records `synthderm-16` at 16 px; rows per split: train 4, val 2, test 2",
        f"data config hash `{records_key(cfg.data)}`, part files `{records_fingerprint([cfg.records_dir])}`",
        '"preset": "tiny"',  # the config
        "| `align` | `cardtest-align-bbbbbbbbbbbb` | `run-align` | loss 0.5 |",
        "`vgmedgen-cardtest v1 @current`",
        "Not measured yet",
        "not for diagnosis",
        "rendered by this project's own code (Apache-2.0)",
        "DiffusionPipeline.from_pretrained",
    ):
        assert expected in text, expected

    # Measurements update the card; the version's files, and so its id, do not change.
    record_measurements(
        work,
        "adherence",
        {"adherence/synthderm/size": 0.75, "adherence/synthderm/n": 16.0, "skipped": float("nan")},
        dataset="synthderm",
        records="synthderm-16",
        source="jobs/demo.py (swap grid, 4 seeds per cell, read by the ruler)",
    )
    record_measurements(
        work,
        "evaluation",
        {"eval/HFD": 12.5},
        dataset="synthderm",
        records="synthderm-16",
        split="test",
        source="jobs/evaluate.py",
        files={"report": "/x/report.md"},
    )
    assert verify_manifest(work) and file_digest(work / "manifest.json") == model_id
    meta = _front_matter(path)
    metrics = {m["type"]: m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    assert metrics == {"adherence/synthderm/size": 0.75, "adherence/synthderm/n": 16.0, "eval/HFD": 12.5}
    text = read_model_card(work).text
    assert "| `adherence/synthderm/size` | 0.75 |" in text and "| `eval/HFD` | 12.5 |" in text
    assert "`synthderm-16`, test split" in text and "Not measured yet" not in text
    # Regenerating the card (the train job run again) keeps the measurements and the stages' MLflow runs.
    reused = [StageResult(s.stage, s.run_name, s.export_dir, False, s.metrics, None) for s in stages]
    write_model_card(work, cfg, reused)
    card = read_model_card(work)
    assert "| `eval/HFD` | 12.5 |" in card.text and "`run-align`" in card.text and "`run-parent`" in card.text
    # The card is documentation: the pipeline loads the version as before, with the card beside it.
    assert VGMedGenPipeline.from_pretrained(work).model.config.preset == "tiny"


def test_measurements_on_a_version_without_a_card_start_one(version: Path, tmp_path: Path) -> None:
    work = tmp_path / "old"
    shutil.copytree(version, work)
    (work / MODEL_CARD).unlink(missing_ok=True)
    with pytest.raises(ModelVersionError, match="has no MODEL_CARD.md"):
        read_model_card(work)
    record_measurements(
        work, "evaluation", {"eval/FID": 3.0}, dataset="ham10000", records="ham10000-64", source="t"
    )
    text = read_model_card(work).text
    assert "Not recorded: this version was assembled before model cards were written." in text
    assert "| `eval/FID` | 3 |" in text
    assert _front_matter(work / MODEL_CARD)["license"] == "other"  # no training data known


def test_card_says_where_the_lesion_masks_came_from(version: Path, cfg, tmp_path: Path) -> None:
    """Automatic masks and missing ones are labelled as such on the card (counted from the records when
    the prepare manifest predates the mask census)."""
    import json

    table = pq.read_table(cfg.records_dir / "part-00000.parquet")
    rows = table.to_pylist()
    train = [i for i, r in enumerate(rows) if r["split"] == "train"]
    for i in train[:2]:  # two automatic masks in train
        rows[i]["attributes"] = json.dumps({**json.loads(rows[i]["attributes"]), "mask_source": "auto:otsu"})
    rows[train[2]]["mask"] = None  # one train record without a mask
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), cfg.records_dir / "part-00000.parquet")
    work = tmp_path / version.name
    shutil.copytree(version, work)
    text = read_model_card(Path(write_model_card(work, cfg, [])).parent).text
    assert "Lesion masks: 7 of 8 records (train 4/5, val 2/2, test 1/1); from auto:otsu 2; dataset 5." in text
    assert "2 of those masks are automatic (`auto:otsu`" in text
    assert "1 record has no mask" in text
