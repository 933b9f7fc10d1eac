"""SynthDerm's factor vocabulary: every factor and its values, the one table that configs naming SynthDerm
factors (the adherence swap grid) are validated against when they load.

It lives in a config module, beside the data it names, so that loading an experiment config pulls in
no rendering code; :mod:`vgmedgen.platform.datasets.synthderm.factors` builds classes, texts and
measurements on it.
"""

from __future__ import annotations

__all__ = ["ANATOMY_FACTORS", "FACTORS", "STYLE_FACTORS"]

FACTORS: dict[str, tuple[str, ...]] = {
    # anatomy
    "shape": ("round", "oval", "irregular", "lobulated"),
    "size": ("small", "medium", "large"),
    "position": ("centre", "upper left", "upper right", "lower left", "lower right"),
    "border": ("sharp", "blurred"),
    "count": ("one", "satellite"),
    # style
    "skin_tone": ("light", "medium", "dark"),
    "pigment": ("light brown", "dark brown", "black", "pink", "blue-grey"),
    "illumination": ("even", "vignetted"),
    "artefact": ("none", "hair", "ruler", "bubbles"),
    "device": ("polarised", "non-polarised"),
}
ANATOMY_FACTORS: tuple[str, ...] = ("shape", "size", "position", "border", "count")
STYLE_FACTORS: tuple[str, ...] = ("skin_tone", "pigment", "illumination", "artefact", "device")
