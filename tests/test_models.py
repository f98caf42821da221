"""Models, normalizations, activations and initializations: exact statistics on seeded inputs, every option built."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn

import trainlab
from trainlab import models
from trainlab.config import ConfigError, register_configs
from trainlab.data import load_digits
from trainlab.initialization import INITIALIZATIONS, initialize
from trainlab.models import CNN, MLP, TorchvisionModel, build_model, count_weighted_layers, make_norm

CONF_DIR = Path(trainlab.__file__).parent / "conf"
BATCH, NO_NORM = {"name": "batch"}, {"name": "none"}
PER_SAMPLE_NORMS = ("layer", "instance", "group")
ACTIVATION_TYPES = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
                    "gelu": nn.GELU, "elu": nn.ELU}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def compose_cfg(overrides: list[str]) -> DictConfig:
    """The real composed config of `train <overrides>`."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def assert_standardised(y: torch.Tensor, dims: tuple[int, ...]) -> None:
    """Mean 0 and (biased) variance 1 over `dims`, for every index of the other dims."""
    assert torch.allclose(y.mean(dims), torch.zeros(()), atol=1e-5)
    assert torch.allclose(y.var(dims, unbiased=False), torch.ones(()), atol=1e-3)


def features(n: int = 32, c: int = 8) -> torch.Tensor:
    """Flat features whose columns have different means and scales."""
    return torch.randn(n, c, generator=gen(0)) * torch.arange(1.0, c + 1) + torch.arange(float(c))


def maps(n: int = 6, c: int = 8, h: int = 5, w: int = 4) -> torch.Tensor:
    """Feature maps whose channels have different means and scales."""
    return torch.randn(n, c, h, w, generator=gen(1)) * torch.arange(1.0, c + 1).view(1, c, 1, 1) + \
        torch.arange(float(c)).view(1, c, 1, 1)


# --- normalization: which axes each one standardises --------------------------------------------------


def test_batch_norm_standardises_each_feature_over_the_batch():
    norm = make_norm(BATCH, 8, spatial=False).train()
    assert type(norm) is nn.BatchNorm1d
    assert_standardised(norm(features()), dims=(0,))
    norm2d = make_norm(BATCH, 8, spatial=True).train()
    assert type(norm2d) is nn.BatchNorm2d
    assert_standardised(norm2d(maps()), dims=(0, 2, 3))  # per channel, over the batch and the positions


def test_layer_norm_standardises_each_sample_over_all_its_features():
    x = features()
    norm = make_norm({"name": "layer"}, 8, spatial=False)
    assert type(norm) is nn.LayerNorm and norm.weight.shape == (8,)
    y = norm(x)
    assert_standardised(y, dims=(1,))
    assert y.mean(0).abs().max() > 0.5  # not per feature over the batch
    norm2d = make_norm({"name": "layer"}, 8, spatial=True)
    assert type(norm2d) is nn.GroupNorm and norm2d.num_groups == 1 and norm2d.weight.shape == (8,)
    y2d = norm2d(maps())
    assert_standardised(y2d, dims=(1, 2, 3))  # per sample over C, H, W
    assert y2d.mean((2, 3)).abs().max() > 0.5  # not per channel


def test_instance_norm_standardises_each_channel_of_each_sample_over_positions():
    norm = make_norm({"name": "instance"}, 8, spatial=True)
    assert type(norm) is nn.InstanceNorm2d and norm.affine and norm.weight.shape == (8,)
    assert_standardised(norm(maps()), dims=(2, 3))


def test_group_norm_standardises_each_group_of_channels_of_each_sample():
    norm2d = make_norm({"name": "group", "num_groups": 2}, 8, spatial=True)
    assert type(norm2d) is nn.GroupNorm and norm2d.num_groups == 2
    y = norm2d(maps())
    assert_standardised(y.view(6, 2, 4 * 5 * 4), dims=(2,))  # per sample, per group of 4 channels
    assert y.mean((2, 3)).abs().max() > 0.5  # not per channel
    assert y.flatten(1).mean(1).abs().max() < 1e-5  # groups of equal size: the sample's mean is 0 too
    norm = make_norm({"name": "group", "num_groups": 2}, 8, spatial=False)
    assert_standardised(norm(features()).view(32, 2, 4), dims=(2,))


