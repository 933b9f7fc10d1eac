"""What the HTTP API takes and gives: request bodies, their checks against the server's limits, and the
conversion to the platform's own :class:`~vgmedgen.platform.generation.request.SampleRequest` and
:class:`~vgmedgen.platform.generation.grid.SwapGrid`, which validate every rule of a request once, for
the sample job, a generation plan and HTTP alike.

Over HTTP a reference image travels as base64 in ``reference_image``; it is decoded here, with its size
and pixel count checked before any pixel is decompressed. Nothing a request carries ever becomes a
filesystem path: the reference's key is made by the server.
"""

from __future__ import annotations

import base64
import binascii
import io
import secrets
from typing import Any, Literal

import numpy as np
import PIL.Image
from pydantic import Field, ValidationError, field_validator

from vgmedgen.model.configbase import StrictConfig
from vgmedgen.platform.generation.config import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    SEED_LIMIT,
)
from vgmedgen.platform.generation.grid import SwapGrid
from vgmedgen.platform.generation.request import RequestError, SampleRequest, parse_request
from vgmedgen.platform.serving.config import ServeLimits

__all__ = [
    "GenerateBody",
    "GridBody",
    "ItemBody",
    "JobBody",
    "RequestError",
    "decode_reference",
    "grid_from_body",
    "http_settings",
    "request_from_item",
]

# HTTP field -> the sample request's field it sets (messages name the HTTP field).
HTTP_NAMES = {"num_steps": "steps", "reference": "reference_image"}


def http_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Sampler settings under their HTTP names (``num_steps`` is ``steps`` over HTTP)."""
    return {HTTP_NAMES.get(k, k): v for k, v in settings.items()}


class ItemBody(StrictConfig):
    """One sample request over HTTP: conditions, seeds and sampler settings (an async job's item)."""

    anatomy_prompt: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="Lesion shape, size, position, border, count (with style_prompt).",
        examples=["a small round lesion in the centre with a regular border"],
    )
    style_prompt: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="Colour, illumination, device, artefacts (with anatomy_prompt or reference_image).",
        examples=["dark brown lesion on light skin, even lighting"],
    )
    caption: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="One whole caption instead of the two prompts."
    )
    reference_image: str | None = Field(
        None,
        description="A real image as base64 (PNG or JPEG; a data: URL works): its anatomy is reused, its "
        "style too unless style_prompt is given.",
    )
    seed: int | None = Field(
        None,
        ge=0,
        lt=SEED_LIMIT,
        description="Seed of the first image; image k gets seed + k. Left out: a random seed, returned.",
    )
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="Number of images (see GET /v1/models for the limit).")
    steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="DPM-Solver++ steps (default: the model's)."
    )
    guidance_anatomy: float | None = Field(None, ge=0, le=MAX_GUIDANCE, description="Anatomy guidance g_a.")
    guidance_style: float | None = Field(None, ge=0, le=MAX_GUIDANCE, description="Style guidance g_s.")

    @field_validator("seed", "n", "steps", mode="before")
    @classmethod
    def _no_bools(cls, value: Any) -> Any:
        # pydantic reads true as 1; a boolean here is always a mistake.
        if isinstance(value, bool):
            raise ValueError(f"must be an integer, not a boolean (got {str(value).lower()})")
        return value


class GenerateBody(ItemBody):
    """``POST /v1/generate``: one sample request, answered with its images."""

    model: str | None = Field(None, description="A served model (GET /v1/models); default: the first.")
    return_masks: bool = Field(False, description="Also return each image's pseudo-mask (json format).")
    format: Literal["json", "png"] = Field(
        "json", description="json: base64 PNGs with seeds and parameters; png: one image as image/png."
    )


class GridBody(StrictConfig):
    """``POST /v1/grid``: anatomy prompts (rows) x style prompts (columns), the same seeds in every cell."""

    anatomy_prompts: list[str] = Field(min_length=1, max_length=32, examples=[["a small round lesion"]])
    style_prompts: list[str] = Field(min_length=1, max_length=32, examples=[["dark brown lesion"]])
    seeds_per_cell: int = Field(1, ge=1, le=64)
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_anatomy: float | None = Field(None, ge=0, le=MAX_GUIDANCE)
    guidance_style: float | None = Field(None, ge=0, le=MAX_GUIDANCE)
    model: str | None = None
    format: Literal["png", "json"] = Field(
        "png",
        description="png: the swap-grid picture; json: every cell's image with its row, column and seed.",
    )


class JobBody(StrictConfig):
    """``POST /v1/jobs``: a larger piece of work, run in the background (``Idempotency-Key`` optional)."""

    items: list[ItemBody] = Field(min_length=1, max_length=256)
    model: str | None = None
    return_masks: bool = False


