"""VG-MedGen assembled: the model config and presets, the model version on disk, conditions and sampling.

A model version is one directory::

    model_config.json        the resolved ModelConfig
    visual/                  stage 1: model.safetensors, config.json, manifest.json
    text/                    stage 2: encoder/ (a transformers BERT dir), heads.safetensors, config.json, manifest.json
    generator/               stage 3: trainable.safetensors (backbone or LoRA + HFFM), ema.safetensors,
                             lora/ (the peft adapter in the format diffusers' load_lora_adapter reads, LoRA mode),
                             config.json, manifest.json
    model_index.json         diffusers' pipeline index: the folder loads with
                             ``diffusers.DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)``
    vgmedgen_pipeline.py     the one line model_index.json points diffusers at: an import of the installed
                             ``vgmedgen``'s pipeline class (no model code)
    manifest.json            sha256 of every file above
    MODEL_CARD.md            the model card (written by the platform; documentation, outside the hashes)

Each part is written by the stage that trains it (``save_visual``/``save_text``/``save_generator``);
loading checks the content hashes and never unpickles. The paths come from the caller
(``platform/``): this module only opens files through safetensors and the libraries'
``from_pretrained``/``save_pretrained``.

Shape legend: N batch, A anatomy prior width, S style width, H/W image size, L caption tokens.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import ModelMixin
from safetensors.torch import load_file, save_file

from vgmedgen.model.configbase import ConfigError
from vgmedgen.model.ema import EMA
from vgmedgen.model.generator import Generator, GeneratorConfig, build_generator
from vgmedgen.model.model_config import MODEL_PRESETS, PRESET_NAMES, ModelConfig
from vgmedgen.model.parts import (
    MODEL_CARD,
    ModelVersionError,
    load_text,
    load_visual,
    save_text,
    save_visual,
    verify_manifest,
    write_manifest,
)
from vgmedgen.model.sampler import SamplerConfig, sample
from vgmedgen.model.text import TextDisentangler
from vgmedgen.model.visual import VisualDisentangler

__all__ = [
    "MODEL_CARD",
    "MODEL_PRESETS",
    "PRESET_NAMES",
    "ModelConfig",
    "ModelVersionError",
    "VGMedGen",
    "load_generator",
    "load_text",
    "load_visual",
    "unsupported_load_kwargs",
    "save_generator",
    "save_text",
    "save_visual",
    "write_manifest",
    "write_pipeline_index",
    "verify_manifest",
]


# The generator part's copy of an autoencoder trained on the dataset (generator.autoencoder).
GENERATOR_VAE = "vae"


def save_generator(model: Generator, ema: EMA | None, directory: Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trained = {n: p.detach().float().cpu().contiguous() for n, p in model.named_trainable_parameters()}
    save_file(trained, str(directory / "trainable.safetensors"))
    # Files of an earlier save into the same directory that this model does not write would be
    # hashed into the new manifest and loaded back (a stale EMA would silently be sampled from).
    if ema is None:
        for stale in ("ema.safetensors", "ema.json"):
            (directory / stale).unlink(missing_ok=True)
    if not model.lora_modules:
        shutil.rmtree(directory / "lora", ignore_errors=True)
    if ema is not None:
        save_file(
            {n: s.detach().float().cpu().contiguous() for n, s in ema.shadow.items()},
            str(directory / "ema.safetensors"),
        )
        (directory / "ema.json").write_text(
            json.dumps({"decay": ema.decay, "num_updates": ema.num_updates, "warmup": ema.warmup})
        )
    if model.lora_modules:
        model.save_lora_adapter(directory / "lora")
    shutil.rmtree(directory / GENERATOR_VAE, ignore_errors=True)
    if model.cfg.autoencoder is not None:  # trained on the dataset: the version keeps it
        model.vae.vae.save_pretrained(directory / GENERATOR_VAE)
    (directory / "config.json").write_text(model.cfg.model_dump_json(indent=2))
    write_manifest(directory, {"part": "generator", "parameter_counts": model.parameter_counts()})


def load_generator(directory: Path, config: GeneratorConfig | None = None) -> tuple[Generator, EMA | None]:
    directory = Path(directory)
    verify_manifest(directory)
    config = config or GeneratorConfig.model_validate_json((directory / "config.json").read_text())
    model = build_generator(config, autoencoder_dir=directory / GENERATOR_VAE if config.autoencoder else None)
    trained = dict(model.named_trainable_parameters())
    path = directory / "trainable.safetensors"
    tensors = load_file(str(path))
    if set(tensors) != set(trained):
        raise ModelVersionError(
            f"{path} does not fit the generator config: missing {sorted(set(trained) - set(tensors))[:5]}, "
            f"unexpected {sorted(set(tensors) - set(trained))[:5]}"
        )
    with torch.no_grad():
        for name, p in trained.items():
            if p.shape != tensors[name].shape:
                raise ModelVersionError(
                    f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(tensors[name].to(p.dtype))
    ema = None
    if (directory / "ema.safetensors").is_file():
        meta = json.loads((directory / "ema.json").read_text())
        ema = EMA(model, meta["decay"])
        # Versions written before "warmup" was recorded used the default (True).
        ema.load_state_dict({"warmup": True, **meta, "shadow": load_file(str(directory / "ema.safetensors"))})
    return model, ema


# ---------------------------------------------------------------------------------------------
# The assembled model
# ---------------------------------------------------------------------------------------------


class VGMedGen(ModelMixin):
    """The three trained parts together: conditions from text or reference images, images, pseudo-masks.

    A diffusers ``ModelMixin`` (a ``torch.nn.Module``) so that diffusers' generic pipeline loader takes it as
    a pipeline component; its own ``save_pretrained``/``from_pretrained`` (content-hashed safetensors)
    replace diffusers' weight files.

    Args:
        config: the model config.
        visual: stage 1 (visual priors of reference images; pseudo-masks of generated ones).
        text: stage 2 (captions -> t_a, t_s).
        generator: stage 3.
        ema: the EMA of the generator's trained weights; sampling uses it when present.
    """

    def __init__(
        self,
        config: ModelConfig,
        visual: VisualDisentangler,
        text: TextDisentangler,
        generator: Generator,
        ema: EMA | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.visual = visual.eval()
        self.text = text.eval()
        self.generator = generator.eval()
        self.ema = ema

    # -- disk ---------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the model version directory (layout in the module docstring)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_visual(self.visual, directory / "visual")
        save_text(self.text, directory / "text")
        save_generator(self.generator, self.ema, directory / "generator")
        assemble_model_version(self.config, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", **kwargs: Any
    ) -> VGMedGen:
        """Load a model version directory (content hashes checked, nothing unpickled).

        ``kwargs`` are the loading options diffusers' ``DiffusionPipeline.from_pretrained`` passes each
        component; they are accepted at the values that change nothing here and refused otherwise
        (:func:`unsupported_load_kwargs`).
        """
        unsupported = unsupported_load_kwargs(kwargs)
        if unsupported:
            raise ConfigError(
                f"VGMedGen loads a local model version in float32 on one device; unsupported arguments: "
                f"{unsupported} (the generator's precision is generator.dtype in model_config.json)"
            )
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelVersionError(f"Model version directory {directory} does not exist")
        verify_manifest(directory)
        config = read_model_config(directory / "model_config.json")
        visual = load_visual(directory / "visual", config.visual)
        text = load_text(directory / "text", config.text)
        generator, ema = load_generator(directory / "generator", config.generator)
        model = cls(config, visual, text, generator, ema).to(device)
        if ema is not None:
            ema.to(device)
        return model

    # -- conditions -----------------------------------------------------------------------------

    @torch.no_grad()
    def conditions_from_captions(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """One caption per image, split by the stage-2 heads into ``t_a (N, A)``, ``t_s (N, S)``."""
        out = self.text(list(captions))
        return {
            "t_a": out.t_a,
            "t_s": out.t_s,
            "text_tokens": out.token_embeds,
            "text_mask": out.attention_mask,
        }

    @torch.no_grad()
    def conditions_from_prompts(
        self, anatomy: Sequence[str], style: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """An anatomy prompt and a style prompt per image (the swap that shows control)."""
        t_a, t_s = self.text.split_separate(list(anatomy), list(style))
        conditions: dict[str, torch.Tensor] = {"t_a": t_a, "t_s": t_s}
        if self.generator.hffm.uses_text:
            out = self.text([f"{a} {s}" for a, s in zip(anatomy, style)])
            conditions.update(text_tokens=out.token_embeds, text_mask=out.attention_mask)
        return conditions

    @torch.no_grad()
    def conditions_from_reference(
        self, images: torch.Tensor, style: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Anatomy from reference images (N, 3, H, W in [-1, 1]) via the visual priors; style from
        the images too, or from style prompts when given. The caption channel stays null.

        Raises:
            ValueError: the model is the caption-only baseline (``hffm.mode='caption'``), which has no
                stream for an image's anatomy to enter through.
        """
        if not self.generator.hffm.uses_streams:
            raise ValueError(
                "this model version is the caption-only baseline (hffm.mode='caption'): it has no anatomy stream "
                "for a reference image to condition; give it a caption or anatomy and style prompts"
            )
        prior_a, prior_s = self.visual.priors(images.to(self._device))
        if style is not None:
            _, prior_s = self.text.split_separate(list(style), list(style))
        return {"t_a": prior_a, "t_s": prior_s}

    @property
    def _device(self) -> torch.device:
        return next(self.generator.parameters()).device

    # -- sampling -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        conditions: Mapping[str, torch.Tensor],
        seeds: Sequence[int],
        sampler: SamplerConfig | None = None,
        use_ema: bool = True,
        guidance: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, H, W) in [0, 1] and their stage-1 pseudo-masks (N, 1, H, W) in [0, 1].

        Image i depends only on (conditions[i], seeds[i], its guidance) and the model. ``guidance``
        gives each row its own ``(g_a, g_s)`` in place of ``sampler``'s (see :func:`sample`).
        """
        cfg = sampler or self.config.sampler
        kwargs: dict[str, Any] = {k: conditions[k] for k in ("text_tokens", "text_mask") if k in conditions}
        if guidance is not None:
            kwargs["guidance"] = guidance
        if self.ema is not None and use_ema:
            with self.ema.swapped_in(self.generator):
                images = sample(
                    self.generator, conditions["t_a"], conditions["t_s"], list(seeds), cfg=cfg, **kwargs
                )
        else:
            images = sample(
                self.generator, conditions["t_a"], conditions["t_s"], list(seeds), cfg=cfg, **kwargs
            )
        masks = self.visual.segment(images * 2.0 - 1.0)  # (N, 1, H, W)
        return images, masks


# Fields model versions written before 2026-12 still carry: optimiser settings that never reached
# training (it reads train.<stage>). Dropped when such a version loads; a config file naming them is refused.
RETIRED_MODEL_FIELDS: dict[str, tuple[str, ...]] = {"visual": ("lr", "betas"), "text": ("lr", "batch_size")}


def read_model_config(path: Path) -> ModelConfig:
    """The :class:`ModelConfig` saved in a model version's ``model_config.json`` (retired fields of
    versions written before 2026-12 dropped, so every registered version keeps loading)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelVersionError(
            f"{path} is not a readable model config ({exc}); re-export the model version"
        ) from None
    for section, fields in RETIRED_MODEL_FIELDS.items():
        if isinstance(raw.get(section), dict):
            for name in fields:
                raw[section].pop(name, None)
    return ModelConfig.model_validate(raw)


