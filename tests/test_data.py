"""Datasets from their real on-disk formats, image folders and their cache, splits, offline behaviour, and the
DataLoader path against the device path."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import socket
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg
from trainlab import data, datasets
from trainlab.config import ConfigError, validate

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILE_OPTIONS = ("mnist", "fashion_mnist", "kmnist", "cifar10", "cifar100", "svhn", "image_folder")


# --- writers of the real formats -------------------------------------------------------------------


def numbered_images(n: int, shape: tuple[int, ...], start: int = 0) -> np.ndarray:
    """uint8 images whose first pixel is their index (mod 256) and the rest a fixed pattern: each one findable."""
    rng = np.random.default_rng(start)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    images.reshape(n, -1)[:, 0] = (np.arange(n) + start) % 256
    return images


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(f"{path}.gz", "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist(root: Path, folder: str = "MNIST/raw", n_train: int = 60, n_test: int = 20, gz: bool = False):
    """The four idx files of the MNIST family; returns (train images, train labels, test images, test labels)."""
    made = []
    for prefix, n, start in (("train", n_train, 0), ("t10k", n_test, 1000)):
        images = numbered_images(n, (28, 28), start)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(root / folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
        made += [images, labels]
    return made


def write_cifar(root: Path, hundred: bool = False, per_batch: int = 12, n_test: int = 10):
    """CIFAR python batches (pickled dicts of bytes keys, as the real files); returns (train x, y, test x, y)."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    count = per_batch * (5 if hundred else 1)
    label_key = b"fine_labels" if hundred else b"labels"
    xs, ys = [], []
    for k, name in enumerate([*names, "test"if hundred else "test_batch"]):
        n = n_test if name.startswith("test") else count
        x = numbered_images(n, (3072,), start=100 * k)
        y = [int(v) for v in (np.arange(n) * 7 + k) % (100 if hundred else 10)]
        batch = {b"batch_label": name.encode(), label_key: y, b"data": x, b"filenames": [b"x.png"] * n}
        if hundred:
            batch[b"coarse_labels"] = [v // 5 for v in y]
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
        xs.append(x.reshape(n, 3, 32, 32))
        ys.append(np.array(y))
    return np.concatenate(xs[:-1]), np.concatenate(ys[:-1]), xs[-1], ys[-1]


def write_svhn(root: Path, n_train: int = 30, n_test: int = 10):
    from scipy.io import savemat

    made = []
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        images = numbered_images(n, (3, 32, 32), start=n)
        y = (np.arange(n) % 10).reshape(n, 1)
        y[y == 0] = 10  # SVHN's label for the digit 0
        root.mkdir(parents=True, exist_ok=True)
        savemat(root / name, {"X": images.transpose(2, 3, 1, 0), "y": y.astype(np.uint8)})
        made += [images, y.reshape(-1) % 10]
    return made


def write_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 8, size: int = 12) -> None:
    """PNG and JPEG files (alternating) of solid colours, one colour per class, in class subfolders."""
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour = (40 + 80 * c, 255 - 60 * c, (37 * i) % 256)
            ext = "png" if i % 2 == 0 else "jpg"
            Image.new("RGB", (size, size + 2), colour).save(root / name / f"{i:03d}.{ext}")


def data_cfg(option: str, **keys):
    cfg = compose_cfg([f"data={option}", *[f"data.{k}={v}" for k, v in keys.items()]])
    return cfg.data


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else ["<absent>"]


# --- real formats through the real loading code ----------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzipped"])
@pytest.mark.parametrize(("option", "folder"), [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"),
                                                 ("kmnist", "KMNIST/raw")])
def test_mnist_family_from_idx_files(tmp_path, option, folder, gz):
    train_x, train_y, test_x, test_y = write_mnist(tmp_path, folder, gz=gz)
    d = data.build_data(data_cfg(option, root=tmp_path))
    assert (d.name, d.num_classes, d.input_shape) == (option, 10, (1, 28, 28))
    assert torch.equal(d.test.images, torch.from_numpy(test_x).unsqueeze(1))  # the official test split, as is
    assert torch.equal(d.test.labels, torch.from_numpy(test_y).long())
    assert (len(d.train), len(d.val)) == (54, 6)  # val carved from the 60 training images
    everything = torch.cat([d.train.images, d.val.images])
    assert sorted(everything[:, 0, 0, 0].tolist()) == list(range(60))
    assert d.train.images.dtype == torch.uint8 and d.train.labels.dtype == torch.int64


