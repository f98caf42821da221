"""Snapshot ensembles within one run (checkpoint.snapshots=cycles): the weights at the end of each lr cycle, their
ensemble on the test split, refused settings, and snapshots across a resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from rich.console import Console

import trainlab.run
from conftest import compose_cfg, run_cli
from trainlab import checkpoint, ensemble, report
from trainlab.config import ConfigError
from trainlab.loop import evaluate
from trainlab.monitor import final_table
from trainlab.run import execute
from trainlab.schedules import build_scheduler, snapshot_epochs

STEPS_PER_EPOCH = 20  # digits: 1294 training images, batch 64, drop_last
# SGDR periods of 1, 2, 4 epochs: cycles end after epochs 1 and 3; epoch 4 is part of a cycle that ends at 7.
# EMA on: best.pt holds the average, the snapshots the raw weights.
SNAPSHOTS = ["scheduler=cosine_restarts", "scheduler.period_epochs=1", "scheduler.period_mult=2",
             "trainer.max_epochs=4", "checkpoint.snapshots=cycles", "early_stopping.enabled=false",
             "regularization=ema", "logger.every_n_steps=5", "logger.tensorboard=false",
             "trainer.device=cpu"]


def train(run_dir: Path, overrides: list[str]):
    """execute() as `train` runs it, with Hydra's record of the config (which `trainlab ensemble` rebuilds from)."""
    cfg = compose_cfg(overrides)
    result = execute(cfg, run_dir, overrides)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return result


def snapshot_states(run_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    return {epoch: checkpoint.load(path)["model"] for epoch, path in checkpoint.snapshots(run_dir / "checkpoints")}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """SNAPSHOTS trained without interruption, with the raw and EMA weights it had at each epoch's end."""
    run_dir = tmp_path_factory.mktemp("snapshots") / "run"
    at_epoch_end: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    save_last = trainlab.run.Run.save_last

    def recording(self, epoch, finished, in_epoch=None):
        if in_epoch is None:
            at_epoch_end[epoch] = {name: {k: v.clone() for k, v in model.state_dict().items()}
                                   for name, model in (("raw", self.model), ("ema", self.ema.module))}
        save_last(self, epoch, finished, in_epoch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainlab.run.Run, "save_last", recording)
        status, code, run = train(run_dir, SNAPSHOTS)
    assert (status, code) == ("completed", 0)
    return run, at_epoch_end


def test_one_snapshot_per_cycle_at_its_end_with_the_raw_weights_of_then(whole):
    run, at_epoch_end = whole
    ckpt = run.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("snapshot*")) == ["snapshot_1.pt", "snapshot_3.pt"]
    # the schedule restarts (back to lr0) at the first step after epochs 1 and 3, and at no other epoch's end
    factor = run.scheduler.factor
    restarts = [e for e in range(1, 5) if factor(e * STEPS_PER_EPOCH) > factor(e * STEPS_PER_EPOCH - 1)]
    assert restarts == [1, 3]
    states = snapshot_states(run.run_dir)
    for epoch, state in states.items():
        assert checkpoint.load(ckpt / f"snapshot_{epoch}.pt")["epoch"] == epoch
        assert state.keys() == at_epoch_end[epoch]["raw"].keys()
        assert all(torch.equal(state[k], at_epoch_end[epoch]["raw"][k]) for k in state)
        ema = at_epoch_end[epoch]["ema"]
        assert any(not torch.equal(state[k], ema[k]) for k in state if k in ema)  # not the EMA's average
    assert any(not torch.equal(states[1][k], states[3][k]) for k in states[1])  # two different snapshots
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert [(s["epoch"], s["weights"]) for s in summary["snapshots"]] == [(1, "snapshot_1.pt"), (3, "snapshot_3.pt")]
    assert summary["snapshot_ensemble"]["members"] == 2
    assert summary["tested_weights"] == "best.pt"  # the run's own test is unchanged