def assemble_model_version(config: ModelConfig, directory: Path) -> dict[str, Any]:
    """Write ``model_config.json``, the diffusers pipeline index and the version's manifest over parts
    already in ``directory``."""
    directory = Path(directory)
    for part in ("visual", "text", "generator"):
        verify_manifest(directory / part)
    (directory / "model_config.json").write_text(config.model_dump_json(indent=2))
    write_pipeline_index(directory)
    return write_manifest(directory, {"kind": "vgmedgen-model-version", "preset": config.preset})


# ---------------------------------------------------------------------------------------------
# diffusers: a model version is a diffusers pipeline folder
# ---------------------------------------------------------------------------------------------
# diffusers 0.42 looks a pipeline's ``_class_name`` up among its own exports only
# (pipeline_loading_utils._get_pipeline_class: ``getattr(diffusers_module, class_name)``); a class
# from another package is found through ``_class_name: [<file>, <class>]`` and ``<file>.py`` beside
# model_index.json (_resolve_custom_pipeline_and_cls), which it runs only with ``trust_remote_code=True``
# (dynamic_modules_utils.get_cached_module_file). That file here is one import of the installed
# package. Components of other packages resolve from ``sys.modules`` (_get_library_or_raise: that
# import put them there), must subclass one of its loadable classes (hence ``ModelMixin``), and load
# from the folder itself when it has no sub-folder of the component's name (load_sub_model).

