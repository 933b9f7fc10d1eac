"""Caption writing: anatomy and style phrases, prompts and free captions from measured bins.

The measurements and their bins are in :mod:`vgmedgen.platform.datasets.measure`; this module only
turns them into words. Pure Python; no file access.

Typical use::

    m = measure_mask(mask)                      # mask: (H, W) bool or 0/255 uint8
    s = measure_image(image, mask)              # image: (H, W, 3) uint8 RGB
    a = anatomy_phrases(m, site="back")
    t = style_phrases(s, modality="dermoscopic image", background="skin")
    text = caption(a, t, record_id="ISIC_0024306")
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from vgmedgen.platform.datasets.measure import describe_bins
from vgmedgen.platform.storage import stable_int

__all__ = [
    "anatomy_phrases",
    "anatomy_text",
    "caption",
    "join_anatomy_phrases",
    "join_style_phrases",
    "style_phrases",
    "style_text",
]

_COUNT_WORDS = {1: "a single", 2: "two", 3: "three"}
# Positions are in the image frame; "of the frame" keeps them apart from body sites ("on the back").
_POSITION_PHRASES = {
    "upper left": "in the upper left of the frame",
    "upper": "at the top of the frame",
    "upper right": "in the upper right of the frame",
    "left": "at the left of the frame",
    "centre": "in the centre of the frame",
    "right": "at the right of the frame",
    "lower left": "in the lower left of the frame",
    "lower": "at the bottom of the frame",
    "lower right": "in the lower right of the frame",
}
_BRIGHTNESS_PHRASES = {"dark": "dark image", "medium": "medium brightness", "bright": "bright image"}


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def _clean_meta(value: Any) -> str | None:
    """A metadata string fit for a prompt, or None for blanks and 'unknown'."""
    if value is None:
        return None
    text = str(value).strip().replace("_", " ")
    return None if not text or text.lower() in {"unknown", "nan", "na", "none"} else text


def anatomy_phrases(
    mask_measures: Mapping[str, Any] | None, *, site: str | None = None, noun: str = "lesion"
) -> dict[str, str]:
    """Anatomy phrases by slot: ``subject``, ``position``, ``border``, ``site``.

    Args:
        mask_measures: output of :func:`measure_mask`, or None when the dataset has no mask
            (then only the subject noun and the site are said).
        site: body site (HAM10000 ``localization``); blank/"unknown" is left out.
        noun: what the mask marks ("lesion", "polyp").
    """
    phrases: dict[str, str] = {}
    if mask_measures is None:
        phrases["subject"] = f"a {noun}"
    elif mask_measures["n_components"] == 0:
        phrases["subject"] = f"no visible {noun}"
    else:
        bins = describe_bins(mask_measures, None)
        n = mask_measures["n_components"]
        if n == 1:
            phrases["subject"] = f"a single {bins['size']} {bins['shape']} {noun}"
        else:
            count = _COUNT_WORDS.get(n, "multiple")
            phrases["subject"] = (
                f"{count} {noun}s of {bins['size']} total extent, the largest {bins['shape']}"
            )
        phrases["position"] = _POSITION_PHRASES[bins["position"]]
        phrases["border"] = f"with a {bins['border']} border"
    site_text = _clean_meta(site)
    if site_text:
        phrases["site"] = f"on the {site_text}"
    return phrases


def style_phrases(
    image_measures: Mapping[str, Any],
    *,
    modality: str | None = None,
    background: str = "background",
    noun: str = "lesion",
    cohort: str | None = None,
) -> dict[str, str]:
    """Style phrases by slot: ``modality``, ``colour``, ``lighting``, ``tone``, ``cohort``.

    Args:
        image_measures: output of :func:`measure_image`.
        modality: e.g. "dermoscopic image"; left out when None.
        background: what surrounds the lesion ("skin", "mucosa", "breast tissue").
        noun: what the mask marks, as in :func:`anatomy_phrases`.
        cohort: source cohort or device (HAM10000 ``dataset`` column); blanks left out.
    """
    bins = describe_bins(None, image_measures)
    phrases: dict[str, str] = {}
    if modality:
        phrases["modality"] = modality
    if bins["lesion_colour"] is not None:
        phrases["colour"] = f"{bins['lesion_colour']} {noun} on {bins['background_colour']} {background}"
    else:
        phrases["colour"] = f"{bins['background_colour']} {background}"
    phrases["lighting"] = (
        "vignetted, darker corners" if bins["illumination"] == "vignetted" else "even illumination"
    )
    phrases["tone"] = f"{_BRIGHTNESS_PHRASES[bins['brightness']]}, {bins['contrast']} contrast"
    cohort_text = _clean_meta(cohort)
    if cohort_text:
        phrases["cohort"] = f"{cohort_text} cohort"
    return phrases


def anatomy_text(
    mask_measures: Mapping[str, Any] | None, *, site: str | None = None, noun: str = "lesion"
) -> str:
    """Anatomy-only prompt, e.g. "a single medium round lesion in the upper left of the frame
    with a regular border, on the back"; an empty mask gives "no visible lesion"."""
    return join_anatomy_phrases(anatomy_phrases(mask_measures, site=site, noun=noun))


