"""The training loop: train_one_epoch and evaluate. Metrics stay on the device until an interval ends."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EpochResult:
    loss: float  # mean training loss over the epoch's examples
    acc: float
    step: int  # global optimizer step at the end of the epoch


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    autocast: AbstractContextManager,
    step: int,
    every_n_steps: int,
    on_interval: Callable[[int, float, float], None],
) -> EpochResult:
    """One pass over `batches`; calls on_interval(step, mean loss, lr) every `every_n_steps` steps."""
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    interval_loss = torch.zeros((), device=device)
    seen = interval_steps = 0
    for images, labels in batches:
        with autocast:
            logits = model(images)
            loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
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
