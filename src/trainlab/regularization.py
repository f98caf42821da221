"""Regularizers the loop applies: loss penalties, gradient clipping, and weight averaging (EMA, SWA)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def penalty(params: list[nn.Parameter], l1: float, l2: float) -> Callable[[], torch.Tensor] | None:
    """The loss penalty l1 * sum|w| + l2 / 2 * sum w^2 over `params`, or None when both are zero.

    Its gradient adds l1 * sign(w) + l2 * w to each weight's gradient: coupled to the gradient, so
    adaptive optimizers rescale it (unlike decoupled weight decay).
    """
    if (l1 == 0 and l2 == 0) or not params:
        return None

    def value() -> torch.Tensor:
        total = torch.zeros((), device=params[0].device)
        if l1 != 0:
            total = total + l1 * torch.stack(torch._foreach_norm(params, 1)).sum()
        if l2 != 0:
            total = total + 0.5 * l2 * torch.stack(torch._foreach_norm(params, 2)).pow(2).sum()
        return total

    return value


def gradient_clipper(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     max_norm: float | None, max_value: float | None) -> Callable[[], None] | None:
    """Clip gradients after backward: the global L2 norm to max_norm, then each element to +-max_value."""
    if max_norm is None and max_value is None:
        return None

    def clip() -> None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones (a no-op without fp16)
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if max_value is not None:
            torch.nn.utils.clip_grad_value_(params, max_value, foreach=True)

    return clip


class EMA(nn.Module):
    """Polyak averaging: after each step, avg = decay * avg + (1 - decay) * w, buffers such as batch-norm
    statistics averaged alike (integer buffers copied); the first update copies the weights.

    Unlike torch's AveragedModel, the update count is a Python integer (saved as extra state), so an
    update never reads a device tensor back to the host: no synchronisation per step.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.decay, self.warmup = decay, warmup
        self.n_averaged = 0
        for p in self.module.parameters():
            p.requires_grad_(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
        floats = [(a, b) for a, b in zip(mine, theirs) if a.is_floating_point()]
        if self.n_averaged == 0:
            torch._foreach_copy_(mine, theirs)
        elif floats:
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1.0 - self.decay_now())
            for a, b in zip(mine, theirs):
                if not a.is_floating_point():
                    a.copy_(b)
        self.n_averaged += 1

    def decay_now(self) -> float:
        """The decay of the next update: `decay`, or with warmup min(decay, (1 + n) / (10 + n)) after n updates, so
        that the first weights' share fades within the first few hundred steps whatever the decay."""
        n = self.n_averaged
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def get_extra_state(self) -> dict[str, int]:
        return {"n_averaged": self.n_averaged}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.n_averaged = int(state["n_averaged"])


def ema_model(model: nn.Module, decay: float, warmup: bool = False) -> EMA:
    """The exponential moving average of `model`'s weights with per-step `decay` (see EMA)."""
    return EMA(model, decay, warmup)


def swa_model(model: nn.Module) -> AveragedModel:
    """Stochastic weight averaging: the equal-weight mean of the weights at each averaged epoch's end."""
    return AveragedModel(model)


def first_swa_epoch(swa_start: float, max_epochs: int) -> int:
    """The first (1-based) epoch averaged when averaging starts after a fraction swa_start of the run."""
    return math.floor(round(swa_start * max_epochs, 9)) + 1  # 0.29 x 100 is 28.999999999999996 in floating point
