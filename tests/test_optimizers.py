"""Every optimizer option builds from the real config and descends a convex loss; exact steps where trainlab acts."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import nn

import trainlab
from trainlab import optim
from trainlab.config import ConfigError, register_configs
from trainlab.ftrl import FTRL

OPTIMIZER_DIR = Path(trainlab.__file__).parent / "conf" / "optimizer"
OPTIONS = sorted(path.stem for path in OPTIMIZER_DIR.glob("*.yaml"))
CURRICULUM = {"sgd", "momentum", "nesterov", "adagrad", "adadelta", "rmsprop", "adam", "adamw", "radam", "nadam",
              "adamax", "lbfgs", "ftrl", "momentum_schedule"}


@functools.lru_cache(maxsize=None)
def _compose(overrides: tuple[str, ...]) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(OPTIMIZER_DIR.parent), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def config(name: str, *overrides: str) -> DictConfig:
    """The composed config of `train optimizer=<name> <overrides>` (a copy, free to change)."""
    return copy.deepcopy(_compose((f"optimizer={name}", *overrides)))


def regression(scale: float = 1.0, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares with 3 relevant and 3 irrelevant features, the solution scaled by `scale` (float64, fixed)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -1.0, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64) + 0.3
    return x, scale * (y + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).unsqueeze(1)


def linear(bias: bool = True, zero: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Linear(6, 1, bias=bias, dtype=torch.float64)
    if zero:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    return model


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                steps: int) -> float:
    """`steps` optimizer steps on the mean squared error, through a closure when the optimizer needs one."""

    def closure() -> torch.Tensor:  # the shape of the training loop's closure
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        if optim.needs_closure(optimizer):
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def set_grads(params, generator: torch.Generator) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)


# --- every option --------------------------------------------------------------------------------


def test_every_optimizer_of_the_curriculum_is_an_option():
    assert CURRICULUM <= set(OPTIONS)


@pytest.mark.parametrize("name", OPTIONS)
def test_option_yaml_leaves_decay_to_the_regularization_group(name):
    options = OmegaConf.load(OPTIMIZER_DIR / f"{name}.yaml")
    assert "decay_norm_and_bias" in options and options.decay_norm_and_bias is False
    assert "weight_decay" not in options and "decoupled_weight_decay" not in options
    text = (OPTIMIZER_DIR / f"{name}.yaml").read_text()
    assert "decay_norm_and_bias: false  # apply regularization.weight_decay" in text  # the key with its comment


@pytest.mark.parametrize("name", OPTIONS)
def test_option_descends_a_convex_loss(name):
    cfg = config(name)
    x, y = regression(scale=0.2)  # the solution within 500 steps of lr 1e-3 from zero
    model = linear()
    optimizer = optim.build_optimizer(cfg, model, steps_per_epoch=10)
    assert type(optimizer) is get_class(cfg.optimizer._target_)
    assert optim.needs_closure(optimizer) == (name == "lbfgs")
    assert all(group.get("weight_decay", 0.0) == 0.0 for group in optimizer.param_groups)  # trainlab's decay only
    assert [p for p in optim.decayed_parameters(optimizer)] == [model.weight]
    start = nn.functional.mse_loss(model(x), y).item()
    end = train_steps(model, optimizer, x, y, steps=50 if name == "lbfgs" else 500)
    assert end < 0.25 * start, f"{name}: loss {start:.4f} -> {end:.4f}"


# --- SGD with momentum ---------------------------------------------------------------------------


def test_momentum_and_nesterov_options():
    heavy_ball = optim.build_optimizer(config("momentum"), linear())
    nesterov = optim.build_optimizer(config("nesterov"), linear())
    assert isinstance(heavy_ball, torch.optim.SGD) and isinstance(nesterov, torch.optim.SGD)
    assert (heavy_ball.defaults["momentum"], heavy_ball.defaults["nesterov"], heavy_ball.defaults["dampening"]) == (
        0.9, False, 0.0)
    assert (nesterov.defaults["momentum"], nesterov.defaults["nesterov"]) == (0.9, True)


def test_heavy_ball_steps_match_the_hand_computed_update():
    model = linear(zero=False)
    w0 = model.weight.detach().clone()
    optimizer = optim.build_optimizer(config("momentum"), model)
    lr = optimizer.defaults["lr"]
    g = torch.Generator().manual_seed(1)
    g1, g2 = torch.randn(1, 6, generator=g, dtype=torch.float64), torch.randn(1, 6, generator=g, dtype=torch.float64)
    model.weight.grad = g1.clone()
    optimizer.step()
    torch.testing.assert_close(model.weight.detach(), w0 - lr * g1, rtol=0, atol=1e-15)  # v = g1
    model.weight.grad = g2.clone()
    optimizer.step()
    torch.testing.assert_close(model.weight.detach(), w0 - lr * g1 - lr * (0.9 * g1 + g2), rtol=0, atol=1e-15)


# --- momentum schedule ---------------------------------------------------------------------------


def ramp(step: int, warmup_steps: int = 40) -> float:
    return 0.5 + (0.9 - 0.5) * min(step, warmup_steps) / warmup_steps


def test_momentum_schedule_ramps_linearly_over_the_warmup_epochs():
    model = linear(zero=False)
    optimizer = optim.build_optimizer(config("momentum_schedule"), model, steps_per_epoch=4)  # 10 epochs: 40 steps
    g = torch.Generator().manual_seed(0)
    used = []
    for _ in range(45):
        set_grads(model.parameters(), g)
        optimizer.step()
        used.append(optimizer.param_groups[0]["momentum"])  # the momentum this step used
    for step in (0, 1, 10, 20, 39, 40, 44):
        assert used[step] == pytest.approx(ramp(step), abs=1e-12)
    assert used[0] == 0.5 and used[40] == 0.9
    assert all(group["momentum"] == used[-1] for group in optimizer.param_groups)


def test_momentum_schedule_step_uses_the_ramped_momentum():
    model = linear(zero=False)
    optimizer = optim.build_optimizer(config("momentum_schedule"), model, steps_per_epoch=4)
    lr = optimizer.defaults["lr"]
    w0 = model.weight.detach().clone()
    g1, g2 = torch.ones(1, 6, dtype=torch.float64), torch.full((1, 6), 2.0, dtype=torch.float64)
    for grad in (g1, g2):
        model.weight.grad, model.bias.grad = grad.clone(), torch.zeros(1, dtype=torch.float64)
        optimizer.step()
    torch.testing.assert_close(model.weight.detach(), w0 - lr * g1 - lr * (ramp(1) * g1 + g2), rtol=0, atol=1e-15)


def test_momentum_schedule_resumes_mid_ramp_from_the_state_dict():
    cfg = config("momentum_schedule")
    model = linear(zero=False)
    optimizer = optim.build_optimizer(cfg, model, steps_per_epoch=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(13):
        set_grads(model.parameters(), g)
        optimizer.step()
    state = copy.deepcopy(optimizer.state_dict())
    assert [group["momentum_step"] for group in state["param_groups"]] == [13] * len(state["param_groups"])
    resumed_model = copy.deepcopy(model)
    resumed = optim.build_optimizer(cfg, resumed_model, steps_per_epoch=4)
    assert resumed.param_groups[0]["momentum_step"] == 0
    resumed.load_state_dict(state)
    for step in range(13, 20):
        grads = torch.Generator().manual_seed(step)
        set_grads(model.parameters(), grads)
        set_grads(resumed_model.parameters(), torch.Generator().manual_seed(step))
        optimizer.step()
        resumed.step()
        assert resumed.param_groups[0]["momentum"] == optimizer.param_groups[0]["momentum"] == pytest.approx(ramp(step))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))


def test_momentum_ramp_is_refused_for_an_optimizer_without_momentum():
    cfg = config("adam", "+optimizer.momentum_start=0.5", "+optimizer.momentum_warmup_epochs=2")
    with pytest.raises(ConfigError, match=r"optimizer.momentum_start, optimizer.momentum_warmup_epochs: "
                                          r"optimizer=torch.optim.Adam has no momentum"):
        optim.build_optimizer(cfg, linear())


# --- AdamW through trainlab's decoupled decay ----------------------------------------------------


def test_adamw_with_decoupled_decay_matches_torch_adamw():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
    reference, start = copy.deepcopy(net), copy.deepcopy(net)
    cfg = config("adamw", "regularization.weight_decay=0.01")
    optimizer = optim.build_optimizer(cfg, net)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.0, 0.0]  # torch's own decay is off
    decay, no_decay = optim.parameter_groups(reference, decay_norm_and_bias=False)
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps,
                              fused=optimizer.param_groups[0]["fused"])  # the same kernels as trainlab's pick
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for p, q in zip(net.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        optimizer.step()
        adamw.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), reference.parameters()))
    assert not torch.equal(net[0].weight, start[0].weight)


# --- LBFGS ----------------------------------------------------------------------------------------


def test_lbfgs_single_group_decays_only_the_weights():
    model = linear(zero=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = optim.build_optimizer(config("lbfgs", "regularization.weight_decay=0.01"), model)
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["decayed_params"] == 1
    assert optim.decayed_parameters(optimizer) == [model.weight]

    def flat_closure() -> torch.Tensor:  # a zero gradient: LBFGS stops at once, only the decay acts
        optimizer.zero_grad()
        loss = 0.0 * model(torch.ones(1, 6, dtype=torch.float64)).sum()
        loss.backward()
        return loss

    optimizer.step(flat_closure)
    torch.testing.assert_close(model.weight.detach(), before["weight"] * (1 - 1.0 * 0.01), rtol=0, atol=1e-15)
    assert torch.equal(model.bias, before["bias"])


# --- FTRL -----------------------------------------------------------------------------------------


def ftrl_reference(w, z, n, g, alpha, beta, l1, l2):
    """One FTRL-Proximal step as written in McMahan et al. 2013, Algorithm 1."""
    sigma = ((n + g * g).sqrt() - n.sqrt()) / alpha
    z = z + (g - sigma * w)
    n = n + g * g
    w = torch.where(z.abs() <= l1, torch.zeros_like(z), -(z - z.sign() * l1) / ((beta + n.sqrt()) / alpha + l2))
    return w, z, n


@pytest.mark.parametrize(("l1", "l2", "n0"), [(0.0, 0.0, 0.0), (0.3, 0.5, 0.1)])
def test_ftrl_steps_match_the_closed_form(l1, l2, n0):
    alpha, beta = 0.5, 1.0
    w0 = torch.tensor([0.5, -0.2, 0.0, 1.5, -0.01], dtype=torch.float64)
    grads = [torch.tensor([0.3, -0.4, 0.05, 2.0, 0.0], dtype=torch.float64),
             torch.tensor([-0.1, 0.2, 0.5, 1.0, 0.02], dtype=torch.float64)]
    param = nn.Parameter(w0.clone())
    optimizer = FTRL([param], lr=alpha, beta=beta, lambda1=l1, lambda2=l2, initial_accumulator_value=n0)
    n = torch.full_like(w0, n0)
    z = -(w0 * ((beta + n.sqrt()) / alpha + l2) + w0.sign() * l1)  # the start that gives back w0
    w = w0
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
        w, z, n = ftrl_reference(w, z, n, g, alpha, beta, l1, l2)
        assert torch.equal(param.detach(), w)
        assert torch.equal(optimizer.state[param]["z"], z) and torch.equal(optimizer.state[param]["n"], n)


def test_ftrl_without_regularization_is_per_coordinate_gradient_descent_from_the_init():
    w0 = torch.tensor([0.5, -0.2, 0.0, 1.5], dtype=torch.float64)
    g = torch.tensor([0.3, -0.4, 0.05, 2.0], dtype=torch.float64)
    param = nn.Parameter(w0.clone())
    optimizer = FTRL([param], lr=0.5, beta=1.0)
    param.grad = g.clone()
    optimizer.step()
    torch.testing.assert_close(param.detach(), w0 - 0.5 * g / (1.0 + g.abs()), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize(("l1", "l2"), [(0.0, 0.0), (0.3, 0.5)])
def test_ftrl_under_a_changing_lr_steps_at_each_steps_rate_from_where_the_weights_are(l1, l2):
    """A warmup's second step (lr 0.025 -> 0.05) doubled every weight, and a cosine to 0 drove them all to 0 (a
    digits run ended at val/loss 2.3026, chance): sigma must use the last step's alpha for the old rate."""
    beta, lrs = 1.0, [0.025, 0.05, 0.075, 0.1, 0.04, 0.01]
    w0 = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    grads = [torch.tensor([0.3, -0.4, 0.05, 2.0], dtype=torch.float64) * (k + 1) for k in range(len(lrs))]
    param = nn.Parameter(w0.clone())
    optimizer = FTRL([param], lr=lrs[0], beta=beta, lambda1=l1, lambda2=l2)
    # the reference: the paper's z and n with sigma_1..t adding up to (beta + sqrt(n_t)) / alpha_t
    n = torch.zeros_like(w0)
    z = -(w0 * ((beta + n.sqrt()) / lrs[0] + l2) + w0.sign() * l1)
    w, previous = w0, lrs[0]
    for lr, g in zip(lrs, grads):
        optimizer.param_groups[0]["lr"] = lr
        param.grad = g.clone()
        optimizer.step()
        n_new = n + g * g
        z = z + g - ((beta + n_new.sqrt()) / lr - (beta + n.sqrt()) / previous) * w
        n, previous = n_new, lr
        w = torch.where(z.abs() <= l1, torch.zeros_like(z), -(z - z.sign() * l1) / ((beta + n.sqrt()) / lr + l2))
        torch.testing.assert_close(param.detach(), w, rtol=1e-12, atol=1e-14)
    if l1 == l2 == 0:  # then FTRL is per-coordinate gradient descent at each step's rate
        expected = w0 - sum(lr * g / (beta + torch.stack(grads[: k + 1]).pow(2).sum(0).sqrt())
                            for k, (lr, g) in enumerate(zip(lrs, grads)))
        torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-14)


