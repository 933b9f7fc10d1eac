"""The scorer of the generation job: per-image features, measurements, confidence, memorisation and filters,
plus exact per-shard statistics of the accepted rows.

Two parts:

1. :class:`ScorerAssets`, computed once on the driver from the REAL data and saved to a directory:
   the domain network's reference (the evaluate job's domain extractor, trained when missing), the
   real train domain features (nearest-neighbour search), the real test-to-train nearest distances
   (memorisation threshold), the real train property values per class (bands), and the reference
   split's feature statistics per extractor, overall and per class (FD/KD).
2. :class:`Scorer`, a plain class that loads those assets once (in-process or inside a Ray Data
   actor: its constructor takes only a path, a small config and a device name) and maps a batch of
   the output table (PNG bytes in ``image`` and ``mask``) to the same batch plus the scorer columns.

:class:`ShardStats` folds the accepted rows of scored batches into mergeable float64 statistics
(:class:`~vgmedgen.platform.metrics.stats.FeatureSummary` per extractor, overall and per class);
:func:`score_accepted` turns the merged statistics into FD/KD rows against the reference split.

Shape legend: N rows of a batch, D feature width, R real train rows, H/W image size.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from vgmedgen.platform.datasets.measure import measure_image, measure_mask
from vgmedgen.platform.generation.config import FilterConfig
from vgmedgen.platform.generation.filters import PROPERTIES, PropertyBands, apply_filters
from vgmedgen.platform.metrics.memorisation import nearest_distances
from vgmedgen.platform.metrics.stats import FeatureSummary, MetricsError
from vgmedgen.platform.records import decode_png
from vgmedgen.platform.storage import atomic_directory

__all__ = [
    "ALL_CLASSES",
    "SCORER_COLUMNS",
    "SCORER_SCHEMA",
    "Scorer",
    "ScorerAssets",
    "ShardStats",
    "measure_rows",
    "score_accepted",
    "scored_to_arrow",
]

SCORER_COLUMNS: tuple[str, ...] = (
    "domain_features",
    "inception_features",
    "confidence",
    "nn_distance",
    "lesion_area",
    "lesion_cx",
    "lesion_cy",
    "lesion_rgb",
    "skin_rgb",
    "accepted",
    "reason",
)
# The scorer columns' Arrow types (the output table's contract): nullable lists stay lists, never tensors.
SCORER_SCHEMA = pa.schema(
    [
        ("domain_features", pa.list_(pa.float32())),
        ("inception_features", pa.list_(pa.float32())),
        ("confidence", pa.float64()),
        ("nn_distance", pa.float64()),
        ("lesion_area", pa.float64()),
        ("lesion_cx", pa.float64()),
        ("lesion_cy", pa.float64()),
        ("lesion_rgb", pa.list_(pa.float64())),
        ("skin_rgb", pa.list_(pa.float64())),
        ("accepted", pa.bool_()),
        ("reason", pa.string()),
    ]
)
ALL_CLASSES = "__all__"  # the statistics key of all rows, labelled or not
_ASSETS_FILE = "assets.json"
_ARRAYS_FILE = "arrays.npz"


# --------------------------------------------------------------------------------------------------
# Measurements (the project's measure_mask / measure_image, in the scorer's column names)
# --------------------------------------------------------------------------------------------------


def measure_rows(images: np.ndarray, masks: np.ndarray) -> dict[str, list[Any]]:
    """Scorer property columns of (N, H, W, 3) uint8 images and their (N, H, W) bool masks.

    Centroid and colours are null where a mask is empty (no lesion to place or colour); the area is
    then 0.
    """
    out: dict[str, list[Any]] = {p: [] for p in PROPERTIES}
    for image, mask in zip(images, masks):
        m = measure_mask(mask)
        s = measure_image(image, mask)
        empty = m["area"] == 0
        out["lesion_area"].append(float(m["area"]))
        out["lesion_cx"].append(None if empty else float(m["centroid_x"]))
        out["lesion_cy"].append(None if empty else float(m["centroid_y"]))
        out["lesion_rgb"].append(None if empty else [float(v) for v in s["lesion_rgb"]])
        out["skin_rgb"].append(None if empty else [float(v) for v in s["background_rgb"]])
    return out


def scored_to_arrow(batch: Mapping[str, Any]) -> pa.Table:
    """A scored batch as an Arrow table with the scorer columns typed by :data:`SCORER_SCHEMA`.

    Return this from a Ray Data actor: a dict of numpy arrays would turn the feature lists into Ray's
    tensor extension type, which plain pyarrow reads back badly; other columns keep their inferred types.
    """
    arrays, fields = [], []
    for name, column in batch.items():
        if name in SCORER_SCHEMA.names:
            typ = SCORER_SCHEMA.field(name).type
            if pa.types.is_list(typ):
                column = [None if v is None else np.asarray(v).tolist() for v in column]
            arrays.append(pa.array(list(column) if not isinstance(column, np.ndarray) else column, type=typ))
        else:
            arrays.append(
                pa.array(
                    list(column) if isinstance(column, np.ndarray) and column.dtype == object else column
                )
            )
        fields.append(name)
    return pa.Table.from_arrays(arrays, names=fields)


def _empty_like(summary: FeatureSummary, stats: ShardStats) -> FeatureSummary:
    return FeatureSummary.empty(summary.stats.dim, stats.reservoir_size, stats.seed)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8


# --------------------------------------------------------------------------------------------------
# Shard statistics
# --------------------------------------------------------------------------------------------------


@dataclass
class ShardStats:
    """Mergeable statistics of accepted rows: extractor -> class (or :data:`ALL_CLASSES`) -> FeatureSummary.

    Unlabelled rows count in :data:`ALL_CLASSES` only. Summaries keep a seeded bottom-k reservoir
    keyed by ``sample_id``, so the KD sample does not depend on how rows were split into shards.
    """

    reservoir_size: int
    seed: int
    summaries: dict[str, dict[str, FeatureSummary]] = field(default_factory=dict)

    def add(
        self, extractor: str, features: Any, labels: Sequence[str | None], row_ids: Sequence[Any]
    ) -> ShardStats:
        """Add (N, D) feature rows with their labels and unique ids; returns self."""
        feats = np.asarray(features, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] != len(labels) or len(labels) != len(row_ids):
            raise MetricsError(
                f"ShardStats.add needs (N, D) features with N labels and ids; got {feats.shape}, "
                f"{len(labels)} labels, {len(row_ids)} ids"
            )
        if feats.shape[0] == 0:
            return self
        groups = self.summaries.setdefault(extractor, {})
        keys: dict[str, list[int]] = {ALL_CLASSES: list(range(len(labels)))}
        for i, lab in enumerate(labels):
            if lab is not None:
                keys.setdefault(str(lab), []).append(i)
        for key, idx in keys.items():
            summary = groups.get(key)
            if summary is None:
                summary = groups[key] = FeatureSummary.empty(feats.shape[1], self.reservoir_size, self.seed)
            summary.update(feats[idx], [str(row_ids[i]) for i in idx])
        return self

    def add_batch(self, batch: Mapping[str, Any]) -> ShardStats:
        """Add the accepted rows of a scored batch (every non-null feature column); returns self."""
        accepted = np.asarray(batch["accepted"], dtype=bool)
        idx = np.flatnonzero(accepted)
        labels = [batch["label"][i] for i in idx]
        ids = [batch["sample_id"][i] for i in idx]
        for column in ("domain_features", "inception_features"):
            rows = [batch[column][i] for i in idx]
            if not rows or any(r is None for r in rows):
                continue
            self.add(column.removesuffix("_features"), np.stack([np.asarray(r) for r in rows]), labels, ids)
        return self

    def merge(self, other: ShardStats) -> ShardStats:
        """A new ShardStats with both parts (neither is changed)."""
        if (self.reservoir_size, self.seed) != (other.reservoir_size, other.seed):
            raise MetricsError(
                f"cannot merge shard statistics of different (reservoir_size, seed): "
                f"{(self.reservoir_size, self.seed)} vs {(other.reservoir_size, other.seed)}"
            )
        out = ShardStats(self.reservoir_size, self.seed)
        for ext in sorted(set(self.summaries) | set(other.summaries)):
            a, b = self.summaries.get(ext, {}), other.summaries.get(ext, {})
            # A group present on one side only is copied (merged with an empty summary), never shared.
            out.summaries[ext] = {
                key: (a.get(key) or _empty_like(b[key], self)).merge(b.get(key) or _empty_like(a[key], self))
                for key in sorted(set(a) | set(b))
            }
        return out

    @classmethod
    def merge_all(cls, parts: Sequence[ShardStats]) -> ShardStats:
        if not parts:
            raise MetricsError("merge_all needs at least one ShardStats")
        out = parts[0]
        for part in parts[1:]:
            out = out.merge(part)
        return out

    def to_dict(self) -> dict[str, np.ndarray]:
        """Flat ``"<extractor>/<class>/<field>" -> array`` (np.savez-able; exact round trip)."""
        out = {
            "reservoir_size": np.asarray(self.reservoir_size, np.int64),
            "seed": np.asarray(self.seed, np.int64),
        }
        for ext, groups in self.summaries.items():
            for key, summary in groups.items():
                out.update({f"{ext}/{key}/{k}": v for k, v in summary.to_dict().items()})
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardStats:
        try:
            out = cls(int(np.asarray(data["reservoir_size"])), int(np.asarray(data["seed"])))
        except KeyError as err:
            raise MetricsError(
                f"ShardStats dict lacks {err}; it was not written by ShardStats.to_dict"
            ) from None
        parts: dict[tuple[str, str], dict[str, Any]] = {}
        for name, value in data.items():
            if name in ("reservoir_size", "seed"):
                continue
            ext, key, rest = str(name).split("/", 2)
            parts.setdefault((ext, key), {})[rest] = value
        for (ext, key), fields in parts.items():
            out.summaries.setdefault(ext, {})[key] = FeatureSummary.from_dict(fields)
        return out

    def save(self, path: Path) -> Path:
        """Write to one ``.npz`` file (no pickles)."""
        np.savez(path, **self.to_dict())
        return path

    @classmethod
    def load(cls, path: Path) -> ShardStats:
        with np.load(path, allow_pickle=False) as data:
            return cls.from_dict({k: data[k] for k in data.files})


def score_accepted(
    generated: ShardStats,
    reference: ShardStats,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 2020,
) -> list[dict[str, Any]]:
    """FD and KD of the accepted generated rows against the reference split, overall and per class.

    A class is scored only where both sets have more rows than the feature width (else its
    covariance is singular and FD meaningless): the row then has ``fd``/``kd_*`` None and a ``note``.

    Returns:
        Rows ``{"extractor", "class", "n_generated", "n_reference", "fd", "kd_mean", "kd_std", "note"}``;
        class :data:`ALL_CLASSES` is the whole set.
    """
    from vgmedgen.platform.metrics.fidelity import compute_distances

    rows: list[dict[str, Any]] = []
    for ext in sorted(reference.summaries):
        gen_groups = generated.summaries.get(ext, {})
        for key in sorted(reference.summaries[ext], key=lambda k: (k != ALL_CLASSES, k)):
            ref = reference.summaries[ext][key]
            gen = gen_groups.get(key)
            n_gen, n_ref, dim = (0 if gen is None else gen.count), ref.count, ref.stats.dim
            row: dict[str, Any] = {
                "extractor": ext,
                "class": key,
                "n_generated": n_gen,
                "n_reference": n_ref,
                "fd": None,
                "kd_mean": None,
                "kd_std": None,
                "note": None,
            }
            small = n_gen < 2 or n_ref < 2 if key == ALL_CLASSES else n_gen <= dim or n_ref <= dim
            if gen is None or small:
                row["note"] = (
                    f"n/a: needs more rows than the {dim} feature dimensions in both sets "
                    f"(accepted {n_gen}, reference {n_ref})"
                    if key != ALL_CLASSES
                    else f"n/a: needs at least 2 rows in both sets (accepted {n_gen}, reference {n_ref})"
                )
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    d = compute_distances(
                        gen, ref, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed
                    )
                row.update(fd=d.fd, kd_mean=d.kd_mean, kd_std=d.kd_std)
                if d.warnings:
                    row["note"] = "; ".join(d.warnings)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Assets (driver side, real data)
# --------------------------------------------------------------------------------------------------


@dataclass
class ScorerAssets:
    """What the scorer needs from the real data, saved once to a directory.

    Attributes:
        directory: where the assets lie.
        domain_net_dir: the trained domain network (``load_trained_net``), a classifier for labelled
            datasets (its softmax gives the confidence) or a segmentation U-Net.
        domain_kind: ``classifier`` or ``segmentation``.
        inception_weights: torch-fidelity's Inception weights file, or None (no Inception features).
        train_features: (R, D) float32 real train domain features.
        test_nn: real reference-to-train nearest distances (memorisation threshold).
        bands: real train property values per class.
        reference: reference split statistics per extractor, overall and per class.
    """

    directory: Path
    domain_net_dir: Path
    domain_kind: str
    inception_weights: Path | None
    train_features: np.ndarray
    test_nn: np.ndarray
    bands: PropertyBands
    reference: ShardStats

    @classmethod
    def from_arrays(
        cls,
        out_dir: Path,
        *,
        domain_net_dir: Path,
        train_images: np.ndarray,
        train_masks: np.ndarray,
        train_labels: Sequence[str | None],
        reference_images: np.ndarray,
        reference_labels: Sequence[str | None],
        inception_weights: Path | None = None,
        reservoir_size: int = 10_000,
        seed: int = 2020,
        device: str = "cpu",
    ) -> ScorerAssets:
        """Compute and save the assets from decoded real images (uint8 (R, H, W, 3), masks (R, H, W) bool)."""
        from vgmedgen.platform.metrics.fidelity import (
            create_domain_extractor,
            create_inception_extractor,
            extract_features,
        )
        from vgmedgen.platform.training.classify import load_trained_net

        trained = load_trained_net(domain_net_dir)
        kind = trained.net.config.kind
        extractors = {"domain": create_domain_extractor(trained.net, device)}
        if inception_weights is not None:
            extractors["inception"] = create_inception_extractor(inception_weights, device)
        reference = ShardStats(reservoir_size, seed)
        train_features = None
        for name, extractor in extractors.items():
            ref = extract_features(extractor, _nchw(reference_images), desc=None, progress=False).numpy()
            reference.add(name, ref, list(reference_labels), [f"ref-{i}" for i in range(len(ref))])
            if name == "domain":
                train_features = extract_features(
                    extractor, _nchw(train_images), desc=None, progress=False
                ).numpy()
                test_nn = nearest_distances(ref, train_features)
        assert train_features is not None  # the domain extractor is always first
        bands = PropertyBands.from_rows(list(train_labels), measure_rows(train_images, train_masks))
        out_dir = Path(out_dir)
        with atomic_directory(out_dir) as tmp:
            arrays = {"train_features": train_features.astype(np.float32), "test_nn": test_nn}
            arrays.update({f"bands/{k}": v for k, v in bands.to_dict().items()})
            arrays.update({f"reference/{k}": v for k, v in reference.to_dict().items()})
            np.savez(tmp / _ARRAYS_FILE, **arrays)
            (tmp / _ASSETS_FILE).write_text(
                json.dumps(
                    {
                        "domain_net_dir": str(Path(domain_net_dir).resolve()),
                        "domain_kind": kind,
                        "inception_weights": None
                        if inception_weights is None
                        else str(Path(inception_weights).resolve()),
                    },
                    indent=2,
                )
            )
        return cls.load(out_dir)

    @staticmethod
    def _inputs(cfg: Any, address: str | None) -> tuple[Any, Path | None, str]:
        """The domain network (trained or reused), the Inception weights (or None) and a key of everything
        the assets of ``cfg`` are computed from."""
        from vgmedgen.platform.cluster import connect
        from vgmedgen.platform.evaluation.driver import domain_extractor
        from vgmedgen.platform.metrics.fidelity import check_inception_weights
        from vgmedgen.platform.runs import scorer_assets_name

        ev = cfg.evaluate
        # A config that demands FID fails here, before any training; an optional one just goes without.
        weights = None
        if ev.fidelity.fid != "off" and check_inception_weights(ev.fidelity) is None:
            weights = ev.fidelity.feature_extractor_weights_path
        connect(address)
        # The evaluate job's own domain network (same storage, same run name): trained once, reused after.
        trained, _ = domain_extractor(cfg, cfg.evaluation_storage)
        key = scorer_assets_name(
            trained.directory,
            cfg.records_dir,
            ev.reference_split,
            weights,
            ev.fidelity.reservoir_size,
            ev.fidelity.seed,
        )
        return trained, weights, key

    @classmethod
    def build(cls, cfg: Any, out_dir: Path, *, address: str | None = None) -> ScorerAssets:
        """The driver step: train (or reuse) the evaluate job's domain network and save the assets of ``cfg``.

        May start Ray (the domain network trains through the shared loop on Ray Train).
        """
        trained, weights, _ = cls._inputs(cfg, address)
        return cls._compute(cfg, out_dir, trained.directory, weights)

    @classmethod
    def cached(cls, cfg: Any, root: Path, *, address: str | None = None) -> ScorerAssets:
        """The assets of ``cfg`` under ``root/<key>``, computed once per key (domain network, records,
        reference split, Inception weights, reservoir settings) and reused by every later generation."""
        trained, weights, key = cls._inputs(cfg, address)
        directory = Path(root) / key
        if (directory / _ASSETS_FILE).is_file():
            return cls.load(directory)
        return cls._compute(cfg, directory, trained.directory, weights)

    @classmethod
    def _compute(cls, cfg: Any, out_dir: Path, domain_net_dir: Path, weights: Path | None) -> ScorerAssets:
        from vgmedgen.platform.records import decode_images, decode_masks, read_split

        ev = cfg.evaluate

        def split(name: str) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
            table = read_split(cfg.records_dir, name, ["image", "mask", "label"])
            images = decode_images(table.column("image").to_pylist(), desc=f"decoding the real {name} split")
            masks, _ = decode_masks(table.column("mask").to_pylist(), images.shape[1:3])
            return images, masks, table.column("label").to_pylist()

        train_images, train_masks, train_labels = split("train")
        ref_images, _, ref_labels = split(ev.reference_split)
        return cls.from_arrays(
            out_dir,
            domain_net_dir=domain_net_dir,
            train_images=train_images,
            train_masks=train_masks,
            train_labels=train_labels,
            reference_images=ref_images,
            reference_labels=ref_labels,
            inception_weights=weights,
            reservoir_size=ev.fidelity.reservoir_size,
            seed=ev.fidelity.seed,
        )

    @classmethod
    def load(cls, directory: Path) -> ScorerAssets:
        directory = Path(directory)
        if not (directory / _ASSETS_FILE).is_file():
            raise FileNotFoundError(
                f"{directory} holds no scorer assets ({_ASSETS_FILE} missing); build them with ScorerAssets.build"
            )
        meta = json.loads((directory / _ASSETS_FILE).read_text())
        with np.load(directory / _ARRAYS_FILE, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        return cls(
            directory=directory,
            domain_net_dir=Path(meta["domain_net_dir"]),
            domain_kind=meta["domain_kind"],
            inception_weights=None if meta["inception_weights"] is None else Path(meta["inception_weights"]),
            train_features=arrays["train_features"],
            test_nn=arrays["test_nn"],
            bands=PropertyBands.from_dict({k[6:]: v for k, v in arrays.items() if k.startswith("bands/")}),
            reference=ShardStats.from_dict(
                {k[10:]: v for k, v in arrays.items() if k.startswith("reference/")}
            ),
        )

    def memorisation_threshold(self, percentile: float) -> float:
        """The ``percentile``-th percentile of real test-to-train nearest distances."""
        return float(np.percentile(self.test_nn, percentile))


# --------------------------------------------------------------------------------------------------
# The per-batch scorer
# --------------------------------------------------------------------------------------------------


class Scorer:
    """Maps a batch of the output table to the same batch plus :data:`SCORER_COLUMNS`.

    Picklable constructor arguments only (a directory, a small config, a device name): Ray Data
    builds one per actor, and the heavy state (networks, train features) loads here, once.
    """

    def __init__(
        self,
        assets_dir: str | Path,
        filters: FilterConfig | Mapping[str, Any] | None = None,
        device: str = "cpu",
    ) -> None:
        from vgmedgen.platform.metrics.fidelity import (
            create_domain_extractor,
            create_inception_extractor,
            resolve_device,
        )
        from vgmedgen.platform.training.classify import load_trained_net

        self.assets = ScorerAssets.load(Path(assets_dir))
        self.filters = FilterConfig.model_validate(filters or {})
        self.device = resolve_device(device)
        trained = load_trained_net(self.assets.domain_net_dir)
        self.net = trained.net.to(self.device).eval()
        self.classes: tuple[str, ...] = trained.heads[0].classes if trained.heads else ()
        self.domain = create_domain_extractor(self.net, self.device)
        self.inception = (
            None
            if self.assets.inception_weights is None
            else create_inception_extractor(self.assets.inception_weights, self.device)
        )
        self.threshold = (
            None
            if self.filters.memorisation_percentile is None
            else self.assets.memorisation_threshold(self.filters.memorisation_percentile)
        )

    @torch.no_grad()
    def _confidence(self, images: torch.Tensor, labels: Sequence[str | None]) -> list[float | None]:
        # Single-class datasets have a segmentation net and no classifier: confidence does not apply.
        if len(self.classes) < 2:
            return [None] * len(labels)
        logits = self.net(self.net.prepare(images.to(self.device)))[:, : len(self.classes)]  # (N, K)
        probs = torch.softmax(logits.double(), dim=1).cpu().numpy()
        out: list[float | None] = []
        for i, lab in enumerate(labels):
            out.append(float(probs[i, self.classes.index(lab)]) if lab in self.classes else None)
        return out

    def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """(N, D) float32 features of (N, H, W, 3) uint8 images per extractor: ``domain``, and ``inception``
        when the assets name the Inception weights."""
        from vgmedgen.platform.metrics.fidelity import extract_features

        x = _nchw(images)
        out = {
            "domain": extract_features(self.domain, x, desc=None, progress=False).numpy().astype(np.float32)
        }
        if self.inception is not None:
            out["inception"] = (
                extract_features(self.inception, x, desc=None, progress=False).numpy().astype(np.float32)
            )
        return out

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Score one batch; the input is left untouched (Ray Data batches are read-only views)."""
        missing = [c for c in ("sample_id", "label", "image", "mask") if c not in batch]
        if missing:
            raise ValueError(f"a scorer batch needs the columns {missing} (from the plan and the sampler)")
        images = np.stack([decode_png(b) for b in batch["image"]])  # (N, H, W, 3) uint8
        masks = np.stack([decode_png(b, "L") > 127 for b in batch["mask"]])  # (N, H, W) bool
        labels = [None if lab is None else str(lab) for lab in batch["label"]]
        x = _nchw(images)
        features = self.features(images)
        domain, inception = features["domain"], features.get("inception")
        out: dict[str, Any] = dict(batch)  # a new dict; the input's arrays are shared, never written
        out["domain_features"] = list(domain)
        out["inception_features"] = [None] * len(labels) if inception is None else list(inception)
        out["confidence"] = self._confidence(x, labels)
        out["nn_distance"] = nearest_distances(domain, self.assets.train_features).astype(np.float64)
        out.update(measure_rows(images, masks))
        accepted, reasons = apply_filters(
            {**out, "label": labels},
            self.filters,
            memorisation_threshold=self.threshold,
            bands=self.assets.bands,
        )
        out["accepted"] = accepted
        out["reason"] = reasons
        return out
