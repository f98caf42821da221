"""Reliability: atomic checkpoints under kill -9, exact resume, signals, divergence, safe loading, bad input."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import trainlab.run
from conftest import compose_cfg, run_cli, signal_at_step
from trainlab import checkpoint, faults
from trainlab.config import ConfigError
from trainlab.early_stopping import EarlyStopping
from trainlab.run import execute

SRC = Path(trainlab.__file__).resolve().parents[1]

# Shuffling, dropout, flip-and-crop augmentation, Adam's state and a cosine schedule: everything that
# must come back exactly. 20 steps per epoch on digits (1294 training images, batch 64, drop_last).
EXACT = ["trainer.max_epochs=2", "regularization=dropout", "augmentation=flip_crop", "optimizer=adam",
         "scheduler=cosine", "logger.every_n_steps=5", "trainer.device=cpu"]
STEPS_PER_EPOCH = 20


def train(tmp_path: Path, overrides: list[str], name: str = "run"):
    return execute(compose_cfg(overrides), tmp_path / name, overrides)


def assert_equal_state(a, b, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in csv.DictReader(handle)]


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return sorted((e.step, e.value) for e in events.Scalars("train/loss"))


def signal_at_validation(monkeypatch, signum: int, epoch: int) -> None:
    """A real signal to this process while epoch `epoch` is being validated (between two epochs)."""
    evaluate, calls = trainlab.run.evaluate, {"n": 0}

    def sending(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == epoch:
            os.kill(os.getpid(), signum)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainlab.run, "evaluate", sending)


def replace_loss(monkeypatch, make) -> None:
    """Every Run built from here trains with make(run, its own loss function) as its loss."""
    build = trainlab.run.Run.build_regularization

    def build_with_replaced_loss(self):
        build(self)
        self.loss_fn = make(self, self.loss_fn)

    monkeypatch.setattr(trainlab.run.Run, "build_regularization", build_with_replaced_loss)


def poison_loss(monkeypatch, bad_calls: set[int], how: str, record: dict | None = None) -> None:
    """Make the training loss non-finite (how: nan | inf | grad, the last a finite loss with NaN gradients)
    at the given 1-based calls of the loss; `record` gets the checkpoint files' bytes at the first bad call."""

    def poisoned(run, loss_fn):
        calls = {"n": 0}

        def loss(logits, labels):
            calls["n"] += 1
            value = loss_fn(logits, labels)
            if calls["n"] in bad_calls:
                if record is not None and not record:
                    record.update({p.name: p.read_bytes() for p in run.ckpt_dir.glob("*.pt")})
                if how == "grad":  # d sqrt(s)/ds is inf at s = 0: the loss stays finite, the gradient is NaN
                    return value + 0.0 * torch.sqrt((logits * 0.0).sum())
                return value * float(how)
            return value

        return loss

    replace_loss(monkeypatch, poisoned)


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# --- atomic checkpoints under kill -9 --------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from trainlab import checkpoint
    path, n = Path(sys.argv[1]), 0
    while True:
        n += 1  # ~2 MB of weights whose values encode n, so a mixed or torn file would show
        checkpoint.save_atomic({"format_version": 2, "n": n, "w": torch.full((512, 1024), float(n))}, path,
                               keep_previous=True)
        if n == 1:
            print("ready", flush=True)
""")


def kill_writers_at_random(tmp_path: Path, kills: int, parallel: int) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    rng = random.Random(0)
    for batch in range(0, kills, parallel):
        procs = []
        for i in range(batch, min(batch + parallel, kills)):
            path = tmp_path / f"w{i}" / "last.pt"
            procs.append((path, subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                                                 env=env, text=True)))
        for path, proc in procs:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.3))  # a random moment: most of the writer's time is spent writing
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            state = checkpoint.load(path)  # never torn: always one complete version
            assert state["n"] >= 1 and torch.equal(state["w"], torch.full((512, 1024), float(state["n"])))
            checkpoint.remove_stale_temporaries(path.parent)
            assert {p.name for p in path.parent.iterdir()} <= {"last.pt", "last.prev.pt"}


def test_kill_9_during_checkpoint_writes_never_leaves_last_pt_unloadable(tmp_path):
    kill_writers_at_random(tmp_path, kills=4, parallel=4)


@pytest.mark.slow
def test_kill_9_many_times_during_checkpoint_writes(tmp_path):
    kill_writers_at_random(tmp_path, kills=40, parallel=4)


def test_stale_temporary_files_are_removed_and_ignored(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"format_version": 2, "epoch": 1}, path)
    stale = tmp_path / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert checkpoint.load(path)["epoch"] == 1
    assert checkpoint.remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_keep_previous_keeps_the_one_before(tmp_path):
    path = tmp_path / "last.pt"
    for epoch in (1, 2, 3):
        checkpoint.save_atomic({"format_version": 2, "epoch": epoch}, path, keep_previous=True)
    assert checkpoint.load(path)["epoch"] == 3
    assert checkpoint.load(tmp_path / "last.prev.pt")["epoch"] == 2


def test_a_failed_write_names_the_path_and_the_os_error(tmp_path):
    blocker = tmp_path / "checkpoints"
    blocker.write_text("a file where the checkpoint directory should be")
    with pytest.raises(checkpoint.CheckpointWriteError, match=rf"could not write checkpoint {blocker}/last.pt: "):
        checkpoint.save_atomic({"format_version": 2}, blocker / "last.pt")


def test_a_failed_write_stops_the_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a directory")  # root ignores permissions, so block it this way
    status, code, run = train(tmp_path, ["trainer.max_epochs=2"])
    assert (status, code) == ("failed", 1)
    assert run.summary["epochs_run"] == 0  # stopped at the first save, not after training on unsaved
    assert f"could not write checkpoint {run_dir / 'checkpoints'}/best.pt" in run.summary["stop_reason"]
    assert "File exists" in run.summary["stop_reason"] or "Not a directory" in run.summary["stop_reason"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_checkpoint_directory_stops_the_run(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    ckpt.chmod(0o500)
    try:
        status, code, run = train(tmp_path, ["trainer.max_epochs=2"])
    finally:
        ckpt.chmod(0o700)
    assert (status, code) == ("failed", 1)
    assert str(ckpt) in run.summary["stop_reason"] and "Permission denied" in run.summary["stop_reason"]


# --- exact resume ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: EXACT trained without interruption."""
    tmp = tmp_path_factory.mktemp("whole")
    status, code, run = train(tmp, EXACT)
    assert (status, code) == ("completed", 0)
    return run


