"""What a run reports: TensorBoard (scalars, layer statistics, images, hparams), metrics.csv, the console."""

from __future__ import annotations

import csv
import io
import logging
import math
import shlex
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.highlighter import NullHighlighter
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text
from rich.tree import Tree
from torch import nn

from trainlab.files import write_text_atomic
from trainlab.layer_stats import LayerStats, effective_lrs, global_norm
from trainlab.loop import Interval

log = logging.getLogger("trainlab")

CSV_COLUMNS = ["epoch", "step", "train/loss", "train/acc", "val/loss", "val/acc", "val/balanced_acc", "lr",
               "epoch_time_s"]
# One chart for train and validation loss (and accuracy), so over- and under-fitting show at a glance.
CUSTOM_SCALARS = {
    "train vs val": {
        "loss": ["Multiline", ["train/loss", "val/loss"]],
        "accuracy": ["Multiline", ["train/acc", "val/acc"]],
    }
}
# Scalars wait in memory and reach the event file's writer thread in batches, at most this many seconds apart (and
# the thread flushes to disk as often). One hand-over per logging interval woke the thread each time: on a
# 2-core CPU that cost the loop 0.2 ms per interval, 4 % of a small MLP's steps; a batch costs a third of it.
FLUSH_SECONDS = 2
# The groups whose keys are a run's hyper-parameters in TensorBoard's HPARAMS tab (with seed and the overrides).
HPARAM_GROUPS = ("model", "optimizer", "scheduler", "normalization", "regularization", "augmentation",
                 "initialization", "data", "trainer", "early_stopping")
# The final metrics of the HPARAMS tab: scalar tags written once at the end of the run.
HPARAM_METRICS = ("hparams/best_val_loss", "hparams/best_val_acc", "hparams/best_val_balanced_acc", "hparams/test_loss",
                  "hparams/test_acc", "hparams/test_balanced_acc", "hparams/epochs_run")


