"""Datasets as uint8 tensors, deterministic splits, and batches: index slices on the device, or DataLoader workers."""

from __future__ import annotations

import gzip
import importlib.util
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from trainlab.augment import PIXEL_MAX, Augment, build_augment, build_batch_mix, build_v2_transform, check_sizes
from trainlab.config import ConfigError
from trainlab.datasets import SOURCES, load_image_folder, load_source
from trainlab.distributed import Ranks

log = logging.getLogger("trainlab")


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
    mean: torch.Tensor  # float [C], per-channel mean of the training examples (data.train_size's), in pixel units
    std: torch.Tensor  # float [C]
    train_available: int  # examples of the training split (after validation) that data.train_size draws from
    white: float = PIXEL_MAX  # the brightest pixel level: 255, the digits' 16 (augmentation's colour steps)

    @property
    def train_per_class(self) -> list[int]:
        """Training examples of each class, in label order."""
        return torch.bincount(self.train.labels, minlength=self.num_classes).tolist()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    @property
    def sizes(self) -> str:
        """'train 200 of 1294 / val 144 / test 359' (data.train_size=200), else 'train 1294 / val 144 / test 359'."""
        of = f" of {self.train_available}" if len(self.train) < self.train_available else ""
        return f"train {len(self.train)}{of} / val {len(self.val)} / test {len(self.test)}"

    def class_counts(self) -> str:
        """'train per class 129, 100, ..., 13': shown where a run makes or evens out an imbalance."""
        counts = self.train_per_class
        shown = counts if len(counts) <= 12 else [*counts[:6], "...", *counts[-3:]]
        return "train per class " + ", ".join(map(str, shown))


def split_index(n: int, fraction: float, seed: int, key: str = "the fraction") -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation of range(n) cut into (kept, held_out) with round(fraction * n), at least 1, held out;
    `key` names the fraction in the error when nothing is left."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = max(1, round(fraction * n))
    if held >= n:
        smaller = f"a smaller {key} or " if round(fraction * n) >= n else ""
        raise ConfigError(f"{key}={fraction} holds out {held} of {n} examples (at least one) and leaves nothing to "
                          f"train on; give {smaller}a dataset with more examples")
    return order[held:].sort().values, order[:held].sort().values


def stratified_order(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded order of range(len(labels)) whose first N, for any N of at least the number of classes, hold one
    example of every class and the rest in proportion to the classes' sizes: data.train_size=N takes that prefix,
    so the subset of a smaller N lies inside the one of a larger N (a learning curve adds data, never swaps it).

    1) each class's examples in a seeded random order; 2) the j-th (from 0) of a class of n_c examples gets the
    key 0 for j = 0, else (j + 0.5) / n_c; 3) sort by key, ties by class index. A prefix of N then holds
    max(1, round(t * n_c)) of class c for the threshold t at which the counts add up to N: each class's share
    N * n_c / n rounded to the nearest whole number, at least one (Webster's divisor method, which unlike
    rounding each N afresh never takes an example out when N grows). The counts depend on N and the class sizes
    only; the seed picks which examples.
    """
    n = len(labels)
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    by_class = shuffled[torch.sort(labels[shuffled], stable=True).indices]  # class by class, shuffled within each
    sizes = torch.bincount(labels)
    first = torch.cumsum(sizes, 0) - sizes  # where each class starts in by_class
    sorted_labels = labels[by_class]
    rank = torch.arange(n) - first[sorted_labels]  # j: the example's place within its class
    key = torch.where(rank == 0, 0.0, (rank + 0.5).double() / sizes[sorted_labels].double())
    return by_class[torch.sort(key, stable=True).indices]  # stable: ties stay in class order


def train_subset(train: Split, size: int | None, seed: int, name: str,
                 what: str = "what data.val_fraction leaves of it") -> Split:
    """The first `size` examples of the training split in its stratified_order (data.train_size; None: all); `what`
    says in the error where the split's examples come from."""
    if size is None:
        return train
    classes = int((torch.bincount(train.labels) > 0).sum())
    if size > len(train):
        raise ConfigError(f"data.train_size={size}: the training split of {name} holds {len(train)} examples ({what}); "
                          f"give at most {len(train)}, or null for all of them")
    if size < classes:
        raise ConfigError(f"data.train_size={size}: the subset is stratified by class and holds at least one "
                          f"example of each of the {classes} classes of {name}; give at least {classes}")
    # a stream of its own: the validation split's permutation is drawn from manual_seed(seed); torch takes seeds
    # below 2**64, which any data.split_seed stays within
    order = stratified_order(train.labels, (seed * 2 + 1) % 2**64)
    return train.subset(order[:size].sort().values)


