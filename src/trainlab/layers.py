"""Activations and normalization layers, chosen by name (model.activation, normalization.name)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from trainlab.config import ConfigError, is_number

ACTIVATIONS: dict[str, Callable[[float], nn.Module]] = {
    "relu": lambda slope: nn.ReLU(),
    "leaky_relu": lambda slope: nn.LeakyReLU(slope),
    "tanh": lambda slope: nn.Tanh(),
    "sigmoid": lambda slope: nn.Sigmoid(),
    "gelu": lambda slope: nn.GELU(),
    "elu": lambda slope: nn.ELU(),
}
NORMS = ("none", "batch", "layer", "instance", "group")


def make_activation(name: str, negative_slope: float = 0.01) -> nn.Module:
    """The activation module named `name`; `negative_slope` is read by leaky_relu only."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"model.activation={name!r} is not an activation; choose one of {', '.join(ACTIVATIONS)}")
    if name == "leaky_relu" and not (is_number(negative_slope) and math.isfinite(negative_slope)):
        raise ConfigError(f"model.negative_slope={negative_slope!r}: leaky_relu's slope for x < 0 must be a number, "
                          "e.g. 0.01")
    return ACTIVATIONS[name](negative_slope)


def norm_groups(cfg: Mapping[str, Any], num_features: int, widths: Sequence[int] = ()) -> int:
    """How many groups of channels a per-sample norm (layer, instance, group) takes its statistics over.

    `widths`: every layer width of the model, when they are not all multiples of `num_features` (an MLP's hidden
    widths), so that a refusal lists the group counts that fit them all.
    """
    name = cfg["name"]
    if name == "layer":
        return 1
    if name == "instance":
        return num_features
    groups = cfg.get("num_groups", 8)
    if groups < 1 or num_features % groups:
        common = math.gcd(num_features, *widths)
        divisors = ", ".join(str(d) for d in range(1, common + 1) if common % d == 0)
        of = f"of {', '.join(map(str, widths))}" if widths else f"of {num_features}"
        raise ConfigError(f"normalization.num_groups={groups} does not divide the {num_features} channels of a "
                          f"layer into equal groups; set normalization.num_groups to a divisor of every layer width "
                          f"({of}: {divisors}), or change model.width / model.hidden")
    return groups


def make_norm(cfg: Mapping[str, Any], num_features: int, spatial: bool, positions: int | None = None) -> nn.Module:
    """The normalization layer named by cfg['name'] for `num_features` features (channels if spatial).

    Statistics: batch, per feature/channel over the batch (and H, W); layer, per sample over all its
    features (C, H, W); instance, per sample and channel over H, W; group, per sample over each of
    `num_groups` groups of channels (and H, W). `positions` is H*W of the feature maps the layer sees
    (None: not known, not checked); flat features have one position each.
    """
    name, eps = cfg["name"], cfg.get("eps", 1e-5)
    if name == "none":
        return nn.Identity()
    if name == "batch":
        batch_norm = nn.BatchNorm2d if spatial else nn.BatchNorm1d
        return batch_norm(num_features, eps=eps, momentum=cfg.get("momentum", 0.1))
    if name not in NORMS:
        raise ConfigError(f"normalization={name!r} is not a normalization; choose one of {', '.join(NORMS)}")
    if name == "instance" and not spatial:
        raise ConfigError("normalization=instance normalises each channel of each sample over its positions (H, W), "
                          "and flat features (model=mlp) have one value per feature: every output would be 0. Use "
                          "normalization=layer (per sample over all features) or group with model=mlp, or model=cnn")
    groups = norm_groups(cfg, num_features)
    positions = 1 if not spatial else positions
    if positions is not None and num_features // groups * positions == 1:
        raise ConfigError(_single_value_groups(name, num_features, groups, spatial))
    if name == "layer" and not spatial:
        return nn.LayerNorm(num_features, eps=eps)
    if name == "instance":
        return nn.InstanceNorm2d(num_features, eps=eps, affine=True)
    return nn.GroupNorm(groups, num_features, eps=eps)  # layer (spatial): GroupNorm(1, C), over C, H, W


def _single_value_groups(name: str, num_features: int, groups: int, spatial: bool) -> str:
    """Why a per-sample norm whose every group holds one value cannot work, and what to use instead."""
    why = (f"normalization={name} would normalise each sample's {num_features} channel(s) in {groups} group(s) "
           "of a single value each: a lone value normalises to 0, so the layer would output its bias whatever "
           "the input.")
    if not spatial:
        if name == "layer":
            return f"{why} Use wider hidden layers (model.hidden), or normalization=batch."
        return f"{why} Use fewer normalization.num_groups, or normalization=layer."
    return (f"{why} The feature maps are 1x1 at this layer (each stage after the first halves them, rounding up): "
            "use larger images, fewer model.stages, or normalization=batch, layer or group with fewer groups.")