@pytest.mark.parametrize("name", PER_SAMPLE_NORMS)
def test_per_sample_norms_do_not_depend_on_the_rest_of_the_batch(name):
    norm = make_norm({"name": name, "num_groups": 2}, 8, spatial=True).train()
    x = maps()
    assert torch.allclose(norm(x)[:1], norm(x[:1]), atol=1e-6)


def test_batch_norm_uses_running_statistics_at_evaluation():
    torch.manual_seed(0)
    mlp = MLP([16], input_shape=(6,), num_classes=3, norm=BATCH)
    x = torch.randn(8, 6, generator=gen(0)) * 3 + 2
    train_out = mlp.train()(x)
    mlp.eval()
    batch_out = mlp(x)
    assert not torch.allclose(train_out, batch_out, atol=1e-3)
    assert torch.allclose(mlp(x[:1]), batch_out[:1], atol=1e-6)
    others = torch.cat([x[:1], torch.randn(7, 6, generator=gen(1)) * 10])
    assert torch.allclose(mlp(others)[:1], batch_out[:1], atol=1e-6)
    bn = mlp[2]
    assert torch.allclose(bn.running_mean, 0.1 * mlp[1](x).mean(0), atol=1e-6)  # momentum 0.1, from zero


@pytest.mark.parametrize("name, mlp_norm, cnn_norm", [
    ("none", nn.Identity, nn.Identity), ("batch", nn.BatchNorm1d, nn.BatchNorm2d),
    ("layer", nn.LayerNorm, nn.GroupNorm), ("instance", None, nn.InstanceNorm2d),
    ("group", nn.GroupNorm, nn.GroupNorm)])
def test_models_put_the_named_norm_between_a_bias_free_layer_and_the_activation(name, mlp_norm, cnn_norm):
    norm = {"name": name, "num_groups": 2}
    bias = name == "none"
    cnn = CNN(depth=8, width=4, input_shape=(1, 8, 8), num_classes=3, norm=norm)
    norms = [cnn.stem[1]] + [n for b in cnn.blocks for n in (b.norm1, b.norm2)]
    assert all(type(n) is cnn_norm for n in norms) and len(norms) == 7
    assert all((m.bias is not None) == bias for m in cnn.modules() if isinstance(m, nn.Conv2d))
    if mlp_norm is not None:
        mlp = MLP([8, 4], input_shape=(1, 8, 8), num_classes=3, norm=norm)
        assert [type(m) for m in mlp] == [nn.Flatten, nn.Linear, mlp_norm, nn.ReLU, nn.Linear, mlp_norm, nn.ReLU,
                                          nn.Linear]
        assert [m.bias is not None for m in mlp if isinstance(m, nn.Linear)] == [bias, bias, True]


def test_group_norm_with_indivisible_channels_names_both_numbers_and_the_fix():
    with pytest.raises(ConfigError, match=r"num_groups=3 does not divide the 16 channels.*1, 2, 4, 8, 16"):
        make_norm({"name": "group", "num_groups": 3}, 16, spatial=True)
    with pytest.raises(ConfigError, match=r"num_groups=8 does not divide the 6 channels"):
        CNN(depth=8, width=6, input_shape=(1, 8, 8), num_classes=3, norm={"name": "group", "num_groups": 8})
    with pytest.raises(ConfigError, match=r"num_groups=4 does not divide the 10 channels"):
        MLP([10], input_shape=(4,), num_classes=2, norm={"name": "group", "num_groups": 4})


def test_group_norm_refused_on_an_mlp_lists_the_group_counts_every_hidden_width_takes():
    """It listed the divisors of the one width that failed (of 100: ..., 5, 10, ...): 10 was then refused at 256."""
    for groups in (8, 10):
        with pytest.raises(ConfigError, match=r"num_groups=%d does not divide .*\(of 256, 100: 1, 2, 4\)" % groups):
            MLP([256, 100], input_shape=(1, 8, 8), num_classes=3, norm={"name": "group", "num_groups": groups})
    assert MLP([256, 100], input_shape=(1, 8, 8), num_classes=3, norm={"name": "group", "num_groups": 4})


