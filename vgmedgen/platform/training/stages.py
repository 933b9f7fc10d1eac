"""The stage tasks the shared loop trains: ``visual``, ``align``, ``autoencoder`` (only for a generator that
diffuses the latents of an autoencoder trained on the dataset) and ``dit``.

Each task owns its modules and its loss; the loop (``loop.py``) owns everything else. Frozen
inputs (the trained visual encoder for ``align``; visual and text for ``dit``) are loaded from the
earlier stages' exports and compute conditions per batch under ``no_grad``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from vgmedgen.model.ema import EMA
from vgmedgen.model.parts import load_text, load_visual, save_text, save_visual
from vgmedgen.model.text import TextDisentangler
from vgmedgen.model.visual import VisualDisentangler
from vgmedgen.platform.config import ExperimentConfig
from vgmedgen.platform.storage import atomic_directory
from vgmedgen.platform.training.data import RecordArrays
from vgmedgen.platform.training.loop import global_sum

if TYPE_CHECKING:
    from vgmedgen.model.generator import Generator

# The generator, VGMedGen and the samplers are imported by the dit task alone: the visual and align stages'
# workers then import no diffusers (seconds of start-up per worker and stage).

__all__ = ["build_task", "AlignTask", "AutoencoderTask", "DitTask", "VisualTask"]

log = logging.getLogger(__name__)

VAL_LIMIT = 256  # validation rows held per worker
CONDITION_CACHE_MB = 1024  # the dit stage's cached conditions per worker, at most (train.cache_conditions)


class _LossModule(nn.Module):
    """Routes a task's loss through ``forward`` so DDP sees the call and syncs gradients."""

    def __init__(self, model: nn.Module, fn: Callable[..., dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self._fn(self.model, *args, **kwargs)


class _Base:
    name = "base"

    def __init__(self, cfg: ExperimentConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self._train_data: RecordArrays | None = None
        self.val_data = RecordArrays.load_validation(cfg.records_dir, limit=VAL_LIMIT)
        self.module: nn.Module  # what trains
        self.loss_module: nn.Module

    @property
    def train_data(self) -> RecordArrays:
        """The decoded train split, loaded on first use (never with ``train.ingest=ray_data``)."""
        if self._train_data is None:
            self._train_data = RecordArrays.load(self.cfg.records_dir, "train")
        return self._train_data

    def _first_train_batches(self, rows: int | None = None, size: int = 256):
        """The first ``rows`` train rows (all when None) as batches of ``size``, in order: the same rows on every
        worker."""
        data = self._train_data or RecordArrays.load(self.cfg.records_dir, "train", limit=rows)
        n = len(data) if rows is None else min(rows, len(data))
        for start in range(0, n, size):
            yield data.batch(np.arange(start, min(start + size, n)), self.device)

    @torch.no_grad()
    def _prior_sample(self, visual: nn.Module, rows: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
        """The visual priors ``(M, A), (M, S)`` of the first ``rows`` training images: the same rows on every
        worker, so DDP replicas start equal (a resumed run then loads its checkpoint over what they set)."""
        pa, ps = [], []
        for b in self._first_train_batches(rows):
            a, s = visual.priors(b["image"])
            pa.append(a)
            ps.append(s)
        return torch.cat(pa), torch.cat(ps)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    # Whether DDP must search each step's graph for parameters that took no part (train.find_unused_parameters=auto).
    find_unused_parameters = True

    def wrap_for_ddp(self, prepare: Any) -> None:
        setting = self.cfg.train.find_unused_parameters
        find_unused = self.find_unused_parameters if setting == "auto" else setting
        self.loss_module = prepare(
            self.loss_module, parallel_strategy_kwargs={"find_unused_parameters": find_unused}
        )

    def train_size(self) -> int:
        return len(self.train_data)

    def train_batch(self, idx: np.ndarray, device: torch.device) -> dict:
        return self.train_data.batch(idx, device)

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])

    def artifacts(self, step: int, directory: Path) -> list[Path]:
        return []

    def _val_batches(self, n_batches: int, size: int):
        for k in range(n_batches):
            idx = np.arange(k * size, min((k + 1) * size, len(self.val_data)))
            if len(idx) == 0:
                return
            yield self.val_data.batch(idx, self.device)


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class VisualTask(_Base):
    """Stage 1: anatomy U-Net + segmentor (Dice) + style VAE (KL) + AdaIN decoder."""

    name = "visual"

    def __init__(self, cfg: ExperimentConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.module = _seeded(cfg.seed, lambda: VisualDisentangler(cfg.model.visual)).to(device).train()
        self.loss_module = _LossModule(
            self.module, lambda m, b, g: m.losses(b["image"], b["mask"], g, has_mask=b["has_mask"])
        )

    def loss(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        terms = self.loss_module(batch, generator)
        return {**terms, "total": terms["total"].mean()}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.module.eval()
        dice, n = 0.0, 0
        for b in self._val_batches(self.cfg.train.visual.val_batches, 64):
            pred = (self.module.segment(b["image"]) > 0.5).float()  # (N, 1, H, W)
            inter = (pred * b["mask"]).sum((1, 2, 3))
            denom = pred.sum((1, 2, 3)) + b["mask"].sum((1, 2, 3))
            d = torch.where(denom > 0, 2 * inter / denom.clamp_min(1e-6), torch.ones_like(denom))
            dice += float((d * b["has_mask"]).sum())
            n += int(b["has_mask"].sum())
        self.module.train()
        return {"dice": dice / max(n, 1)}

    def export(self, directory: Path) -> None:
        with atomic_directory(directory) as d:
            save_visual(self.module, d)


class AlignTask(_Base):
    """Stage 2: text heads aligned to the frozen visual priors."""

    name = "align"

    def __init__(self, cfg: ExperimentConfig, inputs: dict[str, Path], device: torch.device) -> None:
        super().__init__(cfg, device)
        self.visual = load_visual(inputs["visual"], cfg.model.visual).to(device).eval().requires_grad_(False)
        encoder_dir = cfg.model.text.encoder_dir or inputs["text_encoder"]
        self.module = _seeded(
            cfg.seed + 1, lambda: TextDisentangler.from_config(cfg.model.text, encoder_dir)
        ).to(device)
        self.module.train()
        if cfg.model.text.standardize_priors:
            self.module.heads.init_standardization(*self._prior_sample(self.visual))
        self.loss_module = _LossModule(
            self.module,
            lambda m, b, pa, ps: m.step_losses(b["caption"], b["anatomy_text"], b["style_text"], pa, ps),
        )

    def loss(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        prior_a, prior_s = self.visual.priors(batch["image"])
        terms = self.loss_module(batch, prior_a, prior_s)
        return {**terms, "total": terms["total"].mean()}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.module.eval()
        cos_a, cos_s, n = 0.0, 0.0, 0
        for b in self._val_batches(self.cfg.train.align.val_batches, 64):
            prior_a, prior_s = self.visual.priors(b["image"])
            t_a, t_s = self.module.split(b["caption"])
            cos_a += float(nn.functional.cosine_similarity(t_a, prior_a, dim=1).sum())
            cos_s += float(nn.functional.cosine_similarity(t_s, prior_s, dim=1).sum())
            n += len(b["caption"])
        self.module.train()
        cos_a, cos_s = cos_a / max(n, 1), cos_s / max(n, 1)
        return {"cos_anatomy": cos_a, "cos_style": cos_s, "cos": (cos_a + cos_s) / 2}

    def state_dict(self) -> dict[str, Any]:
        return {"model": {k: v for k, v in self.module.state_dict().items() if not self._frozen_key(k)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing, unexpected = self.module.load_state_dict(state["model"], strict=False)
        if unexpected or any(not self._frozen_key(k) for k in missing):
            raise RuntimeError(
                f"align checkpoint does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

    def _frozen_key(self, key: str) -> bool:
        return key.startswith("encoder.") and self.cfg.model.text.frozen

    def export(self, directory: Path) -> None:
        with atomic_directory(directory) as d:
            save_text(self.module, d)


class DitTask(_Base):
    """Stage 3: HFFM + PixArt DiT (LoRA or full), EMA, conditions from the frozen stages 1 and 2."""

    name = "dit"
    # Every trainable parameter takes part in every step, in every HFFM mode and dropout draw (tests/test_generator.py).
    find_unused_parameters = False

    def __init__(
        self, cfg: ExperimentConfig, inputs: dict[str, Path], device: torch.device, world: int = 1
    ) -> None:
        from vgmedgen.model.generator import build_generator

        super().__init__(cfg, device)
        self.world = world
        self.visual = load_visual(inputs["visual"], cfg.model.visual).to(device).eval().requires_grad_(False)
        self.text = load_text(inputs["text"], cfg.model.text).to(device).eval().requires_grad_(False)
        self.module: Generator = _seeded(
            cfg.seed + 2,
            lambda: build_generator(cfg.model.generator, autoencoder_dir=inputs.get("autoencoder")),
        ).to(device)
        self.module.train()
        if cfg.model.generator.hffm.standardize:
            self._init_standardization()
        self.ema = EMA(self.module, cfg.model.generator.ema_decay).to(device)
        self.step = 0
        self.objective: Any = None  # a sweep's TrialObjective, measured with every validation
        self.loss_module = _LossModule(self.module, self._terms)
        self._cache: dict[str, torch.Tensor] | None = None  # the train split's conditions (cache_conditions)
        self._cache_wanted = cfg.train.cache_conditions

    @torch.no_grad()
    def _init_standardization(self) -> None:
        """ActNorm of the stream vectors from the visual priors of the first training images."""
        prior_a, prior_s = self._prior_sample(self.visual)
        self.module.hffm.anatomy.init_standardization(prior_a)
        self.module.hffm.style.init_standardization(prior_s)

    def train_batch(self, idx: np.ndarray, device: torch.device) -> dict:
        """The rows ``idx``, with their conditions from the cache when ``train.cache_conditions`` holds."""
        batch = self.train_data.batch(idx, device)
        cache = self._condition_cache()
        if cache is not None:
            t = torch.as_tensor(idx, dtype=torch.long)
            mask = cache["text_mask"][t]  # (n, L_max)
            length = max(int(mask.sum(1).max()), 1)  # the batch's longest caption, as the tokenizer pads it
            batch["conditions"] = {
                k: (v[t, :length] if k in ("text_tokens", "text_mask") else v[t]).to(device)
                for k, v in cache.items()
            }
        return batch

    def _condition_cache(self) -> dict[str, torch.Tensor] | None:
        """The conditions of every train row, computed once (None: switched off or too large to hold).

        The visual and text parts (and the autoencoder, whose posterior moments are kept: the loss draws the
        latents from them) are frozen and the train images are not augmented, so a row's conditions never
        change; computing them here instead of in every step leaves each value as the step computed it (up to
        the order of floating-point sums in a larger batch)."""
        if self._cache is not None or not self._cache_wanted:
            return self._cache
        data, text_cfg = self.train_data, self.cfg.model.text
        g = self.cfg.model.generator
        latent = 2 * g.backbone.in_channels * g.backbone.sample_size**2 if self.module.vae is not None else 0
        per_row = (
            2 * (text_cfg.anatomy_dim + text_cfg.style_dim)
            + text_cfg.max_length * (text_cfg.encoder_hidden + 1)
            + latent
        )
        if len(data) * per_row * 4 > CONDITION_CACHE_MB * 2**20:
            self._cache_wanted = False
            log.info(
                "[dit] the conditions of %d train rows would take over %d MB: computed in every step instead",
                len(data),
                CONDITION_CACHE_MB,
            )
            return None
        chunks = [{k: v.cpu() for k, v in self._conditions(b).items()} for b in self._first_train_batches()]
        longest = max(c["text_tokens"].shape[1] for c in chunks)

        def padded(v: torch.Tensor) -> torch.Tensor:  # (n, L, ...) -> (n, longest, ...), zeros past the text
            pad = [0, 0] * (v.ndim - 2) + [0, longest - v.shape[1]]
            return torch.nn.functional.pad(v, pad)

        self._cache = {
            k: torch.cat([padded(c[k]) if k in ("text_tokens", "text_mask") else c[k] for c in chunks])
            for k in chunks[0]
        }
        return self._cache

    def _conditions(self, batch: dict) -> dict[str, torch.Tensor]:
        if "conditions" in batch:
            return batch["conditions"]
        latent: dict[str, torch.Tensor] = {}
        if (
            self.module.vae is not None
        ):  # the posterior of the frozen autoencoder: latents are drawn in the loss
            latent["latent_mean"], latent["latent_std"] = self.module.vae.moments(batch["image"])
        with torch.no_grad():
            prior_a, prior_s = self.visual.priors(batch["image"])
            out = self.text(batch["caption"])
        return {
            "prior_a": prior_a,
            "prior_s": prior_s,
            "t_a": out.t_a,
            "t_s": out.t_s,
            "text_tokens": out.token_embeds,
            "text_mask": out.attention_mask,
            **latent,
        }

    @staticmethod
    def _terms(model: Generator, images, c, generator, step) -> dict[str, torch.Tensor]:
        return model.training_loss(
            images,
            c["t_a"],
            c["t_s"],
            c["prior_a"],
            c["prior_s"],
            text_tokens=c["text_tokens"],
            text_mask=c["text_mask"],
            generator=generator,
            step=step,
            latent_moments=(c["latent_mean"], c["latent_std"]) if "latent_mean" in c else None,
        )

    def loss(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        terms = self.loss_module(batch["image"], self._conditions(batch), generator, self.step)
        mask = terms["colour_mask"]
        active = global_sum(mask.sum().float(), self.world)  # the colour mean is over the global batch
        total = self.module.reduce_loss(terms, active_total=active, world=self.world)
        # "colour" is always present (empty when no sample is active) so that every rank logs the same keys.
        return {"eps": terms["eps"], "total": total, "colour": terms["colour"][mask.bool()].detach()}

    def after_step(self, step: int) -> None:
        self.step = step + 1
        self.ema.update(self.module)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.cfg.seed + 12345)  # the same noise every validation: comparable numbers
        total, n = 0.0, 0
        with self.ema.swapped_in(self.module):
            self.module.eval()
            for b in self._val_batches(self.cfg.train.dit.val_batches, 64):
                terms = self._terms(self.module, b["image"], self._conditions(b), g, 1)
                total += float(terms["eps"].sum())
                n += len(b["caption"])
            self.module.train()
        out = {"loss": total / max(n, 1)}
        if self.objective is not None:
            out.update(self._objective(out["loss"]))
        return out

    def _objective(self, loss: float) -> dict[str, float]:
        """A sweep's objective (``objective``) and its companions, measured on the EMA model."""
        if not self.objective.samples:
            return {"objective": loss}
        from vgmedgen.model.vgmedgen import VGMedGen

        was_training = self.module.training  # VGMedGen puts its parts in eval mode
        try:
            values = self.objective(VGMedGen(self.cfg.model, self.visual, self.text, self.module, self.ema))
        finally:
            self.module.train(was_training)
        return {**values, "objective": values[self.objective.spec.metric]}

    def state_dict(self) -> dict[str, Any]:
        trained = {n for n, _ in self.module.named_trainable_parameters()}
        return {
            "model": {k: v for k, v in self.module.state_dict().items() if k in trained},
            "ema": self.ema.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing, unexpected = self.module.load_state_dict(state["model"], strict=False)
        trained = {n for n, _ in self.module.named_trainable_parameters()}
        if unexpected or trained & set(missing):
            raise RuntimeError(f"dit checkpoint does not fit: missing {sorted(trained & set(missing))[:5]}")
        self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])

    def export(self, directory: Path) -> None:
        from vgmedgen.model.vgmedgen import save_generator

        with atomic_directory(directory) as d:
            save_generator(self.module, self.ema, d)

    def artifacts(self, step: int, directory: Path) -> list[Path]:
        """The swap grid of up to 4 validation anatomy x style prompts (EMA weights, seed 0 in every
        cell) and the same images as a plain sample grid."""
        from vgmedgen.model.vgmedgen import VGMedGen
        from vgmedgen.platform.generation.grid import SwapGrid
        from vgmedgen.platform.generation.sample import generate_samples

        k = min(4, len(self.val_data))
        anatomy = [t for t in self.val_data.anatomy_texts[:k] if t.strip()]
        style = [t for t in self.val_data.style_texts[:k] if t.strip()]
        if not anatomy or not style:
            return []
        grid = SwapGrid(anatomy_prompts=tuple(anatomy), style_prompts=tuple(style))
        was_training = self.module.training  # VGMedGen puts its parts in eval mode
        try:
            model = VGMedGen(self.cfg.model, self.visual, self.text, self.module, self.ema)
            samples = generate_samples(model, grid.requests())
        finally:
            self.module.train(was_training)
        provenance = grid.provenance(stage=self.name, step=step)
        return [
            grid.save(samples.images, directory / f"swap_grid_step{step:06d}.png", provenance),
            grid.save_all(samples.images, directory / f"samples_step{step:06d}.png", provenance),
        ]


class AutoencoderTask(_Base):
    """The autoencoder whose latents the generator diffuses (``model.generator.autoencoder``): an
    ``AutoencoderKL`` fitted to the train images with L1 reconstruction plus a small KL term.

    The export is a diffusers ``AutoencoderKL`` directory whose ``scaling_factor`` is 1 / std of the train
    latents, measured at export (as Stable Diffusion's 0.18215 was), so the diffused latents have unit scale."""

    name = "autoencoder"
    find_unused_parameters = False  # encoder, both 1x1 convolutions and decoder take part in every step

    def __init__(self, cfg: ExperimentConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        spec = cfg.model.generator.autoencoder
        if spec is None:
            raise ValueError("the autoencoder stage needs model.generator.autoencoder")
        self.spec = spec
        self.module = _seeded(cfg.seed + 3, spec.build).to(device).train()
        self.loss_module = _LossModule(self.module, self._terms)

    def _terms(
        self, model: nn.Module, images: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        posterior = model.encode(images).latent_dist
        z = posterior.sample(generator=generator)  # (N, c, h, w)
        recon = model.decode(z).sample  # (N, 3, H, W)
        l1 = (recon - images).abs().mean((1, 2, 3))  # (N,)
        kl = posterior.kl()  # (N,)
        return {"l1": l1, "kl": kl, "total": l1 + self.spec.kl_weight * kl}

    def loss(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        terms = self.loss_module(batch["image"], generator)
        return {**terms, "total": terms["total"].mean()}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Images through the posterior mean and the decoder, clamped to [-1, 1]."""
        z = self.module.encode(images).latent_dist.mode()
        return self.module.decode(z).sample.clamp(-1, 1)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.module.eval()
        psnr, l1, n = 0.0, 0.0, 0
        for b in self._val_batches(self.cfg.train.autoencoder.val_batches, 64):
            recon = self.reconstruct(b["image"])
            mse = (recon - b["image"]).square().mean((1, 2, 3)) / 4  # images span 2: MSE on the [0, 1] scale
            psnr += float((10 * torch.log10(1 / mse.clamp_min(1e-10))).sum())
            l1 += float((recon - b["image"]).abs().mean((1, 2, 3)).sum())
            n += len(b["image"])
        self.module.train()
        return {"psnr": psnr / max(n, 1), "l1": l1 / max(n, 1)}

    @torch.no_grad()
    def _latent_std(self, rows: int = 1024) -> float:
        """The std of posterior samples of the first ``rows`` train images: what the dit stage diffuses."""
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        latents = [
            self.module.encode(b["image"]).latent_dist.sample(generator=g).flatten()
            for b in self._first_train_batches(rows)
        ]
        return float(torch.cat(latents).std())

    def export(self, directory: Path) -> None:
        from vgmedgen.model.parts import write_manifest

        self.module.eval()
        std = self._latent_std()
        self.module.train()
        self.module.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
        with atomic_directory(directory) as d:
            self.module.save_pretrained(d)
            write_manifest(d, {"part": "autoencoder", "latent_std": std})

    def artifacts(self, step: int, directory: Path) -> list[Path]:
        """Up to 16 validation images (top row) over their reconstructions (bottom row)."""
        from vgmedgen.platform.visualize import save_grid

        k = min(16, len(self.val_data))
        if k == 0:
            return []
        images = self.val_data.batch(np.arange(k), self.device)["image"]
        was_training = self.module.training
        self.module.eval()
        try:
            recon = self.reconstruct(images)
        finally:
            self.module.train(was_training)
        path = directory / f"reconstructions_step{step:06d}.png"
        save_grid(
            (torch.cat([images, recon]).cpu() + 1) / 2,
            path,
            ncol=k,
            provenance={
                "stage": self.name,
                "step": step,
                "content": "autoencoder reconstructions (bottom row)",
            },
            title=f"autoencoder, step {step}: validation images (top) and their reconstructions (bottom)",
        )
        return [path]


def build_task(
    stage: str, cfg: ExperimentConfig, inputs: dict[str, Path], device: torch.device, rank: int, world: int
):
    """The task of ``stage`` on this worker."""
    if stage == "visual":
        return VisualTask(cfg, device)
    if stage == "align":
        return AlignTask(cfg, inputs, device)
    if stage == "autoencoder":
        return AutoencoderTask(cfg, device)
    if stage == "dit":
        return DitTask(cfg, inputs, device, world)
    raise ValueError(f"unknown stage {stage!r}")