def fast_event_checksums() -> bool:
    """Let TensorBoard's event writer checksum its records with google-crc32c's C code; True when it does.

    Without TensorFlow the writer computes each record's CRC-32C in pure Python, about 0.1 us per byte on its
    writer thread, holding the GIL the training loop needs: ~1 ms per layer-statistics event, ~5 ms per
    confusion-matrix image. The C version gives the same checksums ~50x faster; it is used only after it
    agrees with TensorBoard's own on a probe.
    """
    try:
        import google_crc32c
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False

    def masked_crc32c(data: bytes) -> int:
        crc = google_crc32c.value(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF  # TFRecord's mask

    probe = bytes(range(256))
    if google_crc32c.implementation != "c" or masked_crc32c(probe) != reference(probe):
        return False
    record_writer.masked_crc32c = masked_crc32c
    return True


class SilentMonitor:
    """The monitor of torchrun's ranks other than 0, which record nothing: rank 0 writes the run directory."""

    def start_epoch(self, *args: Any) -> None:
        pass

    def train_interval(self, *args: Any) -> None:
        pass

    def end_epoch(self, *args: Any) -> None:
        pass

    def layer_stats(self, *args: Any) -> None:
        pass

    def test_metrics(self, *args: Any) -> None:
        pass

    def confusion(self, *args: Any) -> None:
        pass

    def graph(self, *args: Any) -> None:
        pass

    def hparams(self, *args: Any) -> None:
        pass

    def close(self) -> None:
        pass


class RunMonitor:
    """Writes one run's TensorBoard events and metrics.csv and shows its progress on the console.

    `model` and `optimizer` give the weight norm and each parameter group's lr and momentum per interval.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool, live: bool, max_epochs: int, steps_per_epoch: int,
                 model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 device: torch.device | None = None, resumed_at_step: int | None = None):
        self.run_dir = run_dir
        self.model, self.optimizer, self.device = model, optimizer, device
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            fast_event_checksums()

            # The writer's thread flushes every few seconds; the loop never waits for the disk.
            # A resumed run drops the events an interrupted one logged after its checkpoint: it logs them again.
            purge = resumed_at_step + 1 if resumed_at_step is not None else None
            self.writer = SummaryWriter(log_dir=str(run_dir), flush_secs=FLUSH_SECONDS, purge_step=purge)
            self.writer.add_custom_scalars(CUSTOM_SCALARS)
        self._pending: list[tuple[Any, int]] = []  # (Summary, step) not yet handed to the writer
        self._handed_at = time.perf_counter()
        csv_path = run_dir / "metrics.csv"
        upgrade_metrics_csv(csv_path)
        self._csv_file = csv_path.open("a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_COLUMNS)
        if csv_path.stat().st_size == 0:
            self._csv.writeheader()
        self.max_epochs, self.steps_per_epoch = max_epochs, steps_per_epoch
        self.last_step = 0
        self.console = Console()
        self.progress: Progress | None = None
        self._swapped: list[tuple[logging.Handler, logging.Handler]] = []
        self._mark = (time.perf_counter(), 0)  # (time, step) of the last interval, for samples/s
        self._run_rate: float | None = None  # steps per second, smoothed, for the run's ETA
        self._weight_norm: tuple[int, float | None] = (-1, None)  # (step, the weights' norm) of the last interval
        if live:
            self._start_live()

    # --- live bar (terminal only) ---------------------------------------------------------------
    def _start_live(self) -> None:
        self.progress = Progress(  # one line that fits 80 columns; the bar is the epoch's share of steps done
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[max_epochs]}"),
            BarColumn(bar_width=12),
            TextColumn("step {task.fields[step]} loss {task.fields[loss]} lr {task.fields[lr]} "
                       "{task.fields[speed]} samples/s ETA {task.fields[eta]}"),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task("train", total=self.steps_per_epoch, epoch=0, max_epochs=self.max_epochs,
                                           step=0, loss="-", lr="-", speed="-", eta="-")
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

    def start_epoch(self, epoch: int, first_step: int, steps: int, batch_size: int = 0, done: int = 0) -> None:
        """`steps` optimizer steps of `batch_size` examples from global step `first_step`, of which `done` were taken
        before (an epoch resumed from a mid-epoch last.pt): the speed counts only the steps this process takes."""
        self._epoch, self._epoch_first_step, self._epoch_steps = epoch, first_step, steps
        self._batch_size = batch_size
        self._mark = (time.perf_counter(), first_step + done)
        if self.progress is not None:
            self.progress.update(self.task, completed=0, total=steps, epoch=epoch, step=first_step)

    def train_interval(self, interval: Interval) -> None:
        """Per logging interval: train/loss, lr and momentum per group, gradient and weight norms, samples/s."""
        now = time.perf_counter()
        steps_done = interval.step - self._mark[1]
        # steps per second over the interval; none when this process took none of its steps (resumed at its end)
        rate = steps_done / max(now - self._mark[0], 1e-9) if steps_done > 0 else None
        self._mark = (now, interval.step)
        if rate is not None:
            self._run_rate = rate if self._run_rate is None else 0.7 * self._run_rate + 0.3 * rate
        self.last_step = interval.step
        self._weight_norm = (interval.step, interval.weight_norm)  # the epoch's last interval ends at its last step
        if self.writer is not None:
            self._write_interval(interval, rate)
        if self.progress is not None and rate is not None:
            remaining = (self._epoch_first_step + self._epoch_steps - interval.step
                         + (self.max_epochs - self._epoch) * self._epoch_steps)
            self.progress.update(self.task, completed=interval.step - self._epoch_first_step, step=interval.step,
                                 loss=f"{interval.loss:.4f}", lr=f"{interval.lrs[0]:.3g}",
                                 speed=f"{rate * self._batch_size:,.0f}", eta=_clock(remaining / self._run_rate))

    def _write_interval(self, interval: Interval, rate: float | None) -> None:
        values = {"train/loss": interval.loss, "lr": interval.lrs[0]}
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        for i, (group, lr) in enumerate(zip(groups, interval.lrs)):
            name = group.get("name", str(i))
            values[f"lr/{name}"] = lr
            momentum = group["betas"][0] if "betas" in group else group.get("momentum")
            if momentum is not None:  # SGD's momentum, Adam's beta1: the value the last step used
                values[f"momentum/{name}"] = momentum
        if interval.grad_norm is not None:
            values["train/grad_norm"] = interval.grad_norm
        if self._batch_size > 0 and rate is not None:
            values["perf/samples_per_s"] = rate * self._batch_size
        self._scalars(values, interval.step)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        """Scalars at one step as one event: a quarter of the cost of one add_scalar per value."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._emit([Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()], step)

    def _emit(self, values: list[Any], step: int) -> None:
        """Summary values (scalars, histograms, images) at one step: one event, handed over with the next batch."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._pending.append((Summary(value=values), step))
        if time.perf_counter() - self._handed_at >= FLUSH_SECONDS:
            self._hand_over()

    def _hand_over(self) -> None:
        """Give the waiting events to the writer thread at once; before any other event, so the file keeps their
        order."""
        file_writer = self.writer.file_writer
        for summary, step in self._pending:
            file_writer.add_summary(summary, step)
        self._pending.clear()
        self._handed_at = time.perf_counter()

    def end_epoch(self, row: dict[str, Any]) -> None:
        """Record one epoch: a metrics.csv row, TensorBoard scalars at the epoch's last step, a log line."""
        self._csv.writerow({k: row.get(k) for k in CSV_COLUMNS})
        self._csv_file.flush()
        self.last_step = row["step"]
        if self.writer is not None:
            values = {key: row[key] for key in ("train/acc", "val/loss", "val/acc", "val/balanced_acc", "epoch")}
            values["perf/epoch_time_s"] = row["epoch_time_s"]
            step, norm = self._weight_norm
            if norm is not None and step == row["step"]:
                values["train/weight_norm"] = norm  # read with the epoch's last interval (the divergence check)
            elif self.model is not None:
                values["train/weight_norm"] = global_norm(self.model.parameters()).item()
            if self.optimizer is not None:  # adaptive optimizers: the median step size per unit gradient
                values.update({f"lr_effective/{name}": lr for name, lr in effective_lrs(self.optimizer).items()})
            if self.device is not None and self.device.type == "cuda":
                values["perf/gpu_max_memory_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
                torch.cuda.reset_peak_memory_stats(self.device)
            self._scalars(values, row["step"])
        note = "  *best*" if row.get("best") else ""
        log.info(
            f"epoch {row['epoch']}/{self.max_epochs}  train/loss {row['train/loss']:.4f}  "
            f"train/acc {row['train/acc']:.4f}  val/loss {row['val/loss']:.4f}  val/acc {row['val/acc']:.4f}  "
            f"lr {row['lr']:.3g}  {row['epoch_time_s']:.1f}s{note}"
        )

    def layer_stats(self, stats: LayerStats, step: int, filters: torch.Tensor | None) -> None:
        """A recorded step's per-layer scalars and histograms, and the first layer's filters, at `step`."""
        if self.writer is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard.summary import histogram_raw, image

        # One event for all of it (not one per histogram and image): fewer hand-overs to the writer thread.
        values = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in stats.scalars.items()]
        for tag, h in stats.histograms.items():
            values += histogram_raw(tag, h.min, h.max, h.num, h.sum, h.sum_squares, h.bucket_limits,
                                    h.bucket_counts).value
        if filters is not None:
            values += image("first_layer/filters", filters, dataformats="CHW").value
        self._emit(values, step)

    def test_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.writer is not None:
            self._scalars(metrics, step)

    def confusion(self, counts: torch.Tensor, step: int) -> None:
        """The test split's confusion matrix as an image (rows: true class, columns: prediction)."""
        if self.writer is not None:
            self._hand_over()
            self.writer.add_figure("test/confusion_matrix", confusion_figure(counts), step)

    def graph(self, model: nn.Module, example: torch.Tensor) -> None:
        """The model's graph (traced once in eval mode on `example`); a warning, not a failure, when tracing fails."""
        if self.writer is None:
            return
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation: it still serves here
                self.writer.add_graph(model, example)
        except Exception as error:  # noqa: BLE001 - tracing fails for some models; the run goes on without a graph
            log.warning(f"logger.graph: the model graph could not be traced ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}); no graph in TensorBoard")
        finally:
            model.train(was_training)

    def hparams(self, hyperparameters: dict[str, Any], summary: dict[str, Any]) -> None:
        """The run's hyper-parameters and final metrics for the HPARAMS tab, in the run's own event file."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        best, test = summary.get("best") or {}, summary.get("test") or {}  # best: the epoch early_stopping chose
        metrics = {"hparams/best_val_loss": best.get("val/loss"), "hparams/best_val_acc": best.get("val/acc"),
                   "hparams/best_val_balanced_acc": best.get("val/balanced_acc"),
                   "hparams/test_loss": test.get("test/loss"), "hparams/test_acc": test.get("test/acc"),
                   "hparams/test_balanced_acc": test.get("test/balanced_acc"),
                   "hparams/epochs_run": summary.get("epochs_run")}
        self._scalars({tag: value for tag, value in metrics.items() if value is not None}, self.last_step)
        self._hand_over()
        status = {"status": summary.get("status"), "stop_reason": summary.get("stop_reason") or ""}
        for summary_proto in hparams({**hyperparameters, **status}, {tag: 0.0 for tag in HPARAM_METRICS}):
            self.writer.file_writer.add_summary(summary_proto)
        self.writer.flush()

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
            self._hand_over()
            self.writer.close()
            self.writer = None
        if not self._csv_file.closed:
            self._csv_file.close()


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def hyperparameters(cfg: DictConfig, overrides: Iterable[str]) -> dict[str, Any]:
    """The run's hyper-parameters as flat scalars: seed, every key of HPARAM_GROUPS, and each override.

    Lists become their text and null "null"; an override adds what the config does not hold by key, such as
    a group's option (`optimizer=adam`).
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, Any] = {"seed": resolved.get("seed")}

    def add(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key not in ("_target_", "_partial_"):
                    add(value, f"{prefix}.{key}")
        elif node is None:
            flat[prefix] = "null"
        elif isinstance(node, (bool, int, float, str)):
            flat[prefix] = node
        else:
            flat[prefix] = str(node)

    for group in HPARAM_GROUPS:
        if group in resolved:
            add(resolved[group], group)
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        flat.setdefault(key, value)
    return flat


@torch.inference_mode()
def confusion_matrix(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     autocast: AbstractContextManager, num_classes: int,
                     reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """counts[true class, predicted class] of `model` in eval mode over `batches` (counted on the device, returned on
    the CPU); under torchrun `reduce` sums the ranks' parts of the split."""
    model.eval()
    device = next(model.parameters()).device
    counts = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    for images, labels in batches:
        with autocast:
            predicted = model(images).argmax(dim=1)
        counts += torch.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    if reduce is not None:
        counts = reduce(counts)
    return counts.cpu().reshape(num_classes, num_classes)


def upgrade_metrics_csv(path: Path) -> None:
    """A metrics.csv with other columns than CSV_COLUMNS (a resume of a run from before val/balanced_acc) is rewritten
    whole (atomically) under today's header, a column it lacks left empty in its rows, so that the rows this run
    appends line up under the header."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        if reader.fieldnames == CSV_COLUMNS:
            return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, restval="", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue(), newline="")


def write_confusion_csv(counts: torch.Tensor, path: Path) -> None:
    """One row per true class, one column per predicted class."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true\\predicted", *range(counts.shape[1])])
        for true, row in enumerate(counts.tolist()):
            writer.writerow([true, *row])


