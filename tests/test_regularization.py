"""Regularization: penalties, clipping and weight averages against their definitions."""

from __future__ import annotations

import csv
import json
import types

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import compose_cfg
from trainlab.config import ConfigError, validate
from trainlab.early_stopping import EarlyStopping
from trainlab.optim import build_optimizer, decayed_parameters
from trainlab.regularization import ema_model, first_swa_epoch, gradient_clipper, penalty
from trainlab.run import Run


def _cfg(optimizer: str, lr: float, **reg) -> OmegaConf:
    return OmegaConf.create({
        "optimizer": {"_target_": f"torch.optim.{optimizer}", "_partial_": True, "lr": lr,
                      "decay_norm_and_bias": False},
        "regularization": {"dropout": 0.0, "weight_decay": reg.get("weight_decay", 0.0)},
    })


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _step(model: nn.Module, optimizer, l1: float = 0.0, l2: float = 0.0, steps: int = 3) -> None:
    x, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3
    decayed = decayed_parameters(optimizer)
    extra = penalty(decayed, l1, l2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        (loss + extra() if extra is not None else loss).backward()
        optimizer.step()


@pytest.mark.parametrize(("name", "lr", "same"), [("SGD", 0.1, True), ("Adam", 0.01, False)])
def test_l2_penalty_equals_decoupled_decay_for_sgd_but_not_for_adam(name, lr, same):
    coupled, decoupled = _model(), _model()
    _step(coupled, build_optimizer(_cfg(name, lr), coupled), l2=0.05)
    _step(decoupled, build_optimizer(_cfg(name, lr, weight_decay=0.05), decoupled))
    close = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(coupled.parameters(), decoupled.parameters()))
    assert close is same


def test_l1_penalty_adds_lambda_sign_w_to_the_gradient():
    model = _model()
    weights = [model[0].weight, model[2].weight]
    x, y = torch.randn(8, 5), torch.arange(8) % 3
    nn.functional.cross_entropy(model(x), y).backward()
    plain = [w.grad.clone() for w in weights]
    model.zero_grad()
    (nn.functional.cross_entropy(model(x), y) + penalty(weights, 0.3, 0.0)()).backward()
    for w, g in zip(weights, plain):
        assert torch.allclose(w.grad - g, 0.3 * torch.sign(w.detach()), atol=1e-6)


def test_l2_penalty_value_and_gradient():
    w = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    value = penalty([w], 0.0, 0.5)()
    assert value.item() == pytest.approx(0.25 * 14)
    value.backward()
    assert torch.allclose(w.grad, 0.5 * w.detach())
    assert penalty([w], 0.0, 0.0) is None


def test_grad_clip_by_norm_and_by_value():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([a, b], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0, 0.0])  # global norm 5
    gradient_clipper([a, b], optimizer, scaler, 1.0, None)()
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.0, 0.0])) and torch.allclose(b.grad[1], torch.tensor(0.8))
    a.grad, b.grad = torch.tensor([3.0, -0.2, 0.0]), torch.tensor([0.0, -4.0, 0.1, 0.0])
    gradient_clipper([a, b], optimizer, scaler, None, 0.5)()
    assert a.grad.tolist() == pytest.approx([0.5, -0.2, 0.0]) and b.grad.tolist() == pytest.approx([0, -0.5, 0.1, 0])
    assert gradient_clipper([a, b], optimizer, scaler, None, None) is None


def test_ema_equals_the_closed_form_average():
    model = nn.Linear(1, 1, bias=False)
    ema = ema_model(model, decay=0.9)
    expected = None
    for value in [1.0, 2.0, 4.0, 8.0]:
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update_parameters(model)
        expected = value if expected is None else 0.9 * expected + 0.1 * value  # the first update copies
        assert ema.module.weight.item() == pytest.approx(expected)
    assert expected == pytest.approx(0.9 * (0.9 * (0.9 * 1 + 0.2) + 0.4) + 0.8)


def test_ema_warmup_ramps_the_decay_so_the_first_weights_fade():
    model = nn.Linear(1, 1, bias=False)
    ema = ema_model(model, decay=0.99, warmup=True)
    expected = None
    for n, value in enumerate([1.0, 2.0, 4.0, 8.0, 16.0]):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update_parameters(model)
        decay = min(0.99, (1 + n) / (10 + n))  # n updates before this one
        expected = value if expected is None else decay * expected + (1 - decay) * value
        assert ema.module.weight.item() == pytest.approx(expected)
    assert ema_model(model, 0.99, warmup=True).decay_now() == 0.1 and ema.decay_now() == pytest.approx(6 / 15)
    assert ema_model(model, 0.5, warmup=True).decay_now() == 0.1  # min(decay, ramp)


