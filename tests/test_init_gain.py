"""Kaiming gains: the integrator against ReLU's closed forms, each integrated gain against a Monte-Carlo estimate, the
initializers that use them, and the depth through which they keep a plain net's pre-activations at variance 1."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

from trainlab.config import ConfigError
from trainlab.initialization import MORE_ACTIVATIONS, TORCH_GAINS, gain, initialize, kaiming_gain, weight_initializer
from trainlab.layers import ACTIVATIONS, make_activation
from trainlab.models import MLP

INTEGRATED = ("gelu", "elu", "silu")
NO_NORM = {"name": "none"}


def module(activation: str) -> nn.Module:
    """The activation as the model applies it (model.activation), or torchvision's (SiLU)."""
    return make_activation(activation) if activation in ACTIVATIONS else MORE_ACTIVATIONS[activation]()


# --- the integrator and the gains ------------------------------------------------------------------------


@pytest.mark.parametrize("slope", [0.0, 0.01, 0.2, 0.5, 1.0])
def test_integrator_recovers_the_closed_form_of_relu_and_leaky_relu(slope):
    """E[f(z)^2] = (1 + slope^2) / 2, so the gain is sqrt(2 / (1 + slope^2)): sqrt(2) for ReLU (slope 0), 1 for the
    identity (slope 1); and it is torch's gain for both."""
    f = nn.ReLU() if slope == 0 else nn.LeakyReLU(slope)
    assert kaiming_gain(f) == pytest.approx(math.sqrt(2 / (1 + slope**2)), abs=1e-9)
    assert gain("leaky_relu", slope) == pytest.approx(kaiming_gain(f), abs=1e-9)
    assert gain("relu") == pytest.approx(kaiming_gain(nn.ReLU()), abs=1e-9)


