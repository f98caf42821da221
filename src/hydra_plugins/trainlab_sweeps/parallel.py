"""hydra/launcher=parallel: N sweep jobs at once on this machine, each in a fresh process with its own device.

Hydra's joblib launcher reuses its worker processes, so a job's CUDA_VISIBLE_DEVICES and thread count
cannot be set before it imports torch; this launcher starts one `spawn` process per job instead, with
the environment of the slot it runs in.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence
from contextlib import contextmanager
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


def _child(connection: Connection, payload: bytes) -> None:
    """A job in its own process: rebuild Hydra's state, run the task, send the JobReturn back."""
    hydra_context, task_function, config, overrides, idx, singleton_state = pickle.loads(payload)
    setup_globals()
    Singleton.set_state(singleton_state)
    from trainlab.config import register_configs  # trainlab's resolvers name the job's directory

    register_configs()
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    ret = run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    import cloudpickle

    connection.send_bytes(cloudpickle.dumps(ret))
    connection.close()


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

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import cloudpickle  # the task function is the one Hydra wrapped: it pickles by value, not by name

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        slots = slot_environments(self.n_jobs, self.gpus, self.jobs_per_gpu, self.cpus)
        log.info(f"Parallel launcher: {len(slots)} jobs at a time, {slots[0]['OMP_NUM_THREADS']} threads each"
                 + "".join(f"; slot {i} GPU {env['CUDA_VISIBLE_DEVICES']}" for i, env in enumerate(slots)
                           if env.get("CUDA_VISIBLE_DEVICES")) + f"; sweep dir {sweep_dir}")
        context = get_context("spawn")
        pending = list(enumerate(job_overrides, start=initial_job_idx))
        free = list(range(len(slots)))
        running: dict[Connection, tuple[int, Any, int, Sequence[str]]] = {}
        results: dict[int, JobReturn] = {}
        while pending or running:
            while pending and free:
                idx, overrides = pending.pop(0)
                slot = free.pop(0)
                log.info(f"\t#{idx} (slot {slot}) : {' '.join(filter_overrides(overrides))}")
                payload = cloudpickle.dumps((self.hydra_context, self.task_function, self.config, list(overrides),
                                             idx, Singleton.get_state()))
                receiver, sender = context.Pipe(duplex=False)
                with _environment(slots[slot]):
                    process = context.Process(target=_child, args=(sender, payload), name=f"trainlab-job-{idx}")
                    process.start()
                sender.close()  # the child holds the only write end: EOF on the receiver means it has exited
                running[receiver] = (idx, process, slot, overrides)
            for receiver in wait(list(running)):
                idx, process, slot, overrides = running.pop(receiver)
                try:
                    results[idx] = pickle.loads(receiver.recv_bytes())
                except EOFError:
                    process.join()
                    results[idx] = _lost_job(overrides, process.exitcode)
                receiver.close()
                process.join()
                free.append(slot)
        return [results[idx] for idx in sorted(results)]


def _lost_job(overrides: Sequence[str], exitcode: int | None) -> JobReturn:
    """The JobReturn of a job whose process died before it could report (killed, out of memory)."""
    ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
    ret.return_value = RuntimeError(f"the job's process exited with code {exitcode} before it reported: "
                                    f"{' '.join(overrides)}")
    return ret


def _usable_cores() -> int:
    """The cores this process may run on (its CPU affinity on Linux)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
