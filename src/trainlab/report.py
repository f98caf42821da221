"""The report of a sweep, read from its job directories: a ranked table, CSV, Markdown and a val/loss plot."""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from rich.text import Text

from trainlab.config import monitor_mode
from trainlab.sweep import DONE
# Overrides that do not change the experiment (left out of directory names too, see conf/train.yaml).
IGNORED_KEYS = ("sweep.resume", "sweep.objective", "hparams_search", "checkpoint.resume", "trainer.device",
                "logger.progress", "logger.tensorboard", "logger.grad_norm", "logger.layer_stats_every_n_epochs",
                "logger.histograms", "logger.graph", "dry_run")
COLUMNS = ("val/loss", "val/acc", "test/loss", "test/acc")  # shown for every job besides the ranking metric


@dataclass
class Job:
    """One job directory of a sweep, as its files describe it."""

    name: str
    num: int | None
    overrides: list[str]
    status: str
    reason: str | None = None
    best_epoch: int | None = None
    values: dict[str, float] = field(default_factory=dict)  # val/* at the best epoch, test/*
    wall_time_s: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val/loss) from metrics.csv
    monitor: tuple[str, str] | None = None  # (early_stopping.monitor, mode) of its config


@dataclass
class Group:
    """The jobs that differ only in their seed."""

    overrides: list[str]
    jobs: list[Job]
    stats: dict[str, tuple[float, float, int]]  # metric -> (mean, std, n) over the jobs that completed


@dataclass
class Report:
    sweep_dir: Path
    metric: str
    mode: str
    jobs: list[Job]  # ranked: completed jobs by the metric, then the rest by job number
    varying: list[str]  # override keys whose value differs between jobs
    groups: list[Group] | None  # ranked by the metric's mean; None when no seed was swept


def read_job(path: Path) -> Job:
    """A job from its summary.json, .hydra/ and metrics.csv; a job without summary.json did not finish."""
    summary: dict[str, Any] = {}
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError:
            summary = {"status": "unreadable", "stop_reason": "summary.json is not valid JSON"}
    overrides = summary.get("overrides")
    if overrides is None and (path / ".hydra" / "overrides.yaml").is_file():
        overrides = list(OmegaConf.load(path / ".hydra" / "overrides.yaml"))
    overrides = [o for o in overrides or [] if _key(o) not in IGNORED_KEYS]
    match = re.match(r"^(\d+)(_|$)", path.name)
    # the snapshot ensemble's test scores under their TensorBoard tags: rank a sweep by them with --metric
    snapshots = {f"test/snapshot_ensemble_{k.split('/')[1]}": v
                 for k, v in (summary.get("snapshot_ensemble") or {}).items() if k.startswith("test/")}
    values = {k: v for k, v in {**(summary.get("best") or {}), **(summary.get("test") or {}), **snapshots}.items()
              if isinstance(v, (int, float)) and k != "epoch"}
    return Job(name=path.name, num=int(match.group(1)) if match else None, overrides=overrides,
               status=summary.get("status", "unfinished"),
               reason=_reason(summary) if summary else "no summary.json: the job did not finish",
               best_epoch=summary.get("best_epoch"), values=values, wall_time_s=summary.get("wall_time_s"),
               curve=_val_loss_curve(path / "metrics.csv"), monitor=_monitor(path / ".hydra" / "config.yaml"))


def _reason(summary: dict[str, Any]) -> str | None:
    """The job's stop reason; for a refused config, what was refused (its error), not only "invalid config"."""
    reason, error = summary.get("stop_reason"), summary.get("error")
    if reason == "invalid config" and isinstance(error, str) and error:
        return " ".join(line.strip().lstrip("- ") for line in error.splitlines() if line.strip())
    return reason


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _val_loss_curve(path: Path) -> list[tuple[int, float]]:
    """(epoch, val/loss) per epoch; an epoch written twice (a resumed run) keeps its last row."""
    if not path.is_file():
        return []
    by_epoch: dict[int, float] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                by_epoch[int(row["epoch"])] = float(row["val/loss"])
            except (KeyError, TypeError, ValueError):
                continue
    return sorted(by_epoch.items())


