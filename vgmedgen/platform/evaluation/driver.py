"""The evaluate job: score a model version (or a folder of generated images) against a dataset's real split.

Steps, each reusing earlier work where its inputs are unchanged:

1. the records (prepared if missing) and the model version (a directory or ``name@alias``);
2. the domain extractor: a classifier on the labels of the real train split, or for a single-class
   dataset a segmentation U-Net on its masks, trained through the shared loop on Ray Train;
3. ``num_images`` generated images from prompts of training records, in their class mix, made by the
   generation pipeline (:mod:`vgmedgen.platform.generation.job`; or the given folder);
4. domain FD/KD (HFD, KFD, ...) and, with the Inception weights, FID/KID, each beside its floor
   (real train vs real test at the same N); memorisation in domain features;
5. anatomy adherence of the generated images (their pseudo-masks against the size and position that
   wrote each prompt, in the prompts' vocabulary: SynthDerm's factors or the caption bins);
6. on SynthDerm, controllability through the judges (matched and swapped prompts);
7. optionally, the downstream augmentation benchmark;
8. the report (JSON, Markdown, PNG) under ``<output_root>/evaluation/<experiment>/<version>/``, logged
   to MLflow in the model version's training run (metrics and an ``evaluation/`` artifact folder);
9. the figures on the version's model card (``MODEL_CARD.md``), also beside the registered version's
   files in MLflow when the training run is known.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgmedgen.model.configbase import ConfigError
from vgmedgen.model.domain_nets import domain_net_config
from vgmedgen.platform.config import ExperimentConfig
from vgmedgen.platform.evaluation.adherence import prompt_vocabulary
from vgmedgen.platform.evaluation.control import (
    anatomy_adherence,
    judges_spec,
    measure_controllability,
    plot_confusions,
)
from vgmedgen.platform.evaluation.downstream import run_downstream
from vgmedgen.platform.evaluation.generate import load_image_folder, prompt_rows
from vgmedgen.platform.metrics.fidelity import (
    check_inception_weights,
    compute_distances,
    create_domain_extractor,
    create_inception_extractor,
    distance_floor,
    domain_metric_names,
    extract_features,
)
from vgmedgen.platform.metrics.memorisation import memorisation_share
from vgmedgen.platform.metrics.report import EvaluationReport, distance_rows, write_report
from vgmedgen.platform.metrics.stats import FeatureSummary
from vgmedgen.platform.modelcard import record_measurements
from vgmedgen.platform.records import decode_images, decode_masks, read_split
from vgmedgen.platform.training.classify import ClassifierSpec, HeadSpec, fit_classifier

__all__ = ["EvaluationOutcome", "evaluate_experiment"]

log = logging.getLogger(__name__)


@dataclass
class EvaluationOutcome:
    report: EvaluationReport
    paths: dict[str, Path]
    out_dir: Path
    mlflow_run_id: str | None
    seconds: float
    metrics: dict[str, float]  # the flat figures logged to MLflow (finite values only)


def _split_uint8(records_dir: Path, split: str) -> torch.Tensor:
    """One split's images as (N, 3, H, W) uint8: whole splits are held for feature extraction, so never
    as float32 (4x the memory)."""
    blobs = read_split(records_dir, split, ["image"]).column("image").to_pylist()
    images = decode_images(blobs, desc=f"decoding the real {split} split")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def domain_extractor(cfg: ExperimentConfig, storage: Path):
    """The dataset's domain network (trained on its real train split, reused when unchanged) and its kind."""
    spec, kind = domain_spec(cfg)
    return fit_classifier(spec, storage / "nets", f"domain-{kind}", cfg.evaluate.scaling), kind


def domain_spec(cfg: ExperimentConfig) -> tuple[ClassifierSpec, str]:
    """The domain network to train on the real train split (a classifier of the labels, or a segmentor when
    there is one label) and its kind; seeded with ``evaluate.instrument_seed``, like the judges
    (:func:`judges_of`), so that it never depends on the model under test."""
    ev = cfg.evaluate
    labels = sorted(set(prompt_rows(cfg.records_dir, "train").labels))
    if len(labels) >= 2:
        net = domain_net_config(
            ev.domain_net, kind="classifier", num_classes=len(labels), input_size=cfg.data.resolution
        )
        heads: tuple[HeadSpec, ...] = (HeadSpec(name="label", classes=tuple(labels), source="label"),)
        kind = "classifier"
    else:
        net = domain_net_config(
            ev.domain_net, kind="segmentation", num_classes=1, input_size=cfg.data.resolution
        )
        heads, kind = (), "segmentation"
    spec = ClassifierSpec(
        net=net, heads=heads, records_dir=cfg.records_dir, train=ev.domain_train, seed=ev.instrument_seed
    )
    return spec, kind


