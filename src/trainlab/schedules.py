"""Learning-rate schedules: pure functions of training progress, stepped once per optimizer step."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from trainlab.config import ConfigError


def constant(progress: float) -> float:
    return 1.0


def cosine(progress: float, min_lr_fraction: float = 0.0) -> float:
    """Half a cosine from 1 at progress 0 to min_lr_fraction at progress 1."""
    return min_lr_fraction + (1.0 - min_lr_fraction) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


SCHEDULES: dict[str, Callable[..., float]] = {"none": constant, "cosine": cosine}


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: Callable[[float], float]) -> float:
    """The multiplier of the base learning rate used at optimizer step `step` (0-based).

    1) linear warmup: (step + 1) / warmup_steps for the first warmup_steps steps
    2) then the schedule, with progress running from 0 after warmup to 1 at total_steps
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return schedule((step - warmup_steps) / max(1, total_steps - warmup_steps))


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    max_epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that follows cfg.scheduler per optimizer step over max_epochs * steps_per_epoch steps."""
    options: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    name = options.pop("name")
    warmup_epochs = float(options.pop("warmup_epochs", 0))
    if name not in SCHEDULES:
        raise ConfigError(f"scheduler={name!r} is not a schedule; choose one of {', '.join(SCHEDULES)}")
    total = steps_per_epoch * max_epochs
    warmup = round(warmup_epochs * steps_per_epoch)
    if warmup < 0 or warmup >= total:
        raise ConfigError(f"scheduler.warmup_epochs={warmup_epochs} must be >= 0 and shorter than the run "
                          f"(trainer.max_epochs={max_epochs})")
    schedule = partial(SCHEDULES[name], **options)
    try:
        schedule(0.0)
    except TypeError as error:
        raise ConfigError(f"scheduler={name}: {error}") from None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, total_steps=total, warmup_steps=warmup,
                                                                 schedule=schedule))