def assert_resumed_run_equals(resumed, whole) -> None:
    assert_equal_state(resumed.model.state_dict(), whole.model.state_dict(), "model")
    assert_equal_state(resumed.optimizer.state_dict(), whole.optimizer.state_dict(), "optimizer")
    assert metrics_rows(resumed.run_dir) == metrics_rows(whole.run_dir)  # epoch losses, accuracies, lr: exact
    assert logged_losses(resumed.run_dir) == logged_losses(whole.run_dir)  # every logged train/loss point
    assert resumed.summary["test"] == whole.summary["test"]


def test_resume_at_an_epoch_boundary_is_bitwise_exact(tmp_path, monkeypatch, uninterrupted):
    with monkeypatch.context() as patch:
        signal_at_validation(patch, signal.SIGTERM, epoch=1)
        status, code, run = train(tmp_path, EXACT)
    assert (status, code) == ("interrupted", 143)
    last = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (last["epoch"], last["step"], last["in_epoch"]) == (1, STEPS_PER_EPOCH, None)

    status, code, resumed = train(tmp_path, [*EXACT, "checkpoint.resume=auto"])
    assert (status, code) == ("completed", 0) and resumed.summary["epochs_run"] == 2
    assert_resumed_run_equals(resumed, uninterrupted)


def test_resume_mid_epoch_is_bitwise_exact_and_consecutive_checkpoints_differ(tmp_path, monkeypatch, uninterrupted):
    with monkeypatch.context() as patch:
        signal_at_step(patch, signal.SIGTERM, step=27)  # epoch 2, after its 7th batch
        status, code, run = train(tmp_path, [*EXACT, "checkpoint.every_n_steps=5"])
    assert (status, code) == ("interrupted", 143)
    assert "epoch 2, step 27" in run.summary["stop_reason"]
    ckpt = tmp_path / "run" / "checkpoints"
    last, before = checkpoint.load(ckpt / "last.pt"), checkpoint.load(ckpt / "last.prev.pt")
    assert (last["epoch"], last["step"], last["in_epoch"]["loader"]["position"]) == (1, 27, 7)
    assert before["step"] == 25  # the every_n_steps checkpoint before the signal
    # Negative control: two consecutive checkpoints differ, so equality below is not trivially true.
    assert any(not torch.equal(last["model"][k], before["model"][k]) for k in last["model"])
    assert not torch.equal(last["in_epoch"]["loader"]["augment_rng"], before["in_epoch"]["loader"]["augment_rng"])

    status, code, resumed = train(tmp_path, [*EXACT, "checkpoint.every_n_steps=5", "checkpoint.resume=auto"])
    assert (status, code) == ("completed", 0)
    assert_resumed_run_equals(resumed, uninterrupted)


def test_resume_auto_skips_a_truncated_last_pt_and_is_still_exact(tmp_path, monkeypatch, uninterrupted, caplog):
    with monkeypatch.context() as patch:
        signal_at_step(patch, signal.SIGUSR1, step=33)
        status, code, _ = train(tmp_path, [*EXACT, "checkpoint.every_n_steps=5"])
    assert (status, code) == ("interrupted", 143)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    raw = last.read_bytes()
    last.write_bytes(raw[: len(raw) // 3])  # what a disk that lost the last write leaves
    status, code, resumed = train(tmp_path, [*EXACT, "checkpoint.every_n_steps=5", "checkpoint.resume=auto"])
    assert (status, code) == ("completed", 0)
    assert f"skipping {last}" in caplog.text and "corrupted or incomplete" in caplog.text
    assert_resumed_run_equals(resumed, uninterrupted)  # resumed from last.prev.pt (step 30)


def test_resume_auto_with_every_last_pt_damaged_is_refused_and_changes_nothing(tmp_path, monkeypatch):
    """It started fresh: the run's good best.pt, its metrics.csv and summary.json were overwritten."""
    with monkeypatch.context() as patch:
        signal_at_step(patch, signal.SIGTERM, step=33)
        assert train(tmp_path, [*EXACT, "checkpoint.every_n_steps=5"])[:2] == ("interrupted", 143)
    run_dir = tmp_path / "run"
    for name in ("last.pt", "last.prev.pt"):
        path = run_dir / "checkpoints" / name
        path.write_bytes(path.read_bytes()[:1000])
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    status, code, run = train(tmp_path, [*EXACT, "checkpoint.every_n_steps=5", "checkpoint.resume=auto"])
    assert (status, code) == ("failed", 2)
    assert "last.pt and last.prev.pt in" in run.summary["error"] and "nothing was changed" in run.summary["error"]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_resume_from_last_prev_pt_does_not_keep_the_damaged_last_pt_as_the_next_fallback(tmp_path, monkeypatch):
    """The first save after the fallback hard-linked the damaged last.pt as last.prev.pt: the only good fallback was
    gone until the save after."""
    with monkeypatch.context() as patch:
        signal_at_step(patch, signal.SIGTERM, step=33)
        assert train(tmp_path, [*EXACT, "checkpoint.every_n_steps=5"])[:2] == ("interrupted", 143)
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "last.pt").write_bytes((ckpt / "last.pt").read_bytes()[:1000])
    with monkeypatch.context() as patch:
        signal_at_step(patch, signal.SIGTERM, step=34)  # one save after the resume (from step 30), then stopped
        assert train(tmp_path, [*EXACT, "checkpoint.every_n_steps=5", "checkpoint.resume=auto"])[:2] == (
            "interrupted", 143)
    assert checkpoint.load(ckpt / "last.pt")["step"] == 34 and checkpoint.load(ckpt / "last.prev.pt")["step"] == 30


def test_cutting_metrics_csv_on_resume_is_all_or_nothing(tmp_path, monkeypatch):
    """The rows were rewritten in place: a kill during the rewrite lost rows for good."""
    path = tmp_path / "metrics.csv"
    path.write_bytes(b"epoch,step\r\n1,10\r\n2,20\r\n3,30\r\n")

    class Failing:
        def __init__(self, *args, **kwargs):
            pass

        def writerows(self, rows):
            raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.csv, "writer", Failing)
        with pytest.raises(OSError):
            checkpoint.keep_metrics_up_to(path, 2)
    assert path.read_bytes() == b"epoch,step\r\n1,10\r\n2,20\r\n3,30\r\n"
    checkpoint.keep_metrics_up_to(path, 2)
    assert path.read_bytes() == b"epoch,step\r\n1,10\r\n2,20\r\n"


