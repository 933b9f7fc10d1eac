"""The base class of every typed config in vgmedgen, and the error a bad config raises.

Configs are frozen pydantic models with ``extra="forbid"``: a typo, a wrong type or a value
out of range fails when the config is built, with the field path, the bad value and what is
allowed. Defaults live only in the config classes (and the named preset registries).

This module sits in ``model/`` because ``model/`` may import nothing from ``platform/``; the
platform's experiment config builds on the same base.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ConfigError", "StrictConfig", "build_config", "choose_preset", "deep_merge"]

T = TypeVar("T", bound="StrictConfig")


class ConfigError(ValueError):
    """A user-supplied configuration value is wrong; the message says which and how to fix it."""


class StrictConfig(BaseModel):
    """Frozen, validated config: unknown keys are errors, values are checked on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, protected_namespaces=())


def _field_names_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The valid field names of the (nested) config class that ``loc`` points into."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = field.annotation
        # Optional[X] / X | None -> X
        args = getattr(current, "__args__", None)
        if args and not (isinstance(current, type) and issubclass(current, BaseModel)):
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            current = models[0] if models else current
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def format_validation_error(err: ValidationError, model: type[BaseModel], where: str = "") -> str:
    """Turn pydantic's error into lines of ``path: problem (got value)`` with the allowed values."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            names = _field_names_at(model, loc[:-1]) or []
            hint = difflib.get_close_matches(str(loc[-1]), names, n=1)
            did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
            lines.append(f"  {path}: unknown field.{did_you_mean} Valid fields here: {', '.join(names)}")
        else:
            value = e.get("input")
            shown = repr(value)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            lines.append(f"  {path}: {e['msg']} (got {shown})")
    head = f"Invalid configuration{(' in ' + where) if where else ''}:"
    return "\n".join([head, *lines])


def build_config(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Validate ``data`` into ``cls``; raise :class:`ConfigError` with a readable message."""
    try:
        return cls.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, cls, where)) from None


def choose_preset(registry: Mapping[str, Any], name: str, what: str) -> Any:
    """Look a preset up by name in an explicit registry; an unknown name lists the valid ones."""
    if name not in registry:
        hint = difflib.get_close_matches(name, list(registry), n=1)
        did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(
            f"Unknown {what} preset '{name}'.{did_you_mean} Valid presets: {', '.join(sorted(registry))}"
        )
    return registry[name]


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, recursively for nested mappings (neither is modified)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out
