"""Batched training-time augmentation: pure functions of a batch tensor and an explicit generator."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def hflip(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of [N, C, H, W] left-right with probability p, independently."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator, mode: str = "zeros") -> torch.Tensor:
    """Pad each side of [N, C, H, W] by `padding` (zeros or reflect), then crop H x W at a random offset per image."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4, mode="constant" if mode == "zeros" else "reflect")
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=images.device)
    rows = (dy + torch.arange(h, device=images.device)).view(n, 1, h, 1)
    cols = (dx + torch.arange(w, device=images.device)).view(n, 1, 1, w)
    flat = padded.flatten(2)  # [N, C, (H + 2p) * (W + 2p)]
    index = (rows * (w + 2 * padding) + cols).expand(n, c, h, w).flatten(2)
    return flat.gather(2, index).view(n, c, h, w)


def build_augment(cfg: DictConfig) -> Augment | None:
    """The augmentation node as one function of (batch, generator), or None when it does nothing."""
    padding, mode, flip_p = int(cfg.crop_padding), str(cfg.crop_padding_mode), float(cfg.hflip)
    steps: list[Augment] = []
    if padding > 0:
        steps.append(lambda x, g: random_crop(x, padding, g, mode))
    if flip_p > 0:
        steps.append(lambda x, g: hflip(x, flip_p, g))
    if not steps:
        return None

    def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for step in steps:
            images = step(images, generator)
        return images

    return augment