def test_ema_warmup_in_a_short_run_tests_the_trained_weights_not_the_initial_ones(train_inprocess):
    """4 epochs of 20 steps: without warmup a 0.99 average still holds 0.99**80 = 45 % of the initial weights."""
    common = ["trainer.max_epochs=4", "regularization=ema"]
    _, _, plain = train_inprocess(common, name="plain")
    _, _, warm = train_inprocess([*common, "regularization.ema_warmup=true"], name="warm")
    assert warm.summary["test"]["test/loss"] < 0.5 * plain.summary["test"]["test/loss"]
    assert warm.ema.n_averaged == plain.ema.n_averaged > 0


def test_first_swa_epoch():
    assert first_swa_epoch(0.75, 4) == 4
    assert first_swa_epoch(0.75, 30) == 23
    assert first_swa_epoch(0.0, 5) == 1
    # 0.29 x 100 is 28.999999999999996: averaging started at epoch 29, one early (and 0.29 and 0.30 two apart)
    assert [first_swa_epoch(f, 100) for f in (0.29, 0.3, 0.57, 0.58)] == [30, 31, 58, 59]
    assert first_swa_epoch(0.58, 50) == 30 and first_swa_epoch(0.299, 100) == 30


def test_label_smoothing_reaches_the_training_loss(train_inprocess):
    _, _, run = train_inprocess(["trainer.max_epochs=1", "regularization=label_smoothing"])
    logits, y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    target = torch.full((4, 10), 0.1 / 10)
    target[torch.arange(4), y] += 0.9
    manual = -(target * logits.log_softmax(1)).sum(1).mean()
    assert run.loss_fn(logits, y).item() == pytest.approx(manual.item())


def test_ema_weights_are_evaluated_and_saved_as_best(train_inprocess, tmp_path):
    _, _, run = train_inprocess(["trainer.max_epochs=2", "regularization=ema"])
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)["model"]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    key = "1.weight"  # the first hidden layer's weight
    assert run.stopper.best_epoch == 2 == last["epoch"]
    assert torch.equal(best[key], last["ema"]["module." + key])  # best.pt holds the average ...
    assert not torch.equal(best[key], last["model"][key])  # ... not the raw weights
    assert last["ema"] is not None


def test_swa_runs_at_its_lr_averages_the_last_epochs_and_recomputes_batch_norm(train_inprocess, tmp_path):
    status, _, run = train_inprocess(["trainer.max_epochs=4", "regularization=swa",
                                      "regularization.swa_start=0.5"])
    assert status == "completed"
    with (tmp_path / "run" / "metrics.csv").open() as handle:
        lrs = [float(r["lr"]) for r in csv.DictReader(handle)]
    assert lrs == [0.1, 0.1, 0.05, 0.05]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["swa"]["epochs_averaged"] == 2 and summary["tested_weights"] == "swa.pt"
    swa = torch.load(tmp_path / "run" / "checkpoints" / "swa.pt", weights_only=True)["model"]
    raw = run.model  # holds the tested SWA weights now; compare with the last raw state instead
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert not torch.equal(swa["2.running_mean"], last["2.running_mean"])  # recomputed for the average
    assert torch.equal(raw.state_dict()["2.running_mean"], swa["2.running_mean"])
    # BN statistics of the average: one pass over the training data in train mode reproduces them.
    check = run.swa.module
    check.load_state_dict(swa)
    for m in check.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.reset_running_stats()
            m.momentum = None
    check.train()
    run.train_batches.set_epoch(0)
    with torch.no_grad():
        for x, _ in run.train_batches:
            check(x)
    assert torch.allclose(check.state_dict()["2.running_mean"], swa["2.running_mean"], atol=1e-5)


def test_an_swa_lr_far_from_the_optimizers_is_warned_of(train_inprocess, caplog):
    """The preset's absolute 0.05 is 50x Adam's 1e-3: its SWA epochs wrecked the model that the run then tested."""
    caplog.set_level("WARNING", logger="trainlab")
    train_inprocess(["optimizer=adam", "regularization=swa", "trainer.max_epochs=2", "logger.tensorboard=false"])
    assert "regularization.swa_lr=0.05 is 50x optimizer.lr=0.001: the SWA epochs train at that constant rate" in caplog.text
    caplog.clear()
    train_inprocess(["regularization=swa", "trainer.max_epochs=2", "logger.tensorboard=false"], name="sgd")
    assert "swa_lr" not in caplog.text  # 0.05 against SGD's 0.1


