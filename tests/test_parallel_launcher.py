"""hydra/launcher=parallel: stop signals reach the jobs, a killed job is recorded as failed, bad settings exit 2."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# One job at a time, small: 8x8 synthetic images, a small MLP, no TensorBoard; an epoch takes a few milliseconds.
JOB = ["hydra/launcher=parallel", "hydra.launcher.n_jobs=1", "hydra.launcher.cpus=1", "data=synthetic",
       "data.num_samples=200", "data.shape=[1,8,8]", "model.hidden=[16]", "logger.tensorboard=false",
       "early_stopping.enabled=false"]
LONG = 100_000  # epochs: a job that trains until it is stopped


def start_sweep(args: list[str], cwd: Path) -> subprocess.Popen:
    """`train -m <args>` in a fresh process, its output in cwd/output.txt."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    with (cwd / "output.txt").open("w") as output:
        return subprocess.Popen([sys.executable, "-m", "trainlab", "-m", *args], cwd=cwd, env=env, stdout=output,
                                stderr=subprocess.STDOUT)


def job_process(sweep_pid: int) -> int:
    """The pid of the sweep's job process (a `spawn` child; not multiprocessing's resource tracker)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            cmdline = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields.get("PPid", "0")) == sweep_pid and b"spawn_main" in cmdline:
            return int(status.parent.name)
    raise LookupError(f"no job process under {sweep_pid}")


def wait_until_training(sweep: Path, job: str, process: subprocess.Popen, timeout: float = 90) -> int:
    """Once job `job` (a directory-name prefix) has finished an epoch: the pid of its process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, (sweep.parent / "output.txt").read_text()
        rows = [p for p in sweep.glob(f"{job}*/metrics.csv") if len(p.read_text().splitlines()) > 1]
        if rows:
            return job_process(process.pid)
        time.sleep(0.1)
    raise TimeoutError(f"job {job} did not train within {timeout} s")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has ended
    except (FileNotFoundError, IndexError):
        return False


def summaries(sweep: Path) -> dict[str, dict]:
    """Job number -> its summary.json."""
    return {p.parent.name.split("_")[0]: json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))}


def report_rows(sweep: Path) -> dict[str, str]:
    """Job number -> status, from the report's sweep_summary.csv."""
    with (sweep / "sweep_summary.csv").open(newline="") as handle:
        return {row["job"].split("_")[0]: row["status"] for row in csv.DictReader(handle)}


@pytest.fixture
def sweep_process():
    """Started sweeps and job processes are ended after the test, even one a broken launcher orphaned."""
    started: list[subprocess.Popen] = []
    jobs: list[int] = []
    yield started, jobs
    for pid in jobs:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.skipif(sys.platform != "linux", reason="finds the job's process in /proc")
@pytest.mark.parametrize("target", ["sweep", pytest.param("job", marks=pytest.mark.slow)])
def test_sigterm_stops_the_running_job_saved_and_the_sweep_starts_no_other(tmp_path, sweep_process, target):
    """SIGTERM to the sweep (passed on to its job), or to the job itself (preemption): either stops the sweep."""
    started, jobs = sweep_process
    sweep = tmp_path / "sweep"
    process = start_sweep([*JOB, f"trainer.max_epochs={LONG}", "seed=0,1", f"hydra.sweep.dir={sweep}"], tmp_path)
    started.append(process)
    job = wait_until_training(sweep, "0_", process)
    jobs.append(job)
    os.kill(process.pid if target == "sweep" else job, signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    output = (tmp_path / "output.txt").read_text()
    assert not alive(job), "the job process outlived the launcher"
    assert "Traceback" not in output
    (first,) = sweep.glob("0_*")
    assert (first / "checkpoints" / "last.pt").is_file()
    summary = summaries(sweep)["0"]
    assert summary["status"] == "interrupted" and summary["stop_reason"].startswith("SIGTERM at")
    assert "start-up" not in summary["stop_reason"]  # it stopped while training, so last.pt holds its latest step
    assert summary["process"]["pid"] == job
    assert not list(sweep.glob("1_*")), "a job started after the stop"
    assert report_rows(sweep) == {"0": "interrupted"}  # the report ran
    assert f"hydra.sweep.dir={sweep} sweep.resume=true" in output.splitlines()[-1]


@pytest.mark.slow  # 13 s: two jobs
@pytest.mark.skipif(sys.platform != "linux", reason="finds the job's process in /proc")
def test_a_killed_job_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path, sweep_process):
    started, jobs = sweep_process
    sweep = tmp_path / "sweep"
    process = start_sweep([*JOB, f"trainer.max_epochs={LONG},2", f"hydra.sweep.dir={sweep}"], tmp_path)
    started.append(process)
    job = wait_until_training(sweep, "0_", process)
    jobs.append(job)
    os.kill(job, signal.SIGKILL)
    assert process.wait(timeout=90) == 1  # the report's exit code for a job that did not complete
    output = (tmp_path / "output.txt").read_text()
    assert "Traceback" not in output
    by_job = summaries(sweep)
    assert by_job["0"]["status"] == "failed" and "killed by SIGKILL" in by_job["0"]["stop_reason"]
    assert by_job["1"]["status"] == "completed" and by_job["1"]["epochs_run"] == 2
    assert report_rows(sweep) == {"1": "completed", "0": "failed"}
    assert "1 of 2 jobs did not complete" in output


