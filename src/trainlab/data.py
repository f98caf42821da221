"""Datasets as uint8 tensors, deterministic splits, and batches served as index slices on the device."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from trainlab.config import ConfigError


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: torch.Tensor  # float [C], per-channel mean of the training split, in raw pixel units
    std: torch.Tensor  # float [C]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


def split_index(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation of range(n) cut into (kept, held_out) with round(fraction * n) held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = max(1, round(fraction * n))
    if held >= n:
        raise ConfigError(f"a fraction of {fraction} of {n} examples leaves nothing to train on")
    return order[held:].sort().values, order[:held].sort().values


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as uint8 images [1797, 1, 8, 8] (levels 0-16) and int64 labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images).to(torch.uint8).unsqueeze(1)
    return images, torch.from_numpy(bunch.target).long()


def make_synthetic(num_samples: int, shape: list[int], num_classes: int, noise: float, seed: int):
    """Images scattered around one random uint8 prototype per class, and their labels."""
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"data.shape={list(shape)}: give [channels, height, width], each at least 1")
    if num_classes < 2 or num_samples < 2 * num_classes:
        raise ConfigError(f"data.num_classes={num_classes}, data.num_samples={num_samples}: need at least "
                          "2 classes and 2 samples per class")
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(num_classes, *shape, generator=g) * 255
    labels = torch.arange(num_samples) % num_classes
    labels = labels[torch.randperm(num_samples, generator=g)]
    images = prototypes[labels] + noise * torch.randn(num_samples, *shape, generator=g)
    return images.round().clamp(0, 255).to(torch.uint8), labels


def build_data(cfg: DictConfig) -> Dataset:
    """The dataset named by data.name, split into train / val / test, with training-split statistics."""
    if cfg.name == "digits":
        images, labels = load_digits()
        num_classes = 10
    elif cfg.name == "synthetic":
        images, labels = make_synthetic(cfg.num_samples, list(cfg.shape), cfg.num_classes, cfg.noise, cfg.seed)
        num_classes = cfg.num_classes
    else:
        raise ConfigError(f"data.name={cfg.name!r} is not a dataset; choose digits or synthetic")
    everything = Split(images, labels)
    # The test split depends on nothing but the data, so every run of a study tests on the same images.
    train_idx, test_idx = split_index(len(everything), cfg.test_fraction, seed=0)
    train_all, test = everything.subset(train_idx), everything.subset(test_idx)
    fit_idx, val_idx = split_index(len(train_all), cfg.val_fraction, seed=cfg.split_seed)
    train, val = train_all.subset(fit_idx), train_all.subset(val_idx)
    pixels = train.images.float().transpose(0, 1).flatten(1)
    std = pixels.std(dim=1).clamp_min(1e-3)
    return Dataset(cfg.name, train, val, test, num_classes, pixels.mean(dim=1), std)


def batch_size_at(epoch: int, batch_size: int, schedule: Sequence[Sequence[float]] | None) -> int:
    """The training batch size of (1-based) `epoch`: batch_size times every factor whose epoch has come."""
    factor = 1.0
    for start, multiplier in schedule or []:
        if epoch >= int(start):
            factor *= multiplier
    return max(1, round(batch_size * factor))


class DeviceLoader:
    """Batches of one split, held on the device as uint8 and served as shuffled index slices.

    The epoch's order and its augmentation draw from generators seeded by (seed, epoch), so an
    epoch's batches are a pure function of the seed and the epoch number.
    """

    def __init__(
        self,
        split: Split,
        mean: torch.Tensor,
        std: torch.Tensor,
        batch_size: int,
        device: torch.device,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    ):
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        shape = (1, -1, 1, 1)
        self.mean = mean.to(device).view(shape)
        self.inv_std = (1.0 / std).to(device).view(shape)
        self.device = device
        self.shuffle = shuffle
        self._drop_last = drop_last
        self.set_batch_size(batch_size)
        self.seed = seed
        self.augment = augment
        self.epoch = 0

    def __len__(self) -> int:
        n, b = len(self.labels), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    @property
    def num_examples(self) -> int:
        return len(self) * self.batch_size if self.drop_last else len(self.labels)

    def set_batch_size(self, batch_size: int) -> None:
        """Serve batches of `batch_size` (at most the split) from the next iteration on."""
        self.batch_size = min(batch_size, len(self.labels))
        self.drop_last = self._drop_last and len(self.labels) > self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, stream: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed((self.seed * 1_000_003 + self.epoch) * 4 + stream)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=self._generator(0), device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        aug_gen = self._generator(1) if self.augment is not None else None
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[index].float()
            if self.augment is not None:
                x = self.augment(x, aug_gen)  # in pixel units, so zero padding is black as usual
            yield (x - self.mean) * self.inv_std, self.labels[index]


def train_loader(cfg: DictConfig, data: Dataset, device: torch.device,
                 augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> DeviceLoader:
    """The shuffled training batches of cfg.data (batch size, drop_last) seeded by cfg.seed."""
    return DeviceLoader(data.train, data.mean, data.std, cfg.data.batch_size, device, shuffle=True,
                        drop_last=cfg.data.drop_last, seed=cfg.seed, augment=augment)
