"""Weight initialization of linear and conv layers, chosen by name; biases start at zero, norms at 1 and 0."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from trainlab.config import ConfigError

INITIALIZATIONS = ("default", "kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "orthogonal",
                   "normal", "constant")
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)  # batch and instance norms, layer, group

# torch.nn.init.calculate_gain knows these nonlinearities; the others use the closest one.
_GAIN_NONLINEARITY = {"relu": "relu", "leaky_relu": "leaky_relu", "tanh": "tanh", "sigmoid": "sigmoid",
                      "gelu": "relu", "elu": "relu"}


def gain(activation: str, negative_slope: float = 0.01) -> float:
    """The gain of `activation`: sqrt(2) ReLU (and GELU, ELU), sqrt(2 / (1 + slope^2)) leaky, 5/3 tanh, 1 sigmoid."""
    nonlinearity = _GAIN_NONLINEARITY.get(activation, "relu")
    return nn.init.calculate_gain(nonlinearity, negative_slope if nonlinearity == "leaky_relu" else None)


def weight_initializer(cfg: Mapping[str, Any], activation: str = "relu",
                       negative_slope: float = 0.01) -> Callable[[torch.Tensor], Any] | None:
    """The in-place initializer of one weight tensor that cfg names (None for PyTorch's default).

    With fan = fan_in or fan_out (in/out features; times the kernel size for convs):
    kaiming_normal N(0, gain^2 / fan); kaiming_uniform U(-b, b), b = gain * sqrt(3 / fan);
    xavier_normal N(0, 2 / (fan_in + fan_out)); xavier_uniform U(-b, b), b = sqrt(6 / (fan_in + fan_out));
    orthogonal: W W^T = gain^2 I (rows orthogonal); normal N(0, std^2); constant: every weight = value.
    """
    name = cfg["name"]
    if name not in INITIALIZATIONS:
        raise ConfigError(f"initialization={name!r} is not an initialization; "
                          f"choose one of {', '.join(INITIALIZATIONS)}")
    nonlinearity = _GAIN_NONLINEARITY.get(activation, "relu")
    if name in ("kaiming_normal", "kaiming_uniform"):
        mode = cfg.get("mode", "fan_in")
        if mode not in ("fan_in", "fan_out"):
            raise ConfigError(f"initialization.mode={mode!r}: choose fan_in or fan_out")
        kaiming = nn.init.kaiming_normal_ if name == "kaiming_normal" else nn.init.kaiming_uniform_
        return partial(kaiming, a=negative_slope, mode=mode, nonlinearity=nonlinearity)
    if name == "xavier_normal":
        return nn.init.xavier_normal_
    if name == "xavier_uniform":
        return nn.init.xavier_uniform_
    if name == "orthogonal":
        return partial(nn.init.orthogonal_, gain=gain(activation, negative_slope))
    if name == "normal":
        std = cfg.get("std", 0.01)
        if not std > 0:
            raise ConfigError(f"initialization.std={std!r}: must be > 0 (a standard deviation)")
        return partial(nn.init.normal_, mean=0.0, std=std)
    if name == "constant":
        return partial(nn.init.constant_, val=cfg.get("value", 0.01))
    return None  # default


def initialize(model: nn.Module, cfg: Mapping[str, Any], activation: str = "relu") -> None:
    """Re-initialise `model` in place as cfg says: every linear and conv weight (and an attention layer's query,
    key and value weights, each as one linear layer) by cfg['name'], biases to 0,
    norm layers to weight 1 and bias 0 (all untouched by `default`); then, with cfg['zero_init_residual'],
    the scale (gamma) of the last norm of every residual block to 0, so each block starts as its shortcut.

    The gain follows `activation`, and leaky_relu's slope `model.negative_slope` (0.01 if the model has none).
    """
    init_weight = weight_initializer(cfg, activation, getattr(model, "negative_slope", 0.01))
    residual_norms = _residual_norms(model, cfg.get("zero_init_residual", False))
    if init_weight is not None:
        for module in model.modules():
            if isinstance(module, WEIGHTED):
                init_weight(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, NORM_TYPES) and module.weight is not None:
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):  # (a ViT's) query, key and value: three linear maps
                for weight in _attention_inputs(module):
                    init_weight(weight)
                if module.in_proj_bias is not None:
                    nn.init.zeros_(module.in_proj_bias)
    for norm in residual_norms:
        nn.init.zeros_(norm.weight)


def _attention_inputs(module: nn.MultiheadAttention) -> list[torch.Tensor]:
    """The query, key and value weights of an attention layer, each [embed_dim, its input dim] like a linear
    layer's (in_proj_weight stacks the three when they share the input width; its rows are views of it)."""
    if module.in_proj_weight is not None:
        return list(module.in_proj_weight.detach().chunk(3))
    return [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]


def check_initialization(model: nn.Module, cfg: Mapping[str, Any]) -> None:
    """Refuse what `initialize(model, cfg)` would refuse (the name, mode, std, zero_init_residual), changing nothing."""
    weight_initializer(cfg)
    _residual_norms(model, cfg.get("zero_init_residual", False))


def _residual_norms(model: nn.Module, zero_init_residual: Any) -> list[nn.Module]:
    """The norms that zero_init_residual zeroes (none when it is false); refuses models it cannot apply to."""
    if not isinstance(zero_init_residual, bool):
        raise ConfigError(f"initialization.zero_init_residual={zero_init_residual!r}: choose true or false")
    if not zero_init_residual:
        return []
    norms = model.residual_norms() if hasattr(model, "residual_norms") else []
    if not norms:
        raise ConfigError(f"initialization.zero_init_residual=true: {type(model).__name__} has no residual blocks; "
                          "use model=cnn with model.residual=true, or model=torchvision with a ResNet (resnet18, ...)")
    if any(getattr(norm, "weight", None) is None for norm in norms):
        raise ConfigError("initialization.zero_init_residual=true zeroes the scale (gamma) of the last norm of each "
                          "residual block, and normalization=none has no norms; choose normalization=batch, layer, "
                          "instance or group")
    return norms
