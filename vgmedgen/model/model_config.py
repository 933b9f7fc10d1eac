"""The whole model's typed config (:class:`ModelConfig`: a preset plus per-component overrides) and the presets.

Kept apart from :mod:`vgmedgen.model.vgmedgen` (which re-exports it) so that loading an experiment config
imports no diffusers: a Ray worker that only reads a config starts seconds sooner.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, model_validator

from vgmedgen.model.configbase import StrictConfig, deep_merge
from vgmedgen.model.generator_config import GENERATOR_PRESETS, GeneratorConfig
from vgmedgen.model.sampler import SamplerConfig
from vgmedgen.model.text import TEXT_PRESETS, TextConfig
from vgmedgen.model.visual import VISUAL_PRESETS, VisualConfig

__all__ = ["MODEL_PRESETS", "PRESET_NAMES", "ModelConfig"]

PRESET_NAMES = ("tiny", "demo", "pixart-512")


def _preset_dicts(name: str) -> dict[str, Any]:
    return {
        "visual": VISUAL_PRESETS[name].model_dump(mode="python", exclude_unset=False),
        "text": TEXT_PRESETS[name].model_dump(mode="python"),
        "generator": dict(GENERATOR_PRESETS[name]),
        "sampler": {},
    }


MODEL_PRESETS: dict[str, dict[str, Any]] = {name: _preset_dicts(name) for name in PRESET_NAMES}


class ModelConfig(StrictConfig):
    """The whole model: a named preset, then per-component overrides on top of it.

    ``preset`` picks complete defaults for every component from :data:`MODEL_PRESETS`; any field
    given under ``visual``, ``text``, ``generator`` or ``sampler`` overrides the preset's value.
    The widths that tie components together (the priors' sizes A and S, the BERT width of the
    ``hybrid`` caption tokens) are derived from the visual and text configs; setting them to
    something else is an error.
    """

    preset: str = "tiny"
    visual: VisualConfig
    text: TextConfig
    generator: GeneratorConfig
    sampler: SamplerConfig = SamplerConfig()

    @model_validator(mode="before")
    @classmethod
    def _from_preset(cls, data: Any) -> Any:
        if isinstance(data, BaseModel) or not isinstance(data, Mapping):
            return data
        data = dict(data)
        preset = data.get("preset", "tiny")
        if preset not in MODEL_PRESETS:
            import difflib

            hint = difflib.get_close_matches(str(preset), PRESET_NAMES, n=1)
            raise ValueError(
                f"unknown model preset {preset!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                f"valid presets: {', '.join(PRESET_NAMES)}"
            )
        base = MODEL_PRESETS[preset]
        out = {k: v for k, v in data.items() if k not in ("visual", "text", "generator", "sampler")}
        user: dict[str, dict[str, Any]] = {}
        for part in ("visual", "text", "generator", "sampler"):
            given = data.get(part) or {}
            if isinstance(given, BaseModel):
                given = given.model_dump(mode="python")
            if not isinstance(given, Mapping):
                return data  # let field validation report the wrong type
            user[part] = dict(given)
            out[part] = deep_merge(base[part], given)
        try:
            vis = VisualConfig.model_validate(out["visual"])
            text_width = TextConfig.model_validate(out["text"]).encoder_hidden
        except Exception:
            return out  # the field validators report the problem with its path
        derived = {
            ("text", "anatomy_dim"): vis.anatomy_prior_dim,
            ("text", "style_dim"): vis.style_prior_dim,
            ("generator", "hffm", "anatomy_dim"): vis.anatomy_prior_dim,
            ("generator", "hffm", "style_dim"): vis.style_prior_dim,
            ("generator", "hffm", "text_width"): text_width,
        }
        for path, value in derived.items():
            given_node: Any = user
            for p in path[:-1]:
                given_node = given_node.get(p, {}) if isinstance(given_node, Mapping) else {}
            if isinstance(given_node, Mapping) and path[-1] in given_node and given_node[path[-1]] != value:
                raise ValueError(
                    f"{'.'.join(path)}={given_node[path[-1]]} contradicts the visual/text configs, which "
                    f"give {value}; leave it out (it is derived)"
                )
            node = out
            for p in path[:-1]:
                node = node.setdefault(p, {})
            node[path[-1]] = value
        return out

    @property
    def image_size(self) -> int:
        """The side of the images the model generates (and trains on), in pixels."""
        return self.generator.backbone.sample_size * self.generator.downscale