def minority_classes(num_classes: int, fraction: float) -> int:
    """How many classes data.imbalance_profile=step makes rare: fraction * C rounded half up, at least one and at
    most all but one (0.5 of 10 classes: 5; of 3: 2)."""
    return min(num_classes - 1, max(1, math.floor(fraction * num_classes + 0.5)))


def imbalance_shares(ratio: float, num_classes: int, profile: str = "exponential",
                     minority_fraction: float = 0.5) -> list[float]:
    """The share of its examples each class keeps under data.imbalance=ratio: `exponential` (the long tail of
    CIFAR-10-LT, Cui et al. 2019, Cao et al. 2019) ratio ** (-c / (C - 1)), falling geometrically from class 0 (1)
    to the last (1 / ratio); `step` (Buda et al. 2018) 1 / ratio for the last minority_classes(C, fraction) classes,
    1 for the others."""
    if profile == "step":
        rare = minority_classes(num_classes, minority_fraction)
        return [1.0 if c < num_classes - rare else 1.0 / ratio for c in range(num_classes)]
    return [ratio ** (-c / (num_classes - 1)) for c in range(num_classes)]


def imbalanced_subset(train: Split, ratio: float, num_classes: int, seed: int, profile: str = "exponential",
                      minority_fraction: float = 0.5) -> Split:
    """data.imbalance=ratio: an imbalanced training split. Class c keeps max(1, round(n_c * share_c)) of its n_c
    examples, share_c from imbalance_shares (profile exponential: a long tail; step: a rare minority), so on
    balanced data the largest class is `ratio` times the smallest. Each class keeps a prefix of its examples in a
    seeded random order (the same order for either profile): a larger ratio only takes examples away."""
    if ratio == 1 or num_classes < 2:
        return train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed((seed * 2 + 2) % 2**64))
    labels = train.labels[order]
    kept = []
    for c, share in enumerate(imbalance_shares(ratio, num_classes, profile, minority_fraction)):
        members = order[labels == c]  # the class's examples, in the seeded order
        kept.append(members[:max(1, round(len(members) * share))])
    return train.subset(torch.cat(kept).sort().values)


