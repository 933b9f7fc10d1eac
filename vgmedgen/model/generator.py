"""The VG-MedGen generator: PixArt-alpha DiT + HFFM + LoRA (docs/method.md, section "Stage 3").

VG-MedGen (Huang et al., arXiv 2603.10519; reference code hx111/VG-MedGen) conditions
PixArt-alpha (Chen et al., arXiv 2310.00426; diffusers ``PixArtTransformer2DModel``) on an
anatomy vector ``t_a`` and a style vector ``t_s`` instead of a T5 caption. This module holds the
generator's typed config and presets, the backbone wrapper (stock diffusers module + diffusers'
adapter API), and :class:`Generator`, which ties backbone, HFFM (``hffm.py``), LoRA
(``lora.py``), the noise schedule and the optional frozen VAE (``autoencoder.py``) together and
computes the training loss terms (``losses.py``, schedule arithmetic in ``schedule.py``). Sampling lives in ``sampler.py``.

Backbone modes: ``init: pretrained | scratch`` x ``train: lora | full``. LoRA on a randomly
initialised frozen base learns nothing, so ``scratch + lora`` is rejected.

Shape legend: N batch, C diffused channels (3 in pixel space, 4 latent), H/W size of the diffused
sample, A anatomy width, S style width, L caption tokens, B BERT width, D backbone width.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import DDPMScheduler, PixArtTransformer2DModel
from diffusers.loaders import PeftAdapterMixin
from torch import nn

from vgmedgen.model.autoencoder import FrozenAutoencoder, resolve_component_dir
from vgmedgen.model.configbase import ConfigError
from vgmedgen.model.generator_config import (
    GENERATOR_PRESETS,
    PIXEL_CHANNELS,
    BackboneConfig,
    ColourLossConfig,
    ConditioningConfig,
    GeneratorConfig,
    NoiseScheduleConfig,
    build_generator_config,
)
from vgmedgen.model.hffm import HFFM
from vgmedgen.model.lora import (
    LORA_ADAPTER_NAME,
    LORA_WEIGHT_NAME,
    apply_lora,
    lora_module_names,
)
from vgmedgen.model.losses import colour_distribution_loss, epsilon_mse
from vgmedgen.model.schedule import (
    add_noise,
    epsilon_from_v,
    min_snr_weight,
    predict_x0,
    split_learned_sigma,
    v_target,
    x0_from_v,
)

__all__ = [
    "GENERATOR_PRESETS",
    "BackboneConfig",
    "ColourLossConfig",
    "ConditioningConfig",
    "Generator",
    "GeneratorConfig",
    "NoiseScheduleConfig",
    "PIXEL_CHANNELS",
    "PixArtBackbone",
    "build_generator",
    "build_generator_config",
    "pixart_reference_init",
]

# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------


class PixArtBackbone(PixArtTransformer2DModel, PeftAdapterMixin):
    """diffusers' ``PixArtTransformer2DModel`` plus diffusers' adapter API.

    In diffusers 0.42.1 ``PixArtTransformer2DModel`` lacks ``PeftAdapterMixin``; mixing it in
    adds ``add_adapter``, ``save_lora_adapter``, ``load_lora_adapter``, ``fuse_lora`` without
    changing a parameter name or the forward.
    """


def pixart_reference_init(backbone: PixArtTransformer2DModel) -> None:
    """PixArt-alpha's own initialisation (``PixArt.initialize_weights``) for scratch training.

    Xavier-uniform linears with zero bias; the patch embedding initialised like a linear layer;
    N(0, 0.02) for the timestep embedder, the adaLN-single projection and the caption projection;
    zero cross-attention output projections and a zero final projection, so that every block
    starts as an identity on the cross-attention path and the network starts by predicting zero
    noise (as DiT).
    """

    def _basic(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    backbone.apply(_basic)
    w = backbone.pos_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(backbone.pos_embed.proj.bias)
    temb = backbone.adaln_single.emb.timestep_embedder
    nn.init.normal_(temb.linear_1.weight, std=0.02)
    nn.init.normal_(temb.linear_2.weight, std=0.02)
    nn.init.normal_(backbone.adaln_single.linear.weight, std=0.02)
    if backbone.caption_projection is not None:
        nn.init.normal_(backbone.caption_projection.linear_1.weight, std=0.02)
        nn.init.normal_(backbone.caption_projection.linear_2.weight, std=0.02)
    for block in backbone.transformer_blocks:
        # Zero cross-attention output: a block starts by ignoring the condition.
        nn.init.zeros_(block.attn2.to_out[0].weight)
        nn.init.zeros_(block.attn2.to_out[0].bias)
    # Zero final layer: the initial prediction is 0, the mean of the target noise.
    nn.init.zeros_(backbone.proj_out.weight)
    nn.init.zeros_(backbone.proj_out.bias)


def _load_backbone(cfg: GeneratorConfig) -> PixArtBackbone:
    """Load the pretrained transformer from ``cfg.pretrained_dir`` and check its architecture."""
    if cfg.pretrained_dir is None:  # the config validator already rejects this
        raise ConfigError("generator.pretrained_dir is required with init='pretrained'")
    root, subfolder = resolve_component_dir(
        cfg.pretrained_dir, "transformer", "PixArt transformer", "generator.pretrained_dir"
    )
    backbone = PixArtBackbone.from_pretrained(
        root, subfolder=subfolder, torch_dtype=torch.float32, local_files_only=True
    )
    want = cfg.backbone.diffusers_kwargs()
    mismatched = {
        k: (backbone.config.get(k), v)
        for k, v in want.items()
        if k not in ("dropout", "interpolation_scale", "use_additional_conditions")
        and backbone.config.get(k) != v
    }
    if mismatched:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in mismatched.items())
        raise ConfigError(
            f"the transformer in '{cfg.pretrained_dir}' does not match generator.backbone ({detail}); "
            "set generator.backbone to the checkpoint's architecture (e.g. the 'pixart-512' preset)"
        )
    return backbone


def _build_backbone(cfg: GeneratorConfig, *, load_weights: bool) -> PixArtBackbone:
    if cfg.init == "pretrained" and load_weights:
        return _load_backbone(cfg)
    backbone = PixArtBackbone(**cfg.backbone.diffusers_kwargs())
    if cfg.init == "scratch":
        pixart_reference_init(backbone)
    return backbone


def _build_vae(
    cfg: GeneratorConfig, *, load_weights: bool, autoencoder_dir: Path | None = None
) -> FrozenAutoencoder | None:
    if cfg.autoencoder is not None:
        if not load_weights:
            return FrozenAutoencoder(cfg.autoencoder.build())
        if autoencoder_dir is None:
            raise ConfigError(
                "generator.autoencoder is set: the generator diffuses the latents of the autoencoder trained by "
                "the 'autoencoder' stage, so pass its export directory (the train job does)"
            )
        return FrozenAutoencoder.from_dir(autoencoder_dir, field="the autoencoder stage's export")
    if cfg.vae_dir is None:
        return None
    vae = FrozenAutoencoder.from_dir(cfg.vae_dir) if load_weights else FrozenAutoencoder.from_config()
    if vae.latent_channels != cfg.backbone.in_channels:
        raise ConfigError(
            f"the VAE in '{cfg.vae_dir}' has {vae.latent_channels} latent channels but "
            f"generator.backbone.in_channels is {cfg.backbone.in_channels}; make them equal"
        )
    return vae


def build_generator(
    cfg: GeneratorConfig, *, load_weights: bool = True, autoencoder_dir: Path | None = None
) -> Generator:
    """Build the generator described by ``cfg``.

    Args:
        cfg: the generator config.
        load_weights: load the pretrained transformer and the VAE from their directories. False
            builds the same architecture with random weights (parameter counts under
            ``torch.device("meta")``, GPU smoke tests) and never touches the disk.
        autoencoder_dir: the trained autoencoder (``generator.autoencoder``): the autoencoder stage's export,
            or ``generator/vae`` of a model version.

    Raises:
        ComponentNotFoundError: a configured directory does not exist or holds no model (the
            message names the path).
        ConfigError: the checkpoint's architecture disagrees with ``cfg.backbone``.
    """
    backbone = _build_backbone(cfg, load_weights=load_weights)
    vae = _build_vae(cfg, load_weights=load_weights, autoencoder_dir=autoencoder_dir)
    return Generator(cfg, backbone, vae)


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


class Generator(nn.Module):
    """PixArt backbone + HFFM (+ LoRA) (+ frozen VAE): predicts noise from (t_a, t_s).

    Args:
        cfg: the generator config.
        backbone: the transformer (pretrained or random), stock diffusers parameter names.
        vae: the frozen autoencoder in latent space, None in pixel space.

    Attributes:
        backbone: the diffusers transformer (LoRA adapters injected in ``lora`` mode).
        hffm: the fusion module (all HFFM parameters; they always train).
        vae: the frozen autoencoder or None.
        lora_modules: names of the backbone modules that carry adapters (empty in ``full`` mode).
    """

    alphas_cumprod: torch.Tensor

    def __init__(
        self, cfg: GeneratorConfig, backbone: PixArtBackbone, vae: FrozenAutoencoder | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.vae = vae
        bb = cfg.backbone
        self.hffm = HFFM(
            cfg.hffm, caption_channels=bb.caption_channels, inner_dim=bb.inner_dim, num_layers=bb.num_layers
        )
        self.hffm.attach(backbone)
        gate = (
            cfg.hffm.gate_init
            if cfg.hffm.gate_init is not None
            else (0.0 if cfg.init == "pretrained" else 1.0)
        )
        # From scratch, PixArt's init already zeroes every cross-attention output projection (through which
        # the branches also write), so a block still starts by ignoring the condition. A zero gate on top
        # would make the branch and its gate wait for each other: the gate's gradient is proportional to
        # that zero projection and the branch's to the zero gate, and the anatomy branches stayed closed
        # (tanh(gate) <= 1e-3) through a 1,200-step demo run.
        self.hffm.set_gates(gate)
        if cfg.train == "lora":
            self.lora_modules = apply_lora(backbone, cfg.lora)
        else:
            self.lora_modules = []
            backbone.requires_grad_(True)
        self.hffm.requires_grad_(True)
        if not self.hffm.uses_streams:  # the caption-only baseline: the stream fusions enter nothing
            self.hffm.anatomy.requires_grad_(False)
            self.hffm.style.requires_grad_(False)
        if vae is not None:
            vae.requires_grad_(False)
        if cfg.gradient_checkpointing:
            backbone.enable_gradient_checkpointing()
        alphas = DDPMScheduler(**cfg.schedule.scheduler_kwargs()).alphas_cumprod.float()
        self.register_buffer("alphas_cumprod", alphas, persistent=False)  # (T,)
        self.compute_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        if self.compute_dtype != torch.float32:
            # Frozen weights in bf16 (memory), trained ones in fp32 (optimizer precision).
            for p in self.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(self.compute_dtype)

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def in_channels(self) -> int:
        """Channels C of the diffused sample."""
        return self.cfg.backbone.in_channels

    @property
    def downscale(self) -> int:
        """Image pixels per diffused-sample pixel (the VAE's factor, 1 in pixel space)."""
        return 1 if self.vae is None else self.vae.scale_factor

    @property
    def image_size(self) -> int:
        """Native image side in pixels."""
        return self.cfg.backbone.sample_size * self.downscale

    def sample_shape(self, image_size: int | None = None) -> tuple[int, int, int]:
        """(C, H, W) of the diffused sample for a square image of ``image_size`` pixels."""
        size = self.image_size if image_size is None else image_size
        unit = self.downscale * self.cfg.backbone.patch_size
        if size % unit:
            raise ValueError(f"image size {size} must be a multiple of {unit} (VAE factor x patch size)")
        side = size // self.downscale
        return (self.in_channels, side, side)

    # ---- parameters --------------------------------------------------------------------------

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters the optimiser updates (LoRA or backbone, plus HFFM)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts: backbone (without adapters), lora, hffm, vae, trainable."""
        lora = sum(p.numel() for n, p in self.backbone.named_parameters() if ".lora_" in n)
        backbone = sum(p.numel() for p in self.backbone.parameters()) - lora
        return {
            "backbone": backbone,
            "lora": lora,
            "hffm": self.hffm.num_parameters(),
            "vae": 0 if self.vae is None else sum(p.numel() for p in self.vae.parameters()),
            "trainable": sum(p.numel() for _, p in self.named_trainable_parameters()),
        }

    def save_lora_adapter(self, directory: Path) -> None:
        """Save the LoRA adapter with diffusers' ``save_lora_adapter`` (safetensors, stock names)."""
        if not self.lora_modules:
            raise ValueError("this generator has no LoRA adapter (train='full'); save the backbone instead")
        self.backbone.save_lora_adapter(
            directory, adapter_name=LORA_ADAPTER_NAME, weight_name=LORA_WEIGHT_NAME
        )

    def load_lora_adapter(self, directory: Path) -> None:
        """Replace the LoRA adapter by one saved with :meth:`save_lora_adapter` (exact round trip)."""
        if self.lora_modules:
            self.backbone.delete_adapters(LORA_ADAPTER_NAME)
        self.backbone.load_lora_adapter(
            directory, prefix=None, adapter_name=LORA_ADAPTER_NAME, weight_name=LORA_WEIGHT_NAME
        )
        self.lora_modules = lora_module_names(self.backbone)
        if self.cfg.train == "lora":
            for n, p in self.backbone.named_parameters():
                p.requires_grad_(".lora_" in n)

    # ---- forward -----------------------------------------------------------------------------

    def _autocast(self, device: torch.device) -> torch.autocast:
        if self.compute_dtype != torch.float32 and device.type != "cuda":
            raise ValueError(
                f"generator.dtype='{self.cfg.dtype}' runs only on CUDA (bf16 matmuls crawl on CPU); "
                "set generator.dtype='float32' for CPU runs"
            )
        return torch.autocast(
            device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32
        )

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        t_a: torch.Tensor,
        t_s: torch.Tensor,
        **conditions: torch.Tensor | None,
    ) -> torch.Tensor:
        """Predict the noise in ``x_t`` (a v-prediction network's output converted exactly).

        Arguments as :meth:`predict` (``conditions``: its keyword arguments). Returns (N, C, H, W)
        float32 epsilon.
        """
        timesteps = self._timesteps(timesteps, x_t)
        out = self.predict(x_t, timesteps, t_a, t_s, **conditions)  # (N, C, H, W)
        if self.cfg.schedule.prediction_type == "v_prediction":
            return epsilon_from_v(x_t, out, self.alphas_cumprod.to(x_t.device)[timesteps])
        return out

    @staticmethod
    def _timesteps(timesteps: torch.Tensor | int, x_t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=x_t.device)
        return t.expand(x_t.shape[0]) if t.ndim == 0 else t

    def predict(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        t_a: torch.Tensor,
        t_s: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop_anatomy: torch.Tensor | None = None,
        drop_style: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The network's own prediction for ``x_t``: epsilon or v, per ``schedule.prediction_type``.

        Args:
            x_t: (N, C, H, W) noisy sample (pixels in [-1, 1] scale, or scaled latents).
            timesteps: (N,) integer timesteps in ``[0, num_train_timesteps)`` (or a scalar).
            t_a: (N, A) anatomy vectors.
            t_s: (N, S) style vectors.
            text_tokens: (N, L, B) BERT token sequence (``hybrid`` and ``caption`` modes only).
            text_mask: (N, L) 1 for real caption tokens.
            drop_anatomy: (N,) bool, replace the anatomy stream by its learned null.
            drop_style: (N,) bool, replace the style stream by its learned null.
            drop_text: (N,) bool, mask the caption tokens out (``hybrid``, ``caption``).

        Returns:
            (N, C, H, W) float32 prediction (the first half of a learned-sigma output).
        """
        n = x_t.shape[0]
        if x_t.ndim != 4 or x_t.shape[1] != self.in_channels:
            raise ValueError(f"x_t must have shape (N, {self.in_channels}, H, W), got {tuple(x_t.shape)}")
        if t_a.shape[0] != n or t_s.shape[0] != n:
            raise ValueError(f"batch sizes differ: x_t {n}, t_a {t_a.shape[0]}, t_s {t_s.shape[0]}")
        timesteps = self._timesteps(timesteps, x_t)
        with self._autocast(x_t.device):
            enc, enc_mask, attn_kwargs = self.hffm.encoder_inputs(
                t_a,
                t_s,
                drop_anatomy=drop_anatomy,
                drop_style=drop_style,
                text_tokens=text_tokens,
                text_mask=text_mask,
                drop_text=drop_text,
            )  # (N, L', caption_channels)
            out = self.backbone(
                x_t,
                encoder_hidden_states=enc,
                encoder_attention_mask=enc_mask,
                timestep=timesteps,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                cross_attention_kwargs=attn_kwargs,
                return_dict=False,
            )[0]  # (N, C_out, H, W)
        return split_learned_sigma(out, self.in_channels).float()  # (N, C, H, W)

    # ---- training ----------------------------------------------------------------------------

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] (N, 3, H, W) to the diffused sample (latents, or the images themselves)."""
        if self.vae is None:
            return images.float()
        with self._autocast(images.device):
            return self.vae.encode(images, generator=generator).float()

    def decode(self, x0: torch.Tensor, *, checkpointed: bool = False) -> torch.Tensor:
        """Diffused sample to images in about [-1, 1] (N, 3, H, W); differentiable."""
        if self.vae is None:
            return x0
        with self._autocast(x0.device):
            return self.vae.decode(x0, checkpointed=checkpointed).float()

    def training_loss(
        self,
        images: torch.Tensor,
        t_a: torch.Tensor,
        t_s: torch.Tensor,
        prior_a: torch.Tensor | None = None,
        prior_s: torch.Tensor | None = None,
        *,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        generator: torch.Generator,
        step: int = 0,
        latents: torch.Tensor | None = None,
        latent_moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Unreduced loss terms for one batch; every random draw comes from ``generator``.

        Per sample: with probability ``conditioning.condition_source`` the (t_a, t_s) of the text
        heads are replaced by the image's visual priors (prior_a, prior_s); then the condition
        dropout draws (whole condition / anatomy alone / style alone to learned nulls); in
        ``hybrid`` mode the caption tokens are dropped when the condition comes from the priors,
        when any stream is dropped (they carry both factors), and otherwise with probability
        ``hffm.text_dropout``; in ``caption`` mode (the baseline with one condition) the caption tokens
        are dropped exactly when a stream dropout is drawn, and the streams enter nothing;
        ``text_tokens`` are ignored in the other modes. Then a timestep
        and noise are drawn and the noise is predicted.

        Args:
            images: (N, 3, H, W) real images in [-1, 1].
            t_a: (N, A) anatomy vectors from the text heads.
            t_s: (N, S) style vectors from the text heads.
            prior_a: (N, A) the images' visual anatomy priors, or None (text only).
            prior_s: (N, S) the images' visual style priors, or None.
            text_tokens: (N, L, B) caption token features (``hybrid``; required in ``caption``).
            text_mask: (N, L) caption token mask.
            generator: the source of noise, timesteps, dropouts and crops.
            step: the optimiser step (``colour.every_k``).
            latents: (N, C, h, w) precomputed latents of ``images`` (skips the VAE encoder).
            latent_moments: the VAE posterior's (mean, std) of ``images`` (``FrozenAutoencoder.moments``),
                precomputed: the latents are drawn from it at the point, and with the draw, that encoding
                would make (the same values as without it).

        Returns:
            ``{"eps": (N,), "colour": (N,), "colour_mask": (N,) bool}``: the diffusion loss per sample
            (MSE of the prediction against its target: the noise, or v with ``v_prediction``;
            Min-SNR-weighted with ``loss_weighting='min_snr'``),
            colour loss per sample (0 where inactive) and where it is active. Reduce with
            :meth:`reduce_loss`.
        """
        n, device = images.shape[0], images.device
        gdev = generator.device
        if (prior_a is None) != (prior_s is None):
            raise ValueError("pass both prior_a and prior_s (visual priors) or neither")

        def uniform() -> torch.Tensor:
            return torch.rand(n, generator=generator, device=gdev).to(device)

        u_source, u_drop, u_text = uniform(), uniform(), uniform()  # (N,) each
        timesteps = torch.randint(
            0, self.cfg.schedule.num_train_timesteps, (n,), generator=generator, device=gdev
        ).to(device)  # (N,)
        if latents is not None:
            x0 = latents.float()  # (N, C, h, w)
        elif latent_moments is not None and self.vae is not None:
            x0 = self.vae.sample(*latent_moments, generator=generator).float()
        else:
            x0 = self.encode(images, generator=generator)
        noise = torch.randn(x0.shape, generator=generator, device=gdev).to(device)  # (N, C, h, w)

        cond = self.cfg.conditioning
        if prior_a is not None and prior_s is not None:
            use_prior = u_source < cond.condition_source  # (N,)
            t_a = torch.where(use_prior[:, None], prior_a.to(t_a.dtype), t_a)  # (N, A)
            t_s = torch.where(use_prior[:, None], prior_s.to(t_s.dtype), t_s)  # (N, S)
        else:
            use_prior = torch.zeros(n, dtype=torch.bool, device=device)
        drop_all = u_drop < cond.drop_all
        drop_a_only = (u_drop >= cond.drop_all) & (u_drop < cond.drop_all + cond.drop_anatomy)
        drop_s_only = (u_drop >= cond.drop_all + cond.drop_anatomy) & (
            u_drop < cond.drop_all + cond.drop_anatomy + cond.drop_style
        )
        drop_anatomy = drop_all | drop_a_only  # (N,)
        drop_style = drop_all | drop_s_only  # (N,)
        if self.cfg.hffm.mode == "caption":  # one condition: the caption, dropped whenever a stream would be
            if text_tokens is None:
                raise ValueError("hffm.mode='caption' trains on the caption's tokens: pass text_tokens")
            drop_text = drop_anatomy | drop_style
        elif self.hffm.uses_text and text_tokens is not None:
            drop_text = use_prior | drop_anatomy | drop_style | (u_text < self.cfg.hffm.text_dropout)
        else:
            text_tokens, text_mask, drop_text = None, None, None

        alpha_bar = self.alphas_cumprod.to(device)[timesteps]  # (N,)
        x_t = add_noise(x0, noise, alpha_bar)  # (N, C, h, w)
        pred = self.predict(
            x_t,
            timesteps,
            t_a,
            t_s,
            text_tokens=text_tokens,
            text_mask=text_mask,
            drop_anatomy=drop_anatomy,
            drop_style=drop_style,
            drop_text=drop_text,
        )  # (N, C, h, w)
        sched = self.cfg.schedule
        v_pred = sched.prediction_type == "v_prediction"
        mse = epsilon_mse(pred, v_target(x0, noise, alpha_bar) if v_pred else noise)  # (N,)
        if sched.loss_weighting == "min_snr":
            mse = mse * min_snr_weight(alpha_bar, sched.min_snr_gamma, sched.prediction_type)
        terms = {"eps": mse}
        colour, colour_mask = self._colour_terms(images, x_t, pred, alpha_bar, timesteps, generator, step)
        terms["colour"], terms["colour_mask"] = colour, colour_mask
        return terms

    def _x0_estimate(self, x_t: torch.Tensor, pred: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """One-step clean estimate from the network's own prediction (epsilon or v); differentiable."""
        if self.cfg.schedule.prediction_type == "v_prediction":
            return x0_from_v(x_t, pred, alpha_bar)
        return predict_x0(x_t, pred, alpha_bar)

    def _colour_terms(
        self,
        images: torch.Tensor,
        x_t: torch.Tensor,
        pred: torch.Tensor,
        alpha_bar: torch.Tensor,
        timesteps: torch.Tensor,
        generator: torch.Generator,
        step: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Colour loss on the decoded one-step clean estimate, with gradient; (N,), (N,) bool."""
        n, device = images.shape[0], images.device
        colour = torch.zeros(n, device=device)
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        cc = self.cfg.colour
        if cc.weight == 0 or step % cc.every_k:
            return colour, mask
        idx = ((timesteps >= cc.t_min) & (timesteps <= cc.t_max)).nonzero()[:, 0]  # (n_in,)
        if self.vae is not None:
            idx = idx[: cc.decode_max_images]  # decoding at 512 px costs ~2 DiT forwards per image
        if idx.numel() == 0:
            return colour, mask
        x0_hat = self._x0_estimate(x_t[idx], pred[idx], alpha_bar[idx])  # (n, C, h, w)
        target = images[idx].float()  # (n, 3, H, W)
        if self.vae is not None:
            side = x0_hat.shape[-1]
            crop = cc.latent_crop
            if crop is not None and crop < min(x0_hat.shape[-2:]):
                hi = torch.randint(
                    0, x0_hat.shape[-2] - crop + 1, (1,), generator=generator, device=generator.device
                )
                wi = torch.randint(0, side - crop + 1, (1,), generator=generator, device=generator.device)
                top, left = int(hi), int(wi)
                x0_hat = x0_hat[..., top : top + crop, left : left + crop]  # (n, C, crop, crop)
                f = self.downscale
                target = target[
                    ..., top * f : (top + crop) * f, left * f : (left + crop) * f
                ]  # (n, 3, fc, fc)
            pred = self.decode(x0_hat, checkpointed=True)  # (n, 3, H', W')
        else:
            pred = x0_hat
        values = colour_distribution_loss(pred, target)  # (n,)
        colour = colour.scatter(0, idx, values)  # differentiable in values
        mask[idx] = True
        return colour, mask

    def reduce_loss(
        self,
        terms: Mapping[str, torch.Tensor],
        *,
        active_total: torch.Tensor | float | None = None,
        world: int = 1,
    ) -> torch.Tensor:
        """Scalar training loss: ``mean(eps) + colour.weight * mean over active samples(colour)``.

        With data parallelism the colour mean is over the *global* batch's active samples: pass their
        count over all ranks as ``active_total`` and the number of ranks as ``world``. Each rank then
        returns ``mean(eps) + weight * world * sum(colour) / active_total``, and the ranks' average (what
        DDP's gradient averaging computes) is the one-process loss of the whole batch.
        """
        loss = terms["eps"].mean()
        mask = terms.get("colour_mask")
        if mask is None:
            return loss
        total = mask.sum() if active_total is None else active_total
        if float(total) > 0:
            colour = world * (terms["colour"] * mask).sum() / total
            loss = loss + self.cfg.colour.weight * colour
        return loss
