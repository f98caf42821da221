"""Every learning-rate schedule against its closed form, warmup, plateau, resume, the YAML options and the dry run."""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import nn

import trainlab
from trainlab import schedules
from trainlab.config import ConfigError, register_configs
from trainlab.dry_run import dry_run, lr_curve, sparkline

CONF_DIR = Path(trainlab.__file__).parent / "conf"
SCHEDULER_OPTIONS = sorted(p.stem for p in (CONF_DIR / "scheduler").glob("*.yaml"))


def compose_train(overrides: list[str]) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def make(cfg: dict, steps_per_epoch: int, max_epochs: int, lr: float = 1.0, mode: str = "min",
         groups: int = 1) -> tuple[torch.optim.SGD, schedules.Scheduler]:
    params = [{"params": [nn.Parameter(torch.zeros(2))]} for _ in range(groups)]
    optimizer = torch.optim.SGD(params, lr=lr)
    return optimizer, schedules.build_scheduler(OmegaConf.create(cfg), optimizer, steps_per_epoch, max_epochs, mode)


def lrs_of(cfg: dict, steps_per_epoch: int, max_epochs: int, lr: float = 1.0, metrics: list[float] | None = None,
           mode: str = "min") -> list[float]:
    """The lr every step used, as the loop reads it; metrics[e] is fed to epoch_end after epoch e+1."""
    optimizer, scheduler = make(cfg, steps_per_epoch, max_epochs, lr, mode)
    lrs = []
    for epoch in range(max_epochs):
        for _ in range(steps_per_epoch):
            lrs.append(optimizer.param_groups[0]["lr"])
            scheduler.step()
        scheduler.epoch_end(metrics[epoch] if metrics is not None else 1.0)
    return lrs


def final_lr(cfg: dict, steps_per_epoch: int, max_epochs: int, lr: float = 1.0) -> float:
    """The lr after the last step of the run: where the schedule ends."""
    optimizer, scheduler = make(cfg, steps_per_epoch, max_epochs, lr)
    for _ in range(steps_per_epoch * max_epochs):
        scheduler.step()
    return scheduler.get_last_lr()[0]


# --- closed forms ----------------------------------------------------------------------------------


def test_step_halves_exactly_at_the_epoch_boundary():
    lrs = lrs_of({"name": "step", "step_epochs": 10, "gamma": 0.5}, 4, 25, lr=0.8)
    assert lrs[0] == lrs[39] == 0.8  # all of epochs 0-9 (steps 0-39)
    assert lrs[40] == lrs[79] == 0.4  # halves at the first step of epoch 10
    assert lrs[80] == lrs[99] == 0.2


def test_multistep_multiplies_by_gamma_at_each_milestone():
    lrs = lrs_of({"name": "multistep", "milestones": [3, 7], "gamma": 0.1}, 5, 10, lr=2.0)
    per_epoch = [lrs[5 * e] for e in range(10)]
    assert lrs[14] == 2.0 and lrs[34] == pytest.approx(0.2)
    assert per_epoch == pytest.approx([2.0] * 3 + [0.2] * 4 + [0.02] * 3)


def test_exponential_is_lr0_exp_minus_kt_with_t_in_epochs():
    lrs = lrs_of({"name": "exponential", "k": 0.3}, 8, 5, lr=0.5)
    assert lrs == pytest.approx([0.5 * math.exp(-0.3 * s / 8) for s in range(40)])


def test_inverse_time_is_lr0_over_1_plus_kt():
    lrs = lrs_of({"name": "inverse_time", "k": 2.0}, 4, 3, lr=0.3)
    assert lrs == pytest.approx([0.3 / (1 + 2.0 * s / 4) for s in range(12)])


def test_inverse_sqrt_is_lr0_over_sqrt_1_plus_t_over_t0():
    lrs = lrs_of({"name": "inverse_sqrt", "timescale_epochs": 0.5}, 4, 3, lr=0.3)
    assert lrs == pytest.approx([0.3 / math.sqrt(1 + (s / 4) / 0.5) for s in range(12)])
    assert lrs[6] == pytest.approx(0.15)  # halved at t = 3 * t0 = 1.5 epochs


def test_linear_decays_to_the_floor_at_the_end():
    lrs = lrs_of({"name": "linear", "min_lr_fraction": 0.1}, 5, 4, lr=2.0)
    assert lrs == pytest.approx([2.0 * (0.1 + 0.9 * (1 - s / 20)) for s in range(20)])
    assert final_lr({"name": "linear", "min_lr_fraction": 0.1}, 5, 4, lr=2.0) == pytest.approx(0.2)


def test_polynomial_follows_the_power():
    cfg = {"name": "polynomial", "power": 3.0, "min_lr_fraction": 0.05}
    lrs = lrs_of(cfg, 5, 4)
    assert lrs == pytest.approx([0.05 + 0.95 * (1 - s / 20) ** 3 for s in range(20)])
    assert lrs[10] == pytest.approx(0.05 + 0.95 / 8)
    assert final_lr(cfg, 5, 4) == pytest.approx(0.05)
    assert schedules.linear(0.25, 0.2) == pytest.approx(schedules.polynomial(0.25, 1.0, 0.2)) == pytest.approx(0.8)


def test_cosine_endpoints_and_midpoint_through_the_scheduler():
    cfg = {"name": "cosine", "min_lr_fraction": 0.2}
    lrs = lrs_of(cfg, 10, 4, lr=0.5)
    assert lrs[0] == pytest.approx(0.5)
    assert lrs[20] == pytest.approx(0.5 * 0.6)  # midpoint: (1 + f) / 2
    assert final_lr(cfg, 10, 4, lr=0.5) == pytest.approx(0.1)


def test_cosine_restarts_returns_to_lr0_exactly_at_the_period_boundaries():
    cfg = {"name": "cosine_restarts", "period_epochs": 1, "period_mult": 2, "min_lr_fraction": 0.1}
    lrs = lrs_of(cfg, 4, 7, lr=0.4)
    # periods: epochs [0, 1), [1, 3), [3, 7): restarts at steps 4 and 12
    for start, length in ((0, 4), (4, 8), (12, 16)):
        assert lrs[start] == 0.4
        expected = [0.4 * schedules.cosine(j / length, 0.1) for j in range(length)]
        assert lrs[start:start + length] == pytest.approx(expected)
    assert lrs[12 + 8] == pytest.approx(0.4 * 0.55)  # midpoint of the third period: (1 + f) / 2
    assert lrs[11] < lrs[12]


