"""The optimizer: parameter groups (decayed or not) and decoupled weight decay as a step pre-hook."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trainlab.config import ConfigError

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def parameter_groups(model: nn.Module, decay_norm_and_bias: bool) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed): biases and normalization parameters are not decayed unless asked."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            exempt = name == "bias" or isinstance(module, _NORM_TYPES)
            (no_decay if exempt and not decay_norm_and_bias else decay).append(param)
    return decay, no_decay


def decoupled_weight_decay(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """w -= lr * wd * w for every group with a `weight_decay_decoupled`, before the optimizer's own update."""
    for group in optimizer.param_groups:
        wd = group.get("weight_decay_decoupled", 0.0)
        if wd > 0:
            with torch.no_grad():
                torch._foreach_mul_(group["params"], 1.0 - group["lr"] * wd)


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """cfg.optimizer (a partial torch optimizer) over the model's parameter groups, with cfg.regularization."""
    options = OmegaConf.to_container(cfg.optimizer, resolve=True)
    decay_norm_and_bias = bool(options.pop("decay_norm_and_bias", False))
    if "weight_decay" in options:
        raise ConfigError("optimizer.weight_decay: set regularization.weight_decay instead (decoupled decay, "
                          "applied the same way for every optimizer)")
    decay, no_decay = parameter_groups(model, decay_norm_and_bias)
    wd = float(cfg.regularization.weight_decay)
    groups = [{"params": decay, "weight_decay_decoupled": wd, "name": "decay"},
              {"params": no_decay, "weight_decay_decoupled": 0.0, "name": "no_decay"}]
    groups = [g for g in groups if g["params"]]
    try:
        optimizer = instantiate(options)(groups)
    except TypeError as error:
        raise ConfigError(f"optimizer={options.get('_target_')}: {error}; check the keys of the optimizer group") from None
    if wd > 0:
        optimizer.register_step_pre_hook(decoupled_weight_decay)
    return optimizer
