"""One run across several processes (torchrun, gloo on the CPU): the same training as one process with the whole
batch, one run directory, agreed stops, exact resumes, and refusals that name the fix."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import compose_cfg
from trainlab.data import DeviceLoader, Split
from trainlab.faults import Diverged, NonfiniteGuard
from trainlab.run import execute

QUIET = ["logger.progress=lines", "trainer.device=cpu"]


def torchrun(args: list[str], cwd: Path, processes: int = 2, wait: bool = True):
    """`torchrun --nproc_per_node=<processes> -m trainlab <args>` in cwd, with its own scratch TMPDIR."""
    scratch = cwd / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "trainlab", *args, *QUIET]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in csv.DictReader(handle)]


def close(a: list[dict[str, str]], b: list[dict[str, str]], rel: float) -> bool:
    return len(a) == len(b) and all(
        ra.keys() == rb.keys() and all(va == vb or (va and vb and float(va) == pytest.approx(float(vb), rel=rel))
                                       for va, vb in zip(ra.values(), rb.values())) for ra, rb in zip(a, b))


def test_each_rank_serves_its_equal_part_of_every_batch_and_its_own_augmentation():
    split = Split(torch.arange(48, dtype=torch.uint8).view(48, 1, 1, 1).expand(48, 1, 2, 2).contiguous(),
                  torch.arange(48) % 10)
    mean, std = torch.zeros(1), torch.ones(1)

    def noise(x, y, generator):
        return x + torch.rand(x.shape[0], 1, 1, 1, generator=generator), y

    def batches(rank, world):
        loader = DeviceLoader(split, mean, std, 16, torch.device("cpu"), shuffle=True, seed=3, augment=noise,
                              shard=(rank, world))
        loader.set_epoch(2)
        return list(loader)

    whole, parts = batches(0, 1), [batches(rank, 2) for rank in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(whole) == 3
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][i][1], parts[1][i][1]]), y)  # rank 0 the first half, rank 1 the rest
        assert torch.equal(torch.cat([parts[0][i][0], parts[1][i][0]]).floor(), x.floor())  # the same images
    assert torch.equal(parts[0][0][0], whole[0][0][:8])  # rank 0 draws the stream one process would
    draws = [part[0][0] - part[0][0].floor() for part in parts]  # the draws, up to float rounding
    assert not torch.allclose(draws[0], draws[1], atol=1e-3)  # rank 1 draws its own


def test_folded_totals_are_the_whole_batchs_when_the_ranks_sum_them():
    """Two ranks that saw the same numbers (reduce = doubling): means stay, counts double, norms stay."""
    from trainlab.loop import EpochTotals

    totals = EpochTotals(reduce=lambda values: values * 2, world=2)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    totals.record(1, torch.tensor(0.5), logits, torch.tensor([0, 1, 1]))
    totals.record(2, torch.tensor(0.25), logits, torch.tensor([0, 1, 0]))
    assert totals.fold(torch.tensor(4.0)) == [4.0]  # a norm, the same on every rank
    assert (totals.seen, totals.correct) == (12, 10)  # 2 ranks x 3 examples x 2 steps; 2 x (2 + 3) hits
    assert totals.loss_sum == pytest.approx(2 * 3 * (0.5 + 0.25)) and totals.interval_loss == pytest.approx(2.25)
    assert totals.interval_loss / totals.interval_seen == pytest.approx(0.375)  # the interval's mean
    assert totals.fold(torch.tensor(3.0), torch.tensor(5.0)) == [3.0, 5.0]  # nothing pending: extras only


@pytest.mark.parametrize("path", [[], pytest.param(["data.loader=dataloader", "data.num_workers=0", "augmentation=noise"],
                                                    marks=pytest.mark.slow)],  # 15 s: a torchrun run and one in-process
                         ids=["device", "dataloader-with-per-image-noise"])
def test_two_processes_train_like_one_with_the_whole_batch(tmp_path, path):
    """The DataLoader path's per-image transforms are seeded by the image, so they are the same at any rank count."""
    plain = ["normalization=none", "trainer.max_epochs=2", "logger.every_n_steps=7", *path]  # no per-rank statistics
    result = torchrun([*plain, "hydra.run.dir=ddp"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    status, code, one = execute(compose_cfg([*plain, *QUIET]), tmp_path / "one", plain)
    assert (status, code) == ("completed", 0)
    ddp = tmp_path / "ddp"
    assert close(rows(ddp), rows(one.run_dir), rel=1e-5)  # gradients averaged over halves = the whole batch's
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["processes"] == 2
    assert summary["test"]["test/acc"] == pytest.approx(one.summary["test"]["test/acc"], abs=1 / 359)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "one", "tmp"]  # one run directory
    assert not list((tmp_path / "tmp").glob("trainlab-rank*"))  # the other rank's scratch directory is gone
    assert result.stdout.count("trainlab run") == 1  # one announcement and one final table


@pytest.mark.slow  # 8 s: a torchrun run
def test_with_batch_norm_every_rank_evaluates_the_model_that_best_pt_holds(tmp_path):
    """Each rank's forward passes update its batch norms' running statistics from its part of the batch: the val/loss
    that chose best.pt was the ranks' mean over different models, none of them best.pt (0.8151 against 0.8154)."""
    from contextlib import nullcontext

    from omegaconf import OmegaConf

    from trainlab.data import build_data, eval_loader
    from trainlab.loop import evaluate
    from trainlab.models import build_model

    result = torchrun(["trainer.max_epochs=2", "data.train_size=512", "hydra.run.dir=ddp"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    best = torch.load(tmp_path / "ddp" / "checkpoints" / "best.pt", weights_only=True)
    cfg = OmegaConf.create(best["config"])
    data = build_data(cfg.data)
    model = build_model(cfg, data.input_shape, data.num_classes)
    model.load_state_dict(best["model"])
    val = evaluate(model, eval_loader(cfg, data, data.val, torch.device("cpu")), nullcontext())
    assert val["loss"] == pytest.approx(best["metric"]["val/loss"], rel=1e-6)


@pytest.mark.slow  # 8 s: a torchrun run and one in-process
def test_lbfgs_line_search_reads_the_whole_batchs_loss_on_every_rank(tmp_path):
    """Its closure returns the ranks' mean objective, so every rank searches alike (and as one process would)."""
    lbfgs = ["optimizer=lbfgs", "normalization=none", "trainer.max_epochs=1"]
    result = torchrun([*lbfgs, "hydra.run.dir=ddp"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    status, _, one = execute(compose_cfg([*lbfgs, *QUIET]), tmp_path / "one", lbfgs)
    assert status == "completed"
    assert close(rows(tmp_path / "ddp"), rows(one.run_dir), rel=1e-4)


@pytest.mark.slow  # 15 s: two torchrun runs and one in-process
def test_swa_under_torchrun_averages_as_one_process_does(tmp_path):
    swa = ["regularization=swa", "trainer.max_epochs=4", "normalization=none"]
    assert torchrun([*swa, "hydra.run.dir=ddp"], tmp_path).returncode == 0
    status, _, one = execute(compose_cfg([*swa, *QUIET]), tmp_path / "one", swa)
    assert status == "completed" and one.summary["tested_weights"] == "swa.pt"
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["tested_weights"] == "swa.pt" and summary["swa"]["epochs_averaged"] == 1
    assert summary["swa"]["val/loss"] == pytest.approx(one.summary["swa"]["val/loss"], rel=1e-5)
    with_norm = torchrun(["regularization=swa", "trainer.max_epochs=4", "hydra.run.dir=norm"], tmp_path)
    assert with_norm.returncode == 0, with_norm.stdout + with_norm.stderr  # batch norm: the ranks' mean statistics
    assert json.loads((tmp_path / "norm" / "summary.json").read_text())["tested_weights"] == "swa.pt"


def test_a_step_that_was_not_finite_on_another_rank_is_skipped_here_too(caplog):
    """check=step under torchrun: the verdict is every rank's (agree), so all skip or stop at the same step."""
    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.ones(2)
    guard = NonfiniteGuard([weight], torch.device("cpu"), check="step", policy="skip", max_skips=1,
                           check_grads=True, agree=lambda finite_here: False)  # another rank's step was not finite
    caplog.set_level(logging.WARNING, logger="trainlab")
    assert guard(torch.tensor(0.5), 7) is False
    assert "a non-finite step on another process (loss 0.5, gradient norm" in caplog.text
    with pytest.raises(Diverged, match="a non-finite step on another process"):
        guard(torch.tensor(0.5), 8)
    assert NonfiniteGuard([weight], torch.device("cpu"), check="step", policy="skip", max_skips=1, check_grads=True,
                          agree=lambda finite_here: finite_here)(torch.tensor(0.5), 9) is True


@pytest.mark.slow  # 7 s: two torchrun runs
def test_nonfinite_steps_are_skipped_and_stopped_on_every_rank_alike(tmp_path):
    result = torchrun(["optimizer.lr=1e9", "trainer.on_nonfinite=skip", "trainer.max_nonfinite_skips=2",
                       "hydra.run.dir=run"], tmp_path)
    assert result.returncode != 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and "after skipping 2" in summary["stop_reason"]
    skipped = [line.split("at epoch")[1] for line in result.stdout.splitlines() if "non-finite step skipped" in line]
    assert len(skipped) == 4 and skipped[0] == skipped[1] and skipped[2] == skipped[3]  # 2 ranks, 2 skips each


@pytest.mark.slow  # 25 s: three torchrun runs
def test_resume_under_torchrun_continues_every_ranks_random_streams(tmp_path):
    """A mid-epoch last.pt (step 30 of 40; kept as last.prev.pt) resumed under torchrun ends bitwise like the run."""
    noisy = ["regularization=dropout", "augmentation=noise", "logger.every_n_steps=5", "trainer.max_epochs=2",
             "checkpoint.every_n_steps=30"]
    assert torchrun([*noisy, "hydra.run.dir=whole"], tmp_path).returncode == 0
    middle = tmp_path / "step30.pt"
    shutil.copy(tmp_path / "whole" / "checkpoints" / "last.prev.pt", middle)
    result = torchrun([*noisy, "hydra.run.dir=part", f"checkpoint.resume={middle}"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "inside epoch 2 after batch 10 (step 30)" in result.stdout
    assert rows(tmp_path / "part") == rows(tmp_path / "whole")[1:]  # bitwise: dropout and noise per rank restored
    status, code, run = execute(compose_cfg([*noisy, *QUIET, "trainer.max_epochs=3", f"checkpoint.resume={middle}"]),
                                tmp_path / "one", [])
    assert (status, code) == ("failed", 2)
    assert "was saved by 2 process(es) and this run has 1; resume it with torchrun --nproc_per_node=2" in \
        run.summary["error"]


def environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if b"=" in entry)


@pytest.mark.slow  # 30 s: two torchrun runs
def test_a_signal_to_one_rank_stops_all_of_them_after_the_same_step(tmp_path):
    process = torchrun(["trainer.max_epochs=100000", "early_stopping.enabled=false", "hydra.run.dir=run",
                        "logger.every_n_steps=5"], tmp_path, wait=False)
    try:
        metrics = tmp_path / "run" / "metrics.csv"
        deadline = time.time() + 120
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) > 3) and time.time() < deadline:
            time.sleep(0.2)
        workers = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                                      text=True).stdout.split()]
        rank_one = next(pid for pid in workers if environment(pid).get("RANK") == "1")
        os.kill(rank_one, signal.SIGTERM)  # rank 0 receives nothing itself
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["stop_reason"], output
    assert output.count("interrupted by SIGTERM at") == 2  # both ranks, at the same step
    lines = [line.split("interrupted by SIGTERM at")[1].split(":")[0] for line in output.splitlines()
             if "interrupted by SIGTERM at" in line]
    assert lines[0] == lines[1]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert summary["resume_command"].startswith("torchrun --standalone --nproc_per_node=2 -m trainlab ")


FAIL_RANK_ONE = """
import sys
import trainlab.loop
from trainlab.cli import main

folds, fold = [0], trainlab.loop.EpochTotals.fold


def failing_fold(self, *extra):
    folds[0] += 1
    if folds[0] == 3:
        raise RuntimeError("injected failure on rank 1")
    return fold(self, *extra)


if __import__("os").environ["RANK"] == "1":
    trainlab.loop.EpochTotals.fold = failing_fold
sys.argv[0] = "train"
main()
"""


@pytest.mark.slow  # 13 s: a torchrun run
def test_when_one_rank_fails_summary_json_names_that_rank_and_its_error(tmp_path):
    """Rank 0 sees only its collective break off; the failing rank leaves its error in torchrun's store."""
    (tmp_path / "fail_rank_one.py").write_text(FAIL_RANK_ONE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "fail_rank_one.py", "trainer.max_epochs=2", "logger.every_n_steps=5", "hydra.run.dir=run",
                             *QUIET], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed", output
    assert summary["stop_reason"] == "rank 1 failed: error: RuntimeError: injected failure on rank 1", output
    assert "failing_fold" in summary["error"] and "all_reduce" in summary["rank_0_error"]
    assert "rank 1 of 2 failed first, and this rank stopped with it" in output and "MarkupError" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fail_rank_one.py", "run"]


@pytest.mark.slow  # 7 s: two torchrun agents
def test_two_machines_of_one_process_each_are_one_run(tmp_path):
    """torchrun --nnodes=2, both "machines" here: ranks 0 and 1 both have LOCAL_RANK 0; global rank 0 writes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", "-m",
                               "trainlab", "trainer.max_epochs=1", "hydra.run.dir=run", *QUIET],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["processes"] == 2
    assert "trainlab run" in outputs[0] and "trainlab run" not in outputs[1]  # the second machine writes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize(("train_examples", "world", "batch", "fix"), [
    (51, 2, 64, "batches of [51], at most the 51 training examples): each of the 2 processes trains an equal part of "
                "every batch; make data.train_size a multiple of 2, or data.batch_size a multiple of 2 below 51"),
    (50, 3, 64, "batches of [50], at most the 50 training examples): each of the 3 processes trains an equal part of "
                "every batch; make data.train_size a multiple of 3, or data.batch_size a multiple of 3 below 50"),
    (1294, 2, 63, "batches of [63]): each of the 2 processes trains an equal part of every batch; use a multiple of 2"),
    (52, 2, 64, None),  # one batch of the whole (even) subset: each process trains 26
])
def test_the_advice_for_batches_the_processes_cannot_split_names_what_to_change(train_examples, world, batch, fix):
    """A training subset smaller than the batch is one batch of the whole subset: raising the batch size (the usual
    advice) cannot make that split evenly, so the advice names data.train_size."""
    from types import SimpleNamespace

    from trainlab.config import ConfigError
    from trainlab.distributed import Ranks
    from trainlab.run import Run

    from trainlab.data import epoch_batch_sizes

    run = Run.__new__(Run)  # check_ranks reads the config, the processes, the split's size and the batch sizes only
    run.cfg = compose_cfg([f"data.batch_size={batch}", "trainer.max_epochs=2"])
    run.batch_sizes = epoch_batch_sizes(run.cfg.data, 2)
    run.ranks, run.data = Ranks(rank=0, world=world), SimpleNamespace(train=range(train_examples))
    if fix is None:
        run.check_ranks()
        return
    with pytest.raises(ConfigError) as error:
        run.check_ranks()
    assert f"under torchrun ({world} processes): data.batch_size={batch} ({fix}" in str(error.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["data.batch_size=63"], "each of the 2 processes trains an equal part of every batch; use a "
                     "multiple of 2", marks=pytest.mark.slow),  # 11 s; the advice test above covers the message
        (["-m", "seed=0,1"], "a sweep (-m) runs its jobs one process each"),
    ],
    ids=["uneven-batch", "sweep"],
)
def test_what_processes_cannot_do_together_is_refused_with_exit_2_and_no_run_directory(tmp_path, args, message):
    result = torchrun(args, tmp_path)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "outputs").exists()
    assert not list((tmp_path / "tmp").glob("trainlab-rank*"))