def test_ftrl_large_lambda1_gives_exact_zeros_on_irrelevant_features():
    x, y = regression()
    model = linear()  # from zero weights, as in the paper
    optimizer = optim.build_optimizer(config("ftrl", "optimizer.lambda1=50"), model)
    train_steps(model, optimizer, x, y, steps=300)
    w = model.weight.detach()[0]
    assert torch.equal(w[3:], torch.zeros(3, dtype=torch.float64))  # exact zeros: sparse
    assert (w[:3] - torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)).abs().max() < 0.1
    dense = linear()
    train_steps(dense, optim.build_optimizer(config("ftrl"), dense), x, y, steps=300)
    assert torch.count_nonzero(dense.weight) == 6


def test_ftrl_state_dict_round_trip_continues_identically():
    cfg = config("ftrl", "optimizer.lambda1=0.1", "optimizer.lambda2=0.01")
    model = linear(zero=False)
    optimizer = optim.build_optimizer(cfg, model)
    x, y = regression()
    train_steps(model, optimizer, x, y, steps=5)
    state = copy.deepcopy(optimizer.state_dict())
    assert all(isinstance(per_param[k], torch.Tensor) for per_param in state["state"].values() for k in ("z", "n"))
    assert all(set(per_param) == {"z", "n", "alpha"} for per_param in state["state"].values())
    resumed_model = copy.deepcopy(model)
    resumed = optim.build_optimizer(cfg, resumed_model)
    resumed.load_state_dict(state)
    train_steps(model, optimizer, x, y, steps=5)
    train_steps(resumed_model, resumed, x, y, steps=5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))


