"""The mosaic index: border-to-interior neighbour differences on a block grid."""

from __future__ import annotations

import pytest
import torch

from vgmedgen.platform.evaluation.mosaic import mosaic_index


def test_hand_computed_ramp_and_blocks() -> None:
    # A horizontal ramp steps by 1 everywhere: across borders as within blocks, index 1.
    ramp = torch.arange(8.0).repeat(8, 1)[None, None]  # (1, 1, 8, 8)
    assert mosaic_index(ramp, 2) == pytest.approx(1.0)
    # Blocks of 2 whose values step by 2 at each border, plus a pixel pattern of 0.5 inside: horizontal
    # pairs differ by 2.5 across borders and 0.5 within; vertical pairs by 0 across (the rows repeat) and 0 within.
    cols = torch.tensor([0.0, 0.5, 2.0, 2.5, 4.0, 4.5, 6.0, 6.5])
    img = cols.repeat(8, 1)[None, None]
    across = (3 * 8 * 1.5 + 0) / (
        3 * 8 + 3 * 8
    )  # horizontal: 3 borders x 8 rows, |2 - 0.5| = 1.5; vertical: 0
    within = (4 * 8 * 0.5 + 0) / (4 * 8 + 4 * 8)
    assert mosaic_index(img, 2) == pytest.approx(across / within)


def test_noise_is_about_one_and_visible_blocks_are_far_above() -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(8, 3, 32, 32, generator=g)
    assert 0.95 < mosaic_index(noise, 4) < 1.05
    blocks = torch.rand(8, 3, 8, 8, generator=g).repeat_interleave(4, -1).repeat_interleave(4, -2)
    assert mosaic_index(blocks + 0.05 * noise, 4) > 5


@pytest.mark.parametrize(
    ("images", "block", "message"),
    [
        (torch.rand(1, 3, 8, 8), 1, "at least 2"),
        (torch.rand(3, 8, 8), 2, r"\(N, C, H, W\)"),
        (torch.rand(1, 3, 6, 6), 4, "two 4-pixel blocks"),
        (torch.zeros(1, 3, 8, 8), 2, "flat"),
    ],
)
def test_bad_input_is_named(images: torch.Tensor, block: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mosaic_index(images, block)
