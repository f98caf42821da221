"""`trainlab ensemble`: average the predicted class probabilities of several trained runs on their common test split.

Each member is rebuilt from its run directory (.hydra/config.yaml) and its checkpoint, and evaluated with its own
input normalization (the statistics of its own training split) and in the precision of its own test (summary.json).
The test split depends only on the data, so runs of one dataset that differ in seed, optimizer or model share it;
members whose test images or labels differ are refused. Relative data paths are those of the directory each run was
trained in, not the current one.

`--checkpoint snapshots` makes every snapshot of a run (checkpoint.snapshots=cycles: the weights at the end of each
learning-rate cycle) a member: a snapshot ensemble (Huang et al. 2017), from one run or from several; `--last N`
takes the last N snapshots of each run (the paper's ensembles of the last m, which leave out the early cycles).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from trainlab.config import DEVICE_PATTERN, ConfigError
from trainlab.files import write_text_atomic
from trainlab.sweep import DONE

CHECKPOINTS = ("tested", "best", "last", "swa", "snapshots")


@dataclass
class Member:
    run_dir: Path
    weights: Path
    loss: float
    acc: float
    balanced_acc: float  # the mean of the classes' recalls


@dataclass
class Ensemble:
    members: list[Member]
    loss: float  # cross-entropy of the averaged probabilities
    acc: float
    balanced_acc: float
    examples: int
    snapshots: bool = False  # the members are snapshots (--checkpoint snapshots)


def members(paths: list[Path], which: str = "tested", last: int | None = None) -> list[tuple[Path, Path]]:
    """(run directory, weights file) of each member in `paths`: run directories, or sweep directories whose jobs have
    the weights (jobs without them, failed or unfinished, are left out). which=snapshots: every snapshot of each, or
    its last `last`."""
    if last is not None and which != "snapshots":
        raise ConfigError(f"--last {last} picks each run's last snapshots: give it with --checkpoint snapshots")
    if last is not None and last < 1:
        raise ConfigError(f"--last {last}: give the number of snapshots to take from each run, 1 or more")
    found: list[tuple[Path, Path]] = []
    for path in paths:
        if not path.is_dir():
            what = "is a file, not a run or sweep directory" if path.exists() else "no such run or sweep directory"
            raise ConfigError(f"{path}: {what}")
        if (path / ".hydra" / "config.yaml").is_file():
            status = _status(path)
            if status not in DONE:
                print(f"trainlab ensemble: {path} did not complete ({status}); its {which} weights are taken as "
                      "they are", file=sys.stderr)
            weights = _weights(path, which)
            if not weights:
                what = ("no snapshots (snapshot_<epoch>.pt; train with checkpoint.snapshots=cycles)"
                        if which == "snapshots" else f"no {which} weights ({_weights_name(path, which)})")
                raise ConfigError(f"{path}: {what} in {path / 'checkpoints'}"
                                  + ("" if which == "snapshots" else " (did the run train?)"))
            found += [(path, w) for w in _last(path, weights, last)]
            continue
        jobs = [p for p in sorted(path.iterdir()) if (p / ".hydra" / "config.yaml").is_file()]
        if not jobs:
            raise ConfigError(f"{path}: neither a run directory (.hydra/config.yaml) nor a sweep of them")
        statuses = {job: _status(job) for job in jobs}
        unfinished = [(job, status) for job, status in statuses.items() if status not in DONE]
        if unfinished:  # an interrupted or diverged job's weights are not those of the experiment it names
            print(f"trainlab ensemble: left out {len(unfinished)} job(s) of {path} that did not complete: "
                  + ", ".join(f"{job.name} ({status})" for job, status in unfinished), file=sys.stderr)
            jobs = [job for job, status in statuses.items() if status in DONE]
        without = [job for job in jobs if not _weights(job, which)]
        if without:  # a completed job whose weights were deleted, or trained without snapshots (or SWA)
            print(f"trainlab ensemble: left out {len(without)} job(s) of {path} without "
                  f"{'snapshots' if which == 'snapshots' else f'{which} weights'}: "
                  + ", ".join(f"{job.name} (no {_weights_name(job, which)})" for job in without), file=sys.stderr)
        found += [(job, w) for job in jobs for w in _last(job, _weights(job, which), last)]
    unique = list({(run_dir.resolve(), weights.resolve()): (run_dir, weights) for run_dir, weights in found}.values())
    if len(unique) < len(found):  # a run given twice (or a sweep and one of its jobs) would weigh twice in the mean
        print(f"trainlab ensemble: {len(found) - len(unique)} member(s) given more than once, counted once",
              file=sys.stderr)
        found = unique
    if len(found) < 2:
        what = "snapshots" if which == "snapshots" else f"runs with {which} weights"
        one_run = which != "snapshots" and len(found) == 1 and len(paths) == 1 and found[0][0] == paths[0]
        hint = ("; the snapshots of one run (train with checkpoint.snapshots=cycles) are an ensemble with "
                "--checkpoint snapshots") if one_run else ""
        raise ConfigError(f"an ensemble needs at least 2 {what}; found {len(found)} in "
                          f"{', '.join(map(str, paths))}{hint}")
    return found


def _last(run_dir: Path, snapshots: list[Path], last: int | None) -> list[Path]:
    """The last `last` of a run's snapshots (all when None; a job without snapshots gives none, as without --last)."""
    if last is None or not snapshots:
        return snapshots
    if len(snapshots) < last:
        raise ConfigError(f"{run_dir}: --last {last}, but the run has {len(snapshots)} snapshot"
                          f"{'s' if len(snapshots) > 1 else ''} ({', '.join(p.name for p in snapshots)}); give "
                          f"--last {len(snapshots)} or less")
    return snapshots[-last:]