def decode_reference(text: str, limits: ServeLimits) -> np.ndarray:
    """A base64 reference image as (H, W, 3) uint8, refusing what is too big before decompressing it.

    Raises:
        RequestError: naming ``reference_image`` and what to send instead.
    """

    def bad(message: str) -> RequestError:
        return RequestError([("reference_image", message)])

    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) > limits.max_body_bytes * 4 // 3 + 4:
        raise bad(f"is over {limits.max_body_bytes} bytes; send a smaller image")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad("is not valid base64; encode the image file's bytes with base64") from None
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # read from the header: nothing is decompressed yet
            if width * height > limits.max_reference_pixels:
                raise bad(
                    f"has {width}x{height} pixels, more than the {limits.max_reference_pixels} allowed; "
                    "downscale it first"
                )
            if image.format not in ("PNG", "JPEG", "WEBP", "BMP", "TIFF"):
                raise bad(f"is a {image.format} image; send a PNG or JPEG")
            return np.asarray(image.convert("RGB"))
    except RequestError:
        raise
    except (PIL.UnidentifiedImageError, OSError, ValueError, PIL.Image.DecompressionBombError) as exc:
        raise bad(
            f"is not a readable image ({type(exc).__name__}); send a PNG or JPEG file as base64"
        ) from None


def _check_limits(fields: dict[str, Any], limits: ServeLimits, n_field: str = "n") -> None:
    problems = []
    n = fields.get("n", 1)
    if isinstance(n, int) and n > limits.max_images:
        problems.append(
            (n_field, f"is at most {limits.max_images} on this server, got {n}; use POST /v1/jobs")
        )
    steps = fields.get("steps")
    if isinstance(steps, int) and steps > limits.max_steps:
        problems.append(("steps", f"is at most {limits.max_steps} on this server, got {steps}"))
    for key in ("anatomy_prompt", "style_prompt", "caption"):
        text = fields.get(key)
        if isinstance(text, str) and len(text) > limits.max_prompt_chars:
            problems.append(
                (
                    key,
                    f"has {len(text)} characters, more than the {limits.max_prompt_chars} this server allows",
                )
            )
    if problems:
        raise RequestError(problems, where="request")


def request_from_item(
    item: ItemBody, limits: ServeLimits, *, max_images: int | None = None
) -> tuple[SampleRequest, np.ndarray | None]:
    """The sample request of an HTTP item, and its decoded reference image (None without one).

    A missing seed is drawn at random (and returned with the images). ``reference`` becomes a key the
    server made, never a path.

    Raises:
        RequestError: every problem, naming the HTTP field, the value and what is allowed.
    """
    fields = item.model_dump(exclude_none=True, exclude={"model", "return_masks", "format"})
    limited = limits if max_images is None else limits.model_copy(update={"max_images": max_images})
    _check_limits(fields, limited)
    reference = (
        decode_reference(fields.pop("reference_image"), limits) if "reference_image" in fields else None
    )
    if reference is not None:
        fields["reference"] = "upload"  # a placeholder: the model deployment gets the pixels, not a path
    if "seed" not in fields:
        fields["seed"] = secrets.randbelow(SEED_LIMIT - fields.get("n", 1))
    if "steps" in fields:
        fields["num_steps"] = fields.pop("steps")
    try:
        return parse_request(fields, names=HTTP_NAMES), reference
    except RequestError as err:  # the request's own words name `reference` a path; over HTTP it is base64
        raise RequestError([(f, _http_words(m)) for f, m in err.problems], where="request") from None


def _http_words(message: str) -> str:
    return message.replace(
        "`reference` (a real image's path: anatomy from the image",
        "`reference_image` (a base64 PNG or JPEG: anatomy from the image",
    ).replace("`reference`", "`reference_image`")


def grid_from_body(body: GridBody, limits: ServeLimits) -> SwapGrid:
    """The swap grid of a ``/v1/grid`` body, within the server's limits.

    Raises:
        RequestError: naming the field.
    """
    cells = len(body.anatomy_prompts) * len(body.style_prompts) * body.seeds_per_cell
    problems = []
    if cells > limits.max_grid_cells:
        problems.append(
            ("", f"the grid has {cells} images (rows x columns x seeds_per_cell), more than the "
             f"{limits.max_grid_cells} this server allows; send fewer prompts or seeds")
        )  # fmt: skip
    if body.steps is not None and body.steps > limits.max_steps:
        problems.append(("steps", f"is at most {limits.max_steps} on this server, got {body.steps}"))
    for key in ("anatomy_prompts", "style_prompts"):
        for i, text in enumerate(getattr(body, key)):
            if len(text) > limits.max_prompt_chars:
                problems.append(
                    (f"{key}.{i}", f"has more than the {limits.max_prompt_chars} characters allowed")
                )
    if problems:
        raise RequestError(problems, where="grid request")
    fields = body.model_dump(exclude_none=True, exclude={"model", "format"})
    if "steps" in fields:
        fields["num_steps"] = fields.pop("steps")
    try:
        return SwapGrid.model_validate(fields)
    except ValidationError as err:
        raise RequestError(
            [(".".join(map(str, e["loc"])).replace("num_steps", "steps"), e["msg"]) for e in err.errors()],
            where="grid request",
        ) from None
