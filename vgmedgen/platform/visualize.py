"""Pictures people look at: image grids (sample grids, swap grids) as PNG files.

Grids of generated images take a ``provenance`` (:mod:`vgmedgen.platform.images`) so that the PNG
says it is synthetic; grids of real images leave it None.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from vgmedgen.platform.images import save_png

__all__ = ["save_grid", "save_swap_grid"]


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)  # (N, 3, H, W)


def save_grid(
    images: torch.Tensor,
    path: Path,
    ncol: int = 8,
    scale: int = 2,
    provenance: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """Save (N, 3, H, W) images in [0, 1] as one PNG grid, upscaled ``scale`` times (nearest).

    ``provenance`` (for generated images) is embedded and marks the PNG synthetic. ``title`` (one or
    a few lines) is written in a white band above the grid.
    """
    from torchvision.utils import make_grid

    grid = make_grid(_to_uint8(images), nrow=ncol, padding=2, pad_value=255)  # (3, H', W')
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if title:
        text = _wrap(title, max(img.width // 6, 8))
        band = 14 * (text.count("\n") + 1) + 4  # Pillow's default bitmap font is about 11 px high
        canvas = Image.new("RGB", (img.width, img.height + band), "white")
        ImageDraw.Draw(canvas).text((2, 2), text, fill="black")
        canvas.paste(img, (0, band))
        img = canvas
    return save_png(img, path, provenance)


def save_swap_grid(
    images: torch.Tensor,
    rows: list[str],
    cols: list[str],
    path: Path,
    scale: int = 3,
    label_width: int = 220,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """A swap grid: row i = anatomy prompt i, column j = style prompt j; (R*C, 3, H, W) images, row-major.

    ``provenance`` is embedded and marks the PNG synthetic (build grids with
    :class:`~vgmedgen.platform.generation.grid.SwapGrid`, which passes its own).
    """
    n_r, n_c = len(rows), len(cols)
    ims = _to_uint8(images).permute(0, 2, 3, 1).numpy()  # (R*C, H, W, 3)
    h, w = ims.shape[1] * scale, ims.shape[2] * scale
    pad, head = 2, 40
    canvas = Image.new("RGB", (label_width + n_c * (w + pad), head + n_r * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(cols):
        draw.text((label_width + j * (w + pad), 2), _wrap(text, w // 6), fill="black")
    for i, text in enumerate(rows):
        draw.text((2, head + i * (h + pad)), _wrap(text, label_width // 6), fill="black")
        for j in range(n_c):
            tile = Image.fromarray(ims[i * n_c + j]).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_width + j * (w + pad), head + i * (h + pad)))
    return save_png(canvas, path, provenance)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > max(width, 8):
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:4])
