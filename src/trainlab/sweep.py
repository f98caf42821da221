"""Sweep jobs: skip or resume a job of an earlier sweep, return a search's objective, report at the end."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from trainlab.config import ConfigError, monitor_mode, shell_override
from trainlab.files import write_text_atomic

log = logging.getLogger("trainlab")

DONE = ("completed", "stopped_early")  # statuses a resumed sweep does not run again
OBJECTIVE_SECTIONS = ("best", "test")  # sweep.objective = <section>/<metric>, read from summary.json
STOPPED_CODES = (130, 143)  # a run's exit code after a stop signal (faults.INTERRUPT_EXIT_CODES)
# Set by a launcher that stopped the sweep on a stop signal (hydra/launcher=parallel): the exit code (130, 143) and
# the line that says how to continue; the report callback then ends the sweep with them, after the report.
STOPPED: dict[str, Any] = {}
# The directory of the sweep this process runs (set when it starts): one that a failed start left with nothing but
# Hydra's multirun.yaml is removed (cli.main)
SWEEP_DIR: list[Path] = []


class JobFailed(RuntimeError):
    """A search trial that did not complete: the search sweeper records it as failed, not as a value."""


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The job's summary.json, or None when it has none (never ran, or killed before the end)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def objective_value(summary: dict[str, Any], objective: str) -> float | None:
    """`best/val/loss` -> summary["best"]["val/loss"]; None when the run has no such value."""
    section, _, metric = objective.partition("/")
    if section not in OBJECTIVE_SECTIONS or not metric:
        raise ConfigError(f"sweep.objective={objective!r}: name a summary.json metric as <section>/<metric> with "
                          f"section {' or '.join(OBJECTIVE_SECTIONS)}, e.g. best/val/loss, best/val/acc, test/test/acc")
    value = (summary.get(section) or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def objective_names(monitor: str) -> list[str]:
    """The values of sweep.objective a summary.json holds: best/<val metric or the monitor>, test/test/<metric>."""
    best = dict.fromkeys(("val/loss", "val/acc", "val/balanced_acc", monitor))
    return [*(f"best/{m}" for m in best), "test/test/loss", "test/test/acc", "test/test/balanced_acc"]


def check_objective(cfg: DictConfig) -> None:
    """Refuse a sweep.objective that no summary.json holds, and one that the search's direction
    (hydra.sweeper.direction, in a sweep's config) would optimise the wrong way, e.g. seek the worst accuracy."""
    objective = cfg.sweep.objective
    if objective is None:
        return
    names = objective_names(str(cfg.early_stopping.monitor))
    if objective not in names:
        raise ConfigError(f"sweep.objective={objective}: no summary.json holds it; choose one of {', '.join(names)}")
    direction = OmegaConf.select(cfg, "hydra.sweeper.direction", default=None)
    direction = getattr(direction, "name", direction)  # optuna's Direction enum or its name
    higher = monitor_mode(objective, "auto") == "max"
    wanted = "maximize" if higher else "minimize"
    if isinstance(direction, str) and direction.lower() in ("minimize", "maximize") and direction.lower() != wanted:
        raise ConfigError(f"sweep.objective={objective} improves when it gets {'higher' if higher else 'lower'}, but "
                          f"hydra.sweeper.direction={direction} searches for its {'lowest' if higher else 'highest'} "
                          f"value; set hydra.sweeper.direction={wanted}")


def check_new_sweep(cfg: DictConfig) -> None:
    """A sweep into a hydra.sweep.dir whose jobs already trained, without sweep.resume, would have every job refused
    (each directory holds a run) and report the old results as if new: refused at the start. A search (Optuna)
    continues its stored study in the same directory, with new job numbers, and is left alone."""
    sweep_dir = OmegaConf.select(cfg, "hydra.sweep.dir", default=None)
    if sweep_dir is None or cfg.sweep.resume or cfg.sweep.objective is not None or not Path(sweep_dir).is_dir():
        return
    trained = [p for p in Path(sweep_dir).iterdir() if (p / "metrics.csv").is_file()]
    if trained:
        raise ConfigError(f"hydra.sweep.dir={sweep_dir} already holds a sweep ({len(trained)} jobs trained); continue "
                          "it with sweep.resume=true (jobs that completed are skipped), or leave out hydra.sweep.dir "
                          "for a new sweep")


def run_sweep_job(cfg: DictConfig, run_dir: Path, overrides: list[str],
                  execute: Callable[..., tuple[str, int, Any]]) -> str | float:
    """One job of a sweep. Returns its status, or its objective value when `sweep.objective` is set.

    With sweep.resume=true a job that completed in an earlier sweep into the same directory is skipped,
    and one that did not continues from its own checkpoints/last.pt (checkpoint.resume=auto). A job that fails
    returns "failed" (the report at the end lists it and the sweep exits 1); only a search (sweep.objective set)
    raises JobFailed, so that its sweeper records the trial as failed instead of a value.
    """
    check_objective(cfg)  # also checked when the sweep starts (ReportCallback); here for jobs started elsewhere
    previous = read_summary(run_dir) if cfg.sweep.resume else None
    if previous is not None and previous.get("status") in DONE:
        log.info(f"sweep.resume: skipped, {previous['status']} in an earlier sweep ({run_dir})")
        summary, status = previous, previous["status"]
    else:
        if cfg.sweep.resume and cfg.checkpoint.resume is None:
            with open_dict(cfg):
                cfg.checkpoint.resume = "auto"  # its own last.pt (or last.prev.pt); fresh when it has none
        status, code, run = execute(cfg, run_dir, overrides)
        if code != 0 and not run.started:  # a refused resume: the job's record stays the one it trained with
            from trainlab.cli import restore_record

            restore_record(run_dir)
        summary = run.summary
        _record_process(run_dir)
        # Ctrl-C or preemption stops the sweep, not just this job; also when it came during the job's test, which
        # finished (status completed, exit code 130 or 143)
        if status == "interrupted" or code in STOPPED_CODES:
            state = "its last.pt is saved" if status == "interrupted" else f"it finished first: {status}"
            log.warning(f"sweep interrupted in {run_dir.name} ({state}); continue the sweep with the same "
                        f"command plus {shell_override('hydra.sweep.dir', run_dir.parent)} sweep.resume=true")
            sys.exit(code)
    if cfg.sweep.objective is None:
        return status
    value = objective_value(summary, cfg.sweep.objective)
    if status not in DONE or value is None or not math.isfinite(value):
        raise JobFailed(f"{run_dir.name} ended {status} ({summary.get('stop_reason')}); "
                        f"sweep.objective={cfg.sweep.objective} = {value}")
    return value


def _record_process(run_dir: Path) -> None:
    """Add the process, its torch threads and its visible GPUs to summary.json (where the launcher put it)."""
    summary = read_summary(run_dir)
    if summary is None:
        return
    import torch

    summary["process"] = {"pid": os.getpid(), "torch_threads": torch.get_num_threads(),
                          "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")


class ReportCallback(Callback):
    """At the start of every sweep: sweep.objective is checked (exit 2). At the end: the report (table, CSV,
    Markdown, PNG); exit 1 naming the failed jobs, or, for a search, when no trial gave the objective a value."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SWEEP_DIR[:] = [Path(str(config.hydra.sweep.dir))]
        try:
            check_objective(config)
            check_new_sweep(config)
        except ConfigError as error:
            log.error(str(error))
            sys.exit(2)  # before any job ran or any directory was made
        from trainlab.cli import make_directory

        make_directory(SWEEP_DIR[0], "hydra.sweep.dir")
        if config.sweep.resume:  # the jobs' records, before the basic launcher's run_job rewrites them
            from trainlab.cli import keep_record

            for record in SWEEP_DIR[0].glob("**/.hydra"):
                keep_record(record.parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.dry_run:
            return
        from trainlab.report import build_report, publish

        report = build_report(Path(config.hydra.sweep.dir))
        try:
            publish(report)
        except Exception:  # noqa: BLE001 - a report that cannot be drawn must not hide the jobs' outcome
            log.exception("the sweep's report could not be written; `trainlab report <sweep_dir>` retries it")
        failed = [job for job in report.jobs if job.status not in DONE]
        if failed:
            log.error(f"{len(failed)} of {len(report.jobs)} jobs did not complete:\n" +
                      "\n".join(f"  {job.name}: {job.status} ({job.reason})" for job in failed))
        if STOPPED:  # the jobs a stop signal ended are not failures: the sweep ends as stopped (130, 143)
            log.warning(STOPPED["message"])
            sys.exit(STOPPED["code"])
        objective = config.sweep.objective
        if objective is not None and not any(_has_value(report.sweep_dir / j.name, objective) for j in report.jobs):
            log.error(f"no trial succeeded: none of the {len(report.jobs)} jobs gave sweep.objective={objective} a "
                      "value, so the search has no best parameters")
            sys.exit(1)
        if failed:
            sys.exit(1)  # SystemExit passes through Hydra's callback guard, which turns exceptions into warnings


def _has_value(run_dir: Path, objective: str) -> bool:
    """Whether the job completed with a finite sweep.objective: a trial the search recorded as complete."""
    summary = read_summary(run_dir)
    if summary is None or summary.get("status") not in DONE:
        return False
    value = objective_value(summary, objective)
    return value is not None and math.isfinite(value)
