"""The downstream augmentation benchmark: a classifier (or segmenter) on real data versus real plus synthetic.

For every plan (``balance``: fill each class up to the largest; ``x0.5``/``x1``/``x2``: add that
multiple of each class of the real train split) the generation pipeline (the ``balance`` and
``multiply`` policies of :mod:`vgmedgen.platform.generation.plan`) makes synthetic rows from prompts of
*training* records only (the row's label is its source record's label; segmentation rows get the
stage-1 pseudo-mask) and writes them as train-split records flagged ``synthetic://``, added to the
train split only. Each (plan, seed) trains through the shared loop (``fit_classifier``) in its own
Ray task, so seeds and plans run in parallel where the cluster has CPUs, and is scored on the real
test split: balanced accuracy, macro-F1 and per-class recall (classification), Dice and IoU
(segmentation); the report gives mean and spread over seeds and the gain over real-only.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from vgmedgen.model.domain_nets import domain_net_config
from vgmedgen.platform.evaluation.config import DownstreamConfig
from vgmedgen.platform.evaluation.generate import PromptRows, prompt_rows
from vgmedgen.platform.generation.outputs import RECORDS_DIR
from vgmedgen.platform.records import read_records
from vgmedgen.platform.runs import subset_name
from vgmedgen.platform.storage import atomic_directory
from vgmedgen.platform.training.classify import (
    ClassifierSpec,
    HeadSpec,
    TrainedNet,
    dice_iou,
    fit_classifier,
    load_labelled,
    predict,
    segment,
)

__all__ = ["DownstreamResult", "plan_policy", "run_downstream", "subset_records"]

log = logging.getLogger(__name__)


def subset_records(records_dir: Path, per_class: int, seed: int, out_root: Path) -> Path:
    """A records directory with at most ``per_class`` train rows per label (seeded); val and test kept whole."""
    table = read_records(records_dir)
    split = table.column("split").to_numpy(zero_copy_only=False)
    labels = np.array(table.column("label").to_pylist())
    rng = np.random.default_rng([seed, 17])
    keep = split != "train"
    for lab in sorted(set(labels[split == "train"])):
        rows = np.flatnonzero((split == "train") & (labels == lab))
        keep[rng.permutation(rows)[:per_class]] = True
    out = out_root / subset_name(records_dir, per_class, seed)
    if not (out / "part-00000.parquet").is_file():
        with atomic_directory(out) as tmp:
            pq.write_table(table.filter(keep), tmp / "part-00000.parquet")
    return out


def plan_policy(plan: str) -> dict[str, Any]:
    """The generation policy of a downstream plan: ``balance`` -> ``{balance: {}}``, ``xK`` -> ``{multiply: K}``."""
    if plan == "balance":
        return {"balance": {}}
    if plan.startswith("x"):
        try:
            return {"multiply": float(plan[1:])}
        except ValueError:
            pass
    raise ValueError(f"unknown downstream plan {plan!r}; use balance or xK (x0.5, x1, x2)")


@dataclass
class DownstreamResult:
    """Per (plan, seed) test metrics and their summary over seeds."""

    task: str
    runs: list[dict[str, Any]]  # {"plan", "seed", "n_real", "n_synthetic", metrics...}
    seconds: float
    class_names: tuple[str, ...] = ()

    def summary(self) -> list[dict[str, Any]]:
        """Rows per plan: mean and std over seeds of each scalar metric, and the gain over ``real``."""
        plans = list(dict.fromkeys(r["plan"] for r in self.runs))
        keys = [k for k, v in self.runs[0].items() if isinstance(v, float)]
        base = {k: float(np.mean([r[k] for r in self.runs if r["plan"] == "real"])) for k in keys}
        out = []
        for p in plans:
            rs = [r for r in self.runs if r["plan"] == p]
            row: dict[str, Any] = {"plan": p, "seeds": len(rs), "n_synthetic": rs[0]["n_synthetic"]}
            for k in keys:
                vals = np.array([r[k] for r in rs], float)
                row[k] = float(vals.mean())
                row[f"{k}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
                row[f"{k}_gain"] = float(vals.mean() - base[k])
            out.append(row)
        return out

    def scalars(self) -> dict[str, float]:
        """Per plan, the headline figures' mean, std over seeds and gain over ``real``: balanced accuracy and
        macro-F1 (classification), Dice (segmentation)."""
        mains = ("balanced_accuracy", "macro_f1") if self.task == "classification" else ("dice",)
        out = {}
        for row in self.summary():
            for main in mains:
                out[f"downstream/{row['plan']}_{main}"] = row[main]
                out[f"downstream/{row['plan']}_{main}_std"] = row[f"{main}_std"]
                if row["plan"] != "real":
                    out[f"downstream/{row['plan']}_{main}_gain"] = row[f"{main}_gain"]
        return out


def _test_metrics(spec: ClassifierSpec, trained: TrainedNet, task: str) -> dict[str, float]:
    from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

    test = load_labelled(spec.records_dir, "test", spec.heads)
    if task == "segmentation":
        probs = segment(trained.net, test.images)
        return dice_iou(probs > 0.5, test.masks > 0.5, test.has_mask)
    pred = predict(trained.net, spec.heads, test.images)[:, 0].numpy()
    target = test.targets[:, 0].numpy()
    keep = target >= 0
    pred, target = pred[keep], target[keep]
    classes = spec.heads[0].classes
    labels = list(range(len(classes)))
    recall = recall_score(target, pred, labels=labels, average=None, zero_division=0)
    out = {
        "balanced_accuracy": float(balanced_accuracy_score(target, pred)),
        "macro_f1": float(f1_score(target, pred, labels=labels, average="macro", zero_division=0)),
    }
    out.update({f"recall_{c}": float(r) for c, r in zip(classes, recall)})
    return out


def _fit_and_score(spec_json: str, storage: str, name: str, task: str) -> dict[str, float]:
    """One (plan, seed): train in-process (inside a Ray task) through the shared loop, score on real test."""
    torch.set_num_threads(1)
    spec = ClassifierSpec.model_validate_json(spec_json)
    trained = fit_classifier(spec, Path(storage), name)
    return _test_metrics(spec, trained, task)


def _gather(ray: Any, refs: list[Any], *, desc: str) -> list[Any]:
    """``ray.get(refs)`` with a progress bar of finished runs (each run also logs its own steps)."""
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit="run") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # a failed run raises here, at once, rather than after the others
            bar.update(len(done))
    return ray.get(refs)


def run_downstream(
    exp: Any,
    model_ref: Any,
    records_dir: Path,
    storage: Path,
    *,
    seed: int,
    sampler=None,
    batch_size: int = 64,
    address: str | None = None,
) -> DownstreamResult:
    """Generate the plans' synthetic rows through the generation pipeline, train every (plan, seed) on Ray,
    score on the real test split.

    Args:
        exp: the experiment (its ``evaluate.downstream`` section, and the ``generate`` section's actor
            options for the synthetic sets).
        model_ref: the resolved model version that makes the synthetic rows.
        records_dir: the real records.
        storage: where the low-data subset and the runs go.
        seed: the seed of the subset and of every synthetic set.
    """
    import time

    import ray

    from vgmedgen.platform.generation.job import run_generation, set_config

    cfg: DownstreamConfig = exp.evaluate.downstream
    t0 = time.perf_counter()
    if cfg.real_per_class is not None:
        records_dir = subset_records(records_dir, cfg.real_per_class, seed, storage)
    rows: PromptRows = prompt_rows(records_dir, "train")
    classes = tuple(sorted(set(rows.labels)))
    task = cfg.task
    if task == "auto":
        task = "classification" if len(classes) >= 2 else "segmentation"
    if task == "segmentation" and not bool(rows.has_mask.any()):
        raise ValueError(
            f"downstream.task=segmentation needs masks, but the train split of {records_dir} has none"
        )
    if task == "classification" and len(classes) < 2:
        raise ValueError(
            f"downstream.task=classification needs >= 2 labels, the train split of {records_dir} has {list(classes)}; "
            "use downstream.task=segmentation"
        )
    synthetic: dict[str, tuple[Path, int] | None] = {"real": None}
    for plan in cfg.plans:
        if plan == "balance" and len(set(Counter(rows.labels).values())) == 1:
            log.warning("plan %s adds no synthetic rows (the classes are already balanced); skipped", plan)
            continue
        print(f"[downstream] synthetic rows of plan {plan} ...", flush=True)
        gen_cfg = set_config(exp, [plan_policy(plan)], seed=seed, sampler=sampler, batch_size=batch_size)
        outcome = run_generation(gen_cfg, model_ref, address=address, records_dir=records_dir)
        synthetic[plan] = (outcome.out_dir / RECORDS_DIR, int(outcome.summary["accepted"]))
    if task == "classification":
        net = domain_net_config(
            cfg.net, kind="classifier", num_classes=len(classes), input_size=exp.data.resolution
        )
        heads: tuple[HeadSpec, ...] = (HeadSpec(name="label", classes=classes, source="label"),)
    else:
        net = domain_net_config(cfg.net, kind="segmentation", num_classes=1, input_size=exp.data.resolution)
        heads = ()
    fit = ray.remote(num_cpus=cfg.cpus_per_run, max_retries=1)(_fit_and_score)
    jobs, meta = [], []
    for plan, made in synthetic.items():
        extra, n_syn = (None, 0) if made is None else made
        for s in cfg.seeds:
            spec = ClassifierSpec(
                net=net,
                heads=heads,
                records_dir=records_dir,
                extra_train=() if extra is None else (extra,),
                train=cfg.train,
                seed=s,
            )
            jobs.append(
                fit.remote(
                    spec.model_dump_json(), str(storage / "runs"), f"downstream-{task}-{plan}-s{s}", task
                )
            )
            meta.append({"plan": plan, "seed": s, "n_real": len(rows), "n_synthetic": n_syn})
    results = _gather(ray, jobs, desc=f"downstream {task} runs")
    runs = [{**m, **{k: float(v) for k, v in r.items()}} for m, r in zip(meta, results)]
    return DownstreamResult(task, runs, time.perf_counter() - t0, classes)