def judges_of(cfg: ExperimentConfig) -> ClassifierSpec:
    """The SynthDerm judges of ``evaluate.controllability``, seeded with ``evaluate.instrument_seed``."""
    cc = cfg.evaluate.controllability
    return judges_spec(
        cfg.records_dir,
        preset=cc.judge_net,
        resolution=cfg.data.resolution,
        train=cc.judge_train,
        seed=cfg.evaluate.instrument_seed,
    )


def generated_set(
    cfg: ExperimentConfig, model: Any, model_ref: Any, train_rows: Any, *, address: str | None
) -> tuple[torch.Tensor, torch.Tensor, list[dict], dict[str, Any]]:
    """The evaluate job's generated set, made by the generation pipeline: ``evaluate.num_images`` images
    in the train split's class mix (``per_class``), prompts from train records, seeds from
    ``evaluate.seed``; reused when the same set was made before.

    Returns:
        uint8 images (N, 3, H, W), pseudo-masks (N, 1, H, W) float {0, 1}, the attributes of the train
        record each row's prompts came from, and the plan's seeds, prompts and output directory.
    """
    from vgmedgen.platform.generation.job import (
        check_plan_sampler,
        read_generated,
        run_generation,
        set_config,
    )
    from vgmedgen.platform.generation.plan import proportional_counts

    ev = cfg.evaluate
    check_plan_sampler(ev.sampler, model.config.sampler, "evaluate.sampler")
    policies = [{"per_class": proportional_counts(train_rows.labels, ev.num_images)}]
    gen_cfg = set_config(cfg, policies, seed=ev.seed, sampler=ev.sampler, batch_size=ev.batch_size)
    outcome = run_generation(gen_cfg, model_ref, address=address)
    table = read_generated(
        outcome.out_dir, ["source_id", "seed", "anatomy_prompt", "style_prompt", "image", "mask"]
    )
    images = torch.from_numpy(decode_images(table.column("image").to_pylist())).permute(0, 3, 1, 2)
    masks, _ = decode_masks(table.column("mask").to_pylist())
    by_id = dict(zip(train_rows.ids, train_rows.attributes))
    attributes = [by_id[s] for s in table.column("source_id").to_pylist()]
    plan = {
        "out_dir": str(outcome.out_dir),
        "seeds": table.column("seed").to_pylist(),
        "anatomy": table.column("anatomy_prompt").to_pylist(),
        "style": table.column("style_prompt").to_pylist(),
    }
    return images.contiguous(), torch.from_numpy(masks).float().unsqueeze(1), attributes, plan