# --- config errors ---------------------------------------------------------------------------------


def test_wrong_knob_names_the_optimizer_and_the_valid_keys():
    with pytest.raises(ConfigError) as error:
        optim.build_optimizer(config("adam", "+optimizer.momentum=0.9"), linear())
    message = str(error.value)
    assert message.startswith("optimizer=torch.optim.Adam: unknown key(s) optimizer.momentum; "
                              "valid keys: lr, betas, eps, amsgrad")
    assert "amsgrad" in message and "decay_norm_and_bias" in message and "weight_decay," not in message


def test_wrong_knob_of_ftrl_lists_its_signature():
    with pytest.raises(ConfigError, match=r"optimizer=trainlab.ftrl.FTRL: unknown key\(s\) optimizer.alpha; valid "
                                          r"keys: lr, beta, lambda1, lambda2, initial_accumulator_value"):
        optim.build_optimizer(config("ftrl", "+optimizer.alpha=0.1"), linear())


@pytest.mark.parametrize("key", ["weight_decay", "decoupled_weight_decay"])
def test_optimizer_decay_keys_are_refused(key):
    with pytest.raises(ConfigError, match=rf"optimizer.{key}: set regularization.weight_decay"):
        optim.build_optimizer(config("adamw", f"+optimizer.{key}=0.01"), linear())