def confusion_figure(counts: torch.Tensor) -> Any:
    """A heat map of the row-normalised confusion matrix, with the counts written in (up to 20 classes)."""
    from matplotlib.figure import Figure

    classes = counts.shape[0]
    rates = counts.float() / counts.sum(dim=1, keepdim=True).clamp_min(1)
    size = min(3 + 0.45 * classes, 14)
    figure = Figure(figsize=(size, size), dpi=80)
    axes = figure.add_subplot()
    axes.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"test split: {int(counts.trace())}/{int(counts.sum())} correct")
    if classes <= 20:
        axes.set_xticks(range(classes))
        axes.set_yticks(range(classes))
        for (true, pred), count in zip(torch.cartesian_prod(torch.arange(classes), torch.arange(classes)).tolist(),
                                       counts.flatten().tolist()):
            axes.text(pred, true, str(count), ha="center", va="center", fontsize=8,
                      color="white" if rates[true, pred] > 0.5 else "black")
    figure.tight_layout()
    return figure


def config_tree(cfg: DictConfig) -> Tree:
    """The resolved config as a tree: one branch per group, one leaf per key."""
    tree = Tree("config", guide_style="dim")

    def add(branch: Tree, node: Any) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                add(branch.add(Text(str(key), style="bold")), value)
            else:  # Text: a value is shown as it is, never read as rich markup ("[red]", "[/x]")
                branch.add(Text(f"{key}: {value}"), highlight=False)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    add(tree, {k: v for k, v in resolved.items() if k != "hydra"})
    return tree


