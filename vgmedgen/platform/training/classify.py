"""Classifiers and segmenters on records, trained by the shared loop: domain extractors, judges, downstream nets.

One :class:`ClassifierTask` (a :class:`~vgmedgen.platform.training.loop.StageTask`) covers every
network the evaluation trains:

* the domain extractor of a labelled dataset (one head: the record label) and, for a single-class
  dataset, a segmentation U-Net on its masks (``kind="segmentation"``), whose pooled features give
  HFD/KFD-style distances;
* the SynthDerm judges: one network with a head per factor (anatomy and style), each a softmax over
  that factor's values, read from the records' ``attributes``;
* the downstream classifiers and segmenters of the augmentation benchmark, trained on the real
  train split plus, optionally, synthetic rows (``extra_train``: record directories whose rows are
  all flagged synthetic; they only ever join the train split).

:func:`fit_classifier` runs it under Ray Train (``num_workers=0``: in-process) with a deterministic
run name, so a finished network is reused and an interrupted one resumes; the network is written
with :func:`vgmedgen.model.domain_nets.save_domain_net` plus ``heads.json``.

Shape legend: N batch, K classes of a head, H/W size.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from vgmedgen.model.configbase import ConfigError, StrictConfig
from vgmedgen.model.domain_nets import (
    DomainNet,
    DomainNetConfig,
    build_domain_net,
    load_domain_net,
    save_domain_net,
)
from vgmedgen.platform.records import SYNTHETIC_SOURCE, decode_images, decode_masks, read_records, read_split
from vgmedgen.platform.runs import net_run_name
from vgmedgen.platform.storage import atomic_directory
from vgmedgen.platform.training.config import ScalingOptions, StageTrainConfig
from vgmedgen.platform.training.data import unit_range

__all__ = [
    "ClassifierSpec",
    "ClassifierTask",
    "HeadSpec",
    "LabelledImages",
    "TrainedNet",
    "fit_classifier",
    "load_labelled",
    "load_trained_net",
    "predict",
    "segment",
]

log = logging.getLogger(__name__)

IGNORE = -1  # target of a row whose factor is unknown for a head (no loss, not scored)


class HeadSpec(StrictConfig):
    """One softmax head: its name, its classes in order, and where a row's target comes from."""

    name: str
    classes: tuple[str, ...] = Field(min_length=2)
    source: Literal["label", "attribute"] = Field(
        "attribute", description="label: the record's label column; attribute: attributes[name]."
    )


class ClassifierSpec(StrictConfig):
    """What to train: network, heads, data and optimisation (everything that determines the result)."""

    net: DomainNetConfig
    heads: tuple[HeadSpec, ...] = ()
    records_dir: Path
    extra_train: tuple[Path, ...] = Field(
        (), description="Record directories of synthetic rows added to the train split only."
    )
    val_split: str = "val"
    train: StageTrainConfig
    seed: int = 0
    flip_augment: bool = Field(
        False,
        description="Random horizontal flips (never for judges of position or downstream nets that must not learn it).",
    )

    @model_validator(mode="after")
    def _heads_fit_net(self) -> ClassifierSpec:
        if self.net.kind == "classifier":
            if not self.heads:
                raise ValueError("a classifier needs at least one head")
            total = sum(len(h.classes) for h in self.heads)
            if total != self.net.num_classes:
                raise ValueError(f"net.num_classes {self.net.num_classes} != the heads' classes ({total})")
        elif self.heads:
            raise ValueError("a segmentation network has no class heads")
        return self


@dataclass
class LabelledImages:
    """Decoded rows for a classifier: images in [-1, 1], masks, and one target column per head."""

    ids: list[str]
    images: torch.Tensor  # (N, 3, H, W) float32 in [-1, 1]
    masks: torch.Tensor  # (N, 1, H, W) float32 {0, 1}
    has_mask: torch.Tensor  # (N,) bool
    targets: torch.Tensor  # (N, n_heads) long, IGNORE where unknown
    synthetic: torch.Tensor  # (N,) bool

    def __len__(self) -> int:
        return len(self.ids)

    @staticmethod
    def concat(parts: list[LabelledImages]) -> LabelledImages:
        return LabelledImages(
            [i for p in parts for i in p.ids],
            torch.cat([p.images for p in parts]),
            torch.cat([p.masks for p in parts]),
            torch.cat([p.has_mask for p in parts]),
            torch.cat([p.targets for p in parts]),
            torch.cat([p.synthetic for p in parts]),
        )


