"""The fast path: memory format, threads, fused kernels, compile, sync-free metrics and EMA."""

from __future__ import annotations

import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import compose_cfg
from trainlab.config import ConfigError, validate
from trainlab.device import autocast_for, compiled, configure_backends, uses_channels_last
from trainlab.loop import EpochTotals, StepParts, train_one_epoch
from trainlab.optim import build_optimizer, fast_kernels, load_optimizer_state
from trainlab.regularization import ema_model


def conv_weights(run) -> list[torch.Tensor]:
    return [m.weight for m in run.model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("choice, expected", [("auto", True), ("true", True), ("false", False)])
def test_channels_last_for_conv_models(train_inprocess, choice, expected):
    status, _, run = train_inprocess(["model=cnn", "model.depth=8", "data=synthetic", "data.num_samples=200",
                                      "data.shape=[3,8,8]", "trainer.max_epochs=1", f"trainer.channels_last={choice}"])
    assert status == "completed" and run.channels_last is expected
    weights = conv_weights(run)
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) == expected for w in weights)


def test_channels_last_auto_leaves_an_mlp_alone():
    cfg = compose_cfg([])
    assert uses_channels_last(cfg.trainer, nn.Sequential(nn.Flatten(), nn.Linear(4, 2))) is False
    assert uses_channels_last(compose_cfg(["trainer.channels_last=true"]).trainer, nn.Linear(4, 2)) is True


def test_threads_are_set_from_the_config():
    before = torch.get_num_threads()
    try:
        assert configure_backends(compose_cfg(["trainer.threads=1"]).trainer, torch.device("cpu")) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


FUSED_ON_CPU = [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad]


def test_fused_kernels_wherever_the_device_has_them_and_the_config_did_not_choose():
    on_cpu, on_meta = [torch.zeros(1)], [torch.zeros(1, device="meta")]
    on_gpu = [SimpleNamespace(device=torch.device("cuda"))]
    for cls in FUSED_ON_CPU:
        assert fast_kernels(cls, {}, on_cpu) == {"fused": True}, cls
        assert fast_kernels(cls, {}, on_gpu) == {"fused": True}, cls
    assert fast_kernels(torch.optim.Adam, {}, on_meta) == {}  # no fused kernels for that device type
    assert fast_kernels(torch.optim.LBFGS, {}, on_cpu) == {}  # no fused kernel
    assert fast_kernels(torch.optim.RMSprop, {}, on_cpu) == {}
    assert fast_kernels(torch.optim.Adam, {"foreach": True}, on_gpu) == {}  # the config's own choice wins
    assert fast_kernels(torch.optim.Adam, {"fused": False}, on_cpu) == {}
    assert fast_kernels(torch.optim.Adam, {}, []) == {}


@pytest.mark.parametrize("name", ["momentum", "nesterov", "adam", "adamw", "adagrad"])
def test_train_builds_fused_optimizers_on_cpu_unless_told_not_to(name):
    model = nn.Linear(4, 2)
    picked = build_optimizer(compose_cfg([f"optimizer={name}"]), model)
    default = build_optimizer(compose_cfg([f"optimizer={name}", "+optimizer.fused=false"]), model)
    assert picked.param_groups[0]["fused"] is True
    assert not default.param_groups[0]["fused"]


@pytest.mark.parametrize("cls, options", [
    (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "nesterov": True}),
    (torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
])
def test_fused_cpu_updates_agree_with_the_per_tensor_ones(cls, options):
    # a quadratic bowl whose gradients stay far from zero, where rounding differences cannot grow
    target, curvature = torch.linspace(-3, 3, 50), torch.linspace(0.5, 1.5, 50)
    weights = []
    for kernels in ({}, {"fused": True}):
        w = torch.zeros(50, requires_grad=True)
        optimizer = cls([w], **options, **kernels)
        for _ in range(100):
            optimizer.zero_grad()
            ((w - target) ** 2 * curvature).sum().backward()
            optimizer.step()
        weights.append(w.detach())
    assert not torch.equal(weights[0], torch.zeros(50))
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)