def _monitor(config_path: Path) -> tuple[str, str] | None:
    if not config_path.is_file():
        return None
    stop = OmegaConf.load(config_path).get("early_stopping")
    if stop is None or "monitor" not in stop:
        return None
    return str(stop.monitor), monitor_mode(str(stop.monitor), str(stop.get("mode", "auto")))


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job directories of a sweep: its subdirectories that hold a Hydra record or a summary."""
    return [p for p in sorted(sweep_dir.iterdir())
            if p.is_dir() and ((p / ".hydra").is_dir() or (p / "summary.json").is_file())]


def metric_value(job: Job, metric: str) -> float | None:
    value = job.values.get(metric)
    return value if value is not None and math.isfinite(value) and job.status in DONE else None


def rank(jobs: list[Job], metric: str, mode: str) -> list[Job]:
    """Completed jobs best first by `metric` (mode min or max), then the others in job order."""
    sign = 1.0 if mode == "min" else -1.0
    scored = [j for j in jobs if metric_value(j, metric) is not None]
    rest = [j for j in jobs if metric_value(j, metric) is None]
    return (sorted(scored, key=lambda j: (sign * metric_value(j, metric), _order(j)))
            + sorted(rest, key=_order))


def _order(job: Job) -> tuple[int, str]:
    return (job.num if job.num is not None else 1 << 30, job.name)


def varying_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value is not the same in every job (a key some jobs lack counts as varying)."""
    values: dict[str, set] = {}
    for job in jobs:
        for override in job.overrides:
            values.setdefault(_key(override), set()).add(override)
    return [k for k, v in values.items() if len(v) > 1 or any(not _has(j, k) for j in jobs)]


def _has(job: Job, key: str) -> bool:
    return any(_key(o) == key for o in job.overrides)


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (n - 1; nan for one value) and count."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, 0)
    return (statistics.fmean(values), statistics.stdev(values) if n > 1 else math.nan, n)


def group_over_seeds(jobs: list[Job], metric: str, mode: str) -> list[Group]:
    """Jobs grouped by their overrides without `seed`, ranked by the mean of `metric` over completed seeds."""
    groups: dict[tuple[str, ...], list[Job]] = {}
    for job in sorted(jobs, key=_order):
        groups.setdefault(tuple(o for o in job.overrides if _key(o) != "seed"), []).append(job)
    result = []
    for overrides, members in groups.items():
        stats = {}
        for name in dict.fromkeys((metric, *COLUMNS)):
            stats[name] = mean_std([v for v in (metric_value(j, name) for j in members) if v is not None])
        result.append(Group(list(overrides), members, stats))
    sign = 1.0 if mode == "min" else -1.0
    return sorted(result, key=lambda g: (g.stats[metric][2] == 0, sign * g.stats[metric][0]
                                         if g.stats[metric][2] else 0.0, _order(g.jobs[0])))


def build_report(sweep_dir: Path, metric: str | None = None, mode: str | None = None) -> Report:
    """Read every job of `sweep_dir` (finished, failed or never finished) and rank them."""
    if not sweep_dir.is_dir():
        what = "is a file, not a sweep directory" if sweep_dir.is_file() else "no such sweep directory"
        raise FileNotFoundError(f"{sweep_dir}: {what}")
    jobs = [read_job(p) for p in job_dirs(sweep_dir)]
    monitor = next((j.monitor for j in jobs if j.monitor is not None), ("val/loss", "min"))
    known = {k for j in jobs for k in j.values}  # what the jobs hold (none of a sweep whose jobs all failed)
    if metric is not None and metric not in known:
        choices = f"choose one of {', '.join(sorted(known))}" if known else "no job of this sweep has any value yet"
        raise ValueError(f"metric {metric!r} is in no job's summary; {choices}")
    metric = metric or monitor[0]
    if mode is None:
        mode = monitor[1] if metric == monitor[0] else ("max" if metric.endswith("acc") else "min")
    if mode not in ("min", "max"):
        raise ValueError(f"mode={mode!r}: choose min or max")
    varying = varying_keys(jobs)
    groups = group_over_seeds(jobs, metric, mode) if "seed" in varying else None
    return Report(sweep_dir, metric, mode, rank(jobs, metric, mode), varying, groups)


