"""`trainlab ensemble`: average the predicted class probabilities of several trained runs on their common test split.

Each member is rebuilt from its run directory (.hydra/config.yaml) and its checkpoint, and evaluated with its own
input normalization (the statistics of its own training split). The test split depends only on the data, so runs
of one dataset that differ in seed, optimizer or model share it; members whose test images or labels differ are
refused. Relative data paths are those of the directory each run was trained in, not the current one.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from trainlab.config import DEVICE_PATTERN, ConfigError

CHECKPOINTS = ("tested", "best", "last", "swa")


@dataclass
class Member:
    run_dir: Path
    weights: Path
    loss: float
    acc: float


@dataclass
class Ensemble:
    members: list[Member]
    loss: float  # cross-entropy of the averaged probabilities
    acc: float
    examples: int


def members(paths: list[Path], which: str = "tested") -> list[tuple[Path, Path]]:
    """(run directory, weights file) of each run in `paths`: run directories, or sweep directories whose jobs have
    the weights (jobs without them, failed or unfinished, are left out)."""
    found: list[tuple[Path, Path]] = []
    for path in paths:
        if not path.is_dir():
            raise ConfigError(f"{path}: no such run or sweep directory")
        if (path / ".hydra" / "config.yaml").is_file():
            weights = _weights(path, which)
            if weights is None:
                raise ConfigError(f"{path}: no {which} weights in {path / 'checkpoints'} (did the run train?)")
            found.append((path, weights))
            continue
        jobs = [p for p in sorted(path.iterdir()) if (p / ".hydra" / "config.yaml").is_file()]
        if not jobs:
            raise ConfigError(f"{path}: neither a run directory (.hydra/config.yaml) nor a sweep of them")
        found += [(job, w) for job in jobs if (w := _weights(job, which)) is not None]
    if len(found) < 2:
        raise ConfigError(f"an ensemble needs at least 2 runs with {which} weights; found {len(found)} in "
                          f"{', '.join(map(str, paths))}")
    return found


def _weights(run_dir: Path, which: str) -> Path | None:
    """The run's checkpoint for `which`: tested = the weights its test used (swa.pt after SWA, else best.pt)."""
    if which == "tested":
        summary = run_dir / "summary.json"
        tested = json.loads(summary.read_text()).get("tested_weights") if summary.is_file() else None
        which = Path(tested).stem if tested else "best"
    path = run_dir / "checkpoints" / f"{which}.pt"
    return path if path.is_file() else None


def run_cwd(run_dir: Path) -> Path:
    """The directory the run was trained from (hydra.runtime.cwd in its .hydra/hydra.yaml), else the current one."""
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    cwd = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.cwd") if hydra_yaml.is_file() else None
    return Path(cwd) if cwd is not None else Path.cwd()


def anchor_data(data: DictConfig, cwd: Path) -> None:
    """Resolve the relative data.path, data.root and data.cache_dir of a run's config against `cwd`, in place.

    root comes before cache_dir, so an interpolated cache_dir (${.root}/cache) follows the anchored root and a
    literal relative one is anchored itself.
    """
    for key in ("path", "root", "cache_dir"):
        if key not in data or OmegaConf.is_missing(data, key) or data[key] is None:
            continue
        if not Path(data[key]).expanduser().is_absolute():
            data[key] = str(cwd / data[key])


def select(device: str) -> torch.device:
    """The device of --device, with errors that name that option (select_device's name trainer.device)."""
    from trainlab.device import select_device

    if not DEVICE_PATTERN.match(device):
        raise ConfigError(f"--device {device}: not a device; choose auto, cpu, cuda, cuda:N or mps")
    try:
        return select_device(device)
    except ConfigError as error:
        raise ConfigError(str(error).replace("trainer.device=", "--device ")) from None


