"""What to generate: one sample request, the same for the sample job, a generation plan and HTTP.

A :class:`SampleRequest` is flat and JSON-able: one request is a row of a generation plan (a
Parquet row, :func:`requests_to_table`), an item of an HTTP batch job and the body of an HTTP
endpoint (``SampleRequest.model_validate_json``), and ``jobs/sample.py`` builds one from its
flags. It conditions in exactly one of three ways (the model's three, see
:mod:`vgmedgen.model.pipeline`):

- ``anatomy_prompt`` + ``style_prompt``: the two factors separately (the swap that shows control);
- ``caption``: one whole caption, split into anatomy and style by the model;
- ``reference``: the path of a real image whose anatomy to reuse (style from the image, or from
  ``style_prompt`` when given).

Image ``k`` of a request gets seed ``seed + k``. Sampler settings left out (None) are the model
version's own (its ``SamplerConfig``). Bad values fail when the request is built, with the field
and what is allowed: :func:`parse_request` turns pydantic's error into a :class:`RequestError`
(a ``ConfigError``) whose lines name the field (or the command-line flag) and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from pydantic import ValidationError, field_validator, model_validator

from vgmedgen.model.configbase import ConfigError, StrictConfig
from vgmedgen.platform.generation.config import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    SEED_LIMIT,
    _error,
    check_guidance,
    check_prompt,
    check_seed,
    check_steps,
)

if TYPE_CHECKING:
    from vgmedgen.model.sampler import SamplerConfig

__all__ = [
    "MAX_GUIDANCE",
    "MAX_IMAGES",
    "MAX_PROMPT_CHARS",
    "MAX_STEPS",
    "REQUEST_SCHEMA",
    "SEED_LIMIT",
    "RequestError",
    "SampleRequest",
    "SamplingChecks",
    "check_guidance",
    "check_prompt",
    "check_seed",
    "check_steps",
    "parse_request",
    "requests_from_table",
    "requests_to_table",
]

Mode = Literal["prompts", "caption", "reference"]

_HOW = (
    "give `anatomy_prompt` and `style_prompt`, or `caption` (one whole caption), or `reference` (a real "
    "image's path: anatomy from the image, style from the image or from `style_prompt`)"
)


class SamplingChecks(StrictConfig):
    """The rules of the first seed, the steps and the guidance scales, for every model that has those
    fields (a sample request, a swap grid): each field's own message names it and the limit."""

    @field_validator("seed", check_fields=False)
    @classmethod
    def _seed(cls, value: int) -> int:
        return check_seed(value)

    @field_validator("num_steps", check_fields=False)
    @classmethod
    def _steps(cls, value: int | None) -> int | None:
        return None if value is None else check_steps(value)

    @field_validator("guidance_anatomy", "guidance_style", check_fields=False)
    @classmethod
    def _guidance(cls, value: float | None) -> float | None:
        return None if value is None else check_guidance(value)


