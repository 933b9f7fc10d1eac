"""VG-MedGen as a diffusers pipeline: load, save and call it the way any diffusers pipeline is.

    pipe = VGMedGenPipeline.from_pretrained("path/to/model_version").to("cuda")
    out = pipe(anatomy_prompt="a small round lesion in the upper left",
               style_prompt="dark brown, dermoscopy", num_images_per_prompt=4, seed=0)
    out.images[0].save("0.png"); out.masks[0].save("0_mask.png")

A saved pipeline is a model version directory (the layout of :mod:`vgmedgen.model.vgmedgen`, content
hashes checked on load), as the train job writes it. It carries diffusers' ``model_index.json``, so
diffusers' own loader returns this pipeline too::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("path/to/model_version", trust_remote_code=True)

``trust_remote_code=True`` is diffusers' condition for any pipeline class outside diffusers: it lets it
run ``vgmedgen_pipeline.py`` of the folder, whose one line imports this class from the installed
``vgmedgen`` (see :func:`vgmedgen.model.vgmedgen.write_pipeline_index`). ``from_pretrained`` here
needs no such flag, and also reads versions written before the index existed and folders saved by
earlier releases of this class (``model_index.json`` + the version under ``model/``).

Three ways to condition (docs/method.md, section "Sampling and compositional guidance"):

- ``prompt``: one caption per image, split into anatomy and style by the stage-2 heads;
- ``anatomy_prompt`` + ``style_prompt``: the two factors given separately (the swap that shows
  control);
- ``reference_image`` (+ optional ``style_prompt``): the anatomy of a real image through the
  stage-1 visual priors, the style of the image or of the prompt.

Seeds: image ``k`` of a call gets seed ``seed + k`` (or the k-th of an explicit list), and an image
depends only on its condition, its seed and the model, so any image can be made again alone.
Images are ordered prompt-major: all ``num_images_per_prompt`` images of the first prompt, then
the second's.

Shape legend: N images, B prompts (or reference images), H/W image size.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from vgmedgen.model.configbase import ConfigError
from vgmedgen.model.sampler import SamplerConfig
from vgmedgen.model.vgmedgen import (
    PIPELINE_CLASS,
    PIPELINE_MODULE,
    ModelVersionError,
    VGMedGen,
    unsupported_load_kwargs,
)
from vgmedgen.model.visual import MASK_THRESHOLD

__all__ = ["PipelineInputError", "ReferenceImage", "VGMedGenPipeline", "VGMedGenPipelineOutput"]

OUTPUT_TYPES = ("pil", "np", "pt")
# Seeds drawn from a torch generator lie in [0, 2**31 - 1): they fit every RNG API and JSON.
_SEED_HIGH = 2**31 - 1

ReferenceImage = PIL.Image.Image | np.ndarray | torch.Tensor | Sequence[PIL.Image.Image]


class PipelineInputError(ConfigError):
    """An argument given to the pipeline is wrong; the message says which and how to fix it."""


@dataclass
class VGMedGenPipelineOutput(BaseOutput):
    """What :class:`VGMedGenPipeline` returns (like diffusers' ``ImagePipelineOutput``).

    Attributes:
        images: N RGB images: PIL images (``pil``), ``(N, H, W, 3)`` float32 in [0, 1] (``np``) or
            ``(N, 3, H, W)`` float32 in [0, 1] (``pt``).
        masks: the stage-1 pseudo-mask of each image: PIL ``L`` images binarised at 0.5 (0 or 255,
            ready to save as a segmentation label) for ``pil``; lesion probabilities in [0, 1],
            ``(N, H, W, 1)`` for ``np`` and ``(N, 1, H, W)`` for ``pt``.
        seeds: the seed of each image (pass one back with ``seed=`` to make that image again).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    masks: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    seeds: list[int]


def _as_prompts(value: str | Sequence[str] | None, name: str) -> list[str] | None:
    """A prompt argument as a list of non-empty strings (None stays None)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or isinstance(items, bytes):
        raise PipelineInputError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    items = list(items)
    if not items:
        raise PipelineInputError(f"{name} is an empty list; give at least one prompt")
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise PipelineInputError(f"{name}[{i}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise PipelineInputError(f"{name}[{i}] is empty; describe the image in words")
    return items


def _pair(
    first: list[str], second: list[str], first_name: str, second_name: str, raw_first: Any, raw_second: Any
) -> tuple[list[str], list[str]]:
    """Pair two prompt lists one to one; a single plain string is repeated to the other's length."""
    if len(first) == len(second):
        return first, second
    if isinstance(raw_first, str):
        return first * len(second), second
    if isinstance(raw_second, str):
        return first, second * len(first)
    raise PipelineInputError(
        f"{first_name} has {len(first)} prompts but {second_name} has {len(second)}; give lists of the "
        "same length (they pair one to one) or a single string for one of them"
    )


def _center_square(images: torch.Tensor) -> torch.Tensor:
    """The central square of side min(H, W) of ``(N, C, H, W)`` images (the records' center_crop)."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return images[..., top : top + side, left : left + side]  # (N, C, side, side)


def _pil_to_tensor(image: PIL.Image.Image, size: int) -> torch.Tensor:
    """A PIL image as ``(3, size, size)`` float32 in [0, 1]: central square, Lanczos (as prepare)."""
    rgb = image.convert("RGB")
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    resized = rgb.resize((size, size), PIL.Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))
    array = np.asarray(resized, dtype=np.float32) / 255.0  # (size, size, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, size, size)


def reference_to_tensor(reference: ReferenceImage, size: int) -> torch.Tensor:
    """Reference images as ``(B, 3, size, size)`` float32 in [-1, 1], the visual encoder's input.

    Accepts a PIL image or a list of them (any mode, any size: the central square is resized
    with Lanczos, as ``prepare`` resizes records), a NumPy array ``(H, W, 3)`` or
    ``(B, H, W, 3)`` (uint8, or floats in [0, 1]) or a tensor ``(3, H, W)`` or ``(B, 3, H, W)``
    with floats in [0, 1] (central square, resized with antialiased bilinear interpolation).

    Raises:
        PipelineInputError: a path instead of an image, a wrong shape, or values outside [0, 1].
    """
    if isinstance(reference, (str, os.PathLike)):
        raise PipelineInputError(
            f"reference_image must be an image, not a path ({reference!s}); open it first, e.g. with "
            "PIL.Image.open(path) or diffusers.utils.load_image(path)"
        )
    if isinstance(reference, PIL.Image.Image):
        reference = [reference]
    if isinstance(reference, (list, tuple)):
        if not reference:
            raise PipelineInputError("reference_image is an empty list; give at least one image")
        bad = [i for i, im in enumerate(reference) if not isinstance(im, PIL.Image.Image)]
        if bad:
            raise PipelineInputError(
                f"reference_image[{bad[0]}] is a {type(reference[bad[0]]).__name__}; a list must hold PIL images"
            )
        return torch.stack([_pil_to_tensor(im, size) for im in reference]) * 2.0 - 1.0  # (B, 3, S, S)
    if isinstance(reference, np.ndarray):
        array = reference
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] != 3:
            raise PipelineInputError(
                f"a NumPy reference_image must be (H, W, 3) or (B, H, W, 3) RGB, got shape {reference.shape}"
            )
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(0, 3, 1, 2)
    elif isinstance(reference, torch.Tensor):
        tensor = reference.detach().float().cpu()
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise PipelineInputError(
                f"a tensor reference_image must be (3, H, W) or (B, 3, H, W) RGB, got shape {tuple(reference.shape)}"
            )
    else:
        raise PipelineInputError(
            f"reference_image must be a PIL image, a list of PIL images, a NumPy array or a tensor, "
            f"got {type(reference).__name__}"
        )
    if tensor.numel() == 0:
        raise PipelineInputError(f"reference_image is empty (shape {tuple(tensor.shape)})")
    lo, hi = float(tensor.min()), float(tensor.max())
    if lo < 0.0 or hi > 1.0 or not np.isfinite([lo, hi]).all():
        raise PipelineInputError(
            f"reference_image values must lie in [0, 1] (floats) or be uint8 (arrays), got the range [{lo:g}, {hi:g}]"
        )
    square = _center_square(tensor)  # (B, 3, s, s)
    if square.shape[-1] != size:
        square = F.interpolate(
            square, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return square.clamp(0.0, 1.0) * 2.0 - 1.0  # (B, 3, S, S)


class VGMedGenPipeline(DiffusionPipeline):
    """Text- and reference-conditioned generation of images and pseudo-masks with VG-MedGen.

    Args:
        model: the assembled model (:class:`~vgmedgen.model.vgmedgen.VGMedGen`); its sampler config
            gives the defaults of ``num_inference_steps`` and the guidance scales.
    """

    model: VGMedGen
    model_cpu_offload_seq = None

    def __init__(self, model: VGMedGen) -> None:
        super().__init__()
        if not isinstance(model, VGMedGen):
            raise PipelineInputError(f"model must be a VGMedGen, got {type(model).__name__}")
        self.register_modules(model=model)

    # -- disk ------------------------------------------------------------------------------------

    def save_pretrained(
        self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs: Any
    ) -> None:
        """Write the model version (``VGMedGen.save_pretrained``), ``model_index.json`` included.

        The weights are always safetensors with content hashes; pushing to a hub or weight variants
        are not supported.
        """
        unsupported = {k: v for k, v in kwargs.items() if v not in (None, False)}
        if not safe_serialization or unsupported:
            raise PipelineInputError(
                f"VGMedGenPipeline.save_pretrained writes safetensors to a local directory only; "
                f"unsupported arguments: {sorted(unsupported) or ['safe_serialization=False']}"
            )
        directory = Path(save_directory)
        if directory.is_file():
            raise PipelineInputError(f"{directory} is a file; save_pretrained needs a directory")
        self.model.save_pretrained(directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> VGMedGenPipeline:
        """Load a model version directory (what the train job and :meth:`save_pretrained` write).

        Args:
            pretrained_model_name_or_path: a local model version directory, or a folder saved by an
                earlier release of this class (``model_index.json`` + the version under ``model/``).
            device: where to put the model.

        Raises:
            ModelVersionError: the directory does not exist, is not a VG-MedGen pipeline or model
                version, or a file is missing, altered or does not fit the config.
            PipelineInputError: an argument this pipeline does not support.
        """
        unsupported = unsupported_load_kwargs(kwargs)
        if unsupported:
            raise PipelineInputError(
                f"VGMedGenPipeline.from_pretrained loads local directories only and takes `device`; unsupported "
                f"arguments: {unsupported} (the generator's precision is generator.dtype in model_config.json)"
            )
        directory = Path(pretrained_model_name_or_path).expanduser()
        if not directory.is_dir():
            raise ModelVersionError(
                f"{directory} does not exist or is not a directory; VGMedGenPipeline loads a local pipeline "
                "folder (model_index.json + model/) or a model version directory written by the train job"
            )
        if (directory / cls.config_name).is_file():
            try:
                index = cls.load_config(directory)
            except (OSError, ValueError) as exc:
                raise ModelVersionError(f"{directory / cls.config_name} cannot be read: {exc}") from None
            # Written by the model version: [module, class]; by earlier releases of save_pretrained: the class.
            if index.get("_class_name") not in ([PIPELINE_MODULE, PIPELINE_CLASS], PIPELINE_CLASS):
                raise ModelVersionError(
                    f"{directory} holds a {index.get('_class_name')!r} pipeline, not a {cls.__name__}; load it with "
                    "that class, or point at a VG-MedGen pipeline or model version directory"
                )
        legacy = directory / "model"  # the version under model/, as earlier releases saved it
        model = VGMedGen.from_pretrained(
            legacy if (legacy / "manifest.json").is_file() else directory, device=device
        )
        pipe = cls(model)
        pipe.register_to_config(_name_or_path=str(directory))
        return pipe

    # -- device --------------------------------------------------------------------------------
    # diffusers' own `to`/`device`/`dtype` read `module.device`/`module.dtype`, which only diffusers
    # and transformers models have, and would leave the EMA shadows (not a module) behind.

    @property
    def device(self) -> torch.device:
        """The device the generator computes on."""
        return next(self.model.generator.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The generator's compute dtype (``generator.dtype`` of the model config)."""
        return self.model.generator.compute_dtype

    def to(self, *args: Any, **kwargs: Any) -> VGMedGenPipeline:
        """Move the model (and its EMA) to a device: ``pipe.to("cuda")`` or ``pipe.to(device=...)``.

        A dtype other than the model's own is refused: precision is fixed by ``generator.dtype``
        in the model config (bf16 frozen weights on CUDA, fp32 trained weights).
        """
        kwargs.pop("silence_dtype_warnings", None)
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        if kwargs:
            raise PipelineInputError(f"VGMedGenPipeline.to got unexpected arguments {sorted(kwargs)}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif arg is not None:
                device = arg
        if dtype is not None and dtype not in (torch.float32, self.dtype):
            raise PipelineInputError(
                f"VGMedGenPipeline cannot be cast to {dtype}; set generator.dtype in the model config instead "
                "(float32, or bfloat16 on CUDA)"
            )
        if device is not None:
            device = torch.device(device)
            self.model.to(device)
            if self.model.ema is not None:
                self.model.ema.to(device)
        return self

    # -- conditions ----------------------------------------------------------------------------

    @staticmethod
    def check_inputs(
        prompt: str | Sequence[str] | None = None,
        anatomy_prompt: str | Sequence[str] | None = None,
        style_prompt: str | Sequence[str] | None = None,
        reference_image: ReferenceImage | None = None,
    ) -> tuple[list[str] | None, list[str] | None, list[str] | None]:
        """Check which conditions are given, before anything is computed (callable without a model).

        Returns:
            ``(captions, anatomy, style)`` as lists (None where not given), with anatomy and style
            paired one to one. Reference images are checked in full when converted.

        Raises:
            PipelineInputError: no condition, conflicting conditions, mismatched or empty prompts.
        """
        captions = _as_prompts(prompt, "prompt")
        anatomy = _as_prompts(anatomy_prompt, "anatomy_prompt")
        style = _as_prompts(style_prompt, "style_prompt")
        how = (
            "give `prompt` (one caption per image), or `anatomy_prompt` and `style_prompt`, or "
            "`reference_image` (anatomy from the image; style from the image or from `style_prompt`)"
        )
        if captions is not None:
            if anatomy is not None or style is not None or reference_image is not None:
                raise PipelineInputError(
                    "`prompt` (a whole caption) cannot be combined with `anatomy_prompt`, `style_prompt` or "
                    f"`reference_image`; {how}"
                )
            return captions, None, None
        if reference_image is not None:
            if anatomy is not None:
                raise PipelineInputError(
                    "`anatomy_prompt` cannot be combined with `reference_image`: the anatomy comes from the image; "
                    "drop one of them"
                )
            return None, None, style
        if anatomy is None and style is None:
            raise PipelineInputError(f"no prompt given; {how}")
        if anatomy is None or style is None:
            given, missing = (
                ("anatomy_prompt", "style_prompt") if style is None else ("style_prompt", "anatomy_prompt")
            )
            raise PipelineInputError(
                f"`{given}` needs `{missing}` too (or a `reference_image` for the anatomy); {how}"
            )
        anatomy, style = _pair(anatomy, style, "anatomy_prompt", "style_prompt", anatomy_prompt, style_prompt)
        return None, anatomy, style

    def _conditions(
        self,
        prompt: str | Sequence[str] | None,
        anatomy_prompt: str | Sequence[str] | None,
        style_prompt: str | Sequence[str] | None,
        reference_image: ReferenceImage | None,
    ) -> dict[str, torch.Tensor]:
        """Conditions for B prompts or reference images (``t_a (B, A)``, ``t_s (B, S)``, ...)."""
        captions, anatomy, style = self.check_inputs(prompt, anatomy_prompt, style_prompt, reference_image)
        if captions is not None:
            return self.model.conditions_from_captions(captions)
        if reference_image is not None:
            images = reference_to_tensor(reference_image, self.model.generator.image_size)  # (B, 3, S, S)
            n_ref = images.shape[0]
            if style is not None and len(style) != n_ref:
                if not isinstance(style_prompt, str):
                    raise PipelineInputError(
                        f"reference_image has {n_ref} images but style_prompt has {len(style)} prompts; give "
                        "one style prompt per image, or a single string for all"
                    )
                style = style * n_ref
            return self.model.conditions_from_reference(images, style=style)
        # check_inputs returned both lists, paired.
        return self.model.conditions_from_prompts(anatomy or [], style or [])

    @staticmethod
    def _seeds(
        n: int,
        seed: int | Sequence[int] | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
    ) -> list[int]:
        """One integer seed per image (see the module docstring)."""
        if seed is not None and generator is not None:
            raise PipelineInputError("give `seed` or `generator`, not both")
        if seed is not None:
            if isinstance(seed, (bool, float)) or not isinstance(seed, (int, np.integer, Sequence)):
                raise PipelineInputError(f"seed must be an int or a list of ints, got {seed!r}")
            if isinstance(seed, (int, np.integer)):
                seeds = [int(seed) + k for k in range(n)]
            else:
                seeds = list(seed)
                if len(seeds) != n or not all(
                    isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seeds
                ):
                    raise PipelineInputError(f"seed as a list needs {n} ints (one per image), got {seed!r}")
                seeds = [int(s) for s in seeds]
            if any(s < 0 or s >= 2**63 for s in seeds):
                raise PipelineInputError(f"seeds must lie in [0, 2**63), got {seeds}")
            return seeds
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise PipelineInputError(
                    f"got {len(generator)} generators for {n} images; give one per image"
                )
            return [int(torch.randint(0, _SEED_HIGH, (1,), generator=g)) for g in generator]
        if generator is not None and not isinstance(generator, torch.Generator):
            raise PipelineInputError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return [int(s) for s in torch.randint(0, _SEED_HIGH, (n,), generator=generator)]

    # -- call ------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        anatomy_prompt: str | Sequence[str] | None = None,
        style_prompt: str | Sequence[str] | None = None,
        prompt: str | Sequence[str] | None = None,
        reference_image: ReferenceImage | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
        guidance_anatomy: float | None = None,
        guidance_style: float | None = None,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        output_type: Literal["pil", "np", "pt"] = "pil",
        return_dict: bool = True,
        batch_size: int | None = None,
        use_ema: bool = True,
    ) -> VGMedGenPipelineOutput | tuple[Any, Any]:
        """Generate images and their pseudo-masks.

        Args:
            anatomy_prompt: what the lesion looks like (shape, size, position, border, count); one
                string or one per image group. Needs ``style_prompt``.
            style_prompt: how the image looks (colour, illumination, device); with
                ``reference_image`` it replaces the image's own style.
            prompt: one whole caption (or a list), split into anatomy and style by the model.
            reference_image: real image(s) whose anatomy to reuse (PIL, NumPy or tensor in [0, 1]).
            num_images_per_prompt: images per prompt (or per reference image), each with its own seed.
            num_inference_steps: DPM-Solver++ steps (default: the model's sampler config, 20).
            guidance_anatomy: anatomy guidance g_a (default: the model's sampler config, 4.5).
            guidance_style: style guidance g_s (default: the model's sampler config, 4.5).
            seed: an int (image k gets ``seed + k``) or one int per image.
            generator: a ``torch.Generator`` (or one per image) to draw the seeds from, when no seed.
            output_type: ``pil``, ``np`` or ``pt`` (see :class:`VGMedGenPipelineOutput`).
            return_dict: return the output dataclass; False returns ``(images, masks)``.
            batch_size: images per sampler batch (default: all at once); lower it to save memory.
            use_ema: sample from the EMA weights when the model has them.

        Returns:
            :class:`VGMedGenPipelineOutput`, or ``(images, masks)`` when ``return_dict`` is False.

        Raises:
            PipelineInputError: no prompt, conflicting or mismatched prompts, bad values.
        """
        if output_type not in OUTPUT_TYPES:
            raise PipelineInputError(
                f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}"
            )
        for name, value in (("num_images_per_prompt", num_images_per_prompt), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise PipelineInputError(f"{name} must be a positive integer, got {value!r}")
        sampler = self._sampler_config(num_inference_steps, guidance_anatomy, guidance_style)
        conditions = self._conditions(prompt, anatomy_prompt, style_prompt, reference_image)  # (B, ...)
        repeat = num_images_per_prompt
        conditions = {k: v.repeat_interleave(repeat, dim=0) for k, v in conditions.items()}  # (N, ...)
        n = conditions["t_a"].shape[0]
        seeds = self._seeds(n, seed, generator)
        chunk = batch_size or n
        images, masks = [], []
        with self.progress_bar(total=n) as bar:
            for start in range(0, n, chunk):
                part = {k: v[start : start + chunk] for k, v in conditions.items()}
                img, mask = self.model.generate(part, seeds[start : start + chunk], sampler, use_ema=use_ema)
                images.append(img)  # (n_i, 3, H, W)
                masks.append(mask)  # (n_i, 1, H, W)
                bar.update(img.shape[0])
        image_t, mask_t = torch.cat(images), torch.cat(masks)  # (N, 3, H, W), (N, 1, H, W)
        out_images, out_masks = self._postprocess(image_t, mask_t, output_type)
        if not return_dict:
            return out_images, out_masks
        return VGMedGenPipelineOutput(images=out_images, masks=out_masks, seeds=seeds)

    def _sampler_config(
        self, steps: int | None, guidance_anatomy: float | None, guidance_style: float | None
    ) -> SamplerConfig:
        """The model's sampler config with this call's overrides, validated."""
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise PipelineInputError(f"num_inference_steps must be a positive integer, got {steps!r}")
        update: dict[str, Any] = {}
        if steps is not None:
            update["num_steps"] = steps
        for key, value in (("guidance_anatomy", guidance_anatomy), ("guidance_style", guidance_style)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise PipelineInputError(f"{key} must be a finite number, got {value!r}")
            update[key] = float(value)
        base: Mapping[str, Any] = self.model.config.sampler.model_dump()
        return SamplerConfig.model_validate({**base, **update})

    @staticmethod
    def _postprocess(images: torch.Tensor, masks: torch.Tensor, output_type: str) -> tuple[Any, Any]:
        """``(N, 3, H, W)`` images and ``(N, 1, H, W)`` mask probabilities in the requested type."""
        if output_type == "pt":
            return images, masks
        images_np = images.float().cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
        masks_np = masks.float().cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, 1)
        if output_type == "np":
            return images_np, masks_np
        rgb = (images_np * 255.0).round().clip(0, 255).astype(np.uint8)  # (N, H, W, 3)
        binary = np.where(masks_np[..., 0] > MASK_THRESHOLD, 255, 0).astype(np.uint8)  # (N, H, W)
        # uint8 (H, W, 3) arrays become RGB images and (H, W) arrays L images.
        return [PIL.Image.fromarray(x) for x in rgb], [PIL.Image.fromarray(m) for m in binary]