def test_layer_norm_of_a_one_unit_layer_is_refused_without_suggesting_layer_norm():
    with pytest.raises(ConfigError, match=r"normalization=layer .* 1 channel.*Use wider hidden layers "
                                          r"\(model.hidden\), or normalization=batch\.$"):
        MLP([1], input_shape=(1, 8, 8), num_classes=3, norm={"name": "layer"})


def test_instance_norm_on_flat_features_is_refused():
    with pytest.raises(ConfigError, match=r"normalization=instance.*model=mlp.*normalization=layer"):
        MLP([16], input_shape=(1, 8, 8), num_classes=3, norm={"name": "instance"})


def test_unknown_norm_lists_the_valid_names():
    with pytest.raises(ConfigError, match=r"normalization='weight'.*none, batch, layer, instance, group"):
        make_norm({"name": "weight"}, 4, spatial=True)


@pytest.mark.parametrize("shape, stages", [((1, 8, 8), 4), ((3, 4, 4), 5), ((3, 5, 7), 3), ((1, 1, 1), 3)])
def test_cnn_takes_images_smaller_than_its_downsampling(shape, stages):
    cnn = CNN(depth=2 + 2 * stages, width=2, stages=stages, input_shape=shape, num_classes=4, norm=BATCH)
    assert cnn.train()(torch.randn(3, *shape, generator=gen(0))).shape == (3, 4)


def test_per_sample_norm_on_1x1_feature_maps_is_refused():
    # 8x8 through 4 stages: 8, 4, 2, 1; instance norm of a single position would output only its bias.
    with pytest.raises(ConfigError, match=r"normalization=instance.*1x1.*fewer model.stages"):
        CNN(depth=10, width=4, stages=4, input_shape=(1, 8, 8), num_classes=3, norm={"name": "instance"})
    cnn = CNN(depth=8, width=4, stages=3, input_shape=(1, 8, 8), num_classes=3, norm={"name": "instance"})
    assert cnn(torch.randn(2, 1, 8, 8, generator=gen(0))).shape == (2, 3)
    ok = CNN(depth=10, width=4, stages=4, input_shape=(1, 8, 8), num_classes=3, norm={"name": "group", "num_groups": 2})
    assert ok(torch.randn(2, 1, 8, 8, generator=gen(0))).shape == (2, 3)  # 2 channels per group at 1x1


# --- activations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind", ACTIVATION_TYPES.items())
def test_activation_knob_sets_every_activation_of_mlp_and_cnn(name, kind):
    mlp = MLP([4, 4], name, input_shape=(3,), num_classes=2, norm=BATCH)
    cnn = CNN(depth=8, width=2, activation=name, input_shape=(1, 4, 4), num_classes=2, norm=BATCH)
    for model, count in ((mlp, 2), (cnn, 7)):  # cnn: the stem and two per block
        found = [type(m) for m in model.modules() if type(m) in ACTIVATION_TYPES.values()]
        assert found == [kind] * count
        assert model.activation == name


def test_leaky_relu_slope_is_the_negative_slope_knob():
    mlp = MLP([4, 4], "leaky_relu", 0.2, input_shape=(3,), num_classes=2, norm=BATCH)
    cnn = CNN(depth=8, width=2, activation="leaky_relu", negative_slope=0.2, input_shape=(1, 4, 4), num_classes=2,
              norm=BATCH)
    for model in (mlp, cnn):
        assert model.negative_slope == 0.2
        assert [m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)] == [0.2] * (
            2 if model is mlp else 7)
    assert models.make_activation("leaky_relu").negative_slope == 0.01
    x = torch.tensor([-2.0, 3.0])
    assert torch.equal(models.make_activation("leaky_relu", 0.2)(x), torch.tensor([-0.4, 3.0]))