# --- output -----------------------------------------------------------------------------------------


def _shown(overrides: list[str], keys: list[str]) -> str:
    """The overrides whose key is in `keys` (the ones that differ between jobs), for a table cell."""
    return " ".join(o for o in overrides if _key(o) in keys) or "(defaults)"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pm(stat: tuple[float, float, int]) -> str:
    mean, std, n = stat
    if n == 0:
        return ""
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def job_rows(report: Report) -> list[dict[str, Any]]:
    """One dict per job, in rank order: the rows of sweep_summary.csv and of the job table."""
    rows = []
    for position, job in enumerate(report.jobs, start=1):
        scored = metric_value(job, report.metric) is not None
        rows.append({"rank": position if scored else "", "job": job.name, "overrides": " ".join(job.overrides),
                     "status": job.status, "best_epoch": job.best_epoch if job.best_epoch is not None else "",
                     **{name: _fmt(job.values.get(name)) for name in dict.fromkeys((report.metric, *COLUMNS))},
                     "wall_time_s": _fmt(job.wall_time_s, 1), "reason": job.reason or ""})
    return rows


def group_rows(report: Report) -> list[dict[str, Any]]:
    """One dict per group of seeds, in rank order (mean ± sample std over the seeds that completed)."""
    rows = []
    for position, group in enumerate(report.groups or [], start=1):
        ok = sum(j.status in DONE for j in group.jobs)
        row = {"rank": position if group.stats[report.metric][2] else "", "overrides": " ".join(group.overrides),
               "seeds": " ".join(o.split("=", 1)[1] for j in group.jobs for o in j.overrides if _key(o) == "seed"),
               "completed": f"{ok}/{len(group.jobs)}"}
        for name, (mean, std, _) in group.stats.items():
            row[f"{name} mean"], row[f"{name} std"] = _fmt(mean), _fmt(std)
        walls = [j.wall_time_s for j in group.jobs if j.wall_time_s is not None]
        row["wall_time_s mean"] = _fmt(statistics.fmean(walls), 1) if walls else ""
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["job"])
        writer.writeheader()
        writer.writerows(rows)


def _markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def job_table(report: Report) -> Table:
    metric = report.metric
    table = Table(title=Text(f"{report.sweep_dir}: {len(report.jobs)} jobs ranked by best {metric} ({report.mode})"))
    tests = [c for c in COLUMNS if c.startswith("test/") and c != metric]
    for column in ("#", "job", "overrides", "status", "best epoch", f"best {metric}", *tests, "wall s"):
        table.add_column(column, justify="left" if column in ("job", "overrides", "status") else "right",
                         no_wrap=column != "overrides")
    for row, job in zip(job_rows(report), report.jobs):
        style = None if job.status in DONE else "red"
        table.add_row(str(row["rank"]), Text(str(job.num if job.num is not None else job.name)),
                      Text(_shown(job.overrides, report.varying)), job.status, str(row["best_epoch"]), row[metric],
                      *[row[c] for c in tests], row["wall_time_s"], style=style)
    return table


def group_table(report: Report) -> Table:
    metric = report.metric
    table = Table(title=f"mean ± std over seeds, ranked by best {metric} ({report.mode})")
    for column in ("#", "overrides", "seeds ok", f"best {metric}", "test/acc", "test/loss"):
        table.add_column(column, justify="left" if column == "overrides" else "right",
                         no_wrap=column != "overrides")
    for group, row in zip(report.groups or [], group_rows(report)):
        shown = [k for k in report.varying if k != "seed"]
        table.add_row(str(row["rank"]), Text(_shown(group.overrides, shown)), row["completed"],
                      _pm(group.stats[metric]), _pm(group.stats["test/acc"]), _pm(group.stats["test/loss"]))
    return table


