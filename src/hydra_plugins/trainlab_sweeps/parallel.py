"""hydra/launcher=parallel: N sweep jobs at once on this machine, each in a fresh process with its own device.

Hydra's joblib launcher reuses its worker processes, so a job's CUDA_VISIBLE_DEVICES and thread count
cannot be set before it imports torch; this launcher starts one `spawn` process per job instead, with
the environment of the slot it runs in.

A stop signal (Ctrl-C, SIGTERM, SIGUSR1) to the sweep, or a job that ends interrupted, stops the sweep as the
basic launcher's does: the running jobs get the signal once each, save their last.pt and end interrupted, no
job starts after it, the report is written, and the sweep exits 130 or 143. A job whose process dies without
reporting (kill -9, the out-of-memory killer) is recorded as failed, and the sweep goes on.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# The stop signals and a stopped run's exit codes, as in trainlab.faults (which imports torch; this process need not).
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)
STOP_CODES = {signum: 130 if signum == signal.SIGINT else 143 for signum in STOP_SIGNALS}


class LaunchError(ValueError):
    """hydra.launcher settings that cannot work; the message names the key and the fix."""


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as the ids a child's CUDA_VISIBLE_DEVICES needs."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]
    import torch  # only to count the GPUs; CUDA itself is not initialised here

    return [str(i) for i in range(torch.cuda.device_count())]


def slot_environments(n_jobs: int | None, gpus: list[int] | None, jobs_per_gpu: int, cpus: int) -> list[dict[str, str]]:
    """One environment per worker slot: its GPU (CUDA_VISIBLE_DEVICES) and its share of the CPU threads.

    gpus: indices into the visible GPUs (None: all of them; []: none, CPU jobs). With GPUs, worker w uses
    GPU w // jobs_per_gpu, and n_jobs (None: GPUs x jobs_per_gpu) may not exceed that pool. Threads are
    cpus // n_jobs per job (at least 1), so parallel jobs do not oversubscribe the cores.
    """
    if jobs_per_gpu < 1:
        raise LaunchError(f"hydra.launcher.jobs_per_gpu={jobs_per_gpu}: must be at least 1")
    visible = visible_gpus() if gpus is None or len(gpus) > 0 else []
    if gpus is None:
        pool = visible
    elif gpus and not visible:
        raise LaunchError(f"hydra.launcher.gpus={list(gpus)}: no GPU is visible; use gpus=[] or null for CPU jobs")
    else:
        bad = [i for i in gpus if not 0 <= i < len(visible)]
        if bad:
            raise LaunchError(f"hydra.launcher.gpus={list(gpus)}: {bad} not among the {len(visible)} visible GPU(s) "
                              f"(indices 0 to {len(visible) - 1}); use null for all of them or [] for CPU jobs")
        pool = [visible[i] for i in gpus]
    capacity = len(pool) * jobs_per_gpu
    if n_jobs is None:
        n_jobs = capacity if capacity > 0 else max(1, cpus // 2)
    if n_jobs < 1:
        raise LaunchError(f"hydra.launcher.n_jobs={n_jobs}: must be at least 1 (or null for one per device slot)")
    if capacity > 0 and n_jobs > capacity:
        raise LaunchError(f"hydra.launcher.n_jobs={n_jobs}: the pool has {len(pool)} GPU(s) x jobs_per_gpu="
                          f"{jobs_per_gpu} = {capacity} slots; raise hydra.launcher.jobs_per_gpu or lower n_jobs")
    threads = str(max(1, cpus // n_jobs))
    slots = []
    for worker in range(n_jobs):
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if capacity > 0:
            env["CUDA_VISIBLE_DEVICES"] = pool[worker // jobs_per_gpu]
        elif gpus is not None:  # gpus=[]: CPU jobs, even on a machine with GPUs
            env["CUDA_VISIBLE_DEVICES"] = ""
        slots.append(env)
    return slots


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ with `env` set, for a child process started inside (spawn copies the environment)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _JobSignals:
    """A job process's stop-signal handlers until its run installs its own (and again after it ends).

    While it imports torch and trainlab a signal is only recorded (an exception raised inside an import can be
    swallowed and break the import); once `armed`, the first signal ends the job at once with SystemExit 130/143
    (nothing is trained yet, or the run has ended); later signals are ignored.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.armed = False

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._stop)

    def _stop(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum
            if self.armed:
                self.armed = False
                raise SystemExit(STOP_CODES[signum])


def _stop_with_launcher(launcher_pid: int) -> None:
    """Linux: SIGTERM to this job when the launcher dies, even by kill -9, so that the job saves and ends too."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _child(connection: Connection, payload: bytes) -> None:
    """A job in its own process: rebuild Hydra's state, run the task; send its directory, then how it ended.

    Messages: ("dir", job directory) before the task starts; ("end", exit code, JobReturn or None) at the end,
    where 130/143 means a stop signal ended the job (its run saved last.pt, or it had not started training).
    """
    os.setpgid(0, 0)  # its own process group: a terminal's Ctrl-C reaches the launcher alone, which passes it on once
    signals = _JobSignals()
    signals.install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the launcher while it started this process
    code, ret = 0, None
    try:
        hydra_context, task_function, config, overrides, idx, singleton_state, launcher_pid = pickle.loads(payload)
        _stop_with_launcher(launcher_pid)
        setup_globals()
        Singleton.set_state(singleton_state)
        from trainlab.config import register_configs  # trainlab's resolvers name the job's directory

        register_configs()
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
            sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)
        job_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        connection.send_bytes(pickle.dumps(("dir", str(job_dir.absolute()))))
        from trainlab.cli import keep_record  # a resumed job's record, before run_job rewrites it

        keep_record(job_dir)
        import torch  # noqa: F401 - the slow imports of the task, while a stop signal is only recorded
        import trainlab.run  # noqa: F401

        if signals.received is not None:
            raise SystemExit(STOP_CODES[signals.received])
        signals.armed = True
        ret = run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    except SystemExit as stop:  # a stop signal, or trainlab's sweep job ending interrupted (sweep.run_sweep_job)
        if stop.code not in STOP_CODES.values():
            raise
        code = stop.code
    signals.armed = False
    import cloudpickle

    try:
        connection.send_bytes(cloudpickle.dumps(("end", code, ret)))
        connection.close()
    except OSError:  # the launcher is gone (killed): nobody to tell
        pass
    sys.exit(code)


class _Job:
    """A running job as the launcher tracks it. (Not a dataclass: Hydra's plugin scan runs this module unregistered.)"""

    def __init__(self, idx: int, overrides: list[str], process: Any, slot: int) -> None:
        self.idx, self.overrides, self.process, self.slot = idx, overrides, process, slot
        self.started = time.time()  # a summary.json older than this is from an earlier sweep
        self.job_dir: Path | None = None  # known once the job reports it
        self.signalled = False  # the launcher passed a stop signal on to it


class ParallelLauncher(Launcher):
    """Runs the jobs of a sweep n_jobs at a time, each in a fresh process with its slot's GPU and threads."""

    def __init__(self, n_jobs: int | None = None, gpus: Any = None, jobs_per_gpu: int = 1,
                 cpus: int | None = None) -> None:
        self.n_jobs, self.jobs_per_gpu = n_jobs, jobs_per_gpu
        self.gpus = None if gpus is None else list(OmegaConf.to_container(gpus) if OmegaConf.is_config(gpus) else gpus)
        self.cpus = cpus if cpus is not None else _usable_cores()
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None
        self.slots: list[dict[str, str]] = []
        self.running: dict[Connection, _Job] = {}
        self.stop: tuple[int, int, str] | None = None  # (signal to pass on, exit code, why) once the sweep stops
        self.not_started = 0  # jobs the sweep asked for that the stop kept from starting

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        try:  # before the sweeper makes the sweep directory
            self.slots = slot_environments(self.n_jobs, self.gpus, self.jobs_per_gpu, self.cpus)
        except LaunchError as error:  # like trainlab's ConfigError (cli.py): the message, exit 2, no traceback
            logging.getLogger("trainlab").error(str(error))
            sys.exit(2)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import cloudpickle  # the task function is the one Hydra wrapped: it pickles by value, not by name

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        if self.stop is not None:  # a sweeper asks for more jobs after the stop (a search's next trials): none start
            self.not_started += len(job_overrides)
            self._end_sweep_after_report(Path(str(self.config.hydra.sweep.dir)))
            self.hydra_context.callbacks.on_multirun_end(config=self.config)  # the report, then exit 130/143
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        slots = self.slots
        log.info(f"Parallel launcher: {len(slots)} jobs at a time, {slots[0]['OMP_NUM_THREADS']} threads each"
                 + "".join(f"; slot {i} GPU {env['CUDA_VISIBLE_DEVICES']}" for i, env in enumerate(slots)
                           if env.get("CUDA_VISIBLE_DEVICES")) + f"; sweep dir {sweep_dir}")
        context = get_context("spawn")
        pending = list(enumerate(job_overrides, start=initial_job_idx))
        free = list(range(len(slots)))
        results: dict[int, JobReturn] = {}
        previous = _handle_signals(self._on_signal)
        try:
            while self.running or (pending and self.stop is None):
                while pending and free and self.stop is None:
                    idx, overrides = pending.pop(0)
                    slot = free.pop(0)
                    log.info(f"\t#{idx} (slot {slot}) : {' '.join(filter_overrides(overrides))}")
                    payload = cloudpickle.dumps((self.hydra_context, self.task_function, self.config, list(overrides),
                                                 idx, Singleton.get_state(), os.getpid()))
                    receiver, sender = context.Pipe(duplex=False)
                    # The stop signals wait (blocked) while the job process starts: until it joins its own process
                    # group, a terminal's Ctrl-C reaches it too, and one that died then left process.start() blocked
                    # forever writing the rest of its payload. The child inherits the mask and unblocks them once its
                    # handlers are in place; here they are delivered after start returns.
                    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                    try:
                        with _environment(slots[slot]):
                            process = context.Process(target=_child, args=(sender, payload),
                                                      name=f"trainlab-job-{idx}")
                            process.start()
                    finally:
                        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                    sender.close()  # the child holds the only write end: EOF on the receiver means it has exited
                    self.running[receiver] = _Job(idx, list(overrides), process, slot)
                    self._pass_on_stop()  # a signal that came while it started
                for receiver in wait(list(self.running)):
                    job = self.running[receiver]
                    message = _receive(receiver)
                    if message is not None and message[0] == "dir":
                        job.job_dir = Path(message[1])
                        continue
                    del self.running[receiver]
                    receiver.close()
                    job.process.join()
                    results[job.idx] = self._outcome(job, message)
                    free.append(job.slot)
        finally:
            _handle_signals(previous)
            self._end_running()
        if self.stop is not None:
            self.not_started += len(pending)
            self._end_sweep_after_report(sweep_dir)
        return [results[idx] for idx in sorted(results)]

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.stop is None:
            self.stop = (signum, STOP_CODES[signum], signal.Signals(signum).name)
            log.warning(f"{signal.Signals(signum).name}: stopping the sweep{_passed_on(signum, len(self.running))}")
        self._pass_on_stop()

    def _pass_on_stop(self) -> None:
        """Send the stop signal to every running job that has not had it (once each: a second would be ignored)."""
        if self.stop is None:
            return
        for job in list(self.running.values()):
            if not job.signalled:
                job.signalled = True
                try:
                    os.kill(job.process.pid, self.stop[0])
                except ProcessLookupError:  # it has just ended
                    pass

    def _outcome(self, job: _Job, message: tuple | None) -> JobReturn:
        """The JobReturn of an ended job: its own, or one that records it as interrupted or failed."""
        exitcode = job.process.exitcode
        if message is not None and message[1] == 0:
            return message[2]
        stopped = message is not None or job.signalled or exitcode in STOP_CODES.values() or (
            exitcode is not None and exitcode < 0 and -exitcode in STOP_CODES)
        if stopped:
            code = message[1] if message is not None else STOP_CODES.get(-(exitcode or 0), exitcode)
            if self.stop is None:  # a job stopped by a signal of its own stops the sweep like a signal to the sweep
                signum = signal.SIGINT if code == 130 else signal.SIGTERM
                self.stop = (signum, code, f"job #{job.idx} was interrupted")
                log.warning(f"job #{job.idx} was interrupted (exit {code}): stopping the sweep"
                            + _passed_on(signum, len(self.running)))
                self._pass_on_stop()
            return self._job_return(job, "interrupted", f"interrupted (exit {code})")
        if exitcode is not None and exitcode < 0:
            reason = (f"its process was killed by {signal.Signals(-exitcode).name} before the run finished (by hand, "
                      "or out of memory)")
        else:
            reason = f"its process exited with code {exitcode} before the run finished (its error is in the output)"
        log.error(f"job #{job.idx} ({' '.join(job.overrides)}): {reason}; recorded as failed")
        if job.job_dir is not None:
            _record_failure(job, reason)
        return self._job_return(job, "failed", reason)

    def _job_return(self, job: _Job, status: str, reason: str) -> JobReturn:
        """What trainlab's sweep task returns for a job that did not complete: its status, so that the sweep goes
        on and its report lists the job; in a search (sweep.objective set) a failed trial (trainlab.sweep)."""
        assert self.config is not None
        ret = JobReturn(overrides=job.overrides, status=JobStatus.COMPLETED,
                        working_dir=None if job.job_dir is None else str(job.job_dir))
        ret.return_value = status
        if OmegaConf.select(self.config, "sweep.objective", default=None) is not None:
            from trainlab.sweep import JobFailed

            ret.status = JobStatus.FAILED
            ret.return_value = JobFailed(f"{job.job_dir.name if job.job_dir else f'job #{job.idx}'}: {reason}")
        return ret

    def _end_running(self) -> None:
        """After an error in the launcher itself: no job outlives it (they save their last.pt and end)."""
        for receiver, job in list(self.running.items()):
            if job.process.is_alive():
                os.kill(job.process.pid, signal.SIGTERM)
            job.process.join()
            receiver.close()
        self.running.clear()

    def _end_sweep_after_report(self, sweep_dir: Path) -> None:
        """Once Hydra's sweeper has the jobs' returns, trainlab's report callback writes the report and ends the
        sweep with 130 or 143 (not its 1 for jobs that did not complete: they were stopped)."""
        from trainlab.config import shell_override
        from trainlab.sweep import STOPPED

        assert self.stop is not None
        _, code, why = self.stop
        STOPPED.update(code=code, message=f"sweep stopped ({why}); {self.not_started} job(s) not started. Continue "
                                          f"the sweep with the same command plus "
                                          f"{shell_override('hydra.sweep.dir', sweep_dir)} "
                                          "sweep.resume=true")


def _handle_signals(handler: Any) -> dict[int, Any]:
    """Set `handler` (one callable, or {signal: handler}) for the stop signals; returns the previous handlers.
    Outside the main thread (where Python cannot set handlers) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    handlers = handler if isinstance(handler, dict) else dict.fromkeys(STOP_SIGNALS, handler)
    return {signum: signal.signal(signum, h) for signum, h in handlers.items()}


def _passed_on(signum: int, running: int) -> str:
    """The end of the stop message: what the running jobs are told."""
    told = f"; {signal.Signals(signum).name} to the {running} running job(s): they save their last.pt and end" \
        if running else ""
    return f"{told}; no new job starts"


def _receive(receiver: Connection) -> tuple | None:
    """A job's next message, or None when its process ended without one (or with half of one)."""
    try:
        return pickle.loads(receiver.recv_bytes())
    except (EOFError, OSError, pickle.UnpicklingError):
        return None


def _record_failure(job: _Job, reason: str) -> None:
    """summary.json with status failed for a job that died without writing its own, so the report lists it."""
    assert job.job_dir is not None
    path = job.job_dir / "summary.json"
    if path.is_file() and path.stat().st_mtime >= job.started:  # it finished and wrote it, then died
        return
    job.job_dir.mkdir(parents=True, exist_ok=True)
    summary = {"status": "failed", "stop_reason": reason, "error": reason, "overrides": job.overrides,
               "run_dir": str(job.job_dir), "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    from trainlab.files import write_text_atomic

    write_text_atomic(path, json.dumps(summary, indent=2) + "\n")


def _usable_cores() -> int:
    """The cores this process may run on (its CPU affinity on Linux)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