def test_a_resumed_optimizer_keeps_the_kernels_it_was_built_with():
    model = nn.Linear(4, 2)
    saved = torch.optim.Adam(model.parameters(), lr=0.1)  # e.g. saved where no fused kernel was picked
    model(torch.ones(1, 4)).sum().backward()
    saved.step()
    resumed = torch.optim.Adam(model.parameters(), lr=0.5, fused=True)
    load_optimizer_state(resumed, saved.state_dict())
    assert resumed.param_groups[0]["fused"] is True and resumed.param_groups[0]["foreach"] is None
    assert resumed.param_groups[0]["lr"] == 0.1  # everything else comes from the checkpoint
    assert torch.equal(resumed.state[model.weight]["exp_avg"], saved.state[model.weight]["exp_avg"])
    resumed.step()  # the fused kernel takes the restored state


@pytest.mark.parametrize("key, value", [("trainer.compile", "fast"), ("trainer.channels_last", "maybe"),
                                        ("trainer.threads", "0")])
def test_invalid_fast_path_values_are_refused(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg([f"{key}={value}"]))


def test_compile_false_is_the_model_itself():
    model = nn.Linear(2, 2)
    assert compiled(model, "false") is model
    assert compiled(model, False) is model  # YAML's false


def test_compile_true_is_the_default_mode(monkeypatch):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode: modes.append(mode) or model)
    validate(compose_cfg(["trainer.compile=true"]))
    compiled(nn.Linear(2, 2), True)
    compiled(nn.Linear(2, 2), "max-autotune")
    assert modes == ["default", "max-autotune"]


def test_autocast_only_for_bf16_and_fp16():
    cpu = torch.device("cpu")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    assert isinstance(autocast_for(cpu, "fp32"), nullcontext)  # fp32: no autocast state to set and restore
    with autocast_for(cpu, "fp32"):
        assert (a @ b).dtype == torch.float32
    with autocast_for(cpu, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    assert autocast_for(cpu, "fp16").fast_dtype == torch.float16


def test_fold_counts_ties_like_argmax_and_names_the_first_nonfinite_step():
    totals = EpochTotals()
    tie = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])  # argmax takes the first maximum: classes 0 and 1
    totals.record(1, torch.tensor(0.25), tie, torch.tensor([0, 2]))
    totals.record(2, torch.tensor(float("nan")), tie, torch.tensor([1, 1]))
    totals.record(3, torch.tensor(float("inf")), tie, torch.tensor([0, 1]))
    totals.record(4, torch.tensor(0.5), torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([2]))
    assert totals.fold(torch.tensor(7.0), torch.tensor(2.0, dtype=torch.bfloat16)) == [7.0, 2.0]
    assert totals.correct == 1 + 1 + 2 + 1 and totals.seen == 7
    assert totals.nonfinite is not None and totals.nonfinite[0] == 2 and math.isnan(totals.nonfinite[1])
    assert math.isnan(totals.loss_sum) and not (totals.losses or totals.outputs or totals.targets)
    assert totals.fold(torch.tensor(3.0)) == [3.0]  # nothing pending: only the extra values


def _fixed_batches(n_batches: int, batch: int, soft: bool = False):
    g = torch.Generator().manual_seed(0)
    for _ in range(n_batches):
        x = torch.randn(batch, 5, generator=g)
        y = torch.randint(0, 3, (batch,), generator=g)
        yield x, (F.one_hot(y, 3).float() * 0.8 + 0.2 / 3 if soft else y)


@pytest.mark.parametrize("soft", [False, True])
def test_epoch_metrics_and_intervals_match_a_direct_computation(soft):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put: the metrics can be recomputed
    intervals = []
    result = train_one_epoch(model, list(_fixed_batches(7, 8, soft)), nn.CrossEntropyLoss(), optimizer,
                             SimpleNamespace(step=lambda: None), torch.amp.GradScaler("cpu", enabled=False),
                             nullcontext(), 0, 3, intervals.append, StepParts())
    losses, hits = [], 0
    with torch.no_grad():
        for x, y in _fixed_batches(7, 8, soft):
            logits = model(x)
            losses.append(F.cross_entropy(logits, y).item())
            hits += (logits.argmax(1) == (y if y.ndim == 1 else y.argmax(1))).sum().item()
    assert result.step == 7
    assert result.loss == pytest.approx(sum(losses) / 7, rel=1e-6)
    assert result.acc == hits / 56
    assert [i.step for i in intervals] == [3, 6, 7]  # the epoch's last step closes a shorter interval
    assert intervals[0].loss == pytest.approx(sum(losses[:3]) / 3, rel=1e-6)
    assert intervals[1].loss == pytest.approx(sum(losses[3:6]) / 3, rel=1e-6)
    assert intervals[2].loss == pytest.approx(losses[6], rel=1e-6)


