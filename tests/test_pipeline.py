"""VGMedGenPipeline: diffusers-style save/load round trip, the three ways to condition, output types, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import DiffusionPipeline  # noqa: E402
from test_model_version import (  # noqa: E402
    ANATOMY,
    CAPTIONS,
    STYLE,
    assert_same_model,
    make_text_encoder,
    make_trained_model,
)

from vgmedgen.model.pipeline import (  # noqa: E402
    PipelineInputError,
    VGMedGenPipeline,
    VGMedGenPipelineOutput,
    reference_to_tensor,
)
from vgmedgen.model.sampler import SamplerConfig  # noqa: E402
from vgmedgen.model.vgmedgen import ModelVersionError, VGMedGen  # noqa: E402

STEPS = 2
SIZE = 16  # the tiny preset's image side


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> VGMedGen:
    encoder = make_text_encoder(tmp_path_factory.mktemp("bert"))
    return make_trained_model(encoder, {"sampler": {"num_steps": STEPS}})


@pytest.fixture(scope="module")
def pipe(model: VGMedGen) -> VGMedGenPipeline:
    pipeline = VGMedGenPipeline(model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def saved(pipe: VGMedGenPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pipes") / "vgmedgen"
    pipe.save_pretrained(directory)
    return directory


def _reference_image() -> PIL.Image.Image:
    """A 40x30 RGB picture with a dark disc left of centre (not the model's size, not square)."""
    yy, xx = np.mgrid[0:30, 0:40]
    disc = (xx - 14) ** 2 + (yy - 15) ** 2 < 64
    array = np.full((30, 40, 3), (220, 180, 160), dtype=np.uint8)
    array[disc] = (90, 50, 30)
    return PIL.Image.fromarray(array)


# -- disk ----------------------------------------------------------------------------------------


def test_save_writes_a_model_version_with_a_diffusers_index(saved: Path) -> None:
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == ["vgmedgen_pipeline", VGMedGenPipeline.__name__]
    assert index["model"] == ["vgmedgen.model.vgmedgen", "VGMedGen"]
    # diffusers' own tooling reads the folder as a pipeline.
    config = DiffusionPipeline.load_config(saved)
    assert "_diffusers_version" in config
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["kind"] == "vgmedgen-model-version"
    # The index and the module it names are hashed like the weights: a changed one fails verification.
    assert {"model_index.json", "vgmedgen_pipeline.py"} <= set(manifest["files"])
    assert (
        "from vgmedgen.model.pipeline import VGMedGenPipeline" in (saved / "vgmedgen_pipeline.py").read_text()
    )


def test_round_trip_is_bit_exact(
    pipe: VGMedGenPipeline, model: VGMedGen, saved: Path, tmp_path: Path
) -> None:
    loaded = VGMedGenPipeline.from_pretrained(saved)
    loaded.set_progress_bar_config(disable=True)
    assert_same_model(model, loaded.model)
    assert loaded.name_or_path == str(saved)
    assert list(loaded.components) == ["model"]
    kwargs = {"anatomy_prompt": ANATOMY, "style_prompt": STYLE, "seed": 3, "output_type": "pt"}
    a, b = pipe(**kwargs), loaded(**kwargs)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and a.seeds == b.seeds
    # A folder saved by earlier releases (model_index.json naming the class, the version under model/) loads too.
    legacy = tmp_path / "legacy"
    shutil.copytree(saved, legacy / "model")
    (legacy / "model_index.json").write_text(json.dumps({"_class_name": "VGMedGenPipeline"}))
    assert_same_model(model, VGMedGenPipeline.from_pretrained(legacy).model)


def test_diffusers_own_loader_returns_a_working_pipeline(
    pipe: VGMedGenPipeline, saved: Path, tmp_path: Path
) -> None:
    """diffusers' DiffusionPipeline.from_pretrained in a fresh interpreter (nothing of vgmedgen imported
    first) gives this pipeline, with the same images as the model it was saved from."""
    script = (
        "import sys, numpy as np\n"
        "from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "out = pipe(anatomy_prompt=sys.argv[2], style_prompt=sys.argv[3], seed=5, num_images_per_prompt=2, "
        "output_type='np')\n"
        "np.savez(sys.argv[4], images=out.images, masks=out.masks, cls=type(pipe).__module__ + '.' + type(pipe).__name__)\n"
    )
    result = tmp_path / "out.npz"
    # One thread, as in this process: reduction order, and so the last bit, depends on the thread count.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "OMP_NUM_THREADS": "1",
    }
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(saved), ANATOMY[0], STYLE[0], str(result)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(result)
    assert str(got["cls"]) == "vgmedgen.model.pipeline.VGMedGenPipeline"
    want = pipe(
        anatomy_prompt=ANATOMY[0], style_prompt=STYLE[0], seed=5, num_images_per_prompt=2, output_type="np"
    )
    assert got["images"].shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(got["images"], want.images)
    np.testing.assert_array_equal(got["masks"], want.masks)


def test_load_errors_are_clear(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelVersionError, match="does not exist"):
        VGMedGenPipeline.from_pretrained(tmp_path / "missing")
    other = tmp_path / "pixart"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(
        ModelVersionError, match="holds a 'PixArtAlphaPipeline' pipeline, not a VGMedGenPipeline"
    ):
        VGMedGenPipeline.from_pretrained(other)
    with pytest.raises(PipelineInputError, match="unsupported arguments: \\['variant'\\]"):
        VGMedGenPipeline.from_pretrained(saved, variant="fp16")


# -- conditioning --------------------------------------------------------------------------------


def test_anatomy_and_style_prompts_match_the_model_and_pair_prompt_major(
    pipe: VGMedGenPipeline, model: VGMedGen
) -> None:
    out = pipe(anatomy_prompt=ANATOMY, style_prompt=STYLE, num_images_per_prompt=2, seed=7, output_type="pt")
    assert isinstance(out, VGMedGenPipelineOutput)
    assert out.seeds == [7, 8, 9, 10]
    assert out.images.shape == (4, 3, SIZE, SIZE) and out.masks.shape == (4, 1, SIZE, SIZE)
    # Prompt-major: images 0, 1 belong to prompt pair 0 and images 2, 3 to pair 1.
    cond = model.conditions_from_prompts(
        [ANATOMY[0], ANATOMY[0], ANATOMY[1], ANATOMY[1]], [STYLE[0], STYLE[0], STYLE[1], STYLE[1]]
    )
    images, masks = model.generate(cond, [7, 8, 9, 10], SamplerConfig(num_steps=STEPS))
    assert torch.equal(out.images, images) and torch.equal(out.masks, masks)
    assert not torch.equal(out.images[0], out.images[1])  # different seeds, different images
    # Each image is made again alone from its prompt and seed (to float rounding: BLAS reductions
    # depend on the batch's shape, so a different batch is close, not bit-identical).
    again = pipe(anatomy_prompt=ANATOMY[1], style_prompt=STYLE[1], seed=out.seeds[3], output_type="pt")
    torch.testing.assert_close(again.images[0], out.images[3], rtol=0, atol=1e-4)
    # A single style string pairs with every anatomy prompt (a batch of 2, not 4: close, as above).
    broadcast = pipe(anatomy_prompt=ANATOMY, style_prompt=STYLE[0], seed=7, output_type="pt")
    torch.testing.assert_close(broadcast.images[0], out.images[0], rtol=0, atol=1e-4)


def test_caption_prompt_is_split_by_the_model(pipe: VGMedGenPipeline, model: VGMedGen) -> None:
    out = pipe(prompt=CAPTIONS[0], seed=5, output_type="pt")
    images, masks = model.generate(
        model.conditions_from_captions([CAPTIONS[0]]), [5], SamplerConfig(num_steps=STEPS)
    )
    assert torch.equal(out.images, images) and torch.equal(out.masks, masks)


def test_reference_image_gives_the_anatomy(pipe: VGMedGenPipeline, model: VGMedGen) -> None:
    reference = _reference_image()
    tensor = reference_to_tensor(reference, SIZE)
    assert tensor.shape == (1, 3, SIZE, SIZE) and -1.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
    # The central 30x30 square is kept, as prepare's center_crop does: the disc sits left of centre.
    assert float(tensor[0, 0, :, :5].mean()) < float(tensor[0, 0, :, -5:].mean())

    out = pipe(reference_image=reference, seed=2, output_type="pt", num_images_per_prompt=2)
    cond = model.conditions_from_reference(tensor)
    images, _ = model.generate(
        {k: v.repeat_interleave(2, 0) for k, v in cond.items()}, [2, 3], SamplerConfig(num_steps=STEPS)
    )
    assert torch.equal(out.images, images)
    # A style prompt replaces the image's style but keeps its anatomy.
    styled = pipe(reference_image=reference, style_prompt=STYLE[1], seed=2, output_type="pt")
    cond_styled = model.conditions_from_reference(tensor, style=[STYLE[1]])
    assert torch.equal(cond_styled["t_a"], cond["t_a"]) and not torch.equal(cond_styled["t_s"], cond["t_s"])
    expected, _ = model.generate(cond_styled, [2], SamplerConfig(num_steps=STEPS))
    assert torch.equal(styled.images, expected)
    # The same picture as a uint8 array, or as a float tensor of the model's size, is accepted.
    as_array = reference_to_tensor(np.asarray(reference), SIZE)
    assert as_array.shape == (1, 3, SIZE, SIZE)
    small = (tensor + 1) / 2
    assert torch.allclose(reference_to_tensor(small[0], SIZE), tensor, atol=1e-6)


def test_generator_draws_reproducible_seeds(pipe: VGMedGenPipeline) -> None:
    a = pipe(prompt=CAPTIONS[1], generator=torch.Generator().manual_seed(0), output_type="pt")
    b = pipe(prompt=CAPTIONS[1], generator=torch.Generator().manual_seed(0), output_type="pt")
    assert a.seeds == b.seeds and torch.equal(a.images, b.images)
    c = pipe(prompt=CAPTIONS[1], seed=a.seeds, output_type="pt")
    assert torch.equal(c.images, a.images)


def test_guidance_and_steps_arguments_reach_the_sampler(pipe: VGMedGenPipeline, model: VGMedGen) -> None:
    out = pipe(
        prompt=CAPTIONS[0],
        seed=1,
        num_inference_steps=3,
        guidance_anatomy=1.0,
        guidance_style=2.0,
        output_type="pt",
    )
    cfg = SamplerConfig(num_steps=3, guidance_anatomy=1.0, guidance_style=2.0)
    images, _ = model.generate(model.conditions_from_captions([CAPTIONS[0]]), [1], cfg)
    assert torch.equal(out.images, images)
    default = pipe(prompt=CAPTIONS[0], seed=1, output_type="pt")
    assert not torch.equal(default.images, out.images)


# -- outputs -------------------------------------------------------------------------------------


def test_output_types_agree(pipe: VGMedGenPipeline) -> None:
    kwargs = {"anatomy_prompt": ANATOMY[0], "style_prompt": STYLE[0], "seed": 4, "num_images_per_prompt": 2}
    pt = pipe(**kwargs, output_type="pt")
    np_out = pipe(**kwargs, output_type="np")
    pil = pipe(**kwargs, output_type="pil")
    assert np_out.images.shape == (2, SIZE, SIZE, 3) and np_out.masks.shape == (2, SIZE, SIZE, 1)
    assert np_out.images.dtype == np.float32
    np.testing.assert_array_equal(np_out.images, pt.images.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(np_out.masks, pt.masks.permute(0, 2, 3, 1).numpy())
    assert len(pil.images) == len(pil.masks) == 2
    assert all(im.mode == "RGB" and im.size == (SIZE, SIZE) for im in pil.images)
    assert all(m.mode == "L" and m.size == (SIZE, SIZE) for m in pil.masks)
    np.testing.assert_array_equal(
        np.asarray(pil.images[1]), (np_out.images[1] * 255).round().astype(np.uint8)
    )
    binary = np.where(np_out.masks[1, ..., 0] > 0.5, 255, 0)
    np.testing.assert_array_equal(np.asarray(pil.masks[1]), binary)
    images, masks = pipe(**kwargs, output_type="pt", return_dict=False)
    assert torch.equal(images, pt.images) and torch.equal(masks, pt.masks)


def test_batches_and_device(pipe: VGMedGenPipeline) -> None:
    whole = pipe(prompt=CAPTIONS, seed=0, output_type="pt")
    chunked = pipe(prompt=CAPTIONS, seed=0, output_type="pt", batch_size=1)
    # Same seeds, other batch shape: equal to float rounding (see the prompt-major test).
    torch.testing.assert_close(chunked.images, whole.images, rtol=0, atol=1e-4)
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    with pytest.raises(PipelineInputError, match="cannot be cast to torch.float16"):
        pipe.to(torch.float16)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "no prompt given; give `prompt`"),
        (
            {"prompt": CAPTIONS[0], "anatomy_prompt": ANATOMY[0], "style_prompt": STYLE[0]},
            "cannot be combined",
        ),
        ({"anatomy_prompt": ANATOMY[0]}, "`anatomy_prompt` needs `style_prompt` too"),
        ({"style_prompt": STYLE[0]}, "`style_prompt` needs `anatomy_prompt` too"),
        (
            {"anatomy_prompt": ANATOMY, "style_prompt": STYLE + STYLE[:1]},
            "anatomy_prompt has 2 prompts but style_prompt has 3",
        ),
        ({"prompt": []}, "prompt is an empty list"),
        ({"prompt": ["  "]}, r"prompt\[0\] is empty"),
        ({"prompt": [3]}, r"prompt\[0\] must be a string"),
        ({"prompt": CAPTIONS[0], "output_type": "latent"}, "output_type must be one of pil, np, pt"),
        (
            {"prompt": CAPTIONS[0], "num_images_per_prompt": 0},
            "num_images_per_prompt must be a positive integer",
        ),
        ({"prompt": CAPTIONS[0], "num_inference_steps": 0}, "num_inference_steps must be a positive integer"),
        ({"prompt": CAPTIONS[0], "guidance_style": float("nan")}, "guidance_style must be a finite number"),
        (
            {"prompt": CAPTIONS[0], "seed": 1, "generator": torch.Generator()},
            "give `seed` or `generator`, not both",
        ),
        ({"prompt": CAPTIONS, "seed": [1]}, "seed as a list needs 2 ints"),
        ({"prompt": CAPTIONS[0], "seed": -1}, r"seeds must lie in \[0, 2\*\*63\)"),
        ({"reference_image": "img.png"}, "must be an image, not a path"),
        ({"reference_image": torch.full((3, 16, 16), 2.0)}, r"values must lie in \[0, 1\]"),
        ({"reference_image": torch.zeros(1, 16, 16)}, r"must be \(3, H, W\) or \(B, 3, H, W\)"),
        (
            {"reference_image": [_reference_image(), _reference_image()], "style_prompt": STYLE + STYLE},
            "has 2 images but style_prompt has 4",
        ),
        (
            {"reference_image": _reference_image(), "anatomy_prompt": ANATOMY[0]},
            "the anatomy comes from the image",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(pipe: VGMedGenPipeline, kwargs: dict, message: str) -> None:
    with pytest.raises(PipelineInputError, match=message):
        pipe(**kwargs)
