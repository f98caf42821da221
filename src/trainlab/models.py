"""Models: an MLP and the CIFAR ResNet family with a plain (no skip connection) switch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from trainlab.config import ConfigError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
}
NORMS = ("none", "batch")


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(f"model.activation={name!r} is not an activation; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def make_norm(cfg: Mapping[str, Any], num_features: int, spatial: bool) -> nn.Module:
    """The normalization layer named by cfg['name'] for `num_features` features (channels if spatial)."""
    name = cfg["name"]
    if name == "none":
        return nn.Identity()
    if name == "batch":
        batch_norm = nn.BatchNorm2d if spatial else nn.BatchNorm1d
        return batch_norm(num_features, eps=cfg.get("eps", 1e-5), momentum=cfg.get("momentum", 0.1))
    raise ConfigError(f"normalization={name!r} is not a normalization; choose one of {', '.join(NORMS)}")


class MLP(nn.Sequential):
    """flatten -> [linear -> norm -> activation -> dropout] per hidden width -> linear to the classes."""

    def __init__(
        self,
        hidden: list[int],
        activation: str = "relu",
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        norm: Mapping[str, Any],
        dropout: float = 0.0,
    ):
        layers: list[nn.Module] = [nn.Flatten()]
        width = int(torch.tensor(input_shape).prod())
        for out in hidden:
            has_norm = norm["name"] != "none"
            layers += [nn.Linear(width, out, bias=not has_norm), make_norm(norm, out, spatial=False)]
            layers.append(make_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = out
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
        self.activation = activation


def conv3x3(in_channels: int, out_channels: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    """conv -> norm -> act (-> channel dropout) -> conv -> norm, (+ shortcut when residual) -> act."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, residual: bool, activation: str,
                 norm: Mapping[str, Any], dropout: float):
        super().__init__()
        bias = norm["name"] == "none"
        self.conv1, self.norm1 = conv3x3(in_ch, out_ch, stride, bias), make_norm(norm, out_ch, spatial=True)
        self.act1 = make_activation(activation)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv2, self.norm2 = conv3x3(out_ch, out_ch, 1, bias), make_norm(norm, out_ch, spatial=True)
        self.act2 = make_activation(activation)
        self.residual = residual
        self.stride, self.extra_channels = stride, out_ch - in_ch

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """He et al.'s option A: subsample and zero-pad the new channels, so it adds no parameters."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels > 0:
            x = nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop(self.act1(self.norm1(self.conv1(x))))
        out = self.norm2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return self.act2(out)


class CNN(nn.Module):
    """The CIFAR ResNet family (depth = 2 * blocks_per_stage * stages + 2), residual or plain."""

    def __init__(
        self,
        depth: int = 20,
        width: int = 16,
        stages: int = 3,
        residual: bool = True,
        activation: str = "relu",
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        norm: Mapping[str, Any],
        dropout: float = 0.0,
    ):
        super().__init__()
        if stages < 1 or width < 1 or (depth - 2) % (2 * stages) or depth < 2 + 2 * stages:
            valid = ", ".join(str(2 * n * max(stages, 1) + 2) for n in range(1, 6))
            raise ConfigError(f"model.depth={depth} with model.stages={stages}: depth must be 2 * blocks * stages + 2; "
                              f"valid depths: {valid}, ...")
        if len(input_shape) != 3:
            raise ConfigError(f"model=cnn needs images [channels, height, width]; the data gives {list(input_shape)}")
        blocks_per_stage = (depth - 2) // (2 * stages)
        bias = norm["name"] == "none"
        self.stem = nn.Sequential(conv3x3(input_shape[0], width, 1, bias), make_norm(norm, width, spatial=True),
                                  make_activation(activation))
        blocks, channels = [], width
        for stage in range(stages):
            out = width * 2**stage
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(Block(channels, out, stride, residual, activation, norm, dropout))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def count_weighted_layers(model: nn.Module) -> int:
    """Conv and linear layers: the 'depth' of a network as the ResNet papers count it."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def build_model(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model of cfg.model, sized for the data, with cfg.normalization and cfg.regularization.dropout."""
    from hydra.utils import instantiate

    factory = instantiate(cfg.model, _convert_="all")
    norm = dict(cfg.normalization)
    return factory(input_shape=tuple(input_shape), num_classes=num_classes, norm=norm,
                   dropout=float(cfg.regularization.dropout))