@pytest.mark.parametrize("slope", [None, "0.1", float("nan")])
def test_a_leaky_relu_slope_that_is_not_a_number_is_refused_when_the_model_is_built(slope):
    """model.negative_slope=null built the model (and its init took slope 0.01), then crashed at the first forward."""
    with pytest.raises(ConfigError, match=r"model.negative_slope=.*leaky_relu's slope for x < 0 must be a number"):
        MLP([4], "leaky_relu", slope, input_shape=(3,), num_classes=2, norm=BATCH)
    with pytest.raises(ConfigError, match=r"model.negative_slope="):
        cfg = compose_cfg(["model=cnn", "model.activation=leaky_relu", "model.negative_slope=null"])
        build_model(cfg, (1, 8, 8), 10)
    assert MLP([4], "relu", slope, input_shape=(3,), num_classes=2, norm=BATCH)  # read by leaky_relu only


def test_unknown_activation_lists_the_valid_names():
    with pytest.raises(ConfigError, match=r"model.activation='swish'.*relu, leaky_relu, tanh, sigmoid, gelu, elu"):
        CNN(depth=8, width=2, activation="swish", input_shape=(1, 4, 4), num_classes=2, norm=BATCH)


# --- initialization: each against its formula ------------------------------------------------------------


def first_linear(activation: str = "relu", slope: float = 0.01, fan_in: int = 500, fan_out: int = 1000) -> nn.Linear:
    """The first layer (fan_in -> fan_out) of an MLP that carries `activation` and its slope."""
    torch.manual_seed(0)
    return MLP([fan_out], activation, slope, input_shape=(fan_in,), num_classes=2, norm=NO_NORM)


def test_xavier_uniform_bound_and_std():
    mlp = first_linear(fan_in=800, fan_out=400)
    initialize(mlp, {"name": "xavier_uniform"}, mlp.activation)
    bound = math.sqrt(6 / (800 + 400))
    w = mlp[1].weight
    assert bound * 0.999 < w.abs().max().item() <= bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)


def test_xavier_normal_std():
    mlp = first_linear(fan_in=800, fan_out=400)
    initialize(mlp, {"name": "xavier_normal"}, mlp.activation)
    assert mlp[1].weight.std().item() == pytest.approx(math.sqrt(2 / (800 + 400)), rel=0.01)
    assert mlp[1].weight.mean().item() == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("name", ["kaiming_normal", "kaiming_uniform"])
@pytest.mark.parametrize("mode, fan", [("fan_in", 500), ("fan_out", 1000)])
@pytest.mark.parametrize("activation, slope, gain", [("relu", 0.01, math.sqrt(2)),
                                                     ("leaky_relu", 0.2, math.sqrt(2 / (1 + 0.2**2))),
                                                     ("tanh", 0.01, 5 / 3)])
def test_kaiming_std_is_gain_over_sqrt_fan(name, mode, fan, activation, slope, gain):
    mlp = first_linear(activation, slope)
    initialize(mlp, {"name": name, "mode": mode}, mlp.activation)
    w = mlp[1].weight
    assert w.std().item() == pytest.approx(gain / math.sqrt(fan), rel=0.01)
    if name == "kaiming_uniform":
        assert w.abs().max().item() <= gain * math.sqrt(3 / fan)
    assert torch.equal(mlp[1].bias, torch.zeros(1000))


def test_kaiming_fan_of_a_conv_includes_the_kernel():
    torch.manual_seed(0)
    cnn = CNN(depth=8, width=16, input_shape=(1, 8, 8), num_classes=2, norm=BATCH)
    conv = cnn.blocks[2].conv2  # 64 -> 64 channels, 3x3
    initialize(cnn, {"name": "kaiming_normal", "mode": "fan_out"}, cnn.activation)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)


@pytest.mark.parametrize("activation, gain", [("relu", math.sqrt(2)), ("tanh", 5 / 3), ("sigmoid", 1.0)])
def test_orthogonal_rows_are_orthogonal_with_the_activation_gain(activation, gain):
    mlp = first_linear(activation, fan_in=256, fan_out=256)
    initialize(mlp, {"name": "orthogonal"}, mlp.activation)
    w = mlp[1].weight
    assert torch.allclose(w @ w.T, gain**2 * torch.eye(256), atol=1e-4)
    cnn = CNN(depth=8, width=4, activation=activation, input_shape=(1, 8, 8), num_classes=2, norm=BATCH)
    initialize(cnn, {"name": "orthogonal"}, cnn.activation)
    flat = cnn.blocks[1].conv1.weight.flatten(1)  # 8 x 36: 8 orthogonal rows
    assert torch.allclose(flat @ flat.T, gain**2 * torch.eye(8), atol=1e-5)


