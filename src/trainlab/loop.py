"""The training loop: train_one_epoch and evaluate. Metrics stay on the device until an interval ends."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EpochResult:
    loss: float  # mean training loss over the epoch's examples
    acc: float
    step: int  # global optimizer step at the end of the epoch


@dataclass
class StepParts:
    """What one optimizer step does besides forward/backward, built once before the loop.

    penalty: the regularization term added to the loss (l1/l2), or None
    clip: gradient clipping after backward, or None
    after_step: called after every optimizer step (weight averaging), or None
    closure_step: pass the closure to optimizer.step (LBFGS re-evaluates the loss itself)
    """

    penalty: Callable[[], torch.Tensor] | None = None
    clip: Callable[[], None] | None = None
    after_step: Callable[[], None] | None = None
    closure_step: bool = False


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    autocast: AbstractContextManager,
    step: int,
    every_n_steps: int,
    on_interval: Callable[[int, float, float], None],
    parts: StepParts = StepParts(),
) -> EpochResult:
    """One pass over `batches`; calls on_interval(step, mean loss, lr) every `every_n_steps` steps.

    The logged loss is the data loss (comparable with val/loss); the penalty is added only to the
    objective that is differentiated.
    """
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    interval_loss = torch.zeros((), device=device)
    seen = interval_steps = 0
    for images, labels in batches:
        out: dict[str, torch.Tensor] = {}

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                out["logits"] = model(images)
                out["loss"] = loss_fn(out["logits"], labels)
            objective = out["loss"] if parts.penalty is None else out["loss"] + parts.penalty()
            scaler.scale(objective).backward()
            if parts.clip is not None:
                parts.clip()
            return objective

        if parts.closure_step:
            optimizer.step(closure)
        else:
            closure()
            scaler.step(optimizer)
        scaler.update()
        if parts.after_step is not None:
            parts.after_step()
        logits, loss = out["logits"], out["loss"]
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used
        scheduler.step()
        step += 1

        loss = loss.detach()
        loss_sum += loss * labels.shape[0]
        interval_loss += loss
        correct += (logits.argmax(dim=1) == labels).sum()
        seen += labels.shape[0]
        interval_steps += 1
        if step % every_n_steps == 0:
            on_interval(step, (interval_loss / interval_steps).item(), lr)  # the only host sync of a step
            interval_loss.zero_()
            interval_steps = 0
    if seen == 0:
        raise ValueError("the training split yields no batch; lower data.batch_size")
    return EpochResult(loss=(loss_sum / seen).item(), acc=(correct.float() / seen).item(), step=step)


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             autocast: AbstractContextManager) -> dict[str, float]:
    """Mean cross-entropy and accuracy of `model` in eval mode (running norm statistics, no dropout)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for images, labels in batches:
        with autocast:
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(dim=1) == labels).sum()
        seen += labels.shape[0]
    return {"loss": (loss_sum / seen).item(), "acc": (correct.float() / seen).item()}