PIPELINE_INDEX = "model_index.json"
PIPELINE_MODULE = "vgmedgen_pipeline"
PIPELINE_CLASS = "VGMedGenPipeline"
_PIPELINE_MODULE_TEXT = f'''"""Where diffusers finds the pipeline class of this VG-MedGen model version.

``diffusers.DiffusionPipeline.from_pretrained(<this folder>, trust_remote_code=True)`` runs this file
because model_index.json names it. It holds no model code: the class, and the loading and checking of
the weights, come from the installed ``vgmedgen`` package.
"""

from vgmedgen.model.pipeline import {PIPELINE_CLASS}

__all__ = ["{PIPELINE_CLASS}"]
'''


def write_pipeline_index(directory: Path) -> None:
    """Write ``model_index.json`` and the module it names, so diffusers loads ``directory`` as a pipeline."""
    directory = Path(directory)
    (directory / f"{PIPELINE_MODULE}.py").write_text(_PIPELINE_MODULE_TEXT)
    index = {
        "_class_name": [PIPELINE_MODULE, PIPELINE_CLASS],
        "_diffusers_version": diffusers.__version__,
        "model": [VGMedGen.__module__, VGMedGen.__name__],
    }
    (directory / PIPELINE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# What diffusers' DiffusionPipeline.from_pretrained passes each component's from_pretrained, with the
# values that change nothing for a model version (safetensors weights, float32, one device).
_NEUTRAL_LOAD_KWARGS: dict[str, tuple[Any, ...]] = {
    "torch_dtype": (None, torch.float32),
    "dtype": (None, torch.float32),
    "device_map": (None,),
    "max_memory": (None,),
    "offload_folder": (None,),
    "offload_state_dict": (None, False),
    "variant": (None,),
    "use_safetensors": (None, True),
    "low_cpu_mem_usage": (True, False),
    "disable_mmap": (True, False),
    "use_flashpack": (False,),
    "quantization_config": (None,),
}


def unsupported_load_kwargs(kwargs: Mapping[str, Any]) -> list[str]:
    """The names of loading options that a model version cannot honour (sorted; empty when all are neutral)."""
    return sorted(
        k
        for k, v in kwargs.items()
        if k not in _NEUTRAL_LOAD_KWARGS or not any(v is n or v == n for n in _NEUTRAL_LOAD_KWARGS[k])
    )


def build_model(config: ModelConfig, text_encoder_dir: Path) -> VGMedGen:
    """A fresh, untrained model (the text encoder loads from ``text_encoder_dir``)."""
    if not Path(text_encoder_dir).is_dir():
        raise ConfigError(f"text encoder directory {text_encoder_dir} does not exist")
    return VGMedGen(
        config,
        VisualDisentangler(config.visual),
        TextDisentangler.from_config(config.text, text_encoder_dir),
        build_generator(config.generator),
    )
