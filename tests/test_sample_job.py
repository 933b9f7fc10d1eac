"""jobs/sample.py in-process: files and index, byte-identical determinism, conditions, registry references, clean errors."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import PIL.Image
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_model_version import ANATOMY, CAPTIONS, STYLE, make_text_encoder, make_trained_model  # noqa: E402

from vgmedgen.platform.cli import run_job  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _load_job() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vgmedgen_sample_job", REPO / "jobs" / "sample.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


job = _load_job()


@pytest.fixture(autouse=True)
def one_thread_and_no_ray(monkeypatch: pytest.MonkeyPatch):
    """One torch thread (shared 2-core box); and the job must never start Ray."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    ray_was_imported = "ray" in sys.modules
    if ray_was_imported:

        def refuse(*args: object, **kwargs: object) -> None:
            raise AssertionError("jobs/sample.py must not start Ray")

        monkeypatch.setattr(sys.modules["ray"], "init", refuse)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    torch.set_num_threads(before)
    if not ray_was_imported:
        assert "ray" not in sys.modules, "jobs/sample.py imported ray"


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    encoder = make_text_encoder(tmp_path_factory.mktemp("bert"))
    model = make_trained_model(encoder, {"sampler": {"num_steps": 2}})
    directory = tmp_path_factory.mktemp("models") / "v1"
    model.save_pretrained(directory)
    return directory


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = run_job(job.main, argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _prompt_args(version: Path, out: Path, seed: int = 5, n: int = 2) -> list[str]:
    return ["--model", str(version), "--anatomy", ANATOMY[0], "--style", STYLE[0], "--n", str(n),
            "--seed", str(seed), "--out", str(out), "--quiet"]  # fmt: skip


def test_writes_images_masks_and_index(
    version: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "a"
    rc, stdout, _ = _run(_prompt_args(version, out), capsys)
    assert rc == 0
    assert str(out) in stdout and "samples.json" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "0.png",
        "0_mask.png",
        "1.png",
        "1_mask.png",
        "samples.json",
    ]
    for i in range(2):
        with PIL.Image.open(out / f"{i}.png") as im:
            assert im.mode == "RGB" and im.size == (16, 16)
        with PIL.Image.open(out / f"{i}_mask.png") as mask:
            assert mask.mode == "L" and mask.size == (16, 16)
            assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    index = json.loads((out / "samples.json").read_text())
    digest = hashlib.sha256((version / "manifest.json").read_bytes()).hexdigest()
    assert index["model_version"] == {
        "ref": str(version),
        "directory": str(version.resolve()),
        "manifest_sha256": digest,
    }
    assert index["sampler"] == {"num_steps": 2, "guidance_anatomy": 4.5, "guidance_style": 4.5}
    assert [s["seed"] for s in index["samples"]] == [5, 6]
    for i, sample in enumerate(index["samples"]):
        assert sample["image"] == f"{i}.png" and sample["mask"] == f"{i}_mask.png"
        assert sample["anatomy_prompt"] == ANATOMY[0] and sample["style_prompt"] == STYLE[0]
        assert sample["model_version"] == digest and "caption" not in sample


def test_same_seed_gives_identical_png_bytes(
    version: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert _run(_prompt_args(version, tmp_path / name, seed=seed, n=1), capsys)[0] == 0
    a, b, c = ((tmp_path / name / "0.png").read_bytes() for name in "abc")
    assert a == b and a != c
    assert (tmp_path / "a" / "0_mask.png").read_bytes() == (tmp_path / "b" / "0_mask.png").read_bytes()


def test_caption_and_reference_conditions(
    version: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "--model",
        str(version),
        "--n",
        "1",
        "--seed",
        "3",
        "--steps",
        "2",
        "--guidance-style",
        "2.0",
        "--quiet",
    ]
    rc, _, _ = _run([*base, "--caption", CAPTIONS[1], "--out", str(tmp_path / "cap")], capsys)
    assert rc == 0
    sample = json.loads((tmp_path / "cap" / "samples.json").read_text())["samples"][0]
    assert (
        sample["caption"] == CAPTIONS[1]
        and sample["guidance_style"] == 2.0
        and sample["guidance_anatomy"] == 4.5
    )
    assert "anatomy_prompt" not in sample

    reference = tmp_path / "real.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(
        reference
    )
    rc, _, err = _run(
        [*base, "--reference", str(reference), "--style", STYLE[1], "--out", str(tmp_path / "ref")], capsys
    )
    assert rc == 0, err
    sample = json.loads((tmp_path / "ref" / "samples.json").read_text())["samples"][0]
    assert sample["reference"] == str(reference.resolve()) and sample["style_prompt"] == STYLE[1]
    assert (tmp_path / "ref" / "0.png").is_file() and (tmp_path / "ref" / "0_mask.png").is_file()


def test_default_output_directory_is_under_the_output_root(
    version: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    args = [
        "--model",
        str(version),
        "--caption",
        CAPTIONS[0],
        "--n",
        "1",
        "--seed",
        "9",
        "--quiet",
        f"output_root={root}",
    ]
    rc, stdout, _ = _run(args, capsys)
    assert rc == 0
    digest = hashlib.sha256((version / "manifest.json").read_bytes()).hexdigest()
    out = root / "samples" / f"{digest[:12]}-seed9"
    assert (out / "0.png").is_file() and str(out) in stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--anatomy", ANATOMY[0]], "`anatomy_prompt` needs `style_prompt` too"),
        ([], "no prompt given"),
        (["--caption", CAPTIONS[0], "--anatomy", ANATOMY[0], "--style", STYLE[0]], "cannot be combined"),
        (["--caption", CAPTIONS[0], "--n", "0"], "--n must be a positive integer, got 0"),
        (["--caption", CAPTIONS[0], "--steps", "0"], "--steps must be a positive integer, got 0"),
    ],
)
def test_bad_prompts_exit_2_with_one_message(
    version: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    rc, _, err = _run(["--model", str(version), "--out", str(tmp_path / "o"), "--quiet", *extra], capsys)
    assert rc == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_missing_model_and_unreadable_reference_exit_2(
    version: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--caption", CAPTIONS[0], "--out", str(tmp_path / "o"), "--quiet"]
    rc, _, err = _run(["--model", str(tmp_path / "nope"), *common], capsys)
    assert rc == 2 and "no such model version directory" in err and "Traceback" not in err

    not_a_version = tmp_path / "plain"
    not_a_version.mkdir()
    rc, _, err = _run(["--model", str(not_a_version), *common], capsys)
    assert rc == 2 and "manifest.json is missing" in err

    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"not an image at all")
    rc, _, err = _run(["--model", str(version), "--reference", str(garbage), *common[2:]], capsys)
    assert rc == 2 and f"--reference {garbage} is not a readable image" in err
    rc, _, err = _run(
        ["--model", str(version), "--reference", str(tmp_path / "gone.png"), *common[2:]], capsys
    )
    assert rc == 2 and "no such image file" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
def test_registry_reference_resolves_and_unknown_alias_exits_2(
    version: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vgmedgen.platform.tracking import Tracker, TrackingConfig

    root = tmp_path / "root"
    tracker = Tracker(TrackingConfig(), root, "vgmedgen")  # what the train job of experiment 'vgmedgen' uses
    with tracker.open_run(key="sample-job-test", name="train") as run_id:
        tracker.log_artifacts(run_id, version, "model_version")
        assert tracker.register(run_id, "model_version") == "1"

    out = tmp_path / "reg"
    args = ["--caption", CAPTIONS[0], "--n", "1", "--seed", "1", "--quiet", f"output_root={root}"]
    rc, _, err = _run(["--model", "vgmedgen-vgmedgen@current", "--out", str(out), *args], capsys)
    assert rc == 0, err
    index = json.loads((out / "samples.json").read_text())
    assert index["model_version"]["ref"] == "vgmedgen-vgmedgen@current"
    assert (
        index["model_version"]["manifest_sha256"]
        == hashlib.sha256((version / "manifest.json").read_bytes()).hexdigest()
    )
    # The same image as sampling the directory itself.
    assert _run(["--model", str(version), "--out", str(tmp_path / "dir"), *args], capsys)[0] == 0
    assert (out / "0.png").read_bytes() == (tmp_path / "dir" / "0.png").read_bytes()

    rc, _, err = _run(["--model", "vgmedgen-vgmedgen@champion", "--out", str(tmp_path / "x"), *args], capsys)
    assert (
        rc == 2 and "No registered model version vgmedgen-vgmedgen@champion" in err and "Traceback" not in err
    )
