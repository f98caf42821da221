"""Weight initialization of linear and conv layers, chosen by name; biases start at zero, norms at 1 and 0."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import cache, partial
from typing import Any

import torch
from torch import nn

from trainlab.config import ConfigError
from trainlab.layers import ACTIVATIONS

INITIALIZATIONS = ("default", "kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "orthogonal",
                   "normal", "constant")
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)  # batch and instance norms, layer, group

# torch.nn.init.calculate_gain's values are kept for the nonlinearities it knows (He et al.'s sqrt(2) and
# sqrt(2 / (1 + slope^2)), and the conventions 5/3 tanh, 1 sigmoid, 3/4 SELU); every other gain is integrated.
TORCH_GAINS = ("relu", "leaky_relu", "tanh", "sigmoid", "selu")
MORE_ACTIVATIONS = {"silu": nn.SiLU}  # besides model.activation's (layers.ACTIVATIONS): torchvision's EfficientNets'


def kaiming_gain(function: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """1 / sqrt(E[f(z)^2]) for z ~ N(0, 1): the gain that keeps the pre-activations' variance through depth.

    He et al.'s derivation: a layer computes z' = W f(z) with weights of mean 0 and variance Var[w], drawn
    independently of its input, so Var[z'] = fan_in * Var[w] * E[f(z)^2]. Kaiming's Var[w] = gain^2 / fan_in keeps
    Var[z'] = Var[z] = 1 when gain^2 * E[f(z)^2] = 1 at z ~ N(0, 1). ReLU: E[f(z)^2] = 1/2, gain sqrt(2); leaky ReLU:
    (1 + slope^2) / 2, gain sqrt(2 / (1 + slope^2)). E[f(z)^2] is integrated by Simpson's rule on [-12, 12] in
    float64, h = 0.001, with z = 0 (where ReLU-like functions bend) on a panel boundary: error below 1e-12.
    mode=fan_out takes the same gain, as torch does; the backward pass's own, 1 / sqrt(E[f'(z)^2]), is sqrt(2) for
    ReLU too, and 1-3 % lower for GELU, ELU and SiLU (1.481, 1.223, 1.623).

    Variance 1 is a fixed point of q -> gain^2 * E[f(sqrt(q) z)^2]; it is stable for ELU (slope 0.89) and tanh, but
    not for GELU (1.14) and SiLU (1.17), for which no gain makes one stable: a deviation grows by that factor a
    layer, so deep plain GELU and SiLU nets still drift, only far more slowly than with ReLU's sqrt(2).
    """
    panels = 24000  # even, and z = 0 is node 12000: a panel boundary
    z = torch.linspace(-12.0, 12.0, panels + 1, dtype=torch.float64)
    weights = torch.ones_like(z)  # Simpson's 1, 4, 2, 4, ..., 2, 4, 1
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    density = torch.exp(-z**2 / 2) / math.sqrt(2 * math.pi)
    with torch.no_grad():
        second_moment = (weights * density * function(z) ** 2).sum().item() * (24.0 / panels) / 3
    return 1 / math.sqrt(second_moment)


def gain(activation: str, negative_slope: float = 0.01) -> float:
    """The Kaiming (and orthogonal) gain of `activation`: torch's for relu (sqrt(2)), leaky_relu
    (sqrt(2 / (1 + slope^2))), tanh (5/3), sigmoid (1) and selu (3/4); kaiming_gain of the function for the others
    (gelu 1.534, elu 1.245, silu 1.677)."""
    if activation in TORCH_GAINS:
        return nn.init.calculate_gain(activation, negative_slope if activation == "leaky_relu" else None)
    return _integrated_gain(activation)


@cache
def _integrated_gain(activation: str) -> float:
    if activation in ACTIVATIONS:
        return kaiming_gain(ACTIVATIONS[activation](0.01))  # the module the model applies (ELU with its alpha)
    if activation in MORE_ACTIVATIONS:
        return kaiming_gain(MORE_ACTIVATIONS[activation]())
    choices = dict.fromkeys([*TORCH_GAINS, *ACTIVATIONS, *MORE_ACTIVATIONS])
    raise ConfigError(f"model.activation={activation!r} has no initialization gain; choose one of {', '.join(choices)}")


def weight_initializer(cfg: Mapping[str, Any], activation: str = "relu",
                       negative_slope: float = 0.01) -> Callable[[torch.Tensor], Any] | None:
    """The in-place initializer of one weight tensor that cfg names (None for PyTorch's default).

    With fan = fan_in or fan_out (in/out features; times the kernel size for convs) and gain = gain(activation):
    kaiming_normal N(0, gain^2 / fan); kaiming_uniform U(-b, b), b = gain * sqrt(3 / fan);
    xavier_normal N(0, 2 / (fan_in + fan_out)); xavier_uniform U(-b, b), b = sqrt(6 / (fan_in + fan_out));
    orthogonal: W W^T = gain^2 I (rows orthogonal); normal N(0, std^2); constant: every weight = value.
    Xavier takes no gain, for any activation: it is Glorot's variance as published, for tanh and sigmoid nets.
    """
    name = cfg["name"]
    if name not in INITIALIZATIONS:
        raise ConfigError(f"initialization={name!r} is not an initialization; "
                          f"choose one of {', '.join(INITIALIZATIONS)}")
    if name in ("kaiming_normal", "kaiming_uniform"):
        mode = cfg.get("mode", "fan_in")
        if mode not in ("fan_in", "fan_out"):
            raise ConfigError(f"initialization.mode={mode!r}: choose fan_in or fan_out")
        return partial(_kaiming, gain=gain(activation, negative_slope), mode=mode, uniform=name == "kaiming_uniform")
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


def _kaiming(weight: torch.Tensor, gain: float, mode: str, uniform: bool) -> torch.Tensor:
    """torch's kaiming_normal_ (uniform_) with any gain: N(0, std^2) (U(-sqrt(3) std, sqrt(3) std)), std = gain /
    sqrt(fan); the same draws as torch's for the nonlinearities it knows."""
    fan = weight.shape[1 if mode == "fan_in" else 0] * math.prod(weight.shape[2:])
    std = gain / math.sqrt(fan)
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return weight.uniform_(-bound, bound) if uniform else weight.normal_(0, std)


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