def _target(row_label: str, attributes: dict[str, Any], head: HeadSpec) -> int:
    value = row_label if head.source == "label" else attributes.get(head.name)
    return head.classes.index(value) if value in head.classes else IGNORE


def load_labelled(
    records_dir: Path, split: str, heads: tuple[HeadSpec, ...], *, synthetic_only: bool = False
) -> LabelledImages:
    """The rows of ``split`` with their head targets.

    Args:
        synthetic_only: the directory holds synthetic rows; every row must be flagged (source
            ``synthetic://``) and in the train split, else this raises (they must never reach val/test).
    """
    if synthetic_only:
        flags = read_records(records_dir, ["source", "split"])
        sources = flags.column("source").to_pylist()
        splits = set(flags.column("split").to_pylist())
        if any(not s.startswith(SYNTHETIC_SOURCE) for s in sources) or splits - {"train"}:
            raise ConfigError(
                f"{records_dir} is given as synthetic rows, but holds rows that are not flagged "
                f"'{SYNTHETIC_SOURCE}...' or not in the train split; synthetic rows never enter val or test"
            )
    table = read_split(records_dir, split)
    images = decode_images(table.column("image").to_pylist())  # (N, H, W, 3)
    masks, has = decode_masks(table.column("mask").to_pylist(), images.shape[1:3])
    labels = table.column("label").to_pylist()
    attrs = [json.loads(a) for a in table.column("attributes").to_pylist()]
    targets = torch.tensor(
        [[_target(lab, att, h) for h in heads] for lab, att in zip(labels, attrs)], dtype=torch.long
    ).reshape(len(labels), len(heads))
    return LabelledImages(
        ids=table.column("id").to_pylist(),
        images=unit_range(torch.from_numpy(images).permute(0, 3, 1, 2)),
        masks=torch.from_numpy(masks).float().unsqueeze(1),
        has_mask=torch.from_numpy(has),
        targets=targets,
        synthetic=torch.tensor([s.startswith(SYNTHETIC_SOURCE) for s in table.column("source").to_pylist()]),
    )


def _head_slices(heads: tuple[HeadSpec, ...]) -> list[slice]:
    out, start = [], 0
    for h in heads:
        out.append(slice(start, start + len(h.classes)))
        start += len(h.classes)
    return out