def test_an_swa_run_continues_only_where_its_average_does(train_inprocess, tmp_path):
    """An unfinished run whose SWA had begun, resumed with a longer trainer.max_epochs, went back to the schedule's
    lr for an epoch and then averaged again: swa.pt mixed two schedules. A finished run whose SWA averaged nothing
    (it stopped early first) was refused as if it had an average, after the refusal for its patience had said that
    raising it would do."""
    swa = ["regularization=swa", "regularization.swa_start=0.5", "logger.tensorboard=false"]
    status, _, _ = train_inprocess([*swa, "trainer.max_epochs=4"], name="four")
    assert status == "completed"
    epoch_3 = tmp_path / "four" / "checkpoints" / "last.prev.pt"  # epoch 3 of 4, unfinished: SWA averaged epoch 3
    status, code, run = train_inprocess([*swa, "trainer.max_epochs=8", f"checkpoint.resume={epoch_3}"], name="eight")
    assert (status, code) == ("failed", 2)
    assert "SWA has averaged epochs 3 to 3, and this config averages from epoch 5 (regularization.swa_start=0.5 of " \
           "trainer.max_epochs=8): one average cannot span two schedules" in run.summary["error"]
    status, _, run = train_inprocess([*swa, "trainer.max_epochs=5", f"checkpoint.resume={epoch_3}"], name="five")
    assert status == "completed" and run.summary["swa"]["epochs_averaged"] == 3  # from epoch 3 still: 3, 4, 5
    last = tmp_path / "four" / "checkpoints" / "last.pt"
    status, code, run = train_inprocess([*swa, "trainer.max_epochs=6", f"checkpoint.resume={last}"], name="six")
    assert (status, code) == ("failed", 2)
    assert "that run finished with SWA over 2 epoch(s)" in run.summary["error"]

    stalls = [*swa, "early_stopping.min_delta=10", "early_stopping.patience=1", "trainer.max_epochs=6"]
    status, _, run = train_inprocess(stalls, name="stalled")  # stops at epoch 2, before SWA's epoch 4
    assert status == "stopped_early" and "swa" not in run.summary
    stopped = tmp_path / "stalled" / "checkpoints" / "last.pt"
    status, code, run = train_inprocess([*stalls, f"checkpoint.resume={stopped}"], name="again")
    assert (status, code) == ("failed", 2) and "raise early_stopping.patience above 1" in run.summary["error"]
    status, _, run = train_inprocess([*stalls, "early_stopping.enabled=false", f"checkpoint.resume={stopped}"],
                                     name="on")
    assert status == "completed" and run.summary["swa"]["epochs_averaged"] == 3  # epochs 4 to 6


def test_decoupled_decay_at_lr_times_weight_decay_of_1_erases_the_weights_every_step():
    """Why lr * weight_decay >= 1 is refused: w *= 1 - lr * wd before each update, so at 0.1 x 10 every step starts
    from zero weights and leaves only -lr * g (above 1 it flips their sign); such a run completed at chance accuracy
    (test/acc 0.09)."""
    model = _model()
    optimizer = build_optimizer(_cfg("SGD", 0.1, weight_decay=10.0), model)
    x, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    for layer in (model[0], model[2]):
        assert torch.allclose(layer.weight, -0.1 * layer.weight.grad)


