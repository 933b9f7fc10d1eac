"""Controllability (SynthDerm judges, matched and swapped prompts) and anatomy adherence (any dataset with masks).

Controllability: judge networks trained on real SynthDerm predict every anatomy and style factor
of an image. For generated images we ask for known factors, either *matched* (the anatomy and style
prompts of one validation record) or *swapped* (anatomy from one record, style from another), and
report per factor the share of images whose judged value is the one requested, beside the judge's
own accuracy on real validation images (the ceiling) and chance.

Anatomy adherence: the stage-1 segmentor's pseudo-mask of a generated image is measured and binned
in the vocabulary that wrote its prompt (SynthDerm's factors, or the caption bins of real data), and
compared with the size and position the prompt's source record was written from; the binning and the
scoring are :mod:`vgmedgen.platform.evaluation.adherence`'s, the same as the demo's.

Shape legend: N images, H/W size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgmedgen.model.domain_nets import domain_net_config
from vgmedgen.platform.datasets.synthderm import ANATOMY_FACTORS, FACTORS, STYLE_FACTORS
from vgmedgen.platform.evaluation.adherence import PSEUDO_MASK, adherence, measure_masks
from vgmedgen.platform.evaluation.generate import PromptRows, generate
from vgmedgen.platform.training.classify import ClassifierSpec, HeadSpec, TrainedNet, predict
from vgmedgen.platform.training.config import StageTrainConfig

__all__ = [
    "ControlResult",
    "anatomy_adherence",
    "judge_heads",
    "judges_spec",
    "measure_controllability",
    "plot_confusions",
]


def judge_heads() -> tuple[HeadSpec, ...]:
    """One head per SynthDerm factor (anatomy, then style), classes in ``FACTORS`` order."""
    return tuple(HeadSpec(name=f, classes=FACTORS[f]) for f in (*ANATOMY_FACTORS, *STYLE_FACTORS))


def judges_spec(
    records_dir: Path, *, preset: str, resolution: int, train: StageTrainConfig, seed: int
) -> ClassifierSpec:
    """The SynthDerm judges (one network, one head per factor) to train on real train rows."""
    heads = judge_heads()
    net = domain_net_config(
        preset,
        kind="classifier",
        num_classes=sum(len(h.classes) for h in heads),
        input_size=resolution,
        coord_channels=True,  # position is a factor
    )
    return ClassifierSpec(net=net, heads=heads, records_dir=records_dir, train=train, seed=seed)


@dataclass
class ControlResult:
    """Per-factor accuracy of the judged factors against the requested ones."""

    matched: dict[str, float]
    swapped: dict[str, float]
    judge_val: dict[str, float]  # the judges' accuracy on real validation images
    chance: dict[str, float]
    n: int
    confusions: dict[str, np.ndarray] = field(
        default_factory=dict
    )  # swapped: factor -> (K, K) requested x judged

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "factor": f,
                "kind": "anatomy" if f in ANATOMY_FACTORS else "style",
                "matched": self.matched[f],
                "swapped": self.swapped[f],
                "judge_on_real": self.judge_val.get(f, float("nan")),
                "chance": self.chance[f],
            }
            for f in self.matched
        ]

    def scalars(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for f in self.matched:
            out[f"control/matched_{f}"] = self.matched[f]
            out[f"control/swapped_{f}"] = self.swapped[f]
            # what a judged accuracy is read against: the judge itself on real images, and chance
            out[f"control/chance_{f}"] = self.chance[f]
            if f in self.judge_val:
                out[f"control/judge_on_real_{f}"] = self.judge_val[f]
        for kind, factors in (("anatomy", ANATOMY_FACTORS), ("style", STYLE_FACTORS)):
            out[f"control/swapped_{kind}_mean"] = float(np.mean([self.swapped[f] for f in factors]))
        return out


def _chance(rows: PromptRows) -> dict[str, float]:
    """Accuracy of always guessing the most frequent value of each factor among the requested rows."""
    out = {}
    for f in FACTORS:
        values = [a[f] for a in rows.attributes]
        out[f] = max(values.count(v) for v in set(values)) / len(values)
    return out


def measure_controllability(
    model,
    judges: TrainedNet,
    rows: PromptRows,
    *,
    num: int,
    seed: int,
    sampler=None,
    batch_size: int = 64,
) -> ControlResult:
    """Generate ``num`` matched and ``num`` swapped images from ``rows`` (validation records) and judge them."""
    rng = np.random.default_rng([seed, 31])
    idx = rng.choice(len(rows), size=min(num, len(rows)), replace=False)
    other = np.roll(idx, 1)  # a different record's style for each anatomy (idx has no repeats)
    pick = rows.take(idx)
    style_from = rows.take(other)
    seeds = [seed * 1_000_003 + i for i in range(len(idx))]
    matched = generate(
        model, pick.anatomy, pick.style, seeds, sampler=sampler, batch_size=batch_size, desc="matched prompts"
    )
    swapped = generate(
        model,
        pick.anatomy,
        style_from.style,
        seeds,
        sampler=sampler,
        batch_size=batch_size,
        desc="swapped prompts",
    )
    heads = judges.heads
    pred_m = predict(judges.net, heads, matched.images)  # (N, n_heads)
    pred_s = predict(judges.net, heads, swapped.images)
    acc_m, acc_s, conf = {}, {}, {}
    for k, head in enumerate(heads):
        f = head.name
        want_m = np.array([head.classes.index(a[f]) for a in pick.attributes])
        source = pick if f in ANATOMY_FACTORS else style_from
        want_s = np.array([head.classes.index(a[f]) for a in source.attributes])
        acc_m[f] = float((pred_m[:, k].numpy() == want_m).mean())
        acc_s[f] = float((pred_s[:, k].numpy() == want_s).mean())
        c = np.zeros((len(head.classes), len(head.classes)), np.int64)
        np.add.at(c, (want_s, pred_s[:, k].numpy()), 1)
        conf[f] = c
    judge_val = {h.name: judges.metrics.get(f"acc_{h.name}", float("nan")) for h in heads}
    return ControlResult(acc_m, acc_s, judge_val, _chance(pick), len(idx), conf)


def plot_confusions(result: ControlResult, path: Path) -> Path:
    """One confusion matrix per factor (rows: requested, columns: judged; swapped prompts), row-normalised."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = list(result.confusions)
    fig, axes = plt.subplots(2, (len(factors) + 1) // 2, figsize=(3.2 * ((len(factors) + 1) // 2), 6.6))
    for ax, f in zip(np.ravel(axes), factors):
        c = result.confusions[f].astype(float)
        norm = c / np.maximum(c.sum(1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="viridis")
        names = FACTORS[f]
        ax.set_xticks(range(len(names)), [n[:7] for n in names], rotation=60, fontsize=6)
        ax.set_yticks(range(len(names)), [n[:7] for n in names], fontsize=6)
        ax.set_title(f"{f}: {result.swapped[f]:.2f}", fontsize=8)
    for ax in np.ravel(axes)[len(factors) :]:
        ax.axis("off")
    fig.suptitle("Swapped prompts: requested (rows) vs judged (columns)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def anatomy_adherence(
    generated_masks: torch.Tensor,
    requested: Sequence[Mapping[str, object]],
    *,
    vocabulary: str,
    threshold: float = 0.5,
) -> dict[str, float]:
    """Size and position of generated pseudo-masks (N, 1, H, W) against what each prompt asked for.

    Args:
        generated_masks: the stage-1 segmentor's pseudo-masks of the generated images.
        requested: per image, the attributes of the record its anatomy prompt came from: its
            ``size`` and ``position`` are the words that wrote the prompt (SynthDerm's factors, or
            the caption bins of the record's mask). Rows without them (no mask, an empty mask) are
            skipped.
        vocabulary: the prompts' vocabulary (:func:`~vgmedgen.platform.evaluation.adherence.prompt_vocabulary`
            of the dataset).
        threshold: pseudo-mask probability above which a pixel is lesion.

    Returns:
        ``adherence/<vocabulary>/pseudo_mask/{size,position,empty,n}`` (empty: the share with no
        lesion pixel, which disagrees with any request); {} when no row asks for a size.
    """
    if len(requested) != generated_masks.shape[0]:
        raise ValueError(f"got {generated_masks.shape[0]} masks and {len(requested)} requests")
    keep = [i for i, r in enumerate(requested) if r.get("size") is not None and r.get("position") is not None]
    if not keep:
        return {}
    measured = measure_masks(generated_masks[keep], threshold)
    asked = [{"size": requested[i]["size"], "position": requested[i]["position"]} for i in keep]
    return adherence(measured, asked, vocabulary, PSEUDO_MASK).metrics()