def test_normal_std_is_the_std_knob():
    layer = first_linear(fan_in=1000, fan_out=1000)
    initialize(layer, {"name": "normal", "std": 0.05}, "relu")
    assert layer[1].weight.std().item() == pytest.approx(0.05, rel=0.01)
    assert layer[1].weight.mean().item() == pytest.approx(0.0, abs=2e-4)
    with pytest.raises(ConfigError, match=r"initialization.std=0"):
        initialize(layer, {"name": "normal", "std": 0}, "relu")


@pytest.mark.parametrize("norm", [NO_NORM, BATCH], ids=["no_norm", "batch"])
def test_constant_init_keeps_hidden_units_identical_after_an_sgd_step(norm):
    """The symmetry problem: equal weights give equal units, equal gradients, equal updates (SGD steps)."""
    images, labels = load_digits()
    x = images[:256].float()
    x = (x - x.mean()) / x.std()
    mlp = MLP([32, 32], input_shape=(1, 8, 8), num_classes=10, norm=norm)
    initialize(mlp, {"name": "constant", "value": 0.05}, mlp.activation)
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    assert all(torch.equal(m.weight, torch.full_like(m.weight, 0.05)) for m in linears)
    before = [m.weight.detach().clone() for m in linears]
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.5)
    for _ in range(2):  # step 1 moves only the output layer: equal logits send back gradients that sum to 0
        optimizer.zero_grad()
        F.cross_entropy(mlp(x), labels[:256]).backward()
        optimizer.step()
    for layer, old in zip(linears[:2], before):
        assert not torch.equal(layer.weight, old)  # the step did change the weights ...
        assert torch.allclose(layer.weight, layer.weight[:1].expand_as(layer.weight), atol=1e-7)  # ... all rows alike
    hidden = nn.Sequential(*list(mlp)[:7])(x)  # after the second hidden layer's activation
    assert torch.allclose(hidden, hidden[:, :1].expand_as(hidden), atol=1e-6)


@pytest.mark.parametrize("name", [n for n in INITIALIZATIONS if n != "default"])
def test_every_init_zeroes_biases_and_resets_norms(name):
    mlp = MLP([8, 8], input_shape=(4,), num_classes=3, norm=BATCH)
    with torch.no_grad():
        for p in mlp.parameters():
            p.fill_(3.0)
    initialize(mlp, {"name": name}, mlp.activation)
    assert torch.equal(mlp[-1].bias, torch.zeros(3))
    for bn in (mlp[2], mlp[5]):
        assert torch.equal(bn.weight, torch.ones(8)) and torch.equal(bn.bias, torch.zeros(8))


def test_default_init_leaves_the_model_alone():
    mlp = MLP([8], input_shape=(4,), num_classes=2, norm=BATCH)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    initialize(mlp, {"name": "default", "zero_init_residual": False}, mlp.activation)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def test_bad_initialization_values_name_the_key_and_the_choices():
    layer = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="initialization='he'.*" + ", ".join(INITIALIZATIONS)):
        initialize(layer, {"name": "he"})
    with pytest.raises(ConfigError, match=r"initialization.mode='fan_avg'.*fan_in or fan_out"):
        initialize(layer, {"name": "kaiming_uniform", "mode": "fan_avg"})
    with pytest.raises(ConfigError, match=r"zero_init_residual='yes'"):
        initialize(layer, {"name": "default", "zero_init_residual": "yes"})


# --- zero_init_residual ------------------------------------------------------------------------------------


@pytest.mark.parametrize("init, norm", [(name, "batch") for name in INITIALIZATIONS] +
                         [("kaiming_normal", name) for name in PER_SAMPLE_NORMS])
