"""How much an image looks like a mosaic of blocks: the signature of a transformer's patches drawn in pixels.

A pixel-space DiT with patch ``p`` predicts each ``p x p`` block from one token; when it is undertrained the
blocks show, and neighbouring pixels differ more across a block border than inside a block. The mosaic
index is the mean absolute difference of neighbouring pixels across block borders divided by the same
within blocks (horizontal and vertical pairs together): about 1 for natural images and real records,
above 1 for visible blocks.
"""

from __future__ import annotations

import torch

__all__ = ["mosaic_index"]


def mosaic_index(images: torch.Tensor, block: int) -> float:
    """The mosaic index of ``images`` on a grid of ``block``-pixel blocks.

    Args:
        images: (N, C, H, W), any value range (the ratio does not depend on it).
        block: the block side in pixels (the patch size times the autoencoder's downscale); at least 2.

    Returns:
        mean |difference| of neighbours across block borders / mean |difference| within blocks.

    Raises:
        ValueError: ``block`` < 2, the images are not (N, C, H, W), smaller than two blocks, or flat.
    """
    if block < 2:
        raise ValueError(f"block must be at least 2 pixels (got {block}): a 1-pixel grid has no inside")
    if images.ndim != 4 or min(images.shape[-2:]) < 2 * block:
        raise ValueError(
            f"images must be (N, C, H, W) of at least two {block}-pixel blocks, got {tuple(images.shape)}"
        )
    x = images.detach().float()
    across, within = [], []
    for dim in (-1, -2):
        diff = (x.narrow(dim, 1, x.shape[dim] - 1) - x.narrow(dim, 0, x.shape[dim] - 1)).abs()
        # The pair (i, i + 1) crosses a border when i + 1 is a multiple of the block.
        border = (torch.arange(1, x.shape[dim]) % block) == 0  # (size - 1,)
        shape = [1] * diff.ndim
        shape[dim] = -1
        border = border.view(shape).expand_as(diff)
        across.append(diff[border])
        within.append(diff[~border])
    inside = float(torch.cat(within).mean())
    if inside == 0:
        raise ValueError("the images are flat inside every block; the mosaic index is undefined")
    return float(torch.cat(across).mean()) / inside
