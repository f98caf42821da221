"""optimizer.bias_correction: Adam and AdamW without the 1 / (1 - beta^t) factors against the course notes' formula,
torch's Adam kept for true, the first steps' known ratio, exact resume, refusals and a real run."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from conftest import compose_cfg, run_cli, signal_at_step
from trainlab import checkpoint
from trainlab.adam import UncorrectedAdam, UncorrectedAdamW
from trainlab.config import ConfigError
from trainlab.layer_stats import effective_lrs
from trainlab.optim import build_optimizer
from trainlab.run import execute

OFF = "optimizer.bias_correction=false"


def notes_adam(w: torch.Tensor, grads: list[torch.Tensor], lr: float, betas: tuple[float, float], eps: float,
               weight_decay: float = 0.0, decoupled: bool = False, amsgrad: bool = False) -> list[torch.Tensor]:
    """The weights after each step of the notes' loop with first_unbias = first_moment, second_unbias =
    second_moment (weight decay as torch's Adam, L2 into the gradient, or AdamW's w *= 1 - lr * wd)."""
    first_moment, second_moment, largest = torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(w)
    x, path = w.clone(), []
    for dx in grads:
        if decoupled:
            x = x * (1 - lr * weight_decay)
        else:
            dx = dx + weight_decay * x
        first_moment = betas[0] * first_moment + (1 - betas[0]) * dx
        second_moment = betas[1] * second_moment + (1 - betas[1]) * dx * dx
        largest = torch.maximum(largest, second_moment)
        x = x - lr * first_moment / ((largest if amsgrad else second_moment).sqrt() + eps)
        path.append(x)
    return path


def gradients(steps: int, shape: tuple[int, ...] = (3, 4)) -> list[torch.Tensor]:
    """Float64 gradients of falling size (1 to 0.02), so v shrinks late on and amsgrad's maximum takes over."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * 0.5 ** t for t in range(steps)]


CASES = {
    "plain": ({}, {}),
    "l2-weight-decay": ({"weight_decay": 0.1}, {"weight_decay": 0.1}),
    "adamw": ({"weight_decay": 0.1, "decoupled_weight_decay": True}, {"weight_decay": 0.1, "decoupled": True}),
    "amsgrad": ({"amsgrad": True}, {"amsgrad": True}),
    "adamw-amsgrad": ({"weight_decay": 0.05, "decoupled_weight_decay": True, "amsgrad": True},
                      {"weight_decay": 0.05, "decoupled": True, "amsgrad": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_uncorrected_steps_equal_the_notes_formula(case):
    options, reference = CASES[case]
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    lr, betas, eps = 0.05, (0.8, 0.95), 1e-8
    grads = gradients(7)
    expected = notes_adam(w.detach(), grads, lr, betas, eps, **reference)
    optimizer = UncorrectedAdam([w], lr=lr, betas=betas, eps=eps, **options)
    for step, (grad, want) in enumerate(zip(grads, expected)):
        w.grad = grad.clone()
        optimizer.step()
        torch.testing.assert_close(w.detach(), want, rtol=1e-13, atol=1e-15, msg=f"{case}, step {step + 1}")
        assert torch.equal(w.grad, grad)  # the gradient itself is left as it was (weight decay on a copy)
    assert float(optimizer.state[w]["step"]) == 7
    # the options matter for this sequence: the plain formula is not what the others computed
    if options:
        assert not torch.allclose(notes_adam(w.detach(), grads, lr, betas, eps)[-1], expected[-1], atol=1e-6)


def test_uncorrected_adamw_is_decoupled_and_maximize_ascends():
    torch.manual_seed(0)
    a, b = (nn.Parameter(torch.randn(5, dtype=torch.float64)) for _ in range(2))
    grads = gradients(4, (5,))
    expected = notes_adam(a.detach(), grads, 1e-2, (0.9, 0.999), 1e-8, weight_decay=0.01, decoupled=True)
    adamw = UncorrectedAdamW([a], lr=1e-2)  # torch's AdamW's defaults otherwise: weight_decay 0.01, decoupled
    ascent = UncorrectedAdam([b], lr=1e-2, maximize=True)
    descent = notes_adam(b.detach(), [-g for g in grads], 1e-2, (0.9, 0.999), 1e-8)
    for grad in grads:
        a.grad, b.grad = grad.clone(), grad.clone()
        adamw.step()
        ascent.step()
    torch.testing.assert_close(a.detach(), expected[-1], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(b.detach(), descent[-1], rtol=1e-13, atol=1e-15)


def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(6, 2, dtype=torch.float64)


@pytest.mark.parametrize(("name", "torch_class", "ours"), [("adam", torch.optim.Adam, UncorrectedAdam),
                                                          ("adamw", torch.optim.AdamW, UncorrectedAdamW)])
def test_true_builds_torchs_optimizer_as_before_and_false_trainlabs(name, torch_class, ours):
    on, off = compose_cfg([f"optimizer={name}"]), compose_cfg([f"optimizer={name}", OFF])
    assert on.optimizer.bias_correction is True  # the default
    before = copy.deepcopy(on)  # the option as it was before the key existed
    with open_dict(before):
        del before.optimizer.bias_correction
    models = [linear() for _ in range(3)]
    built = [build_optimizer(cfg, model) for cfg, model in zip((on, before, off), models)]
    assert type(built[0]) is type(built[1]) is torch_class and type(built[2]) is ours
    assert built[0].param_groups[0]["fused"] is True  # torch's fused CPU kernel, as trainlab chose before
    assert [{k: v for k, v in g.items() if k != "params"} for g in built[0].param_groups] == \
           [{k: v for k, v in g.items() if k != "params"} for g in built[1].param_groups]
    group = built[2].param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["amsgrad"], group["weight_decay"]) == (
        1e-3, (0.9, 0.999), 1e-8, False, 0.0)  # the config's values; decay stays trainlab's pre-hook
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in models[0].parameters()]
        for model, optimizer in zip(models, built):
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad.clone()
            optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))
    assert not any(torch.allclose(p, q) for p, q in zip(models[0].parameters(), models[2].parameters()))


