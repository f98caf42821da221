"""Shared helpers: compose the real config, run training in-process or through the real command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import trainlab
from trainlab.config import register_configs

CONF_DIR = Path(trainlab.__file__).parent / "conf"
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (the default addopts): one worker per core this process may run on, hyperthreads included."""
    return len(_cores())


def pytest_configure(config) -> None:
    """Under pytest-xdist each worker gets its own share of the cores (its CPU affinity, which the processes its tests
    start inherit), so two workers' training runs do not fight over the same cores with twice the threads."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = _cores()
    if worker is None or count < 2 or count > len(cores) or not hasattr(os, "sched_setaffinity"):
        return
    share = cores[int(worker.removeprefix("gw")) :: count]
    os.sched_setaffinity(0, share)
    import torch

    torch.set_num_threads(len(share))


def _cores() -> list[int]:
    """The cores this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return list(range(os.cpu_count() or 1))


# A short run: 2 epochs, small logging interval, so each test trains in about a second.
FAST = ["trainer.max_epochs=2", "logger.every_n_steps=5"]


def compose_cfg(overrides: list[str] | None = None) -> DictConfig:
    """The composed config of `train <overrides>`, as the command line would build it."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides or []))


def run_cli(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """`train <args>` in a fresh process (python -m trainlab), output captured (so not on a terminal)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "trainlab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def train_inprocess(tmp_path):
    """run(overrides) -> (status, exit code, Run) for a training run in tmp_path/run."""
    from trainlab.run import execute

    def run(overrides: list[str], name: str = "run"):
        cfg = compose_cfg(overrides)
        return execute(cfg, tmp_path / name, overrides)

    return run


@pytest.fixture
def threads_restored():
    """trainer.threads is process-wide: put the test process's count back afterwards."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def signal_at_step(monkeypatch, signum: int, step: int) -> None:
    """A real signal to this process right after optimizer step `step` (before the run looks for one)."""
    import trainlab.run

    on_step = trainlab.run.Run.on_step

    def sending(self, s, totals):
        if s == step:
            os.kill(os.getpid(), signum)
        on_step(self, s, totals)

    monkeypatch.setattr(trainlab.run.Run, "on_step", sending)