def test_the_ensemble_is_the_mean_of_the_snapshots_softmax_outputs(whole, capsys):
    run, _ = whole
    result = ensemble.ensemble([run.run_dir], which="snapshots")
    assert [m.weights.name for m in result.members] == ["snapshot_1.pt", "snapshot_3.pt"]
    # by hand: each snapshot in the run's own model, on the run's own test batches
    probabilities, labels = [], torch.cat([y for _, y in run.test_batches])
    for member in result.members:
        run.model.load_state_dict(checkpoint.load(member.weights)["model"])
        own = evaluate(run.model, run.test_batches, run.autocast)  # the snapshot tested as the run tests
        assert (member.loss, member.acc) == pytest.approx((own["loss"], own["acc"]), rel=1e-5)
        with torch.no_grad():
            probabilities.append(torch.cat([F.softmax(run.model(x).double(), dim=1) for x, _ in run.test_batches]))
    mean = torch.stack(probabilities).mean(dim=0)
    assert result.loss == pytest.approx(F.nll_loss(mean.log(), labels).item(), rel=1e-12)
    assert result.acc == pytest.approx((mean.argmax(dim=1) == labels).double().mean().item(), abs=1e-12)
    assert result.loss < sum(m.loss for m in result.members) / 2  # not the members' mean loss (Jensen, strictly)
    # summary.json's snapshot scores, computed at the end of the run, are the command's
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["snapshot_ensemble"]["test/loss"] == pytest.approx(result.loss, rel=1e-9)
    assert summary["snapshot_ensemble"]["test/acc"] == pytest.approx(result.acc, abs=1e-12)
    assert [s["test/loss"] for s in summary["snapshots"]] == pytest.approx([m.loss for m in result.members],
                                                                           rel=1e-9)
    table = Console(width=200, record=True, color_system=None)
    table.print(final_table(summary))  # the run's closing table shows the ensemble under its test row
    shown = " ".join(table.export_text().replace("│", " ").split())
    assert (f"snapshot ensemble (2) test/loss {summary['snapshot_ensemble']['test/loss']:.4f} "
            f"test/acc {summary['snapshot_ensemble']['test/acc']:.4f}") in shown
    report.main(["ensemble", str(run.run_dir), "--checkpoint", "snapshots"])
    out = " ".join(capsys.readouterr().out.split())  # the title and caption wrap at the table's width
    assert "ensemble of 2 snapshots of 1 run on 359 test images" in out and "against the last snapshot" in out


