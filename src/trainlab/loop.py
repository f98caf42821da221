"""The training loop: train_one_epoch and evaluate. Metrics stay on the device until an interval ends."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
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
    grad_norm, weight_norm: scalars on the device, read with the losses of each logging interval (at its last step)
    """

    penalty: Callable[[], torch.Tensor] | None = None
    clip: Callable[[], None] | None = None
    after_step: Callable[[], None] | None = None
    closure_step: bool = False
    # guard(loss, step) after backward: False skips the optimizer step (a non-finite loss or gradient), or raises;
    # only for trainer.nonfinite_check=step: the interval check reads the interval's losses and weight_norm instead
    guard: Callable[[torch.Tensor, int], bool] | None = None
    # on_step(step, totals) after every step: mid-epoch checkpoints and stop signals (may raise to end the run)
    on_step: Callable[[int, EpochTotals], None] | None = None
    grad_norm: Callable[[], torch.Tensor] | None = None  # the global gradient L2 norm (train/grad_norm)
    # the weights' L2 norm: non-finite once a bad step reached them
    weight_norm: Callable[[], torch.Tensor] | None = None
    # the model's outputs live in CUDA-graph memory that the next step overwrites (compile mode reduce-overhead)
    copy_outputs: bool = False
    # torchrun: the element-wise sum over the processes (each trains an equal part of every batch), and their number
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    world: int = 1


@dataclass
class Interval:
    """What the loop reports every `every_n_steps` optimizer steps, read from the device at once."""

    step: int
    loss: float  # mean data loss over the interval's examples (a short last batch weighs its size, as in the epoch's)
    lrs: list[float]  # the learning rate each parameter group used at the interval's last step
    grad_norm: float | None = None  # global gradient L2 norm at the interval's last step (after clipping)
    weight_norm: float | None = None  # the weights' L2 norm after the interval's last step