def test_an_interval_with_a_short_last_batch_averages_its_examples_as_the_epoch_does():
    """With data.drop_last=false the interval point was the mean of its steps' means, the epoch's the mean over
    its examples: TensorBoard's train/loss and metrics.csv's disagreed on the same steps."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (8, 8, 8, 8, 8, 1)]
    intervals = []
    result = train_one_epoch(model, batches, nn.CrossEntropyLoss(), optimizer, SimpleNamespace(step=lambda: None),
                             torch.amp.GradScaler("cpu", enabled=False), nullcontext(), 0, 6, intervals.append,
                             StepParts())
    with torch.no_grad():
        per_example = torch.cat([F.cross_entropy(model(x), y, reduction="none") for x, y in batches])
    assert [i.step for i in intervals] == [6]  # the whole epoch is one interval
    assert intervals[0].loss == pytest.approx(per_example.mean().item(), rel=1e-6)
    assert result.loss == pytest.approx(intervals[0].loss, rel=1e-6)


def test_a_mid_interval_state_without_its_examples_count_restarts_the_interval_mean():
    """A mid-epoch last.pt saved before interval_seen summed step means: the resumed interval averages its new
    steps only, instead of mixing means with sums."""
    state = {"loss_sum": 1.5, "correct": 2, "interval_loss": 0.5, "seen": 3, "interval_steps": 1}
    totals = EpochTotals.from_state(state)
    assert (totals.interval_loss, totals.interval_seen, totals.interval_steps, totals.loss_sum) == (0.0, 0, 1, 1.5)


def test_epoch_totals_fold_on_checkpoint_and_restore_exactly():
    totals = EpochTotals()
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    totals.record(1, torch.tensor(0.5), logits, torch.tensor([0, 1, 1]))
    state = totals.state_dict()  # folds the pending step
    assert state == {"loss_sum": 1.5, "correct": 2, "interval_loss": 1.5, "seen": 3, "interval_steps": 1,
                     "interval_seen": 3}
    assert not totals.losses
    assert EpochTotals.from_state(state).state_dict() == state


def test_ema_keeps_its_count_through_a_state_dict_and_copies_integer_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ema_model(model, decay=0.5)
    ema.update_parameters(model)
    model[1].num_batches_tracked.fill_(7)
    with torch.no_grad():
        model[0].weight.add_(2.0)
    ema.update_parameters(model)
    assert ema.module[1].num_batches_tracked.item() == 7
    expected = ema.module[0].weight.clone()
    other = ema_model(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.n_averaged == 2 and torch.equal(other.module[0].weight, expected)


@pytest.mark.slow
def test_compiled_training_matches_eager(train_inprocess):
    common = ["trainer.max_epochs=1", "model.hidden=[32]"]
    _, _, eager = train_inprocess(common, name="eager")
    status, _, fast = train_inprocess([*common, "trainer.compile=default"], name="compiled")
    assert status == "completed"
    for key, value in eager.model.state_dict().items():
        assert torch.allclose(value.float(), fast.model.state_dict()[key].float(), atol=1e-4), key


@pytest.mark.parametrize("tf32, deterministic", [(True, False), (False, True)])
def test_cuda_backend_flags_follow_the_config(tf32, deterministic):
    """Flags only: setting them needs no GPU, and a CUDA run reads them when it starts its kernels."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.get_num_threads())
    try:
        trainer = compose_cfg([f"trainer.tf32={tf32}", f"trainer.deterministic={deterministic}"]).trainer
        configure_backends(trainer, torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
        assert torch.backends.cudnn.benchmark is (not deterministic)  # autotuning picks algorithms run to run
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[0], flags[1]
        torch.backends.cudnn.benchmark = flags[2]
        torch.set_num_threads(flags[3])