def test_cosine_restarts_with_fractional_periods_restarts_on_the_right_step():
    lrs = lrs_of({"name": "cosine_restarts", "period_epochs": 0.3, "period_mult": 1, "min_lr_fraction": 0.0}, 10, 3)
    restarts = [s for s in range(1, 30) if lrs[s] > lrs[s - 1]]
    assert restarts == [3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert all(lrs[s] == 1.0 for s in [0, *restarts])


@pytest.mark.parametrize(("mode", "peaks"), [("triangular", [1.0, 1.0, 1.0]),
                                              ("triangular2", [1.0, 0.55, 0.325]),
                                              ("exp_range", [0.1 + 0.9 * 0.5, 0.1 + 0.9 * 0.5 ** 3,
                                                             0.1 + 0.9 * 0.5 ** 5])])
def test_cyclic_peaks_and_troughs(mode, peaks):
    cfg = {"name": "cyclic", "half_cycle_epochs": 1, "base_lr_fraction": 0.1, "mode": mode,
           **({"gamma": 0.5} if mode == "exp_range" else {})}
    lrs = lrs_of(cfg, 4, 6)
    assert [lrs[0], lrs[8], lrs[16]] == pytest.approx([0.1, 0.1, 0.1])  # troughs: every 2 half-cycles
    assert [lrs[4], lrs[12], lrs[20]] == pytest.approx(peaks)  # peaks: in between
    if mode == "triangular":
        assert lrs[2] == pytest.approx(0.55) and lrs[6] == pytest.approx(0.55)  # straight lines up and down


@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_onecycle_start_peak_end(strategy):
    """Its progress runs from 0 at the first step to 1 at the last (as torch's OneCycleLR): the run's last step uses
    the final lr, lr / (div_factor * final_div_factor). It reached 1 one step after the run, so the last step was
    3.5x above it in a 600-step run and 175x in an 84-step one."""
    cfg = {"name": "onecycle", "pct_start": 0.3, "div_factor": 25.0, "final_div_factor": 1e4,
           "anneal_strategy": strategy}
    lrs = lrs_of(cfg, 10, 10, lr=0.5)  # 100 steps, optimizer.lr is the max
    end = 0.5 / (25 * 1e4)
    assert lrs[0] == pytest.approx(0.5 / 25) and lrs[99] == pytest.approx(end)
    assert max(lrs) == lrs[30] and lrs[30] == pytest.approx(0.5, rel=0.005)  # the peak at progress 0.3 = step 29.7
    shape = (lambda pct: 0.5 * (1 - math.cos(math.pi * pct))) if strategy == "cos" else (lambda pct: pct)
    expected = [0.5 / 25 + (0.5 - 0.5 / 25) * shape(s / 99 / 0.3) if s / 99 < 0.3
                else 0.5 + (end - 0.5) * shape((s / 99 - 0.3) / 0.7) for s in range(100)]
    assert lrs == pytest.approx(expected)
    assert lrs[64] == pytest.approx((0.5 + end) / 2, rel=0.05)  # about halfway down
    torch_lrs = []  # torch's own, stepped per step: the same end points, a peak one step earlier (29, at pct * 100 - 1)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    ocl = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.5, total_steps=100, pct_start=0.3,
                                              anneal_strategy=strategy, div_factor=25.0, final_div_factor=1e4)
    for _ in range(100):
        torch_lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if len(torch_lrs) < 100:
            ocl.step()
    assert (torch_lrs[0], torch_lrs[99]) == pytest.approx((lrs[0], lrs[99]))
    assert max(abs(a - b) for a, b in zip(lrs, torch_lrs)) < 0.03 * 0.5  # 2 % of the peak, at the rise


def test_plateau_reduces_after_exactly_patience_epochs_without_improvement_min():
    cfg = {"name": "plateau", "factor": 0.5, "patience": 2, "min_delta": 0.0, "min_lr_fraction": 0.0}
    metrics = [1.0, 0.9, 0.9, 0.9, 0.95, 0.8, 0.8, 0.8, 0.8, 0.8]
    lrs = lrs_of(cfg, 3, 10, metrics=metrics)
    per_epoch = [lrs[3 * e] for e in range(10)]
    # bad epochs: 3, 4 -> reduce after epoch 4; 5 bad, 6 improves; 7, 8 bad -> reduce; 9, 10 bad -> reduce
    assert per_epoch == [1.0] * 4 + [0.5] * 4 + [0.25] * 2
    assert lrs[3 * 4 - 1] == 1.0  # the reduction takes effect at the next epoch's first step


def test_plateau_respects_mode_max_min_delta_and_floor():
    metrics = [0.5, 0.6, 0.6, 0.9, 0.9, 0.9, 0.9, 0.9]
    cfg = {"name": "plateau", "factor": 0.1, "patience": 1, "min_delta": 0.0, "min_lr_fraction": 0.005}
    per_epoch = lrs_of(cfg, 2, 8, metrics=metrics, mode="max")[::2]
    # max: 0.6 improves, 0.6 again does not -> reduce; 0.9 improves; then every epoch reduces, floored at 0.005
    assert per_epoch == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.005, 0.005])
    per_epoch_min = lrs_of(cfg, 2, 8, metrics=metrics, mode="min")[::2]
    assert per_epoch_min == pytest.approx([1.0, 1.0, 0.1, 0.01, 0.005, 0.005, 0.005, 0.005])
    delta = {**cfg, "min_delta": 0.2, "min_lr_fraction": 0.0}  # +0.1 is no improvement; +0.3 is
    metrics = [0.5, 0.6, 0.9, 0.9, 0.9]
    assert lrs_of(delta, 2, 5, metrics=metrics, mode="max")[::2] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])