def val_loss_series(report: Report) -> list[tuple[str, list[int], list[float], list[float] | None]]:
    """(label, epochs, val/loss, std or None) per line of the plot: one per job, or per group of seeds (the mean over
    its completed seeds, as the tables, with its std); a non-finite val/loss is a gap in a job's line and left out
    of a mean."""
    shown = [k for k in report.varying if k != "seed"]
    series = []
    if report.groups is not None:
        for group in report.groups:
            by_epoch: dict[int, list[float]] = {}
            done = [job for job in group.jobs if job.status in DONE and job.curve]
            for job in done:
                for epoch, value in job.curve:
                    if math.isfinite(value):
                        by_epoch.setdefault(epoch, []).append(value)
            if by_epoch:
                epochs = sorted(by_epoch)
                series.append((f"{_shown(group.overrides, shown)} (n={len(done)})", epochs,
                               [statistics.fmean(by_epoch[e]) for e in epochs],
                               [mean_std(by_epoch[e])[1] if len(by_epoch[e]) > 1 else 0.0 for e in epochs]))
    else:
        for job in report.jobs:
            if job.curve:
                epochs, values = zip(*job.curve)
                values = [v if math.isfinite(v) else math.nan for v in values]  # inf would stretch the axis
                series.append((f"{job.num} {_shown(job.overrides, shown)}", list(epochs), values, None))
    return series