def test_zero_init_residual_makes_every_block_its_shortcut(init, norm):
    torch.manual_seed(0)
    cnn = CNN(depth=14, width=4, input_shape=(3, 8, 8), num_classes=5, norm={"name": norm, "num_groups": 2})
    initialize(cnn, {"name": init, "zero_init_residual": True}, cnn.activation)
    for block in cnn.blocks:
        assert torch.equal(block.norm2.weight, torch.zeros_like(block.norm2.weight))
        assert torch.equal(block.norm1.weight, torch.ones_like(block.norm1.weight))
    h = cnn.stem(torch.randn(4, 3, 8, 8, generator=gen(0)))
    out = cnn.blocks(h)
    for block in cnn.blocks:  # each block is relu(shortcut(x)): with x >= 0, the shortcut itself
        assert torch.equal(block(h), block.act2(block.shortcut(h)))
        h = block.shortcut(h)
    assert torch.equal(out, h)  # the whole stack: subsample and zero-pad, nothing else


def test_zero_init_residual_is_refused_where_it_means_nothing():
    on = {"name": "kaiming_normal", "zero_init_residual": True}
    with pytest.raises(ConfigError, match=r"zero_init_residual=true.*normalization=none"):
        initialize(CNN(depth=8, width=2, input_shape=(1, 4, 4), num_classes=2, norm=NO_NORM), on)
    with pytest.raises(ConfigError, match=r"zero_init_residual=true: CNN has no residual blocks"):
        initialize(CNN(depth=8, width=2, residual=False, input_shape=(1, 4, 4), num_classes=2, norm=BATCH), on)
    with pytest.raises(ConfigError, match=r"zero_init_residual=true: MLP has no residual blocks"):
        initialize(MLP([4], input_shape=(3,), num_classes=2, norm=BATCH), on)


# --- the CNN family ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [20, 56])
@pytest.mark.parametrize("residual", [True, False])
def test_cnn_depth_counts_weighted_layers(depth, residual):
    cnn = CNN(depth=depth, width=2, residual=residual, input_shape=(3, 32, 32), num_classes=10, norm=BATCH)
    assert count_weighted_layers(cnn) == depth


@pytest.mark.parametrize("residual", [True, False])
def test_resnet20_has_269722_parameters_with_option_a_shortcuts(residual):
    cnn = CNN(depth=20, width=16, stages=3, residual=residual, input_shape=(3, 32, 32), num_classes=10, norm=BATCH)
    assert sum(p.numel() for p in cnn.parameters()) == 269722


def test_residual_must_be_true_or_false():
    """model.residual=null built a plain net without a word (the skip connections are read by truthiness)."""
    with pytest.raises(ConfigError, match=r"model.residual=None: choose true .* or false"):
        build_model(compose_cfg(["model=cnn", "model.residual=null"]), (1, 8, 8), 10)