def _segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sample Dice + BCE of mask logits (N, 1, S, S) against masks (N, 1, H, W)."""
    from monai.losses import DiceLoss

    target = F.interpolate(masks, size=logits.shape[-2:], mode="nearest")
    dice = DiceLoss(sigmoid=True, reduction="none")(logits, target).flatten(1).mean(1)  # (N,)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    return dice + bce


class ClassifierTask:
    """A :class:`~vgmedgen.platform.training.loop.StageTask` training one domain network."""

    def __init__(self, spec: ClassifierSpec, device: torch.device, name: str = "classifier") -> None:
        self.name = name
        self.spec = spec
        self.device = device
        real = load_labelled(spec.records_dir, "train", spec.heads)
        extra = [load_labelled(d, "train", spec.heads, synthetic_only=True) for d in spec.extra_train]
        self.train_data = LabelledImages.concat([real, *extra])
        try:
            self.val_data = load_labelled(spec.records_dir, spec.val_split, spec.heads)
        except ValueError:
            self.val_data = real
        self.slices = _head_slices(spec.heads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            self.module: DomainNet = build_domain_net(spec.net.model_copy(update={"seed": spec.seed}))
        self.module.to(device).train()
        self.loss_module: torch.nn.Module = self.module

    # -- StageTask --------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.module.parameters())

    def wrap_for_ddp(self, prepare: Any) -> None:
        self.loss_module = prepare(self.module)

    def train_size(self) -> int:
        return len(self.train_data)

    def train_batch(self, idx: np.ndarray, device: torch.device) -> dict:
        t = torch.as_tensor(idx, dtype=torch.long)
        d = self.train_data
        return {
            "image": d.images[t].to(device),
            "mask": d.masks[t].to(device),
            "has_mask": d.has_mask[t].to(device),
            "targets": d.targets[t].to(device),
        }

    def loss(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x = self.module.prepare(batch["image"])
        masks = batch["mask"]
        if self.spec.flip_augment:
            flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5  # (N,)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            masks = torch.where(flip[:, None, None, None], masks.flip(-1), masks)
        out = self.loss_module(x)
        if self.spec.net.kind == "segmentation":
            per = _segmentation_loss(out, masks) * batch["has_mask"].float()
            total = per.sum() / batch["has_mask"].float().sum().clamp_min(1.0)
            return {"seg": per, "total": total}
        terms: dict[str, torch.Tensor] = {}
        total = out.new_zeros(())
        for head, sl, k in zip(self.spec.heads, self.slices, range(len(self.slices))):
            target = batch["targets"][:, k]
            ce = F.cross_entropy(out[:, sl], target.clamp_min(0), reduction="none")  # (N,)
            valid = (target != IGNORE).float()
            terms[f"ce_{head.name}"] = ce * valid
            total = total + (ce * valid).sum() / valid.sum().clamp_min(1.0)
        return {**terms, "total": total}

    def after_step(self, step: int) -> None:
        pass

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.module.eval()
        n = min(len(self.val_data), 512)
        if self.spec.net.kind == "segmentation":
            probs = segment(self.module, self.val_data.images[:n], device=self.device)
            m = dice_iou(probs > 0.5, self.val_data.masks[:n] > 0.5, self.val_data.has_mask[:n])
            self.module.train()
            return {"dice": m["dice"], "iou": m["iou"], "score": m["dice"]}
        preds = predict(self.module, self.spec.heads, self.val_data.images[:n], device=self.device)
        out: dict[str, float] = {}
        for k, head in enumerate(self.spec.heads):
            target = self.val_data.targets[:n, k].numpy()
            out[f"bacc_{head.name}"] = balanced_accuracy(target, preds[:, k].numpy(), len(head.classes))
            keep = target != IGNORE
            out[f"acc_{head.name}"] = (
                float((preds[:, k].numpy()[keep] == target[keep]).mean()) if keep.any() else float("nan")
            )
        self.module.train()
        out["score"] = float(np.nanmean([out[f"bacc_{h.name}"] for h in self.spec.heads]))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])

    def export(self, directory: Path) -> None:
        with atomic_directory(directory) as tmp:
            save_domain_net(self.module, tmp / "net.safetensors")
            (tmp / "heads.json").write_text(json.dumps([h.model_dump(mode="json") for h in self.spec.heads]))
            (tmp / "metrics.json").write_text(json.dumps(self.validate()))

    def artifacts(self, step: int, directory: Path) -> list[Path]:
        return []


# ------------------------------------------------------------------------------------------------
# Inference and scores
# ------------------------------------------------------------------------------------------------


def _prepared_batches(net: DomainNet, images: torch.Tensor, device: torch.device, batch_size: int):
    for start in range(0, images.shape[0], batch_size):
        block = images[start : start + batch_size].to(device)
        yield net.prepare(block)


@torch.no_grad()
def predict(
    net: DomainNet,
    heads: tuple[HeadSpec, ...],
    images: torch.Tensor,
    *,
    device: Any = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """Predicted class index per head (N, n_heads) of images in [-1, 1] (float) or 0..255 (uint8)."""
    slices = _head_slices(heads)
    out = []
    for x in _prepared_batches(net, images, torch.device(device), batch_size):
        logits = net(x)  # (n, sum K)
        out.append(torch.stack([logits[:, sl].argmax(1) for sl in slices], 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def segment(
    net: DomainNet, images: torch.Tensor, *, device: Any = "cpu", batch_size: int = 256
) -> torch.Tensor:
    """Mask probabilities (N, 1, H, W) at the images' own size."""
    out = []
    h, w = images.shape[-2:]
    for x in _prepared_batches(net, images, torch.device(device), batch_size):
        p = torch.sigmoid(net(x))[:, :1]
        out.append(F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False).cpu())
    return torch.cat(out)