def check_csv(path: Path) -> None:
    """Refuse a --csv path that cannot be written, before any run is evaluated."""
    if path.is_dir():
        raise ConfigError(f"--csv {path}: is a directory; give a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"--csv {path}: no such directory {path.parent}")


@torch.inference_mode()
def predict(run_dir: Path, weights: Path, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class probabilities [N, C] in float64 on the CPU, labels [N], the test images' digest) of one run."""
    from trainlab import checkpoint
    from trainlab.data import build_data, eval_loader
    from trainlab.models import build_model

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    anchor_data(cfg.data, run_cwd(run_dir))
    data = build_data(cfg.data)
    model = build_model(cfg, data.input_shape, data.num_classes)
    mismatch = checkpoint.model_mismatch(model.state_dict(), state := checkpoint.load(weights)["model"])
    if mismatch is not None:
        raise ConfigError(f"{weights} does not fit the model of {run_dir / '.hydra' / 'config.yaml'}: {mismatch}")
    model.load_state_dict(state)
    model.to(device).eval()
    probabilities, labels = [], []
    for images, targets in eval_loader(cfg, data, data.test, device):
        probabilities.append(torch.softmax(model(images).double(), dim=1).cpu())
        labels.append(targets.cpu())
    digest = torch.stack([data.test.images.double().sum(), (data.test.images.double() ** 2).sum()])
    return torch.cat(probabilities), torch.cat(labels), digest


def ensemble(paths: list[Path], which: str = "tested", device: str = "cpu") -> Ensemble:
    """Each member's test loss and accuracy, and those of the mean of their probabilities."""
    target = select(device)
    results, reference = [], None
    for run_dir, weights in members(paths, which):
        probs, labels, digest = predict(run_dir, weights, target)
        if reference is None:
            reference = (run_dir, labels, digest, probs.shape[1])
        elif not (torch.equal(labels, reference[1]) and torch.equal(digest, reference[2])
                  and probs.shape[1] == reference[3]):
            raise ConfigError(f"{run_dir} was tested on other images than {reference[0]} (another dataset, "
                              "data.seed or test_fraction); an ensemble averages predictions on one test split")
        results.append((run_dir, weights, probs))
    labels = reference[1]
    mean = torch.stack([probs for _, _, probs in results]).mean(dim=0)
    chosen = [Member(run_dir, weights, *_scores(probs, labels)) for run_dir, weights, probs in results]
    return Ensemble(chosen, *_scores(mean, labels), examples=len(labels))


def _scores(probabilities: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy, accuracy) of class probabilities; predictions as argmax counts them (the first maximum)."""
    picked = probabilities.gather(1, labels[:, None]).squeeze(1).clamp_min(torch.finfo(torch.float64).tiny)
    loss = float(-picked.log().mean())
    return loss, float((probabilities.argmax(dim=1) == labels).double().mean())


def write_csv(result: Ensemble, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["member", "weights", "test/loss", "test/acc"])
        for m in result.members:
            writer.writerow([str(m.run_dir), m.weights.name, f"{m.loss:.6f}", f"{m.acc:.6f}"])
        writer.writerow(["ensemble", "", f"{result.loss:.6f}", f"{result.acc:.6f}"])


def table(result: Ensemble):
    from rich.table import Table
    from rich.text import Text

    out = Table(title=f"ensemble of {len(result.members)} runs on {result.examples} test images (mean of "
                      "probabilities)")
    for column in ("member", "weights", "test/loss", "test/acc"):
        out.add_column(column, justify="left" if column in ("member", "weights") else "right")
    for m in result.members:
        out.add_row(Text(str(m.run_dir)), m.weights.name, f"{m.loss:.4f}", f"{m.acc:.4f}")
    out.add_row(Text("ensemble", style="bold"), "", f"{result.loss:.4f}", f"{result.acc:.4f}")
    best = max(m.acc for m in result.members)
    out.caption = f"accuracy {result.acc - best:+.4f} against the best member, {result.acc - mean_acc(result):+.4f} " \
                  "against the members' mean"
    return out


def mean_acc(result: Ensemble) -> float:
    return sum(m.acc for m in result.members) / len(result.members)