def step_sizes(overrides: list[str], grad: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The change of the weight at each of `steps` steps of the built optimizer, the gradient held at `grad`."""
    model = linear()
    optimizer = build_optimizer(compose_cfg(["optimizer=adam", *overrides]), model)
    sizes = []
    for _ in range(steps):
        before = model.weight.detach().clone()
        model.weight.grad, model.bias.grad = grad.clone(), torch.zeros_like(model.bias)
        optimizer.step()
        sizes.append(model.weight.detach() - before)
    return sizes


def test_the_first_steps_differ_by_the_bias_corrections_ratio():
    """A constant gradient g: torch's Adam steps lr * g / (|g| + eps) every time; without correction step t is
    lr * (1 - b1^t) g / (sqrt(1 - b2^t) |g| + eps): at step 1 (1 - b1) / sqrt(1 - b2) = 3.16 times as large."""
    grad = torch.tensor([[0.3, -1.0, 2.0, -0.05, 1e-3, 4.0]] * 2, dtype=torch.float64)
    corrected, uncorrected = step_sizes([], grad, 12), step_sizes([OFF], grad, 12)
    b1, b2, lr, eps = 0.9, 0.999, 1e-3, 1e-8
    torch.testing.assert_close(corrected[0], -lr * grad / (grad.abs() + eps), rtol=1e-12, atol=0)
    for t in (1, 2, 12):
        want = -lr * (1 - b1 ** t) * grad / ((1 - b2 ** t) ** 0.5 * grad.abs() + eps)
        torch.testing.assert_close(uncorrected[t - 1], want, rtol=1e-10, atol=0)
    ratio = uncorrected[0] / corrected[0]
    torch.testing.assert_close(ratio, (1 - b1) * (grad.abs() + eps) / ((1 - b2) ** 0.5 * grad.abs() + eps))
    assert float(ratio[0, 3]) == pytest.approx(0.1 / 0.001 ** 0.5, rel=1e-5)  # 3.162 where |g| >> eps
    assert float((uncorrected[11] / corrected[11])[0, 3]) == pytest.approx(6.5685, rel=1e-4)  # near the peak
    # a larger beta1 makes the start slower instead: (1 - 0.99) / sqrt(1 - 0.999) = 0.316
    slow = step_sizes([OFF, "optimizer.betas=[0.99,0.999]"], grad, 1)[0]
    assert float((slow / corrected[0])[0, 3]) == pytest.approx(0.01 / 0.001 ** 0.5, rel=1e-5)


@pytest.mark.parametrize("cls", [UncorrectedAdam, UncorrectedAdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_effective_step_size_is_lr_over_the_uncorrected_root(cls, amsgrad):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    optimizer = cls(model.parameters(), lr=0.05, amsgrad=amsgrad)
    assert effective_lrs(optimizer) == {}  # no state before the first step
    for step in range(30):
        optimizer.zero_grad()
        (model(torch.randn(16, 6)).pow(2).mean() * (0.5 if step > 20 else 1.0)).backward()  # v falls: amsgrad's max
        optimizer.step()
    key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
    v = torch.cat([optimizer.state[p][key].flatten() for p in model.parameters()])
    uncorrected = float((0.05 / (v.sqrt() + 1e-8)).median())
    assert effective_lrs(optimizer)["0"] == pytest.approx(uncorrected, rel=1e-6)
    corrected = uncorrected * (1 - 0.999 ** 30) ** 0.5 / (1 - 0.9 ** 30)  # what torch's Adam's rule would say
    assert effective_lrs(optimizer)["0"] != pytest.approx(corrected, rel=0.5)


def test_state_dict_round_trip_continues_bitwise():
    cfg = compose_cfg(["optimizer=adamw", OFF, "optimizer.amsgrad=true", "regularization.weight_decay=0.01"])
    model = linear()
    optimizer = build_optimizer(cfg, model)

    def steps(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(4):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            optimizer.step()

    steps(model, optimizer, seed=0)
    state = copy.deepcopy(optimizer.state_dict())
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"} for s in state["state"].values())
    resumed_model = copy.deepcopy(model)
    resumed = build_optimizer(cfg, resumed_model)
    resumed.load_state_dict(torch.load(_saved(state), weights_only=True))  # through a file, as last.pt
    steps(model, optimizer, seed=1)
    steps(resumed_model, resumed, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))


def _saved(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_feature_groups_of_finetune_train_at_their_own_rate():
    """finetune=low_lr's groups are ordinary groups: the features step at lr x 0.1, the head at lr."""
    cfg = compose_cfg(["optimizer=adam", OFF, "regularization.weight_decay=0.1"])
    model = nn.Sequential(nn.Linear(4, 3, dtype=torch.float64), nn.Linear(3, 2, dtype=torch.float64))
    start = [p.detach().clone() for p in model.parameters()]
    features = list(model[0].parameters())
    optimizer = build_optimizer(cfg, model, features=features, feature_lr_scale=0.1)
    assert type(optimizer) is UncorrectedAdam
    assert [g["name"] for g in optimizer.param_groups] == ["head_decay", "head_no_decay", "features_decay",
                                                           "features_no_decay"]
    grads = gradients(3, (1,))
    for grad in grads:
        for p in model.parameters():
            p.grad = torch.full_like(p, float(grad))
        optimizer.step()
    for p, w0 in zip(model.parameters(), start):
        lr = 1e-3 * (0.1 if any(p is q for q in features) else 1.0)
        decayed = p.dim() == 2  # biases are not decayed
        want = notes_adam(w0, [torch.full_like(w0, float(g)) for g in grads], lr, (0.9, 0.999), 1e-8,
                          weight_decay=0.1 if decayed else 0.0, decoupled=True)[-1]
        torch.testing.assert_close(p.detach(), want, rtol=1e-13, atol=1e-16)


# --- refusals ------------------------------------------------------------------------------------


def test_the_key_is_refused_for_other_optimizers_and_wrong_values():
    with pytest.raises(ConfigError, match=r"^optimizer.bias_correction: optimizer=torch.optim.SGD has no bias "
                                          r"correction to switch; only optimizer=adam and optimizer=adamw"):
        build_optimizer(compose_cfg(["+optimizer.bias_correction=false"]), linear())
    with pytest.raises(ConfigError, match=r"optimizer=torch.optim.NAdam has no bias correction"):
        build_optimizer(compose_cfg(["optimizer=nadam", "+optimizer.bias_correction=true"]), linear())
    with pytest.raises(ConfigError, match=r"optimizer.bias_correction='maybe': must be true or false"):
        build_optimizer(compose_cfg(["optimizer=adam", "optimizer.bias_correction=maybe"]), linear())
    with pytest.raises(ConfigError, match=r"^optimizer=torch.optim.Adam with optimizer.bias_correction=false "
                                          r"\(trainlab.adam.UncorrectedAdam\): unknown key\(s\) optimizer.fused; "
                                          r"valid keys: lr, betas, eps, amsgrad, maximize, decay_norm_and_bias, "
                                          r"bias_correction$"):
        build_optimizer(compose_cfg(["optimizer=adam", OFF, "+optimizer.fused=true"]), linear())
    with pytest.raises(ConfigError, match=r"optimizer.momentum; valid keys: lr, betas, eps, amsgrad, foreach, "
                                          r".*decay_norm_and_bias, bias_correction$"):
        build_optimizer(compose_cfg(["optimizer=adam", "+optimizer.momentum=0.9"]), linear())


def test_the_command_line_refuses_it_for_sgd_with_exit_2(tmp_path):
    result = run_cli(["+optimizer.bias_correction=false", "trainer.device=cpu", "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "optimizer.bias_correction: optimizer=torch.optim.SGD has no bias correction to switch; only " \
           "optimizer=adam and optimizer=adamw" in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()


# --- runs ----------------------------------------------------------------------------------------


def test_train_without_bias_correction_runs_end_to_end(tmp_path):
    result = run_cli(["optimizer=adam", OFF, "trainer.max_epochs=2", "trainer.device=cpu", "hydra.run.dir=run"],
                     tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test"]["test/acc"] > 0.9
    assert "optimizer: UncorrectedAdam lr 0.001" in (run_dir / "train.log").read_text()
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    sizes = [e.value for e in events.Scalars("lr_effective/all")]
    assert len(sizes) == 2 and all(0 < s < float("inf") for s in sizes)
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")["optimizer"]
    assert "decoupled_weight_decay" in state["param_groups"][0] and "fused" not in state["param_groups"][0]


def test_resume_from_last_pt_mid_epoch_is_bitwise_exact(tmp_path, monkeypatch):
    """Interrupted after step 27 of 40 (epoch 2), resumed from last.pt: the same weights, optimizer state and
    logged losses as the run that was never interrupted."""
    overrides = ["trainer.max_epochs=2", "optimizer=adam", OFF, "optimizer.amsgrad=true", "scheduler=cosine",
                 "logger.every_n_steps=5", "trainer.device=cpu", "checkpoint.every_n_steps=5"]
    status, code, whole = execute(compose_cfg(overrides), tmp_path / "whole", overrides)
    assert (status, code) == ("completed", 0)
    with monkeypatch.context() as patch:
        signal_at_step(patch, signal.SIGTERM, step=27)
        status, code, _ = execute(compose_cfg(overrides), tmp_path / "part", overrides)
    assert (status, code) == ("interrupted", 143)
    last = checkpoint.load(tmp_path / "part" / "checkpoints" / "last.pt")
    assert last["step"] == 27 and {float(s["step"]) for s in last["optimizer"]["state"].values()} == {27.0}
    assert not torch.equal(last["optimizer"]["state"][0]["exp_avg"], whole.optimizer.state_dict()["state"][0][
        "exp_avg"])  # mid-run state: the comparison below is not trivially true
    resume = [*overrides, "checkpoint.resume=auto"]
    status, code, resumed = execute(compose_cfg(resume), tmp_path / "part", resume)
    assert (status, code) == ("completed", 0) and type(resumed.optimizer) is UncorrectedAdam
    for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values()):
        assert torch.equal(a, b)
    ours, theirs = resumed.optimizer.state_dict(), whole.optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for index, per_param in theirs["state"].items():
        assert all(torch.equal(ours["state"][index][k], v) for k, v in per_param.items())
    assert metrics(tmp_path / "part") == metrics(tmp_path / "whole")  # every epoch's losses and accuracies
    assert resumed.summary["test"] == whole.summary["test"]


def metrics(run_dir) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in csv.DictReader(handle)]


@pytest.mark.slow  # 7 s: two torchrun processes; test_distributed.py covers the same path for every optimizer
def test_two_torchrun_processes_train_like_one_with_the_whole_batch(tmp_path):
    """Under torchrun (gloo, CPU) each rank steps its own UncorrectedAdam on the averaged gradients: the epochs'
    metrics are those of one process with the whole batch."""
    overrides = ["optimizer=adam", OFF, "normalization=none", "trainer.max_epochs=1", "logger.every_n_steps=7",
                 "logger.progress=lines", "trainer.device=cpu"]  # no batch norm: no per-rank statistics
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "trainlab", *overrides, "hydra.run.dir=ddp"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["processes"] == 2
    assert "optimizer: UncorrectedAdam lr 0.001" in (tmp_path / "ddp" / "train.log").read_text()
    status, code, one = execute(compose_cfg(overrides), tmp_path / "one", overrides)
    assert (status, code) == ("completed", 0)
    ddp, whole = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert len(ddp) == len(whole) == 1
    for a, b in zip(ddp, whole):
        for key in ("train/loss", "val/loss", "val/acc"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), key
