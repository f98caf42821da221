"""Datasets read from files: the MNIST family, CIFAR-10/100 and SVHN (downloads included), and image folders."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import socket
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from trainlab.config import ConfigError

log = logging.getLogger("trainlab")

DOWNLOAD_TIMEOUT_S = 10.0  # per blocking socket operation: an unreachable network fails in seconds, not minutes
# torchvision's ImageFolder's (IMG_EXTENSIONS: .ppm and .pgm included) and .gif; .pbm and .pnm, which PIL reads but
# ImageFolder skips, are skipped here too
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
VAL_FOLDERS = ("val", "valid", "validation")  # ImageNet's, Kaggle's and Hugging Face's names for the validation tree
CACHE_FORMAT = 2  # part of every cache's key: raise it when decoding changes (2: 16-bit images scaled, not clipped)

Images = tuple[torch.Tensor, torch.Tensor]  # uint8 [N, C, H, W], int64 [N]


# --- file formats ----------------------------------------------------------------------------------


def read_idx(path: Path) -> torch.Tensor:
    """An idx file (MNIST's format, raw or gzipped) of unsigned bytes as a uint8 tensor of its shape."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as error:  # zlib.error: a damaged .gz (not every damage is a bad CRC)
        raise ConfigError(f"{path} cannot be read ({error}); delete it and get the file again") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise ConfigError(f"{path} is not an idx file of unsigned bytes (magic {raw[:4].hex()}); delete it and get "
                          "the file again")
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    header = 4 + 4 * ndim
    if len(raw) != header + int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated or corrupt: shape {shape} needs {header + int(np.prod(shape))} "
                          f"bytes, the file has {len(raw)}; delete it and get the file again")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).view(shape)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a CIFAR batch cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # encode: bytes in protocol 2

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def read_cifar_batch(path: Path, label_key: bytes) -> Images:
    """One CIFAR python batch (a pickled dict of b'data' [N, 3072] and labels) as [N, 3, 32, 32] images."""
    try:
        with open(path, "rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="bytes").load()
        images = torch.from_numpy(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
        labels = torch.as_tensor(np.asarray(batch[label_key], dtype=np.int64))
    except (OSError, EOFError, KeyError, ValueError, TypeError, pickle.UnpicklingError) as error:
        raise ConfigError(f"{path} is not a readable CIFAR batch ({type(error).__name__}: {error}); delete it and "
                          "get the file again") from None
    if len(labels) != len(images):
        raise ConfigError(f"{path}: {len(images)} images but {len(labels)} labels; delete it and get it again")
    return images, labels


def read_svhn_mat(path: Path) -> Images:
    """An SVHN cropped-digits .mat file (X [32, 32, 3, N], y [N, 1] with 10 for the digit 0)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
        images = torch.from_numpy(np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1)).astype(np.uint8))
        labels = torch.from_numpy(mat["y"].reshape(-1).astype(np.int64) % 10)
    except Exception as error:  # noqa: BLE001 - scipy's MatReadError, IndexError (a short file), NotImplementedError
        raise ConfigError(f"{path} is not a readable SVHN .mat file ({type(error).__name__}: {error}); delete it "
                          "and get the file again") from None
    return images, labels


def _mnist_split(folder: Path, prefix: str) -> Images:
    images = read_idx(_present(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_present(folder, f"{prefix}-labels-idx1-ubyte")).long()
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise ConfigError(f"{folder}: {prefix} images {list(images.shape)} and labels {list(labels.shape)} do not "
                          "match; delete the files and get them again")
    return images.unsqueeze(1).contiguous(), labels


def _read_mnist(folder: Path) -> tuple[Images, Images]:
    return _mnist_split(folder, "train"), _mnist_split(folder, "t10k")


def _read_cifar(train_files: list[str], test_file: str, label_key: bytes) -> Callable[[Path], tuple[Images, Images]]:
    def read(folder: Path) -> tuple[Images, Images]:
        parts = [read_cifar_batch(folder / name, label_key) for name in train_files]
        train = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return train, read_cifar_batch(folder / test_file, label_key)

    return read


def _read_svhn(folder: Path) -> tuple[Images, Images]:
    return read_svhn_mat(folder / "train_32x32.mat"), read_svhn_mat(folder / "test_32x32.mat")


# --- downloadable datasets -------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where a downloadable dataset lives under data.root (torchvision's layout) and how to read it."""

    folder: str  # relative to data.root
    files: tuple[str, ...]  # expected in that folder (the idx files may also be gzipped: name + .gz)
    torchvision_class: str  # torchvision.datasets.<class> downloads it
    read: Callable[[Path], tuple[Images, Images]]  # folder -> (train, test)
    num_classes: int
    origin: str  # where to get the files by hand


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
SOURCES = {
    "mnist": Source("MNIST/raw", MNIST_FILES, "MNIST", _read_mnist, 10,
                    "https://ossci-datasets.s3.amazonaws.com/mnist/ (the four .gz files)"),
    "fashion_mnist": Source("FashionMNIST/raw", MNIST_FILES, "FashionMNIST", _read_mnist, 10,
                            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ (the four .gz files)"),
    "kmnist": Source("KMNIST/raw", MNIST_FILES, "KMNIST", _read_mnist, 10,
                     "http://codh.rois.ac.jp/kmnist/dataset/kmnist/ (the four .gz files)"),
    "cifar10": Source("cifar-10-batches-py", (*CIFAR10_TRAIN, "test_batch"), "CIFAR10",
                      _read_cifar(CIFAR10_TRAIN, "test_batch", b"labels"), 10,
                      "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract it into data.root)"),
    "cifar100": Source("cifar-100-python", ("train", "test"), "CIFAR100",
                       _read_cifar(["train"], "test", b"fine_labels"), 100,
                       "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (extract it into data.root)"),
    "svhn": Source(".", ("train_32x32.mat", "test_32x32.mat"), "SVHN", _read_svhn, 10,
                   "http://ufldl.stanford.edu/housenumbers/ (train_32x32.mat and test_32x32.mat)"),
}


def _present(folder: Path, name: str) -> Path:
    """The file `name` in `folder`, or its gzipped twin when only that one exists."""
    plain = folder / name
    return plain if plain.is_file() or not (folder / f"{name}.gz").is_file() else folder / f"{name}.gz"


def missing_files(source: Source, folder: Path) -> list[str]:
    """The expected files of `source` that `folder` lacks (an idx file may be present gzipped)."""
    return [name for name in source.files if not _present(folder, name).is_file()]


def _absent_message(name: str, source: Source, root: Path, missing: list[str]) -> str:
    folder = (root / source.folder).resolve()
    return (f"data={name}: the dataset is not in data.root={root.resolve()}. Expected in {folder}: "
            f"{', '.join(source.files)} (missing: {', '.join(missing)}). Get them with data.download=true on a "
            f"machine with internet (then copy data.root here), or download {source.origin} and place the files "
            f"in {folder}, or point data.root (or the TRAINLAB_DATA environment variable) at a directory that "
            "holds them.")


def load_source(name: str, root: Path, download: bool) -> tuple[Images, Images, int]:
    """(train, test, number of classes) of a downloadable dataset, downloading it first when asked and absent."""
    source = SOURCES[name]
    folder = root / source.folder
    missing = missing_files(source, folder)
    if len(missing) > 0 and not download:
        raise ConfigError(_absent_message(name, source, root, missing))
    if len(missing) > 0:
        download_source(name, root)
    train, test = source.read(folder)
    for split, (_, labels) in (("train", train), ("test", test)):
        # another dataset's files in this one's place (EMNIST letters 1-26 as MNIST) trained until the loss met a
        # label past the model's outputs ("Target 18 is out of bounds"; on a GPU a device-side assert)
        outside = labels[(labels < 0) | (labels >= source.num_classes)]
        if len(outside) > 0:
            raise ConfigError(f"data={name}: the {split} labels in {folder.resolve()} include {int(outside[0])} "
                              f"({len(outside)} of {len(labels)} outside 0-{source.num_classes - 1}): these are not "
                              f"{name}'s files; replace them with the files from {source.origin}")
    return train, test, source.num_classes


def download_source(name: str, root: Path) -> None:
    """Download through torchvision into a temporary folder, then move the complete files into place.

    Every socket operation times out after DOWNLOAD_TIMEOUT_S. On any failure nothing is left behind:
    the temporary folder and any directories created for it are removed.
    """
    import torchvision

    source = SOURCES[name]
    created = [p for p in (root, *root.parents) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    done = False
    try:
        log.info(f"downloading {name} into {root.resolve()} (torchvision.datasets.{source.torchvision_class})")
        dataset_class = getattr(torchvision.datasets, source.torchvision_class)
        splits = [{"split": "train"}, {"split": "test"}] if name == "svhn" else [{"train": True}, {"train": False}]
        for kwargs in splits:
            dataset_class(str(tmp), download=True, **kwargs)
        still_missing = missing_files(source, tmp / source.folder)
        if len(still_missing) > 0:
            raise RuntimeError(f"the download did not produce {', '.join(still_missing)}")
        (root / source.folder).mkdir(parents=True, exist_ok=True)
        for file in source.files:
            found = _present(tmp / source.folder, file)
            os.replace(found, root / source.folder / found.name)
        done = True
    except Exception as error:  # noqa: BLE001 - any failure (no network, timeout, bad archive) means the same
        raise ConfigError(_absent_message(name, source, root, list(source.files))
                          + f" Downloading failed: {type(error).__name__}: {error}") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
        shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            for path in created:  # deepest first; only directories this call created, and only when empty
                try:
                    path.rmdir()
                except OSError:
                    break


# --- image folders ---------------------------------------------------------------------------------


def _folders(tree: Path, cache_dir: Path | None) -> list[str]:
    """The names of tree's subfolders, sorted, less hidden ones and data.cache_dir: with the defaults (data.root data/,
    the cache in data/cache) images in data/<class>/ made a second run refuse the first run's cache as a class."""
    cache = cache_dir.resolve() if cache_dir is not None else None
    return sorted(d.name for d in tree.iterdir() if d.is_dir() and not d.name.startswith(".") and d.resolve() != cache)


def scan_tree(tree: Path, cache_dir: Path | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image file, class index)]) of a directory of class subfolders, sorted by name."""
    classes = _folders(tree, cache_dir)
    if len(classes) < 2:
        raise ConfigError(f"data.path: {tree} holds {len(classes)} class folder(s) ({', '.join(classes) or 'none'}); "
                          "an image folder needs one subfolder of images per class, at least 2 classes")
    files = []
    for index, name in enumerate(classes):
        images = sorted(p for p in (tree / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                        and not p.name.startswith("."))
        if len(images) == 0:
            raise ConfigError(f"data.path: the class folder {tree / name} holds no images "
                              f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
        files += [(p, index) for p in images]
    return classes, files


def decode_images(files: list[tuple[Path, int]], size: int, channels: int) -> Images:
    """Decode and resize (bilinear, to size x size) every file once, into uint8 [N, channels, size, size]."""
    from PIL import Image

    mode = {1: "L", 3: "RGB"}[channels]
    images = torch.empty(len(files), channels, size, size, dtype=torch.uint8)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as image:
                image = _eight_bit(image, path)
                image = image.convert(mode)
                if image.size != (size, size):
                    image = image.resize((size, size), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.uint8).reshape(size, size, channels)
        # PIL's UnidentifiedImageError is an OSError; DecompressionBombError (over 179 M pixels) is not
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise ConfigError(f"data.path: cannot read the image {path} ({type(error).__name__}: {error}); "
                              "replace or remove the file") from None
        images[i] = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    return images, torch.tensor([label for _, label in files], dtype=torch.long)


def _eight_bit(image: Any, path: Path) -> Any:
    """16-bit grey levels (PIL modes I;16*, and I within 0-65535) as 8-bit "L": PIL's convert clips them at 255, so a
    16-bit image came out nearly white. Floating-point pixels have no range to scale by: refused."""
    from PIL import Image

    if image.mode == "F":
        raise ConfigError(f"data.path: the image {path} has floating-point pixels (PIL mode F), whose range is "
                          "unknown; convert the images to 8 or 16 bits")
    if not image.mode.startswith("I"):
        return image
    levels = np.asarray(image).astype(np.int64)
    if levels.min() < 0 or levels.max() > 65535:
        raise ConfigError(f"data.path: the image {path} has 32-bit integer pixels outside 0-65535; convert the images "
                          "to 8 or 16 bits")
    return Image.fromarray((levels >> 8).astype(np.uint8), mode="L")


def folder_entries(root: Path, files: list[tuple[Path, int]]) -> list[list]:
    """[relative path, byte size, modification time, label] of every file: what a cache key is made of."""
    entries = []
    for path, label in files:
        stat = path.stat()
        entries.append([str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns, label])
    return entries


def cache_key(entries: list[list], size: int, channels: int) -> str:
    """A digest of the folder's contents (folder_entries), the image size and channels, and the decoder's format."""
    text = json.dumps([CACHE_FORMAT, size, channels, entries])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cache_prefix(root: Path) -> str:
    """image_folder_<name>_<digest of the absolute path>_: the start of the names of one folder's caches and of no
    other folder's (two folders called imgs/ elsewhere share the name, not the digest)."""
    where = root.resolve()
    return f"image_folder_{where.name}_{hashlib.sha256(str(where).encode()).hexdigest()[:12]}_"


def remove_superseded(cache: Path, prefix: str, entries: list[list]) -> list[Path]:
    """Delete the caches beside `cache` of the same folder (`prefix`) whose key is not the folder's current one at
    their size and channels: written before its files changed, or by an older decoder, they can never be read again.
    A cache of the current files at another size stays. Only names that trainlab writes match (save_atomic's
    temporary files start with a dot); a file that another run deleted first, or that cannot be deleted, is skipped.

    Safe when runs race: caches are only ever read by their exact name, which holds the key, so deleting one can only
    cost a run that wanted it a fresh decode (one that has the file open reads on, where the system allows deleting
    it; where it does not, the deletion fails and is skipped)."""
    pattern = re.compile(re.escape(prefix) + r"([1-9][0-9]*)px_([13])ch_([0-9a-f]{20})\.pt")
    removed = []
    for path in sorted(cache.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or path.name == cache.name or path.is_symlink() or not path.is_file():
            continue
        if match[3] == cache_key(entries, int(match[1]), int(match[2])):
            continue
        try:
            path.unlink()
        except OSError:  # FileNotFoundError: another run was first; PermissionError: open elsewhere (Windows)
            continue
        removed.append(path)
    return removed


def _split_trees(cfg: DictConfig, root: Path, cache_dir: Path | None) -> dict[str, Path]:
    """{"train": root} for one tree of class folders; {"train", "test"} and, with a val/ (valid/, validation/) folder,
    "val": the trees of a split layout. A layout that is neither is refused, naming the fix."""
    trees = {"train": root / "train", "test": root / "test"}
    if not all(t.is_dir() for t in trees.values()):
        one = next((split for split, tree in trees.items() if tree.is_dir()), None)
        others = [name for name in _folders(root, cache_dir) if name not in trees]
        if one is not None:  # a split layout (train/ with val/, say) whose folders would otherwise become the classes
            missing = "test" if one == "train" else "train"
            besides = f" and {', '.join(o + '/' for o in others)}" if others else ""
            rename = (f"rename {others[0]}/ to {missing}/ to {'test on it' if missing == 'test' else 'train on it'} "
                      "(the validation split is then taken from train/ by data.val_fraction), or "
                      if len(others) == 1 else "")
            val = next((o for o in others if o in VAL_FOLDERS), None)
            stays = f" ({val}/ is then the validation split)" if missing == "test" and val is not None else ""
            raise ConfigError(f"data.path={cfg.path}: holds {one}/{besides} but no {missing}/; {rename}add "
                              f"{root / missing} with the same class folders{stays}, or give data.path={root / one} "
                              "(its class folders are then split by data.test_fraction)")
        return {"train": root}
    vals = [name for name in VAL_FOLDERS if (root / name).is_dir()]
    if len(vals) > 1:
        raise ConfigError(f"data.path={cfg.path}: holds {' and '.join(v + '/' for v in vals)} beside train/ and "
                          "test/, and either could be the validation split; keep one of them (merge the others into "
                          "it, or move them out of data.path)")
    if len(vals) == 1:
        trees = {"train": trees["train"], "val": root / vals[0], "test": trees["test"]}
    _refuse_idle_fractions(cfg, root, trees)
    return trees


def _refuse_idle_fractions(cfg: DictConfig, root: Path, trees: dict[str, Path]) -> None:
    """A split read from its own folder leaves its fraction nothing to do: set away from its default, the fraction is
    refused rather than ignored (a sweep over it would train the same run again and again). Set to its default, it
    cannot be told from the default and changes nothing."""
    from trainlab.config import ImageFolderConfig

    for split, key in (("test", "test_fraction"), ("val", "val_fraction")):
        default = getattr(ImageFolderConfig, key)
        if split not in trees or cfg.get(key, default) == default:
            continue
        folder = trees[split].name
        role, fix = (("validation split, and all of train/ trains", f"move {folder}/ out of data.path (the validation "
                      "split is then data.val_fraction of train/)") if split == "val" else
                     ("test split", f"give data.path={root / 'train'} (its class folders are then split by "
                      "data.test_fraction)"))
        raise ConfigError(f"data.{key}={cfg.get(key)} does nothing here: data.path={cfg.path} holds {folder}/, "
                          f"which is the {role}; drop data.{key} (its default is {default}), or {fix}")


def _same_classes(cfg: DictConfig, classes: list[str], split: str, tree: Path, theirs: list[str]) -> None:
    """Refuse a val/ or test/ tree whose class folders are not train/'s, naming those missing on either side."""
    if theirs == classes:
        return
    missing, extra = [c for c in classes if c not in theirs], [c for c in theirs if c not in classes]
    lacks = ([f"{tree.name}/ lacks {', '.join(missing)}"] if missing else []) + (
        [f"train/ lacks {', '.join(extra)}"] if extra else [])
    other = (f", or move {tree.name}/ out of data.path to take the validation split from train/ by "
             "data.val_fraction" if split == "val" else "")
    raise ConfigError(f"data.path={cfg.path}: train/ and {tree.name}/ have different class folders "
                      f"({'; '.join(lacks)}); give {tree.name}/ the same class folders as "
                      f"train/ (a label is its folder's place among the sorted names){other}")


def load_image_folder(cfg: DictConfig) -> tuple[Images, Images | None, Images | None, int]:
    """(train, val or None, test or None, classes) of data.path: train/ and test/ trees, with val/ (valid/,
    validation/) as the validation split when there is one, or one tree split by test_fraction."""
    from trainlab.checkpoint import save_atomic

    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "no such directory"
        raise ConfigError(f"data.path={cfg.path}: {what} ({root.resolve()}); give a folder of class "
                          "subfolders, or one with train/ and test/ subfolders of class subfolders")
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir is not None else None
    trees = _split_trees(cfg, root, cache_dir)
    scanned = {split: scan_tree(tree, cache_dir) for split, tree in trees.items()}
    classes = scanned["train"][0]
    for split in ("val", "test"):
        if split in scanned:
            _same_classes(cfg, classes, split, trees[split], scanned[split][0])
    if "val" in scanned:
        log.info(f"image_folder: the validation split is {trees['val']} ({len(scanned['val'][1])} images); all of "
                 "train/ trains")
    size, channels = int(cfg.image_size), int(cfg.channels)
    all_files = [f for _, files in scanned.values() for f in files]
    cache = entries = None
    if cache_dir is not None:
        entries = folder_entries(root, all_files)
        cache = cache_dir / f"{cache_prefix(root)}{size}px_{channels}ch_{cache_key(entries, size, channels)}.pt"
        if cache.is_file():
            try:
                stored = torch.load(cache, weights_only=True)
                log.info(f"image_folder: {len(all_files)} images from the cache {cache}")
                return _cached_splits(stored, len(classes))
            except FileNotFoundError:  # another run deleted it just now as superseded (its view of the files is
                pass  # newer, or older): decode
            except Exception as error:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
                log.warning(f"image_folder: ignoring the unreadable cache {cache} ({error}); decoding again")
    tic = time.perf_counter()
    decoded = {split: decode_images(files, size, channels) for split, (_, files) in scanned.items()}
    log.info(f"image_folder: decoded {len(all_files)} images from {root} in {time.perf_counter() - tic:.1f} s")
    stored = {"format": CACHE_FORMAT, "classes": classes}
    for split, (images, labels) in decoded.items():
        stored[f"{split}_images"], stored[f"{split}_labels"] = images, labels
    if cache is not None:
        try:  # the cache only saves decoding time: a data.root that cannot be written (read-only, full) stops nothing
            save_atomic(stored, cache)
            log.info(f"image_folder: cached as {cache}")
        except OSError as error:
            log.warning(f"image_folder: cannot write the cache {cache} ({error.__cause__ or error}); training on "
                        "without it (each run decodes again): set data.cache_dir to a writable folder, or null")
        else:
            try:
                for old in remove_superseded(cache, cache_prefix(root), entries):
                    log.info(f"image_folder: deleted the superseded cache {old} (the folder's files changed)")
            except OSError as error:  # the listing itself failed: the old caches stay, nothing else changes
                log.warning(f"image_folder: cannot look for superseded caches in {cache_dir} ({error})")
    return _cached_splits(stored, len(classes))


def _cached_splits(stored: dict, num_classes: int) -> tuple[Images, Images | None, Images | None, int]:
    train = stored["train_images"], stored["train_labels"]
    val, test = ((stored[f"{split}_images"], stored[f"{split}_labels"]) if f"{split}_images" in stored else None
                 for split in ("val", "test"))
    return train, val, test, num_classes