def balanced_accuracy(target: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Mean per-class recall over the classes present in ``target`` (rows with IGNORE skipped)."""
    from sklearn.metrics import balanced_accuracy_score

    keep = target != IGNORE
    if not keep.any():
        return float("nan")
    return float(balanced_accuracy_score(target[keep], pred[keep]))


def dice_iou(pred: torch.Tensor, target: torch.Tensor, has_mask: torch.Tensor) -> dict[str, float]:
    """Mean Dice and IoU (MONAI's metrics) over rows with a mask; an empty pair counts as 1."""
    from monai.metrics import DiceMetric, MeanIoU

    keep = has_mask.bool()
    if not keep.any():
        return {"dice": float("nan"), "iou": float("nan")}
    p, t = pred[keep].float(), target[keep].float()
    dice = DiceMetric(include_background=True, reduction="mean", ignore_empty=False)(p, t)
    iou = MeanIoU(include_background=True, reduction="mean", ignore_empty=False)(p, t)
    return {"dice": float(dice.mean()), "iou": float(iou.mean())}


# ------------------------------------------------------------------------------------------------
# Running and reusing
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainedNet:
    """A trained network with its heads, where it lies, and its validation metrics."""

    net: DomainNet
    heads: tuple[HeadSpec, ...]
    directory: Path
    metrics: dict[str, float]


def load_trained_net(directory: Path) -> TrainedNet:
    directory = Path(directory)
    if not (directory / "net.safetensors").is_file():
        raise FileNotFoundError(f"{directory} holds no trained network (net.safetensors missing)")
    heads = tuple(HeadSpec.model_validate(h) for h in json.loads((directory / "heads.json").read_text()))
    metrics = json.loads((directory / "metrics.json").read_text())
    return TrainedNet(load_domain_net(directory / "net.safetensors"), heads, directory, metrics)


def fit_classifier(
    spec: ClassifierSpec, storage: Path, name: str, scaling: ScalingOptions | None = None
) -> TrainedNet:
    """Train ``spec`` through the shared loop on Ray Train (or reuse the finished network of the same spec).

    The run name is ``<name>-<hash of spec and data>``; its export is ``<storage>/<run>/export``.
    """
    from vgmedgen.platform.training.trainer import build_trainer

    scaling = scaling or ScalingOptions(num_workers=0)
    run = net_run_name(name, spec.model_dump(mode="json"), (spec.records_dir, *spec.extra_train))
    export = Path(storage) / run / "export"
    if (export / "net.safetensors").is_file():
        log.info("[%s] reusing the trained network at %s", name, export)
        return load_trained_net(export)
    trainer = build_trainer(
        classifier_worker,
        {
            "spec": spec.model_dump_json(),
            "export": str(export),
            "name": name,
            "use_gpu": scaling.use_gpu,
            "threads": scaling.threads_per_worker,
        },
        scaling,
        name=run,
        storage=Path(storage),
        score_attribute=f"{name}/val_score",
        score_order="max",
        num_to_keep=spec.train.num_to_keep,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return load_trained_net(export)


def classifier_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function of :func:`fit_classifier` (the shared loop on a ClassifierTask)."""
    from vgmedgen.platform.training.loop import TrainContext, train_loop
    from vgmedgen.platform.training.trainer import worker_session

    spec = ClassifierSpec.model_validate_json(config["spec"])
    # threads None: the worker's own count (Ray sets OMP_NUM_THREADS from its CPUs), as before.
    with worker_session(config["use_gpu"], config["threads"], spec.seed) as device:
        task = ClassifierTask(spec, device, name=config["name"])
        train_loop(task, spec.train, spec.seed, TrainContext(), device, export_dir=Path(config["export"]))