@pytest.mark.parametrize("activation", INTEGRATED)
def test_integrated_gain_matches_monte_carlo(activation):
    """1 / sqrt(mean f(z)^2) over 10^6 draws (its standard error is about 0.1 %); ReLU's sqrt(2), which these
    activations had before, is 8 % (GELU) to 16 % (SiLU) away."""
    z = torch.randn(10**6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    estimate = 1 / math.sqrt((module(activation)(z) ** 2).mean().item())
    assert gain(activation) == pytest.approx(estimate, rel=0.005)
    assert abs(gain(activation) / math.sqrt(2) - 1) > 0.05


def test_gains_quoted_in_the_docstring():
    assert gain("gelu") == pytest.approx(1.5335, abs=1e-4)  # E[gelu(z)^2] = 0.4252
    assert gain("elu") == pytest.approx(1.2452, abs=1e-4)  # alpha 1: E[elu(z)^2] = 0.6449
    assert gain("silu") == pytest.approx(1.6765, abs=1e-4)  # E[silu(z)^2] = 0.3558


def test_torch_conventions_are_kept():
    """tanh's 5/3 and sigmoid's 1 are not 1 / sqrt(E[f(z)^2]) (1.593 and 1.846): torch's values stay."""
    assert (gain("relu"), gain("tanh"), gain("sigmoid"), gain("selu")) == (math.sqrt(2), 5 / 3, 1, 3 / 4)
    assert kaiming_gain(nn.Tanh()) == pytest.approx(1.5925, abs=1e-4)


@pytest.mark.parametrize("activation", [*ACTIVATIONS, *MORE_ACTIVATIONS])
def test_every_activation_has_its_own_gain(activation):
    """Every model.activation (and SiLU): torch's gain, or the integral over the very module the model applies."""
    expected = (nn.init.calculate_gain(activation, 0.01 if activation == "leaky_relu" else None)
                if activation in TORCH_GAINS else kaiming_gain(module(activation)))
    assert gain(activation) == expected


def test_unknown_activation_lists_those_with_a_gain():
    with pytest.raises(ConfigError, match=r"model.activation='swish'.*relu, leaky_relu, tanh, sigmoid, selu, gelu, "
                                          r"elu, silu"):
        gain("swish")


# --- the initializers use them -----------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "elu"])
@pytest.mark.parametrize("name", ["kaiming_normal", "kaiming_uniform", "orthogonal"])
def test_initializers_scale_by_the_integrated_gain(activation, name):
    torch.manual_seed(0)
    mlp = MLP([1000], activation, input_shape=(500,), num_classes=2, norm=NO_NORM)
    initialize(mlp, {"name": name}, mlp.activation)
    w, g = mlp[1].weight, gain(activation)
    if name == "orthogonal":  # 1000 x 500: orthogonal columns
        assert torch.allclose(w.T @ w, g**2 * torch.eye(500), atol=1e-4)
    else:
        assert w.std().item() == pytest.approx(g / math.sqrt(500), rel=0.01)
    if name == "kaiming_uniform":
        assert w.abs().max().item() <= g * math.sqrt(3 / 500)


@pytest.mark.parametrize("shape", [(300, 200), (16, 8, 3, 3), (4, 5, 7)])
@pytest.mark.parametrize("activation, slope", [("relu", 0.01), ("leaky_relu", 0.2), ("tanh", 0.01),
                                               ("sigmoid", 0.01)])
@pytest.mark.parametrize("name", ["kaiming_normal", "kaiming_uniform"])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_kaiming_draws_are_torchs_for_the_nonlinearities_it_knows(shape, activation, slope, name, mode):
    ours, torchs = torch.empty(shape), torch.empty(shape)
    torch.manual_seed(1)
    weight_initializer({"name": name, "mode": mode}, activation, slope)(ours)
    torch.manual_seed(1)
    getattr(nn.init, f"{name}_")(torchs, a=slope, mode=mode, nonlinearity=activation)
    assert torch.equal(ours, torchs)


# --- depth --------------------------------------------------------------------------------------------------


def preactivation_stds(activation: str, depth: int, gain_of: str, seed: int, width: int = 256) -> list[float]:
    """The std of each hidden layer's pre-activation in a plain net of `depth` hidden layers of `width` units
    (model=mlp normalization=none; a stack of linear layers for SiLU, which no model offers), kaiming_normal with
    the gain of `gain_of`, fed f(z) for z ~ N(0, 1) (a batch of 1024), so the first layer's have variance 1."""
    torch.manual_seed(seed)
    f = module(activation)
    if activation in ACTIVATIONS:
        net = MLP([width] * depth, activation, input_shape=(width,), num_classes=10, norm=NO_NORM)
    else:
        net = nn.Sequential(*[layer for _ in range(depth) for layer in (nn.Linear(width, width), f)])
    initialize(net, {"name": "kaiming_normal"}, gain_of)
    stds: list[float] = []
    for layer in net.modules():
        if isinstance(layer, nn.Linear):
            layer.register_forward_hook(lambda _, __, out: stds.append(out.std().item()))
    with torch.no_grad():
        net(f(torch.randn(1024, width)))
    return stds[:depth]


@pytest.mark.parametrize("activation, depth", [("gelu", 10), ("silu", 10), ("elu", 50)])
def test_the_integrated_gain_keeps_the_preactivation_std_near_1_through_depth(activation, depth):
    """The median over seeds 0-4 of the last hidden layer's std (and its spread over seeds 0-19), with the
    activation's gain against ReLU's sqrt(2): GELU at 10 layers 0.98 (0.54-1.78) against 0.19 (0.12-0.44); SiLU at
    10 layers 1.01 (0.70-1.73) against 0.060 (0.052-0.068); ELU at 50 layers 1.05 (0.87-1.08) against 4.6
    (3.6-7.5). GELU and SiLU stop at 10 layers: their variance-1 fixed point is unstable (test below); at 20
    layers they reach 0.54-2.8 and 1.5-7.3 (sqrt(2): 0.005-0.014 and 0.0016-0.0024), at 50 layers 5-23 and
    370-1040 (sqrt(2): 2e-7 and 6e-8)."""
    own = statistics.median(preactivation_stds(activation, depth, activation, seed)[-1] for seed in range(5))
    relus = statistics.median(preactivation_stds(activation, depth, "relu", seed)[-1] for seed in range(5))
    assert 1 / 1.5 < own < 1.5
    assert not 1 / 1.5 < relus < 1.5, relus


@pytest.mark.parametrize("activation, slope", [("gelu", 1.144), ("silu", 1.173), ("elu", 0.891)])
def test_the_variance_fixed_point_is_stable_for_elu_not_gelu_or_silu(activation, slope):
    """The slope at q = 1 of the variance map q -> gain^2 E[f(sqrt(q) z)^2] of one layer: above 1, a deviation from
    variance 1 grows layer after layer (GELU, SiLU: no gain helps, their E[f(sqrt(q) z)^2] / q grows with q)."""
    f, g = module(activation), gain(activation)

    def variance_map(q: float) -> float:
        return g**2 / kaiming_gain(lambda z: f(math.sqrt(q) * z)) ** 2

    assert variance_map(1.0) == pytest.approx(1.0, abs=1e-9)
    assert (variance_map(1.01) - variance_map(0.99)) / 0.02 == pytest.approx(slope, abs=0.002)