@pytest.mark.parametrize("hundred", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_from_python_batches(tmp_path, hundred):
    train_x, train_y, test_x, test_y = write_cifar(tmp_path, hundred)
    d = data.build_data(data_cfg("cifar100" if hundred else "cifar10", root=tmp_path, val_fraction=0.5))
    assert (d.num_classes, d.input_shape) == (100 if hundred else 10, (3, 32, 32))
    assert torch.equal(d.test.images, torch.from_numpy(test_x))
    assert torch.equal(d.test.labels, torch.from_numpy(test_y).long())
    index = data.split_index(60, 0.5, seed=0)
    assert torch.equal(d.train.images, torch.from_numpy(train_x)[index[0]])
    assert torch.equal(d.val.labels, torch.from_numpy(train_y).long()[index[1]])


def test_svhn_from_mat_files_maps_label_10_to_digit_0(tmp_path):
    pytest.importorskip("scipy.io", reason="scipy reads SVHN's .mat files")
    train_x, train_y, test_x, test_y = write_svhn(tmp_path)
    d = data.build_data(data_cfg("svhn", root=tmp_path))
    assert torch.equal(d.test.images, torch.from_numpy(test_x))
    assert torch.equal(d.test.labels, torch.from_numpy(test_y).long())
    assert int(d.test.labels.max()) == 9 and 0 in d.test.labels.tolist()


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as handle:
        pickle.dump({b"data": Evil(), b"labels": []}, handle)
    with pytest.raises(ConfigError, match=r"data_batch_3 is not a readable CIFAR batch.*system is not allowed"):
        data.build_data(data_cfg("cifar10", root=tmp_path))
    assert not marker.exists()


def test_truncated_idx_file_names_the_file(tmp_path):
    write_mnist(tmp_path)
    images = tmp_path / "MNIST/raw/t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(ConfigError, match=r"t10k-images-idx3-ubyte is truncated or corrupt"):
        data.build_data(data_cfg("mnist", root=tmp_path))


def test_a_damaged_gzip_idx_file_names_the_file(tmp_path):
    """Damage inside the deflate stream raised zlib.error: a traceback and exit 1, not the file and the fix."""
    write_mnist(tmp_path, gz=True)
    labels = tmp_path / "MNIST/raw/train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(b"")[:10] + b"\xff" * 40)  # a gzip header, then no valid deflate block
    with pytest.raises(ConfigError, match=r"train-labels-idx1-ubyte\.gz cannot be read .*delete it and get the file"):
        data.build_data(data_cfg("mnist", root=tmp_path))


@pytest.mark.parametrize("keep", [0, 100], ids=["empty", "header-only"])
def test_a_short_svhn_file_names_the_file(tmp_path, keep):
    """An empty .mat raised scipy's MatReadError, one cut after its header an IndexError: tracebacks, exit 1."""
    pytest.importorskip("scipy.io", reason="scipy reads SVHN's .mat files")
    write_svhn(tmp_path)
    test = tmp_path / "test_32x32.mat"
    test.write_bytes(test.read_bytes()[:keep])
    with pytest.raises(ConfigError, match=r"test_32x32\.mat is not a readable SVHN \.mat file"):
        data.build_data(data_cfg("svhn", root=tmp_path))


def test_labels_outside_the_classes_are_refused_naming_the_folder(tmp_path):
    """EMNIST letters (labels 1-26) in MNIST's place trained until cross-entropy met label 18: exit 1 mid-run."""
    write_mnist(tmp_path)
    write_idx(tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte", (np.arange(20) % 26 + 1).astype(np.uint8))
    with pytest.raises(ConfigError, match=r"data=mnist: the test labels in .*MNIST/raw include 10 \(11 of 20 outside "
                                          r"0-9\): these are not mnist's files"):
        data.build_data(data_cfg("mnist", root=tmp_path))


# --- offline: absent files, failed downloads ---------------------------------------------------------


@pytest.mark.parametrize("exists", [True, False], ids=["root-exists", "root-absent"])
def test_absent_dataset_without_download_names_dataset_directory_files_and_fix(tmp_path, exists):
    root = tmp_path / "store"
    if exists:
        (root / "cifar-10-batches-py").mkdir(parents=True)
        (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x")
    before = listing(tmp_path)
    with pytest.raises(ConfigError) as info:
        data.build_data(data_cfg("cifar10", root=root))
    message = str(info.value)
    for part in ("data=cifar10", str(root.resolve() / "cifar-10-batches-py"), "data_batch_5, test_batch",
                 "data.download=true", "cifar-10-python.tar.gz", "TRAINLAB_DATA"):
        assert part in message
    missing = message.split("missing: ")[1].split(")")[0]
    assert missing == ("data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch" if exists
                       else "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch")
    assert listing(tmp_path) == before


def unreachable(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Temporary failure in name resolution (network unreachable in test)")


@pytest.mark.parametrize("option", ["mnist", "cifar10", "svhn"])
@pytest.mark.parametrize("exists", [True, False], ids=["root-exists", "root-absent"])
def test_download_without_network_fails_fast_and_leaves_the_directory_as_it_was(tmp_path, monkeypatch, option,
                                                                                 exists):
    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    root = tmp_path / "store" / "nested"
    if exists:
        root.mkdir(parents=True)
        (root / "notes.txt").write_text("mine")
    before = listing(tmp_path)
    tic = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        data.build_data(data_cfg(option, root=root, download=True))
    assert time.perf_counter() - tic < 10
    message = str(info.value)
    assert f"data={option}" in message and str(root.resolve()) in message and "Downloading failed" in message
    assert listing(tmp_path) == before
    assert socket.getdefaulttimeout() is None


class PartialThenFail:
    """Stands in for a torchvision dataset class: writes half a file, records the socket timeout, then fails."""

    timeouts: list = []

    def __init__(self, root, download, **kwargs):
        PartialThenFail.timeouts.append(socket.getdefaulttimeout())
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b half")
        raise TimeoutError("timed out")


def test_interrupted_download_leaves_no_partial_file_and_uses_a_short_timeout(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "MNIST", PartialThenFail)
    with pytest.raises(ConfigError, match="Downloading failed: TimeoutError: timed out"):
        data.build_data(data_cfg("mnist", root=tmp_path / "store", download=True))
    assert listing(tmp_path) == []
    assert PartialThenFail.timeouts == [datasets.DOWNLOAD_TIMEOUT_S]


def test_completed_download_moves_the_files_into_place(tmp_path, monkeypatch):
    import torchvision

    class FakeMNIST:
        def __init__(self, root, download, train):
            if train:
                write_mnist(Path(root), gz=True)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    root = tmp_path / "store"
    d = data.build_data(data_cfg("mnist", root=root, download=True))
    assert (len(d.train) + len(d.val), len(d.test)) == (60, 20)
    assert listing(root) == ["MNIST", "MNIST/raw", *[f"MNIST/raw/{f}.gz" for f in sorted(datasets.MNIST_FILES)]]


# --- image folders ---------------------------------------------------------------------------------


def test_image_folder_single_tree_png_and_jpeg_resized_and_split_by_fraction(tmp_path):
    write_image_folder(tmp_path / "imgs")
    cfg = data_cfg("image_folder", path=tmp_path / "imgs", image_size=8, test_fraction=0.25, cache_dir="null")
    d = data.build_data(cfg)
    assert (d.num_classes, d.input_shape) == (3, (3, 8, 8))
    assert (len(d.train) + len(d.val), len(d.test)) == (18, 6)
    everything = torch.cat([d.train.images, d.val.images, d.test.images])
    labels = torch.cat([d.train.labels, d.val.labels, d.test.labels])
    for c in range(3):  # solid colours survive decoding and resizing (JPEG within a few levels)
        red = everything[labels == c][:, 0].float()
        assert (red - (40 + 80 * c)).abs().max() <= 3
    assert not (tmp_path / "data").exists()  # cache_dir=null writes nothing


def test_image_folder_train_and_test_subfolders_and_greyscale(tmp_path):
    write_image_folder(tmp_path / "imgs" / "train", per_class=6)
    write_image_folder(tmp_path / "imgs" / "test", per_class=2)
    d = data.build_data(data_cfg("image_folder", path=tmp_path / "imgs", image_size=5, channels=1,
                                 cache_dir="null"))
    assert (len(d.train) + len(d.val), len(d.test), d.input_shape) == (18, 6, (1, 5, 5))
    assert d.test.labels.tolist() == [0, 0, 1, 1, 2, 2]


def write_solid(folder: Path, colours: dict[str, tuple[int, int, int]], per_class: int, ext: str = "png") -> None:
    """per_class images of one exact colour per class folder (PNG and the PNM formats keep it exactly)."""
    from PIL import Image

    for name, colour in colours.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (12, 12), colour)
            (image.convert("L") if ext == "pgm" else image).save(folder / name / f"{i:03d}.{ext}")


@pytest.mark.parametrize("spelling", ["val", "valid", "validation"])
def test_image_folder_val_folder_is_the_validation_split_and_all_of_train_trains(tmp_path, spelling):
    """A val/ beside train/ and test/ was ignored: validation was carved out of train/ (2 of its 18 images)."""
    root = tmp_path / "imgs"
    write_image_folder(root / "train", per_class=6)
    write_image_folder(root / "test", per_class=2)
    cfg = data_cfg("image_folder", path=root, image_size=8, cache_dir=tmp_path / "cache")
    before = data.build_data(cfg)
    assert (len(before.train), len(before.val), len(before.test)) == (16, 2, 6)
    # blue 222 marks validation images: no train/ image has it (blues 0-185)
    write_solid(root / spelling, {"cat": (40, 255, 222), "dog": (120, 195, 222), "eel": (200, 135, 222)}, per_class=3)
    d = data.build_data(cfg)  # the cache of train/ and test/ alone is not taken for this layout
    assert (len(d.train), len(d.val), len(d.test), d.train_available) == (18, 9, 6, 18)
    assert d.val.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and bool((d.val.images[:, 2] == 222).all())
    assert not bool((d.train.images[:, 2] == 222).any())
    assert torch.equal(torch.sort(d.train.images.flatten(1).sum(1)).values,
                       torch.sort(torch.cat([before.train.images, before.val.images]).flatten(1).sum(1)).values)
    again = data.build_data(cfg)  # from the cache, which holds the validation split
    assert torch.equal(again.val.images, d.val.images) and torch.equal(again.train.images, d.train.images)
    with pytest.raises(ConfigError, match=r"data.train_size=19: the training split of image_folder holds 18 examples "
                                          r"\(all of train/: the validation split is its own folder\)"):
        data.build_data(data_cfg("image_folder", path=root, image_size=8, cache_dir="null", train_size=19))


def test_image_folder_a_fraction_whose_split_has_its_folder_is_refused_when_set(tmp_path):
    """With val/ (test/), data.val_fraction (data.test_fraction) does nothing: a value set away from the default
    must not be accepted in silence (a sweep over it trains one run again and again)."""
    root = tmp_path / "imgs"
    write_image_folder(root / "train", per_class=4)
    write_image_folder(root / "test", per_class=2)
    with pytest.raises(ConfigError, match=r"data.test_fraction=0.3 does nothing here: data.path=.*imgs holds test/, "
                                          r"which is the test split; drop data.test_fraction \(its default is 0.2\)"):
        data.build_data(data_cfg("image_folder", path=root, cache_dir="null", test_fraction=0.3))
    assert len(data.build_data(data_cfg("image_folder", path=root, cache_dir="null", val_fraction=0.25)).val) == 3
    write_image_folder(root / "valid", per_class=1)
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.25 does nothing here: data.path=.*imgs holds valid/, "
                                          r"which is the validation split, and all of train/ trains; drop "
                                          r"data.val_fraction \(its default is 0.1\), or move valid/ out of data.path"):
        data.build_data(data_cfg("image_folder", path=root, cache_dir="null", val_fraction=0.25))
    assert len(data.build_data(data_cfg("image_folder", path=root, cache_dir="null")).val) == 3


@pytest.mark.parametrize(("layout", "message"), [
    ({"val": ("cat", "dog", "fox")}, r"train/ and val/ have different class folders \(val/ lacks eel; train/ lacks "
                                     r"fox\); give val/ the same class folders as train/ .*, or move val/ out of "
                                     r"data.path to take the validation split from train/ by data.val_fraction"),
    ({"validation": ("cat", "dog")}, r"train/ and validation/ have different class folders \(validation/ lacks eel\)"),
    ({"val": ("cat", "dog", "eel"), "valid": ("cat", "dog", "eel")},
     r"holds val/ and valid/ beside train/ and test/, and either could be the validation split; keep one of them"),
])
def test_image_folder_val_folders_that_cannot_be_the_validation_split_are_refused(tmp_path, layout, message):
    root = tmp_path / "imgs"
    write_image_folder(root / "train", per_class=4)
    write_image_folder(root / "test", per_class=2)
    for name, classes in layout.items():
        write_image_folder(root / name, classes=classes, per_class=2)
    with pytest.raises(ConfigError, match=message):
        data.build_data(data_cfg("image_folder", path=root, cache_dir=tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()  # refused before anything is decoded or written


def test_image_folder_reads_ppm_and_pgm_files(tmp_path):
    """torchvision's ImageFolder takes .ppm and .pgm; here they were skipped (a folder of them "holds no images")."""
    write_solid(tmp_path / "imgs", {"colour": (10, 20, 30)}, per_class=3, ext="ppm")
    write_solid(tmp_path / "imgs", {"grey": (200, 200, 200)}, per_class=4, ext="pgm")
    d = data.build_data(data_cfg("image_folder", path=tmp_path / "imgs", image_size=6, cache_dir="null",
                                 test_fraction=0.3))
    images = torch.cat([d.train.images, d.val.images, d.test.images])
    labels = torch.cat([d.train.labels, d.val.labels, d.test.labels])
    assert torch.bincount(labels).tolist() == [3, 4]
    assert torch.equal(images[labels == 0][:, :, 0, 0], torch.tensor([[10, 20, 30]] * 3, dtype=torch.uint8))
    assert bool((images[labels == 1] == 200).all())


def test_image_folder_superseded_caches_of_the_folder_are_deleted_and_nothing_else(tmp_path, monkeypatch):
    """A cache of a folder whose files changed can never be read again; it stayed forever."""
    from PIL import Image

    cache_dir = tmp_path / "cache"
    for where in ("imgs", "elsewhere/imgs"):  # two folders of the same name
        write_image_folder(tmp_path / where)
        data.build_data(data_cfg("image_folder", path=tmp_path / where, cache_dir=cache_dir))
    data.build_data(data_cfg("image_folder", path=tmp_path / "imgs", cache_dir=cache_dir, channels=1))
    before = set(cache_dir.iterdir())
    (cache_dir / "image_folder_notes.txt").write_text("not a cache")
    (cache_dir / ".image_folder_x.pt.tmp").write_text("another run's cache being written")
    Image.new("RGB", (12, 12), (0, 0, 0)).save(tmp_path / "imgs" / "dog" / "000.png")  # changed contents
    decoded = []
    real_decode = datasets.decode_images
    monkeypatch.setattr(datasets, "decode_images", lambda *a: decoded.append(1) or real_decode(*a))
    d = data.build_data(data_cfg("image_folder", path=tmp_path / "imgs", cache_dir=cache_dir, image_size=16))
    after = set(cache_dir.iterdir())
    (new,) = after - before - {cache_dir / "image_folder_notes.txt", cache_dir / ".image_folder_x.pt.tmp"}
    assert "_16px_3ch_" in new.name and decoded == [1]
    gone = before - after  # the 32-px RGB and greyscale caches of imgs/ before the change; elsewhere/imgs's stays
    assert len(gone) == 2 and all(p.name.startswith(datasets.cache_prefix(tmp_path / "imgs")) for p in gone)
    assert len(after) == 4 and any(p.name.startswith(datasets.cache_prefix(tmp_path / "elsewhere/imgs")) for p in after)
    # the new cache is the one used: a second run decodes nothing, and a cache of the current files at another
    # size is not superseded by it
    again = data.build_data(data_cfg("image_folder", path=tmp_path / "imgs", cache_dir=cache_dir, image_size=16))
    assert decoded == [1] and torch.equal(again.train.images, d.train.images)
    data.build_data(data_cfg("image_folder", path=tmp_path / "imgs", cache_dir=cache_dir))
    assert decoded == [1, 1] and set(cache_dir.iterdir()) > after


def test_image_folder_a_cache_deleted_by_another_run_before_it_is_read_is_decoded_again(tmp_path, monkeypatch, caplog):
    """Runs of a sweep share the cache folder: one may delete a cache another has just found."""
    write_image_folder(tmp_path / "imgs")
    cfg = data_cfg("image_folder", path=tmp_path / "imgs", cache_dir=tmp_path / "cache")
    first = data.build_data(cfg)

    def deleted_first(path, *args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", deleted_first)
        again = data.build_data(cfg)
    assert torch.equal(again.train.images, first.train.images) and "unreadable" not in caplog.text


def test_image_folder_cache_is_written_once_reused_and_keyed_by_contents_and_size(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "imgs")
    cache_dir = tmp_path / "cache"
    first = data.build_data(data_cfg("image_folder", path=tmp_path / "imgs", cache_dir=cache_dir))
    (cache_file,) = cache_dir.iterdir()
    assert "_32px_3ch_" in cache_file.name
    decoded = []
    real_decode = datasets.decode_images
    monkeypatch.setattr(datasets, "decode_images", lambda *a: decoded.append(1) or real_decode(*a))
    again = data.build_data(data_cfg("image_folder", path=tmp_path / "imgs", cache_dir=cache_dir))
    assert decoded == [] and torch.equal(first.train.images, again.train.images)
    data.build_data(data_cfg("image_folder", path=tmp_path / "imgs", cache_dir=cache_dir, image_size=16))
    assert decoded == [1] and len(list(cache_dir.iterdir())) == 2  # another size, another cache file
    from PIL import Image

    Image.new("RGB", (12, 12), (0, 0, 0)).save(tmp_path / "imgs" / "dog" / "000.png")  # changed contents
    changed = data.build_data(data_cfg("image_folder", path=tmp_path / "imgs", cache_dir=cache_dir))
    # both earlier caches are of the old contents: deleted when the new one is written
    assert decoded == [1, 1] and len(list(cache_dir.iterdir())) == 1
    assert not torch.equal(torch.cat([changed.train.images, changed.val.images, changed.test.images]).sum(),
                           torch.cat([first.train.images, first.val.images, first.test.images]).sum())


def test_image_folder_damaged_cache_is_rebuilt(tmp_path):
    write_image_folder(tmp_path / "imgs")
    cfg = data_cfg("image_folder", path=tmp_path / "imgs", cache_dir=tmp_path / "cache")
    first = data.build_data(cfg)
    (cache_file,) = (tmp_path / "cache").iterdir()
    cache_file.write_bytes(b"garbage")
    assert torch.equal(data.build_data(cfg).train.images, first.train.images)
    assert cache_file.stat().st_size > 1000


def test_an_unwritable_cache_dir_trains_on_without_the_cache(tmp_path, caplog):
    """A cache that could not be written (read-only data.root, a full disk) stopped the run: exit 1, "could not
    write checkpoint ... the run directory"; the cache only saves decoding time."""
    write_image_folder(tmp_path / "imgs")
    (tmp_path / "blocker").write_text("a file where the cache folder would go")
    cfg = data_cfg("image_folder", path=tmp_path / "imgs", cache_dir=tmp_path / "blocker" / "cache")
    d = data.build_data(cfg)
    assert torch.equal(d.train.images, data.build_data(data_cfg("image_folder", path=tmp_path / "imgs",
                                                                cache_dir="null")).train.images)
    assert "cannot write the cache" in caplog.text and "data.cache_dir" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "imgs"]  # no partial cache file anywhere


def test_a_cache_inside_the_image_folder_is_not_taken_for_a_class(tmp_path):
    """With the defaults (data.root data/, cache in data/cache) and images in data/<class>/, the second run refused:
    "the class folder data/cache holds no images"."""
    write_image_folder(tmp_path / "data")
    cfg = data_cfg("image_folder", path=tmp_path / "data", root=tmp_path / "data")
    first = data.build_data(cfg)
    assert (tmp_path / "data" / "cache").is_dir()
    again = data.build_data(cfg)
    assert again.num_classes == 3 and torch.equal(again.train.images, first.train.images)


def test_a_cache_written_by_an_older_decoder_is_not_reused(tmp_path, monkeypatch):
    """CACHE_FORMAT stayed 1 when 16-bit images stopped being clipped white: caches of the old decoding (same files,
    same key) were still read."""
    write_image_folder(tmp_path / "imgs")
    cache_dir = tmp_path / "cache"
    with monkeypatch.context() as patch:
        patch.setattr(datasets, "CACHE_FORMAT", 1)
        data.build_data(data_cfg("image_folder", path=tmp_path / "imgs", cache_dir=cache_dir))
    (old,) = cache_dir.iterdir()
    stored = torch.load(old, weights_only=True)
    stored["train_images"].fill_(255)  # what the format-1 decoder made of a 16-bit image
    torch.save(stored, old)
    d = data.build_data(data_cfg("image_folder", path=tmp_path / "imgs", cache_dir=cache_dir))
    assert int(d.train.images.min()) < 255
    (new,) = cache_dir.iterdir()  # the old decoder's cache, superseded, is deleted
    assert new.name != old.name


def test_an_image_over_pils_pixel_limit_names_the_file(tmp_path, monkeypatch):
    """PIL's DecompressionBombError is not an OSError: it escaped as a traceback (exit 1)."""
    from PIL import Image

    write_image_folder(tmp_path / "imgs")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # the 12x14 images are over twice it, as a 180 MP photo is
    with pytest.raises(ConfigError, match=r"cannot read the image .*cat/000\.png \(DecompressionBombError"):
        data.build_data(data_cfg("image_folder", path=tmp_path / "imgs", cache_dir="null"))


def test_a_split_that_leaves_nothing_names_its_key(tmp_path):
    write_image_folder(tmp_path / "imgs", classes=("cat", "dog"), per_class=1)
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.1 holds out 1 of 1 examples .*leaves nothing to "
                                          r"train on; give a dataset with more examples"):
        data.build_data(data_cfg("image_folder", path=tmp_path / "imgs", cache_dir="null"))


def test_image_folder_reads_16_bit_images_as_8_bit_levels_not_clipped_white(tmp_path):
    """PIL's convert clips 16-bit levels at 255: a 16-bit gradient came out 99.6 % white."""
    from PIL import Image

    gradient = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    for name in ("a", "b"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(gradient).save(tmp_path / "imgs" / name / f"{i}.png")
    images, _ = datasets.decode_images([(tmp_path / "imgs" / "a" / "0.png", 0)], 16, 1)
    assert torch.equal(images[0, 0], torch.from_numpy((gradient >> 8).astype(np.uint8)))
    rgb, _ = datasets.decode_images([(tmp_path / "imgs" / "a" / "0.png", 0)], 16, 3)
    assert torch.equal(rgb[0, 1], images[0, 0]) and rgb.float().mean() == pytest.approx(127.5, abs=1)


def test_a_stop_signal_while_the_cache_is_read_stops_the_run_not_the_cache(tmp_path, monkeypatch):
    """Ctrl-C while the image cache loaded was taken for a damaged cache: decoded again, trained on, exit 0."""
    from trainlab import faults

    write_image_folder(tmp_path / "imgs")
    cfg = data_cfg("image_folder", path=tmp_path / "imgs", cache_dir=tmp_path / "cache")
    data.build_data(cfg)

    def interrupted(*args, **kwargs):
        raise faults.Interrupted(2, "start-up, before training began")

    monkeypatch.setattr(torch, "load", interrupted)
    with pytest.raises(faults.Interrupted):
        data.build_data(cfg)


@pytest.mark.parametrize(("damage", "message"), [
    ("corrupt", r"cannot read the image .*dog/003\.jpg"),
    ("empty_class", r"the class folder .*fox holds no images"),
    ("one_class", r"holds 1 class folder\(s\) \(cat\).*at least 2 classes"),
    ("missing", r"data.path=.*nowhere: no such directory"),
    ("mismatch", r"train/ and test/ have different class folders"),
    ("train_only", r"holds train/ but no test/; add .*imgs/test with the same class folders, or give "
                   r"data.path=.*imgs/train"),
    # train/ and val/ became the two classes "train" and "val", silently
    ("train_val", r"holds train/ and val/ but no test/; rename val/ to test/ to test on it \(the validation split is "
                  r"then taken from train/ by data.val_fraction\), or add .*imgs/test with the same class folders "
                  r"\(val/ is then the validation split\)"),
])
def test_image_folder_bad_input_is_a_clear_error(tmp_path, damage, message):
    root = tmp_path / "imgs"
    if damage == "one_class":
        write_image_folder(root, classes=("cat",))
    elif damage == "train_only":
        write_image_folder(root / "train")
    elif damage == "train_val":
        write_image_folder(root / "train")
        write_image_folder(root / "val")
    elif damage == "mismatch":
        write_image_folder(root / "train")
        write_image_folder(root / "test", classes=("cat", "dog"))
    else:
        write_image_folder(root)
    if damage == "corrupt":
        (root / "dog" / "003.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    if damage == "empty_class":
        (root / "fox").mkdir()
        (root / "fox" / "readme.txt").write_text("no images here")
    path = tmp_path / "nowhere" if damage == "missing" else root
    with pytest.raises(ConfigError, match=message):
        data.build_data(data_cfg("image_folder", path=path, cache_dir="null"))


def test_image_size_the_model_cannot_take_exits_2_before_training(tmp_path, train_inprocess):
    write_image_folder(tmp_path / "imgs")
    status, code, run = train_inprocess(["data=image_folder", f"data.path={tmp_path / 'imgs'}", "data.image_size=4",
                                         "data.cache_dir=null", "model=torchvision", "model.name=squeezenet1_0"])
    assert code == 2 and "cannot take [3, 4, 4] images" in run.summary["error"]
    assert not run.started


@pytest.mark.parametrize(("key", "value", "message"), [
    ("loader", "gpu", "data.loader='gpu': choose auto, device or dataloader"),
    ("num_workers", -1, "data.num_workers=-1: must be >= 0"),
    ("device_max_gb", 0, "data.device_max_gb=0"),
])
def test_invalid_loader_keys_are_refused(key, value, message):
    cfg = compose_cfg([f"data.{key}={value}"])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate(cfg)


def test_invalid_image_folder_keys_are_refused():
    cfg = compose_cfg(["data=image_folder", "data.path=x", "data.image_size=0", "data.channels=2"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert "data.image_size=0" in str(info.value) and "data.channels=2: choose 3 (RGB) or 1" in str(info.value)


def test_unknown_dataset_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"data.name='imagenet'.*digits, synthetic, mnist, .*svhn, image_folder"):
        data.build_data(OmegaConf.create({"name": "imagenet"}))


def test_data_root_defaults_to_the_environment_variable_else_data(monkeypatch):
    monkeypatch.delenv("TRAINLAB_DATA", raising=False)
    assert data_cfg("mnist").root == "data"
    monkeypatch.setenv("TRAINLAB_DATA", "/srv/datasets")
    assert data_cfg("cifar10").root == "/srv/datasets"
    assert data_cfg("image_folder", path="x").cache_dir == "/srv/datasets/cache"


# --- splits and statistics ---------------------------------------------------------------------------


def test_file_dataset_splits_are_deterministic_disjoint_and_follow_only_the_seed(tmp_path):
    write_mnist(tmp_path, n_train=100)
    a = data.build_data(data_cfg("mnist", root=tmp_path, split_seed=5))
    b = data.build_data(data_cfg("mnist", root=tmp_path, split_seed=5, batch_size=7, loader="dataloader"))
    c = data.build_data(data_cfg("mnist", root=tmp_path, split_seed=6))
    ids = {name: set(getattr(a, name).images[:, 0, 0, 0].tolist()) for name in ("train", "val")}
    assert ids["train"].isdisjoint(ids["val"]) and ids["train"] | ids["val"] == set(range(100))
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.val.images, c.val.images)
    assert torch.equal(a.test.images, c.test.images)


def test_statistics_come_from_the_training_split(tmp_path):
    write_cifar(tmp_path, per_batch=20)
    d = data.build_data(data_cfg("cifar10", root=tmp_path, val_fraction=0.3))
    pixels = d.train.images.double().transpose(0, 1).flatten(1)
    assert torch.allclose(d.mean.double(), pixels.mean(1), rtol=1e-6)
    assert torch.allclose(d.std.double(), pixels.std(1), rtol=1e-5)
    everything = torch.cat([d.train.images, d.val.images, d.test.images]).double().transpose(0, 1).flatten(1)
    assert not torch.allclose(d.mean.double(), everything.mean(1), rtol=1e-4)


# --- the DataLoader path ---------------------------------------------------------------------------


def synthetic(n: int = 50):
    cfg = OmegaConf.structured(__import__("trainlab.config", fromlist=["SyntheticConfig"]).SyntheticConfig(
        num_samples=n, shape=[3, 6, 5], num_classes=4, split_seed=0))
    return data.build_data(cfg)


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_path_yields_the_device_paths_batches(workers):
    d = synthetic()
    cpu = torch.device("cpu")
    kwargs = {"shuffle": True, "drop_last": True, "seed": 3}
    device = data.DeviceLoader(d.train, d.mean, d.std, 8, cpu, **kwargs)
    worker = data.WorkerLoader(d.train, d.mean, d.std, 8, cpu, num_workers=workers, **kwargs)
    for epoch in (1, 2):
        device.set_epoch(epoch)
        worker.set_epoch(epoch)
        assert (len(worker), worker.num_examples) == (len(device), device.num_examples)
        assert_same_batches(batches(worker), batches(device))
    device.set_batch_size(16)
    worker.set_batch_size(16)
    assert_same_batches(batches(worker), batches(device))
    ordered = data.DeviceLoader(d.test, d.mean, d.std, 7, cpu)
    assert_same_batches(batches(data.WorkerLoader(d.test, d.mean, d.std, 7, cpu)), batches(ordered))


def test_dataloader_path_transforms_are_a_function_of_seed_epoch_and_index_whatever_the_workers():
    from torchvision.transforms import v2

    d = synthetic()
    flip = v2.RandomHorizontalFlip(0.5)
    cpu = torch.device("cpu")

    def epoch(workers: int, epoch: int, seed: int = 0):
        loader = data.WorkerLoader(d.train, d.mean, d.std, 10, cpu, shuffle=True, seed=seed, transform=flip,
                                   num_workers=workers)
        loader.set_epoch(epoch)
        return batches(loader)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    one = epoch(0, 1)
    assert torch.equal(torch.get_rng_state(), state)  # the transform's seeding leaves the global generator alone
    assert_same_batches(one, epoch(2, 1))
    unaugmented = data.DeviceLoader(d.train, d.mean, d.std, 10, cpu, shuffle=True, seed=0)
    unaugmented.set_epoch(1)
    plain = batches(unaugmented)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(one, plain))  # some images were flipped
    for (x, y), (px, py) in zip(one, plain):  # every image is itself or its mirror
        assert torch.equal(y, py)
        assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(x, px))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(one, epoch(0, 2)))


def test_dataloader_path_resumes_mid_epoch_like_the_device_path():
    d = synthetic()
    cpu = torch.device("cpu")
    loader = data.WorkerLoader(d.train, d.mean, d.std, 6, cpu, shuffle=True, seed=1)
    loader.set_epoch(3)
    full = batches(loader)
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    fresh = data.WorkerLoader(d.train, d.mean, d.std, 6, cpu, shuffle=True, seed=1)
    fresh.load_state_dict(state)
    assert_same_batches(batches(fresh), full[2:])


def test_loader_auto_picks_by_size_and_run_trains_on_the_dataloader_path(train_inprocess):
    cfg = compose_cfg(["data.loader=auto"])
    d = data.build_data(cfg.data)
    assert type(data.train_loader(cfg, d, torch.device("cpu"))) is data.DeviceLoader
    small = compose_cfg(["data.loader=auto", "data.device_max_gb=1e-6"])  # 1 KiB: digits do not fit
    assert type(data.train_loader(small, d, torch.device("cpu"))) is data.WorkerLoader
    assert type(data.eval_loader(small, d, d.val, torch.device("cpu"))) is data.WorkerLoader
    forced = compose_cfg(["data.loader=dataloader", "data.device_max_gb=100"])
    assert type(data.train_loader(forced, d, torch.device("cpu"))) is data.WorkerLoader
    status, code, run = train_inprocess(["data.loader=dataloader", "data.num_workers=0", "trainer.max_epochs=1",
                                         "logger.tensorboard=false", "augmentation=flip"])
    assert (status, code) == ("completed", 0), run.summary.get("error")
    assert type(run.train_batches) is data.WorkerLoader and type(run.test_batches) is data.WorkerLoader
    assert run.summary["test"]["test/acc"] > 0.8


# --- every file-backed option trains, on tiny files in the real formats ----------------------------------


def write_option_files(option: str, root: Path) -> list[str]:
    """Tiny files for `option` under root; the overrides that point the option at them."""
    if option in ("mnist", "fashion_mnist", "kmnist"):
        write_mnist(root, datasets.SOURCES[option].folder, n_train=80, n_test=20, gz=True)
    elif option in ("cifar10", "cifar100"):
        write_cifar(root, hundred=option == "cifar100", per_batch=16)
    elif option == "svhn":
        pytest.importorskip("scipy.io", reason="scipy reads SVHN's .mat files")
        write_svhn(root, n_train=80)
    else:
        write_image_folder(root / "imgs", per_class=30)
        return [f"data.path={root / 'imgs'}", f"data.root={root}"]
    return [f"data.root={root}"]


@pytest.mark.parametrize("option", FILE_OPTIONS)
def test_file_option_trains_two_steps(tmp_path, option, train_inprocess):
    overrides = [f"data={option}", *write_option_files(option, tmp_path / "files"), "data.batch_size=32",
                 "trainer.max_epochs=1", "logger.tensorboard=false", "model.hidden=[16]"]
    status, code, run = train_inprocess(overrides)
    assert (status, code) == ("completed", 0), run.summary.get("error")
    assert run.step == 2
    assert 0.0 <= run.summary["test"]["test/acc"] <= 1.0


# --- the shared CIFAR-10 subset, end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory):
    archive = SHARED_DATA / "cifar10-subset.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} is absent")
    target = tmp_path_factory.mktemp("cifar")
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target / "cifar10-subset"


def test_image_folder_on_the_cifar10_subset_end_to_end_with_its_cache(tmp_path, cifar_subset, train_inprocess,
                                                                        monkeypatch):
    overrides = ["data=image_folder", f"data.path={cifar_subset}", f"data.root={tmp_path / 'store'}",
                 "trainer.max_epochs=1", "logger.tensorboard=false", "model.hidden=[64]"]
    status, code, run = train_inprocess(overrides)
    assert (status, code) == ("completed", 0), run.summary.get("error")
    assert (len(run.data.train) + len(run.data.val), len(run.data.test)) == (5000, 1000)
    assert run.data.input_shape == (3, 32, 32) and run.data.num_classes == 10
    assert run.summary["test"]["test/acc"] > 0.2  # chance is 0.1
    (cache_file,) = (tmp_path / "store" / "cache").iterdir()
    # the second build reads the cache: decoding again would fail the test (no timing: see scripts/benchmark.py)
    monkeypatch.setattr(datasets, "decode_images", lambda *a: pytest.fail("decoded again despite the cache"))
    again = data.build_data(compose_cfg(overrides).data)
    assert torch.equal(again.test.images, run.data.test.images)
    shutil.rmtree(tmp_path / "store")


def test_absent_dataset_through_the_command_line_exits_2_fast_and_leaves_nothing(tmp_path):
    from conftest import run_cli

    result = run_cli(["data=svhn", f"data.root={tmp_path / 'none'}", "model=cnn"], cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "data=svhn: the dataset is not in data.root" in output and "train_32x32.mat, test_32x32.mat" in output
    assert "model:" not in output  # refused before any model was built
    assert listing(tmp_path) == []


def test_a_run_stops_its_dataloader_workers_when_it_ends(train_inprocess):
    status, _, run = train_inprocess(["data.loader=dataloader", "data.num_workers=2", "trainer.max_epochs=1",
                                      "logger.tensorboard=false"])
    assert status == "completed"
    for loader in (run.train_batches, run.val_batches, run.test_batches):
        assert loader.loader._iterator is None  # persistent workers shut down, not left to garbage collection


def test_a_data_path_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "one.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"data.path=.*one.jpg: is a file, not a directory"):
        data.build_data(data_cfg("image_folder", path=tmp_path / "one.jpg", cache_dir="null"))


def test_digits_are_read_from_scikit_learns_file_without_importing_it_and_equal_its_load_digits(monkeypatch):
    """The run's start skips scikit-learn's 2-s import: the same images and labels as its load_digits, and where its
    data file is not found, load_digits itself."""
    import importlib.util
    import sys

    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "sklearn.datasets", None)  # importing it now raises ImportError
        images, labels = data.load_digits()
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and images.shape == (1797, 1, 8, 8)
    assert torch.equal(images[:, 0], torch.from_numpy(bunch.images).to(torch.uint8))
    assert torch.equal(labels, torch.from_numpy(bunch.target).long())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no file to read: scikit-learn's loader
    fallback_images, fallback_labels = data.load_digits()
    assert torch.equal(fallback_images, images) and torch.equal(fallback_labels, labels)