def join_anatomy_phrases(phrases: Mapping[str, str]) -> str:
    """The anatomy text of :func:`anatomy_phrases`' output (see :func:`anatomy_text`)."""
    core = " ".join(phrases[k] for k in ("subject", "position", "border") if k in phrases)
    return f"{core}, {phrases['site']}" if "site" in phrases else core


def style_text(
    image_measures: Mapping[str, Any],
    *,
    modality: str | None = None,
    background: str = "background",
    noun: str = "lesion",
    cohort: str | None = None,
) -> str:
    """Style-only prompt, e.g. "dermoscopic image, dark brown lesion on light pink skin,
    even illumination, medium brightness, high contrast, rosendahl cohort"."""
    return join_style_phrases(
        style_phrases(image_measures, modality=modality, background=background, noun=noun, cohort=cohort)
    )


def join_style_phrases(phrases: Mapping[str, str]) -> str:
    """The style text of :func:`style_phrases`' output (see :func:`style_text`)."""
    return ", ".join(phrases[k] for k in ("modality", "colour", "lighting", "tone", "cohort") if k in phrases)


# Caption templates: each is a list of segments; a segment is (text before, slot, text after)
# and is dropped whole when its slot is missing, so templates degrade gracefully.
_Segment = tuple[str, str, str]
_TEMPLATES: tuple[tuple[_Segment, ...], ...] = (
    (
        ("", "modality", " of "),
        ("", "subject", ""),
        (" ", "position", ""),
        (", ", "colour", ""),
        (", ", "border", ""),
        (", ", "site", ""),
        ("; ", "lighting", ""),
        (", ", "tone", ""),
        (", ", "cohort", ""),
    ),
    (
        ("", "subject", ""),
        (" ", "site", ""),
        (", ", "colour", ""),
        (", ", "position", ""),
        (", ", "border", ""),
        ("; ", "modality", ""),
        (" with ", "lighting", ""),
        (", ", "tone", ""),
        (", ", "cohort", ""),
    ),
    (
        ("", "cohort", ", "),
        ("", "modality", ": "),
        ("", "colour", ""),
        (", ", "tone", ""),
        (". ", "subject", ""),
        (" ", "position", ""),
        (" ", "border", ""),
        (", ", "site", ""),
        (", ", "lighting", ""),
    ),
    (
        ("", "tone", ""),
        (", ", "lighting", ""),
        (", ", "modality", ""),
        (" showing ", "subject", ""),
        (" ", "border", ""),
        (" ", "position", ""),
        (", ", "site", ""),
        ("; ", "colour", ""),
        (", ", "cohort", ""),
    ),
)


def caption(anatomy: Mapping[str, str], style: Mapping[str, str], record_id: str) -> str:
    """A free caption interleaving anatomy and style phrases, as a clinician might write.

    The template is chosen by a hash of ``record_id`` (stable across processes, unlike
    Python's ``hash``), so the same record always gets the same caption.

    Args:
        anatomy: output of :func:`anatomy_phrases`.
        style: output of :func:`style_phrases`.
        record_id: the record's id.
    """
    slots = {**anatomy, **style}
    choice = stable_int(record_id) % len(_TEMPLATES)
    parts: list[str] = []
    for before, slot, after in _TEMPLATES[choice]:
        if slot in slots:
            # The first emitted segment drops its leading connector.
            parts.append((before if parts else "") + slots[slot] + after)
    text = "".join(parts).strip().rstrip(",:;. ")
    # Sentence case after a full stop that a template put mid-caption.
    text = re.sub(r"\. ([a-z])", lambda m: ". " + m.group(1).upper(), text)
    return text[:1].upper() + text[1:] + "."
