"""Exponential moving average of the trained parameters, swapped in for sampling.

Only the parameters that require grad when the EMA is created are tracked (LoRA adapters and
HFFM in ``lora`` mode; the whole backbone and HFFM in ``full`` mode): the frozen base weights
never change, so averaging them would only cost memory. Shadows are kept in float32 whatever
the model's dtype, so that a decay such as 0.9999 is not rounded away in bfloat16.

Update rule, with ``d = decay`` (or ``min(decay, (1 + n) / (10 + n))`` during warm-up, n the
number of updates so far)::

    shadow <- d * shadow + (1 - d) * param
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """EMA of a model's trainable parameters.

    Args:
        model: the model whose ``requires_grad`` parameters are averaged.
        decay: the decay ``d`` in ``[0, 1)``.
        warmup: use ``min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by the
            random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }
        if not self.shadow:
            raise ValueError("EMA: the model has no trainable parameters to average")

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [n for n in self.shadow if n not in params]
        if missing:
            raise KeyError(f"EMA tracks parameters the model lacks: {missing[:5]}")
        return {n: params[n] for n in self.shadow}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every shadow towards the model's current value (call after ``optimizer.step()``)."""
        d = self.current_decay()
        for name, p in self._params(model).items():
            s = self.shadow[name]
            s.lerp_(p.detach().to(device=s.device, dtype=s.dtype), 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's tracked parameters with the averages."""
        for name, p in self._params(model).items():
            p.copy_(self.shadow[name].to(device=p.device, dtype=p.dtype))

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averages into ``model`` (e.g. for sampling); restore on exit."""
        params = self._params(model)
        backup = {n: p.detach().clone() for n, p in params.items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadows (e.g. to the model's device)."""
        self.shadow = {n: s.to(device) for n, s in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state: decay, warm-up flag, update count and the shadow tensors."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {n: s.clone() for n, s in self.shadow.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the tracked names must match."""
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            extra = sorted(set(shadow) - set(self.shadow))[:5]
            missing = sorted(set(self.shadow) - set(shadow))[:5]
            raise KeyError(f"EMA state does not match the model: unexpected {extra}, missing {missing}")
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
        self.shadow = {
            n: shadow[n].to(device=self.shadow[n].device, dtype=torch.float32).clone() for n in self.shadow
        }