def plot_val_loss(report: Report, path: Path) -> bool:
    """The val/loss lines of `val_loss_series` (a ±std band for a group of seeds); False when nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    series = val_loss_series(report)
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, epochs, mean, std in series:
        (line,) = ax.plot(epochs, mean, marker="o" if len(epochs) < 3 else None, label=label)
        if std is not None:
            low, high = np.array(mean) - np.array(std), np.array(mean) + np.array(std)
            ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val/loss")
    ax.set_yscale("log" if all(v > 0 for s in series for v in s[2] if not math.isnan(v)) else "linear")
    ax.set_title(f"validation loss: {report.sweep_dir.name}" + (" (mean ± std over seeds)" if report.groups else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def write_report(sweep_dir: Path, metric: str | None = None, mode: str | None = None,
                 console: Console | None = None) -> Report:
    """Print the ranked tables and write sweep_summary.csv, sweep_summary.md (+ _over_seeds) and sweep_val_loss.png."""
    report = build_report(sweep_dir, metric, mode)
    publish(report, console)
    return report


def publish(report: Report, console: Console | None = None) -> None:
    """Write and print a report built by build_report."""
    sweep_dir = report.sweep_dir
    rows = job_rows(report)
    _write_csv(sweep_dir / "sweep_summary.csv", rows)
    md_columns = ["rank", "job", "overrides", "status", "best_epoch", *dict.fromkeys((report.metric, *COLUMNS)),
                  "wall_time_s"]
    markdown = (f"# Sweep {sweep_dir.name}\n\n"
                f"{len(report.jobs)} jobs ranked by best {report.metric} ({report.mode}).\n\n")
    markdown += _markdown(rows, md_columns)
    if report.groups is not None:
        grows = group_rows(report)
        _write_csv(sweep_dir / "sweep_summary_over_seeds.csv", grows)
        markdown += "\n## Mean ± std over seeds\n\n" + _markdown(
            [{**r, **{f"{n}": _pm(g.stats[n]) for n in g.stats}} for r, g in zip(grows, report.groups)],
            ["rank", "overrides", "seeds", "completed", *dict.fromkeys((report.metric, *COLUMNS))])
    (sweep_dir / "sweep_summary.md").write_text(markdown)
    plotted = plot_val_loss(report, sweep_dir / "sweep_val_loss.png")
    console = console or Console(width=None if sys.stdout.isatty() else 160)  # logs and CI: no 80-column wrap
    console.print(job_table(report))
    if report.groups is not None:
        console.print(group_table(report))
    written = ["sweep_summary.csv", "sweep_summary.md"] + (["sweep_summary_over_seeds.csv"] if report.groups else [])
    console.print(f"report: {', '.join(written)}" + (", sweep_val_loss.png" if plotted else "") + f" in {sweep_dir}",
                  markup=False, soft_wrap=True)  # a path cut over lines cannot be pasted


def main(argv: list[str] | None = None) -> None:
    """The `trainlab` command: `trainlab report <sweep_dir>`, `trainlab ensemble <runs>`."""
    parser = argparse.ArgumentParser(prog="trainlab", description="trainlab's tools besides `train`.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="rank the jobs of a sweep directory (finished, partial or failed)")
    report.add_argument("sweep_dir", type=Path, help="a sweep directory, e.g. outputs/multirun/<time>")
    report.add_argument("--metric", default=None,
                        help="rank by this metric: val/loss, val/acc, val/balanced_acc (at the best epoch), test/loss, "
                             "test/acc, test/balanced_acc; "
                             "default: the sweep's early_stopping.monitor")
    report.add_argument("--mode", choices=("min", "max"), default=None,
                        help="min: lower is better; default: early_stopping.mode for its monitor, else max for "
                             "accuracies and min otherwise")
    together = commands.add_parser("ensemble", help="average the predictions of trained runs on their test split")
    together.add_argument("runs", type=Path, nargs="+", help="run directories, or sweep directories of them")
    together.add_argument("--checkpoint", choices=("tested", "best", "last", "swa", "snapshots"), default="tested",
                          help="each run's weights: tested (what its test used: swa.pt after SWA, else best.pt), "
                               "best, last, swa, or snapshots (every snapshot_<epoch>.pt of each run: a snapshot "
                               "ensemble, see checkpoint.snapshots)")
    together.add_argument("--last", type=int, default=None, metavar="N",
                          help="with --checkpoint snapshots: the last N snapshots of each run (default: all)")
    together.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps (default cpu)")
    together.add_argument("--csv", type=Path, default=None,
                          help="also write the table to this CSV file (in an existing directory)")
    args = parser.parse_args(argv)
    if args.command == "ensemble":
        _ensemble(parser, args)
        return
    if args.sweep_dir.is_dir() and not job_dirs(args.sweep_dir):
        parser.exit(2, f"trainlab report: {_not_a_sweep(args.sweep_dir)}\n")
    try:
        write_report(args.sweep_dir, args.metric, args.mode)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"trainlab report: {error}\n")


def _not_a_sweep(path: Path) -> str:
    """Why `path`, a directory without jobs, cannot be reported, and which directory to give instead."""
    if (path / ".hydra").is_dir() or (path / "summary.json").is_file():
        sweep = path.parent if (path.parent / "multirun.yaml").is_file() else None  # Hydra's record of a sweep
        instead = (f"give the sweep it belongs to, {sweep}" if sweep is not None else
                   "give a sweep's directory (train -m ...), e.g. outputs/multirun/<time>; the run's own results are "
                   "in its summary.json and metrics.csv")
        return f"{path} is a single run's directory, and a report ranks the jobs of a sweep: {instead}"
    return (f"{path} holds no job directories (subdirectories with .hydra/ or summary.json); give the directory of a "
            "sweep, e.g. outputs/multirun/<time>")


def _ensemble(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from trainlab import ensemble
    from trainlab.config import ConfigError

    try:
        if args.csv is not None:
            ensemble.check_csv(args.csv)
        result = ensemble.ensemble(args.runs, args.checkpoint, args.device, args.last)
    except ConfigError as error:
        parser.exit(2, f"trainlab ensemble: {error}\n")
    Console(width=None if sys.stdout.isatty() else 160).print(ensemble.table(result))
    if args.csv is not None:
        try:
            ensemble.write_csv(result, args.csv)
        except OSError as error:
            parser.exit(2, f"trainlab ensemble: --csv {args.csv}: {error.strerror or error}\n")
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main(sys.argv[1:])
