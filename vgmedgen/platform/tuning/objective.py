"""A sweep's objective, measured inside the dit stage while it trains, and again with more images at the end.

During training the dit worker (rank 0) samples a fixed set of images every ``report_every`` steps (the
same captions and the same seeds every time, EMA weights) and scores them:

- ``kid``: the kernel distance of the images' features to the real reference split (Inception features
  when ``evaluate.fidelity.feature_extractor_weights_path`` is given, else the domain network's). KD is
  unbiased, so a few dozen images give a usable ranking: this is what ASHA should decide on.
- ``domain_fd`` / ``fid``: the Frechet distance (domain network / Inception features). FD is biased
  upwards at small sample sizes (a few hundred images and fewer), so a small-sample FD ranks trials by
  how many images they were scored on as much as by quality: use it for the final scoring.
- ``adherence``: SynthDerm only, the mean agreement of size, position and colour on the adherence swap
  grid, read by the model-independent ruler.
- ``val_loss``: the dit stage's own validation loss (no sampling).

The driver prepares what the worker loads (:func:`prepare_objective`): the generation scorer's assets
(the evaluate job's domain network, the reference split's statistics) or the adherence ruler. The spec
the worker receives is plain JSON (:class:`ObjectiveSpec`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.tuning.config import measure_problem

__all__ = [
    "ObjectiveSpec",
    "TrialObjective",
    "fixed_requests",
    "prepare_objective",
    "score_images",
]

SCORED_METRICS = ("kid", "domain_fd", "fid")


@dataclass(frozen=True)
class ObjectiveSpec:
    """What the dit worker needs to measure the objective (JSON-able)."""

    metric: str
    images: int
    seed: int
    assets_dir: str | None = None  # the generation scorer's assets (kid, domain_fd, fid)
    ruler_dir: str | None = None  # the adherence ruler (adherence)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ObjectiveSpec:
        return cls(**data)


def prepare_objective(
    cfg: Any, metric: str, images: int, seed: int, *, address: str | None = None
) -> ObjectiveSpec:
    """Build (or reuse) what ``metric`` is measured with for experiment ``cfg``; may train the evaluate job's
    domain network or the adherence ruler on Ray Train.

    Raises:
        ConfigError: ``fid`` without the Inception weights file; ``adherence`` on data other than SynthDerm.
    """
    problem = measure_problem(cfg, metric=metric)
    if problem is not None:
        raise ConfigError(problem)
    if metric == "val_loss":
        return ObjectiveSpec(metric, images, seed)
    if metric == "adherence":
        from vgmedgen.platform.evaluation.adherence import train_ruler

        ruler = train_ruler(cfg.records_dir, cfg.evaluation_storage, cfg.data.resolution, cfg.adherence.ruler)
        return ObjectiveSpec(metric, images, seed, ruler_dir=str(ruler.directory))
    from vgmedgen.platform.generation.score import ScorerAssets

    assets = ScorerAssets.cached(cfg, cfg.root / "scorer", address=address)
    return ObjectiveSpec(metric, images, seed, assets_dir=str(assets.directory))


def fixed_requests(records_dir: Path, n: int, seed: int) -> tuple[list[Any], list[str | None]]:
    """``n`` requests for the validation captions in record order (cycled), image ``k`` with seed ``seed + k``,
    and the label of each: the same images are asked of every trial at every report."""
    from vgmedgen.platform.generation.request import SampleRequest
    from vgmedgen.platform.records import read_split

    try:
        table = read_split(records_dir, "val", ["caption", "label"])
    except ValueError:
        table = read_split(records_dir, "train", ["caption", "label"])
    captions, labels = table.column("caption").to_pylist(), table.column("label").to_pylist()
    if not captions:
        raise ValueError(f"{records_dir} holds no validation captions to sample the sweep objective from")
    rows = [k % len(captions) for k in range(n)]
    return (
        [SampleRequest(caption=captions[i], seed=seed + k, n=1) for k, i in enumerate(rows)],
        [None if labels[i] is None else str(labels[i]) for i in rows],
    )


def score_images(
    scorer: Any, images: np.ndarray, labels: list[str | None], metric: str, seed: int
) -> dict[str, float]:
    """``metric`` (kid, domain_fd or fid) of (N, H, W, 3) uint8 images against the scorer's reference split,
    with its companions: ``{metric: value, "kid": ..., "fd": ..., "n_images": N}`` (the extractor is
    Inception for fid, and for kid when the weights are there; else the domain network)."""
    from vgmedgen.platform.generation.score import ALL_CLASSES, ShardStats, score_accepted

    features = scorer.features(images)
    extractor = "inception" if metric == "fid" or (metric == "kid" and "inception" in features) else "domain"
    stats = ShardStats(reservoir_size=max(len(images), 2), seed=seed)
    stats.add(extractor, features[extractor], labels, [f"objective-{k}" for k in range(len(images))])
    reference = ShardStats(scorer.assets.reference.reservoir_size, scorer.assets.reference.seed)
    reference.summaries = {extractor: scorer.assets.reference.summaries[extractor]}
    row = next(
        r
        for r in score_accepted(stats, reference, kid_subset_size=len(images), seed=seed)
        if r["class"] == ALL_CLASSES
    )
    if row["fd"] is None:
        raise ValueError(f"the sweep objective could not be scored: {row['note']}")
    out = {"kid": float(row["kd_mean"]), "fd": float(row["fd"]), "n_images": float(len(images))}
    out[metric] = out["kid"] if metric == "kid" else out["fd"]
    return out


class TrialObjective:
    """The objective of one trial's dit stage, measured on its model as it trains (rank 0 only)."""

    def __init__(self, spec: ObjectiveSpec, cfg: Any, device: Any) -> None:
        self.spec, self.cfg = spec, cfg
        self.scorer = self.ruler = self.colours = None
        if spec.metric in SCORED_METRICS:
            from vgmedgen.platform.generation.score import Scorer

            self.scorer = Scorer(spec.assets_dir, device=str(device))
            self.requests, self.labels = fixed_requests(cfg.records_dir, spec.images, spec.seed)
        elif spec.metric == "adherence":
            from vgmedgen.platform.evaluation.adherence import load_calibration
            from vgmedgen.platform.training.classify import load_trained_net

            self.ruler = load_trained_net(Path(spec.ruler_dir))
            self.colours = load_calibration(cfg.records_dir, cfg.adherence)

    @property
    def samples(self) -> bool:
        """Whether measuring it samples images (everything but ``val_loss``)."""
        return self.spec.metric != "val_loss"

    def __call__(self, model: Any) -> dict[str, float]:
        """The objective of ``model`` (a :class:`~vgmedgen.model.vgmedgen.VGMedGen`) and its companions."""
        import torch

        from vgmedgen.platform.generation.sample import generate_samples

        metric = self.spec.metric
        with torch.no_grad():
            if metric == "adherence":
                from vgmedgen.platform.evaluation.adherence import measure_adherence

                result = measure_adherence(model, self.cfg.adherence, self.colours, self.ruler)
                values = {f"adherence_{k}": float(v) for k, v in result.agreement.items()}
                values["adherence"] = float(np.mean(list(result.agreement.values())))
                return values
            samples = generate_samples(model, self.requests)
        return score_images(self.scorer, samples.images_uint8(), self.labels, metric, self.spec.seed)