def test_coupled_l2_at_lr_times_l2_of_1_erases_the_weights_under_sgd_and_is_refused_there_only(train_inprocess):
    """The coupled penalty's gradient l2 * w under SGD: the first step (whatever the momentum, whose buffer starts at
    the gradient) takes w to w - lr * (g + l2 * w), zero weights plus -lr * g at lr * l2 = 1. Adam divides the
    penalty's gradient by its own scale, so the same l2 is a legitimate (if strong) penalty there: not refused."""
    model, cfg = _model(), _cfg("SGD", 0.1)
    cfg.optimizer.momentum = 0.9
    optimizer = build_optimizer(cfg, model)
    x, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3
    data_loss = nn.functional.cross_entropy(model(x), y)
    data_grads = torch.autograd.grad(data_loss, [model[0].weight, model[2].weight], retain_graph=True)
    penalty(decayed_parameters(optimizer), 0.0, 10.0)().add(data_loss).backward()
    optimizer.step()
    for layer, grad in zip((model[0], model[2]), data_grads):
        assert torch.allclose(layer.weight, -0.1 * grad, atol=1e-6)
    train_inprocess(["optimizer=adam", "regularization.l2=1000", "trainer.max_epochs=1", "logger.tensorboard=false"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["regularization.weight_decay=10"], r"regularization.weight_decay=10\.0: decoupled decay multiplies the weights "
     r"by 1 - lr \* weight_decay every step, and with optimizer.lr=0.1 that is 0: .* give regularization.weight_decay "
     r"below 1 / optimizer.lr = 10"),
    (["optimizer=adam", "regularization=swa", "regularization.weight_decay=20"],
     r"with regularization.swa_lr=0.05 that is 0: .* below 1 / regularization.swa_lr = 20"),
    (["regularization.l2=10"], r"regularization.l2=10\.0: under SGD the penalty's gradient l2 \* w multiplies the "
     r"weights by 1 - lr \* l2 every step, and with optimizer.lr=0.1 that is 0: .* give regularization.l2 below "
     r"1 / optimizer.lr = 10"),
    (["optimizer=nesterov", "regularization.l2=200"], r"regularization.l2=200\.0: under SGD .* that is -1"),
    (["regularization.l2=inf"], r"regularization.l2=inf: must be a finite number >= 0"),
    (["regularization.l1=inf"], r"regularization.l1=inf: must be a finite number >= 0"),
    (["regularization.weight_decay=inf"], r"regularization.weight_decay=inf: must be a finite number >= 0"),
    (["regularization.grad_clip_norm=inf"], r"regularization.grad_clip_norm=inf: must be a finite number > 0, or null"),
    (["regularization.grad_clip_value=inf"], r"regularization.grad_clip_value=inf: must be a finite number > 0"),
    (["regularization=swa", "regularization.swa_lr=inf"], r"regularization.swa_lr=inf: must be a finite number > 0"),
    (["early_stopping.min_delta=inf"], r"early_stopping.min_delta=inf: must be a finite number >= 0"),
    (["early_stopping.monitor=val/acc", "early_stopping.min_delta=1"],
     r"early_stopping.min_delta=1\.0: val/acc is a fraction in \[0, 1\], so no epoch can improve on the first by "
     r"1 or more: .* e.g. 0.005"),
])
def test_regularization_and_early_stopping_values_that_cannot_work_are_refused(overrides, message):
    """Each was accepted: inf penalties and swa_lr diverged (exit 3), inf clipping did nothing, and an inf min_delta,
    or a min_delta of 1 on an accuracy, kept epoch 1's weights as best.pt (test/acc 0.947 against 0.98)."""
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg(overrides))


def test_weight_decay_below_one_over_lr_and_a_fractional_min_delta_are_accepted():
    validate(compose_cfg(["regularization.weight_decay=5"]))  # 0.1 x 5 = 0.5: strong, but it trains
    validate(compose_cfg(["early_stopping.monitor=val/acc", "early_stopping.min_delta=0.005"]))
    validate(compose_cfg(["early_stopping.min_delta=1"]))  # a loss can drop by more than 1


def test_early_stopping_reason_counts_one_epoch_in_the_singular():
    stopper = EarlyStopping(patience=1)
    stopper.update(1.0, 1)
    stopper.update(2.0, 2)
    assert stopper.reason() == ("early stopping: val/loss did not improve by more than 0 for 1 epoch "
                                "(best 1 at epoch 1)")


def test_extending_a_completed_run_past_a_lower_patience_does_not_say_it_stopped_early(tmp_path):
    """A 2-epoch run that completed (its epoch 2 no better, patience 3), extended with patience 1, was refused with
    'that run stopped early at epoch 2': it never stopped early."""
    saved = EarlyStopping(patience=3)
    saved.update(0.5, 1)
    saved.update(0.6, 2)
    state = {"epoch": 2, "finished": True, "early_stopping": saved.state_dict()}
    run = types.SimpleNamespace(cfg=compose_cfg(["trainer.max_epochs=10", "early_stopping.patience=1"]),
                                stopper=EarlyStopping(patience=1), swa=None)
    with pytest.raises(ConfigError) as refused:
        Run.check_continuable(run, tmp_path / "last.pt", state)
    assert "stopped early" not in str(refused.value)
    assert ("that run completed its 2 epochs, the last 1 without improvement, and early_stopping.patience=1 ends it "
            "there; raise early_stopping.patience above 1") in str(refused.value)
    saved.update(0.7, 3)
    saved.patience = 2  # a run that did stop early (epochs 2 and 3 no better, patience 2) still says so
    state = {"epoch": 3, "finished": True, "early_stopping": saved.state_dict()}
    run.cfg = compose_cfg(["trainer.max_epochs=10", "early_stopping.patience=2"])
    run.stopper = EarlyStopping(patience=2)
    with pytest.raises(ConfigError, match="that run stopped early at epoch 3"):
        Run.check_continuable(run, tmp_path / "last.pt", state)
