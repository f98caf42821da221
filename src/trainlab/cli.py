"""The `train` command: Hydra composes conf/train.yaml with the command line, then one run executes."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from functools import partial
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from trainlab.config import register_configs


# An absolute path: found the same way from a source checkout, an editable and a regular install.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> str | float:
    from trainlab import distributed  # torch is imported only once Hydra has parsed the command line
    from trainlab.run import execute

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    live = {"bar": True, "lines": False}.get(cfg.logger.progress, sys.stdout.isatty() and not sweeping)
    ranks = distributed.from_env()
    if cfg.dry_run:
        if not ranks.main:  # under torchrun rank 0 alone draws the curve
            shutil.rmtree(run_dir, ignore_errors=True)
            return "dry_run"
        return _dry_run(cfg, run_dir)
    if sweeping:  # a failed job does not stop the sweep: the report at its end lists it (trainlab.sweep)
        from trainlab.sweep import run_sweep_job

        return run_sweep_job(cfg, run_dir, list(hydra_cfg.overrides.task), partial(execute, live=live))
    if ranks.active:  # torchrun: one run, rank 0's directory; the others' scratch directory goes at the end
        distributed.start(ranks, cfg.trainer.device)
        scratch, run_dir = run_dir, distributed.broadcast(run_dir, ranks)
    try:
        status, code, run = execute(cfg, run_dir, list(hydra_cfg.overrides.task), live=live and ranks.main,
                                    ranks=ranks)
    finally:
        if ranks.active:
            distributed.stop()
            if not ranks.main:
                shutil.rmtree(scratch, ignore_errors=True)
    if code != 0 and not run.started and ranks.main:
        _leave_as_found(run_dir)
    if code != 0:
        sys.exit(code)
    return status


def _dry_run(cfg: DictConfig, run_dir: Path) -> str:
    """Print and plot the learning-rate curve of the run `cfg` describes, without training."""
    import logging

    from trainlab.config import ConfigError, validate
    from trainlab.dry_run import dry_run

    try:
        validate(cfg)
        dry_run(cfg, run_dir)
    except ConfigError as error:
        logging.getLogger("trainlab").error(str(error))
        _leave_as_found(run_dir)
        sys.exit(2)
    return "dry_run"


def _leave_as_found(run_dir: Path) -> None:
    """After a run refused before training: a directory that held a Hydra record before this command gets it back
    (and keeps whatever else it held); one this command made goes, when it holds only bookkeeping."""
    if run_dir.resolve() in _RECORD:
        restore_record(run_dir)
    elif run_dir.is_dir():
        _remove_if_only_bookkeeping(run_dir)


def _remove_if_only_bookkeeping(run_dir: Path) -> None:
    """A run refused before training leaves no directory behind that looks like a real run."""
    if {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log", "summary.json"}:
        _remove(run_dir, "runs")


def _remove(directory: Path, default: str) -> None:
    """Delete `directory`, then outputs/<default> and outputs when it was in that default place and left them empty
    (a directory of the user's own choosing is never removed with it)."""
    shutil.rmtree(directory, ignore_errors=True)
    if directory.parent.name == default and directory.parent.parent.name == "outputs":
        for parent in (directory.parent, directory.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break


# A run directory's Hydra record (.hydra/*.yaml) as it was before this process's Hydra rewrote it: put back when a
# resume into that directory is refused, so that the run's record (which trainlab report and ensemble rebuild it
# from) stays the one it trained with. Kept for a single run by FreshRunDirectory, for the jobs of a resumed sweep
# by sweep.ReportCallback (the basic launcher's jobs run in its process) or by the launcher's job process (parallel,
# slurm), each before Hydra's run_job writes the job's record.
_RECORD: dict[Path, dict[str, bytes]] = {}
_RUN_DIRS: list[Path] = []  # the single run's directory, once FreshRunDirectory has let it start


def make_directory(path: Path, key: str) -> None:
    """Make the run or sweep directory (Hydra would, next, with a traceback when it cannot): exit 2 naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"train: cannot make the directory {path} ({error.strerror or error}); choose another {key}",
              file=sys.stderr)
        sys.exit(2)


def keep_record(run_dir: Path) -> None:
    """Keep the Hydra record of `run_dir` as it is now (nothing when it has none, or was kept already)."""
    record = run_dir / ".hydra"
    if record.is_dir() and run_dir.resolve() not in _RECORD:
        _RECORD[run_dir.resolve()] = {path.name: path.read_bytes() for path in record.glob("*.yaml")}


def restore_record(run_dir: Path) -> None:
    """Put back the record `keep_record` kept of `run_dir`, if any."""
    kept = _RECORD.get(run_dir.resolve())
    if not kept:
        return
    record = run_dir / ".hydra"
    for path in record.glob("*.yaml"):
        if path.name not in kept:
            path.unlink()
    for name, content in kept.items():
        (record / name).write_bytes(content)


class FreshRunDirectory(Callback):
    """Before Hydra writes its record (.hydra/) and train.log into the run directory: a new run or a dry run in a
    directory that already holds a run is refused (exit 2) with nothing written there; for a resume there, the
    record as it was is kept, to be put back if the resume is refused."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        from trainlab.config import fresh_directory_problem

        if int(os.environ.get("RANK", "0")) > 0:  # torchrun: the other ranks' directory is a scratch one
            return
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        problem = fresh_directory_problem(run_dir, config.checkpoint.resume, bool(config.dry_run))
        if problem is not None:
            print(f"train: {problem}", file=sys.stderr)
            sys.exit(2)
        make_directory(run_dir, "hydra.run.dir")
        keep_record(run_dir)
        _RUN_DIRS.append(run_dir)


def main() -> None:
    """Console-script entry point."""
    register_configs()
    _torchrun_arguments()
    for signum in _TERMINATE:  # until trainlab's own handlers (faults.StopSignals) are in, and again after them
        signal.signal(signum, _raise_stopped)
    try:
        _train()
    except SystemExit as stop:
        if stop.code not in (0, None):
            _remove_unstarted_sweep()
        if stop.code == 1 and _refused_by_hydra(stop):
            sys.exit(2)  # the command line is wrong, as for every refusal of trainlab's own
        raise
    except (KeyboardInterrupt, _Stopped) as stop:  # outside the training loop (torch importing, between sweep jobs)
        for run_dir in _RUN_DIRS:
            _leave_as_found(run_dir)
        _remove_unstarted_sweep()
        name, code = ("Ctrl-C", 130) if isinstance(stop, KeyboardInterrupt) else (signal.Signals(stop.signum).name, 143)
        print(f"train: interrupted ({name}) outside the training loop (starting up, or between a sweep's jobs); "
              f"no training was cut short{_continue_sweep()}", file=sys.stderr)
        sys.exit(code)


def _refused_by_hydra(stop: SystemExit) -> bool:
    """Hydra reports an override it cannot compose (a misspelt key, an unknown option, a value of the wrong type)
    and exits 1 from inside its handler of the error, which is therefore the exit's context."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(stop.__context__, (HydraException, OmegaConfBaseException))


# The stop signals a scheduler sends (SIGINT is Python's KeyboardInterrupt already). Their default action ends the
# process on the spot: while torch imports, that left a run directory of .hydra/ and train.log and said nothing.
_TERMINATE = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


class _Stopped(BaseException):
    """SIGTERM or SIGUSR1 outside trainlab's own handlers: ends the command as Ctrl-C's KeyboardInterrupt does."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _raise_stopped(signum: int, frame: object) -> None:
    raise _Stopped(signum)


def _continue_sweep() -> str:
    """How to continue the sweep a stop signal ended between jobs, when it had started any ('' otherwise)."""
    from trainlab.config import shell_override
    from trainlab.sweep import SWEEP_DIR

    if not SWEEP_DIR or not SWEEP_DIR[0].is_dir() or not any(SWEEP_DIR[0].glob("*/.hydra")):
        return ""
    directory = shell_override("hydra.sweep.dir", SWEEP_DIR[0])
    return f"; continue the sweep with the same command plus {directory} sweep.resume=true"


def _remove_unstarted_sweep() -> None:
    """A sweep that failed before any job (an unknown option among its values, say) leaves no directory holding
    only Hydra's multirun.yaml behind."""
    from trainlab.sweep import SWEEP_DIR

    for sweep_dir in SWEEP_DIR:
        if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
            _remove(sweep_dir, "multirun")


def _torchrun_arguments() -> None:
    """Under torchrun (WORLD_SIZE > 1) one run spans the processes: rank 0 makes the run directory; the others
    get a scratch directory from Hydra, log warnings only, and write nothing. A sweep is one torchrun per job."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world == 1:
        return
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        print("train: a sweep (-m) runs its jobs one process each; under torchrun, start one torchrun per job "
              "(train <overrides> for each combination)", file=sys.stderr)
        sys.exit(2)
    if rank > 0:
        scratch = tempfile.mkdtemp(prefix=f"trainlab-rank{rank}-")
        sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null", "hydra.job_logging.root.level=WARNING",
                     f"hydra.job_logging.formatters.simple.format='[%(asctime)s] rank {rank}: %(message)s'"]


if __name__ == "__main__":
    main()