def final_table(summary: dict[str, Any]) -> Table:
    """The run's outcome: status, stop reason, best and test metrics, wall time, where to look."""
    table = Table(title="trainlab run", show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # values stay whole (folded, never cut)

    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)

    rows = [("status", summary["status"]), ("stop reason", summary.get("stop_reason") or "-")]
    best = summary.get("best") or {}
    if best:  # the epoch early_stopping.monitor chose, and its metrics (not each metric's own best)
        rows.append(("best epoch", f"{summary['best_epoch']} of {summary['epochs_run']} run"))
        rows += [(f"{key} at best epoch", fmt(value)) for key, value in best.items() if key != "epoch"]
    swa = summary.get("swa")
    if swa:
        rows.append((f"SWA average ({swa['epochs_averaged']} epochs)",
                     f"val/loss {fmt(swa['val/loss'])}  val/acc {fmt(swa['val/acc'])}"))
    if summary.get("test"):
        rows.append(("tested weights", summary.get("tested_weights", "-")))
    rows += [(key, fmt(value)) for key, value in (summary.get("test") or {}).items()]
    snapshots = summary.get("snapshot_ensemble")
    if snapshots:
        rows.append((f"snapshot ensemble ({snapshots['members']})",
                     f"test/loss {fmt(snapshots['test/loss'])}  test/acc {fmt(snapshots['test/acc'])}"))
    rows.append(("wall time", f"{summary['wall_time_s']:.1f} s on {summary['device']}"))
    for name, value in rows:  # Text: error messages and paths are shown as they are, never read as rich markup
        table.add_row(name, Text(str(value)))
    return table


def where_to_look(summary: dict[str, Any]) -> list[str]:
    """The lines under the final table: the run directory and the command that shows its curves, each whole on one
    line (in the table's column a long path was folded over lines, and pasted with the line breaks)."""
    run_dir = str(summary["run_dir"])
    return [f"run directory: {run_dir}", f"curves: tensorboard --logdir {shlex.quote(run_dir)}"]