def test_plateau_counts_a_nan_metric_as_no_improvement():
    cfg = {"name": "plateau", "factor": 0.5, "patience": 1}
    assert lrs_of(cfg, 1, 4, metrics=[1.0, math.nan, 0.5, 0.6]) == [1.0, 1.0, 0.5, 0.5]


# --- warmup ------------------------------------------------------------------------------------------


def ramp(lr: float, warmup_steps: int) -> list[float]:
    return [lr * (k + 1) / warmup_steps for k in range(warmup_steps)]


def test_warmup_then_step_decay_counts_epochs_from_the_end_of_warmup():
    lrs = lrs_of({"name": "step", "warmup_epochs": 2, "step_epochs": 3, "gamma": 0.5}, 4, 10, lr=0.4)
    assert lrs[:8] == pytest.approx(ramp(0.4, 8))
    assert lrs[8:20] == pytest.approx([0.4] * 12)
    assert lrs[20:32] == pytest.approx([0.2] * 12)


def test_fractional_warmup_then_exponential():
    lrs = lrs_of({"name": "exponential", "warmup_epochs": 0.5, "k": 0.2}, 4, 3, lr=0.4)
    assert lrs[:2] == pytest.approx(ramp(0.4, 2))
    assert lrs[2:] == pytest.approx([0.4 * math.exp(-0.2 * j / 4) for j in range(10)])


def test_warmup_then_linear_runs_over_the_remaining_steps():
    lrs = lrs_of({"name": "linear", "warmup_epochs": 1, "min_lr_fraction": 0.0}, 4, 3, lr=0.4)
    assert lrs == pytest.approx(ramp(0.4, 4) + [0.4 * (1 - j / 8) for j in range(8)])


def test_warmup_then_cosine_restarts_and_onecycle():
    restarts = lrs_of({"name": "cosine_restarts", "warmup_epochs": 1, "period_epochs": 1, "period_mult": 1}, 4, 4)
    assert restarts[:4] == pytest.approx(ramp(1.0, 4))
    assert restarts[4] == restarts[8] == restarts[12] == 1.0
    # onecycle and cyclic start low: the warmup rises to where they start, not to the top (it reached the top, then
    # the lr fell 25x or 10x in one step and rose again)
    cycle = lrs_of({"name": "onecycle", "warmup_epochs": 1, "pct_start": 0.5}, 4, 5)
    assert cycle[:4] == pytest.approx(ramp(1 / 25, 4)) and cycle[4] == pytest.approx(1 / 25)
    assert max(cycle) == pytest.approx(1.0, rel=0.02) and cycle[-1] == pytest.approx(1 / (25 * 1e4))
    assert all(b >= a for a, b in zip(cycle, cycle[1:11]))  # one rise, warmup and cycle together
    triangle = lrs_of({"name": "cyclic", "warmup_epochs": 1, "half_cycle_epochs": 1, "base_lr_fraction": 0.1}, 4, 3)
    assert triangle[:4] == pytest.approx(ramp(0.1, 4)) and triangle[4] == pytest.approx(0.1)
    assert triangle[8] == pytest.approx(1.0)


def test_warmup_then_plateau_ignores_the_epochs_of_warmup():
    cfg = {"name": "plateau", "warmup_epochs": 2, "factor": 0.5, "patience": 1}
    lrs = lrs_of(cfg, 2, 5, metrics=[3.0, 1.0, 1.0, 1.0, 1.0])
    # epoch 1 ends inside warmup (ignored); epoch 2 sets the best; epochs 3, 4 are bad -> reduce after each
    assert lrs == pytest.approx(ramp(1.0, 4) + [1.0, 1.0, 0.5, 0.5, 0.25, 0.25])


# --- the scheduler object ------------------------------------------------------------------------------


def test_every_param_group_follows_the_schedule_and_get_last_lr_matches():
    optimizer, scheduler = make({"name": "exponential", "k": 1.0}, 2, 3, lr=0.3, groups=3)
    for step in range(1, 6):
        scheduler.step()
        expected = 0.3 * math.exp(-step / 2)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected] * 3)
        assert scheduler.get_last_lr() == pytest.approx([expected] * 3)


RESUME_CASES = {
    "cosine": {"name": "cosine", "warmup_epochs": 1, "min_lr_fraction": 0.1},
    "step": {"name": "step", "step_epochs": 2, "gamma": 0.5},
    "cosine_restarts": {"name": "cosine_restarts", "period_epochs": 1, "period_mult": 2},
    "cyclic": {"name": "cyclic", "half_cycle_epochs": 1.5, "mode": "triangular2"},
    "onecycle": {"name": "onecycle"},
    "plateau": {"name": "plateau", "warmup_epochs": 0.5, "factor": 0.5, "patience": 2},
}


