"""What a run reports: TensorBoard scalars, metrics.csv, console lines or a live bar, and the final table."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.highlighter import NullHighlighter
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

log = logging.getLogger("trainlab")

CSV_COLUMNS = ["epoch", "step", "train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_time_s"]
# One chart for train and validation loss (and accuracy), so over- and under-fitting show at a glance.
CUSTOM_SCALARS = {
    "train vs val": {
        "loss": ["Multiline", ["train/loss", "val/loss"]],
        "accuracy": ["Multiline", ["train/acc", "val/acc"]],
    }
}


class RunMonitor:
    """Writes one run's scalars to TensorBoard and metrics.csv and shows progress on the console."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, live: bool, max_epochs: int, steps_per_epoch: int):
        self.run_dir = run_dir
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir))
            self.writer.add_custom_scalars(CUSTOM_SCALARS)
        csv_path = run_dir / "metrics.csv"
        self._csv_file = csv_path.open("a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_COLUMNS)
        if csv_path.stat().st_size == 0:
            self._csv.writeheader()
        self.max_epochs, self.steps_per_epoch = max_epochs, steps_per_epoch
        self.console = Console()
        self.progress: Progress | None = None
        self._swapped: list[tuple[logging.Handler, logging.Handler]] = []
        if live:
            self._start_live()

    # --- live bar (terminal only) ---------------------------------------------------------------
    def _start_live(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[max_epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task("train", total=self.steps_per_epoch, epoch=0,
                                           max_epochs=self.max_epochs, loss="-", lr="-")
        # Log lines go through the bar's console, so they print above the bar instead of through it.
        root = logging.getLogger()
        for handler in list(root.handlers):
            if type(handler) is logging.StreamHandler:
                rich_handler = RichHandler(console=self.console, show_path=False, show_level=False,
                                           log_time_format="[%X]", markup=False, highlighter=NullHighlighter())
                root.removeHandler(handler)
                root.addHandler(rich_handler)
                self._swapped.append((handler, rich_handler))
        self.progress.start()

    def start_epoch(self, epoch: int, first_step: int, steps: int) -> None:
        self._epoch_first_step = first_step
        if self.progress is not None:
            self.progress.update(self.task, completed=0, total=steps, epoch=epoch)

    def train_interval(self, step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("lr", lr, step)
        if self.progress is not None:
            done = step - self._epoch_first_step
            self.progress.update(self.task, completed=done, loss=f"{loss:.4f}", lr=f"{lr:.3g}")

    def end_epoch(self, row: dict[str, Any]) -> None:
        """Record one epoch: a metrics.csv row, TensorBoard scalars at the epoch's last step, a log line."""
        self._csv.writerow({k: row.get(k) for k in CSV_COLUMNS})
        self._csv_file.flush()
        if self.writer is not None:
            for key in ("train/acc", "val/loss", "val/acc"):
                self.writer.add_scalar(key, row[key], row["step"])
            self.writer.add_scalar("epoch", row["epoch"], row["step"])
            self.writer.flush()
        note = "  *best*" if row.get("best") else ""
        log.info(
            f"epoch {row['epoch']}/{self.max_epochs}  train/loss {row['train/loss']:.4f}  "
            f"train/acc {row['train/acc']:.4f}  val/loss {row['val/loss']:.4f}  val/acc {row['val/acc']:.4f}  "
            f"lr {row['lr']:.3g}  {row['epoch_time_s']:.1f}s{note}"
        )

    def test_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        root = logging.getLogger()
        for original, rich_handler in self._swapped:
            root.removeHandler(rich_handler)
            root.addHandler(original)
        self._swapped.clear()
        if self.writer is not None:
            self.writer.close()
        self._csv_file.close()


def final_table(summary: dict[str, Any]) -> Table:
    """The run's outcome: status, stop reason, best and test metrics, wall time, where to look."""
    table = Table(title="trainlab run", show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # paths stay whole (folded, never cut) so they can be copied

    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)

    table.add_row("status", summary["status"])
    table.add_row("stop reason", summary.get("stop_reason") or "-")
    best = summary.get("best") or {}
    if best:
        table.add_row("best epoch", f"{summary['best_epoch']} of {summary['epochs_run']} run")
        for key, value in best.items():
            if key != "epoch":
                table.add_row(f"best {key}", fmt(value))
    for key, value in (summary.get("test") or {}).items():
        table.add_row(key, fmt(value))
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s on {summary['device']}")
    table.add_row("run directory", summary["run_dir"])
    table.add_row("curves", f"tensorboard --logdir {summary['run_dir']}")
    return table
