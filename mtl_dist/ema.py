"""Exponential moving average of the trainable weights, kept in fp32 beside the model."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for n, p in model.named_parameters()
                       if p.requires_grad]

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = [p.detach().float() for p in self._params(model)]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    @contextmanager
    def applied(self, model: nn.Module):
        """Temporarily put the EMA weights into the model (for evaluation and best saves)."""
        params = self._params(model)
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow, strict=True):
                p.copy_(s.to(p.dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": dict(zip(self.names, self.shadow, strict=True))}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks parameters: {sorted(missing)[:3]}")
        self.decay = state["decay"]
        self.shadow = [state["shadow"][n].to(s.device, torch.float32).clone()
                       for n, s in zip(self.names, self.shadow, strict=True)]
