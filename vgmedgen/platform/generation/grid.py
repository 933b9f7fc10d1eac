"""The swap grid: anatomy prompts (rows) crossed with style prompts (columns), the picture of control.

Every cell is sampled with the seeds ``seed, seed + 1, ..., seed + seeds_per_cell - 1``, the same
in every cell, so along a row or a column only the prompt changes: a model that ignores its
anatomy prompt draws the same image down a column. :meth:`SwapGrid.requests` lists one
:class:`~vgmedgen.platform.generation.request.SampleRequest` per image, row-major with seeds
innermost, and :meth:`SwapGrid.cells` the (row, column, seed) of each; training artefacts,
adherence, sweeps and serve all build their grids here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import Field, field_validator, model_validator

from vgmedgen.platform.generation.request import (
    SEED_LIMIT,
    SampleRequest,
    SamplingChecks,
    check_prompt,
)
from vgmedgen.platform.images import provenance_fields
from vgmedgen.platform.visualize import save_grid, save_swap_grid

__all__ = ["GridCell", "SwapGrid"]


class GridCell(NamedTuple):
    """Where an image of a swap grid sits: its row (anatomy prompt), column (style prompt) and seed."""

    row: int
    column: int
    seed: int


class SwapGrid(SamplingChecks):
    """Anatomy prompts x style prompts, ``seeds_per_cell`` images per cell.

    Attributes:
        anatomy_prompts: one per row.
        style_prompts: one per column.
        seeds_per_cell: images per cell (seeds ``seed, ..., seed + seeds_per_cell - 1`` in every cell).
        seed: the first seed.
        num_steps: DPM-Solver++ steps of every image (None: the model's).
        guidance_anatomy: g_a of every image (None: the model's).
        guidance_style: g_s of every image (None: the model's).
    """

    anatomy_prompts: tuple[str, ...] = Field(min_length=1)
    style_prompts: tuple[str, ...] = Field(min_length=1)
    seeds_per_cell: int = Field(1, ge=1, le=64)
    seed: int = 0
    num_steps: int | None = None
    guidance_anatomy: float | None = None
    guidance_style: float | None = None

    @field_validator("anatomy_prompts", "style_prompts")
    @classmethod
    def _prompts(cls, prompts: tuple[str, ...]) -> tuple[str, ...]:
        for text in prompts:
            check_prompt(text)
        return prompts

    @model_validator(mode="after")
    def _last_seed(self) -> SwapGrid:
        if self.seed + self.seeds_per_cell > SEED_LIMIT:
            raise ValueError(f"seed + seeds_per_cell must not exceed 2**31; lower seed (got {self.seed})")
        return self

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns)."""
        return len(self.anatomy_prompts), len(self.style_prompts)

    def cells(self) -> list[GridCell]:
        """The (row, column, seed) of every image: row-major, seeds innermost."""
        n_rows, n_cols = self.shape
        seeds = range(self.seed, self.seed + self.seeds_per_cell)
        return [GridCell(i, j, s) for i in range(n_rows) for j in range(n_cols) for s in seeds]

    def requests(self) -> list[SampleRequest]:
        """One single-image request per cell and seed, in the order of :meth:`cells`."""
        return [
            SampleRequest(
                anatomy_prompt=self.anatomy_prompts[c.row],
                style_prompt=self.style_prompts[c.column],
                seed=c.seed,
                n=1,
                num_steps=self.num_steps,
                guidance_anatomy=self.guidance_anatomy,
                guidance_style=self.guidance_style,
            )
            for c in self.cells()
        ]

    def cell_requests(self) -> list[SampleRequest]:
        """One request per cell, its ``seeds_per_cell`` images with the cell's consecutive seeds: the images
        of :meth:`requests` in the same order, in fewer requests."""
        return [
            SampleRequest(
                anatomy_prompt=anatomy,
                style_prompt=style,
                seed=self.seed,
                n=self.seeds_per_cell,
                num_steps=self.num_steps,
                guidance_anatomy=self.guidance_anatomy,
                guidance_style=self.guidance_style,
            )
            for anatomy in self.anatomy_prompts
            for style in self.style_prompts
        ]

    def provenance(self, model_version: str | None = None, **extra: Any) -> dict[str, str]:
        """Provenance of a grid picture: the prompts, the seeds and the settings (plus ``extra``)."""
        return provenance_fields(
            model_version=model_version,
            kind="swap grid",
            anatomy_prompts=list(self.anatomy_prompts),
            style_prompts=list(self.style_prompts),
            seed=self.seed,
            seeds_per_cell=self.seeds_per_cell,
            num_steps=self.num_steps,
            guidance_anatomy=self.guidance_anatomy,
            guidance_style=self.guidance_style,
            **extra,
        )

    def _check(self, images: torch.Tensor) -> None:
        want = len(self.cells())
        if images.ndim != 4 or images.shape[0] != want:
            raise ValueError(
                f"a {self.shape[0]}x{self.shape[1]} swap grid with {self.seeds_per_cell} seeds per cell needs "
                f"{want} images (N, 3, H, W) in the order of cells(), got shape {tuple(images.shape)}"
            )

    def save(self, images: torch.Tensor, path: Path, provenance: Mapping[str, Any] | None = None) -> Path:
        """Save the swap-grid PNG: the first seed of every cell, prompts as row and column labels.

        Args:
            images: (N, 3, H, W) in [0, 1], one per :meth:`cells` entry, in that order.
            path: the PNG to write.
            provenance: what the PNG records (default :meth:`provenance`); it is always marked synthetic.
        """
        self._check(images)
        return save_swap_grid(
            images[:: self.seeds_per_cell],
            list(self.anatomy_prompts),
            list(self.style_prompts),
            path,
            provenance=self.provenance() if provenance is None else provenance,
        )

    def save_all(self, images: torch.Tensor, path: Path, provenance: Mapping[str, Any] | None = None) -> Path:
        """Save every image as a plain grid: one grid row per anatomy prompt, cells side by side with
        their seeds next to each other (arguments as :meth:`save`)."""
        self._check(images)
        return save_grid(
            images,
            path,
            ncol=self.shape[1] * self.seeds_per_cell,
            provenance=self.provenance() if provenance is None else provenance,
        )