def balanced_order(groups: list[torch.Tensor], n: int, generator: torch.Generator) -> torch.Tensor:
    """data.balance=oversample: an epoch of `n` indices (the training split's size, so an epoch keeps its steps) with
    as many of each class as of any other (the n % k left over go to classes drawn at random). A class's draws run
    through its examples in a random order, again and again as often as they need: a small class's examples come
    several times (each time with its own augmentation), a large class's a different part each epoch. `groups`
    holds each class's example indices (the classes with none left out)."""
    k = len(groups)
    draws = torch.full((k,), n // k, dtype=torch.long)
    draws[torch.randperm(k, generator=generator)[:n % k]] += 1
    parts = []
    for members, d in zip(groups, draws.tolist()):
        rounds = -(-d // len(members))
        parts.append(torch.cat([members[torch.randperm(len(members), generator=generator)]
                                for _ in range(rounds)])[:d])
    order = torch.cat(parts)
    return order[torch.randperm(n, generator=generator)]


def class_groups(labels: torch.Tensor) -> list[torch.Tensor]:
    """The example indices of each class present in `labels` (CPU), in label order."""
    by_class = torch.sort(labels.cpu(), stable=True).indices
    return [group for group in torch.split(by_class, torch.bincount(labels.cpu()).tolist()) if len(group) > 0]


def occurrences(order: torch.Tensor) -> torch.Tensor:
    """For each position of `order`, how many earlier positions hold the same index (0 for its first)."""
    values, where = torch.sort(order, stable=True)
    first = torch.ones_like(values, dtype=torch.bool)
    first[1:] = values[1:] != values[:-1]
    starts = torch.cummax(torch.where(first, torch.arange(len(order)), 0), dim=0).values
    counts = torch.empty_like(order)
    counts[where] = torch.arange(len(order)) - starts
    return counts


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """data.balance=reweight: class c's weight in the training loss, n / (k * n_c) for the k classes present
    (scikit-learn's class_weight='balanced': every class weighs as much in an epoch's loss as on balanced data);
    1 for a class with no training example."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    present = counts > 0
    weights = torch.ones(num_classes, dtype=torch.float64)
    weights[present] = len(labels) / (int(present.sum()) * counts[present])
    return weights.float()


DIGITS_WHITE = 16.0  # scikit-learn's digits have 17 grey levels, 0 to 16


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as uint8 images [1797, 1, 8, 8] (levels 0-16) and int64 labels.

    Read from scikit-learn's own file, datasets/data/digits.csv.gz (64 pixels and the label a row), as its
    load_digits does, but without importing scikit-learn, which takes 2 s of a run's start on a small CPU; through
    load_digits where the file is not there (another layout of scikit-learn)."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt") as f:
            rows = torch.from_numpy(np.loadtxt(f, delimiter=","))
        images, labels = rows[:, :-1].reshape(-1, 1, 8, 8), rows[:, -1]
    else:
        from sklearn.datasets import load_digits as sklearn_digits

        bunch = sklearn_digits()
        images, labels = torch.from_numpy(bunch.images).unsqueeze(1), torch.from_numpy(bunch.target)
    return images.to(torch.uint8), labels.long()


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


DATASET_NAMES = ("digits", "synthetic", *SOURCES, "image_folder")


def load_images(cfg: DictConfig) -> tuple[Split, Split | None, Split | None, int]:
    """(training images, the dataset's own validation and test splits or None, number of classes) of data.name."""
    if cfg.name == "digits":
        return Split(*load_digits()), None, None, 10
    if cfg.name == "synthetic":
        images, labels = make_synthetic(cfg.num_samples, list(cfg.shape), cfg.num_classes, cfg.noise, cfg.seed)
        return Split(images, labels), None, None, cfg.num_classes
    if cfg.name in SOURCES:
        train, test, num_classes = load_source(cfg.name, Path(cfg.root).expanduser(), cfg.download)
        return Split(*train), None, Split(*test), num_classes
    if cfg.name == "image_folder":
        train, val, test, num_classes = load_image_folder(cfg)
        val, test = (Split(*split) if split is not None else None for split in (val, test))
        return Split(*train), val, test, num_classes
    raise ConfigError(f"data.name={cfg.name!r} is not a dataset; choose one of {', '.join(DATASET_NAMES)}")


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) std of uint8 [N, C, H, W], in float64 chunks: no float copy of it all."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for part in images.split(chunk):
        x = part.double()
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = images.numel() // images.shape[1]
    mean = total / count
    var = (squares - count * mean.square()) / max(count - 1, 1)
    return mean.float(), var.clamp_min(0).sqrt().float().clamp_min(1e-3)


def build_data(cfg: DictConfig) -> Dataset:
    """The dataset named by data.name, split into train / val / test (data.train_size of the training split), with
    the training examples' statistics."""
    train_all, val, test, num_classes = load_images(cfg)
    if test is None:
        # The test split depends on nothing but the data, so every run of a study tests on the same images.
        train_idx, test_idx = split_index(len(train_all), cfg.test_fraction, 0, "data.test_fraction")
        train_all, test = train_all.subset(train_idx), train_all.subset(test_idx)
    if val is None:  # data.val_fraction of the training split; an image folder's val/ is the validation split itself
        fit_idx, val_idx = split_index(len(train_all), cfg.val_fraction, cfg.split_seed, "data.val_fraction")
        available, val = train_all.subset(fit_idx), train_all.subset(val_idx)
        what = "what data.val_fraction leaves of it"
    else:
        available, what = train_all, "all of train/: the validation split is its own folder"
    # data.train_size: fewer training examples; validation and test stay as they are, so runs compare on them.
    # The statistics are the subset's own: a run on N examples knows nothing of the others.
    train = train_subset(available, cfg.get("train_size"), cfg.split_seed, cfg.name, what)
    train = imbalanced_subset(train, float(cfg.get("imbalance", 1.0)), num_classes, cfg.split_seed,
                              cfg.get("imbalance_profile", "exponential"), float(cfg.get("minority_fraction", 0.5)))
    mean, std = channel_stats(train.images)
    white = DIGITS_WHITE if cfg.name == "digits" else PIXEL_MAX
    return Dataset(cfg.name, train, val, test, num_classes, mean, std, len(available), white)


def batch_size_at(epoch: int, batch_size: int, schedule: Sequence[Sequence[float]] | None) -> int:
    """The training batch size of (1-based) `epoch`: batch_size times every factor whose epoch has come."""
    factor = 1.0
    for start, multiplier in schedule or []:
        if epoch >= int(start):
            factor *= multiplier
    return max(1, round(batch_size * factor))


def epoch_batch_sizes(data: DictConfig, max_epochs: int) -> list[int]:
    """The training batch size of each epoch 1 .. max_epochs (data.batch_size_schedule applied), with a warning for
    the schedule's epochs after max_epochs. The config is read once: an OmegaConf lookup costs tens of microseconds,
    which 100,000 epochs made 30 s of start-up."""
    batch_size = int(data.batch_size)
    schedule = [(int(start), float(factor)) for start, factor in data.get("batch_size_schedule") or []]
    late = [start for start, _ in schedule if start > max_epochs]
    if late:  # as the step decays a run never reaches (schedules.build_scheduler)
        log.warning(f"data.batch_size_schedule: epoch(s) {late} come after trainer.max_epochs={max_epochs}, so their "
                    "factors never apply; lower them or raise trainer.max_epochs")
    return [batch_size_at(epoch, batch_size, schedule) for epoch in range(1, max_epochs + 1)]


def epoch_steps(loader: "DeviceLoader", sizes: list[int]) -> list[int]:
    """The optimizer steps of each epoch: len(loader) at that epoch's batch size (`sizes`, from epoch_batch_sizes).
    The loader is left at the batch size it had."""
    kept, steps_at = loader.batch_size, {}
    for size in set(sizes):
        loader.set_batch_size(size)
        steps_at[size] = len(loader)
    loader.set_batch_size(kept)
    return [steps_at[size] for size in sizes]


class DeviceLoader:
    """Batches of one split, held on the device as uint8 and served as shuffled index slices.

    The epoch's order and its augmentation draw from generators seeded by (seed, epoch), so an
    epoch's batches are a pure function of the seed and the epoch number. `oversample` (data.balance=oversample)
    draws each epoch's order from balanced_order: as many examples of every class, the epoch as long as the split.
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
        augment: Augment | None = None,
        shard: tuple[int, int] = (0, 1),
        oversample: bool = False,
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
        self.rank, self.world = shard  # torchrun: this rank serves its equal part of every batch
        self.epoch = 0
        self.position = 0  # batches of the current epoch served so far
        self._augment_rng: torch.Generator | None = None
        self._resume_at: dict | None = None
        self._groups = class_groups(split.labels) if oversample else None

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

    def state_dict(self) -> dict:
        """Where the current epoch stands: its number, the batches served and the augmentation generator's state."""
        rng = self._augment_rng.get_state() if self._augment_rng is not None else None
        return {"epoch": self.epoch, "position": self.position, "batch_size": self.batch_size, "augment_rng": rng}

    def load_state_dict(self, state: dict) -> None:
        """The next iteration continues the saved epoch after its last served batch, with the same augmentation."""
        self.set_epoch(int(state["epoch"]))
        self.set_batch_size(int(state["batch_size"]))
        self._resume_at = state

    def _generator(self, stream: int, rank: int = 0, device: torch.device | None = None) -> torch.Generator:
        """Stream 0 orders the epoch (the same on every rank), 1 augments (one stream per rank; rank 0's is the one
        a single process draws). The CPU generator keeps only a seed's low 32 bits: ranks differ there."""
        seed = (self.seed * 1_000_003 + self.epoch) * 4 + stream + rank * 0x9E3779B1
        return torch.Generator(device=device or self.device).manual_seed(seed)

    def close(self) -> None:
        """Release what the loader holds beyond its tensors (DataLoader workers on the WorkerLoader path)."""

    def _start_epoch(self) -> tuple[torch.Tensor, torch.Generator | None]:
        """The epoch's order and augmentation generator, and its first batch: where a loaded state left off."""
        n = len(self.labels)
        if self._groups is not None:  # drawn on the CPU (a loop over the classes), the same on every device
            order = balanced_order(self._groups, n, self._generator(0, device=torch.device("cpu"))).to(self.device)
        elif self.shuffle:
            order = torch.randperm(n, generator=self._generator(0), device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        aug_gen = self._generator(1, self.rank) if self.augment is not None else None  # the order is every rank's
        resume, self._resume_at = self._resume_at, None
        if resume is not None and aug_gen is not None:
            aug_gen.set_state(resume["augment_rng"])
        self._augment_rng = aug_gen
        self.position = 0 if resume is None else int(resume["position"])
        return order, aug_gen

    def _parts(self) -> list[tuple[int, int]]:
        """(start, size) in the epoch's order of this rank's equal part of each batch still to serve, from the
        current position on (the whole batch without torchrun)."""
        b, n, world = self.batch_size, len(self.labels), self.world
        return [(i * b + self.rank * (min(b, n - i * b) // world), min(b, n - i * b) // world)
                for i in range(self.position, len(self))]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, aug_gen = self._start_epoch()
        # The epoch's labels in one gather: a batch's labels are then a view, not a fresh tensor per step (the
        # loop keeps them until its logging interval reads them, and fresh ones cost a small MLP 1 % a step).
        labels = self.labels[order]
        for i, (start, part) in enumerate(self._parts(), start=self.position):
            x, y = self.images[order[start:start + part]].float(), labels[start:start + part]
            if self.augment is not None:
                x, y = self.augment(x, y, aug_gen)  # pixel units (zero padding is black); y: labels or soft targets
            self.position = i + 1
            yield (x - self.mean) * self.inv_std, y


def fits_on_device(cfg: DictConfig, data: Dataset) -> bool:
    """data.loader: device or dataloader as asked; auto: device when all splits as uint8 fit data.device_max_gb."""
    if cfg.loader != "auto":
        return cfg.loader == "device"
    size = sum(split.images.numel() for split in (data.train, data.val, data.test))
    return size <= cfg.device_max_gb * 2**30


class _Samples(torch.utils.data.Dataset):
    """One image at a time for DataLoader workers; key (epoch, i): the v2 transform's randomness is seeded by
    (seed, epoch, i), so an epoch is the same however many workers serve it. An example an oversampled epoch serves
    again comes as i + k * n for its k-th repeat (n examples): the same image with a draw of its own."""

    def __init__(self, split: Split, transform: Callable[[torch.Tensor], torch.Tensor] | None, seed: int):
        self.images, self.labels, self.transform, self.seed = split.images, split.labels, transform, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = key
        image = self.images[i % len(self.labels)]
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):  # the caller's global generator is left as it was
                # the CPU generator only: torch.manual_seed would also reseed the GPU's, which fork_rng(devices=[])
                # does not restore (dropout there would restart from this seed every batch)
                torch.default_generator.manual_seed(((self.seed * 1_000_003 + epoch) * 100_000_007 + i) % 2**63)
                image = self.transform(image)
        return image, self.labels[i % len(self.labels)]


class _EpochBatches(torch.utils.data.Sampler):
    """The batch sampler of a WorkerLoader: the index lists its current epoch set, keyed by that epoch."""

    def __init__(self) -> None:
        self.epoch, self.batches = 0, []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter([[(self.epoch, i) for i in batch] for batch in self.batches])


class WorkerLoader(DeviceLoader):
    """The DataLoader path, for data that does not fit on the device: the same batches as DeviceLoader.

    Images stay on the host as uint8; DataLoader workers (data.num_workers) apply a per-image
    torchvision.transforms.v2 `transform`, batches travel through pinned memory (CUDA) to the device,
    and the batch-level `augment` (mixup, cutmix) runs there. Order, batch size, epochs and resume
    positions are DeviceLoader's, so without augmentation both paths yield identical batches.
    """

    def __init__(self, split: Split, mean: torch.Tensor, std: torch.Tensor, batch_size: int, device: torch.device, *,
                 shuffle: bool = False, drop_last: bool = False, seed: int = 0, augment: Augment | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, num_workers: int = 0,
                 shard: tuple[int, int] = (0, 1), oversample: bool = False):
        # DeviceLoader's bookkeeping (order, batch size, epoch, resume position) without its device copy of the images
        super().__init__(Split(split.images[:0], split.labels), mean, std, batch_size, device, shuffle=shuffle,
                         drop_last=drop_last, seed=seed, augment=augment, shard=shard, oversample=oversample)
        self.sampler = _EpochBatches()
        self.loader = torch.utils.data.DataLoader(
            _Samples(split, transform, seed), batch_sampler=self.sampler, num_workers=num_workers,
            pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
            generator=torch.Generator())  # its own: each epoch's base seed is not drawn from the global generator

    def close(self) -> None:
        """Stop the persistent workers now: left to garbage collection, their shutdown can stall a later,
        unrelated allocation for seconds."""
        iterator, self.loader._iterator = self.loader._iterator, None
        if iterator is not None:
            iterator._shutdown_workers()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, aug_gen = self._start_epoch()
        order = order.cpu()
        if self._groups is not None:  # an example's repeats within the epoch get transforms of their own
            order = order + occurrences(order) * len(self.labels)
        self.sampler.epoch = self.epoch
        self.sampler.batches = [order[start : start + part].tolist() for start, part in self._parts()]
        for i, (images, labels) in enumerate(self.loader, start=self.position):
            x = images.to(self.device, non_blocking=True).float()
            y = labels.to(self.device, non_blocking=True)
            if self.augment is not None:
                x, y = self.augment(x, y, aug_gen)  # mixup / cutmix: soft targets
            self.position = i + 1
            yield (x - self.mean) * self.inv_std, y


def train_loader(cfg: DictConfig, data: Dataset, device: torch.device, ranks: Ranks = Ranks()) -> DeviceLoader:
    """The shuffled training batches of cfg.data (batch size, drop_last) seeded by cfg.seed, with cfg.augmentation,
    on the path data.loader picks: batched augmentation on the device, or v2 transforms in DataLoader workers.
    Under torchrun each rank serves its part of every batch."""
    common = {"shuffle": True, "drop_last": cfg.data.drop_last, "seed": cfg.seed,
              "oversample": cfg.data.get("balance", "none") == "oversample"}
    check_sizes(cfg.augmentation, data.input_shape)  # both paths refuse them here, before any batch is drawn
    if fits_on_device(cfg.data, data):
        augment = build_augment(cfg.augmentation, data.num_classes, data.input_shape, data.white)
        return DeviceLoader(data.train, data.mean, data.std, cfg.data.batch_size, device, augment=augment,
                            shard=(ranks.rank, ranks.world), **common)
    return WorkerLoader(data.train, data.mean, data.std, cfg.data.batch_size, device,
                        augment=build_batch_mix(cfg.augmentation, data.num_classes),
                        transform=build_v2_transform(cfg.augmentation, data.white), num_workers=cfg.data.num_workers,
                        shard=(ranks.rank, ranks.world), **common)


def eval_loader(cfg: DictConfig, data: Dataset, split: Split, device: torch.device,
                ranks: Ranks = Ranks()) -> DeviceLoader:
    """Batches of a validation or test split in order, never augmented, on the path data.loader picks; under torchrun
    rank r takes examples r, r + world, ... (the metrics are summed over the ranks)."""
    if ranks.active:
        split = split.subset(torch.arange(ranks.rank, len(split), ranks.world))
    if fits_on_device(cfg.data, data):
        return DeviceLoader(split, data.mean, data.std, cfg.data.eval_batch_size, device)
    return WorkerLoader(split, data.mean, data.std, cfg.data.eval_batch_size, device, num_workers=cfg.data.num_workers)
