"""FTRL-Proximal (McMahan et al. 2013, "Ad Click Prediction: a View from the Trenches") as a torch optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class FTRL(torch.optim.Optimizer):
    """Follow The Regularized Leader, proximal form, with per-coordinate learning rates.

    Per coordinate, with gradient g and the current weight w (the paper's Algorithm 1, vectorised
    over each parameter tensor):

        sigma = (beta + sqrt(n + g^2)) / alpha - (beta + sqrt(n)) / alpha_prev
        z    += g - sigma * w
        n    += g^2
        w     = 0                                                    if |z| <= lambda1
              = -(z - sign(z) * lambda1) / ((beta + sqrt(n)) / alpha + lambda2)   otherwise

    `lr` is the paper's alpha (the per-coordinate rate is alpha / (beta + sqrt(n))). lambda1 sets
    weights exactly to zero (sparsity); lambda2 is an L2 penalty. The state per parameter is z, n and
    alpha, the lr of its last step: the paper's sigmas add up to 1 / (this step's rate), so a schedule
    that changes the lr (alpha_prev != alpha) changes the rate from here on and leaves the weights where
    they are (a sigma computed with this step's alpha alone rescaled every weight by alpha / alpha_prev).

    Start: n = initial_accumulator_value, and z is the value for which the closed form above gives
    back the model's initial weights, z = -(w0 * ((beta + sqrt(n)) / alpha + lambda2) + sign(w0) * lambda1).
    For the paper's logistic regression (w0 = 0) that is its z = 0. For a network it keeps the
    initialization: with z = 0 the first step would set every weight to about -alpha * g (batch-norm
    gains to ~0, and training stalls), while from this z, FTRL-Proximal with lambda1 = lambda2 = 0 is
    exactly per-coordinate online gradient descent from w0, w -= alpha * g / (beta + sqrt(n)), the
    equivalence the paper starts from.

    Relative to Keras/TF `Ftrl`: the learning-rate power is fixed at the paper's -0.5, Keras's
    `l2_regularization_strength` enters twice (2 * l2) where lambda2 enters once, Keras defaults to
    initial_accumulator_value=0.1 and beta=0, TF starts z at 0, and there is no l2 shrinkage.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, beta: float = 1.0, lambda1: float = 0.0,
                 lambda2: float = 0.0, initial_accumulator_value: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f"Invalid learning rate (alpha): {lr}; must be > 0")
        if beta < 0 or lambda1 < 0 or lambda2 < 0 or initial_accumulator_value < 0:
            raise ValueError(f"beta, lambda1, lambda2 and initial_accumulator_value must be >= 0; got {beta}, "
                             f"{lambda1}, {lambda2}, {initial_accumulator_value}")
        defaults = {"lr": lr, "beta": beta, "lambda1": lambda1, "lambda2": lambda2,
                    "initial_accumulator_value": initial_accumulator_value}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            alpha, beta, l1, l2 = group["lr"], group["beta"], group["lambda1"], group["lambda2"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad
                if g.is_sparse:
                    raise RuntimeError("FTRL does not support sparse gradients")
                state = self.state[w]
                if not state:
                    n0 = torch.full_like(w, group["initial_accumulator_value"], memory_format=torch.preserve_format)
                    state["z"] = -(w * ((beta + n0.sqrt()) / alpha + l2) + w.sign() * l1)  # gives back w
                    state["n"] = n0
                z, n = state["z"], state["n"]
                alpha_prev = state.get("alpha", alpha)  # (a state saved before alpha was kept: its group's lr)
                n_new = n + g * g
                sigma = (n_new.sqrt() - n.sqrt()) / alpha + (beta + n.sqrt()) * (1.0 / alpha - 1.0 / alpha_prev)
                state["alpha"] = float(alpha)
                z.add_(g - sigma * w)
                n.copy_(n_new)
                new_w = -(z - z.sign() * l1) / ((beta + n.sqrt()) / alpha + l2)
                w.copy_(torch.where(z.abs() <= l1, torch.zeros_like(new_w), new_w))
        return loss
