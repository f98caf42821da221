"""Schemas of the trainlab-owned config nodes, and validation of a composed config before anything runs."""

from __future__ import annotations

import re
import types
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ALLOWED_TARGET_PREFIXES = ("torch.", "torchvision.", "trainlab.")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MONITORS = ("val/loss", "val/acc", "train/loss", "train/acc")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and the fix."""


# --- schemas ---------------------------------------------------------------------------------------
# Each option file of these groups starts from its schema (`- /schema_<group>@_here_` in its defaults
# list), so a misspelt key or a value of the wrong type fails while Hydra composes, before any work.


@dataclass
class DataConfig:
    name: str = "???"
    batch_size: int = 64  # examples per optimizer step
    eval_batch_size: int = 1024  # examples per forward pass at validation and test time
    val_fraction: float = 0.1  # share of the training split held out for validation
    split_seed: int = "${seed}"  # type: ignore[assignment]  # seeds the validation split
    drop_last: bool = True  # drop the last, smaller training batch of each epoch
    # [[epoch, factor], ...]: from that (1-based) epoch on, the training batch size is multiplied by factor,
    # cumulatively; [] = off. "Don't decay the learning rate, increase the batch size" (Smith et al. 2018)
    batch_size_schedule: List[Any] = field(default_factory=list)


@dataclass
class DigitsConfig(DataConfig):
    name: str = "digits"
    test_fraction: float = 0.2  # share of all 1797 images held out as the test split (fixed, not seeded)


@dataclass
class SyntheticConfig(DataConfig):
    name: str = "synthetic"
    num_samples: int = 4096  # images in train + validation + test
    shape: list = field(default_factory=lambda: [3, 32, 32])  # channels, height, width
    num_classes: int = 10
    noise: float = 48.0  # std of the per-pixel noise around each class prototype, in uint8 levels
    test_fraction: float = 0.2
    seed: int = 0  # seeds the images themselves (not the split)


@dataclass
class TrainerConfig:
    max_epochs: int = 30
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16


@dataclass
class EarlyStoppingConfig:
    enabled: bool = True
    monitor: str = "val/loss"  # val/loss | val/acc | train/loss | train/acc
    mode: str = "min"  # min: lower is better; max: higher is better
    patience: int = 10  # epochs without improvement before stopping
    min_delta: float = 0.0  # smallest change that counts as an improvement


@dataclass
class CheckpointConfig:
    resume: Optional[str] = None  # null: start fresh | PATH to a last.pt to continue from
    every_n_epochs: int = 1  # write checkpoints/last.pt every N epochs (and always after the last)


@dataclass
class LoggerConfig:
    every_n_steps: int = 10  # optimizer steps per train/loss point (one host sync per interval)
    tensorboard: bool = True
    progress: str = "auto"  # auto: a live bar on a terminal, plain lines elsewhere | bar | lines


@dataclass
class AugmentationConfig:
    hflip: float = 0.0  # probability of flipping each training image left-right
    crop_padding: int = 0  # pixels of padding before a random crop back to full size; 0 = off
    crop_padding_mode: str = "zeros"  # zeros | reflect


@dataclass
class RegularizationConfig:
    dropout: float = 0.0  # probability of zeroing a unit (channel, in conv blocks) during training
    weight_decay: float = 0.0  # decoupled decay (AdamW-style): w -= lr * weight_decay * w each step
    l2: float = 0.0  # penalty l2 / 2 * sum(w^2) added to the loss (coupled: adaptive optimizers rescale it)
    l1: float = 0.0  # penalty l1 * sum(|w|) added to the loss
    label_smoothing: float = 0.0  # training targets: (1 - eps) * one-hot + eps / classes
    grad_clip_norm: Optional[float] = None  # rescale the gradient when its global L2 norm exceeds this
    grad_clip_value: Optional[float] = None  # clamp each gradient element to [-value, value]
    ema_decay: Optional[float] = None  # per-step decay of the weight average (e.g. 0.999); evaluated and saved
    swa_start: Optional[float] = None  # fraction of trainer.max_epochs after which SWA averages each epoch
    swa_lr: float = 0.01  # constant learning rate during the SWA epochs (absolute)


SCHEMAS = {
    "schema_data": DataConfig,
    "schema_data_digits": DigitsConfig,
    "schema_data_synthetic": SyntheticConfig,
    "schema_trainer": TrainerConfig,
    "schema_early_stopping": EarlyStoppingConfig,
    "schema_checkpoint": CheckpointConfig,
    "schema_logger": LoggerConfig,
    "schema_augmentation": AugmentationConfig,
    "schema_regularization": RegularizationConfig,
}


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore and register trainlab's resolvers (idempotent)."""
    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(name=name, node=node)
    if not OmegaConf.has_resolver("trainlab.slug"):
        OmegaConf.register_new_resolver("trainlab.slug", slug)


