"""The generation job end to end on the tests' Ray: plan -> sampler actors -> scorer actors -> one table,
exactly once across an interrupted run, a finished run rerun as a no-op, and the derived outputs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_model_version import make_text_encoder, make_trained_model  # noqa: E402

from vgmedgen.platform.config import load_experiment  # noqa: E402
from vgmedgen.platform.generation.job import TABLE_DIR, _dedupe, complete_ids, generate_experiment  # noqa: E402
from vgmedgen.platform.runs import DONE  # noqa: E402
from vgmedgen.platform.tracking import Tracker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _table(out_dir: Path):
    return pq.ParquetDataset(out_dir / TABLE_DIR).read(columns=["sample_id", "image", "accepted", "reason"])


def _overrides(output_root: Path, version: Path) -> list[str]:
    return [
        f"output_root={output_root}",
        "data.synthderm.num_records=160",
        "tracking.enabled=false",
        "evaluate.domain_net=tiny",
        "evaluate.domain_train.steps=5",
        "evaluate.domain_train.batch_size=16",
        "evaluate.fidelity.kid_subset_size=4",
        "evaluate.fidelity.kid_subsets=3",
        f"generate.model={version}",
        "generate.policies=[{per_class: {mel: 12, nv: 12}}]",
        "generate.batch_size=2",
        "generate.shard_size=2",
        "generate.filters.min_confidence=0.14",
    ]


def _fd(summary: dict) -> dict[tuple[str, str], float]:
    return {(r["extractor"], r["class"]): r["fd"] for r in summary["distances"] if r.get("fd") is not None}


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_generation_job_is_exactly_once_and_resumes(ray_cluster, output_root: Path, tmp_path: Path) -> None:
    """One undisturbed run with one sampler actor; a finished run rerun writes nothing; the same job as a
    real process with two sampler actors, SIGKILLed mid-way and run again, ends with the same ids, the
    same image bytes and the same FD."""
    import signal

    from jobprocess import JobProcess

    from vgmedgen.platform.images import read_provenance

    model = make_trained_model(make_text_encoder(tmp_path / "bert"), {"sampler": {"num_steps": 2}})
    version = tmp_path / "models" / "v-test"
    model.save_pretrained(version)
    overrides = _overrides(output_root, version)
    # In-process with MLflow on: the model version's training run is known to the store (by its tag), so
    # the generation run becomes its child.
    cfg = load_experiment(REPO / "configs/tiny.yaml", [*overrides, "tracking.enabled=true"])
    tracker = Tracker(cfg.tracking, cfg.root, cfg.name)
    with tracker.open_run("train-of-v-test", "train", tags={"model_version": version.name}) as train_run:
        pass
    first = generate_experiment(cfg)
    table = _table(first.out_dir)
    ids = table.column("sample_id").to_pylist()
    assert first.written == 24 and len(ids) == 24 == len(set(ids))
    rejected = [r for r in table.to_pylist() if not r["accepted"]]
    assert 0 < len(rejected) < 22, "the confidence filter should split this set"
    assert all("confidence" in r["reason"] for r in rejected)
    images = dict(zip(ids, table.column("image").to_pylist()))
    mark = read_provenance(images[ids[0]])
    assert mark["synthetic"] == "true" and mark["kind"] == "image"
    summary = first.summary
    assert summary["rows"] == 24 and summary["accepted"] + summary["rejected"] == 24
    assert (first.out_dir / "summary.json").is_file() and (first.out_dir / "records").is_dir()
    assert _fd(summary)  # FD of the accepted set, from the merged per-file statistics
    gen_run = tracker.client.get_run(tracker.find_run(f"{cfg.name}-generate-{first.plan}"))
    assert gen_run.info.status == "FINISHED" and gen_run.data.tags["mlflow.parentRunId"] == train_run
    assert gen_run.data.params["plan"] == first.plan and gen_run.data.metrics["generate/images"] == 24
    assert gen_run.data.metrics["generate/accepted"] == summary["accepted"]
    logged = {a.path for a in tracker.client.list_artifacts(gen_run.info.run_id, "generation")}
    assert "generation/summary.json" in logged and "generation/contact_sheets" in logged

    # A finished job run again writes nothing.
    again = generate_experiment(cfg)
    assert again.reused and again.written == 0

    # The job as a process with two sampler actors, its driver SIGKILLed once the first file is written.
    args = ["--config", "configs/tiny.yaml", *overrides, "generate.name=killed"]
    args += ["generate.sampler.size=2", "generate.sampler.num_cpus=0.5"]
    killed_dir = first.out_dir.parent / "killed"
    job = JobProcess("generate.py", args)
    job.wait_for(lambda _: any((killed_dir / TABLE_DIR).glob("*.parquet")), timeout_s=300)
    assert job.interrupt(signal.SIGKILL) == -signal.SIGKILL
    assert not (killed_dir / DONE).exists(), f"the job ended before it was killed:\n{job.output()[-2000:]}"
    rerun = JobProcess("generate.py", args)
    assert rerun.process.wait(300) == 0, rerun.output()[-3000:]
    made = re.search(r"(\d+) of 24 images already written; (\d+) to make", rerun.output())
    assert made is not None and int(made.group(2)) > 0, rerun.output()[-3000:]  # it resumed mid-way
    killed = _table(killed_dir)
    got = killed.column("sample_id").to_pylist()
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))  # no gaps, no duplicates
    assert dict(zip(got, killed.column("image").to_pylist())) == images  # bytes equal
    resumed_fd = _fd(json.loads((killed_dir / "summary.json").read_text()))
    assert resumed_fd.keys() == _fd(summary).keys()
    for key, value in _fd(summary).items():  # 1 vs 2 actors, other files: the merge does not care
        assert resumed_fd[key] == pytest.approx(value, rel=1e-3, abs=1e-9), key


def test_unfinished_files_are_dropped_and_duplicated_ids_removed(tmp_path: Path) -> None:
    """What a killed or retried write leaves: a truncated part file (deleted, its rows made again) and a
    row written twice (kept once, from the first file in name order)."""
    import pyarrow as pa

    table_dir = tmp_path / TABLE_DIR
    table_dir.mkdir()
    part = lambda ids: pa.table({"sample_id": ids, "image": [i.encode() for i in ids]})  # noqa: E731
    pq.write_table(part(["a", "b"]), table_dir / "1.parquet")
    pq.write_table(part(["b", "c"]), table_dir / "2.parquet")  # "b" again: a retried write task
    pq.write_table(part(["d", "e"]), table_dir / "3.parquet")
    (table_dir / "3.parquet").write_bytes((table_dir / "3.parquet").read_bytes()[:60])  # killed mid-write
    assert sorted(complete_ids(table_dir)) == ["a", "b", "b", "c"]
    assert not (table_dir / "3.parquet").exists()
    assert _dedupe(table_dir) == 1
    assert sorted(pq.ParquetDataset(table_dir).read().column("sample_id").to_pylist()) == ["a", "b", "c"]
    assert pq.read_table(table_dir / "2.parquet").column("sample_id").to_pylist() == ["c"]
    assert sorted(p.name for p in table_dir.iterdir()) == ["1.parquet", "2.parquet"]  # no temporary left


def test_sets_of_other_jobs_take_their_policies_and_sampler_and_drop_filters(tmp_path: Path) -> None:
    from vgmedgen.model.configbase import ConfigError
    from vgmedgen.model.sampler import SamplerConfig
    from vgmedgen.platform.generation.job import check_plan_sampler, set_config

    cfg = load_experiment(
        REPO / "configs/tiny.yaml",
        [f"output_root={tmp_path}", "generate.name=mine", "generate.filters.min_confidence=0.9"],
    )
    sampler = SamplerConfig(num_steps=5, guidance_anatomy=2.0, guidance_style=3.0)
    gen = set_config(cfg, [{"balance": {}}], seed=7, sampler=sampler, batch_size=10_000).generate
    assert (gen.seed, gen.num_steps, gen.guidance_anatomy, gen.guidance_style) == (7, 5, 2.0, 3.0)
    assert gen.name is None and gen.filters.min_confidence is None and gen.export == "none"
    assert gen.batch_size == gen.shard_size and type(gen.policies[0]).__name__ == "BalancePolicy"
    assert gen.sampler.threads == max(1, os.cpu_count() or 1)
    assert cfg.generate.name == "mine"  # the experiment's own section is left as it was
    check_plan_sampler(sampler, SamplerConfig(), "evaluate.sampler")  # steps and guidance travel in the plan
    with pytest.raises(ConfigError, match="evaluate.sampler sets solver_order"):
        check_plan_sampler(SamplerConfig(solver_order=1), SamplerConfig(), "evaluate.sampler")