@pytest.mark.parametrize(("name", "half_cycle", "warmup", "mult", "max_epochs", "expected"), [
    ("cosine_restarts", None, 0, 2, 14, [2, 6, 14]),
    ("cosine_restarts", None, 1, 1, 7, [3, 5, 7]),  # warmup shifts every cycle
    ("cyclic", 1.5, 0, None, 12, [3, 6, 9, 12]),  # troughs every 2 x 1.5 epochs
])
def test_snapshot_epochs_are_where_the_schedules_own_cycles_end(name, half_cycle, warmup, mult, max_epochs,
                                                                 expected):
    knobs = {"name": name, "warmup_epochs": warmup}
    knobs.update({"half_cycle_epochs": half_cycle} if name == "cyclic" else {"period_epochs": 2, "period_mult": mult})
    cfg = OmegaConf.create(knobs)
    assert snapshot_epochs(cfg, STEPS_PER_EPOCH, max_epochs) == expected
    # independently, from the lr factors: a cycle ends after step s when s starts the next one (SGDR: the lr jumps
    # back up; cyclic: a trough, the lowest lr, after which it rises)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factor = build_scheduler(cfg, optimizer, STEPS_PER_EPOCH, max_epochs).factor
    lr = [factor(s) for s in range(max_epochs * STEPS_PER_EPOCH + 2)]
    ends = [s for s in range(1, len(lr) - 1) if (lr[s] > lr[s - 1] and lr[s] == 1.0 if name == "cosine_restarts"
                                                 else lr[s - 1] > lr[s] < lr[s + 1])]
    assert [s // STEPS_PER_EPOCH for s in ends if s % STEPS_PER_EPOCH == 0] == expected
    assert all(s % STEPS_PER_EPOCH == 0 for s in ends if s >= warmup * STEPS_PER_EPOCH)


# --- refused settings: exit 2, a message that names the fix, no run directory left ----------------------


@pytest.mark.parametrize(("overrides", "message"), [
    (["scheduler=cosine"], "checkpoint.snapshots='cycles': takes a snapshot at the end of each learning-rate cycle, "
                           "and scheduler=cosine has no cycles; use scheduler=cosine_restarts or scheduler=cyclic"),
])
def test_refused_settings_exit_2_from_the_command_line_and_leave_nothing(overrides, message, tmp_path):
    result = run_cli([*overrides, "checkpoint.snapshots=cycles", f"hydra.run.dir={tmp_path / 'run'}",
                      "trainer.device=cpu"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory, no outputs/


@pytest.mark.parametrize(("overrides", "message"), [
    (["checkpoint.snapshots=epochs"], "checkpoint.snapshots='epochs': choose none or cycles"),
    (["scheduler=cosine_restarts", "regularization=swa"], "SWA (regularization.swa_start) replaces the schedule's "
                                                          "cycles with a constant lr"),
    (["scheduler=cosine_restarts", "trainer.max_epochs=20"],  # periods of 10 and 20 epochs: one ends by epoch 20
     "1 cycle(s) of scheduler=cosine_restarts end within trainer.max_epochs=20 (at epoch 10); a snapshot ensemble "
     "needs at least 2"),
    (["scheduler=cosine_restarts", "scheduler.period_epochs=1.5", "trainer.max_epochs=4"],
     "cycles of scheduler=cosine_restarts end inside an epoch (at epoch 1.5 of 20 steps each)"),
    (["scheduler=cyclic", "scheduler.half_cycle_epochs=0.75", "trainer.max_epochs=4"],
     "cycles of scheduler=cyclic end inside an epoch (at epoch 1.5 of 20 steps each)"),
])
def test_refused_settings_name_the_problem_before_training(overrides, message, tmp_path):
    if "checkpoint.snapshots=epochs" not in overrides:
        overrides = [*overrides, "checkpoint.snapshots=cycles"]
    status, code, run = execute(compose_cfg(overrides), tmp_path / "run", overrides)
    assert (status, code) == ("failed", 2) and not run.started
    assert message in run.summary["error"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_ensemble_command_refuses_a_run_without_snapshots(whole, tmp_path, capsys):
    run, _ = whole
    plain = tmp_path / "plain"
    shutil.copytree(run.run_dir, plain)
    for _, path in checkpoint.snapshots(plain / "checkpoints"):
        path.unlink()
    with pytest.raises(SystemExit) as exit_info:
        report.main(["ensemble", str(plain), "--checkpoint", "snapshots"])
    assert exit_info.value.code == 2
    assert "no snapshots (snapshot_<epoch>.pt; train with checkpoint.snapshots=cycles)" in capsys.readouterr().err
    shutil.copy2(run.run_dir / "checkpoints" / "snapshot_3.pt", plain / "checkpoints")
    with pytest.raises(ConfigError, match="an ensemble needs at least 2 snapshots; found 1"):
        ensemble.ensemble([plain], which="snapshots")



def test_ensembles_of_the_last_m_snapshots_in_the_summary_and_the_command(tmp_path, capsys):
    """Huang et al. also ensemble the last m snapshots only: summary.json scores each m, `--last m` picks them."""
    run_dir = tmp_path / "run"
    overrides = [*SNAPSHOTS, "scheduler.period_mult=1", "trainer.max_epochs=3", "regularization=none"]
    assert train(run_dir, overrides)[:2] == ("completed", 0)  # snapshots after epochs 1, 2 and 3
    summary = json.loads((run_dir / "summary.json").read_text())
    whole = summary["snapshot_ensemble"]
    assert [s["members"] for s in whole["last"]] == [2, 3]
    assert {k: whole["last"][-1][k] for k in ("test/loss", "test/acc")} == {k: whole[k] for k in ("test/loss",
                                                                                                   "test/acc")}
    two = ensemble.ensemble([run_dir], which="snapshots", last=2)
    assert [m.weights.name for m in two.members] == ["snapshot_2.pt", "snapshot_3.pt"]
    assert (two.loss, two.acc) == pytest.approx((whole["last"][0]["test/loss"], whole["last"][0]["test/acc"]),
                                                rel=1e-9)
    assert two.loss != pytest.approx(whole["test/loss"], rel=1e-6)  # not the ensemble of all three
    report.main(["ensemble", str(run_dir), "--checkpoint", "snapshots", "--last", "2"])
    assert "ensemble of 2 snapshots of 1 run" in capsys.readouterr().out
    for args, message in ((["--checkpoint", "snapshots", "--last", "4"],
                           "--last 4, but the run has 3 snapshots (snapshot_1.pt, snapshot_2.pt, snapshot_3.pt); "
                           "give --last 3 or less"),
                          (["--last", "2"], "--last 2 picks each run's last snapshots: give it with --checkpoint "
                                            "snapshots"),
                          (["--checkpoint", "snapshots", "--last", "0"], "--last 0: give the number of snapshots")):
        with pytest.raises(SystemExit) as exit_info:
            report.main(["ensemble", str(run_dir), *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err

# --- resume: no snapshot lost, none stale or twice -------------------------------------------------------


def signal_at_step(monkeypatch, step: int) -> None:
    """SIGTERM to this process right after optimizer step `step` (as tests/test_reliability.py sends it)."""
    on_step = trainlab.run.Run.on_step

    def sending(self, s, totals):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)
        on_step(self, s, totals)

    monkeypatch.setattr(trainlab.run.Run, "on_step", sending)


def test_a_run_stopped_and_resumed_ends_with_the_snapshots_of_an_uninterrupted_one(whole, tmp_path, monkeypatch):
    run, _ = whole
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        signal_at_step(patch, 47)  # epoch 3, mid-cycle: last.pt inside epoch 3, snapshot_1 taken
        status, code, _ = train(run_dir, SNAPSHOTS)
    assert (status, code) == ("interrupted", 143)
    ckpt = run_dir / "checkpoints"
    assert [e for e, _ in checkpoint.snapshots(ckpt)] == [1]
    # as if an earlier attempt had taken snapshot_3 and been killed before its last.pt: that file is not this
    # run's epoch 3, and a resume that stops again before epoch 3 ends must not keep it
    shutil.copy2(ckpt / "snapshot_1.pt", ckpt / "snapshot_3.pt")
    with monkeypatch.context() as patch:
        signal_at_step(patch, 55)
        status, code, _ = train(run_dir, [*SNAPSHOTS, "checkpoint.resume=auto"])
    assert (status, code) == ("interrupted", 143)
    assert [e for e, _ in checkpoint.snapshots(ckpt)] == [1]
    status, code, resumed = train(run_dir, [*SNAPSHOTS, "checkpoint.resume=auto"])
    assert (status, code) == ("completed", 0)
    got, expected = snapshot_states(run_dir), snapshot_states(run.run_dir)
    assert got.keys() == expected.keys() == {1, 3}
    for epoch in expected:
        assert all(torch.equal(got[epoch][k], expected[epoch][k]) for k in expected[epoch]), epoch
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["snapshot_ensemble"] == json.loads((run.run_dir / "summary.json").read_text())["snapshot_ensemble"]


# --- torchrun: rank 0 writes; the end-of-run scores sum every rank's part of the test split ------------------


def test_a_resume_with_other_cycles_or_batches_is_refused(whole, tmp_path):
    """Another batch size moved the cycle ends (the schedule counts steps): snapshots 8 and 10 were taken at half the
    peak lr; other cycles mixed two schedules' snapshots in one ensemble."""
    run, _ = whole
    last = run.run_dir / "checkpoints" / "last.pt"
    for change, message in ((["data.batch_size=32"], "data.batch_size=64 (here: 32)"),
                            (["scheduler.period_epochs=2", "scheduler.period_mult=1"],
                             "scheduler.period_epochs=1 (here: 2), scheduler.period_mult=2 (here: 1)")):
        overrides = [*SNAPSHOTS, "trainer.max_epochs=8", *change, f"checkpoint.resume={last}"]
        status, code, refused = execute(compose_cfg(overrides), tmp_path / "again", overrides)
        assert (status, code) == ("failed", 2), refused.summary.get("error")
        assert f"trained on other data or cycles than this config gives: {message}" in refused.summary["error"]


@pytest.mark.slow  # 7 s: two torchrun processes
def test_under_torchrun_rank_0_writes_the_snapshots_and_scores_the_whole_test_split(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    overrides = [o for o in SNAPSHOTS if not o.startswith(("trainer.max_epochs", "scheduler.period_mult"))]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "trainlab", *overrides, "scheduler.period_mult=1", "trainer.max_epochs=3",
                             "logger.progress=lines", "hydra.run.dir=run"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    run_dir = tmp_path / "run"
    assert [e for e, _ in checkpoint.snapshots(run_dir / "checkpoints")] == [1, 2, 3]
    assert not list(scratch.glob("trainlab-rank*"))  # the other rank wrote only its scratch directory, now gone
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2
    whole = ensemble.ensemble([run_dir], which="snapshots")  # one process, every test image
    assert summary["snapshot_ensemble"]["test/loss"] == pytest.approx(whole.loss, rel=1e-9)
    assert summary["snapshot_ensemble"]["test/acc"] == pytest.approx(whole.acc, abs=1e-12)
    assert [v for s in summary["snapshots"] for v in (s["test/loss"], s["test/acc"])] == pytest.approx(
        [v for m in whole.members for v in (m.loss, m.acc)], rel=1e-9)


def test_a_bf16_run_is_ensembled_in_bf16_as_its_end_of_run_scores_are(whole, tmp_path):
    """The command evaluated every member in fp32 while the run tested (and scored its snapshots) under its own
    autocast: a bf16 run's losses differed in the 4th decimal (ensemble 0.4021 against summary.json's 0.4026)."""
    from trainlab.device import autocast_for

    run, _ = whole
    copy = tmp_path / "run"
    shutil.copytree(run.run_dir, copy)
    summary = json.loads((copy / "summary.json").read_text())
    (copy / "summary.json").write_text(json.dumps({**summary, "precision": "bf16"}))  # as a bf16 run records it
    result = ensemble.ensemble([copy], which="snapshots")
    bf16 = autocast_for(torch.device("cpu"), "bf16")
    probabilities = []
    for member in result.members:  # as Run.test_snapshots scores them, under the run's autocast
        run.model.load_state_dict(checkpoint.load(member.weights)["model"])
        probs, labels = ensemble.probabilities(run.model, run.test_batches, bf16)
        probabilities.append(probs)
        own = evaluate(run.model, run.test_batches, bf16)  # the snapshot tested as a bf16 run tests
        assert (member.loss, member.acc) == pytest.approx((own["loss"], own["acc"]), rel=1e-6)
        fp32 = evaluate(run.model, run.test_batches, nullcontext())
        assert member.loss != pytest.approx(fp32["loss"], rel=1e-5)  # bf16 is seen in these digits
    loss, hits, n = ensemble.sums(torch.stack(probabilities).mean(dim=0), labels).tolist()
    assert (result.loss, result.acc) == pytest.approx((loss / n, hits / n), rel=1e-12)


def test_a_damaged_snapshot_exits_2_naming_it_and_how_to_ensemble_the_others(whole, tmp_path, capsys):
    run, _ = whole
    copy = tmp_path / "run"
    shutil.copytree(run.run_dir, copy)
    damaged = copy / "checkpoints" / "snapshot_1.pt"
    damaged.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        report.main(["ensemble", str(copy), "--checkpoint", "snapshots"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"trainlab ensemble: checkpoint {damaged} is corrupted")
    assert err.endswith(f"; move it out of {damaged.parent} to ensemble the run's other snapshots, or leave {copy} "
                        "out\n")