@pytest.mark.parametrize("name", RESUME_CASES)
def test_state_dict_round_trip_resumes_identically(name):
    cfg, spe, epochs = RESUME_CASES[name], 3, 8
    metrics = [1.0, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.6]

    def run(scheduler: schedules.Scheduler, optimizer: torch.optim.Optimizer, steps: range) -> list[float]:
        out = []
        for step in steps:
            out.append(optimizer.param_groups[0]["lr"])
            scheduler.step()
            if (step + 1) % spe == 0:
                scheduler.epoch_end(metrics[step // spe])
        return out

    optimizer, scheduler = make(cfg, spe, epochs)
    uninterrupted = run(scheduler, optimizer, range(spe * epochs))
    optimizer, scheduler = make(cfg, spe, epochs)
    first = run(scheduler, optimizer, range(13))  # mid-run, mid-epoch, after one plateau reduction
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    optimizer, scheduler = make(cfg, spe, epochs)
    scheduler.load_state_dict(state)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(uninterrupted[13])
    assert first + run(scheduler, optimizer, range(13, spe * epochs)) == pytest.approx(uninterrupted)
    if name == "plateau":
        assert state["plateau"]["reductions"] == 1


# --- config errors ---------------------------------------------------------------------------------


def test_unknown_name_lists_every_valid_name():
    with pytest.raises(ConfigError, match=r"scheduler='cosin'.*choose one of none, cosine, step") as info:
        make({"name": "cosin"}, 4, 3)
    assert all(name in str(info.value) for name in SCHEDULER_OPTIONS)


@pytest.mark.parametrize(("cfg", "knob"), [
    ({"name": "step", "step_epoch": 10}, r"unexpected keyword scheduler\.step_epoch"),
    ({"name": "plateau", "gamma": 0.5}, r"unexpected keyword scheduler\.gamma"),
    ({"name": "step", "gamma": -0.5}, r"scheduler\.gamma=-0\.5: must be > 0"),
    ({"name": "multistep", "milestones": [20, 10]}, r"scheduler\.milestones=\[20, 10\]"),
    ({"name": "cyclic", "mode": "sawtooth"}, r"scheduler\.mode='sawtooth': must be one of triangular"),
    ({"name": "onecycle", "anneal_strategy": "cosine"}, r"scheduler\.anneal_strategy='cosine'"),
    ({"name": "onecycle", "pct_start": 1.0}, r"scheduler\.pct_start=1\.0"),
    ({"name": "plateau", "patience": 0}, r"scheduler\.patience=0"),
    ({"name": "cosine_restarts", "period_mult": 0.5}, r"scheduler\.period_mult=0\.5: must be >= 1"),
    ({"name": "exponential", "k": "fast"}, r"scheduler\.k='fast'"),
])
def test_bad_knob_raises_config_error_naming_it(cfg, knob):
    with pytest.raises(ConfigError, match=knob):
        make(cfg, 4, 3)


def test_bad_mode_raises():
    with pytest.raises(ConfigError, match=r"early_stopping\.mode='up'"):
        make({"name": "plateau"}, 4, 3, mode="up")


# --- the YAML options --------------------------------------------------------------------------------


def test_every_listed_schedule_has_a_yaml_option():
    assert SCHEDULER_OPTIONS == sorted(schedules.SCHEDULES)


@pytest.mark.parametrize("name", SCHEDULER_OPTIONS)
def test_yaml_option_composes_builds_and_documents_every_knob(name):
    cfg = compose_train([f"scheduler={name}"])
    assert cfg.scheduler.name == name
    assert set(cfg.scheduler) == {"name", "warmup_epochs", *schedules.knobs_of(name)}  # every knob, no others
    text = (CONF_DIR / "scheduler" / f"{name}.yaml").read_text()
    knob_lines = [line for line in text.splitlines() if line and not line.startswith(("#", "name:"))]
    assert all("  # " in line for line in knob_lines), "every knob has a comment giving its unit"
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler = schedules.build_scheduler(cfg.scheduler, optimizer, 10, cfg.trainer.max_epochs,
                                          "min")
    lrs = []
    for _ in range(10 * cfg.trainer.max_epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert all(0 < lr <= 0.1 + 1e-12 for lr in lrs)
    # a one-epoch run of two steps (the smallest run the other tests train) builds too
    schedules.build_scheduler(cfg.scheduler, optimizer, 2, 1, "min").step()


# --- dry run -----------------------------------------------------------------------------------------


def test_dry_run_csv_equals_lr_curve(tmp_path, capsys):
    cfg = compose_train(["scheduler=step", "scheduler.step_epochs=1", "trainer.max_epochs=3", "data.batch_size=256"])
    curve = lr_curve(cfg)
    spe = len(curve) // 3
    assert len(curve) == 3 * spe and spe == (1797 - round(0.2 * 1797) - round(0.1 * (1797 - round(0.2 * 1797)))) // 256
    assert curve == pytest.approx([0.1 * 0.5 ** (s // spe) for s in range(len(curve))])
    path = dry_run(cfg, tmp_path / "out")
    assert path == tmp_path / "out" / "lr_curve.csv"
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in rows] == curve
    assert [int(r["step"]) for r in rows] == list(range(len(curve)))
    assert [int(r["epoch"]) for r in rows] == [s // spe + 1 for s in range(len(curve))]
    out = capsys.readouterr().out
    assert f"wrote {path}\n" in out and any(ch in out for ch in "▁█")  # the path on one line, whatever its length
    png = tmp_path / "out" / "lr_curve.png"
    assert png.is_file() == (importlib.util.find_spec("matplotlib") is not None) == (f"wrote {png}\n" in out)
    assert "epochs done" in out  # the table's positions count from 0, lr_curve.csv's epochs from 1


def test_dry_run_names_the_snapshot_epochs_at_the_lowest_lr_of_each_cycle(tmp_path, capsys):
    cfg = compose_train(["scheduler=cosine_restarts", "scheduler.period_epochs=2", "scheduler.period_mult=2",
                         "trainer.max_epochs=6", "checkpoint.snapshots=cycles", "data.batch_size=512"])
    dry_run(cfg, tmp_path / "out")
    out = " ".join(capsys.readouterr().out.split())  # the console wraps at its width
    curve, spe = lr_curve(cfg), 2  # 1294 training images in batches of 512
    assert len(curve) == 6 * spe
    lowest = [min(curve[:2 * spe]), min(curve[2 * spe:])]  # the cycles: epochs 1-2 and 3-6
    assert lowest == [curve[2 * spe - 1], curve[-1]]
    assert (f"snapshots (checkpoint.snapshots=cycles) at the end of epochs 2 (lr {lowest[0]:.3g}), "
            f"6 (lr {lowest[1]:.3g})") in out


def test_dry_run_of_plateau_shows_a_reduction_every_patience_epochs(capsys):
    cfg = compose_train(["scheduler=plateau", "scheduler.patience=2", "scheduler.factor=0.5", "trainer.max_epochs=7",
                         "data.batch_size=512"])
    curve = lr_curve(cfg)
    spe = len(curve) // 7
    # the constant metric: epoch 1 sets the best, epochs 2-3 and 4-5 and 6-7 are bad
    assert curve[::spe] == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_an_experiments_schedule_knob_left_by_another_scheduler_names_how_to_drop_it():
    """experiment=cifar10_fast sets scheduler.pct_start for its one-cycle; with scheduler=cosine it stays behind."""
    from trainlab.config import validate

    with pytest.raises(ConfigError, match=r"unexpected keyword scheduler.pct_start;.*goes with ~scheduler.pct_start"):
        validate(compose_train(["experiment=cifar10_fast", "scheduler=cosine"]))
    validate(compose_train(["experiment=cifar10_fast", "scheduler=cosine", "~scheduler.pct_start"]))


def test_warmup_and_momentum_ramp_count_the_epochs_own_steps_under_a_batch_size_schedule():
    """Epoch 1 has 2x the steps of the later ones (the batch doubles at epoch 2): a warmup of 3 epochs ended at epoch
    5, counted in epoch 1's steps. Training and the dry run build the same scheduler (Run.build, dry_run._curve)."""
    cfg = compose_train(["optimizer=momentum_schedule", "optimizer.momentum_warmup_epochs=3",
                         "scheduler.warmup_epochs=2.5", "data.batch_size=128", "data.batch_size_schedule=[[2,2]]",
                         "trainer.max_epochs=5"])
    curve = lr_curve(cfg)
    steps = [10, 5, 5, 5, 5]  # 1294 training images: 10 batches of 128, then 5 of 256
    assert len(curve) == sum(steps)
    warmup = 10 + 5 + 3  # two epochs and half of the third (2.5 steps, rounded to even)
    lr = cfg.optimizer.lr
    assert curve[warmup - 1] == pytest.approx(lr) and curve[warmup - 2] == pytest.approx(lr * (warmup - 1) / warmup)
    assert curve[warmup:] == pytest.approx([lr] * (len(curve) - warmup))
    assert schedules.steps_until(2.5, steps) == warmup and schedules.steps_until(7, steps) == 30  # all there are
    from trainlab.data import build_data, epoch_batch_sizes, epoch_steps, train_loader
    from trainlab.optim import build_optimizer

    loader = train_loader(cfg, build_data(cfg.data), torch.device("cpu"))
    assert epoch_batch_sizes(cfg.data, 5) == [128, 256, 256, 256, 256]
    assert epoch_steps(loader, epoch_batch_sizes(cfg.data, 5)) == steps
    assert (loader.batch_size, len(loader)) == (128, 10)  # left as it was
    optimizer = build_optimizer(cfg, nn.Linear(2, 2), steps_per_epoch=10, epoch_steps=steps)
    assert optimizer.param_groups[0]["momentum_warmup_steps"] == 10 + 5 + 5  # 3 epochs


def test_step_decay_with_a_fractional_period_decays_at_every_boundary_it_passes():
    """floor(33 / 2.2) is 14 in floating point: the 15th decay came an epoch late."""
    decays = [round(math.log(schedules.step_decay(e, 2.2, 0.5)) / math.log(0.5)) for e in range(60)]
    assert [e for e in range(1, 60) if decays[e] > decays[e - 1]] == [math.ceil(k * 2.2 - 1e-9)
                                                                      for k in range(1, 27)]
    assert decays[33] == 15 and decays[55] == 25


@pytest.mark.parametrize(("overrides", "message"), [
    (["scheduler=none", "scheduler.warmup_epochs=0.02"],
     "scheduler.warmup_epochs=0.02 is less than half of one of the 20 steps of epoch 1, so no step would warm up; "
     "give at least 0.05 (one step), or 0"),
    (["scheduler=cyclic", "scheduler.mode=exp_range", "scheduler.gamma=1.5"],
     "scheduler.gamma=1.5: exp_range scales each cycle's amplitude by gamma**epochs, so above 1 the peaks grow past "
     "optimizer.lr"),
    (["scheduler=cyclic", "scheduler.gamma=0.5"],  # the curve was triangular's, bit for bit
     "scheduler.gamma=0.5: only scheduler.mode=exp_range reads it, and mode=triangular would train without it"),
    (["scheduler=cyclic", "scheduler.mode=triangular2", "scheduler.gamma=0.9"],
     "scheduler.gamma=0.9: only scheduler.mode=exp_range reads it, and mode=triangular2"),
    (["optimizer=lbfgs", "finetune=low_lr"],  # training refuses it: so does the dry run, which builds its groups
     "optimizer=torch.optim.LBFGS takes one parameter group, so one learning rate"),
])
def test_the_dry_run_refuses_what_training_refuses(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        lr_curve(compose_train([*overrides, "trainer.max_epochs=4"]))


def test_a_first_cycle_longer_than_the_run_is_warned_of(caplog):
    caplog.set_level("WARNING", logger="trainlab")
    lr_curve(compose_train(["scheduler=cosine_restarts", "scheduler.period_epochs=50", "trainer.max_epochs=2"]))
    assert ("scheduler=cosine_restarts: its first cycle (scheduler.period_epochs=50) does not end within "
            "trainer.max_epochs=2, so the lr never restarts nor reaches its lowest value") in caplog.text
    caplog.clear()
    lr_curve(compose_train(["scheduler=cosine_restarts", "scheduler.period_epochs=2", "trainer.max_epochs=2"]))
    assert "does not end within" not in caplog.text


@pytest.mark.parametrize(("cfg", "max_epochs", "decays", "warning"), [
    ({"name": "step", "step_epochs": 5}, 5, 0,
     "scheduler=step: scheduler.step_epochs=5 is not reached within trainer.max_epochs=5 (epochs from the start), so "
     "the lr never decays"),
    ({"name": "step", "step_epochs": 5}, 6, 1, None),
    ({"name": "step", "step_epochs": 2.5, "warmup_epochs": 1}, 3, 0,
     "scheduler=step: scheduler.step_epochs=2.5 is not reached within trainer.max_epochs=3 (epochs, counted from the "
     "end of scheduler.warmup_epochs=1), so the lr never decays"),
    ({"name": "multistep", "milestones": [2, 4, 6], "warmup_epochs": 1}, 5, 1,
     "scheduler=multistep: scheduler.milestones [4, 6] are not reached within trainer.max_epochs=5 (milestone m decays "
     "the lr after m epochs, counted from the end of scheduler.warmup_epochs=1), so the lr decays 1 of 3 times"),
    ({"name": "multistep", "milestones": [2, 4]}, 4, 1,
     "scheduler=multistep: scheduler.milestones [4] are not reached within trainer.max_epochs=4"),
    ({"name": "multistep", "milestones": [2, 4]}, 5, 2, None),
])
def test_step_decays_the_run_never_reaches_are_warned_of(cfg, max_epochs, decays, warning, caplog):
    """A decay at epoch e applies from the step that starts epoch e + 1 (after e epochs, since warmup): milestone 20 of
    a 20-epoch run, like torch's MultiStepLR stepped per epoch, never trains a step."""
    caplog.set_level("WARNING", logger="trainlab")
    lrs = lrs_of(cfg, 3, max_epochs)
    after_warmup = lrs[3 * int(cfg.get("warmup_epochs", 0)):]
    assert len(set(after_warmup)) == decays + 1 and after_warmup[-1] == pytest.approx(0.5 ** decays if
                                                                                      cfg["name"] == "step" else
                                                                                      0.1 ** decays)
    if warning is None:
        assert "not reached" not in caplog.text
    else:
        assert warning in caplog.text and "raise trainer.max_epochs" in caplog.text


@pytest.mark.parametrize(("overrides", "refused"), [
    (["scheduler.patience=10"], True),  # early_stopping.patience is 10: the run stopped as plateau first reduced
    (["scheduler.patience=12"], True),
    (["scheduler.patience=12", "early_stopping.min_delta=0.01", "scheduler.min_delta=0.01"], True),
    (["scheduler.patience=9"], False),
    (["scheduler.patience=10", "early_stopping.enabled=false"], False),
    (["scheduler.patience=10", "scheduler.min_delta=0.01"], False),  # plateau's stricter rule may count ahead
])
def test_a_plateau_patience_early_stopping_always_ends_first_is_refused(overrides, refused):
    from trainlab.config import validate

    cfg = compose_train(["scheduler=plateau", *overrides])
    if not refused:
        validate(cfg)
        return
    with pytest.raises(ConfigError, match=re.escape(
            "early stopping (early_stopping.patience=10) ends the run by the epoch plateau would first lower the lr, "
            "so it never trains at a lower one; give scheduler.patience below early_stopping.patience")):
        validate(cfg)


def test_plateau_never_reduces_before_early_stopping_with_the_same_patience():
    """Why the refusal holds: with min_delta 0 plateau's count of bad epochs is early stopping's until the first
    reduction, so a reduction at patience >= early_stopping.patience comes with the stop or after it."""
    from trainlab.early_stopping import EarlyStopping

    metrics = [1.0, 0.9, 0.95, 0.85, 0.86, 0.86, 0.84, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    optimizer, scheduler = make({"name": "plateau", "patience": 4, "factor": 0.5}, 2, len(metrics))
    stopper = EarlyStopping(patience=4)
    for epoch, value in enumerate(metrics, start=1):
        scheduler.step()
        scheduler.step()
        scheduler.epoch_end(value)
        stopper.update(value, epoch)
        if stopper.should_stop:
            break
    assert epoch == 11 and scheduler.plateau.reductions == 1  # the one reduction came at the stop: no lower-lr step


# --- the momentum cycle (onecycle, cyclic: scheduler.cycle_momentum) ---------------------------------------------


def momentum_of(group: dict) -> float:
    """SGD's and RMSprop's momentum, the Adam family's beta1: the setting a cycle moves."""
    return group["betas"][0] if "betas" in group else group["momentum"]


OPTIMIZERS = {  # one of each kind torch's OneCycleLR and CyclicLR cycle: `momentum`, and beta1 of `betas`
    "sgd_momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99)),
}


def cycled(cfg: dict, optimizer: torch.optim.Optimizer, steps_per_epoch: int, max_epochs: int,
           stop: int | None = None) -> tuple[list[float], list[float], schedules.Scheduler]:
    """(lr, momentum) of every step as the loop reads them, the first `stop` steps (all of the run by default)."""
    scheduler = schedules.build_scheduler(OmegaConf.create(cfg), optimizer, steps_per_epoch, max_epochs)
    lrs, momenta = [], []
    for _ in range(steps_per_epoch * max_epochs if stop is None else stop):
        lrs.append(optimizer.param_groups[0]["lr"])
        momenta.append(momentum_of(optimizer.param_groups[0]))
        optimizer.step()
        scheduler.step()
    return lrs, momenta, scheduler


@pytest.mark.parametrize("strategy", ["cos", "linear"])
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_onecycle_momentum_is_torchs_onecyclelr_step_by_step(kind, strategy):
    """trainlab's peak sits at pct_start * (T - 1), torch's at pct_start * T - 1 (see test_onecycle_start_peak_end):
    torch given pct' = (pct_start * (T - 1) + 1) / T has trainlab's phases, and then every step's lr and momentum
    (SGD's momentum, Adam's beta1) agree with torch's own scheduler."""
    total, pct = 100, 0.3
    params = [nn.Parameter(torch.zeros(2))]
    ours = OPTIMIZERS[kind](params, 0.5)
    cfg = {"name": "onecycle", "pct_start": pct, "anneal_strategy": strategy, "base_momentum": 0.8,
           "max_momentum": 0.97}
    lrs, momenta, _ = cycled(cfg, ours, 10, 10)
    theirs = OPTIMIZERS[kind]([nn.Parameter(torch.zeros(2))], 0.5)
    ocl = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=0.5, total_steps=total,
                                              pct_start=(pct * (total - 1) + 1) / total, anneal_strategy=strategy,
                                              base_momentum=0.8, max_momentum=0.97)
    torch_lrs, torch_momenta = [], []
    for step in range(total):
        torch_lrs.append(theirs.param_groups[0]["lr"])
        torch_momenta.append(momentum_of(theirs.param_groups[0]))
        theirs.step()
        if step < total - 1:
            ocl.step()
    assert max(abs(a - b) for a, b in zip(momenta, torch_momenta)) < 1e-9
    assert max(abs(a - b) for a, b in zip(lrs, torch_lrs)) < 1e-9
    assert momenta[0] == momenta[-1] == pytest.approx(0.97) and min(momenta) == pytest.approx(0.8, abs=1e-3)
    assert momenta.index(min(momenta)) == lrs.index(max(lrs)) == 30  # inverse to the lr: lowest at its peak
    if kind == "adam":
        assert ours.param_groups[0]["betas"][1] == 0.99  # beta2 is left alone


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_cyclic_momentum_is_torchs_cycliclr_step_by_step(kind, mode):
    """torch's CyclicLR with step_size_up = half_cycle_epochs * steps_per_epoch; its exp_range gamma is per step,
    trainlab's per epoch. triangular2 and exp_range scale the momentum's amplitude as the lr's."""
    spe, epochs, half_cycle, gamma = 4, 9, 1.5, 0.8
    ours = OPTIMIZERS[kind]([nn.Parameter(torch.zeros(2))], 1.0)
    cfg = {"name": "cyclic", "half_cycle_epochs": half_cycle, "base_lr_fraction": 0.1, "mode": mode,
           **({"gamma": gamma} if mode == "exp_range" else {})}
    lrs, momenta, _ = cycled(cfg, ours, spe, epochs)
    theirs = OPTIMIZERS[kind]([nn.Parameter(torch.zeros(2))], 1.0)
    clr = torch.optim.lr_scheduler.CyclicLR(theirs, base_lr=0.1, max_lr=1.0, step_size_up=round(half_cycle * spe),
                                            mode=mode, gamma=gamma ** (1 / spe), cycle_momentum=True,
                                            base_momentum=0.85, max_momentum=0.95)
    torch_lrs, torch_momenta = [], []
    for _ in range(spe * epochs):
        torch_lrs.append(theirs.param_groups[0]["lr"])
        torch_momenta.append(momentum_of(theirs.param_groups[0]))
        theirs.step()
        clr.step()
    assert max(abs(a - b) for a, b in zip(momenta, torch_momenta)) < 1e-9
    assert max(abs(a - b) for a, b in zip(lrs, torch_lrs)) < 1e-9
    assert [momenta[0], momenta[12], momenta[24]] == pytest.approx([0.95] * 3)  # the troughs of the lr
    peaks = {"triangular": [0.85] * 3, "triangular2": [0.85, 0.9, 0.925],
             "exp_range": [0.95 - 0.1 * gamma ** 1.5, 0.95 - 0.1 * gamma ** 4.5, 0.95 - 0.1 * gamma ** 7.5]}[mode]
    assert [momenta[6], momenta[18], momenta[30]] == pytest.approx(peaks)


def test_the_momentum_holds_max_momentum_through_warmup_then_follows_the_lrs_clock():
    """During scheduler.warmup_epochs the lr rises to the cycle's start, its lowest: the momentum stays at the cycle's
    start, max_momentum (a ramp like the lr's would start it near 0); then the cycle runs on the lr's own clock."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0, momentum=0.9)
    lrs, momenta, _ = cycled({"name": "onecycle", "warmup_epochs": 1, "pct_start": 0.6}, optimizer, 4, 5)
    assert lrs[:4] == pytest.approx(ramp(1 / 25, 4)) and momenta[:4] == [0.95] * 4
    assert momenta[4:] == pytest.approx([schedules.onecycle_momentum(j / 15, 0.6) for j in range(16)])
    assert momenta.index(min(momenta)) == lrs.index(max(lrs)) == 4 + 9  # progress 0.6 of the 16 steps after warmup
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=1.0)
    lrs, momenta, _ = cycled({"name": "cyclic", "warmup_epochs": 1, "half_cycle_epochs": 1}, optimizer, 4, 3)
    assert momenta[:5] == [0.95] * 5 and momenta[8] == pytest.approx(0.85) and lrs[8] == pytest.approx(1.0)


def test_cycle_momentum_false_leaves_the_momentum_and_the_lr_as_they_were():
    cfg = {"name": "onecycle", "cycle_momentum": False}
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0, momentum=0.9)
    lrs, momenta, scheduler = cycled(cfg, optimizer, 10, 3)
    assert momenta == [0.9] * 30 and scheduler.momentum is None and len(scheduler._momenta) == 0
    assert scheduler.get_last_momentum() is None
    cycled_lrs, cycled_momenta, _ = cycled({"name": "onecycle"}, torch.optim.SGD(
        [nn.Parameter(torch.zeros(2))], lr=1.0, momentum=0.9), 10, 3)
    assert cycled_lrs == lrs and min(cycled_momenta) < 0.86  # the lr is the same either way


@pytest.mark.parametrize("name", ["onecycle", "cyclic"])
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_a_resumed_scheduler_restores_the_cycled_momentum(name, kind):
    """The momentum comes from the scheduler's step count: a fresh optimizer (at its own momentum, which the cycle's
    start then overwrites) under a loaded scheduler gets the checkpoint's step's momentum, and continues as the
    uninterrupted run."""
    cfg, spe, epochs = {"name": name, "half_cycle_epochs": 1} if name == "cyclic" else {"name": name}, 3, 8
    _, uninterrupted, _ = cycled(cfg, OPTIMIZERS[kind]([nn.Parameter(torch.zeros(2))], 1.0), spe, epochs)
    _, first, scheduler = cycled(cfg, OPTIMIZERS[kind]([nn.Parameter(torch.zeros(2))], 1.0), spe, epochs, stop=13)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    optimizer = OPTIMIZERS[kind]([nn.Parameter(torch.zeros(2))], 1.0)
    resumed = schedules.build_scheduler(OmegaConf.create(cfg), optimizer, spe, epochs)
    assert momentum_of(optimizer.param_groups[0]) == 0.95 != pytest.approx(uninterrupted[13])  # the cycle's start
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert momentum_of(optimizer.param_groups[0]) == pytest.approx(uninterrupted[13])
    rest = []
    for _ in range(13, spe * epochs):
        rest.append(momentum_of(optimizer.param_groups[0]))
        resumed.step()
    assert first + rest == pytest.approx(uninterrupted)


@pytest.mark.parametrize(("optimizer", "has"), [
    (lambda params: torch.optim.SGD(params, lr=0.1), "SGD has momentum 0 (optimizer.momentum); pick optimizer=momentum"),
    (lambda params: torch.optim.RMSprop(params, lr=0.1), "RMSprop has momentum 0 (optimizer.momentum)"),
    (lambda params: torch.optim.Adagrad(params, lr=0.1), "Adagrad has no momentum; pick optimizer=momentum"),
    (lambda params: torch.optim.LBFGS(params, lr=0.1), "LBFGS has no momentum"),
])
def test_momentum_knobs_with_an_optimizer_without_momentum_are_refused(optimizer, has):
    cfg = {"name": "onecycle", "base_momentum": 0.8}
    with pytest.raises(ConfigError, match=re.escape(
            f"scheduler.cycle_momentum=true with scheduler.base_momentum=0.8 needs an optimizer with momentum, and "
            f"{has}")) as info:
        schedules.build_scheduler(OmegaConf.create(cfg), optimizer([nn.Parameter(torch.zeros(2))]), 4, 3)
    assert "or set scheduler.cycle_momentum=false and drop the momentum knobs to cycle the lr alone" in str(info.value)


@pytest.mark.parametrize("name", ["onecycle", "cyclic"])
def test_at_the_default_knobs_an_optimizer_without_momentum_cycles_the_lr_alone_and_says_so(name, caplog):
    """`train scheduler=onecycle` with the default optimizer=sgd (momentum 0) trains as before: torch's OneCycleLR
    would cycle a momentum of 0.85-0.95 into it, turning on a heavy ball the config never asked for."""
    caplog.set_level("WARNING", logger="trainlab")
    cfg = compose_train([f"scheduler={name}", "trainer.max_epochs=3"])
    assert cfg.optimizer._target_ == "torch.optim.SGD" and "momentum" not in cfg.optimizer
    curve = lr_curve(cfg)
    assert (f"scheduler={name}: SGD has momentum 0 (optimizer.momentum), so only the lr cycles (scheduler."
            "cycle_momentum cycles a momentum, and never turns one on)") in caplog.text
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    lrs, momenta, _ = cycled(OmegaConf.to_container(cfg.scheduler), optimizer, len(curve) // 3, 3)
    assert lrs == pytest.approx(curve) and momenta == [0] * len(curve)
    caplog.clear()
    lr_curve(compose_train([f"scheduler={name}", "scheduler.cycle_momentum=false", "trainer.max_epochs=3"]))
    assert "only the lr cycles" not in caplog.text


def test_a_cycled_momentum_with_the_optimizers_momentum_ramp_is_refused():
    cfg = compose_train(["optimizer=momentum_schedule", "scheduler=onecycle", "trainer.max_epochs=2"])
    with pytest.raises(ConfigError, match=re.escape(
            "scheduler.cycle_momentum=true: scheduler=onecycle cycles the momentum inversely to the lr, and "
            "optimizer.momentum_start and momentum_warmup_epochs ramp it (optimizer=momentum_schedule); both would set "
            "it every step. Set scheduler.cycle_momentum=false to keep the ramp, or pick optimizer=momentum")):
        lr_curve(cfg)
    lr_curve(compose_train(["optimizer=momentum_schedule", "scheduler=onecycle", "scheduler.cycle_momentum=false",
                            "trainer.max_epochs=2"]))


@pytest.mark.parametrize(("cfg", "message"), [
    ({"name": "onecycle", "base_momentum": 0.96}, "scheduler.base_momentum=0.96 is above scheduler.max_momentum=0.95"),
    ({"name": "cyclic", "max_momentum": 1.0}, "scheduler.max_momentum=1.0: must be in [0, 1)"),
    ({"name": "cyclic", "cycle_momentum": "yes"}, "scheduler.cycle_momentum='yes': must be true or false"),
    ({"name": "onecycle", "cycle_momentum": False, "max_momentum": 0.99},
     "scheduler.max_momentum=0.99: only scheduler.cycle_momentum=true reads it, and cycle_momentum=false would train "
     "without"),
    ({"name": "cosine", "cycle_momentum": True}, "unexpected keyword scheduler.cycle_momentum"),
])
def test_bad_momentum_knobs_are_refused_before_any_data_is_loaded(cfg, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        schedules.parse(OmegaConf.create(cfg))


def test_the_dry_run_writes_the_cycled_momentum_beside_the_lr(tmp_path, capsys):
    cfg = compose_train(["optimizer=adam", "scheduler=onecycle", "trainer.max_epochs=3", "data.batch_size=256"])
    path = dry_run(cfg, tmp_path / "out")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    lrs, momenta = [float(r["lr"]) for r in rows], [float(r["momentum"]) for r in rows]
    total = len(rows)
    assert momenta == pytest.approx([schedules.onecycle_momentum(s / (total - 1)) for s in range(total)])
    assert momenta.index(min(momenta)) == lrs.index(max(lrs))
    assert f"momentum {sparkline(momenta)}  0.851 .. 0.95" in capsys.readouterr().out
    dry_run(compose_train(["scheduler=onecycle", "trainer.max_epochs=3"]), tmp_path / "plain")  # sgd: no momentum
    with (tmp_path / "plain" / "lr_curve.csv").open() as f:
        assert next(csv.reader(f)) == ["step", "epoch", "lr"]


def test_a_onecycle_run_with_momentum_trains_and_logs_the_cycled_momentum(train_inprocess, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    status, code, run = train_inprocess(["trainer.max_epochs=2", "logger.every_n_steps=5", "scheduler=onecycle",
                                         "optimizer=momentum"])
    assert (status, code) == ("completed", 0)
    assert run.summary["test"]["test/acc"] > 0.5
    assert run.optimizer.param_groups[0]["momentum"] == pytest.approx(0.95)  # the cycle's end (SGD's own is 0.9)
    events = EventAccumulator(str(run.run_dir), size_guidance={"scalars": 0})
    events.Reload()
    logged = [e.value for e in events.Scalars("momentum/all")]
    assert len(logged) == 2 * 20 // 5 and all(0.85 - 1e-6 <= m <= 0.95 + 1e-6 for m in logged)
    assert min(logged) < 0.87 and logged[-1] == pytest.approx(0.95)
