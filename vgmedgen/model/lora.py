"""LoRA on the PixArt backbone, through peft and diffusers' own adapter API.

One function, :func:`apply_lora`, with a tested contract (tests/test_lora.py):

1. exactly the modules named by the target list get an adapter (peft's suffix matching: a
   target ``proj`` matches ``pos_embed.proj`` and ``ff.net.0.proj``), and a target that matches
   nothing is an error, not a silent no-op;
2. afterwards only adapter parameters require grad in the backbone (the caller adds HFFM's);
3. merging the adapter into the base weights leaves the output unchanged.

The adapter is injected with ``PeftAdapterMixin.add_adapter``, so it saves with
``save_lora_adapter`` in the format diffusers loads with ``load_lora_adapter(dir, prefix=None)``.
Reference (hx111/VG-MedGen, train_medart_lora_text_projection1.py): r=8, alpha=8, Gaussian
init, targets q/k/v/out of both attentions, the feed-forward, the patch embedding, ``proj_out``,
the adaLN-single linear, the timestep embedder and the caption projection (about 6.9 M
parameters on PixArt-XL-2-512x512).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from torch import nn

from vgmedgen.model.configbase import ConfigError, StrictConfig

__all__ = [
    "LORA_ADAPTER_NAME",
    "LORA_WEIGHT_NAME",
    "REFERENCE_LORA_TARGETS",
    "LoraSettings",
    "apply_lora",
    "lora_module_names",
]

LORA_ADAPTER_NAME = "default"
# diffusers' default file name for save_lora_adapter; load_lora_adapter needs it spelled out
# (without weight_name it looks for the pickle variant first).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

# The reference's list minus "proj_in", which PixArtTransformer2DModel does not have (it would
# match nothing). Suffix semantics: "proj" -> pos_embed.proj (patch embedding) and the
# feed-forward's ff.net.0.proj; "linear" -> adaln_single.linear; "linear_1"/"linear_2" -> the
# timestep embedder and the caption projection.
REFERENCE_LORA_TARGETS: tuple[str, ...] = (
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "proj",
    "linear",
    "linear_1",
    "linear_2",
)


class LoraSettings(StrictConfig):
    """LoRA hyper-parameters (used when ``generator.train == 'lora'``).

    Attributes:
        r: rank.
        alpha: scale numerator; the update is ``(alpha / r) * B A``.
        dropout: dropout on the adapter input.
        target_modules: module-name suffixes that get adapters (peft semantics).
        init: ``gaussian`` (reference: A ~ N(0, 1/r)) or ``kaiming`` (peft default); B is zero in both.
    """

    r: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = REFERENCE_LORA_TARGETS
    init: Literal["gaussian", "kaiming"] = "gaussian"

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(
                "at least one target module is needed; the reference list is REFERENCE_LORA_TARGETS"
            )
        return v


def _matches(module_name: str, target: str) -> bool:
    """peft's rule: the full name equals the target or ends with ``.target``."""
    return module_name == target or module_name.endswith("." + target)


def lora_module_names(model: nn.Module) -> list[str]:
    """Names of the modules that carry a peft LoRA adapter, sorted."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sorted(name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer))


def apply_lora(backbone: nn.Module, cfg: LoraSettings) -> list[str]:
    """Freeze the backbone and inject one LoRA adapter into the named modules.

    Args:
        backbone: a diffusers model with ``PeftAdapterMixin`` (e.g. ``PixArtBackbone``).
        cfg: LoRA settings.

    Returns:
        The sorted names of the modules that got an adapter.

    Raises:
        ConfigError: a target matches no module of the backbone (a typo in the list).
    """
    from peft import LoraConfig

    names = [n for n, _ in backbone.named_modules() if n]
    unmatched = [t for t in cfg.target_modules if not any(_matches(n, t) for n in names)]
    if unmatched:
        raise ConfigError(
            f"generator.lora.target_modules: {unmatched} match no module of {type(backbone).__name__}; "
            f"use names such as {list(REFERENCE_LORA_TARGETS)}"
        )
    backbone.requires_grad_(False)
    peft_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
    )
    backbone.add_adapter(peft_cfg, adapter_name=LORA_ADAPTER_NAME)
    # peft creates adapter weights with requires_grad=True; make the contract explicit anyway.
    for name, p in backbone.named_parameters():
        p.requires_grad_(".lora_" in name)
    return lora_module_names(backbone)
