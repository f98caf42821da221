"""Adam and AdamW without bias correction (`optimizer.bias_correction=false`): the moments are used as they are."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class UncorrectedAdam(torch.optim.Optimizer):
    """Adam (Kingma & Ba 2015) without the division of its moments by 1 - beta1^t and 1 - beta2^t.

    Per coordinate, with gradient g at step t (the course notes' loop with first_unbias = first_moment and
    second_unbias = second_moment), vectorised over each parameter group with torch's _foreach ops:

        g     = g + weight_decay * w             (L2 into the gradient, torch's Adam)
        w     = w * (1 - lr * weight_decay)      (instead, with decoupled_weight_decay: AdamW)
        m     = beta1 * m + (1 - beta1) * g
        v     = beta2 * v + (1 - beta2) * g^2
        v_max = max(v_max, v)                    (amsgrad: the denominator uses v_max instead of v)
        w     = w - lr * m / (sqrt(v) + eps)

    Both moments start at zero, so early on m is about (1 - beta1^t) g and sqrt(v) about sqrt(1 - beta2^t) |g|.
    Per unit normalised gradient the step is lr * (1 - beta1^t) / sqrt(1 - beta2^t), where torch's Adam takes lr:
    with betas (0.9, 0.999) 3.2 lr at the first step, about 6.6 lr near step 12, 3.2 lr at step 100, 1.26 lr at
    step 1000, lr in the limit. With these betas the second moment's bias is the larger one, so the start is faster,
    not slower; it is slower only where the first step's (1 - beta1) / sqrt(1 - beta2) is under 1 (betas
    (0.99, 0.999): 0.32 lr at step 1, 0.96 lr at step 10, then above lr as well).

    The state per parameter has torch's Adam's names: step, exp_avg, exp_avg_sq (and max_exp_avg_sq with amsgrad).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False,
                 decoupled_weight_decay: bool = False) -> None:
        if isinstance(lr, torch.Tensor) or not lr >= 0:
            raise ValueError(f"Invalid learning rate: {lr}; must be a number >= 0")
        if not eps >= 0:
            raise ValueError(f"Invalid epsilon value: {eps}; must be >= 0")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"Invalid betas: {betas}; two numbers in [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}; must be >= 0")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad,
                    "maximize": maximize, "decoupled_weight_decay": decoupled_weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                _update(group, params, [self._state(p, group["amsgrad"]) for p in params])
        return loss

    def _state(self, param: torch.Tensor, amsgrad: bool) -> dict[str, torch.Tensor]:
        """The parameter's moments, zero before its first step (created then, as torch's Adam does)."""
        if param.grad.is_sparse:
            raise RuntimeError("UncorrectedAdam does not support sparse gradients")
        if torch.is_complex(param):
            raise RuntimeError("UncorrectedAdam does not support complex parameters")
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state


class UncorrectedAdamW(UncorrectedAdam):
    """AdamW (Loshchilov & Hutter 2019) without bias correction: UncorrectedAdam with decoupled weight decay."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True)


def _update(group: dict[str, Any], params: list[torch.Tensor], states: list[dict[str, torch.Tensor]]) -> None:
    """One uncorrected Adam step of `params` (those with a gradient) of `group`, their states updated in place."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    grads = [p.grad for p in params]
    if group["maximize"]:
        grads = torch._foreach_neg(grads)
    if wd != 0:
        if group["decoupled_weight_decay"]:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        else:
            grads = torch._foreach_add(grads, params, alpha=wd)  # a new list: the .grad tensors stay as they were
    exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    torch._foreach_add_([s["step"] for s in states], 1.0)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)  # m + (1 - beta1)(g - m) = beta1 m + (1 - beta1) g
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    if group["amsgrad"]:
        maxima = [s["max_exp_avg_sq"] for s in states]
        torch._foreach_maximum_(maxima, exp_avg_sqs)
        denominators = torch._foreach_sqrt(maxima)
    else:
        denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denominators, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denominators, -lr)
