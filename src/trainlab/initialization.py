"""Weight initialization of linear and conv layers, chosen by name; biases start at zero."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from trainlab.config import ConfigError

INITIALIZATIONS = ("default", "kaiming_normal")

# torch.nn.init.calculate_gain knows these nonlinearities; the others use the closest one.
_GAIN_NONLINEARITY = {"relu": "relu", "leaky_relu": "leaky_relu", "tanh": "tanh", "sigmoid": "sigmoid",
                      "gelu": "relu", "elu": "relu"}


def initialize(model: nn.Module, cfg: Mapping[str, Any], activation: str = "relu") -> None:
    """Re-initialise every linear and conv weight of `model` in place as cfg['name'] says."""
    name = cfg["name"]
    if name not in INITIALIZATIONS:
        raise ConfigError(f"initialization={name!r} is not an initialization; choose one of {', '.join(INITIALIZATIONS)}")
    if name == "default":
        return
    nonlinearity = _GAIN_NONLINEARITY.get(activation, "relu")
    slope = 0.01 if nonlinearity == "leaky_relu" else 0.0
    mode = cfg.get("mode", "fan_in")
    if mode not in ("fan_in", "fan_out"):
        raise ConfigError(f"initialization.mode={mode!r}: choose fan_in or fan_out")
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, a=slope, mode=mode, nonlinearity=nonlinearity)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
