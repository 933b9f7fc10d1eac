"""Builders of small look-alike trees of the real datasets' public layouts (docs/datasets.md).

Each builder writes a tiny tree (40x30 images with drawn disc lesions, so measurements are
checkable) under a directory the caller owns (e.g. pytest's ``tmp_path``) and returns
:class:`TreeFacts`: the root to hand to a reader plus what a reader and ``process_item``
should find. Importable from other tests::

    sys.path.insert(0, str(Path(__file__).parent))
    from layouts import make_ham10000_tree
    facts = make_ham10000_tree(tmp_path)
    items = read_source_items("ham10000", facts.root, ReaderOptions())

Everything is deterministic (fixed seeds), and nothing is written outside ``base``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "Disc",
    "TreeFacts",
    "disc_mask",
    "draw_image",
    "make_busi_tree",
    "make_captions_csv",
    "make_csv_dataset",
    "make_ham10000_tree",
    "make_kvasir_tree",
]

W, H = 40, 30


@dataclass(frozen=True)
class Disc:
    """A drawn lesion: centre (cx, cy) and radius r in original pixels (pixel centres at +0.5)."""

    cx: float
    cy: float
    r: float


@dataclass
class TreeFacts:
    """What a reader should find in a built tree.

    Attributes:
        root: the directory to pass as the dataset root.
        ids: every item id the reader returns, sorted.
        labels: id -> label.
        groups: id -> expected ``SourceItem.group`` (None where the reader leaves it open).
        mask_policies: id -> expected ``mask_policy``.
        discs: id -> lesions drawn into the image (and its mask files, when it has any).
        corrupt_ids: ids whose image file is corrupt (``process_item`` must raise).
        extra: builder-specific facts (documented per builder).
    """

    root: Path
    ids: list[str]
    labels: dict[str, str]
    groups: dict[str, str | None]
    mask_policies: dict[str, str]
    discs: dict[str, list[Disc]]
    corrupt_ids: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def disc_mask(discs: list[Disc], w: int = W, h: int = H) -> np.ndarray:
    """(h, w) bool: union of the discs."""
    y, x = np.mgrid[:h, :w]
    out = np.zeros((h, w), dtype=bool)
    for d in discs:
        out |= (x + 0.5 - d.cx) ** 2 + (y + 0.5 - d.cy) ** 2 <= d.r**2
    return out


def draw_image(
    discs: list[Disc],
    seed: int,
    background: tuple[int, int, int],
    lesion: tuple[int, int, int],
    w: int = W,
    h: int = H,
    noise: float = 3.0,
) -> np.ndarray:
    """(h, w, 3) uint8: a smooth seed-dependent background pattern, a solid-colour lesion.

    The background carries a few random low-frequency waves so that unrelated images have
    unrelated perceptual hashes (flat backgrounds would all hash alike).
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:h, :w].astype(np.float64)
    pattern = np.zeros((h, w))
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 2.5), rng.uniform(0.5, 2.5), rng.uniform(0, 2 * np.pi)
        pattern += np.cos(2 * np.pi * (fx * x / w + fy * y / h) + phase)
    img = np.asarray(background, dtype=np.float64) + 12.0 * pattern[:, :, None]  # (h, w, 3)
    img[disc_mask(discs, w, h)] = lesion
    img += rng.normal(0, noise, size=img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def _save(array: np.ndarray, path: Path, **kwargs: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _mask_png(discs: list[Disc], path: Path) -> None:
    _save(disc_mask(discs).astype(np.uint8) * 255, path)


def _truncated_jpeg(array: np.ndarray, path: Path) -> None:
    """A JPEG cut after its first bytes: opens (the header is there) but cannot be decoded."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[:300])


# ---------------------------------------------------------------------------------------------
# HAM10000
# ---------------------------------------------------------------------------------------------

_HAM_ROWS = [
    # lesion_id, image_id, dx, dx_type, age, sex, localization, dataset (cohort), disc
    ("HAM_0000118", "ISIC_0027419", "bkl", "histo", "80.0", "male", "scalp", "vidir_modern", Disc(12, 8, 6)),
    ("HAM_0000118", "ISIC_0025030", "bkl", "histo", "80.0", "male", "scalp", "vidir_modern", Disc(14, 11, 6)),
    ("HAM_0002730", "ISIC_0026769", "mel", "histo", "", "female", "back", "rosendahl", Disc(30, 20, 5)),
    (
        "HAM_0001466",
        "ISIC_0031633",
        "nv",
        "follow_up",
        "45.0",
        "unknown",
        "unknown",
        "vidir_molemax",
        Disc(20, 15, 9),
    ),
    (
        "HAM_0002761",
        "ISIC_0029176",
        "bcc",
        "consensus",
        "60.0",
        "female",
        "face",
        "vienna_dias",
        Disc(8, 22, 4),
    ),
    (
        "HAM_0005132",
        "ISIC_0025837",
        "df",
        "confocal",
        "55.0",
        "male",
        "lower extremity",
        "rosendahl",
        Disc(28, 8, 5),
    ),
]


def make_ham10000_tree(
    base: Path,
    *,
    variant: str = "csv",
    masks: bool = True,
    corrupt: bool = False,
    missing_image: bool = False,
    drop_column: str | None = None,
) -> TreeFacts:
    """A HAM10000 look-alike: 6 images of 5 lesions in two part folders, optional masks.

    Edge cases: lesion HAM_0000118 has two images (one group); ISIC_0026769 has a blank age;
    ISIC_0031633 has sex and localization "unknown"; ISIC_0029176 has no tschandl mask (so its
    mask policy is "none" while the others are "files").

    Args:
        base: a directory the caller owns; the tree goes to ``base / "ham10000"``.
        variant: "csv" (``HAM10000_metadata.csv``, comma, no cohort) or "dataverse"
            (``HAM10000_metadata.tab``, tab-separated, quoted, with the ``dataset`` cohort column).
        masks: write ``HAM10000_segmentations_lesion_tschandl``.
        corrupt: make ISIC_0025837 a truncated JPEG (listed in ``corrupt_ids``).
        missing_image: add a metadata row (ISIC_0099999) whose image does not exist
            (``extra["missing_image_id"]``).
        drop_column: leave this metadata column out (to test the missing-column error).

    ``extra``: ``metadata_path``, ``age`` (id -> expected age), ``sex``, ``localization``,
    ``cohort`` (id -> cohort, dataverse only), ``dx_type``.
    """
    root = base / "ham10000"
    header = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    if variant == "dataverse":
        header.append("dataset")
    rows = []
    facts = TreeFacts(root=root, ids=[], labels={}, groups={}, mask_policies={}, discs={})
    ages: dict[str, Any] = {}
    for i, (lesion, image_id, dx, dx_type, age, sex, loc, cohort, disc) in enumerate(_HAM_ROWS):
        folder = "HAM10000_images_part_1" if i % 2 == 0 else "HAM10000_images_part_2"
        array = draw_image([disc], seed=100 + i, background=(225, 180, 165), lesion=(95, 60, 40))
        path = root / folder / f"{image_id}.jpg"
        if corrupt and image_id == "ISIC_0025837":
            _truncated_jpeg(array, path)
            facts.corrupt_ids.append(image_id)
        else:
            _save(array, path, quality=95)
        has_mask = masks and image_id != "ISIC_0029176"
        if has_mask:
            _mask_png(
                [disc], root / "HAM10000_segmentations_lesion_tschandl" / f"{image_id}_segmentation.png"
            )
        values = [lesion, image_id, dx, dx_type, age, sex, loc] + ([cohort] if variant == "dataverse" else [])
        rows.append(values)
        facts.ids.append(image_id)
        facts.labels[image_id] = dx
        facts.groups[image_id] = lesion
        facts.mask_policies[image_id] = "files" if has_mask else "none"
        facts.discs[image_id] = [disc]
        ages[image_id] = int(float(age)) if age else None
    if missing_image:
        rows.append(["HAM_0009999", "ISIC_0099999", "nv", "histo", "30.0", "male", "back"])
        if variant == "dataverse":
            rows[-1].append("rosendahl")
        facts.extra["missing_image_id"] = "ISIC_0099999"
    if drop_column is not None:
        k = header.index(drop_column)
        header = header[:k] + header[k + 1 :]
        rows = [r[:k] + r[k + 1 :] for r in rows]
    if variant == "dataverse":
        # Dataverse's ingested .tab export: tab-separated, strings in double quotes.
        meta = root / "HAM10000_metadata.tab"
        lines = ["\t".join(f'"{h}"' for h in header)]
        lines += ["\t".join(f'"{v}"' if v else "" for v in r) for r in rows]
    else:
        meta = root / "HAM10000_metadata.csv"
        lines = [",".join(header)] + [",".join(r) for r in rows]
    meta.write_text("\n".join(lines) + "\n", encoding="utf-8")
    facts.ids.sort()
    facts.extra.update(
        metadata_path=meta,
        age=ages,
        sex={r[1]: (None if r[5] == "unknown" else r[5]) for r in _HAM_ROWS},
        localization={r[1]: (None if r[6] == "unknown" else r[6]) for r in _HAM_ROWS},
        cohort={r[1]: r[7] for r in _HAM_ROWS} if variant == "dataverse" else {},
        dx_type={r[1]: r[3] for r in _HAM_ROWS},
    )
    return facts


# ---------------------------------------------------------------------------------------------
# Kvasir-SEG
# ---------------------------------------------------------------------------------------------

_KVASIR_IDS = [
    "cju0qkwl35piu0993l0dewei2",
    "cju0qoxqj9q6s0835b43399p4",
    "cju0roawvklrq0799vmjorwfv",
    "cju0rx1idathl0835detmsp84",
    "cju0s2a9ekvms080138tjjpxr",
]
_KVASIR_DISCS = [Disc(20, 15, 8), Disc(10, 10, 5), Disc(30, 18, 7), Disc(15, 20, 6), Disc(25, 12, 10)]


def make_kvasir_tree(base: Path, *, split_lists: bool = True, bboxes: bool = True) -> TreeFacts:
    """A Kvasir-SEG look-alike: ``kvasir/Kvasir-SEG/{images,masks}`` with 5 polyps.

    Masks are 3-channel lossy JPEGs (quality 75), as in the release, so they need
    thresholding. ``kavsir_bboxes.json`` (sic) sits in ``Kvasir-SEG/``; ``train.txt`` (3 ids,
    one written as a file name ``<id>.jpg``) and ``val.txt`` (2 ids) sit in the root.

    ``root`` is the folder containing ``Kvasir-SEG``; ``extra["kvasir_dir"]`` is the
    ``Kvasir-SEG`` folder itself (also a valid root); ``extra["splits"]`` id -> official split
    (None without split lists); ``extra["bbox_count"]`` id -> number of boxes.
    """
    root = base / "kvasir"
    kdir = root / "Kvasir-SEG"
    facts = TreeFacts(root=root, ids=sorted(_KVASIR_IDS), labels={}, groups={}, mask_policies={}, discs={})
    boxes: dict[str, Any] = {}
    for i, (item_id, disc) in enumerate(zip(_KVASIR_IDS, _KVASIR_DISCS)):
        array = draw_image([disc], seed=200 + i, background=(200, 110, 100), lesion=(230, 150, 140))
        _save(array, kdir / "images" / f"{item_id}.jpg", quality=90)
        mask = np.repeat((disc_mask([disc]).astype(np.uint8) * 255)[:, :, None], 3, axis=2)  # (H, W, 3)
        _save(mask, kdir / "masks" / f"{item_id}.jpg", quality=75)
        n_boxes = 2 if i == 0 else 1
        boxes[item_id] = {
            "height": H,
            "width": W,
            "bbox": [
                {
                    "label": "polyp",
                    "xmin": int(disc.cx - disc.r),
                    "ymin": int(disc.cy - disc.r),
                    "xmax": int(disc.cx + disc.r),
                    "ymax": int(disc.cy + disc.r),
                }
            ]
            * n_boxes,
        }
        facts.labels[item_id] = "polyp"
        facts.groups[item_id] = None
        facts.mask_policies[item_id] = "files"
        facts.discs[item_id] = [disc]
    if bboxes:
        (kdir / "kavsir_bboxes.json").write_text(json.dumps(boxes), encoding="utf-8")
    splits: dict[str, str | None] = dict.fromkeys(_KVASIR_IDS)
    if split_lists:
        train, val = _KVASIR_IDS[:3], _KVASIR_IDS[3:]
        (root / "train.txt").write_text(f"{train[0]}\n{train[1]}.jpg\n\n{train[2]}\n", encoding="utf-8")
        (root / "val.txt").write_text("\n".join(val) + "\n", encoding="utf-8")
        splits.update(dict.fromkeys(train, "train"))
        splits.update(dict.fromkeys(val, "val"))
    facts.extra.update(
        kvasir_dir=kdir,
        splits=splits,
        bbox_count={k: len(v["bbox"]) for k, v in boxes.items()} if bboxes else {},
    )
    return facts


# ---------------------------------------------------------------------------------------------
# BUSI
# ---------------------------------------------------------------------------------------------


def make_busi_tree(base: Path) -> TreeFacts:
    """A BUSI look-alike: ``busi/Dataset_BUSI_with_GT/{benign,malignant,normal}``.

    Edge cases: ``benign (1).png`` has ``_mask.png`` and ``_mask_1.png`` (two lesions, merged
    with OR); ``benign (2).png`` is a grayscale (mode L) PNG; ``malignant (1).png`` is a
    near-duplicate of ``benign (2).png`` (RGB, slightly brighter, re-noised: benign/malignant
    leakage); ``normal (1).png`` has no mask (policy "empty"); ``normal (2).png`` has a black
    mask. Names hold spaces and parentheses.

    ``extra``: ``near_duplicates`` (the pair of ids), ``mask_files`` (id -> list of mask
    paths, base first), ``grayscale_id``.
    """
    root = base / "busi"
    gt = root / "Dataset_BUSI_with_GT"
    facts = TreeFacts(root=root, ids=[], labels={}, groups={}, mask_policies={}, discs={})
    mask_files: dict[str, list[Path]] = {}

    def ultrasound(discs: list[Disc], seed: int) -> np.ndarray:
        # Speckled grey tissue with a dark (hypoechoic) lesion; all channels equal.
        gray = draw_image(discs, seed, background=(120, 120, 120), lesion=(35, 35, 35), noise=6.0)
        return gray.mean(axis=2).round().astype(np.uint8)  # (H, W)

    def add(cls: str, n: int, discs: list[Disc], image: np.ndarray, masks: list[list[Disc]] | None) -> str:
        item_id = f"{cls}_{n}"
        _save(image, gt / cls / f"{cls} ({n}).png")
        paths = []
        for k, mask_discs in enumerate(masks or []):
            suffix = "_mask" if k == 0 else f"_mask_{k}"
            path = gt / cls / f"{cls} ({n}){suffix}.png"
            _mask_png(mask_discs, path)
            paths.append(path)
        facts.ids.append(item_id)
        facts.labels[item_id] = cls
        facts.groups[item_id] = None
        facts.mask_policies[item_id] = "files" if masks else ("empty" if cls == "normal" else "none")
        facts.discs[item_id] = discs
        mask_files[item_id] = paths
        return item_id

    d1, d2 = Disc(12, 10, 6), Disc(30, 20, 4)
    add("benign", 1, [d1, d2], np.repeat(ultrasound([d1, d2], 300)[:, :, None], 3, axis=2), [[d1], [d2]])
    d3 = Disc(20, 15, 7)
    gray = ultrasound([d3], 301)
    add("benign", 2, [d3], gray, [[d3]])  # mode L PNG
    rng = np.random.default_rng(7)
    twin = (
        np.clip(gray.astype(np.float64) + 4 + rng.normal(0, 2, gray.shape), 0, 255).round().astype(np.uint8)
    )
    add("malignant", 1, [d3], np.repeat(twin[:, :, None], 3, axis=2), [[d3]])
    d4 = Disc(28, 12, 8)
    add("malignant", 2, [d4], np.repeat(ultrasound([d4], 302)[:, :, None], 3, axis=2), [[d4]])
    add("normal", 1, [], np.repeat(ultrasound([], 303)[:, :, None], 3, axis=2), None)
    add("normal", 2, [], np.repeat(ultrasound([], 304)[:, :, None], 3, axis=2), [[]])
    facts.ids.sort()
    facts.extra.update(
        near_duplicates=("benign_2", "malignant_1"), mask_files=mask_files, grayscale_id="benign_2"
    )
    return facts


# ---------------------------------------------------------------------------------------------
# A user's CSV dataset and a captions CSV
# ---------------------------------------------------------------------------------------------


def make_csv_dataset(base: Path, *, columns: list[str] | None = None) -> TreeFacts:
    """A user's dataset: ``userdata/images/*.png`` and ``userdata/dataset.csv``.

    Rows: ``a.png`` (RGBA, mask, caption, group "p1", site "arm"), ``b.png`` (palette mode,
    group "p1", blank mask cell -> policy "none"), ``c.png`` (no lesion, mask cell ``empty``), ``d.jpg``
    (absolute image path, two masks joined with ``;``). Extra column ``site``.

    Args:
        base: a directory the caller owns.
        columns: write only these columns (to test the missing-column error).

    ``root`` is the ``userdata`` folder; ``extra["csv_file"]`` is the CSV path,
    ``extra["captions"]`` id -> supplied caption.
    """
    root = base / "userdata"
    da, dd1, dd2 = Disc(20, 15, 6), Disc(10, 20, 4), Disc(30, 10, 4)
    a = draw_image([da], 400, (210, 200, 190), (60, 40, 30))
    rgba = np.concatenate([a, np.full((H, W, 1), 255, np.uint8)], axis=2)
    _save(rgba, root / "images" / "a.png")
    _mask_png([da], root / "masks" / "a_mask.png")
    b = draw_image([Disc(25, 12, 5)], 401, (180, 190, 200), (40, 40, 90))
    Image.fromarray(b).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(root / "images" / "b.png")
    _save(draw_image([], 402, (200, 200, 200), (90, 30, 30)), root / "images" / "c.png")
    _save(draw_image([dd1, dd2], 403, (220, 190, 170), (70, 50, 40)), root / "images" / "d.jpg", quality=95)
    _mask_png([dd1], root / "masks" / "d_1.png")
    _mask_png([dd2], root / "masks" / "d_2.png")
    header = ["image", "label", "mask", "caption", "group", "site"]
    rows = [
        ["images/a.png", "mel", "masks/a_mask.png", "a dark lesion on the arm", "p1", "arm"],
        ["images/b.png", "nv", "", "", "p1", ""],
        ["images/c.png", "nv", "empty", "", "", "back"],
        [str(root / "images" / "d.jpg"), "bcc", "masks/d_1.png; masks/d_2.png", "", "", ""],
    ]
    if columns is not None:
        keep = [header.index(c) for c in columns]
        header = [header[k] for k in keep]
        rows = [[r[k] for k in keep] for r in rows]
    csv_file = root / "dataset.csv"
    csv_file.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return TreeFacts(
        root=root,
        ids=["a", "b", "c", "d"],
        labels={"a": "mel", "b": "nv", "c": "nv", "d": "bcc"},
        groups={"a": "p1", "b": "p1", "c": None, "d": None},
        mask_policies={"a": "files", "b": "none", "c": "empty", "d": "files"},
        discs={"a": [da], "b": [], "c": [], "d": [dd1, dd2]},
        extra={"csv_file": csv_file, "captions": {"a": "a dark lesion on the arm"}},
    )


def make_captions_csv(path: Path, captions: dict[str, str]) -> Path:
    """Write a ``file_name,text`` CSV (as VLM captioners write) from file name -> caption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["file_name,text"] + [f'{name},"{text}"' for name, text in captions.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
