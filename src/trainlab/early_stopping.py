"""Best-metric tracking and early stopping: a small state machine fed one value per epoch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class EarlyStopping:
    monitor: str = "val/loss"
    mode: str = "min"
    patience: int = 10
    min_delta: float = 0.0
    enabled: bool = True
    best: float = math.nan  # nan until the first finite value
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the last improvement

    def improves(self, value: float) -> bool:
        """A finite value better than the best by more than min_delta (any finite value beats none)."""
        if not math.isfinite(value):
            return False
        if math.isnan(self.best):
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float, epoch: int) -> bool:
        """Record the epoch's value; True when it is the new best."""
        if self.improves(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.enabled and self.bad_epochs >= self.patience

    def reason(self) -> str:
        return (f"early stopping: {self.monitor} did not improve by more than {self.min_delta:g} for "
                f"{self.bad_epochs} epoch{'' if self.bad_epochs == 1 else 's'} (best {self.best:.4g} at epoch "
                f"{self.best_epoch})")

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key in ("best", "best_epoch", "bad_epochs"):
            setattr(self, key, state[key])
