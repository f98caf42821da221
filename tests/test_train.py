"""Training runs on CPU: outputs of a run, early stopping, resume, multirun, the default's accuracy."""

from __future__ import annotations

import csv
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import trainlab.run
from conftest import FAST, compose_cfg, run_cli
from trainlab.config import ConfigError, validate

SUMMARY_FIELDS = {"status", "stop_reason", "best_epoch", "epochs_run", "best", "test", "wall_time_s", "device",
                  "versions", "overrides"}


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def custom_charts(run_dir: Path) -> dict[str, list[str]]:
    """The custom-scalars layout: chart title -> the tags drawn together on it."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = EventAccumulator(str(run_dir))
    events.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    return {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}


@contextmanager
def interrupted_in_epoch(epoch: int, monkeypatch):
    """Within the block, a Ctrl-C arrives at the end of training epoch `epoch` (at its validation)."""
    evaluate, calls = trainlab.run.evaluate, {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainlab.run, "evaluate", interrupting)
    yield
    monkeypatch.setattr(trainlab.run, "evaluate", evaluate)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_cli_run_writes_every_output(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*FAST, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert "epoch 2/2" in (run_dir / "train.log").read_text()
    assert "\x1b" not in result.stdout + result.stderr  # not a terminal: plain lines, no control characters
    # the paths under the final table are whole on their lines, however long (they folded at 80 columns)
    assert f"\nrun directory: {run_dir}\ncurves: tensorboard --logdir {run_dir}\n" in result.stdout

    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["status"] == "completed" and summary["epochs_run"] == 2
    assert summary["best_epoch"] in (1, 2) and summary["device"] == "cpu"
    assert 0.5 < summary["test"]["test/acc"] <= 1.0
    assert summary["overrides"] == FAST  # the job's overrides (hydra.* settings are Hydra's own record)

    rows = read_csv(run_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    steps_per_epoch = int(rows[0]["step"])
    assert steps_per_epoch == (1797 - 359 - 144) // 64  # drop_last on the 1294 training images

    tags = scalars(run_dir)
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "test/acc"):
        assert tag in tags, tag
    assert [s for s, _ in tags["train/loss"]] == list(range(5, 2 * steps_per_epoch + 1, 5))
    assert [s for s, _ in tags["val/loss"]] == [steps_per_epoch, 2 * steps_per_epoch]
    assert tags["val/loss"][1][1] == pytest.approx(float(rows[1]["val/loss"]))
    assert all(v == pytest.approx(0.1) for _, v in tags["lr"])
    assert custom_charts(run_dir)["loss"] == ["train/loss", "val/loss"]  # one chart, both curves

    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["step"] == 2 * steps_per_epoch and last["finished"]
    assert {"model", "optimizer", "scheduler", "early_stopping", "config", "rng"} <= set(last)
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"]


def test_default_config_reaches_95_percent_on_digits(train_inprocess):
    status, code, run = train_inprocess([])
    assert (status, code) == ("completed", 0)
    assert run.summary["test"]["test/acc"] >= 0.95


def test_same_seed_same_run_and_other_seed_differs(train_inprocess):
    _, _, a = train_inprocess([*FAST, "regularization=dropout", "augmentation=crop"], name="a")
    _, _, b = train_inprocess([*FAST, "regularization=dropout", "augmentation=crop"], name="b")
    _, _, c = train_inprocess([*FAST, "regularization=dropout", "augmentation=crop", "seed=1"], name="c")
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key])
    assert a.summary["best"] == b.summary["best"]
    assert a.summary["best"] != c.summary["best"]


def test_early_stopping_stops_after_patience_epochs(train_inprocess, tmp_path):
    # min_delta larger than any possible change: only the first epoch counts as an improvement.
    status, code, run = train_inprocess(["trainer.max_epochs=10", "early_stopping.patience=2",
                                         "early_stopping.min_delta=100"])
    assert (status, code) == ("stopped_early", 0)
    assert run.summary["epochs_run"] == 3 and run.summary["best_epoch"] == 1
    assert "did not improve" in run.summary["stop_reason"]
    assert [int(r["epoch"]) for r in read_csv(tmp_path / "run" / "metrics.csv")] == [1, 2, 3]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["finished"]


@pytest.mark.parametrize("mode", ["auto", "max"])
def test_early_stopping_on_accuracy_keeps_the_highest_epoch(train_inprocess, mode):
    """mode=auto (the default) reads an accuracy as higher-is-better; it once kept min mode and the worst epoch."""
    status, _, run = train_inprocess(["trainer.max_epochs=4", "early_stopping.monitor=val/acc",
                                      f"early_stopping.mode={mode}", "early_stopping.patience=2"], name=mode)
    assert status == "completed"
    accuracies = [float(r["val/acc"]) for r in read_csv(run.run_dir / "metrics.csv")]
    assert run.summary["best"]["val/acc"] == max(accuracies) and run.stopper.mode == "max"


@pytest.mark.parametrize(("monitor", "mode", "fix"), [("val/acc", "min", "max"), ("train/loss", "max", "min")])
def test_a_mode_against_the_monitors_direction_is_refused(monitor, mode, fix):
    with pytest.raises(ConfigError, match=rf"early_stopping.mode='{mode}'.*{monitor} improves when it gets "
                                          rf"(higher|lower), so mode={mode} would keep its worst epoch; use "
                                          rf"mode={fix} or mode=auto"):
        validate(compose_cfg([f"early_stopping.monitor={monitor}", f"early_stopping.mode={mode}"]))


def test_resume_continues_at_the_next_epoch_and_matches_an_uninterrupted_run(train_inprocess, monkeypatch, tmp_path):
    overrides = ["trainer.max_epochs=4", "regularization=dropout", "augmentation=crop", "scheduler=cosine"]
    _, _, whole = train_inprocess(overrides, name="whole")

    with interrupted_in_epoch(3, monkeypatch):
        status, code, _ = train_inprocess(overrides, name="first")
    assert (status, code) == ("interrupted", 130)

    last = tmp_path / "first" / "checkpoints" / "last.pt"
    status, code, resumed = train_inprocess([*overrides, f"checkpoint.resume={last}"], name="second")
    assert (status, code) == ("completed", 0)
    rows = read_csv(tmp_path / "second" / "metrics.csv")  # the continued run's rows up to its checkpoint, then its own
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == read_csv(tmp_path / "first" / "metrics.csv")[:2]
    assert resumed.summary["epochs_run"] == 4
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_resume_refuses_a_finished_run_and_a_missing_file(train_inprocess, tmp_path):
    train_inprocess(FAST, name="done")
    last = tmp_path / "done" / "checkpoints" / "last.pt"
    status, code, run = train_inprocess([*FAST, f"checkpoint.resume={last}"], name="again")
    assert (status, code) == ("failed", 2)
    assert "already finished" in run.summary["error"]
    status, code, run = train_inprocess([*FAST, f"checkpoint.resume={tmp_path}/nope.pt"], name="missing")
    assert code == 2 and "does not exist" in run.summary["error"]


def test_resume_refuses_a_checkpoint_of_another_model(train_inprocess, monkeypatch, tmp_path):
    with interrupted_in_epoch(2, monkeypatch):
        train_inprocess(["trainer.max_epochs=3"], name="wide")
    last = tmp_path / "wide" / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    status, code, run = train_inprocess(["trainer.max_epochs=3", "model.hidden=[32]", f"checkpoint.resume={last}"],
                                        name="narrow")
    assert (status, code) == ("failed", 2)
    assert "holds a different model" in run.summary["error"] and "size mismatch" in run.summary["error"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_runs_on_cpu(train_inprocess, precision):
    status, _, run = train_inprocess(["trainer.max_epochs=1", f"trainer.precision={precision}"])
    assert status == "completed" and run.summary["precision"] == precision


def test_auto_device_is_cpu_here():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("an accelerator is present")
    assert trainlab.run.select_device("auto") == torch.device("cpu")


def test_multirun_gives_each_job_its_directory(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "optimizer=sgd,adam", "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0_optimizer=sgd,trainer.max_epochs=1", "1_optimizer=adam,trainer.max_epochs=1"]
    for job, optimizer in zip(jobs, ["sgd", "adam"]):
        assert list(job.glob("events.out.tfevents.*"))
        summary = json.loads((job / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert f"optimizer={optimizer}" in summary["overrides"]


@pytest.mark.slow  # 6 s; tests/test_sweeps.py's failing-job test covers the same in the default run
def test_multirun_with_a_failing_job_runs_the_others_and_exits_nonzero(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "model=cnn", "model.depth=9,8", "model.width=4", "trainer.max_epochs=1",
                      f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode != 0
    failed, done = (json.loads((d / "summary.json").read_text()) for d in sorted(sweep.glob("[01]_*")))
    assert failed["status"] == "failed" and "model.depth=9" in failed["error"]
    assert done["status"] == "completed"


def test_dry_run_writes_the_lr_curve_without_training(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["dry_run=true", "scheduler=step", "trainer.max_epochs=3", f"hydra.run.dir={run_dir}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_csv(run_dir / "lr_curve.csv")
    assert len(rows) == 3 * 20 and float(rows[0]["lr"]) == pytest.approx(0.1)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "summary.json").exists()


def test_batch_size_at_multiplies_from_each_milestone():
    from trainlab.data import batch_size_at

    schedule = [[3, 2], [5, 2]]
    assert [batch_size_at(e, 32, schedule) for e in range(1, 7)] == [32, 32, 64, 64, 128, 128]
    assert batch_size_at(9, 32, None) == 32


def test_epoch_batch_sizes_apply_the_configs_schedule_to_every_epoch():
    from trainlab.data import epoch_batch_sizes

    data = compose_cfg(["data.batch_size=32", "data.batch_size_schedule=[[3,2],[5,2.5]]"]).data
    assert epoch_batch_sizes(data, 6) == [32, 32, 64, 64, 160, 160]
    plain = compose_cfg(["data.batch_size=48"]).data
    assert epoch_batch_sizes(plain, 100_000) == [48] * 100_000  # the config read once, not per epoch (that took 30 s)


def test_batch_size_schedule_changes_the_steps_per_epoch(train_inprocess, tmp_path):
    status, _, run = train_inprocess(["trainer.max_epochs=3", "data.batch_size=64", "data.batch_size_schedule=[[2,2],[3,2]]"])
    assert status == "completed"
    steps = [int(r["step"]) for r in read_csv(tmp_path / "run" / "metrics.csv")]
    assert steps == [20, 20 + 10, 20 + 10 + 5]  # 1294 training images in batches of 64, 128, 256 (drop_last)


def test_batch_size_schedule_epochs_after_the_run_are_warned_of(caplog):
    """They were ignored silently, where the step decays a run never reaches are warned of."""
    from trainlab.data import epoch_batch_sizes

    data = compose_cfg(["data.batch_size_schedule=[[2,2],[5,2],[9,2]]"]).data
    caplog.set_level("WARNING", logger="trainlab")
    assert epoch_batch_sizes(data, 3) == [64, 128, 128]
    assert "data.batch_size_schedule: epoch(s) [5, 9] come after trainer.max_epochs=3, so their factors never " \
           "apply" in caplog.text
    caplog.clear()
    epoch_batch_sizes(data, 9)
    assert "batch_size_schedule" not in caplog.text


def test_batch_size_schedule_refuses_a_decaying_schedule():
    from conftest import compose_cfg
    from trainlab.config import ConfigError, validate

    with pytest.raises(ConfigError, match="scheduler=cosine counts steps of a fixed batch size"):
        validate(compose_cfg(["scheduler=cosine", "data.batch_size_schedule=[[10,2]]"]))


def test_a_new_run_in_a_directory_that_holds_one_is_refused_and_changes_nothing(train_inprocess, tmp_path):
    """It appended its rows to metrics.csv and its points to the curves of the run already there."""
    assert train_inprocess(["trainer.max_epochs=1"])[:2] == ("completed", 0)
    run_dir = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in (run_dir / "metrics.csv", run_dir / "summary.json")}
    status, code, run = train_inprocess(["trainer.max_epochs=1"])
    assert (status, code) == ("failed", 2)
    assert "already holds a run (metrics.csv, checkpoints/last.pt, checkpoints/best.pt); continue it with " \
           "checkpoint.resume=auto" in run.summary["error"]
    assert {p.name: p.read_bytes() for p in (run_dir / "metrics.csv", run_dir / "summary.json")} == before
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1


def test_a_resume_of_another_runs_checkpoint_into_a_directory_that_holds_a_run_is_refused(train_inprocess,
                                                                                           tmp_path):
    """It overwrote that run: its best.pt, last.pt and summary.json replaced, its metrics.csv cut to the other run's
    epoch and extended with the other run's rows. Its own checkpoints, by path, still resume there."""
    assert train_inprocess(["trainer.max_epochs=1"], name="source")[:2] == ("completed", 0)
    assert train_inprocess(["trainer.max_epochs=2"], name="run")[:2] == ("completed", 0)
    run_dir = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    other = tmp_path / "source" / "checkpoints" / "last.pt"
    status, code, run = train_inprocess(["trainer.max_epochs=3", f"checkpoint.resume={other}"])
    assert (status, code) == ("failed", 2)
    assert f"{run_dir} already holds another run (metrics.csv, checkpoints/last.pt, checkpoints/best.pt); resuming " \
           f"checkpoint.resume={other} there would overwrite" in run.summary["error"]
    assert {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    own = run_dir / "checkpoints" / "last.pt"
    assert train_inprocess(["trainer.max_epochs=3", f"checkpoint.resume={own}"])[:2] == ("completed", 0)


def test_wall_time_counts_every_process_of_a_resumed_run(train_inprocess, tmp_path):
    import time

    assert train_inprocess(["trainer.max_epochs=1"])[:2] == ("completed", 0)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["wall_time_s"]
    tic = time.time()
    _, _, run = train_inprocess(["trainer.max_epochs=2", "checkpoint.resume=auto"])
    second = time.time() - tic
    assert run.summary["status"] == "completed" and 0 < saved
    assert saved < run.summary["wall_time_s"] <= saved + second  # the first process's seconds, then this one's
