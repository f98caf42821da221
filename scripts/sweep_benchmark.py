"""Wall time of a 4-job CPU sweep: Hydra's basic launcher (one job after another, in one process) against
hydra/launcher=parallel with 2 jobs at a time (a fresh process per job, the cores split between them).

    python scripts/sweep_benchmark.py [--jobs 4] [--workers 2] [--epochs 8] [extra overrides...]

Prints both wall times and their ratio. Each sweep is the real `train -m` command in a fresh process, so
both include Python start-up; the parallel one also pays a torch import per job.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sweep(overrides: list[str], sweep_dir: Path) -> float:
    """Run `train -m <overrides>` into sweep_dir; its wall time in seconds."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    tic = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "trainlab", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"],
                            env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - tic
    if result.returncode != 0:
        sys.exit(f"sweep failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    statuses = [json.loads(p.read_text())["status"] for p in sweep_dir.glob("*/summary.json")]
    assert statuses.count("completed") == len(statuses) > 0, statuses
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="more overrides for every job")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    common = [f"seed={','.join(str(s) for s in range(args.jobs))}", f"trainer.max_epochs={args.epochs}",
              "early_stopping.enabled=false", "logger.tensorboard=false", "trainer.device=cpu", *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        sequential = sweep(common, Path(tmp) / "sequential")
        parallel = sweep(["hydra/launcher=parallel", f"hydra.launcher.n_jobs={args.workers}",
                          "hydra.launcher.gpus=[]", *common], Path(tmp) / "parallel")
    print(f"{args.jobs} CPU jobs ({' '.join(common)}) on {cores} cores")
    print(f"sequential (basic launcher, 1 process):        {sequential:7.1f} s")
    print(f"parallel ({args.workers} at a time, a process per job):  {parallel:7.1f} s")
    print(f"speed-up (sequential / parallel):              {sequential / parallel:7.2f}x")


if __name__ == "__main__":
    main()