def evaluate_experiment(cfg: ExperimentConfig, *, address: str | None = None) -> EvaluationOutcome:
    """Run the evaluation that ``cfg.evaluate`` describes; see the module docstring."""
    from vgmedgen.model.vgmedgen import VGMedGen
    from vgmedgen.platform.cluster import connect
    from vgmedgen.platform.prepare import prepare_records
    from vgmedgen.platform.tracking import Tracker, model_reference, open_run, resolve_model

    t0 = time.perf_counter()
    ev = cfg.evaluate
    fid_warning = check_inception_weights(
        ev.fidelity
    )  # a config that demands FID fails here, before any work
    tracker = Tracker(cfg.tracking, cfg.root, cfg.name) if cfg.tracking.enabled else None
    model = None
    version_dir: Path | None = None
    model_ref = None
    if ev.generated_dir is None:
        ref = model_reference(ev.model, cfg, tracker, "evaluate.model")
        model_ref = resolve_model(ref, cfg, tracker=tracker)
        version_dir = model_ref.path
        model = VGMedGen.from_pretrained(version_dir)
        if model.config.image_size != cfg.data.resolution:
            raise ConfigError(
                f"the model generates {model.config.image_size}px images but data.resolution is {cfg.data.resolution}; "
                "evaluate against records of the model's resolution"
            )
    run_id = None
    if model_ref is None:
        tag = Path(ev.generated_dir).name
    else:
        run_id, tag = model_ref.run_id, model_ref.name
    # Results go to the model version's training run; without one (a folder of images, or a version this
    # store did not train) the job opens its own run, which ends FINISHED, KILLED or FAILED with the job.
    own_run = tracker if run_id is None else None
    with open_run(
        own_run, key=f"{cfg.name}-evaluate-{tag}", name=f"{cfg.name}-evaluate", tags={"job": "evaluate"}
    ) as opened:
        run_id = run_id or opened
        connect(address)
        prepare_records(cfg, address=address)
        storage = cfg.evaluation_storage
        out_dir = cfg.root / "evaluation" / cfg.name / tag
        report_warnings = [fid_warning] if fid_warning else []
        scalars: dict[str, float] = {}
        tables: dict[str, list[dict]] = {}

        print("[evaluate] domain extractor ...", flush=True)
        domain, domain_kind = domain_extractor(cfg, storage)
        scalars.update({f"domain_net/val_{k}": float(v) for k, v in domain.metrics.items()})

        # -- the generated set: through the generation pipeline (Ray Data), in the train split's class mix
        train_rows = prompt_rows(cfg.records_dir, "train")
        gen_masks = None
        if model is not None:
            print(f"[evaluate] generating {ev.num_images} images ...", flush=True)
            gen_images, gen_masks, gen_attributes, gen_plan = generated_set(
                cfg, model, model_ref, train_rows, address=address
            )
            adherence = anatomy_adherence(
                gen_masks, gen_attributes, vocabulary=prompt_vocabulary(cfg.data.dataset)
            )
            scalars.update(adherence)
        else:
            gen_images = load_image_folder(Path(ev.generated_dir), limit=ev.num_images)
        n = gen_images.shape[0]

        # -- distances ------------------------------------------------------------------------------
        print(
            f"[evaluate] distances of {n} generated images to the real {ev.reference_split} split ...",
            flush=True,
        )
        reference = _split_uint8(cfg.records_dir, ev.reference_split)
        train_images = _split_uint8(cfg.records_dir, "train")
        fc = ev.fidelity
        kw = {"kid_subsets": fc.kid_subsets, "kid_subset_size": fc.kid_subset_size, "seed": fc.seed}
        rows = []
        extractors = [("domain", create_domain_extractor(domain.net), *domain_metric_names(cfg.data.dataset))]
        if fid_warning is None and fc.fid != "off":
            extractors.append(
                ("inception", create_inception_extractor(fc.feature_extractor_weights_path), "FID", "KID")
            )
        domain_feats: dict[str, torch.Tensor] = {}
        for name, extractor, fd_name, kd_name in extractors:
            # Features once per set: the summaries (distances) and, for the domain net, memorisation use them.
            feats = {
                key: extract_features(
                    extractor, imgs, batch_size=fc.batch_size, desc=f"{name} features, {what}"
                )
                for key, what, imgs in (
                    ("gen", "generated", gen_images),
                    ("ref", f"real {ev.reference_split}", reference),
                    ("train", "real train", train_images),
                )
            }
            summ = {
                key: FeatureSummary.empty(f.shape[1], max(fc.reservoir_size, n), fc.seed).update(
                    f, list(range(len(f)))
                )
                for key, f in feats.items()
            }
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                generated = compute_distances(summ["gen"], summ["ref"], **kw)
                floor = (
                    distance_floor(summ["train"], summ["ref"], n, **kw) if len(train_images) >= n else None
                )
            rows += distance_rows(
                fd_name,
                kd_name,
                generated,
                floor,
                extractor=name if name == "inception" else f"{domain_kind} ({cfg.data.dataset})",
            )
            report_warnings += generated.warnings
            if floor is None:
                report_warnings.append(f"{fd_name} floor skipped: the train split has fewer than {n} images")
            if name == "domain":
                domain_feats = feats
        print("[evaluate] memorisation (nearest training images in domain features) ...", flush=True)
        mem, gen_nn, test_nn = memorisation_share(
            domain_feats["gen"],
            domain_feats["train"],
            domain_feats["ref"],
            percentile=ev.memorisation_percentile,
        )

        # -- controllability and downstream ---------------------------------------------------------
        figures = []
        control_on = ev.controllability.enabled == "on" or (
            ev.controllability.enabled == "auto" and cfg.data.dataset == "synthderm"
        )
        if control_on and model is None:
            report_warnings.append("controllability needs a model version (not a folder of images); skipped")
        elif control_on:
            if cfg.data.dataset != "synthderm":
                raise ConfigError(
                    "evaluate.controllability needs SynthDerm (the only dataset with known factors); set it to auto or off"
                )
            print("[evaluate] judges ...", flush=True)
            cc = ev.controllability
            judges = fit_classifier(judges_of(cfg), storage / "nets", "judges", ev.scaling)
            weak = {
                h.name: judges.metrics.get(f"acc_{h.name}")
                for h in judges.heads
                if judges.metrics.get(f"acc_{h.name}", 0) < cc.judge_target
            }
            if weak:
                report_warnings.append(
                    "judges below the target accuracy on real validation images ("
                    + ", ".join(f"{k} {v:.2f}" for k, v in weak.items())
                    + f" < {cc.judge_target}): their controllability numbers are bounded by that"
                )
            val_rows = prompt_rows(cfg.records_dir, "val")
            control = measure_controllability(
                model,
                judges,
                val_rows,
                num=cc.num_prompts,
                seed=ev.seed,
                sampler=ev.sampler,
                batch_size=ev.batch_size,
            )
            scalars.update(control.scalars())
            tables["Controllability (share of images showing the requested factor)"] = control.rows()
            figures.append(plot_confusions(control, out_dir / "confusion.png"))
        if ev.downstream.enabled and model is None:
            report_warnings.append("the downstream benchmark needs a model version; skipped")
        elif ev.downstream.enabled:
            print("[evaluate] downstream benchmark ...", flush=True)
            down = run_downstream(
                cfg,
                model_ref,
                cfg.records_dir,
                storage / "downstream",
                seed=ev.seed,
                sampler=ev.sampler,
                batch_size=ev.batch_size,
                address=address,
            )
            scalars.update(down.scalars())
            scalars["downstream/seconds"] = down.seconds
            tables[f"Downstream {down.task} (real test split; mean over seeds, std, gain over real only)"] = (
                down.summary()
            )
            tables["Downstream runs"] = down.runs

        report = EvaluationReport(
            title=f"Evaluation of {tag}",
            dataset=cfg.data.dataset,
            distances=rows,
            model_version=str(version_dir) if version_dir else None,
            memorisation=mem,
            scalars=scalars,
            warnings=report_warnings,
            tables=tables,
            generated_nearest=gen_nn,
            test_nearest=test_nn,
        )
        paths = write_report(report, out_dir)
        for f in figures:
            paths[f.stem + "_png"] = f
        if model is not None:
            from vgmedgen.platform.images import provenance_fields
            from vgmedgen.platform.visualize import save_grid

            shown = provenance_fields(
                model_version=model_ref.id if model_ref is not None else None,
                kind="evaluation samples",
                generation=gen_plan["out_dir"],
                seeds=gen_plan["seeds"][:32],
                anatomy_prompts=gen_plan["anatomy"][:32],
                style_prompts=gen_plan["style"][:32],
                sampler=(ev.sampler or model.config.sampler).model_dump(),
            )
            paths["samples_png"] = save_grid(
                gen_images[:32].float() / 255.0, out_dir / "samples.png", ncol=8, provenance=shown
            )
        metrics = dict(scalars)
        for r in rows:
            metrics[f"eval/{r.metric}"] = r.value
            metrics[f"eval/{r.metric}_floor"] = r.floor
        metrics["eval/memorisation_share"] = mem.share
        metrics = {k: v for k, v in metrics.items() if np.isfinite(v)}
        card = None
        if version_dir is not None:
            card = record_measurements(
                version_dir,
                "evaluation",
                metrics,
                dataset=cfg.data.dataset,
                records=cfg.data.records_name,
                split=ev.reference_split,
                source=f"jobs/evaluate.py: {n} generated images (evaluate.seed {ev.seed}) against the real "
                f"{ev.reference_split} split",
                files={"report": str(paths["markdown"])},
            )
            paths["model_card"] = card
        if tracker is not None:
            if card is not None and model_ref is not None and model_ref.run_id is not None:
                tracker.log_artifact(run_id, card, "model_version")  # the registered copy's card
            print(f"[evaluate] logging to MLflow run {run_id} ...", flush=True)
            tracker.sink(run_id)([(0, metrics)])
            tracker.log_artifacts(run_id, out_dir, "evaluation")
    return EvaluationOutcome(report, paths, out_dir, run_id, time.perf_counter() - t0, metrics)