@pytest.mark.parametrize("setting, message", [
    ("hydra.launcher.n_jobs=0", "hydra.launcher.n_jobs=0: must be at least 1"),
    ("hydra.launcher.jobs_per_gpu=0", "hydra.launcher.jobs_per_gpu=0: must be at least 1"),
    ("hydra.launcher.gpus=[0]", "hydra.launcher.gpus=[0]: no GPU is visible; use gpus=[] or null for CPU jobs"),
], ids=["n_jobs", "jobs_per_gpu", "gpus"])
def test_a_launcher_setting_that_cannot_work_exits_2_before_the_sweep_directory(tmp_path, setting, message):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "trainlab", "-m", *JOB, setting, "seed=0,1",
                             f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert message in output and "Traceback" not in output
    assert not sweep.exists()


@pytest.mark.slow  # 20 s: a job, then its refused resume under each launcher
@pytest.mark.parametrize("launcher", ["parallel", "slurm_local"])
def test_a_refused_resume_leaves_the_jobs_hydra_record_as_it_was(tmp_path, launcher):
    """These launchers run each job in a process of its own, where Hydra rewrites the job's .hydra/ before trainlab
    starts: the job process keeps the record first, and puts it back when the job refuses its resume."""
    import torch

    from conftest import run_cli
    from trainlab import checkpoint

    sweep = tmp_path / "sweep"
    args = ["-m", *JOB[3:], f"hydra/launcher={launcher}", "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    (job,) = [p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    last = job / "checkpoints" / "last.pt"
    torch.save({**checkpoint.load(last), "epoch": 1, "finished": False, "optimizer_class": "Adam"}, last)
    summary = json.loads((job / "summary.json").read_text())
    (job / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    (job / ".hydra" / "overrides.yaml").write_bytes(b"- the job's own record\n")
    record = {p.name: p.read_bytes() for p in (job / ".hydra").iterdir()}
    result = run_cli([*args, "sweep.resume=true"], cwd=tmp_path)
    assert result.returncode == 1 and "was trained with Adam" in (job / "train.log").read_text()
    assert {p.name: p.read_bytes() for p in (job / ".hydra").iterdir()} == record


@pytest.mark.slow  # 10-20 s
def test_ctrl_c_while_a_job_process_starts_stops_the_sweep(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: a job process still starting (not yet in a group of its
    own) died of it, and the launcher then blocked forever in process.start(), writing the rest of the job's payload
    (only kill -9 ended it). The stop signals are now blocked while a job process starts."""
    sweep = tmp_path / "sweep"
    args = [a for a in JOB if not a.startswith("hydra.launcher.n_jobs=")]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    with (tmp_path / "output.txt").open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "trainlab", "-m", *args, "hydra.launcher.n_jobs=2",
                                    "seed=0,1,2,3", f"trainer.max_epochs={LONG}", f"hydra.sweep.dir={sweep}"],
                                   cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "#1 (slot 1)" not in (tmp_path / "output.txt").read_text():
            assert time.monotonic() < deadline and process.poll() is None, (tmp_path / "output.txt").read_text()
            time.sleep(0.02)
        time.sleep(0.05)  # the second job's process is starting: spawned, not yet in its own group
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=90) == 130, (tmp_path / "output.txt").read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