@pytest.mark.parametrize("overrides, message", [
    (["initialization.zero_init_residual=true"], "zero_init_residual=true: MLP has no residual blocks"),
    (["model=cnn", "model.residual=false", "initialization.zero_init_residual=true"], "CNN has no residual blocks"),
    (["model=cnn", "normalization=none", "initialization.zero_init_residual=true"], "normalization=none has no norms"),
    (["initialization=kaiming_normal", "initialization.mode=fan_avg"], "initialization.mode='fan_avg'"),
])
def test_the_dry_run_refuses_an_initialization_that_training_refuses(overrides, message):
    """The dry run built the model but never the initialization: it drew the lr curve (exit 0) of a run that
    `train` refuses (exit 2). build_model now checks cfg.initialization against the model it built."""
    from trainlab.dry_run import lr_curve

    cfg = compose_cfg([*overrides, "trainer.max_epochs=1", "data.batch_size=512"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        lr_curve(cfg)
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_model(cfg, (1, 8, 8), 10)


def test_build_model_checks_the_initialization_without_applying_it():
    cfg = compose_cfg(["model=cnn", "model.depth=8", "initialization=constant",
                       "initialization.zero_init_residual=true"])
    torch.manual_seed(0)
    model = build_model(cfg, (1, 8, 8), 10)
    assert model.blocks[0].conv1.weight.std() > 0 and torch.equal(model.blocks[0].norm2.weight, torch.ones(16))


# --- torchvision ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, classes", [((3, 32, 32), 10), ((1, 8, 8), 7)])
def test_torchvision_resnet18_on_small_images_has_a_cifar_stem(shape, classes):
    model = TorchvisionModel("resnet18", input_shape=shape, num_classes=classes, norm=BATCH)
    conv1 = model.net.conv1
    assert (conv1.in_channels, conv1.kernel_size, conv1.stride) == (shape[0], (3, 3), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.train()(torch.randn(2, *shape, generator=gen(0))).shape == (2, classes)
    assert model.activation == "relu"
    assert len(model.residual_norms()) == 8  # resnet18: 8 basic blocks


def test_torchvision_resnet18_on_large_images_keeps_the_imagenet_stem():
    model = TorchvisionModel("resnet18", input_shape=(1, 96, 96), num_classes=3, norm=BATCH)
    conv1 = model.net.conv1
    assert (conv1.in_channels, conv1.kernel_size, conv1.stride) == (1, (7, 7), (2, 2))
    assert isinstance(model.net.maxpool, nn.MaxPool2d)


def test_torchvision_other_families_read_the_data_channels_and_set_their_dropout():
    model = TorchvisionModel("mobilenet_v3_small", input_shape=(1, 32, 32), num_classes=4, norm=BATCH, dropout=0.3)
    assert model.net.features[0][0].in_channels == 1
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3]
    assert model(torch.randn(2, 1, 32, 32, generator=gen(0))).shape == (2, 4)
    plain = TorchvisionModel("mobilenet_v3_small", input_shape=(3, 32, 32), num_classes=4, norm=BATCH)
    assert [m.p for m in plain.modules() if isinstance(m, nn.Dropout)] == [0.0]  # not torchvision's default 0.2


@pytest.mark.parametrize("name, expected_std", [
    ("densenet121", math.sqrt(2 / 49)),  # Kaiming normal by fan-in: 7x7 of one channel (PyTorch's default: 0.082)
    ("squeezenet1_1", math.sqrt(2 / 9)),  # Kaiming uniform by fan-in: 3x3 of one channel (the default: 0.19)
    ("mobilenet_v3_small", math.sqrt(2 / (16 * 9))),  # Kaiming normal by fan-out, as with three channels
])
def test_torchvision_stems_for_other_channels_get_their_architectures_own_initialization(name, expected_std):
    """The first conv was rebuilt for the data's channels after the architecture's initialization had run, so it got
    PyTorch's default (uniform, 1/sqrt(3 fan_in)) instead of its family's; it is now built for them, and initialized
    with the rest."""
    torch.manual_seed(0)
    model = TorchvisionModel(name, input_shape=(1, 64, 64), num_classes=4, norm=BATCH)
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert stem.in_channels == 1
    assert stem.weight.std().item() == pytest.approx(expected_std, rel=0.15)


def test_a_torchvision_stem_that_is_not_the_first_conv_built_for_rgb_is_refused(monkeypatch):
    import trainlab.models

    monkeypatch.setattr(trainlab.models, "_build_torchvision",
                        lambda *args: nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.LazyLinear(4)))
    with pytest.raises(ConfigError, match=r"model.name=resnet18: its first conv is not the one built for three "
                                          r"input channels, so it cannot be fitted to 1-channel images"):
        TorchvisionModel("resnet18", input_shape=(1, 96, 96), num_classes=4, norm=BATCH)


def test_torchvision_refusals_say_why():
    with pytest.raises(ConfigError, match=r"model.name='resnet19' is not a torchvision classifier.*resnet18"):
        TorchvisionModel("resnet19", input_shape=(3, 32, 32), num_classes=10, norm=BATCH)
    with pytest.raises(ConfigError, match=r"normalization=layer with model=torchvision.*own normalization"):
        TorchvisionModel("resnet18", input_shape=(3, 32, 32), num_classes=10, norm={"name": "layer"})
    with pytest.raises(ConfigError, match=r"regularization.dropout=0.1 with model.name=resnet18.*no dropout knob"):
        TorchvisionModel("resnet18", input_shape=(3, 32, 32), num_classes=10, norm=BATCH, dropout=0.1)
    with pytest.raises(ConfigError, match=r"model.name=squeezenet1_1 cannot take \[1, 8, 8\] images"):
        TorchvisionModel("squeezenet1_1", input_shape=(1, 8, 8), num_classes=10, norm=BATCH)


def test_zero_init_residual_on_a_torchvision_resnet():
    model = TorchvisionModel("resnet18", input_shape=(1, 8, 8), num_classes=3, norm=BATCH)
    initialize(model, {"name": "default", "zero_init_residual": True}, model.activation)
    assert all(torch.equal(m.bn2.weight, torch.zeros(m.bn2.num_features)) for m in model.net.modules()
               if type(m).__name__ == "BasicBlock")
    assert torch.equal(model.net.bn1.weight, torch.ones(64))


# --- every option of the model, normalization and initialization groups, composed for real ---------------------

OPTIONS = [(group, path.stem) for group in ("model", "normalization", "initialization")
           for path in sorted((CONF_DIR / group).glob("*.yaml"))]
NORM_TYPES = {"none": (), "batch": (nn.BatchNorm1d,), "layer": (nn.LayerNorm,), "group": (nn.GroupNorm,),
              "instance": (nn.InstanceNorm2d,)}


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_runs_on_digits_shaped_input(group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("normalization", "instance"):
        overrides.append("model=cnn")  # instance norm needs feature maps; test_instance_norm_on_flat_features...
    cfg = compose_cfg(overrides)
    torch.manual_seed(0)
    model = build_model(cfg, (1, 8, 8), 10)
    initialize(model, cfg.initialization, model.activation)
    assert cfg.initialization.zero_init_residual is False
    logits = model(torch.randn(8, 1, 8, 8, generator=gen(0)))
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()
    if group == "model":
        assert type(model).__name__ == {"mlp": "MLP", "cnn": "CNN", "torchvision": "TorchvisionModel"}[option]
    if group == "normalization":
        kinds = {type(m) for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm,
                                                                      nn.GroupNorm))}
        assert kinds == set(NORM_TYPES[option])
    if group == "initialization" and option != "default":
        assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in model.modules()
                   if isinstance(m, nn.Linear) and m.bias is not None)


