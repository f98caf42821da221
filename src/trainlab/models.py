"""Models: an MLP, the CIFAR ResNet family with a plain (no skip connection) switch, and torchvision's classifiers."""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from trainlab.config import ConfigError
from trainlab.initialization import check_initialization
from trainlab.layers import ACTIVATIONS, NORMS, make_activation, make_norm, norm_groups  # noqa: F401  (this API)

log = logging.getLogger("trainlab")


class MLP(nn.Sequential):
    """flatten -> [linear -> norm -> activation -> dropout] per hidden width -> linear to the classes."""

    def __init__(
        self,
        hidden: list[int],
        activation: str = "relu",
        negative_slope: float = 0.01,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        norm: Mapping[str, Any],
        dropout: float = 0.0,
    ):
        if not isinstance(hidden, (list, tuple)) or not all(_whole(w) and w >= 1 for w in hidden):
            raise ConfigError(f"model.hidden={hidden!r}: give the hidden layers' widths as a list of whole numbers "
                              ">= 1, e.g. [256, 256], or [] for a linear model")
        if not hidden and dropout > 0:
            log.warning(f"regularization.dropout={dropout:g} with model.hidden=[]: a linear model has no hidden layer "
                        "to drop out of, so dropout does nothing (nor does normalization)")
        if norm["name"] == "group":
            for out in hidden:  # refused with the group counts that fit every hidden width, not only this one's
                norm_groups(norm, out, widths=hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for out in hidden:
            has_norm = norm["name"] != "none"
            layers += [nn.Linear(width, out, bias=not has_norm), make_norm(norm, out, spatial=False)]
            layers.append(make_activation(activation, negative_slope))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = out
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
        self.activation, self.negative_slope = activation, negative_slope

    def residual_norms(self) -> list[nn.Module]:
        return []


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def conv3x3(in_channels: int, out_channels: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    """conv -> norm -> act (-> channel dropout) -> conv -> norm, (+ shortcut when residual) -> act.

    `positions` is H*W of the block's output feature maps (checked by per-sample norms).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, residual: bool, activation: str,
                 norm: Mapping[str, Any], dropout: float, negative_slope: float = 0.01,
                 positions: int | None = None):
        super().__init__()
        bias = norm["name"] == "none"
        self.conv1 = conv3x3(in_ch, out_ch, stride, bias)
        self.norm1 = make_norm(norm, out_ch, spatial=True, positions=positions)
        self.act1 = make_activation(activation, negative_slope)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_ch, out_ch, 1, bias)
        self.norm2 = make_norm(norm, out_ch, spatial=True, positions=positions)
        self.act2 = make_activation(activation, negative_slope)
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
    """The CIFAR ResNet family (depth = 2 * blocks_per_stage * stages + 2), residual or plain.

    Any image size works: a stride-2 3x3 conv (padding 1) maps n pixels to ceil(n / 2), so maps stop
    shrinking at 1x1. Per-sample norms (instance, group) refuse sizes that leave one value per group.
    """

    def __init__(
        self,
        depth: int = 20,
        width: int = 16,
        stages: int = 3,
        residual: bool = True,
        activation: str = "relu",
        negative_slope: float = 0.01,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        norm: Mapping[str, Any],
        dropout: float = 0.0,
    ):
        super().__init__()
        for key, value in (("depth", depth), ("width", width), ("stages", stages)):
            if not (_whole(value) and value >= 1):
                raise ConfigError(f"model.{key}={value!r}: must be a whole number >= 1")
        if not isinstance(residual, bool):
            raise ConfigError(f"model.residual={residual!r}: choose true (skip connections) or false (a plain net)")
        if (depth - 2) % (2 * stages) or depth < 2 + 2 * stages:
            valid = ", ".join(str(2 * n * stages + 2) for n in range(1, 6))
            raise ConfigError(f"model.depth={depth} with model.stages={stages}: depth must be 2 * blocks * stages + 2; "
                              f"valid depths: {valid}, ...")
        if len(input_shape) != 3:
            raise ConfigError(f"model=cnn needs images [channels, height, width]; the data gives {list(input_shape)}")
        blocks_per_stage = (depth - 2) // (2 * stages)
        bias = norm["name"] == "none"
        height, width_px = input_shape[1], input_shape[2]
        self.stem = nn.Sequential(conv3x3(input_shape[0], width, 1, bias),
                                  make_norm(norm, width, spatial=True, positions=height * width_px),
                                  make_activation(activation, negative_slope))
        blocks, channels = [], width
        for stage in range(stages):
            out = width * 2**stage
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                height, width_px = -(-height // stride), -(-width_px // stride)
                blocks.append(Block(channels, out, stride, residual, activation, norm, dropout, negative_slope,
                                    positions=height * width_px))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        self.activation, self.negative_slope = activation, negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def residual_norms(self) -> list[nn.Module]:
        """The last norm of each residual block (zeroed by initialization.zero_init_residual)."""
        return [block.norm2 for block in self.blocks if block.residual]


class TorchvisionModel(nn.Module):
    """A torchvision.models classifier by name, from scratch (no pretrained weights), fitted to the data.

    Fitted: `num_classes` outputs; the first conv takes the data's channels; ResNet-like models on
    images no larger than `small_input_max` px get a 3x3 stride-1 stem conv and no max-pool (the CIFAR
    stem), so 32x32 images are not cut to 8x8 before the first block. The architecture keeps its own
    normalization layers (normalization must stay at its default, batch) and its own dropout knob, if
    it has one (regularization.dropout sets it; architectures without one refuse dropout > 0).
    """

    activation = "relu"  # every torchvision family uses ReLU or a ReLU-like (GELU, SiLU, Hardswish) activation

    def __init__(
        self,
        name: str = "resnet18",
        small_input_max: int = 64,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        norm: Mapping[str, Any],
        dropout: float = 0.0,
    ):
        super().__init__()
        import torchvision

        valid = torchvision.models.list_models(module=torchvision.models)
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"model.name={name!r} is not a torchvision classifier{hint}; choose one of "
                              f"torchvision.models.list_models(): resnet18, resnet50, wide_resnet50_2, vgg11_bn, "
                              f"mobilenet_v3_small, efficientnet_b0, vit_b_16, ... ({len(valid)} in all)")
        if norm["name"] != "batch":
            raise ConfigError(f"normalization={norm['name']} with model=torchvision: the torchvision architecture "
                              f"({name}) keeps its own normalization layers; leave normalization at its default "
                              "(batch), or use model=mlp or model=cnn to choose the normalization")
        if len(input_shape) != 3:
            raise ConfigError(f"model=torchvision needs images [channels, height, width]; the data gives "
                              f"{list(input_shape)}")
        self.name = name
        channels, height, width = input_shape
        try:
            with _stem_reads(channels) as stem:
                self.net = _build_torchvision(name, num_classes, dropout, input_shape)
        except AssertionError as error:  # e.g. a ViT whose patch size does not divide the image
            raise ConfigError(f"model.name={name} cannot take {list(input_shape)} images: {error}") from None
        if isinstance(self.net, torchvision.models.ResNet) and max(height, width) <= small_input_max:
            self.net.conv1 = nn.Conv2d(channels, self.net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as ResNet's own
            self.net.maxpool = nn.Identity()
        else:
            first = next(m for m in self.net.modules() if isinstance(m, nn.Conv2d))
            if first is not stem.get("conv") or first.in_channels != channels:  # no architecture of torchvision's
                raise ConfigError(f"model.name={name}: its first conv is not the one built for three input channels, "
                                  f"so it cannot be fitted to {channels}-channel images; use images of 3 channels "
                                  "(data.channels=3 for an image folder) or another model")
        for module in self.net.modules():  # the architecture's own batch norms take normalization.momentum and eps
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum, module.eps = norm.get("momentum", module.momentum), norm.get("eps", module.eps)
        self._check_input_size(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def residual_norms(self) -> list[nn.Module]:
        """The last norm of each residual block of the ResNet family (BasicBlock.bn2, Bottleneck.bn3)."""
        from torchvision.models.resnet import BasicBlock, Bottleneck

        return [m.bn2 if isinstance(m, BasicBlock) else m.bn3 for m in self.net.modules()
                if isinstance(m, (BasicBlock, Bottleneck))]

    def _check_input_size(self, input_shape: tuple[int, ...]) -> None:
        """One forward pass on zeros (eval mode, no grad): some families cannot take small images."""
        training = self.training
        try:
            with torch.no_grad():
                self.eval()(torch.zeros(2, *input_shape))
        except (RuntimeError, ValueError, AssertionError) as error:
            raise ConfigError(f"model.name={self.name} cannot take {list(input_shape)} images: "
                              f"{str(error).splitlines()[0]}. Use larger images or a ResNet-like model "
                              "(resnet18, ...), which is fitted to small ones.") from None
        finally:
            self.train(training)


def _build_torchvision(name: str, num_classes: int, dropout: float, input_shape: tuple[int, ...]) -> nn.Module:
    """torchvision's builder `name` with weights=None, the class count and, where it has one, the dropout."""
    from torchvision.models import get_model_builder

    builder = get_model_builder(name)
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)  # one output, not a tuple with auxiliary heads
    if name.startswith("vit_") and input_shape[1] == input_shape[2]:
        kwargs["image_size"] = input_shape[1]
    try:
        return builder(**kwargs, dropout=dropout)
    except TypeError as error:
        if "dropout" not in str(error):
            raise
    if dropout > 0:
        raise ConfigError(f"regularization.dropout={dropout} with model.name={name}: this torchvision architecture "
                          "has no dropout knob; use regularization=none, or a model with one (vgg*, alexnet, "
                          "mobilenet_*, efficientnet_*, mnasnet*, squeezenet*, vit_*, swin_*)")
    return builder(**kwargs)


@contextlib.contextmanager
def _stem_reads(channels: int) -> Iterator[dict[str, nn.Conv2d]]:
    """Inside, the first nn.Conv2d built with three input channels (the stem of every torchvision classifier, which
    hard-codes RGB) is built with `channels` instead, so that the architecture's own initialization draws its weights
    for the fan-in it has: ViT's, DenseNet's and SqueezeNet's scale with it. Yields {"conv": that conv} once built."""
    built: dict[str, nn.Conv2d] = {}
    original = nn.Conv2d.__init__

    def init(conv: nn.Conv2d, in_channels: int, *args: Any, **kwargs: Any) -> None:
        if in_channels == 3 and not built:
            built["conv"], in_channels = conv, channels
        original(conv, in_channels, *args, **kwargs)

    nn.Conv2d.__init__ = init  # type: ignore[method-assign]
    try:
        yield built
    finally:
        nn.Conv2d.__init__ = original  # type: ignore[method-assign]


def count_weighted_layers(model: nn.Module) -> int:
    """Conv and linear layers: the 'depth' of a network as the ResNet papers count it."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def build_model(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model of cfg.model, sized for the data, with cfg.normalization and cfg.regularization.dropout.

    cfg.initialization is checked against it (not applied): whatever builds the model (a run, a dry run) refuses
    an initialization that `initialize` would refuse.
    """
    from hydra.utils import instantiate

    factory = instantiate(cfg.model, _convert_="all")
    norm = dict(cfg.normalization)
    model = factory(input_shape=tuple(input_shape), num_classes=num_classes, norm=norm,
                    dropout=float(cfg.regularization.dropout))
    if cfg.get("initialization") is not None:  # (a config built by hand may leave it out)
        check_initialization(model, cfg.initialization)
    return model
