"""SynthDerm: a procedural dermoscopy look-alike with known factors.

Every record is a pure function of ``(seed, index)`` (and the rendered ``size``): no global random
state, no files. Each record draws its factors from the distribution of its class, renders an RGB
image and a 0/255 lesion mask with numpy (vectorised over pixels), and writes a free caption whose
anatomy and style phrases are interleaved in one of several templates, plus the per-factor texts.

Factors (the names are constants: judges and prompts use them):

- anatomy: shape, size, position, border, count. They are properties of the lesion and are
  verifiable from the mask (area fraction bins :data:`SIZE_AREA_FRACTION`, centroid regions,
  border softness, number of components).
- style: skin_tone, pigment, illumination, artefact, device. Skin tone and pigment belong to the
  lesion (same patient, same lesion); illumination, artefact and device belong to the image.

Groups: indices come in blocks of :data:`GROUP_BLOCK`; in every block one lesion is imaged twice
(``GROUP_BLOCK - 1`` lesions per block), so 2 of every 10 records (20%) share their group with one
other record, as HAM10000 lesions are imaged several times. The second view keeps the label, the
anatomy factors, skin tone and pigment, and differs in at least one of illumination, artefact and
device (a different acquisition of the same lesion), with a slight rotation of the lesion.

Coordinates: pixel centres at ``i + 0.5``; x grows rightwards, y downwards ("upper" = small y).
Shapes are star-shaped around the lesion origin and described by a radius per angle
``r(theta)`` sampled at :data:`_N_THETA` angles, which makes area and centroid analytic (so the
rendered mask hits its size bin and position exactly up to pixel quantisation) and rendering one
interpolation per pixel. Lobulated outlines are unions of discs that contain the origin, which
are star-shaped too.

Layout: factors, classes and texts in ``factors.py``; outlines, rendering and records in ``render.py``.
"""

from vgmedgen.platform.datasets.synthderm.factors import (
    ANATOMY_FACTORS,
    CLASS_NAMES,
    CLASSES,
    FACTOR_PHRASES,
    FACTORS,
    GROUP_BLOCK,
    HAM10000_COUNTS,
    PIGMENT_RGB,
    SIZE_AREA_FRACTION,
    SKIN_RGB,
    STYLE_FACTORS,
    LesionClass,
    SynthDermError,
    anatomy_text_of,
    attributes_of,
    lesion_of_index,
    position_of_centroid,
    sample_factors,
    size_of_area_fraction,
    style_text_of,
)
from vgmedgen.platform.datasets.synthderm.render import contact_sheet, iter_synthderm, synthderm_record

__all__ = [
    "ANATOMY_FACTORS",
    "CLASSES",
    "CLASS_NAMES",
    "FACTORS",
    "FACTOR_PHRASES",
    "GROUP_BLOCK",
    "HAM10000_COUNTS",
    "PIGMENT_RGB",
    "SIZE_AREA_FRACTION",
    "SKIN_RGB",
    "STYLE_FACTORS",
    "LesionClass",
    "SynthDermError",
    "anatomy_text_of",
    "attributes_of",
    "contact_sheet",
    "iter_synthderm",
    "lesion_of_index",
    "position_of_centroid",
    "sample_factors",
    "size_of_area_fraction",
    "style_text_of",
    "synthderm_record",
]