def slug(overrides: str, limit: int = 120) -> str:
    """A run-directory suffix from Hydra's override_dirname: `_` + overrides, safe as one path part."""
    if not overrides:
        return ""
    text = re.sub(r"[^A-Za-z0-9=,.+\-_\[\]]", "_", overrides)
    return "_" + (text if len(text) <= limit else text[: limit - 3] + "...")


# --- validation ------------------------------------------------------------------------------------


def validate(cfg: DictConfig) -> None:
    """Fail before any data or model is built, reporting every problem found at once."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid config: an interpolation cannot be resolved: {error}") from None
    problems = []
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        problems.append("missing values (set them on the command line, e.g. key=value): " + ", ".join(missing))
    # Walk the resolved tree: a _target_ produced by an interpolation (oc.create, ...) is checked too.
    problems += [f"_target_ at {path}: {why}" for path, why in _bad_targets(resolved)]
    if not missing:
        problems += _check_values(cfg)
        from trainlab.schedules import parse as parse_schedule  # torch is imported only once needed

        try:
            parse_schedule(cfg.scheduler)
        except ConfigError as error:
            problems.append(str(error))
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def check_target(target: Any) -> str | None:
    """Why `target` may not be built from a config, or None when it may.

    The name must start with an allowed package and must also resolve to an object defined there:
    `torch.os.system` starts with `torch.` but is `os.system`.
    """
    allowed = ", ".join(ALLOWED_TARGET_PREFIXES)
    if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PREFIXES):
        return f"{target!r} is not allowed; only objects under {allowed} may be built from a config"
    from hydra._internal.utils import _locate

    try:
        obj = _locate(target)
    except ImportError as error:
        return f"{target!r} cannot be found ({str(error).splitlines()[0]})"
    home = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
    if not isinstance(home, str) or not (home + ".").startswith(ALLOWED_TARGET_PREFIXES):
        return f"{target!r} is {home}.{getattr(obj, '__qualname__', '')}, which is outside {allowed}; not allowed"
    return None


def _bad_targets(node: Any, path: str = "") -> list[tuple[str, str]]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_" and value != "???":
                why = check_target(value)
                if why:
                    found.append((path or "<root>", why))
            else:
                found += _bad_targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += _bad_targets(item, f"{path}[{i}]")
    return found


def _check_values(cfg: DictConfig) -> list[str]:
    problems = []

    def check(ok: bool, key: str, value: Any, fix: str) -> None:
        if not ok:
            problems.append(f"{key}={value!r}: {fix}")

    data, trainer, stop = cfg.data, cfg.trainer, cfg.early_stopping
    check(data.batch_size >= 1, "data.batch_size", data.batch_size, "must be at least 1")
    check(data.eval_batch_size >= 1, "data.eval_batch_size", data.eval_batch_size, "must be at least 1")
    schedule = data.batch_size_schedule
    if len(schedule) > 0:
        pairs = OmegaConf.to_container(schedule)
        check(all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and p[0] >= 1
                  and isinstance(p[1], (int, float)) and p[1] > 0 for p in pairs), "data.batch_size_schedule",
              pairs, "give [[epoch, factor], ...] with epochs >= 1 and factors > 0, e.g. [[10,2],[20,2]]")
        check(cfg.scheduler.name in ("none", "plateau"), "data.batch_size_schedule", pairs,
              f"replaces a decaying learning rate, and scheduler={cfg.scheduler.name} counts steps of a fixed "
              "batch size; use scheduler=none (warmup allowed) or scheduler=plateau with it")
    check(0.0 < data.val_fraction < 1.0, "data.val_fraction", data.val_fraction, "must be between 0 and 1")
    if "test_fraction" in data:
        check(0.0 < data.test_fraction < 1.0, "data.test_fraction", data.test_fraction, "must be between 0 and 1")
    check(trainer.max_epochs >= 1, "trainer.max_epochs", trainer.max_epochs, "must be at least 1")
    check(bool(_DEVICE_PATTERN.match(trainer.device)), "trainer.device", trainer.device,
          "choose auto, cpu, cuda, cuda:N or mps")
    check(trainer.precision in PRECISIONS, "trainer.precision", trainer.precision,
          f"choose one of {', '.join(PRECISIONS)}")
    check(stop.monitor in MONITORS, "early_stopping.monitor", stop.monitor, f"choose one of {', '.join(MONITORS)}")
    check(stop.mode in ("min", "max"), "early_stopping.mode", stop.mode, "choose min or max")
    check(stop.patience >= 1, "early_stopping.patience", stop.patience, "must be at least 1 epoch")
    check(stop.min_delta >= 0, "early_stopping.min_delta", stop.min_delta, "must be >= 0")
    check(cfg.checkpoint.every_n_epochs >= 1, "checkpoint.every_n_epochs", cfg.checkpoint.every_n_epochs,
          "must be at least 1")
    check(cfg.logger.every_n_steps >= 1, "logger.every_n_steps", cfg.logger.every_n_steps, "must be at least 1")
    check(cfg.logger.progress in ("auto", "bar", "lines"), "logger.progress", cfg.logger.progress,
          "choose auto, bar or lines")
    check(0.0 <= cfg.regularization.dropout < 1.0, "regularization.dropout", cfg.regularization.dropout,
          "must be in [0, 1)")
    reg = cfg.regularization
    for key in ("weight_decay", "l1", "l2"):
        check(reg[key] >= 0, f"regularization.{key}", reg[key], "must be >= 0")
    check(0.0 <= reg.label_smoothing < 1.0, "regularization.label_smoothing", reg.label_smoothing,
          "must be in [0, 1)")
    for key in ("grad_clip_norm", "grad_clip_value"):
        check(reg[key] is None or reg[key] > 0, f"regularization.{key}", reg[key], "must be > 0, or null for off")
    check(reg.ema_decay is None or 0.0 < reg.ema_decay < 1.0, "regularization.ema_decay", reg.ema_decay,
          "must be in (0, 1), e.g. 0.999, or null for off")
    check(reg.swa_start is None or 0.0 <= reg.swa_start < 1.0, "regularization.swa_start", reg.swa_start,
          "is a fraction of the run in [0, 1), or null for off")
    check(reg.swa_lr > 0, "regularization.swa_lr", reg.swa_lr, "must be > 0")
    aug = cfg.augmentation
    check(0.0 <= aug.hflip <= 1.0, "augmentation.hflip", aug.hflip, "is a probability in [0, 1]")
    check(aug.crop_padding >= 0, "augmentation.crop_padding", aug.crop_padding, "must be >= 0 pixels")
    check(aug.crop_padding_mode in ("zeros", "reflect"), "augmentation.crop_padding_mode",
          aug.crop_padding_mode, "choose zeros or reflect")
    return problems