def _status(run_dir: Path) -> str:
    """The run's status in its summary.json: "unfinished" without one (never ran, or killed), "unknown" when damaged."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except OSError:
        return "unfinished"
    except ValueError:
        return "unknown"
    return str(summary.get("status", "unknown")) if isinstance(summary, dict) else "unknown"


def _weights(run_dir: Path, which: str) -> list[Path]:
    """The run's checkpoints for `which`: tested = the weights its test used (swa.pt after SWA, else best.pt);
    snapshots = its snapshot_<epoch>.pt files, by epoch."""
    from trainlab import checkpoint

    if which == "snapshots":
        return [path for _, path in checkpoint.snapshots(run_dir / "checkpoints")]
    path = run_dir / "checkpoints" / _weights_name(run_dir, which)
    return [path] if path.is_file() else []


def _weights_name(run_dir: Path, which: str) -> str:
    """The file name of a run's `which` weights (tested: the one its summary.json names, else best.pt)."""
    if which == "snapshots":
        return "snapshot_<epoch>.pt"
    if which == "tested":
        tested = _summary(run_dir).get("tested_weights")
        which = Path(tested).stem if tested else "best"
    return f"{which}.pt"


def _summary(run_dir: Path) -> dict:
    """The run's summary.json; {} when it has none or it is damaged (a kill while it was written)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def run_cwd(run_dir: Path) -> Path:
    """The directory the run was trained from (hydra.runtime.cwd in its .hydra/hydra.yaml), else the current one."""
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    cwd = OmegaConf.select(load_yaml(hydra_yaml), "hydra.runtime.cwd") if hydra_yaml.is_file() else None
    return Path(cwd) if cwd is not None else Path.cwd()


def load_yaml(path: Path) -> DictConfig:
    """A run's .hydra/*.yaml; ConfigError naming the file when it cannot be read or is not a mapping."""
    try:
        loaded = OmegaConf.load(path)
    except (OSError, yaml.YAMLError) as error:
        detail = (str(error).splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"{path} cannot be read ({detail}); restore it, or leave {path.parent.parent} out") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} is not a run's config (a YAML mapping); restore it, or leave {path.parent.parent} "
                          "out")
    return loaded


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
def probabilities(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  autocast: AbstractContextManager | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(class probabilities [N, C] in float64 on the CPU, labels [N]) of `model` in eval mode over `batches`."""
    model.eval()
    probs, labels = [], []
    for images, targets in batches:
        with autocast if autocast is not None else nullcontext():
            logits = model(images)
        probs.append(torch.softmax(logits.double(), dim=1).cpu())
        labels.append(targets.cpu())
    return torch.cat(probs), torch.cat(labels)


class RebuiltRun:
    """A run rebuilt from its directory (config, data with its own normalization, model), kept while its members
    (one checkpoint, or each snapshot) are evaluated."""

    def __init__(self, run_dir: Path, device: torch.device):
        from trainlab.data import build_data, eval_loader
        from trainlab.device import autocast_for, select_precision
        from trainlab.models import build_model

        self.run_dir, self.cfg = run_dir, load_yaml(run_dir / ".hydra" / "config.yaml")
        if "data" not in self.cfg or "model" not in self.cfg:
            raise ConfigError(f"{run_dir / '.hydra' / 'config.yaml'} has no data or model group: not a trainlab "
                              f"run's config; restore it, or leave {run_dir} out")
        anchor_data(self.cfg.data, run_cwd(run_dir))
        self.data = build_data(self.cfg.data)
        self.model = build_model(self.cfg, self.data.input_shape, self.data.num_classes).to(device)
        self.batches = eval_loader(self.cfg, self.data, self.data.test, device)
        # the precision its test ran in (summary.json; bf16 by default on a GPU), as the end-of-run snapshot scores
        # use it: in fp32 a bf16 run's losses differed from its own in the 4th decimal
        precision = _summary(run_dir).get("precision") or select_precision(
            str(OmegaConf.select(self.cfg, "trainer.precision", default="fp32")), device)
        self.autocast = autocast_for(device, precision)
        images = self.data.test.images.contiguous()  # the test images in their order, as bytes: one split or not
        self.digest = hashlib.sha256(f"{images.dtype}{tuple(images.shape)}".encode() + images.numpy().tobytes()
                                     ).hexdigest()

    def predict(self, weights: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """(class probabilities [N, C] in float64 on the CPU, labels [N]) of `weights` on the run's test split."""
        from trainlab import checkpoint

        try:
            state = checkpoint.load(weights)["model"]
        except ConfigError as error:  # checkpoint.load's fix names checkpoint.resume, which is not this command's
            fix = (f"move it out of {weights.parent} to ensemble the run's other snapshots"
                   if checkpoint.SNAPSHOT_NAME.match(weights.name) else "choose another --checkpoint")
            raise ConfigError(f"{str(error).split('; pass the path')[0]}; {fix}, or leave {self.run_dir} out") from None
        mismatch = checkpoint.model_mismatch(self.model.state_dict(), state)
        if mismatch is not None:
            raise ConfigError(f"{weights} does not fit the model of {self.run_dir / '.hydra' / 'config.yaml'}: "
                              f"{mismatch}")
        self.model.load_state_dict(state)
        return probabilities(self.model, self.batches, self.autocast)


def ensemble(paths: list[Path], which: str = "tested", device: str = "cpu", last: int | None = None) -> Ensemble:
    """Each member's test loss and accuracy, and those of the mean of their probabilities."""
    target = select(device)
    results, reference, rebuilt = [], None, None
    for run_dir, weights in members(paths, which, last):
        if rebuilt is None or rebuilt.run_dir != run_dir:  # a run's snapshots share its data and model
            rebuilt = RebuiltRun(run_dir, target)
        probs, labels = rebuilt.predict(weights)
        digest = rebuilt.digest
        if reference is None:
            reference = (run_dir, labels, digest, probs.shape[1])
        elif not (torch.equal(labels, reference[1]) and digest == reference[2]
                  and probs.shape[1] == reference[3]):
            raise ConfigError(f"{run_dir} was tested on other images than {reference[0]} (another dataset, "
                              "data.seed or test_fraction); an ensemble averages predictions on one test split")
        results.append((run_dir, weights, probs))
    labels = reference[1]
    mean = torch.stack([probs for _, _, probs in results]).mean(dim=0)
    chosen = [Member(run_dir, weights, *_scores(probs, labels)) for run_dir, weights, probs in results]
    return Ensemble(chosen, *_scores(mean, labels), examples=len(labels), snapshots=which == "snapshots")


def sums(probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[summed cross-entropy, correct predictions, examples] of class probabilities (float64); predictions as argmax
    counts them (the first maximum)."""
    picked = probabilities.gather(1, labels[:, None]).squeeze(1).clamp_min(torch.finfo(torch.float64).tiny)
    hits = (probabilities.argmax(dim=1) == labels).double().sum()
    return torch.stack([-picked.log().sum(), hits, torch.tensor(float(len(labels)), dtype=torch.float64)])


def _scores(probabilities: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """(cross-entropy, accuracy, balanced accuracy) of class probabilities; the balanced accuracy is the mean over
    the classes the split holds of each one's recall, as a run's test/balanced_acc."""
    loss, hits, n = sums(probabilities, labels).tolist()
    right = probabilities.argmax(dim=1) == labels
    per_class = torch.bincount(labels, minlength=probabilities.shape[1])
    recalls = torch.bincount(labels[right], minlength=probabilities.shape[1])[per_class > 0] / per_class[per_class > 0]
    return loss / n, hits / n, float(recalls.double().mean())


def write_csv(result: Ensemble, path: Path) -> None:
    """The table as CSV, written whole or not at all (a full disk or a kill mid-write keeps the file that was there)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["member", "weights", "test/loss", "test/acc", "test/balanced_acc"])
    for m in result.members:
        writer.writerow([str(m.run_dir), m.weights.name, f"{m.loss:.6f}", f"{m.acc:.6f}", f"{m.balanced_acc:.6f}"])
    writer.writerow(["ensemble", "", f"{result.loss:.6f}", f"{result.acc:.6f}", f"{result.balanced_acc:.6f}"])
    write_text_atomic(path, text.getvalue(), newline="")


def table(result: Ensemble):
    from rich.table import Table
    from rich.text import Text

    runs = len({m.run_dir for m in result.members})
    what = f"{len(result.members)} snapshots of {runs} run{'s' if runs > 1 else ''}" if result.snapshots else \
        f"{len(result.members)} runs"
    out = Table(title=f"ensemble of {what} on {result.examples} test images (mean of probabilities)")
    for column in ("member", "weights", "test/loss", "test/acc", "test/balanced_acc"):
        out.add_column(column, justify="left" if column in ("member", "weights") else "right")
    for m in result.members:
        out.add_row(Text(str(m.run_dir)), m.weights.name, f"{m.loss:.4f}", f"{m.acc:.4f}", f"{m.balanced_acc:.4f}")
    out.add_row(Text("ensemble", style="bold"), "", f"{result.loss:.4f}", f"{result.acc:.4f}",
                f"{result.balanced_acc:.4f}")
    best = max(m.acc for m in result.members)
    out.caption = f"accuracy {result.acc - best:+.4f} against the best member, {result.acc - mean_acc(result):+.4f} " \
                  "against the members' mean"
    if result.snapshots and runs == 1:
        last = result.members[-1]
        out.caption += f", {result.acc - last.acc:+.4f} (loss {result.loss - last.loss:+.4f}) against the last snapshot"
    return out


def mean_acc(result: Ensemble) -> float:
    return sum(m.acc for m in result.members) / len(result.members)
