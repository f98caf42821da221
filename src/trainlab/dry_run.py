"""Dry run: the learning rate at every optimizer step of a configured run, computed without training."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from trainlab import finetune
from trainlab.config import monitor_mode
from trainlab.data import build_data, epoch_batch_sizes, epoch_steps, train_loader
from trainlab.models import TorchvisionModel, build_model
from trainlab.optim import build_optimizer
from trainlab.schedules import build_scheduler, snapshot_epochs

PLATEAU_METRIC = 1.0  # the constant metric a dry run feeds plateau: it never improves after epoch 1
SPARK = "▁▂▃▄▅▆▇█"
TABLE_ROWS = 20  # epoch boundaries shown at most, evenly spaced


def _curve(cfg: DictConfig) -> tuple[list[float], list[float], list[int], list[float]]:
    """(lr at every step, the step's position in epochs from 0, the epochs checkpoint.snapshots=cycles saves at, the
    momentum at every step where the schedule cycles it, else []) from the real data, model, optimizer, scheduler.

    1) steps per epoch from the training split; 2) the real optimizer and scheduler; 3) step the scheduler
    through every epoch (no optimizer step: weights never change), feeding plateau a constant metric;
    SWA epochs (regularization.swa_start) hold regularization.swa_lr, as the loop does.
    """
    data = build_data(cfg.data)
    loader = train_loader(cfg, data, torch.device("cpu"))  # counts batches only; no batch is drawn
    spe, steps = len(loader), epoch_steps(loader, epoch_batch_sizes(cfg.data, cfg.trainer.max_epochs))
    model = build_model(cfg, data.input_shape, data.num_classes)
    # the run's parameter groups: finetune's features at their own lr (and what it refuses, refused here too)
    transfer = finetune.prepare(model, cfg.finetune, model.name if isinstance(model, TorchvisionModel) else None)
    optimizer = build_optimizer(cfg, model, steps_per_epoch=spe, features=transfer.scaled,
                                feature_lr_scale=float(cfg.finetune.feature_lr_scale), epoch_steps=steps)
    max_epochs = cfg.trainer.max_epochs
    scheduler = build_scheduler(cfg.scheduler, optimizer, spe, max_epochs, epoch_steps=steps,
                                mode=monitor_mode(cfg.early_stopping.monitor, cfg.early_stopping.mode))
    snapshots = snapshot_epochs(cfg.scheduler, spe, max_epochs) if cfg.checkpoint.snapshots == "cycles" else []
    swa_start = cfg.regularization.get("swa_start")
    first_swa = max_epochs + 1
    if swa_start is not None:
        from trainlab.regularization import first_swa_epoch

        first_swa = first_swa_epoch(swa_start, max_epochs)
    lrs: list[float] = []
    positions: list[float] = []
    momenta: list[float] = []
    cycled = scheduler.get_last_momentum() is not None
    for epoch, count in enumerate(steps, start=1):  # counts change only under data.batch_size_schedule
        positions += [epoch - 1 + i / count for i in range(count)]
        if epoch >= first_swa:
            lrs += [float(cfg.regularization.swa_lr)] * count
            momenta += [scheduler.get_last_momentum()] * count if cycled else []  # no more steps: it stays
            continue
        for _ in range(count):
            lrs.append(optimizer.param_groups[0]["lr"])
            if cycled:
                momenta.append(scheduler.get_last_momentum())
            scheduler.step()
        scheduler.epoch_end(PLATEAU_METRIC)
    return lrs, positions, snapshots, momenta


def lr_curve(cfg: DictConfig) -> list[float]:
    """The learning rate at every optimizer step of the run `cfg` describes (plateau: a constant metric)."""
    return _curve(cfg)[0]


def sparkline(values: list[float], width: int = 60) -> str:
    """One line of block characters: values sampled at `width` evenly spaced points, scaled min to max."""
    if not values:
        return ""
    n = min(width, len(values))
    samples = [values[round(i * (len(values) - 1) / max(1, n - 1))] for i in range(n)]
    low, high = min(samples), max(samples)
    if high == low:
        return SPARK[len(SPARK) // 2] * n
    return "".join(SPARK[round((v - low) / (high - low) * (len(SPARK) - 1))] for v in samples)


def table_steps(positions: list[float], rows: int = TABLE_ROWS) -> list[int]:
    """Steps shown in the table: the start, every k-th epoch boundary (at most `rows`), and the last step."""
    boundaries = [s for s in range(1, len(positions)) if int(positions[s]) != int(positions[s - 1])]
    stride = max(1, math.ceil(len(boundaries) / rows))
    return sorted({0, *boundaries[stride - 1 :: stride], len(positions) - 1})


def dry_run(cfg: DictConfig, out_dir: Path) -> Path:
    """Write out_dir/lr_curve.csv (and .png when matplotlib is there), print a table and a sparkline."""
    lrs, positions, snapshots, momenta = _curve(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "lr_curve.csv"
    with path.open("w", newline="") as f:  # a momentum column where the schedule cycles it
        writer = csv.writer(f)
        writer.writerow(["step", "epoch", "lr"] + (["momentum"] if momenta else []))
        writer.writerows([step, int(positions[step]) + 1, repr(lr)] + ([repr(momenta[step])] if momenta else [])
                         for step, lr in enumerate(lrs))

    knobs = OmegaConf.to_container(cfg.scheduler, resolve=True)
    base = float(cfg.optimizer.lr)
    console = Console()
    table = Table(title=f"learning rate: scheduler={knobs.pop('name')} "
                        + " ".join(f"{k}={v}" for k, v in knobs.items()))
    columns = ("step", "epochs done", "lr", "lr / optimizer.lr") + (("momentum",) if momenta else ())
    for column in columns:  # lr_curve.csv's epoch: the step's, from 1
        table.add_column(column, justify="right")
    for step in table_steps(positions):
        label = "end" if step == len(lrs) - 1 else f"{positions[step]:g}"
        table.add_row(str(step), label, f"{lrs[step]:.6g}", f"{lrs[step] / base:.4g}",
                      *([f"{momenta[step]:.4g}"] if momenta else []))
    console.print(table)
    console.print(f"lr {sparkline(lrs)}  {min(lrs):.3g} .. {max(lrs):.3g}  "
                  f"({len(lrs)} steps over {cfg.trainer.max_epochs} epochs)")
    if momenta:
        console.print(f"momentum {sparkline(momenta)}  {min(momenta):.3g} .. {max(momenta):.3g}")
    if cfg.scheduler.name == "plateau":
        console.print(f"plateau: the dry run holds the monitored metric constant, so the lr drops every "
                      f"{cfg.scheduler.patience} epochs after the first; a real run drops only when "
                      f"{cfg.early_stopping.monitor} stalls")
    if snapshots:  # the weights at the end of these epochs: the last step of each, where the cycle's lr is lowest
        ends = [positions.index(epoch) - 1 if epoch < cfg.trainer.max_epochs else len(lrs) - 1 for epoch in snapshots]
        console.print("snapshots (checkpoint.snapshots=cycles) at the end of epochs "
                      + ", ".join(f"{epoch} (lr {lrs[end]:.3g})" for epoch, end in zip(snapshots, ends)))
    if cfg.early_stopping.enabled:
        console.print(f"the curve covers all trainer.max_epochs={cfg.trainer.max_epochs}; early stopping "
                      f"(patience {cfg.early_stopping.patience}) may end a real run sooner")
    plotted = _plot(lrs, positions, out_dir / "lr_curve.png", f"scheduler={cfg.scheduler.name}", snapshots, momenta)
    for written in [path] + ([out_dir / "lr_curve.png"] if plotted else []):
        console.print(f"wrote {written}", markup=False, soft_wrap=True)  # a path cut over lines cannot be pasted
    return path


def _plot(lrs: list[float], positions: list[float], path: Path, title: str, snapshots: list[int],
          momenta: list[float]) -> bool:
    """lr against epoch as a PNG, the snapshot epochs' ends as dotted lines, a cycled momentum on a right-hand axis;
    only when matplotlib can be imported (whether it wrote the file)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    ax.plot(positions, lrs)
    for epoch in snapshots:
        ax.axvline(epoch, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    if momenta:
        right = ax.twinx()
        right.plot(positions, momenta, color="tab:orange", linewidth=1)
        right.set_ylabel("momentum", color="tab:orange")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True