class SampleRequest(SamplingChecks):
    """What to generate: conditions, seeds, number of images and sampler settings.

    Attributes:
        anatomy_prompt: lesion shape, size, position, border, count (needs ``style_prompt``).
        style_prompt: colour, illumination, device, artefacts; with ``reference`` it replaces
            the image's own style.
        caption: one whole caption, split into anatomy and style by the model.
        reference: path of a real image (PNG, JPEG, ...) whose anatomy to reuse.
        seed: seed of the first image; image ``k`` gets ``seed + k``.
        n: number of images (1 to MAX_IMAGES).
        num_steps: DPM-Solver++ steps (None: the model's sampler config).
        guidance_anatomy: anatomy guidance g_a (None: the model's).
        guidance_style: style guidance g_s (None: the model's).
    """

    anatomy_prompt: str | None = None
    style_prompt: str | None = None
    caption: str | None = None
    reference: str | None = None
    seed: int = 0
    n: int = 1
    num_steps: int | None = None
    guidance_anatomy: float | None = None
    guidance_style: float | None = None

    @field_validator("seed", "n", "num_steps", mode="before")
    @classmethod
    def _no_bools(cls, value: Any) -> Any:
        # pydantic reads true as 1; a boolean here is always a mistake.
        if isinstance(value, bool):
            raise _error("must be an integer, not a boolean (got {value})", value=str(value))
        return value

    @field_validator("anatomy_prompt", "style_prompt", "caption")
    @classmethod
    def _prompt(cls, value: str | None) -> str | None:
        return None if value is None else check_prompt(value)

    @field_validator("reference")
    @classmethod
    def _reference(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise _error("is empty; give the path of a real image, or leave the field out")
        return value

    @field_validator("n")
    @classmethod
    def _n(cls, value: int) -> int:
        if value < 1:
            raise _error("must be a positive integer, got {value}", value=value)
        if value > MAX_IMAGES:
            raise _error(
                "is at most {limit} images per request, got {value}; send several requests (the next "
                "one starting at seed + {limit})",
                value=value,
                limit=MAX_IMAGES,
            )
        return value

    @model_validator(mode="after")
    def _one_mode(self) -> SampleRequest:
        anatomy, style = self.anatomy_prompt is not None, self.style_prompt is not None
        if self.caption is not None:
            if anatomy or style or self.reference is not None:
                raise _error(
                    "`caption` (a whole caption) cannot be combined with `anatomy_prompt`, `style_prompt` or "
                    "`reference`; {how}",
                    how=_HOW,
                )
        elif self.reference is not None:
            if anatomy:
                raise _error(
                    "`anatomy_prompt` cannot be combined with `reference`: the anatomy comes from the image; "
                    "drop one of them"
                )
        elif not anatomy and not style:
            raise _error("no prompt given; {how}", how=_HOW)
        elif not (anatomy and style):
            given, missing = (
                ("anatomy_prompt", "style_prompt") if anatomy else ("style_prompt", "anatomy_prompt")
            )
            raise _error(
                "`{given}` needs `{missing}` too (or a `reference` for the anatomy); {how}",
                given=given,
                missing=missing,
                how=_HOW,
            )
        if self.seed + self.n > SEED_LIMIT:
            raise _error(
                "seeds seed .. seed + n - 1 must stay below 2**31; lower `seed` (got seed {seed}, n {n})",
                seed=self.seed,
                n=self.n,
            )
        return self

    @property
    def mode(self) -> Mode:
        """How the request conditions: ``prompts``, ``caption`` or ``reference``."""
        if self.caption is not None:
            return "caption"
        return "reference" if self.reference is not None else "prompts"

    @property
    def seeds(self) -> list[int]:
        """The seed of each image: ``seed, seed + 1, ..., seed + n - 1``."""
        return list(range(self.seed, self.seed + self.n))

    def conditions(self) -> dict[str, str]:
        """The condition fields given (``anatomy_prompt``, ``style_prompt``, ``caption``, ``reference``)."""
        fields = ("anatomy_prompt", "style_prompt", "caption", "reference")
        return {k: getattr(self, k) for k in fields if getattr(self, k) is not None}

    def sampler(self, base: SamplerConfig) -> SamplerConfig:
        """``base`` (the model's sampler config) with this request's steps and guidance where given."""
        # Imported here: validating a request (an HTTP ingress, a plan reader) needs no torch.
        from vgmedgen.model.sampler import SamplerConfig

        update = {
            k: getattr(self, k)
            for k in ("num_steps", "guidance_anatomy", "guidance_style")
            if getattr(self, k) is not None
        }
        return SamplerConfig.model_validate({**base.model_dump(), **update}) if update else base


class RequestError(ConfigError):
    """A sample request that does not validate; one line per problem, naming the field and the fix.

    Attributes:
        problems: ``(field, message)`` pairs; the field is ``""`` for a rule over several fields.
    """

    def __init__(self, problems: list[tuple[str, str]], where: str = "sample request") -> None:
        self.problems = problems
        lines = [f"{field} {msg}" if field else msg for field, msg in problems]
        text = (
            f"invalid {where}: {lines[0]}"
            if len(lines) == 1
            else "\n".join([f"invalid {where}:", *(f"  {x}" for x in lines)])
        )
        super().__init__(text)


def _problems(err: ValidationError, names: Mapping[str, str]) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        field = names.get(path, path)
        if e["type"] == "sample_request":
            out.append((field, e["msg"]))
        elif e["type"] == "extra_forbidden":
            valid = ", ".join(names.get(k, k) for k in SampleRequest.model_fields)
            out.append((field, f"is not a field of a sample request; valid fields: {valid}"))
        else:
            shown = repr(e.get("input"))
            out.append((field, f"{e['msg'][:1].lower()}{e['msg'][1:]} (got {shown[:80]})"))
    return out


def parse_request(
    data: Mapping[str, Any] | str | bytes, *, names: Mapping[str, str] | None = None
) -> SampleRequest:
    """Validate a request from a mapping (a plan row, a parsed body) or JSON text.

    Args:
        data: the request's fields.
        names: how to call fields in messages (the sample job maps ``n`` to ``--n``).

    Raises:
        RequestError: every problem, each naming its field (or flag) and the fix.
    """
    try:
        if isinstance(data, (str, bytes)):
            return SampleRequest.model_validate_json(data)
        return SampleRequest.model_validate(dict(data))
    except ValidationError as err:
        raise RequestError(_problems(err, names or {})) from None


# A plan's Parquet schema: one column per field, so that a column that is null in every row still
# has its type.
REQUEST_SCHEMA = pa.schema(
    [
        pa.field("anatomy_prompt", pa.string()),
        pa.field("style_prompt", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("reference", pa.string()),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("n", pa.int64(), nullable=False),
        pa.field("num_steps", pa.int64()),
        pa.field("guidance_anatomy", pa.float64()),
        pa.field("guidance_style", pa.float64()),
    ]
)


def requests_to_table(requests: Iterable[SampleRequest]) -> pa.Table:
    """Requests as rows of a plan table (:data:`REQUEST_SCHEMA`), in order."""
    return pa.Table.from_pylist([r.model_dump() for r in requests], schema=REQUEST_SCHEMA)


def requests_from_table(table: pa.Table) -> list[SampleRequest]:
    """The requests of a plan table, each validated; a bad row raises naming its index and field."""
    missing = [name for name in REQUEST_SCHEMA.names if name not in table.column_names]
    if missing:
        raise RequestError(
            [("", f"the plan table lacks the columns {missing}; write plans with requests_to_table")],
            where="plan",
        )
    out = []
    for i, row in enumerate(table.select(REQUEST_SCHEMA.names).to_pylist()):
        try:
            out.append(parse_request(row))
        except RequestError as err:
            raise RequestError(err.problems, where=f"sample request in plan row {i}") from None
    return out