@dataclass
class EpochTotals:
    """An epoch's running sums, kept on the host and filled without a kernel per step.

    A step is recorded as references to its loss, logits and targets (no device work); `fold` reduces the
    recorded steps in a handful of kernels and reads them in one transfer: once per logging interval, at
    the end of the epoch and before a mid-epoch checkpoint (which saves these sums). So monitoring costs
    the loop nothing per step on a GPU, where every kernel launch counts for small models. `nonfinite` is the
    first (step, loss) read that is NaN or infinite: the divergence check of trainer.nonfinite_check=interval.
    """

    loss_sum: float = 0.0  # sum over examples of the data loss
    correct: int = 0
    seen: int = 0
    interval_loss: float = 0.0  # sum over the current logging interval's examples of the data loss
    interval_steps: int = 0
    interval_seen: int = 0  # the interval's examples
    # the steps since the last fold, in order and one step apart: their losses, logits and targets (references to
    # device tensors)
    losses: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    copy_outputs: bool = False  # CUDA-graph replays overwrite their outputs: keep copies of the logits
    # torchrun: each fold sums what the ranks read (every rank then holds the whole batch's numbers); world ranks
    # train equal parts of each batch
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    world: int = 1
    last_step: int = 0  # the global step of the last recorded step
    nonfinite: tuple[int, float] | None = None

    def record(self, step: int, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.losses.append(loss.detach())
        logits = logits.detach()
        self.outputs.append(logits.clone() if self.copy_outputs else logits)
        self.targets.append(targets)
        self.seen += targets.shape[0] * self.world
        self.interval_steps += 1
        self.last_step = step

    def fold(self, *extra: torch.Tensor) -> list[float]:
        """Add the recorded steps to the sums (one read from the device); returns the values of `extra` (0-dim
        tensors), read in the same transfer.

        Six kernels and one read, whatever the number of steps: on a CPU each kernel costs several microseconds.
        The predictions are max(dim=1).indices, the first maximum like argmax(dim=1) but 5x faster on a CPU for
        a few classes (torch 2.14); one stack reads the losses, the hits and `extra` together."""
        count = len(self.losses)
        if count == 0:
            return self._read(torch.stack(extra).float(), hits_at=None) if extra else []
        targets = torch.cat(self.targets)
        labels = targets if targets.ndim == 1 else targets.max(dim=1).indices  # soft (mixed) targets: the top class
        hits = (torch.cat(self.outputs).max(dim=1).indices == labels).sum()
        if self.losses[0].dtype not in (torch.float32, torch.float64):
            hits = hits.float()  # the stack takes the widest float: half precision would round the count
        values = self._read(torch.stack([*self.losses, hits, *extra]), hits_at=count)  # exact hits below 2**24
        step_losses = values[:count]
        interval = sum(loss * t.shape[0] for loss, t in zip(step_losses, self.targets))
        self.loss_sum += interval * self.world
        self.interval_loss += interval
        self.interval_seen += sum(t.shape[0] for t in self.targets)
        if self.nonfinite is None and not math.isfinite(interval):  # find the first non-finite step
            first = self.last_step - count + 1
            self.nonfinite = next(((first + i, loss) for i, loss in enumerate(step_losses)
                                   if not math.isfinite(loss)), None)
        self.correct += round(values[count])
        for kept in (self.losses, self.outputs, self.targets):
            kept.clear()
        return values[count + 1:]

    def _read(self, values: torch.Tensor, hits_at: int | None) -> list[float]:
        """`values` (step losses, hits at index `hits_at`, extras) on the host. Under torchrun they are summed over
        the ranks first; the hits stay a sum, the rest (batch means, and norms that are the same on every rank)
        become the ranks' mean: with equal parts of every batch, the whole batch's."""
        if self.reduce is None:
            return values.tolist()
        summed = self.reduce(values).tolist()
        return [v if i == hits_at else v / self.world for i, v in enumerate(summed)]

    def state_dict(self) -> dict[str, Any]:
        self.fold()
        return {"loss_sum": self.loss_sum, "correct": self.correct, "interval_loss": self.interval_loss,
                "seen": self.seen, "interval_steps": self.interval_steps, "interval_seen": self.interval_seen}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochTotals:
        if "interval_seen" not in state:  # its interval_loss summed step means: the interval's point averages the
            state = {**state, "interval_loss": 0.0, "interval_seen": 0}  # steps after the resume only
        return cls(float(state["loss_sum"]), int(state["correct"]), int(state["seen"]),
                   float(state["interval_loss"]), int(state["interval_steps"]), int(state["interval_seen"]))


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
    on_interval: Callable[[Interval], None],
    parts: StepParts = StepParts(),
    totals: EpochTotals | None = None,
) -> EpochResult:
    """One pass over `batches`; calls on_interval(Interval) every `every_n_steps` steps of the epoch and after its last,
    so every epoch ends with a point (a shorter interval where the epoch is not a multiple of every_n_steps).

    The logged loss is the data loss (comparable with val/loss); the penalty is added only to the
    objective that is differentiated. `totals` continues an epoch resumed from a mid-epoch checkpoint.
    """
    model.train()
    totals = totals if totals is not None else EpochTotals()
    totals.copy_outputs, totals.reduce, totals.world = parts.copy_outputs, parts.reduce, parts.world
    penalty, clip, guard, after_step, on_step = parts.penalty, parts.clip, parts.guard, parts.after_step, parts.on_step
    closure_step = parts.closure_step
    scaling = scaler.is_enabled()  # fp16 only: elsewhere the scaler's three calls a step are skipped
    groups, rate = optimizer.param_groups, operator.itemgetter("lr")

    def forward_backward(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """zero_grad, forward, loss, backward (of the scaled objective) and clipping: (logits, loss, objective)."""
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = model(images)
            loss = loss_fn(logits, labels)
        objective = loss if penalty is None else loss + penalty()
        (scaler.scale(objective) if scaling else objective).backward()
        if clip is not None:
            clip()
        return logits, loss, objective

    lrs = list(map(rate, groups))
    stepped = False  # whether this process took a step of the epoch (a resume may come at its very end)
    for images, labels in batches:
        if closure_step:  # the optimizer evaluates the loss as often as it needs; the last evaluation counts
            evaluations: list[tuple[torch.Tensor, ...]] = []

            def closure() -> torch.Tensor:
                evaluations.append(forward_backward(images, labels))
                if parts.reduce is None:
                    return evaluations[-1][2]
                # torchrun: the line search reads the whole batch's objective, the same on every rank
                return parts.reduce(evaluations[-1][2].detach().clone()) / parts.world

            optimizer.step(closure)
            logits, loss, _ = evaluations[-1]
            if guard is not None:  # the optimizer stepped inside; the run saves no non-finite weights
                guard(loss, step + 1)
        else:
            logits, loss, _ = forward_backward(images, labels)
            if guard is not None and not guard(loss, step + 1):
                optimizer.zero_grad(set_to_none=True)  # a skipped non-finite step: no update, not counted
                if scaling and clip is not None:  # clip's unscale_ opened the scaler's step: close it (backing off)
                    scaler.update()
                continue
            if scaling:
                scaler.step(optimizer)
            else:
                optimizer.step()
        if scaling:
            scaler.update()
        if after_step is not None:
            after_step()
        lrs = list(map(rate, groups))  # the rates this step used
        scheduler.step()
        step += 1
        stepped = True

        totals.record(step, loss, logits, labels)
        if totals.interval_steps == every_n_steps:
            on_interval(_read_interval(step, totals, lrs, parts))  # the only host sync of a step
        if on_step is not None:
            on_step(step, totals)
    if totals.seen == 0:
        raise ValueError("the training split yields no batch; lower data.batch_size")
    if totals.interval_steps > 0:  # without a step here, no gradient to measure: the interval's loss only
        on_interval(_read_interval(step, totals, lrs, parts if stepped else replace(parts, grad_norm=None)))
    totals.fold()
    return EpochResult(loss=totals.loss_sum / totals.seen, acc=totals.correct / totals.seen, step=step)


def _read_interval(step: int, totals: EpochTotals, lrs: list[float], parts: StepParts) -> Interval:
    """The interval's mean loss (over its examples), and the gradient and weight norms of its last step, in one read
    from the device."""
    grad = [parts.grad_norm()] if parts.grad_norm is not None else []
    weights = [parts.weight_norm()] if parts.weight_norm is not None else []
    values = totals.fold(*grad, *weights)
    interval = Interval(step, totals.interval_loss / totals.interval_seen, lrs,
                        grad_norm=values[0] if grad else None, weight_norm=values[-1] if weights else None)
    totals.interval_loss, totals.interval_steps, totals.interval_seen = 0.0, 0, 0
    return interval


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             autocast: AbstractContextManager,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             num_classes: int | None = None) -> dict[str, float]:
    """Mean cross-entropy, accuracy and balanced accuracy (the mean of the classes' recalls, over the classes the
    split holds) of `model` in eval mode (running norm statistics, no dropout); under torchrun `reduce` sums the
    ranks' parts of the split, and `num_classes` must be given (a rank may hold no example). One read at the end."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    # outcomes[2c + 1]: class c's examples predicted right, outcomes[2c]: wrong (one bincount a batch)
    outcomes = None if num_classes is None else torch.zeros(2 * num_classes, device=device, dtype=torch.long)
    for images, labels in batches:
        with autocast:
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        if outcomes is None:
            outcomes = torch.zeros(2 * logits.shape[1], device=device, dtype=torch.long)
        right = logits.argmax(dim=1) == labels
        outcomes += torch.bincount(labels * 2 + right, minlength=len(outcomes))
    if outcomes is None:
        raise ValueError("evaluate: no batch to evaluate")
    values = torch.cat([loss_sum.float().view(1), outcomes.float()])  # counts exact below 2**24 a class
    values = (reduce(values) if reduce is not None else values).tolist()
    loss, hits, wrong = values[0], values[2::2], values[1::2]
    seen = sum(hits) + sum(wrong)
    recalls = [h / (h + w) for h, w in zip(hits, wrong) if h + w > 0]
    return {"loss": loss / seen, "acc": sum(hits) / seen, "balanced_acc": sum(recalls) / len(recalls)}
