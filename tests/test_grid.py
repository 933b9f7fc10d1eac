"""The swap grid (order, seeds, saved PNG), sampling requests in shared batches, and the dit stage's grid."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_model_version import ANATOMY, CAPTIONS, STYLE, make_text_encoder, make_trained_model  # noqa: E402

from vgmedgen.model.vgmedgen import VGMedGen  # noqa: E402
from vgmedgen.platform.generation.grid import GridCell, SwapGrid  # noqa: E402
from vgmedgen.platform.generation.request import SampleRequest, parse_request  # noqa: E402
from vgmedgen.platform.generation.sample import generate_samples  # noqa: E402
from vgmedgen.platform.images import read_provenance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core box
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> VGMedGen:
    return make_trained_model(
        make_text_encoder(tmp_path_factory.mktemp("bert")), {"sampler": {"num_steps": 2}}
    )


def test_cells_are_row_major_with_the_same_seeds_in_every_cell() -> None:
    grid = SwapGrid(anatomy_prompts=("a0", "a1"), style_prompts=("s0", "s1", "s2"), seeds_per_cell=2, seed=10)
    cells = grid.cells()
    assert grid.shape == (2, 3) and len(cells) == 2 * 3 * 2
    assert cells[:4] == [GridCell(0, 0, 10), GridCell(0, 0, 11), GridCell(0, 1, 10), GridCell(0, 1, 11)]
    assert cells[-1] == GridCell(1, 2, 11)
    requests = grid.requests()
    assert [(r.anatomy_prompt, r.style_prompt, r.seed, r.n) for r in requests] == [
        (f"a{c.row}", f"s{c.column}", c.seed, 1) for c in cells
    ]
    assert {r.seed for r in requests[::2]} == {10}  # the first seed of every cell


def test_grid_settings_reach_every_request_and_bad_grids_fail() -> None:
    grid = SwapGrid(anatomy_prompts=("a",), style_prompts=("s",), num_steps=3, guidance_style=2.0)
    (request,) = grid.requests()
    assert (request.num_steps, request.guidance_anatomy, request.guidance_style) == (3, None, 2.0)
    for bad, where in (
        ({"anatomy_prompts": ()}, "anatomy_prompts"),
        ({"style_prompts": (" ",)}, "is empty; describe the image"),
        ({"seeds_per_cell": 0}, "seeds_per_cell"),
        ({"num_steps": 0}, "must be a positive integer"),
        ({"seed": 2**31 - 1, "seeds_per_cell": 2}, "lower seed"),
    ):
        with pytest.raises(ValidationError, match=where):
            SwapGrid.model_validate({"anatomy_prompts": ("a",), "style_prompts": ("s",), **bad})


def test_saved_grid_png_shows_the_first_seed_of_every_cell(tmp_path: Path) -> None:
    grid = SwapGrid(anatomy_prompts=("a0", "a1"), style_prompts=("s0", "s1", "s2"), seeds_per_cell=2)
    images = torch.zeros(12, 3, 4, 4)
    images[::2] = 1.0  # first seeds white, second seeds black
    path = grid.save(images, tmp_path / "swap.png")
    with Image.open(path) as im:
        scale, pad, head, label = 3, 2, 40, 220  # visualize.save_swap_grid's layout
        assert im.size == (label + 3 * (4 * scale + pad), head + 2 * (4 * scale + pad))
        tiles = np.asarray(im)[head:, label:]
        assert tiles.min() == 255  # only first-seed (white) tiles are drawn
    provenance = read_provenance(path)
    assert provenance["synthetic"] == "true" and provenance["seeds_per_cell"] == "2"
    assert provenance["anatomy_prompts"] == '["a0", "a1"]'
    every = grid.save_all(images, tmp_path / "all.png", provenance={"step": 5})
    assert read_provenance(every) == {"synthetic": "true", "step": "5"}
    with pytest.raises(ValueError, match="needs 12 images"):
        grid.save(images[:6], tmp_path / "x.png")


def test_grid_samples_equal_the_per_image_loop_adherence_ran(model: VGMedGen) -> None:
    """Batched through generate_samples, a grid gives exactly the images of conditions per image."""
    grid = SwapGrid(anatomy_prompts=tuple(ANATOMY), style_prompts=tuple(STYLE), seeds_per_cell=2, seed=3)
    samples = generate_samples(model, grid.requests(), batch_size=5)
    cells = grid.cells()
    assert samples.seeds == [c.seed for c in cells] and samples.request_of == list(range(len(cells)))
    images, masks = [], []
    for start in range(0, len(cells), 5):
        part = cells[start : start + 5]
        cond = model.conditions_from_prompts([ANATOMY[c.row] for c in part], [STYLE[c.column] for c in part])
        im, mk = model.generate(cond, [c.seed for c in part])
        images.append(im)
        masks.append(mk)
    assert torch.equal(samples.images, torch.cat(images)) and torch.equal(samples.masks, torch.cat(masks))
    assert samples.images.shape == (8, 3, 16, 16) and samples.masks.shape == (8, 1, 16, 16)


def test_mixed_requests_come_back_in_request_order(model: VGMedGen, tmp_path: Path) -> None:
    reference = tmp_path / "real.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(reference)
    requests = [
        parse_request({"anatomy_prompt": ANATOMY[0], "style_prompt": STYLE[0], "seed": 4, "n": 2}),
        parse_request({"caption": CAPTIONS[0], "seed": 9}),
        parse_request({"anatomy_prompt": ANATOMY[1], "style_prompt": STYLE[1], "seed": 1, "num_steps": 1}),
        parse_request({"reference": str(reference), "style_prompt": STYLE[1], "seed": 2, "n": 2}),
        parse_request({"anatomy_prompt": ANATOMY[1], "style_prompt": STYLE[0], "seed": 0}),
    ]
    together = generate_samples(model, requests, batch_size=2)
    assert together.request_of == [0, 0, 1, 2, 3, 3, 4]
    assert together.seeds == [4, 5, 9, 1, 2, 3, 0]
    assert [s.num_steps for s in together.samplers] == [2, 2, 1, 2, 2]
    for i, request in enumerate(requests):
        alone = generate_samples(model, [request])
        mine = [k for k, r in enumerate(together.request_of) if r == i]
        # Batch neighbours change float rounding in the last bits only.
        torch.testing.assert_close(together.images[mine], alone.images, rtol=0, atol=1e-4)
    uint8 = together.images_uint8()
    assert uint8.dtype == np.uint8 and uint8.shape == (7, 16, 16, 3)
    assert set(np.unique(together.masks_uint8()).tolist()) <= {0, 255}
    assert together.provenance(2, "abc") == {
        "model_version": "abc",
        "seed": "9",
        "caption": CAPTIONS[0],
        "num_steps": "2",
        "guidance_anatomy": "4.5",
        "guidance_style": "4.5",
    }
    with pytest.raises(ValueError, match="no sample requests given"):
        generate_samples(model, [])


def test_missing_reference_fails_naming_the_file(model: VGMedGen, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such image file"):
        generate_samples(model, [SampleRequest(reference=str(tmp_path / "gone.png"))])


def test_dit_stage_artifacts_are_the_swap_grid_of_validation_prompts(tmp_path: Path) -> None:
    """DitTask.artifacts builds its grid with SwapGrid and leaves the generator in training mode."""
    from vgmedgen.platform.config import load_experiment
    from vgmedgen.platform.datasets.synthderm import synthderm_record
    from vgmedgen.platform.records import records_to_table
    from vgmedgen.platform.training.driver import ensure_text_encoder
    from vgmedgen.platform.training.stages import build_task

    cfg = load_experiment(
        REPO / "configs/tiny.yaml", [f"output_root={tmp_path}", "model.sampler.num_steps=2"]
    )
    cfg.records_dir.mkdir(parents=True)
    rows = [{**synthderm_record(0, i, cfg.data.resolution), "split": "train"} for i in range(8)]
    pq.write_table(records_to_table(rows), cfg.records_dir / "part-00000.parquet")
    cpu = torch.device("cpu")
    inputs = {
        "text_encoder": ensure_text_encoder(cfg),
        "visual": tmp_path / "visual",
        "text": tmp_path / "text",
    }
    build_task("visual", cfg, inputs, cpu, 0, 1).export(inputs["visual"])
    build_task("align", cfg, inputs, cpu, 0, 1).export(inputs["text"])
    task = build_task("dit", cfg, inputs, cpu, 0, 1)
    assert task.module.training
    swap, every = task.artifacts(7, tmp_path / "art")
    assert task.module.training
    assert swap.name == "swap_grid_step000007.png" and every.name == "samples_step000007.png"
    provenance = read_provenance(swap)
    assert provenance["synthetic"] == "true" and provenance["stage"] == "dit" and provenance["step"] == "7"
    assert provenance["anatomy_prompts"].startswith('["') and provenance["seed"] == "0"
    with Image.open(every) as im:  # 4 x 4 cells of 16 px, padded 2 and upscaled 2
        assert im.size == ((4 * 18 + 2) * 2, (4 * 18 + 2) * 2)


def test_cell_requests_make_the_images_of_requests_in_fewer_requests() -> None:
    from vgmedgen.platform.generation.grid import SwapGrid

    grid = SwapGrid(anatomy_prompts=("a", "b"), style_prompts=("c",), seeds_per_cell=3, seed=5, num_steps=4)
    per_image = [(r.anatomy_prompt, r.style_prompt, r.seed, r.num_steps) for r in grid.requests()]
    per_cell = [
        (r.anatomy_prompt, r.style_prompt, s, r.num_steps) for r in grid.cell_requests() for s in r.seeds
    ]
    assert per_cell == per_image and len(grid.cell_requests()) == 2