def test_invalid_value_is_a_config_error():
    with pytest.raises(ConfigError, match=r"optimizer=torch.optim.SGD: Invalid momentum value: -0.5"):
        optim.build_optimizer(config("momentum", "optimizer.momentum=-0.5"), linear())


def test_a_momentum_ramp_from_0_on_rmsprop_trains_like_rmsprop_with_that_momentum():
    """torch's RMSprop makes its momentum buffer at a parameter's first step only if momentum is above 0 then: a ramp
    starting at 0 raised KeyError 'momentum_buffer' at the second step. The buffer now starts at zero when the
    ramp leaves 0, as torch's own does: the steps equal RMSprop's update written out with each step's momentum, the
    velocity starting at the first step whose momentum is above 0 (as torch's SGD starts it under the ramp)."""
    x, y = regression()
    model, reference = linear(zero=False), linear(zero=False)
    cfg = config("rmsprop", "optimizer.momentum=0.9", "+optimizer.momentum_start=0",
                 "+optimizer.momentum_warmup_epochs=1")
    lr, alpha, eps = cfg.optimizer.lr, cfg.optimizer.alpha, cfg.optimizer.eps
    optimizer = optim.build_optimizer(cfg, model, steps_per_epoch=4)
    square_avg = [torch.zeros_like(p) for p in reference.parameters()]
    velocity = [torch.zeros_like(p) for p in reference.parameters()]
    for step in range(6):
        momentum = optim.momentum_at(step, 0.0, 0.9, 4)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        reference.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        with torch.no_grad():
            for p, v, b in zip(reference.parameters(), square_avg, velocity):
                v.mul_(alpha).add_((1 - alpha) * p.grad ** 2)
                if momentum == 0:  # no velocity yet: it starts at the first step with momentum (torch's SGD too)
                    p.sub_(lr * p.grad / (v.sqrt() + eps))
                    continue
                b.mul_(momentum).add_(p.grad / (v.sqrt() + eps))
                p.sub_(lr * b)
        assert optimizer.param_groups[0]["momentum"] == pytest.approx(momentum)
        for a, b in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("name", "override", "message"), [
    ("momentum", "optimizer.momentum=1.5", "optimizer.momentum=1.5: must be in [0, 1) for optimizer=torch.optim.SGD; "
                                           "at 1 or more the velocity would never decay"),
    ("nesterov", "optimizer.momentum=1", "optimizer.momentum=1: must be in [0, 1)"),
    ("momentum_schedule", "optimizer.momentum=1.2", "optimizer.momentum=1.2: must be in [0, 1)"),
    ("rmsprop", "optimizer.alpha=1", "optimizer.alpha=1: must be in [0, 1) for optimizer=torch.optim.RMSprop"),
    ("rmsprop", "optimizer.momentum=1.5", "optimizer.momentum=1.5: must be in [0, 1)"),
    ("adam", "optimizer.lr=0", "optimizer.lr=0: the weights would never move; give a learning rate > 0"),
    ("adadelta", "optimizer.rho=1", "optimizer.rho=1: must be in [0, 1) for optimizer=torch.optim.Adadelta; at 1 "
                                    "its running averages stay 0 and every step is plain SGD"),
    ("momentum", "optimizer.dampening=1", "optimizer.dampening=1: must be in [0, 1) with optimizer.momentum=0.9"),
    ("nesterov", "optimizer.momentum=0", "optimizer.nesterov=true needs optimizer.momentum > 0 and "
                                         "optimizer.dampening=0 (here 0 and 0.0)"),
])
def test_rates_torch_accepts_but_cannot_train_with_are_refused(name, override, message):
    """momentum 1.5 completed with exit 0 and a loss of 1e6, RMSprop's alpha 1.5 diverged, lr 0 trained nothing;
    Adadelta's rho 1 trained as SGD at lr 1, SGD's dampening 1 stopped the weights after the first gradient."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        optim.build_optimizer(config(name, override), linear())
