"""In-process generation for the controllability check: prompts drawn from records, images, pseudo-masks.

The evaluate job's generated set and the downstream benchmark's synthetic rows are made by the generation
pipeline (:mod:`vgmedgen.platform.generation.job`); this module keeps the prompt rows they read and the
small in-process sampler loop of the controllability check (matched and swapped prompt pairs).

Prompts (and so labels and requested factors) only ever come from the train split: the test split
is what generated images are compared with, and a synthetic row must not carry a test image's
description into training.

Shape legend: N images, H/W size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vgmedgen.model.sampler import SamplerConfig
from vgmedgen.platform.records import decode_masks, decode_png, read_split

__all__ = [
    "GeneratedSet",
    "PromptRows",
    "generate",
    "load_image_folder",
    "prompt_rows",
]


@dataclass
class PromptRows:
    """Rows of a split that prompts are drawn from: texts, labels, true masks and attributes."""

    ids: list[str]
    anatomy: list[str]
    style: list[str]
    labels: list[str]
    attributes: list[dict]
    masks: torch.Tensor  # (N, 1, H, W) float {0, 1}
    has_mask: torch.Tensor  # (N,) bool

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: Sequence[int]) -> PromptRows:
        idx = list(idx)
        t = torch.as_tensor(idx, dtype=torch.long)
        return PromptRows(
            [self.ids[i] for i in idx],
            [self.anatomy[i] for i in idx],
            [self.style[i] for i in idx],
            [self.labels[i] for i in idx],
            [self.attributes[i] for i in idx],
            self.masks[t],
            self.has_mask[t],
        )


def prompt_rows(records_dir: Path, split: str = "train") -> PromptRows:
    """The prompts, labels, masks and attributes of one split (images are not decoded)."""
    table = read_split(
        records_dir, split, columns=["id", "label", "mask", "anatomy_text", "style_text", "attributes"]
    )
    masks, has = decode_masks(table.column("mask").to_pylist())
    return PromptRows(
        table.column("id").to_pylist(),
        table.column("anatomy_text").to_pylist(),
        table.column("style_text").to_pylist(),
        table.column("label").to_pylist(),
        [json.loads(a) for a in table.column("attributes").to_pylist()],
        torch.from_numpy(masks).float().unsqueeze(1),
        torch.from_numpy(has),
    )


@dataclass
class GeneratedSet:
    """Images generated for (anatomy, style) prompt pairs, with their pseudo-masks."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    masks: torch.Tensor  # (N, 1, H, W) float in [0, 1], the stage-1 segmentor's pseudo-masks
    anatomy: list[str]
    style: list[str]
    seeds: list[int]

    def __len__(self) -> int:
        return self.images.shape[0]


@torch.no_grad()
def generate(
    model,
    anatomy: Sequence[str],
    style: Sequence[str],
    seeds: Sequence[int],
    *,
    sampler: SamplerConfig | None = None,
    batch_size: int = 64,
    desc: str = "generating",
) -> GeneratedSet:
    """Images for prompt pairs (image i depends only on its prompts and ``seeds[i]``), with a progress bar."""
    if not (len(anatomy) == len(style) == len(seeds)):
        raise ValueError(
            f"got {len(anatomy)} anatomy prompts, {len(style)} style prompts and {len(seeds)} seeds"
        )
    images, masks = [], []
    with tqdm(total=len(seeds), desc=desc, unit="image") as bar:
        for start in range(0, len(seeds), batch_size):
            sl = slice(start, start + batch_size)
            cond = model.conditions_from_prompts(list(anatomy[sl]), list(style[sl]))
            img, m = model.generate(cond, list(seeds[sl]), sampler=sampler)
            images.append((img.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
            masks.append(m.float().cpu())
            bar.update(img.shape[0])
    return GeneratedSet(torch.cat(images), torch.cat(masks), list(anatomy), list(style), list(seeds))


def load_image_folder(folder: Path, limit: int | None = None) -> torch.Tensor:
    """uint8 (N, 3, H, W) of the PNG/JPEG files in a folder (sorted by name); a clear error for bad files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"evaluate.generated_dir {folder} is not a directory of generated images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:limit]
    if not files:
        raise FileNotFoundError(f"evaluate.generated_dir {folder} holds no .png/.jpg files")
    arrays = []
    for p in tqdm(files, desc=f"reading {folder.name}", unit="image"):
        try:
            arrays.append(decode_png(p.read_bytes()))
        except Exception as exc:  # PIL raises several types for a broken file
            raise ValueError(f"{p} is not a readable image ({exc}); remove or regenerate it") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(
            f"the images in {folder} differ in size ({sorted(shapes)[:3]}); resize them to one size"
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