def test_normal_std_override_composes():
    assert compose_cfg(["initialization=normal"]).initialization.std == 0.01
    cfg = compose_cfg(["initialization=normal", "initialization.std=0.05", "model.hidden=[1024]"])
    torch.manual_seed(0)
    model = build_model(cfg, (1, 8, 8), 10)
    initialize(model, cfg.initialization, model.activation)
    assert model[1].weight.std().item() == pytest.approx(0.05, rel=0.02)  # 64 x 1024 weights


def test_model_knobs_compose():
    cfg = compose_cfg(["model=cnn", "model.activation=leaky_relu", "model.negative_slope=0.2", "model.depth=8",
                       "initialization=kaiming_normal", "initialization.zero_init_residual=true",
                       "normalization=group", "normalization.num_groups=4"])
    model = build_model(cfg, (1, 8, 8), 10)
    initialize(model, cfg.initialization, model.activation)
    assert {m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)} == {0.2}
    assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {4}
    assert all(torch.equal(b.norm2.weight, torch.zeros(b.norm2.num_channels)) for b in model.blocks)
    with pytest.raises(ConfigError, match="normalization=instance"):
        build_model(compose_cfg(["normalization=instance"]), (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="normalization=none with model=torchvision"):
        build_model(compose_cfg(["model=torchvision", "normalization=none"]), (1, 8, 8), 10)


def test_torchvision_batch_norms_take_normalization_momentum_and_eps():
    """They kept torch's 0.1 and 1e-5 whatever the config said, and the run exited 0."""
    model = TorchvisionModel("resnet18", input_shape=(3, 32, 32), num_classes=4,
                             norm={"name": "batch", "momentum": 0.5, "eps": 1e-3})
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all((m.momentum, m.eps) == (0.5, 1e-3) for m in norms)


def test_dropout_on_a_linear_model_is_warned_of_and_normalization_named_absent(caplog):
    caplog.set_level("WARNING", logger="trainlab")
    model = MLP([], input_shape=(1, 8, 8), num_classes=10, norm=BATCH, dropout=0.5)
    assert not any(isinstance(m, (nn.Dropout, nn.BatchNorm1d)) for m in model.modules())
    assert "regularization.dropout=0.5 with model.hidden=[]: a linear model has no hidden layer to drop out of" in caplog.text
