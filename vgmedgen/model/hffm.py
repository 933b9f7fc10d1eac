"""HFFM: the fusion that feeds the anatomy and style streams into the PixArt transformer.

VG-MedGen (Huang et al., arXiv 2603.10519) conditions a diffusion transformer on two small
vectors per image, anatomy ``t_a`` and imaging style ``t_s``, "through separated channels".
The reference code turns each vector into one token (LayerNorm -> MLP 8 -> 256 -> 4096 -> +
type embedding) and lets the tokens replace the T5 caption in PixArt's shared cross-attention.
This module keeps that path (``tokens`` mode, reference parity) and adds ours (see
docs/method.md, section "Stage 3"):

- ``separate`` (default): every transformer block gets one zero-initialised, gated
  cross-attention branch per stream. A branch reuses the block's own query projection
  (``attn2.to_q``, LoRA-adapted when LoRA is on) and output projection (``attn2.to_out``) and
  owns only two narrow key/value projections (``branch_width -> inner_dim``), as IP-Adapter
  does; the shared cross-attention then sees learned null tokens only.
- ``hybrid``: ``separate`` plus the caption's BERT token sequence, projected by a new
  zero-initialised linear layer to the caption width, in the shared cross-attention.

The branches are attached as custom attention processors on ``attn2`` (the IP-Adapter
mechanism), so the backbone's parameter names, and therefore LoRA adapter names, stay the stock
diffusers names; the branch parameters live in this module, not in the backbone.

Shape legend: N batch, P prior width (anatomy A or style S), K tokens per stream, W stream token
width (``caption_channels`` in ``tokens`` mode, ``branch_width`` otherwise), T image tokens,
D backbone width (``heads * head_dim``), L caption tokens, B BERT width, C caption channels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vgmedgen.model.configbase import StrictConfig

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

__all__ = [
    "HFFM",
    "HFFMAttnProcessor",
    "HFFMConfig",
    "StreamBranch",
    "StreamFusion",
    "STREAMS",
]

STREAMS: tuple[str, str] = ("anatomy", "style")


class HFFMConfig(StrictConfig):
    """How the anatomy and style streams enter the transformer.

    Attributes:
        mode: ``tokens`` (reference parity: stream tokens replace the caption in the shared
            cross-attention), ``separate`` (gated per-stream cross-attention branches; the shared
            cross-attention sees learned nulls), ``hybrid`` (``separate`` + BERT caption tokens
            in the shared cross-attention) or ``caption`` (the baseline without disentanglement: only
            the caption's BERT tokens, projected into the shared cross-attention as in ``hybrid``; no
            stream enters the transformer, so one condition and one guidance scale, ``guidance_style``).
        anatomy_dim: width A of the anatomy vector ``t_a`` (= the visual anatomy prior's width).
        style_dim: width S of the style vector ``t_s``.
        hidden_dim: hidden width of each stream's fusion MLP (256 in the reference).
        tokens_per_stream: K, how many tokens each stream expands to.
        prior_layernorm: the reference's LayerNorm on the raw vector before the MLP. It erases
            the vector's scale, which the alignment MSE of stage 2 learns, so it is off except for
            reference parity.
        branch_width: width W of the stream tokens read by the narrow key/value projections of the
            ``separate``/``hybrid`` branches (ignored in ``tokens`` mode).
        shared_null_tokens: how many learned null tokens the shared cross-attention receives in
            ``separate``/``hybrid`` mode.
        text_width: width B of the BERT token sequence (``hybrid`` and ``caption``).
        text_dropout: probability, during training, of dropping the caption tokens to null in
            ``hybrid`` mode, so that control stays in the streams (at least 0.3).
    """

    mode: Literal["tokens", "separate", "hybrid", "caption"] = "separate"
    anatomy_dim: int = Field(36, ge=1)
    style_dim: int = Field(8, ge=1)
    hidden_dim: int = Field(256, ge=1)
    tokens_per_stream: int = Field(1, ge=1)
    prior_layernorm: bool = False
    standardize: bool = Field(
        False,
        description="a learned per-feature affine on each stream vector (ActNorm), set from the training data's "
        "priors before the first step so every feature starts at zero mean and unit spread: the moments prior is "
        "mostly a shared offset (centroids near 0.5) with ~10 % variation between images, which a generator "
        "trained from scratch otherwise learns to ignore",
    )
    branch_width: int = Field(64, ge=1)
    shared_null_tokens: int = Field(1, ge=1)
    text_width: int = Field(768, ge=1)
    text_dropout: float = Field(0.5, ge=0.3, le=1.0)
    gate_init: float | None = Field(
        None,
        description="initial gate g of the stream branches (their output is tanh(g) * attention); None = 0 "
        "with a pretrained backbone (it starts from its own behaviour) and 1 when training from scratch",
    )


class StreamFusion(nn.Module):
    """One stream's fusion: (LayerNorm) -> MLP (P -> hidden -> K*W) -> + type embedding.

    Also owns the stream's learned null tokens, which replace the fused tokens of samples whose
    stream is dropped (classifier-free guidance training and sampling).
    """

    def __init__(
        self,
        prior_dim: int,
        hidden_dim: int,
        width: int,
        num_tokens: int,
        layernorm: bool,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        self.prior_dim = prior_dim
        # ActNorm: x -> (x - shift) * exp(-log_scale), identity until init_standardization sets it from data.
        self.shift: nn.Parameter | None = nn.Parameter(torch.zeros(prior_dim)) if standardize else None
        self.log_scale: nn.Parameter | None = nn.Parameter(torch.zeros(prior_dim)) if standardize else None
        self.width = width
        self.num_tokens = num_tokens
        self.norm: nn.Module = nn.LayerNorm(prior_dim, eps=1e-6) if layernorm else nn.Identity()
        self.mlp = nn.Sequential(
            nn.Linear(prior_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_tokens * width)
        )
        self.type_embedding = nn.Parameter(torch.empty(num_tokens, width))
        self.null_tokens = nn.Parameter(torch.empty(num_tokens, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference init: Xavier-uniform weights, zero biases, N(0, 0.02) embeddings."""
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.type_embedding, std=0.02)
        # The null tokens start at the same scale as the type embedding: a small, distinct input.
        nn.init.normal_(self.null_tokens, std=0.02)

    def forward(self, prior: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Fuse a stream vector into tokens.

        Args:
            prior: (N, P) the stream vector (text-head output or visual prior).
            drop: optional (N,) bool; True replaces that sample's tokens by the null tokens.

        Returns:
            (N, K, W) stream tokens.
        """
        if prior.ndim != 2 or prior.shape[1] != self.prior_dim:
            raise ValueError(
                f"stream vector must have shape (N, {self.prior_dim}), got {tuple(prior.shape)}; "
                "set generator.hffm.anatomy_dim / style_dim to the priors' widths"
            )
        dtype = self.mlp[0].weight.dtype
        x = prior.float()
        if self.shift is not None and self.log_scale is not None:
            x = (x - self.shift.float()) * torch.exp(-self.log_scale.float())  # (N, P)
        # The reference normalises in float32; LayerNorm on a handful of numbers is cheap.
        x = self.norm(x).to(dtype)  # (N, P)
        tokens = self.mlp(x).view(-1, self.num_tokens, self.width)  # (N, K, W)
        tokens = tokens + self.type_embedding  # (N, K, W)
        if drop is not None:
            null = self.null_tokens.to(tokens.dtype).expand_as(tokens)  # (N, K, W)
            tokens = torch.where(drop.view(-1, 1, 1).to(tokens.device), null, tokens)
        return tokens

    @torch.no_grad()
    def init_standardization(self, priors: torch.Tensor, min_std: float = 1e-3) -> None:
        """Set the ActNorm from sample stream vectors (M, P): per-feature mean and std (floored at ``min_std``)."""
        if self.shift is None or self.log_scale is None:
            raise RuntimeError("this stream was built without standardize=True")
        x = priors.detach().float()
        self.shift.copy_(x.mean(0).to(self.shift))
        self.log_scale.copy_(torch.log(x.std(0).clamp_min(min_std)).to(self.log_scale))


class StreamBranch(nn.Module):
    """One stream's cross-attention branch in one block: narrow key/value projections and a gate.

    The query comes from the block's own ``attn2.to_q`` and the output goes through its own
    ``attn2.to_out``, so the branch owns ``2 * (W * D + D) + 1`` parameters.
    """

    def __init__(self, width: int, inner_dim: int) -> None:
        super().__init__()
        self.to_k = nn.Linear(width, inner_dim)
        self.to_v = nn.Linear(width, inner_dim)
        self.gate = nn.Parameter(torch.zeros(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier key/value projections with zero bias; the gate starts at exactly zero.

        A zero gate makes the branch's contribution exactly zero at initialisation, so a pretrained
        backbone starts from its own behaviour; the gate still receives a gradient (the branch's
        attention output is non-zero), so the branch opens as it becomes useful.
        """
        nn.init.xavier_uniform_(self.to_k.weight)
        nn.init.zeros_(self.to_k.bias)
        nn.init.xavier_uniform_(self.to_v.weight)
        nn.init.zeros_(self.to_v.bias)
        nn.init.zeros_(self.gate)


class HFFMAttnProcessor:
    """Attention processor for a block's cross-attention (``attn2``) with HFFM stream branches.

    Computes the stock shared cross-attention (as diffusers' ``AttnProcessor2_0``) and adds, per
    stream, ``tanh(gate) * softmax(q k_s^T / sqrt(d)) v_s`` before the output projection, with
    ``q`` from the block's own query projection (IP-Adapter style).

    The stream tokens arrive through ``cross_attention_kwargs["ip_hidden_states"]``: diffusers
    forwards that key quietly to every attention layer (the self-attention's stock processor
    ignores it without a warning), and, unlike state stored on the processor, a kwarg is passed
    again when gradient checkpointing recomputes the block.

    This is deliberately not an ``nn.Module``: if it were, ``Attention.set_processor`` would
    register it (and the branch parameters) inside the backbone and rename nothing but add
    non-stock keys to the backbone's state dict. The branch modules are owned by :class:`HFFM`.
    """

    def __init__(self, branches: nn.ModuleDict) -> None:
        self.branches = branches

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_hidden_states: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Shared cross-attention plus gated stream branches.

        Args:
            attn: the block's ``attn2``.
            hidden_states: (N, T, D) image tokens.
            encoder_hidden_states: (N, L, D) projected caption (or null) tokens.
            attention_mask: optional bias (N, 1, L) over the caption tokens.
            temb: unused (PixArt's attention has no spatial norm).
            ip_hidden_states: stream name -> (N, K, W) stream tokens.

        Returns:
            (N, T, D) attention output.
        """
        batch_size, _, _ = hidden_states.shape  # (N, T, D)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(
                attention_mask, encoder_hidden_states.shape[1], batch_size
            )
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)  # (N, T, D)
        key = attn.to_k(encoder_hidden_states)  # (N, L, D)
        value = attn.to_v(encoder_hidden_states)  # (N, L, D)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (N, h, T, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (N, h, L, d)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (N, h, L, d)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)  # (N, h, T, d)

        if ip_hidden_states is not None:
            for name, branch in self.branches.items():
                tokens = ip_hidden_states[name]  # (N, K, W)
                k_s = branch.to_k(tokens).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                v_s = branch.to_v(tokens).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                branch_out = F.scaled_dot_product_attention(query, k_s, v_s)  # (N, h, T, d)
                out = out + torch.tanh(branch.gate).to(out.dtype) * branch_out

        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)  # (N, T, D)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)  # dropout
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class HFFM(nn.Module):
    """Hierarchical feature fusion: stream fusion MLPs, null tokens, per-block branches.

    Args:
        cfg: the HFFM config.
        caption_channels: C, the backbone's caption input width (``caption_projection`` input).
        inner_dim: D, the backbone's width.
        num_layers: the number of transformer blocks (one branch pair per block).
    """

    def __init__(self, cfg: HFFMConfig, *, caption_channels: int, inner_dim: int, num_layers: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.caption_channels = caption_channels
        width = caption_channels if cfg.mode == "tokens" else cfg.branch_width
        self.anatomy = StreamFusion(
            cfg.anatomy_dim,
            cfg.hidden_dim,
            width,
            cfg.tokens_per_stream,
            cfg.prior_layernorm,
            cfg.standardize,
        )
        self.style = StreamFusion(
            cfg.style_dim, cfg.hidden_dim, width, cfg.tokens_per_stream, cfg.prior_layernorm, cfg.standardize
        )
        self.shared_null: nn.Parameter | None = None
        self.branches: nn.ModuleList | None = None
        self.text_proj: nn.Linear | None = None
        if cfg.mode != "tokens":
            self.shared_null = nn.Parameter(torch.empty(cfg.shared_null_tokens, caption_channels))
        if cfg.mode in ("separate", "hybrid"):
            self.branches = nn.ModuleList(
                nn.ModuleDict({name: StreamBranch(cfg.branch_width, inner_dim) for name in STREAMS})
                for _ in range(num_layers)
            )
        if self.uses_text:
            self.text_proj = nn.Linear(cfg.text_width, caption_channels)
        self.reset_parameters()

    def set_gates(self, value: float) -> None:
        """Set every stream branch's gate to ``value`` (``tanh(value)`` scales the branch output)."""
        if self.branches is not None:
            with torch.no_grad():
                for block in self.branches:
                    for branch in block.values():
                        branch.gate.fill_(value)

    def reset_parameters(self) -> None:
        """Initialise the parameters HFFM owns directly (the submodules init themselves)."""
        if self.shared_null is not None:
            nn.init.normal_(self.shared_null, std=0.02)
        if self.text_proj is not None:
            # Zero-initialised so the caption tokens start as a constant (no information) and the
            # pretrained backbone is not disturbed; the projection learns from there.
            nn.init.zeros_(self.text_proj.weight)
            nn.init.zeros_(self.text_proj.bias)

    @property
    def uses_text(self) -> bool:
        """Whether the caption's token sequence is an input (``hybrid`` and ``caption`` modes)."""
        return self.cfg.mode in ("hybrid", "caption")

    @property
    def uses_streams(self) -> bool:
        """Whether the anatomy and style vectors enter the transformer (every mode but ``caption``)."""
        return self.cfg.mode != "caption"

    def attach(self, backbone: nn.Module) -> None:
        """Install the branch processors on every block's cross-attention (no-op in ``tokens`` and
        ``caption`` modes).

        Args:
            backbone: the diffusers PixArt transformer whose ``transformer_blocks`` get branches.
        """
        if self.branches is None:
            return
        blocks = backbone.transformer_blocks
        if len(blocks) != len(self.branches):
            raise ValueError(
                f"HFFM has {len(self.branches)} branch pairs but the backbone has {len(blocks)} blocks"
            )
        for block, branches in zip(blocks, self.branches):
            block.attn2.set_processor(HFFMAttnProcessor(branches))

    def stream_tokens(
        self,
        t_a: torch.Tensor,
        t_s: torch.Tensor,
        drop_anatomy: torch.Tensor | None = None,
        drop_style: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Fuse both streams; dropped samples get the stream's null tokens.

        Args:
            t_a: (N, A) anatomy vectors.
            t_s: (N, S) style vectors.
            drop_anatomy: optional (N,) bool.
            drop_style: optional (N,) bool.

        Returns:
            ``{"anatomy": (N, K, W), "style": (N, K, W)}``.
        """
        return {"anatomy": self.anatomy(t_a, drop_anatomy), "style": self.style(t_s, drop_style)}

    def encoder_inputs(
        self,
        t_a: torch.Tensor,
        t_s: torch.Tensor,
        *,
        drop_anatomy: torch.Tensor | None = None,
        drop_style: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, dict[str, torch.Tensor]] | None]:
        """Build the backbone's caption input, its mask and the branch kwargs.

        Args:
            t_a: (N, A) anatomy vectors.
            t_s: (N, S) style vectors.
            drop_anatomy: optional (N,) bool, anatomy stream to null.
            drop_style: optional (N,) bool, style stream to null.
            text_tokens: optional (N, L, B) BERT token sequence (``hybrid`` only).
            text_mask: optional (N, L) 1 = real token, 0 = padding.
            drop_text: optional (N,) bool, caption tokens to null (masked out).

        Returns:
            ``(encoder_hidden_states (N, L', C), encoder_attention_mask (N, L') or None,
            cross_attention_kwargs or None)`` for ``PixArtTransformer2DModel.forward``.
        """
        n = t_a.shape[0]
        if self.cfg.mode == "caption" and text_tokens is None:
            raise ValueError("hffm.mode='caption' conditions on the caption's tokens alone: pass text_tokens")
        streams = self.stream_tokens(t_a, t_s, drop_anatomy, drop_style) if self.uses_streams else None
        if self.cfg.mode == "tokens":
            if text_tokens is not None:
                raise ValueError(
                    "text_tokens are only used in hffm.mode='hybrid' or 'caption' (mode is 'tokens')"
                )
            tokens = torch.cat([streams["anatomy"], streams["style"]], dim=1)  # (N, 2K, C)
            return tokens, None, None

        shared_null = self.shared_null
        if shared_null is None:  # unreachable: separate/hybrid always build it
            raise RuntimeError("HFFM was built without shared null tokens")
        null = shared_null.expand(n, -1, -1)  # (N, n0, C)
        kwargs = {"ip_hidden_states": streams} if streams is not None else None
        if text_tokens is None:
            return null, None, kwargs
        if self.text_proj is None:
            raise ValueError(
                f"text_tokens are only used in hffm.mode='hybrid' or 'caption' (mode is '{self.cfg.mode}'); pass None"
            )
        if text_tokens.ndim != 3 or text_tokens.shape[0] != n or text_tokens.shape[2] != self.cfg.text_width:
            raise ValueError(
                f"text_tokens must have shape (N={n}, L, {self.cfg.text_width}), got {tuple(text_tokens.shape)}"
            )
        text = self.text_proj(text_tokens.to(self.text_proj.weight.dtype))  # (N, L, C)
        seq = torch.cat([null.to(text.dtype), text], dim=1)  # (N, n0 + L, C)
        keep = (
            torch.ones(text.shape[:2], device=text.device, dtype=torch.bool)
            if text_mask is None
            else text_mask.to(device=text.device).bool()
        )  # (N, L)
        if drop_text is not None:
            keep = keep & ~drop_text.to(device=text.device).view(-1, 1)
        mask = torch.cat([torch.ones(n, null.shape[1], device=text.device, dtype=torch.bool), keep], dim=1)
        return seq, mask.to(text.dtype), kwargs  # (N, n0 + L, C), (N, n0 + L)

    def num_parameters(self) -> int:
        """Parameters HFFM adds to the backbone."""
        return sum(p.numel() for p in self.parameters())