def test_checkpoints_and_summary_are_readable_as_the_umask_allows(tmp_path):
    """mkstemp made them 0600: on a shared machine nobody else could load best.pt or report the run."""
    from trainlab import files

    assert train(tmp_path, ["trainer.max_epochs=1"])[:2] == ("completed", 0)
    run_dir = tmp_path / "run"
    for path in (run_dir / "summary.json", run_dir / "checkpoints" / "best.pt", run_dir / "checkpoints" / "last.pt"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~files.UMASK, path
    assert (run_dir / "metrics.csv").stat().st_mode & 0o777 == 0o666 & ~files.UMASK


def test_a_resume_at_an_epochs_last_step_logs_no_gradient_norm_or_speed_it_did_not_measure(tmp_path, monkeypatch):
    """Interrupted after the epoch's last step, the resumed process closed that epoch's interval with no step of its
    own: train/grad_norm 0.0 (no gradients in a new process) and perf/samples_per_s 0."""
    args = ["trainer.max_epochs=2", "trainer.device=cpu"]
    with monkeypatch.context() as patch:
        signal_at_step(patch, signal.SIGTERM, step=STEPS_PER_EPOCH)
        assert train(tmp_path, args)[:2] == ("interrupted", 143)
    assert train(tmp_path, [*args, "checkpoint.resume=auto"])[:2] == ("completed", 0)
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    events.Reload()
    norms, speeds = events.Scalars("train/grad_norm"), events.Scalars("perf/samples_per_s")
    assert [e.step for e in events.Scalars("train/loss")] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert [e.step for e in norms] == [e.step for e in speeds] == [2 * STEPS_PER_EPOCH]
    assert all(e.value > 0 for e in norms + speeds)


def test_a_finished_run_trains_on_when_trainer_max_epochs_is_raised(tmp_path, caplog):
    """2 epochs, then extended to 4: bitwise the run that trained 4 at once (a constant lr: no schedule to stretch)."""
    caplog.set_level(logging.INFO, logger="trainlab")
    base = ["optimizer=adam", "regularization=dropout", "logger.every_n_steps=5", "trainer.device=cpu"]
    status, _, _ = train(tmp_path, [*base, "trainer.max_epochs=2"], name="short")
    assert status == "completed"
    last = tmp_path / "short" / "checkpoints" / "last.pt"
    status, code, extended = train(tmp_path, [*base, "trainer.max_epochs=4", f"checkpoint.resume={last}"],
                                   name="extended")
    assert (status, code) == ("completed", 0) and extended.summary["epochs_run"] == 4
    assert "extending a finished run of 2 epochs to trainer.max_epochs=4" in caplog.text
    # the new directory's metrics.csv starts with the short run's rows: one row per epoch of the run
    assert [row["epoch"] for row in metrics_rows(extended.run_dir)] == ["1", "2", "3", "4"]
    status, _, whole = train(tmp_path, [*base, "trainer.max_epochs=4"], name="whole")
    assert_equal_state(extended.model.state_dict(), whole.model.state_dict(), "model")
    assert_equal_state(extended.optimizer.state_dict(), whole.optimizer.state_dict(), "optimizer")
    assert metrics_rows(extended.run_dir) == metrics_rows(whole.run_dir)


def test_a_run_that_stopped_early_continues_only_with_more_patience(tmp_path):
    stalls = ["early_stopping.min_delta=10", "early_stopping.patience=1", "trainer.max_epochs=5"]  # none improves by 10
    status, _, run = train(tmp_path, stalls, name="stalled")
    assert status == "stopped_early" and run.summary["epochs_run"] == 2
    last = tmp_path / "stalled" / "checkpoints" / "last.pt"
    status, code, again = train(tmp_path, [*stalls, f"checkpoint.resume={last}"], name="again")
    assert (status, code) == ("failed", 2)
    assert "stopped early at epoch 2" in again.summary["error"] and "raise early_stopping.patience above 1" in \
        again.summary["error"]
    status, code, more = train(tmp_path, [*stalls, "early_stopping.patience=2", f"checkpoint.resume={last}"],
                               name="more")
    assert (status, code) == ("stopped_early", 0) and more.summary["epochs_run"] == 3  # one more bad epoch


def test_a_resume_whose_lower_patience_the_record_meets_stops_at_once(tmp_path):
    """Early stopping with the lower patience would have ended the run at the epoch last.pt holds: it ends there,
    instead of training one more epoch first."""
    stalls = ["early_stopping.min_delta=10", "trainer.max_epochs=4"]  # epoch 1 is the best; none after improves by 10
    status, _, run = train(tmp_path, stalls, name="stalled")
    assert status == "completed"
    before = tmp_path / "stalled" / "checkpoints" / "last.prev.pt"  # epoch 3 of 4, unfinished: 2 bad epochs
    assert torch.load(before, weights_only=False)["epoch"] == 3
    status, code, resumed = train(tmp_path, [*stalls, "early_stopping.patience=2", f"checkpoint.resume={before}"],
                                  name="resumed")
    assert (status, code) == ("stopped_early", 0) and resumed.summary["epochs_run"] == 3
    assert "for 2 epochs (best" in resumed.summary["stop_reason"]
    assert len(metrics_rows(resumed.run_dir)) == 3  # no epoch trained after the resume
    last = torch.load(resumed.run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert last["epoch"] == 3 and last["finished"]  # a resume of it is refused like any early-stopped run's
    assert resumed.summary["test"] is not None


def test_resume_refuses_weights_only_a_directory_and_a_file_that_is_no_checkpoint(tmp_path, interrupted_run):
    best = interrupted_run.parent / "best.pt"
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    (tmp_path / "hello.txt").write_text("hello\n")  # reached the unpickler's internals: KeyError, not a message
    (tmp_path / "metrics.csv").write_text("epoch,step\n1,10\n")  # likewise, IndexError
    torch.save({k: v for k, v in checkpoint.load(interrupted_run).items() if k != "model"}, tmp_path / "edited.pt")
    for target, message in ((best, "holds weights only, not a training state"), (tmp_path, "is a directory"),
                            (tmp_path / "edited.pt", "is not a trainlab training state: it lacks model"),  # KeyError
                            (tmp_path / "notes.pt", "is corrupted or not a checkpoint"),
                            (tmp_path / "hello.txt", "is corrupted or not a checkpoint"),
                            (tmp_path / "metrics.csv", "is corrupted or not a checkpoint")):
        status, code, run = train(tmp_path, ["trainer.max_epochs=3", f"checkpoint.resume={target}"], name="again")
        assert (status, code) == ("failed", 2) and message in run.summary["error"], run.summary["error"]
    status, code, run = train(tmp_path, ["trainer.max_epochs=3", f"checkpoint.resume={tmp_path / 'gone.pt'}"],
                              name="again")  # it said "a last.pt or best.pt", and best.pt is then refused
    assert (status, code) == ("failed", 2)
    assert f"{tmp_path / 'gone.pt'} does not exist; pass the path of a run's last.pt, e.g." in run.summary["error"]


def test_same_seed_is_bitwise_equal_and_another_seed_differs(tmp_path, uninterrupted):
    _, _, again = train(tmp_path, EXACT, name="again")
    assert_equal_state(again.model.state_dict(), uninterrupted.model.state_dict())
    _, _, other = train(tmp_path, [*EXACT, "seed=1"], name="other")
    assert any(not torch.equal(v, uninterrupted.model.state_dict()[k]) for k, v in other.model.state_dict().items())


def test_resume_auto_starts_fresh_without_a_checkpoint_and_refuses_a_finished_run(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trainlab")
    status, code, run = train(tmp_path, ["trainer.max_epochs=1", "checkpoint.resume=auto"])
    assert (status, code) == ("completed", 0) and run.summary["epochs_run"] == 1
    assert "starting fresh" in caplog.text
    summary = (tmp_path / "run" / "summary.json").read_text()
    status, code, run = train(tmp_path, ["trainer.max_epochs=1", "checkpoint.resume=auto"])
    assert (status, code) == ("failed", 2) and "already finished" in run.summary["error"]
    assert (tmp_path / "run" / "summary.json").read_text() == summary  # the finished run's record stays


# --- signals --------------------------------------------------------------------------------------


def start_training(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainlab", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:  # wait until the first step is about to run
        if "training started" in line:
            return proc
    raise AssertionError(f"training never started (exit {proc.wait()})")


# 161 steps per epoch (batch 8): the signal lands inside epoch 1.
SLOW_EPOCHS = ["trainer.max_epochs=2", "data.batch_size=8", "logger.progress=lines", "trainer.device=cpu",
               "logger.tensorboard=false"]


@pytest.mark.slow  # 14 s: a run and its resume; test_ctrl_c_saves_and_exits_130 covers one signal
def test_sigterm_twice_saves_exits_143_and_resume_auto_finishes(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_training([*SLOW_EPOCHS, f"hydra.run.dir={run_dir}"], tmp_path)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)  # a second signal, likely while last.pt is being written
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stop_reason"].startswith("SIGTERM at epoch 1, step ")
    last = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert last["in_epoch"]["epoch"] == 1 and 0 < last["step"] < 161
    assert f"hydra.run.dir={run_dir} checkpoint.resume=auto" in output  # the message says how to continue
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))

    result = run_cli([*SLOW_EPOCHS, f"hydra.run.dir={run_dir}", "checkpoint.resume=auto"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_run"] == 2
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} inside epoch 1" in (run_dir / "train.log").read_text()
    assert [int(r["epoch"]) for r in metrics_rows(run_dir)] == [1, 2]


def test_ctrl_c_saves_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_training([*SLOW_EPOCHS, f"hydra.run.dir={run_dir}"], tmp_path)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "Ctrl-C (SIGINT)" in summary["stop_reason"]
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["in_epoch"]["epoch"] == 1


def test_signal_handlers_are_restored_after_the_run(tmp_path):
    before = {s: signal.getsignal(s) for s in faults.STOP_SIGNALS}
    train(tmp_path, ["trainer.max_epochs=1"])
    assert {s: signal.getsignal(s) for s in faults.STOP_SIGNALS} == before


# --- divergence -------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["nan", "inf", "grad"])
def test_non_finite_step_stops_before_the_optimizer_step(tmp_path, monkeypatch, how):
    files: dict[str, bytes] = {}
    poison_loss(monkeypatch, {30}, how, record=files)
    status, code, run = train(tmp_path, ["trainer.max_epochs=3", "checkpoint.every_n_steps=4", "trainer.device=cpu",
                                         "trainer.nonfinite_check=step"])
    assert (status, code) == ("diverged", 3)
    assert "epoch 2, step 30" in run.summary["stop_reason"] and "before its optimizer step" in run.summary["stop_reason"]
    assert ("gradient norm nan" if how == "grad" else f"loss {how}") in run.summary["stop_reason"]
    ckpt = tmp_path / "run" / "checkpoints"
    assert {p.name: p.read_bytes() for p in ckpt.glob("*.pt")} == files  # untouched since the bad step
    last = checkpoint.load(ckpt / "last.pt")
    assert last["step"] == 28 and all_finite(last) and all_finite(checkpoint.load(ckpt / "best.pt"))
    assert all(torch.isfinite(p).all() for p in run.model.parameters())  # the bad step never reached the weights


def test_interval_check_is_sync_free_and_still_saves_no_non_finite_weights(tmp_path, monkeypatch):
    poison_loss(monkeypatch, {23}, "nan")
    status, code, run = train(tmp_path, ["trainer.max_epochs=3", "trainer.nonfinite_check=interval",
                                         "logger.every_n_steps=5", "checkpoint.every_n_steps=5", "trainer.device=cpu"])
    assert (status, code) == ("diverged", 3)
    assert "step 23" in run.summary["stop_reason"]
    last = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["step"] == 20 and all_finite(last)  # the step-25 checkpoint was refused: it would hold NaN


def test_a_run_that_diverges_before_any_checkpoint_says_so(tmp_path, monkeypatch, caplog):
    """It said "checkpoints keep the last finite state (last.pt, best.pt)" with no checkpoint written."""
    poison_loss(monkeypatch, {3}, "nan")
    status, code, run = train(tmp_path, ["trainer.max_epochs=2", "trainer.device=cpu"])
    assert (status, code) == ("diverged", 3) and not list((tmp_path / "run").glob("checkpoints/*.pt"))
    assert "no checkpoint was written before it (it diverged in its first epoch)" in caplog.text
    assert "checkpoints keep the last finite state" not in caplog.text


def test_a_non_finite_validation_loss_ends_the_run_as_diverged(tmp_path, monkeypatch):
    """Training stayed finite (a loss of 1e17, say) while the outputs overflowed on the validation images: the run
    went on to max_epochs and ended "completed", with nan in metrics.csv."""
    evaluate = trainlab.run.evaluate

    def overflowing(model, batches, *args, **kwargs):
        result = evaluate(model, batches, *args, **kwargs)
        calls.append(1)
        return {**result, "loss": math.nan} if len(calls) == 2 else result

    calls: list[int] = []
    monkeypatch.setattr(trainlab.run, "evaluate", overflowing)
    status, code, run = train(tmp_path, ["trainer.max_epochs=4", "trainer.device=cpu"])
    assert (status, code) == ("diverged", 3)
    assert run.summary["stop_reason"].startswith("non-finite validation loss: val/loss nan at epoch 2 (train/loss ")
    assert run.summary["epochs_run"] == 1 and run.summary["best_epoch"] == 1
    last = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and run.summary["test"]["test/acc"] is not None


@pytest.mark.parametrize("check, policy, mode", [("auto", "stop", "interval"), ("auto", "skip", "step"),
                                                ("step", "stop", "step"), ("interval", "stop", "interval")])
def test_nonfinite_check_auto_is_interval_unless_skipping(check, policy, mode):
    assert faults.check_mode(check, policy) == mode


def test_skip_policy_skips_a_bounded_number_of_steps(tmp_path, monkeypatch, caplog):
    poison_loss(monkeypatch, {5, 9}, "nan")
    status, code, run = train(tmp_path, ["trainer.max_epochs=1", "trainer.on_nonfinite=skip", "trainer.device=cpu"])
    assert (status, code) == ("completed", 0)
    assert caplog.text.count("non-finite step skipped") == 2
    assert int(checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"]) == STEPS_PER_EPOCH - 2

    monkeypatch.undo()
    poison_loss(monkeypatch, {5, 9}, "inf")
    status, code, run = train(tmp_path, ["trainer.max_epochs=1", "trainer.on_nonfinite=skip",
                                         "trainer.max_nonfinite_skips=1"], name="bounded")
    assert (status, code) == ("diverged", 3) and "after skipping 1" in run.summary["stop_reason"]


def test_the_skip_budget_counts_the_whole_run_across_a_resume(tmp_path, monkeypatch):
    """last.pt did not keep the skips taken: a run resumed after using its budget skipped again and completed, where
    the uninterrupted run stops as diverged."""
    args = ["trainer.max_epochs=2", "trainer.on_nonfinite=skip", "trainer.max_nonfinite_skips=1", "trainer.device=cpu"]
    poison_loss(monkeypatch, {5}, "nan")
    signal_at_step(monkeypatch, signal.SIGTERM, 10)
    assert train(tmp_path, args)[:2] == ("interrupted", 143)
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["nonfinite_skipped"] == 1
    monkeypatch.undo()
    poison_loss(monkeypatch, {3}, "nan")  # the resumed process's third step: the run's second bad one
    status, code, run = train(tmp_path, [*args, "checkpoint.resume=auto"])
    assert (status, code) == ("diverged", 3) and "after skipping 1" in run.summary["stop_reason"]


def test_a_skipped_step_under_fp16_with_clipping_leaves_the_scaler_ready_for_the_next(tmp_path, monkeypatch, caplog):
    """Clipping unscales the gradients (GradScaler.unscale_); a step skipped after it never closed the scaler's
    step, so the next step's unscale_ raised "unscale_() has already been called": status failed, exit 1."""
    poison_loss(monkeypatch, {3}, "nan")
    status, code, run = train(tmp_path, ["trainer.max_epochs=1", "trainer.on_nonfinite=skip", "trainer.device=cpu",
                                         "trainer.precision=fp16", "regularization.grad_clip_norm=1.0"])
    assert (status, code) == ("completed", 0) and caplog.text.count("non-finite step skipped") == 1
    assert int(checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"]) == STEPS_PER_EPOCH - 1


def test_fp16_loss_scale_skips_are_not_divergence(tmp_path, monkeypatch):
    poison_loss(monkeypatch, {3, 4}, "grad")  # inf/NaN gradients: the GradScaler skips these steps itself
    status, code, run = train(tmp_path, ["trainer.max_epochs=1", "trainer.precision=fp16", "trainer.device=cpu"])
    assert (status, code) == ("completed", 0)
    assert run.scaler.get_scale() < 2.0**16  # the scaler saw the inf gradients and backed off


def test_best_pt_is_replaced_only_by_a_better_finite_metric():
    stopper = EarlyStopping(mode="min", patience=5)
    assert [stopper.update(v, e) for e, v in enumerate([1.0, float("nan"), 0.5, float("-inf"), 0.7], 1)] == \
        [True, False, True, False, False]
    assert (stopper.best, stopper.best_epoch) == (0.5, 3)


# --- safe loading and configuration -----------------------------------------------------------------


class CreatesFile:
    """Unpickling this opens (creates) a file: what a malicious checkpoint would do with a worse call."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_poisoned_checkpoint_is_refused_by_name_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 2, "epoch": 0, "payload": CreatesFile(marker)}, evil)
    status, code, run = train(tmp_path, ["trainer.max_epochs=2", f"checkpoint.resume={evil}"])
    assert (status, code) == ("failed", 2)
    assert f"checkpoint {evil} holds objects that are not plain tensors" in run.summary["error"]
    assert re.search(r"\(pickled \S*open\)", run.summary["error"])  # the object it would have called, by name
    assert not marker.exists()


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory) -> Path:
    """checkpoints/last.pt of the default config interrupted after epoch 1 of 2."""
    tmp = tmp_path_factory.mktemp("interrupted")
    with pytest.MonkeyPatch.context() as patch:
        signal_at_validation(patch, signal.SIGTERM, epoch=1)
        status, _, _ = train(tmp, ["trainer.max_epochs=2"])
    assert status == "interrupted"
    return tmp / "run" / "checkpoints" / "last.pt"


def test_a_checkpoint_of_another_model_lists_the_keys_and_a_hint(tmp_path, interrupted_run):
    for hidden, kinds in (("[32]", ("unexpected keys", "size mismatch")), ("[256,256,16]", ("missing keys",))):
        status, code, run = train(tmp_path, ["trainer.max_epochs=2", f"model.hidden={hidden}",
                                             f"checkpoint.resume={interrupted_run}"])
        assert (status, code) == ("failed", 2)
        error = run.summary["error"]
        assert "holds a different model" in error and all(kind in error for kind in kinds), error
        assert "model.hidden=[256,256]" in error  # the hint: the options it was trained with, typed as overrides


def test_a_checkpoint_of_another_optimizer_is_refused_before_its_state_loads(tmp_path, interrupted_run):
    """Adam's state loaded into RMSprop crashed at the first step (KeyError 'square_avg'); loaded into Adam without
    bias correction (the same state names) it trained on silently with another update."""
    old_format = tmp_path / "old.pt"  # a last.pt from before the class was saved: its config's _target_ tells
    state = torch.load(interrupted_run, weights_only=False)
    assert state.pop("optimizer_class") == "SGD"
    torch.save(state, old_format)
    for saved, options, built in ((interrupted_run, ["optimizer=rmsprop"], "RMSprop"),
                                  (interrupted_run, ["optimizer=adam", "optimizer.bias_correction=false"],
                                   "UncorrectedAdam"),
                                  (old_format, ["optimizer=adam"], "Adam")):
        status, code, run = train(tmp_path, ["trainer.max_epochs=2", *options, f"checkpoint.resume={saved}"])
        assert (status, code) == ("failed", 2)
        error = run.summary["error"]
        assert f"was trained with SGD, and this config builds {built}" in error, error
        assert "optimizer=sgd optimizer.lr=0.1" in error  # the hint: its option file and options, as overrides
    status, _, _ = train(tmp_path, ["trainer.max_epochs=2", f"checkpoint.resume={old_format}"], name="same")
    assert status == "completed"


def test_a_resume_says_that_the_optimizer_keeps_the_settings_it_was_trained_with(tmp_path, interrupted_run, caplog):
    caplog.set_level(logging.WARNING, logger="trainlab")
    status, _, run = train(tmp_path, ["trainer.max_epochs=2", "optimizer.lr=0.05", "optimizer.decay_norm_and_bias=true",
                                      f"checkpoint.resume={interrupted_run}"])
    assert status == "completed"
    assert ("the optimizer continues with the settings it was trained with, not this config's: "
            "optimizer.decay_norm_and_bias=false (here: true), optimizer.lr=0.1 (here: 0.05)") in caplog.text
    assert run.scheduler.base_lrs == [0.1]


def test_a_resume_says_that_the_schedule_changed_and_the_lr_it_moves_to(tmp_path, interrupted_run, caplog):
    """The scheduler is this config's at the checkpoint's step: another schedule, or another trainer.max_epochs for a
    run that had not finished, moves the lr from here on. It did so without a word."""
    caplog.set_level(logging.WARNING, logger="trainlab")
    status, _, run = train(tmp_path, ["trainer.max_epochs=4", "scheduler=cosine", f"checkpoint.resume={interrupted_run}"])
    assert status == "completed"
    assert ("the learning-rate schedule differs from the one it trained with: scheduler=none (here: cosine), "
            "trainer.max_epochs=2 (here: 4); from here the lr follows this config's (lr 0.1 at the "
            "checkpoint, 0.08536 from here)") in caplog.text
    caplog.clear()
    train(tmp_path, ["trainer.max_epochs=2", "scheduler.warmup_epochs=0.5", f"checkpoint.resume={interrupted_run}"],
          name="warmup")
    assert "schedule differs from the one it trained with: scheduler.warmup_epochs=0 (here: 0.5)" in caplog.text
    caplog.clear()
    train(tmp_path, ["trainer.max_epochs=2", f"checkpoint.resume={interrupted_run}"], name="same")
    assert "schedule differs" not in caplog.text


def test_a_resume_with_another_early_stopping_monitor_is_refused(tmp_path, interrupted_run):
    """The stopper's best (a val/loss) was compared with val/acc values, or a train/loss best with val/loss: the run
    stopped early against the wrong number and best.pt stayed at the old metric's epoch."""
    for overrides, change in ((["early_stopping.monitor=val/acc"], "early_stopping.monitor=val/loss (here: val/acc), "
                                                                  "early_stopping.mode=min (here: max)"),
                              (["early_stopping.monitor=train/loss"], "early_stopping.monitor=val/loss (here: "
                                                                      "train/loss)")):
        status, code, run = train(tmp_path, ["trainer.max_epochs=2", *overrides, f"checkpoint.resume={interrupted_run}"])
        assert (status, code) == ("failed", 2)
        assert f"was trained with {change}: its best value, best.pt and patience count" in run.summary["error"]


def test_a_refused_resume_leaves_the_runs_hydra_record_as_it_was(tmp_path, interrupted_run):
    """Hydra rewrites .hydra/ before the run starts: a refused resume (another model) left the run's record saying
    model.hidden=[32], and trainlab ensemble and report then rebuilt the run with the wrong model."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(interrupted_run.read_bytes())
    record = {"config.yaml": b"the run's own config\n", "overrides.yaml": b"- trainer.max_epochs=2\n",
              "hydra.yaml": b"hydra: {}\n"}
    (run_dir / ".hydra").mkdir()
    for name, content in record.items():
        (run_dir / ".hydra" / name).write_bytes(content)
    result = run_cli(["trainer.max_epochs=2", "model.hidden=[32]", "checkpoint.resume=auto",
                      f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2 and "holds a different model" in result.stdout + result.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == record


def test_a_refused_start_in_a_directory_holding_only_a_record_keeps_it(tmp_path):
    """The refused run removed the directory (it held only bookkeeping), then put the record back into it: a
    FileNotFoundError traceback, exit 1, and the earlier attempt's record gone."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_bytes(b"the earlier attempt's config\n")
    result = run_cli(["trainer.max_epochs=1", "checkpoint.resume=auto", "data.batch_size=0",
                      f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == {
        "config.yaml": b"the earlier attempt's config\n"}


def test_a_resume_continues_on_the_data_it_trained_on_wherever_it_lives(tmp_path, interrupted_run):
    for change, message in ((["data.train_size=300"], "data.train_size=null (here: 300)"),
                            (["data.batch_size=32"], "data.batch_size=64 (here: 32)")):
        status, code, run = train(tmp_path, ["trainer.max_epochs=2", *change, f"checkpoint.resume={interrupted_run}"])
        assert (status, code) == ("failed", 2)
        assert f"trained on other data or cycles than this config gives: {message}" in run.summary["error"]
    status, _, _ = train(tmp_path, ["trainer.max_epochs=2", "data.loader=dataloader", "data.num_workers=0",
                                    "data.eval_batch_size=100", f"checkpoint.resume={interrupted_run}"], name="moved")
    assert status == "completed"  # how the data is loaded may change


def test_keys_a_checkpoint_predates_are_no_change_and_values_read_as_overrides():
    saved = "optimizer:\n  _target_: torch.optim.Adam\n  lr: 0.001\n  betas: [0.9, 0.999]\n"
    cfg = compose_cfg(["optimizer=adam", "optimizer.bias_correction=true", "optimizer.betas=[0.8,0.999]"])
    assert checkpoint.changed_options(saved, cfg, "optimizer") == ["optimizer.betas=[0.9,0.999] (here: [0.8,0.999])"]
    assert checkpoint.saved_options(saved, "optimizer") == "optimizer=adam optimizer.lr=0.001 optimizer.betas=[0.9,0.999]"


def test_a_truncated_checkpoint_is_corrupted_or_incomplete(tmp_path, interrupted_run):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(interrupted_run.read_bytes()[:5000])
    status, code, run = train(tmp_path, ["trainer.max_epochs=2", f"checkpoint.resume={cut}"])
    assert (status, code) == ("failed", 2)
    assert f"checkpoint {cut} is corrupted or incomplete" in run.summary["error"]
    assert "Traceback" not in run.summary["error"]


def test_a_checkpoints_embedded_config_is_never_instantiated(tmp_path, interrupted_run):
    marker = tmp_path / "pwned"
    state = checkpoint.load(interrupted_run)
    config = OmegaConf.create(state["config"])
    config.model = {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
    state["config"] = OmegaConf.to_yaml(config)
    doctored = tmp_path / "ckpt" / "last.pt"
    checkpoint.save_atomic(state, doctored)
    status, code, run = train(tmp_path, ["trainer.max_epochs=2", f"checkpoint.resume={doctored}"])
    assert (status, code) == ("completed", 0)  # trained from the weights; the config inside is a record only
    status, code, run = train(tmp_path, ["trainer.max_epochs=2", "model.hidden=[8]",
                                         f"checkpoint.resume={doctored}"], name="mismatch")
    assert code == 2 and "model.file=" in run.summary["error"]  # read as data for the hint, nothing more
    assert not marker.exists()


@pytest.mark.parametrize("target", ["os.system", "subprocess.run", "torch.os.system"])
def test_target_outside_the_allowlist_is_refused_from_the_command_line(tmp_path, target):
    status, code, run = train(tmp_path, [f"model._target_={target}"])
    assert (status, code) == ("failed", 2)
    assert "_target_ at model" in run.summary["error"] and "not allowed" in run.summary["error"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_target_outside_the_allowlist_is_refused_from_a_yaml_file(tmp_path):
    conf = tmp_path / "myconf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "evil.yaml").write_text("# @package _global_\noptimizer:\n  _target_: subprocess.run\n")
    run_dir = tmp_path / "run"
    result = run_cli([f"--config-dir={tmp_path / 'myconf'}", "experiment=evil", f"hydra.run.dir={run_dir}"],
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "_target_ at optimizer: 'subprocess.run' is not allowed" in result.stdout + result.stderr
    assert not run_dir.exists()


def test_every_missing_value_is_reported_at_once(tmp_path):
    status, code, run = train(tmp_path, ["data.batch_size=???", "optimizer.lr=???", "trainer.max_epochs=0"])
    assert (status, code) == ("failed", 2)
    assert "missing values" in run.summary["error"]
    assert "data.batch_size" in run.summary["error"] and "optimizer.lr" in run.summary["error"]


@pytest.mark.parametrize("override, key", [("checkpoint.every_n_steps=0", "checkpoint.every_n_steps=0"),
                                           ("trainer.on_nonfinite=ignore", "trainer.on_nonfinite='ignore'"),
                                           ("trainer.max_nonfinite_skips=-1", "trainer.max_nonfinite_skips=-1"),
                                           ("trainer.nonfinite_check=sometimes", "trainer.nonfinite_check='sometimes'")])
def test_bad_reliability_values_name_the_key(override, key):
    from trainlab.config import validate

    with pytest.raises(ConfigError, match=rf"{key}: "):
        validate(compose_cfg([override]))


# --- determinism and out of memory ------------------------------------------------------------------


def test_deterministic_sets_the_flags_for_the_run_and_restores_them(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cuda_started = torch.cuda.is_initialized()  # then the variable would come too late, and is not set
    seen = {}
    evaluate = trainlab.run.evaluate

    def looking(*args, **kwargs):
        seen.update(algorithms=torch.are_deterministic_algorithms_enabled(),
                    cudnn=torch.backends.cudnn.deterministic, benchmark=torch.backends.cudnn.benchmark)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainlab.run, "evaluate", looking)
    status, _, _ = train(tmp_path, ["trainer.max_epochs=1", "trainer.deterministic=true"])
    assert status == "completed"
    assert seen == {"algorithms": True, "cudnn": True, "benchmark": False}
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == (None if cuda_started else ":4096:8")
    assert not torch.are_deterministic_algorithms_enabled()  # process state restored after the run


def test_deterministic_fails_clearly_on_an_op_without_a_deterministic_implementation(tmp_path, monkeypatch):
    def with_nondeterministic_op(run, loss_fn):
        def loss(logits, labels):
            if torch.are_deterministic_algorithms_enabled():  # what such an op raises (CPU ops all have one)
                raise RuntimeError("scatter_reduce_cuda_kernel does not have a deterministic implementation, but "
                                   "you set 'torch.use_deterministic_algorithms(True)'.")
            return loss_fn(logits, labels)

        return loss

    replace_loss(monkeypatch, with_nondeterministic_op)
    status, code, run = train(tmp_path, ["trainer.max_epochs=1", "trainer.deterministic=true"])
    assert (status, code) == ("failed", 1)
    assert run.summary["stop_reason"].startswith("trainer.deterministic=true: scatter_reduce_cuda_kernel does not "
                                                 "have a deterministic implementation")
    assert "trainer.deterministic=false" in run.summary["stop_reason"]


def test_out_of_memory_names_the_batch_size_and_the_override_to_try(tmp_path, monkeypatch):
    def out_of_memory(run, loss_fn):
        def loss(logits, labels):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        return loss

    replace_loss(monkeypatch, out_of_memory)
    status, code, run = train(tmp_path, ["trainer.max_epochs=1", "data.batch_size=64", "trainer.device=cpu"])
    assert (status, code) == ("failed", 1)
    assert "out of memory on cpu at data.batch_size=64" in run.summary["stop_reason"]
    assert "try data.batch_size=32" in run.summary["stop_reason"]


# --- on a GPU ---------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_interval_check_adds_no_host_sync_to_a_training_step_on_cuda(tmp_path):
    """Whole steps (loader, augmentation, forward, guard, optimizer, on_step) under CUDA's sync detector."""
    from trainlab.loop import EpochTotals, train_one_epoch

    overrides = ["trainer.device=cuda", "augmentation=flip_crop", "regularization=dropout", "optimizer=adam",
                 "logger.every_n_steps=1000000"]  # no logging interval inside the epoch: not one sync is expected
    run = trainlab.run.Run(compose_cfg(overrides), tmp_path / "run")
    run.build()
    assert run.guard.check == "interval"  # auto on a GPU
    run.epoch = run.guard.epoch = 1
    run.epoch_lr = run.optimizer.param_groups[0]["lr"]
    run.train_batches.set_epoch(1)

    def strict(batches):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside a step raises
        try:
            yield from batches
        finally:
            torch.cuda.set_sync_debug_mode("default")

    totals = EpochTotals()
    run.guard.watch(totals)
    result = train_one_epoch(run.forward, strict(run.train_batches), run.loss_fn, run.optimizer, run.scheduler,
                             run.scaler, run.autocast, 0, 10**9, lambda *args: None, run.parts, totals)
    assert result.step == len(run.train_batches) and run.parts.guard is None  # nothing runs per step
    run.guard.raise_if_diverged()  # finite: nothing raised

    logits = torch.zeros(2, 10, device="cuda")
    totals.record(99, torch.tensor(float("nan"), device="cuda"), logits, torch.zeros(2, dtype=torch.long, device="cuda"))
    with pytest.raises(faults.Diverged, match="step 99"):
        run.guard.raise_if_diverged()


@cuda
def test_step_check_on_cuda_stops_before_the_optimizer_step(tmp_path, monkeypatch):
    poison_loss(monkeypatch, {7}, "nan")
    status, code, run = train(tmp_path, ["trainer.device=cuda", "trainer.max_epochs=1", "trainer.nonfinite_check=step"])
    assert (status, code) == ("diverged", 3) and "epoch 1, step 7" in run.summary["stop_reason"]
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


@cuda
def test_deterministic_on_cuda_names_a_real_op_without_a_deterministic_implementation(tmp_path, monkeypatch):
    def with_histc(run, loss_fn):
        def loss(logits, labels):
            torch.histc(logits.float())  # no deterministic CUDA kernel for floating-point input
            return loss_fn(logits, labels)

        return loss

    replace_loss(monkeypatch, with_histc)
    status, code, run = train(tmp_path, ["trainer.device=cuda", "trainer.max_epochs=1", "trainer.deterministic=true"])
    assert (status, code) == ("failed", 1)
    assert "trainer.deterministic=true: _histc_cuda" in run.summary["stop_reason"]
    _, _, free = train(tmp_path, ["trainer.device=cuda", "trainer.max_epochs=1"], name="free")
    assert free.summary["status"] == "completed"  # the same op runs when determinism is not asked for


def test_stop_signals_end_start_up_at_once_but_only_record_themselves_during_training():
    stop = faults.StopSignals()
    with stop:
        with pytest.raises(faults.Interrupted, match="start-up"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode; never reached
        stop.defer = True
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal is swallowed: the first one is what counts
        time.sleep(0.01)
        assert stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back


def test_a_resumed_run_replaces_the_events_logged_after_its_checkpoint(tmp_path, monkeypatch):
    overrides = ["trainer.max_epochs=2", "logger.every_n_steps=1", "checkpoint.every_n_steps=10", "trainer.device=cpu"]
    with monkeypatch.context() as patch:
        signal_at_step(patch, signal.SIGTERM, step=13)
        train(tmp_path, overrides)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])  # lost: the run resumes from last.prev.pt, at step 10
    status, _, _ = train(tmp_path, [*overrides, "checkpoint.resume=auto"])
    steps = [step for step, _ in logged_losses(tmp_path / "run")]
    assert status == "completed" and steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # 11-13 once, not twice


def _train_examples(overrides: list[str]) -> int:
    from trainlab.data import build_data

    return len(build_data(compose_cfg(overrides).data).train)


@pytest.mark.parametrize("case", ["batch-of-one", "schedule", "last-batch", "conv-1x1-maps", "frozen"])
def test_a_training_batch_of_one_example_with_batch_norm_is_refused_before_training(tmp_path, case):
    """BatchNorm1d fails on one example ("Expected more than 1 value per channel"): once mid-run, after epoch 1."""
    base = ["trainer.max_epochs=2", "data=synthetic", "data.num_samples=400", "data.shape=[1,8,8]"]
    n = _train_examples(base)
    extra = {"batch-of-one": ["data.batch_size=1"],
             "schedule": ["data.batch_size=16", "data.batch_size_schedule=[[2,0.01]]"],
             "last-batch": ["data.drop_last=false", f"data.batch_size={n - 1}"],  # and a last batch of 1
             # 4 stages halve 8x8 maps to 1x1: one value per channel of an example, as in an MLP
             "conv-1x1-maps": ["model=cnn", "model.depth=10", "model.stages=4", "data.drop_last=false",
                               f"data.batch_size={n - 1}"],
             "frozen": ["data.batch_size=1", "finetune=frozen"]}[case]  # frozen norms run in eval mode
    status, code, run = train(tmp_path, [*base, *extra])
    if case == "frozen":
        assert (status, code) == ("completed", 0)
        return
    assert (status, code) == ("failed", 2) and run.summary["epochs_run"] == 0
    epoch = 2 if case == "schedule" else 1
    assert f"in epoch {epoch} give batch norm one value per channel (this model's batch norms see 1 per example)" \
        in run.summary["error"]
    status, code, _ = train(tmp_path, [*base, *extra, "normalization=layer"], name="layer")
    assert (status, code) == ("completed", 0)  # layer norm takes one example


@pytest.mark.parametrize(("extra", "warned"), [
    (["data.batch_size=4"], "batches of 4 give batch norm 4 values per channel (this model's batch norms see 1 per"),
    (["data.batch_size=15"], "batches of 15 give batch norm 15 values"),
    (["data.batch_size=16"], None),
    (["data.batch_size=4", "normalization=layer"], None),  # layer norm does not look across the batch
    (["data.batch_size=4", "normalization=none"], None),
    (["data.batch_size=64", "data.batch_size_schedule=[[2,0.125]]", "trainer.max_epochs=2"], "batches of 8 give"),
    # 3 stages of 8x8 maps: the last normalizes 2x2, 4 values of each example
    (["model=cnn", "model.depth=8", "data.batch_size=2"], "batches of 2 give batch norm 8 values per channel (this "
                                                          "model's batch norms see 4 per example)"),
    (["model=cnn", "model.depth=8", "data.batch_size=4"], None),
])
def test_batches_too_small_for_batch_norms_statistics_train_with_a_warning(tmp_path, caplog, extra, warned):
    """The notes: below 16 values per channel, batch norm's statistics are noisy (README *Normalization, measured*)."""
    caplog.set_level("WARNING", logger="trainlab")
    status, code, _ = train(tmp_path, ["trainer.max_epochs=1", "data.train_size=200", *extra])
    assert (status, code) == ("completed", 0)
    noisy = [r.getMessage() for r in caplog.records if "its statistics are noisy" in r.getMessage()]
    if warned is None:
        assert noisy == []
    else:
        assert len(noisy) == 1 and noisy[0].startswith(warned), noisy
        assert "raise data.batch_size, or use normalization=layer or group" in noisy[0]


def test_resume_auto_without_a_last_pt_starts_fresh_in_place_of_the_first_attempts_rows(tmp_path):
    """A first attempt killed before its first last.pt left metrics.csv rows; the fresh start appended to them."""
    overrides = ["trainer.max_epochs=2", "checkpoint.resume=auto"]
    assert train(tmp_path, overrides)[:2] == ("completed", 0)
    for name in ("last.pt", "last.prev.pt"):
        (tmp_path / "run" / "checkpoints" / name).unlink(missing_ok=True)
    status, code, run = train(tmp_path, ["trainer.max_epochs=3", "checkpoint.resume=auto"])
    assert (status, code) == ("completed", 0) and run.start_epoch == 1
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def _ctrl_c_as_from_a_terminal() -> None:
    """A shell starts a background job (`pytest &`) with SIGINT ignored, and Python then leaves it ignored: undo that in
    the child, as a terminal's foreground command has it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_while_torch_imports_exits_without_a_traceback_or_a_run_directory(tmp_path, signum, code):
    """Before trainlab's handlers are in (the first second or so: Hydra's start, then `import torch`), Ctrl-C printed
    a KeyboardInterrupt traceback and SIGTERM ended the process silently, each leaving a run directory of .hydra/ and
    train.log."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "trainlab", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=_ctrl_c_as_from_a_terminal)
    deadline = time.monotonic() + 60
    while not (run_dir / ".hydra").is_dir():  # Hydra has written its record: torch is imported next
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.005)
    process.send_signal(signum)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == code, output
    assert "Traceback" not in output and not run_dir.exists(), output
    assert "no training was cut short" in output, output
