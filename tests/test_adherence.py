"""Adherence measurement: real SynthDerm images with known factors go through the same measurement
path as generated ones (the true mask standing in for the segmentor) and agree; shuffled labels do
not; thresholds decide pass/fail; the prompt's vocabulary picks the bins and names the metrics; one
ruler (trained once on real records) measures every model, with each model's own pseudo-mask figures
beside; a stand-in model exercises the whole swap-grid path; the config is a section of the experiment."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_evaluation import write_synthderm

from vgmedgen.model.configbase import ConfigError, build_config
from vgmedgen.model.sampler import SamplerConfig
from vgmedgen.platform.config import load_experiment
from vgmedgen.platform.datasets.measure import describe_bins, measure_mask
from vgmedgen.platform.datasets.synthderm import (
    PIGMENT_RGB,
    SIZE_AREA_FRACTION,
    STYLE_FACTORS,
    position_of_centroid,
    sample_factors,
    size_of_area_fraction,
    synthderm_record,
)
from vgmedgen.platform.evaluation.adherence import (
    FACTOR_CHANCE,
    PSEUDO_MASK,
    RULER,
    AdherenceConfig,
    ImageMeasurement,
    adherence,
    anatomy_bins,
    calibrate_colours,
    column_prompts,
    measure_adherence,
    measure_images,
    measure_masks,
    prompt_vocabulary,
    row_prompts,
    ruler_accuracy,
    ruler_spec,
    score,
    train_ruler,
)
from vgmedgen.platform.records import decode_png
from vgmedgen.platform.runs import net_run_name

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZE = 32
SEED = 3
REPO = Path(__file__).resolve().parents[1]
# A ruler for 480 train images in ~6 s: at lr 5e-3, 150 steps read size / position / pigment of the 142
# validation records at 0.95 / 0.98 / 0.81 (at the default 2e-3 and 150 steps: 0.30 / 0.61 / 0.33).
RULER_OVERRIDES = [
    "adherence.ruler.train.steps=150",
    "adherence.ruler.train.batch_size=32",
    "adherence.ruler.train.lr=5e-3",
]


def _tensors(records: list[dict]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    images = np.stack([decode_png(r["image"]) for r in records])  # (N, H, W, 3)
    masks = np.stack([decode_png(r["mask"], "L") for r in records]) > 127  # (N, H, W)
    return (
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0,
        torch.from_numpy(masks).float().unsqueeze(1),
        [r["attributes"] for r in records],
    )


@pytest.fixture(scope="module")
def calibration():
    """Reference colours from 400 real records (indices 0..399), measured through their true masks."""
    images, masks, attrs = _tensors([synthderm_record(SEED, i, SIZE) for i in range(400)])
    return calibrate_colours(
        images, masks, attrs, context=("skin_tone", "illumination", "device"), min_count=8
    )


@pytest.fixture(scope="module")
def held_out():
    """Other real records (indices 1000..1199): never used for calibration."""
    return _tensors([synthderm_record(SEED, i, SIZE) for i in range(1000, 1200)])


def test_size_and_position_of_real_records_agree_exactly(held_out):
    images, masks, attrs = held_out
    meas = measure_images(images, masks)
    assert len(meas) == len(attrs)
    bins = [anatomy_bins(m.area_fraction, m.centroid, "synthderm") for m in meas]
    assert [b[0] for b in bins] == [a["size"] for a in attrs]
    assert [b[1] for b in bins] == [a["position"] for a in attrs]
    # The measured area and centroid are the ones SynthDerm itself records.
    np.testing.assert_allclose(
        [m.area_fraction for m in meas], [a["area_fraction"] for a in attrs], atol=1e-4
    )
    np.testing.assert_allclose([m.centroid[0] for m in meas], [a["centroid_x"] for a in attrs], atol=1e-3)


def test_colour_of_real_records_matches_their_pigment(held_out, calibration):
    images, masks, attrs = held_out
    meas = measure_images(images, masks)
    hits = [calibration.nearest(m.mean_rgb, a) == a["pigment"] for m, a in zip(meas, attrs)]
    # Lesions with a second colour, hair or rulers drift from their pigment; the prompts of the
    # swap grid ask for neither, so the clean subset is the relevant ceiling.
    clean = [h for h, a in zip(hits, attrs) if a["secondary_colour"] is None and a["artefact"] == "none"]
    # Measured: 0.875 overall and 0.93 clean with 400 calibration records (SynthDerm jitters each
    # lesion's pigment by 5% and shades it, so neighbouring pigments overlap a little).
    assert np.mean(hits) >= 0.8
    assert len(clean) >= 30 and np.mean(clean) >= 0.88


def test_shuffled_labels_give_low_agreement(held_out, calibration):
    images, masks, attrs = held_out
    meas = measure_images(images, masks)
    rng = np.random.default_rng(0)
    shuffled = [attrs[i] for i in rng.permutation(len(attrs))]
    scored = adherence(meas, shuffled, "synthderm", PSEUDO_MASK, calibration)
    size, pos, colour = (scored.agreement(f) for f in ("size", "position", "colour"))
    # The unshuffled labels agree exactly on size and position.
    truth = adherence(meas, attrs, "synthderm", PSEUDO_MASK, calibration)
    assert truth.agreement("size") == truth.agreement("position") == 1.0
    # Chance under the data's own (unbalanced) factor frequencies: sum of squared frequencies.
    assert size < 0.5 and pos < 0.4 and colour < 0.45


def test_calibrated_references_differ_from_paint_and_fall_back(calibration):
    style = {"skin_tone": "light", "illumination": "even", "device": "polarised"}
    refs = calibration.references(style)
    assert set(refs) == set(PIGMENT_RGB)
    # The rendered lesion is not its paint: shading, blending and the device shift it.
    assert any(np.abs(np.subtract(refs[p], PIGMENT_RGB[p])).max() > 5 for p in refs)
    # A context never seen falls back to the pigment-only reference, then to the paint.
    only_pigment = calibration.table[("black",)][0]
    sparse = calibrate_colours(torch.zeros(0, 3, 4, 4), torch.zeros(0, 1, 4, 4), [], context=("skin_tone",))
    assert sparse.references({"skin_tone": "dark"})["black"] == PIGMENT_RGB["black"]
    unseen = {"skin_tone": "nonexistent", "illumination": "even", "device": "polarised"}
    assert calibration.references(unseen)["black"] == only_pigment


def test_empty_mask_counts_as_disagreement():
    images = torch.rand(2, 3, 8, 8)
    masks = torch.zeros(2, 1, 8, 8)
    masks[1, 0, 3:6, 3:6] = 0.9  # 9 px = 0.14 of the image, centroid (4.5 / 8, 4.5 / 8)
    meas = measure_images(images, masks)
    assert meas[0] == ImageMeasurement(0.0, None, None)
    assert anatomy_bins(meas[1].area_fraction, meas[1].centroid, "synthderm") == ("medium", "centre")
    assert anatomy_bins(0.0, None, "caption") == (None, None)
    # The masks alone give the same geometry, without colour.
    assert [(m.area_fraction, m.centroid) for m in measure_masks(masks)] == [
        (m.area_fraction, m.centroid) for m in meas
    ]
    scored = adherence(meas, [{"size": "medium", "position": "centre"}] * 2, "synthderm", PSEUDO_MASK)
    assert [p["size_ok"] for p in scored.images] == [False, True]
    assert scored.metrics()["adherence/synthderm/pseudo_mask/empty"] == 0.5
    assert meas[1].area_fraction == pytest.approx(9 / 64)
    assert meas[1].centroid == pytest.approx((0.5625, 0.5625))
    expected = images[1, :, 3:6, 3:6].mean((1, 2)) * 255
    assert meas[1].mean_rgb == pytest.approx(expected.tolist(), rel=1e-5)
    with pytest.raises(ValueError, match="masks"):
        measure_images(images, torch.zeros(3, 1, 8, 8))


def test_colour_comes_from_the_confident_core_of_a_soft_mask():
    images = torch.zeros(1, 3, 8, 8)
    images[0, 0] = 1.0  # red everywhere...
    images[0, :, 3:5, 3:5] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)  # ...but a blue core
    masks = torch.zeros(1, 1, 8, 8)
    masks[0, 0, 2:6, 2:6] = 0.6  # a soft rim of skin
    masks[0, 0, 3:5, 3:5] = 0.95
    whole, core = measure_images(images, masks)[0], measure_images(images, masks, core_threshold=0.9)[0]
    assert whole.area_fraction == core.area_fraction == pytest.approx(16 / 64)
    assert core.mean_rgb == pytest.approx((0.0, 0.0, 255.0))
    assert whole.mean_rgb == pytest.approx((255 * 12 / 16, 0.0, 255 * 4 / 16))
    # No confident pixel: the whole lesion gives the colour.
    fallback = measure_images(images, masks.clamp(max=0.6), core_threshold=0.9)[0]
    assert fallback.mean_rgb == pytest.approx(whole.mean_rgb)


_CENTROIDS = {
    "centre": (0.5, 0.5),
    "upper left": (0.25, 0.25),
    "upper right": (0.75, 0.25),
    "lower left": (0.25, 0.75),
    "lower right": (0.75, 0.75),
}


def _measurement(size: str, position: str, rgb: tuple[float, float, float]) -> ImageMeasurement:
    """A lesion in the middle of a SynthDerm size range, at a SynthDerm position."""
    return ImageMeasurement(float(np.mean(SIZE_AREA_FRACTION[size])), _CENTROIDS[position], rgb)


def test_thresholds_decide_pass_and_fail(calibration):
    cfg = AdherenceConfig(
        rows=({"size": "small", "position": "centre"},),
        columns=({"pigment": "pink", "skin_tone": "light"},),
        size_threshold=0.6,
        position_threshold=0.6,
        colour_threshold=0.5,
    )
    refs = calibration.references(cfg.column_factors()[0])
    pink, black = refs["pink"], refs["black"]
    # 10 images of the one cell: size right in 6 (exactly the threshold), position in 5, colour in 4.
    meas = [
        _measurement(
            "small" if k < 6 else "large", "centre" if k < 5 else "upper left", pink if k < 4 else black
        )
        for k in range(10)
    ]
    res = score(meas, [0] * 10, [0] * 10, cfg, calibration)
    assert res.agreement == pytest.approx({"size": 0.6, "position": 0.5, "colour": 0.4})
    assert res.passed == {"size": True, "position": False, "colour": False}
    assert not res.all_passed
    assert res.rows[0]["measured_size"] == {"small": 6, "large": 4}
    assert res.columns[0]["measured_pigment"] == {"black": 6, "pink": 4}
    metrics = res.metrics()
    assert metrics["adherence/synthderm/size"] == pytest.approx(0.6)
    assert metrics["adherence/synthderm/position_passed"] == 0.0
    text = res.table()
    assert "size" in text and "PASS" in text and "FAIL" in text
    all_good = score([_measurement("small", "centre", pink)] * 3, [0] * 3, [0] * 3, cfg, calibration)
    assert all_good.all_passed and all_good.agreement == {"size": 1.0, "position": 1.0, "colour": 1.0}


def test_default_thresholds_are_well_above_chance():
    cfg = AdherenceConfig()
    for factor, threshold in cfg.thresholds.items():
        assert threshold >= FACTOR_CHANCE["synthderm"][factor] + 0.25
    assert {r["size"] for r in cfg.rows} == {"small", "medium", "large"}
    assert {r["position"] for r in cfg.rows} == {
        "centre",
        "upper left",
        "upper right",
        "lower left",
        "lower right",
    }
    assert len({c["pigment"] for c in cfg.columns}) == 5


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="must name position"):
        build_config(AdherenceConfig, {"rows": [{"size": "small"}]})
    with pytest.raises(ConfigError, match="'tiny' is not a SynthDerm value"):
        build_config(AdherenceConfig, {"rows": [{"size": "tiny", "position": "centre"}]})
    with pytest.raises(ConfigError, match="must name a pigment"):
        build_config(AdherenceConfig, {"columns": [{"skin_tone": "dark"}]})
    with pytest.raises(ConfigError, match="colour_context"):
        build_config(AdherenceConfig, {"colour_context": ["pigment"]})


def test_adherence_is_a_section_of_the_experiment_set_by_yaml_and_overrides(tmp_path: Path):
    demo = REPO / "configs/demo.yaml"
    # configs/demo.yaml sets the seeds per cell (120 images); every other default lives in the class only.
    assert load_experiment(demo).adherence == AdherenceConfig(seeds_per_cell=4)
    cfg = load_experiment(demo, ["adherence.seeds_per_cell=2", "adherence.ruler.train.steps=50"])
    assert cfg.adherence.seeds_per_cell == 2 and cfg.adherence.ruler.train.steps == 50
    assert load_experiment(REPO / "configs/demo-long.yaml").adherence.seeds_per_cell == 4  # from its YAML
    # Errors name the field path under the section, the value and what is allowed.
    for override, names in (
        ("adherence.seeds_per_cell=0", "adherence.seeds_per_cell"),
        ("adherence.size_threshold=2", "adherence.size_threshold"),
        ("adherence.ruler.net=huge", "adherence.ruler.net"),
        ("adherence.seeds=4", "adherence.seeds"),
    ):
        with pytest.raises(ConfigError) as err:
            load_experiment(demo, [override])
        assert names in str(err.value), (override, str(err.value))
    with pytest.raises(ConfigError, match="rows.*'tiny' is not a SynthDerm value"):
        load_experiment(demo, ["adherence.rows=[{size: tiny, position: centre}]"])
    # Out of every training identity: the stages' run names do not see it.
    from vgmedgen.platform.runs import job_key, stage_run_name

    base = load_experiment(REPO / "configs/tiny.yaml", [f"output_root={tmp_path}"])
    moved = load_experiment(
        REPO / "configs/tiny.yaml",
        [f"output_root={tmp_path}", "adherence.seeds_per_cell=7", "adherence.seed=3"],
    )
    assert stage_run_name(moved, "visual") == stage_run_name(base, "visual")
    assert job_key(moved) == job_key(base)


def test_the_prompt_vocabulary_picks_the_bins_and_names_the_metrics():
    assert prompt_vocabulary("synthderm") == "synthderm"
    assert {prompt_vocabulary(d) for d in ("ham10000", "kvasir_seg", "busi", "csv")} == {"caption"}
    # A lesion at the top, left of centre: SynthDerm has quadrants, the captions a 3 x 3 grid.
    lesion = ImageMeasurement(0.03, (0.45, 0.2), None)
    assert anatomy_bins(lesion.area_fraction, lesion.centroid, "synthderm") == ("small", "upper left")
    assert anatomy_bins(lesion.area_fraction, lesion.centroid, "caption") == ("small", "upper")
    # Area 0.168: above SynthDerm's medium/large edge (sqrt(0.14 x 0.20) = 0.167, nearest in log area),
    # under the caption's 0.17.
    assert anatomy_bins(0.168, (0.5, 0.5), "synthderm")[0] == "large"
    assert anatomy_bins(0.168, (0.5, 0.5), "caption")[0] == "medium"
    syn = adherence([lesion], [{"size": "small", "position": "upper left"}], "synthderm", RULER)
    cap = adherence([lesion], [{"size": "small", "position": "upper"}], "caption", PSEUDO_MASK)
    assert syn.metrics() == {
        "adherence/synthderm/size": 1.0,
        "adherence/synthderm/position": 1.0,
        "adherence/synthderm/empty": 0.0,
        "adherence/synthderm/n": 1.0,
    }
    assert cap.metrics()["adherence/caption/pseudo_mask/position"] == 1.0
    assert set(cap.metrics()) == {
        f"adherence/caption/pseudo_mask/{k}" for k in ("size", "position", "empty", "n")
    }
    # A request in the other vocabulary is refused, naming the way out.
    with pytest.raises(ValueError, match="'upper' is not a synthderm value.*score it in caption"):
        adherence([lesion], [{"size": "small", "position": "upper"}], "synthderm", RULER)
    with pytest.raises(ValueError, match="vocabularies are synthderm, caption"):
        anatomy_bins(0.1, (0.5, 0.5), "words")
    # Caption records: the bins their prompts were written from are the measurement's own.
    mask = np.zeros((30, 30), bool)
    mask[2:9, 20:28] = True
    written = describe_bins(measure_mask(mask), None)
    got = adherence(measure_masks(torch.from_numpy(mask)[None].float()), [written], "caption", PSEUDO_MASK)
    assert got.agreement("size") == got.agreement("position") == 1.0


class _RealImageModel:
    """A stand-in for VGMedGen: for each requested (anatomy, style) prompt pair it returns a real
    SynthDerm image with exactly those size, position and style factors, and as its pseudo-mask the
    true mask (a perfect stage-1 segmentor) or, with ``shift``, the true mask moved by that many pixels
    right and down (a worse segmentor drawing on the same images)."""

    def __init__(self, cfg: AdherenceConfig, shift: int = 0) -> None:
        self.anatomy = dict(zip(row_prompts(cfg), cfg.row_factors()))
        self.style = dict(zip(column_prompts(cfg), cfg.column_factors()))
        self.shift = shift
        self.config = SimpleNamespace(sampler=SamplerConfig())  # generate_samples reads the sampler
        self.calls = 0
        self.masks: list[torch.Tensor] = []

    def conditions_from_prompts(self, anatomy: list[str], style: list[str]) -> dict:
        return {"anatomy": anatomy, "style": style}

    def _find(self, a: dict, s: dict, skip: int) -> int:
        for index in range(200_000):
            f = sample_factors(SEED, index)["factors"]
            if (
                f["size"] == a["size"]
                and f["position"] == a["position"]
                and all(f[k] == s[k] for k in STYLE_FACTORS)
            ):
                if skip == 0:
                    return index
                skip -= 1
        raise AssertionError(f"no SynthDerm record with {a} and {s}")

    def generate(self, conditions: dict, seeds: list[int], sampler=None, use_ema: bool = True):
        self.calls += 1
        records = [
            synthderm_record(SEED, self._find(self.anatomy[a], self.style[s], seed % 2), SIZE)
            for a, s, seed in zip(conditions["anatomy"], conditions["style"], seeds)
        ]
        images, masks, _ = _tensors(records)
        masks = masks.roll(shifts=(self.shift, self.shift), dims=(2, 3))
        self.masks.append(masks)
        return images, masks


@pytest.fixture(scope="module")
def ruler_records(tmp_path_factory) -> Path:
    """800 real SynthDerm records at 32 px with train/val/test splits (the ruler's data)."""
    return write_synthderm(tmp_path_factory.mktemp("ruler") / "synthderm-32", 800, seed=SEED)


@pytest.fixture(scope="module")
def ruler(ruler_records: Path, tmp_path_factory):
    """The ruler, trained once through fit_classifier (in-process: Ray Train's local mode) and shared."""
    cfg = load_experiment(None, RULER_OVERRIDES)
    return train_ruler(ruler_records, tmp_path_factory.mktemp("nets"), SIZE, cfg.adherence.ruler)


def test_the_ruler_is_trained_once_and_does_not_depend_on_the_model(ruler, ruler_records: Path, calibration):
    # Its run name is a hash of its own spec and the records: two experiments with different models
    # (presets, trained stages, sampler) name the same ruler.
    a = load_experiment(None, RULER_OVERRIDES)
    b = load_experiment(
        None,
        [
            *RULER_OVERRIDES,
            "model.preset=demo",
            "train.dit.steps=7",
            "model.sampler.guidance_style=2.0",
        ],
    )
    names = {
        net_run_name(
            "ruler",
            ruler_spec(ruler_records, SIZE, c.adherence.ruler).model_dump(mode="json"),
            [ruler_records],
        )
        for c in (a, b)
    }
    assert names == {ruler.directory.parent.name}
    # Asking again reuses the trained network (no second training).
    again = train_ruler(ruler_records, ruler.directory.parents[1], SIZE, a.adherence.ruler)
    assert again.directory == ruler.directory
    # What it reads on real validation records (measured 0.95 / 0.98 / 0.81; the demo's: 0.97 / 0.98 / 0.81).
    on_real = ruler_accuracy(ruler, ruler_records, AdherenceConfig(), calibration)
    assert on_real["n"] > 100 and on_real["size"] > 0.85 and on_real["position"] > 0.9, on_real
    assert on_real["colour"] > 0.6, on_real


def test_one_ruler_measures_two_models_and_each_keeps_its_pseudo_mask_figures(
    tmp_path: Path, ruler, calibration
):
    cfg = AdherenceConfig(
        rows=({"size": "small", "position": "centre"}, {"size": "medium", "position": "upper left"}),
        columns=(
            {"pigment": "light brown", "skin_tone": "light"},
            {"pigment": "dark brown", "skin_tone": "medium"},
        ),
        style_defaults={"illumination": "even", "artefact": "none", "device": "polarised"},
        seeds_per_cell=2,
        batch_size=3,  # several generate calls, cells split across them
    )
    exact, shifted = _RealImageModel(cfg), _RealImageModel(cfg, shift=6)
    # The exact stand-in says it draws 4-px patches (patch 2 over an autoencoder's 2x): the mosaic index of
    # real images on that grid is about 1; the other has no generator and no patch grid to measure.
    exact.generator = SimpleNamespace(
        cfg=SimpleNamespace(backbone=SimpleNamespace(patch_size=2)), downscale=2
    )
    res = measure_adherence(exact, cfg, calibration, ruler, out_dir=tmp_path)  # type: ignore[arg-type]
    other = measure_adherence(shifted, cfg, calibration, ruler)  # type: ignore[arg-type]
    assert res.mosaic is not None and res.mosaic["block"] == 4 and 0.8 < res.mosaic["samples"] < 1.25
    assert res.metrics()["synthderm/mosaic_index"] == res.mosaic["samples"]
    assert "mosaic index on 4-px blocks" in res.table() and other.mosaic is None
    assert exact.calls == 3
    assert len(res.images) == len(res.pseudo_mask.images) == 8
    assert [(p["row"], p["column"]) for p in res.images[:4]] == [(0, 0), (0, 0), (0, 1), (0, 1)]
    # The same seeds in every cell: along a row or a column only the prompt changes.
    assert [p["seed"] for p in res.images] == [0, 1] * 4

    # One ruler: the same images read the same whatever segmentor the model carries.
    assert res.instrument == other.instrument == RULER and res.ruler_run == other.ruler_run == ruler.directory
    assert res.agreement == other.agreement and res.images == other.images
    assert res.agreement["size"] >= 0.75 and res.agreement["position"] >= 0.75, res.agreement

    # Beside it, each model's own pseudo-mask, labelled: perfect for the exact masks, worse when shifted.
    assert res.pseudo_mask.instrument == PSEUDO_MASK
    assert res.pseudo_mask.agreement["size"] == res.pseudo_mask.agreement["position"] == 1.0
    assert other.pseudo_mask.agreement["position"] < 1.0
    # ... and each is what SynthDerm's factor functions read off that model's masks (the demo's old figure).
    for model, result in ((exact, res), (shifted, other)):
        masks = torch.cat(model.masks)
        for p, m in zip(result.pseudo_mask.images, masks):
            geometry = measure_mask(m[0].numpy() > 0.5)
            assert p["area_fraction"] == pytest.approx(geometry["area"], abs=1e-6)
            assert p["size"] == size_of_area_fraction(geometry["area"])
            assert p["position"] == position_of_centroid(geometry["centroid_x"], geometry["centroid_y"])
    metrics = other.metrics()
    assert metrics["adherence/synthderm/position"] == other.agreement["position"]
    assert metrics["adherence/synthderm/pseudo_mask/position"] == other.pseudo_mask.agreement["position"]
    assert (
        "adherence/synthderm/pseudo_mask/position_passed" not in metrics
    )  # only the headline passes or fails

    for name in ("swap_grid.png", "samples.png", "adherence.json"):
        assert (tmp_path / name).is_file()
    import json

    payload = json.loads((tmp_path / "adherence.json").read_text())
    assert payload["instrument"] == RULER and payload[PSEUDO_MASK]["agreement"] == res.pseudo_mask.agreement
    assert "ruler" in res.table() and "pseudo-mask" in res.table()
    from PIL import Image

    with Image.open(tmp_path / "swap_grid.png") as grid:
        # label column + 2 tiles of 3 x 32 px (+ padding) wide; header + 2 rows high.
        assert grid.width > 2 * 3 * SIZE and grid.height > 2 * 3 * SIZE

    # The demo puts the headline figures (not the per-row and per-column ones) on the version's model card.
    from vgmedgen.model.vgmedgen import MODEL_CARD, ModelConfig, write_manifest
    from vgmedgen.platform.evaluation.demo import _record_on_card

    version = tmp_path / "version"
    version.mkdir()
    (version / "model_config.json").write_text(
        ModelConfig.model_validate({"preset": "tiny"}).model_dump_json()
    )
    write_manifest(version, {"kind": "vgmedgen-model-version"})
    experiment = load_experiment(None, [f"output_root={tmp_path}", "adherence.seeds_per_cell=2"])
    assert _record_on_card(experiment, version, res, tmp_path) == version / MODEL_CARD
    card = (version / MODEL_CARD).read_text()
    assert f"| `adherence/synthderm/position` | {res.agreement['position']:.4g} |" in card
    assert "adherence/synthderm/pseudo_mask/size" in card and "row0_size" not in card
    assert "2 anatomy x 2 style prompts, 2 seeds per cell" in card


def test_demo_job_takes_adherence_from_the_config_and_rejects_bad_values(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vgmedgen_demo_job", REPO / "jobs" / "demo.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)  # type: ignore[union-attr]
    # A bad adherence value is a user error: one message naming the field, exit status 2, before any training.
    status = job.run_job(
        job.main, ["--config", str(REPO / "configs/demo.yaml"), "adherence.size_threshold=2"]
    )
    assert status == 2
    assert "adherence.size_threshold" in capsys.readouterr().err
    # The swap grid speaks SynthDerm: other data is refused before training, with the way out.
    status = job.run_job(
        job.main,
        ["--config", str(REPO / "configs/demo.yaml"), "data.dataset=busi", "data.root=/nonexistent/busi"],
    )
    assert status == 2
    assert "data.dataset=synthderm" in capsys.readouterr().err


def test_the_demo_measures_other_seeds_into_their_own_folder(tmp_path: Path) -> None:
    from vgmedgen.platform.evaluation.demo import demo_output_dir

    demo = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    first = demo_output_dir(load_experiment(demo, [f"output_root={tmp_path}"]), "v1")
    again = demo_output_dir(load_experiment(demo, [f"output_root={tmp_path}", "adherence.seed=1000"]), "v1")
    assert first != again and first.parent == again.parent == tmp_path / "demo" / "demo" / "v1"
    assert again.name == "seed-1000"
