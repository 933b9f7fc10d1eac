"""Training data held by each worker: the records of one split as tensors, and deterministic batches.

Every batch is a pure function of (seed, step, micro-batch, rank): an epoch's order is a seeded
permutation of the split, and each rank takes its own stride of the global batch. A resumed run
therefore sees exactly the batches an undisturbed run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vgmedgen.platform.records import decode_images, decode_masks, read_split

__all__ = [
    "RecordArrays",
    "StreamBatches",
    "batch_indices",
    "decode_record_batch",
    "seed_global_rng",
    "step_generator",
    "unit_range",
]


@dataclass
class RecordArrays:
    """One split of a records directory, decoded once and held as uint8 (a quarter of float32's memory:
    HAM10000's 7,000 training images at 512 px are 5.5 GB per worker, not 22); ``batch`` converts the
    rows it takes to images in [-1, 1] and masks in {0, 1}."""

    ids: list[str]
    images: torch.Tensor  # (N, 3, H, W) uint8
    masks: torch.Tensor  # (N, 1, H, W) bool; all False where has_mask is False
    has_mask: torch.Tensor  # (N,) bool
    captions: list[str]
    anatomy_texts: list[str]
    style_texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def load(cls, records_dir: str | Path, split: str, limit: int | None = None) -> RecordArrays:
        table = read_split(records_dir, split, limit=limit)
        images = decode_images(table.column("image").to_pylist())  # (N, H, W, 3)
        masks, has = decode_masks(table.column("mask").to_pylist(), images.shape[1:3])
        return cls(
            ids=table.column("id").to_pylist(),
            images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            masks=torch.from_numpy(masks).unsqueeze(1),
            has_mask=torch.from_numpy(has),
            captions=table.column("caption").to_pylist(),
            anatomy_texts=table.column("anatomy_text").to_pylist(),
            style_texts=table.column("style_text").to_pylist(),
            labels=table.column("label").to_pylist(),
        )

    @classmethod
    def load_validation(cls, records_dir: str | Path, limit: int | None = None) -> RecordArrays:
        """The validation split, or the train split where the records have none."""
        try:
            return cls.load(records_dir, "val", limit=limit)
        except ValueError:
            return cls.load(records_dir, "train", limit=limit)

    def batch(self, idx: np.ndarray, device: torch.device | str = "cpu") -> dict:
        """The rows ``idx`` as a batch dict (float tensors on ``device``, texts as lists)."""
        t = torch.as_tensor(idx, dtype=torch.long)
        return {
            "index": t,
            "image": unit_range(self.images[t].to(device)),
            "mask": self.masks[t].to(device).float(),
            "has_mask": self.has_mask[t].to(device),
            "caption": [self.captions[i] for i in idx],
            "anatomy_text": [self.anatomy_texts[i] for i in idx],
            "style_text": [self.style_texts[i] for i in idx],
            "label": [self.labels[i] for i in idx],
        }


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def batch_indices(n: int, global_batch: int, seed: int, micro_step: int, rank: int, world: int) -> np.ndarray:
    """Row indices of one rank's share of global micro-batch ``micro_step``.

    Micro-batches walk through seeded per-epoch permutations of ``range(n)``; when ``n`` is not a
    multiple of the batch, the tail of an epoch is dropped. A batch larger than ``n`` samples with
    wrap-around within the permutation.
    """
    if n <= 0:
        raise ValueError("cannot draw batches from an empty split")
    per_epoch = max(n // global_batch, 1)
    epoch, pos = divmod(micro_step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    take = (np.arange(global_batch) + pos * global_batch) % n
    return perm[take][rank::world]


def _stream_seed(seed: int, micro_step: int, rank: int, stream: int) -> int:
    return int(np.random.default_rng([seed, micro_step, rank, stream]).integers(0, 2**62))


def step_generator(
    seed: int, micro_step: int, rank: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """The random stream of one rank's micro-batch (noise, timesteps, dropout): a pure function of its inputs."""
    g = torch.Generator(device=device)
    g.manual_seed(_stream_seed(seed, micro_step, rank, 7))
    return g


def seed_global_rng(seed: int, micro_step: int, rank: int) -> None:
    """Seed torch's global RNG (CPU and CUDA) for one rank's micro-batch.

    ``nn.Dropout`` (the text heads', a trained BERT's) draws from the global RNG, not from a generator
    the loop can pass. Seeding it per micro-step makes those draws a pure function of (seed, micro step,
    rank) too: a resumed run repeats them exactly whatever ran before, and ranks draw different masks
    instead of all starting from torch's one default seed. A different stream from ``step_generator``.
    """
    torch.manual_seed(_stream_seed(seed, micro_step, rank, 11))


def decode_record_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: record rows (PNG bytes) -> arrays a worker turns into tensors."""
    images = decode_images(batch["image"])  # (N, H, W, 3) uint8
    masks, has = decode_masks(batch["mask"], images.shape[1:3])  # (N, H, W) bool
    out = {"image": images, "mask": masks, "has_mask": has}
    for name in ("caption", "anatomy_text", "style_text", "label"):
        out[name] = np.asarray(batch[name], dtype=object)
    return out


def _tensors(batch: dict[str, np.ndarray], device: torch.device | str) -> dict:
    return {
        "image": unit_range(
            torch.from_numpy(np.ascontiguousarray(batch["image"])).permute(0, 3, 1, 2).to(device)
        ),
        "mask": torch.from_numpy(np.asarray(batch["mask"], bool))
        .unsqueeze(1)
        .to(device)
        .float(),  # (N, 1, H, W)
        "has_mask": torch.from_numpy(np.asarray(batch["has_mask"], bool)).to(device),
        **{k: [str(t) for t in batch[k]] for k in ("caption", "anatomy_text", "style_text", "label")},
    }


class StreamBatches:
    """Batches from this worker's Ray Data shard (``train.ingest=ray_data``), epoch after epoch.

    For datasets too large to hold in every worker. Batches follow Ray Data's order with a seeded
    local shuffle per epoch; unlike the in-memory path they are not a pure function of the step, so
    a resumed run restarts its epoch rather than replaying the exact batches.
    """

    def __init__(self, shard, micro_batch: int, seed: int) -> None:
        self.shard, self.micro, self.seed = shard, micro_batch, seed
        self._it = None
        self._epoch = 0

    def __call__(self, micro_step: int, device: torch.device | str) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = iter(
                    self.shard.iter_batches(
                        batch_size=self.micro,
                        batch_format="numpy",
                        drop_last=True,
                        local_shuffle_buffer_size=self.micro * 8,
                        local_shuffle_seed=self.seed + self._epoch,
                    )
                )
            try:
                return _tensors(next(self._it), device)
            except StopIteration:
                self._it, self._epoch = None, self._epoch + 1
        raise ValueError(f"this worker's data shard holds fewer than {self.micro} rows: lower the batch size")
