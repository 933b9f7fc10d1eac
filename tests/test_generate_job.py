"""The generation job end to end on the tests' Ray: plan -> sampler actors -> scorer actors -> one table,
exactly once across an interrupted run, a finished run rerun as a no-op, and the derived outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_model_version import make_text_encoder, make_trained_model  # noqa: E402

from vgmedgen.platform.config import load_experiment  # noqa: E402
from vgmedgen.platform.generation.job import TABLE_DIR, complete_ids, generate_experiment  # noqa: E402
from vgmedgen.platform.runs import DONE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _table(out_dir: Path):
    return pq.ParquetDataset(out_dir / TABLE_DIR).read(columns=["sample_id", "image", "accepted", "reason"])


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_generation_job_is_exactly_once_and_resumes(ray_cluster, output_root: Path, tmp_path: Path) -> None:
    model = make_trained_model(make_text_encoder(tmp_path / "bert"), {"sampler": {"num_steps": 2}})
    version = tmp_path / "models" / "v-test"
    model.save_pretrained(version)
    cfg = load_experiment(
        REPO / "configs/tiny.yaml",
        [
            f"output_root={output_root}",
            "data.synthderm.num_records=160",
            "tracking.enabled=false",
            "evaluate.domain_net=tiny",
            "evaluate.domain_train.steps=5",
            "evaluate.domain_train.batch_size=16",
            "evaluate.fidelity.kid_subset_size=4",
            "evaluate.fidelity.kid_subsets=3",
            f"generate.model={version}",
            "generate.policies=[{per_class: {mel: 6, nv: 6}}]",
            "generate.batch_size=4",
            "generate.shard_size=4",
            "generate.filters.min_confidence=0.99",
        ],
    )
    first = generate_experiment(cfg)
    table = _table(first.out_dir)
    ids = table.column("sample_id").to_pylist()
    assert first.written == 12 and len(ids) == 12 == len(set(ids))
    rejected = [r for r in table.to_pylist() if not r["accepted"]]
    assert all("confidence" in r["reason"] for r in rejected)
    images = dict(zip(ids, table.column("image").to_pylist()))
    summary = first.summary
    assert summary["rows"] == 12 and summary["accepted"] + summary["rejected"] == 12
    assert (first.out_dir / "summary.json").is_file() and (first.out_dir / "records").is_dir()

    # A finished job run again writes nothing.
    again = generate_experiment(cfg)
    assert again.reused and again.written == 0

    # An interrupted run: the done-marker never written, one file lost and one truncated mid-write.
    (first.out_dir / DONE).unlink()
    files = sorted((first.out_dir / TABLE_DIR).glob("*.parquet"))
    assert len(files) >= 2
    files[0].unlink()
    files[1].write_bytes(files[1].read_bytes()[:100])
    left = set(complete_ids(first.out_dir / TABLE_DIR))
    assert len(left) < 12 and not files[1].exists()  # the truncated file is removed
    resumed = generate_experiment(cfg)
    assert resumed.written == 12 - len(left)
    table = _table(first.out_dir)
    ids2 = table.column("sample_id").to_pylist()
    assert sorted(ids2) == sorted(ids) and len(ids2) == len(set(ids2))  # no gaps, no duplicates
    assert dict(zip(ids2, table.column("image").to_pylist())) == images  # bytes equal
