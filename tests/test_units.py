"""Unit tests of trainlab's building blocks: exact behaviour on small, seeded inputs."""

from __future__ import annotations

import copy
import math
import os
import pathlib
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra._internal.utils import _locate
from omegaconf import OmegaConf, open_dict
from torch import nn

import trainlab
from trainlab import augment, checkpoint, data, initialization, models, optim, schedules
from trainlab.config import (AugmentationConfig, ConfigError, DigitsConfig, SyntheticConfig, register_configs,
                             slug, validate)
from trainlab.early_stopping import EarlyStopping

BATCH = {"name": "batch"}
NO_NORM = {"name": "none"}
CONF_DIR = str(pathlib.Path(trainlab.__file__).parent / "conf")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distinct_images(n: int, c: int = 3, h: int = 5, w: int = 5) -> torch.Tensor:
    return (torch.arange(n * c * h * w, dtype=torch.float32) + 1).view(n, c, h, w)


# --- augment.hflip ---------------------------------------------------------------------------------


def test_hflip_p1_reverses_columns_of_every_image():
    images = distinct_images(6)
    assert torch.equal(augment.hflip(images, 1.0, gen(0)), images.flip(-1))


def test_hflip_p0_is_identity():
    images = distinct_images(6)
    assert torch.equal(augment.hflip(images, 0.0, gen(0)), images)


def test_hflip_half_flips_about_half_and_each_image_is_whole_or_mirrored():
    images = distinct_images(1000, c=1, h=2, w=3)
    out = augment.hflip(images, 0.5, gen(123))
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    kept = (out == images).flatten(1).all(1)
    assert torch.equal(flipped ^ kept, torch.ones(1000, dtype=torch.bool))
    assert 0.45 <= flipped.float().mean().item() <= 0.55


def test_hflip_same_seed_same_output_other_seed_differs():
    images = distinct_images(64)
    first = augment.hflip(images, 0.5, gen(7))
    assert torch.equal(first, augment.hflip(images, 0.5, gen(7)))
    assert not torch.equal(first, augment.hflip(images, 0.5, gen(8)))


# --- augment.random_crop ---------------------------------------------------------------------------


def crop_offsets(out: torch.Tensor, padded: torch.Tensor, padding: int) -> list[list[tuple[int, int]]]:
    """For each output image, every (dy, dx) whose window of the padded input equals it."""
    h, w = out.shape[-2:]
    found = []
    for i in range(out.shape[0]):
        found.append([(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                      if torch.equal(out[i], padded[i, :, dy:dy + h, dx:dx + w])])
    return found


def test_random_crop_padding_0_is_identity():
    images = distinct_images(4)
    assert torch.equal(augment.random_crop(images, 0, gen(0)), images)
    assert torch.equal(augment.random_crop(images, 0, gen(0), mode="reflect"), images)


def test_random_crop_zeros_is_a_window_of_the_zero_padded_image():
    images = distinct_images(8)
    out = augment.random_crop(images, 2, gen(1), mode="zeros")
    assert out.shape == images.shape
    offsets = crop_offsets(out, F.pad(images, (2, 2, 2, 2)), 2)
    assert all(len(o) == 1 for o in offsets)


def test_random_crop_reflect_is_a_window_of_the_reflect_padded_image():
    images = distinct_images(8)
    out = augment.random_crop(images, 2, gen(2), mode="reflect")
    offsets = crop_offsets(out, F.pad(images, (2, 2, 2, 2), mode="reflect"), 2)
    assert all(len(o) >= 1 for o in offsets)
    assert (out != 0).all()  # reflect padding never brings in zeros (inputs are all >= 1)


def test_random_crop_offsets_differ_per_sample_and_cover_0_to_2p():
    images = distinct_images(400, c=1, h=4, w=4)
    out = augment.random_crop(images, 1, gen(3))
    offsets = {o[0] for o in crop_offsets(out, F.pad(images, (1, 1, 1, 1)), 1)}
    assert offsets == {(dy, dx) for dy in range(3) for dx in range(3)}


def test_random_crop_same_seed_same_output():
    images = distinct_images(16)
    assert torch.equal(augment.random_crop(images, 2, gen(5)), augment.random_crop(images, 2, gen(5)))


# --- augment.build_augment -------------------------------------------------------------------------


def aug_node(**kwargs):
    return OmegaConf.structured(AugmentationConfig(**kwargs))


def build(**kwargs):
    """The device-path augment of these keys, for 10 classes of 3x5x5 images."""
    return augment.build_augment(aug_node(**kwargs), 10, (3, 5, 5))


def apply(fn, images, generator):
    """The augmented images of fn on `images` (labels 0..N-1), checking that the labels pass through."""
    labels = torch.arange(images.shape[0])
    out, targets = fn(images, labels, generator)
    assert torch.equal(targets, labels)
    return out


def test_build_augment_all_off_is_none():
    assert build() is None


def test_build_augment_flip_only_with_p1_flips_every_image():
    fn = build(hflip=1.0)
    assert callable(fn)
    images = distinct_images(4)
    assert torch.equal(apply(fn, images, gen(0)), images.flip(-1))


def test_build_augment_crop_only_matches_random_crop_with_same_generator():
    fn = build(crop_padding=2, crop_padding_mode="reflect")
    images = distinct_images(6)
    assert torch.equal(apply(fn, images, gen(9)), augment.random_crop(images, 2, gen(9), "reflect"))


def test_build_augment_crop_then_flip_order():
    fn = build(crop_padding=1, hflip=1.0)
    images = distinct_images(6)
    assert torch.equal(apply(fn, images, gen(4)), augment.random_crop(images, 1, gen(4)).flip(-1))


# --- schedules -------------------------------------------------------------------------------------


def test_cosine_endpoints_and_midpoint():
    assert schedules.cosine(0.0) == 1.0
    assert schedules.cosine(0.0, 0.2) == pytest.approx(1.0)
    assert schedules.cosine(0.5, 0.2) == pytest.approx(0.6)
    assert schedules.cosine(0.5) == pytest.approx(0.5)
    assert schedules.cosine(1.0, 0.2) == pytest.approx(0.2)
    assert schedules.cosine(1.7, 0.2) == pytest.approx(0.2)  # progress past 1 stays at the floor


def test_constant_is_one_everywhere():
    assert [schedules.constant(p) for p in (0.0, 0.3, 1.0)] == [1.0, 1.0, 1.0]


def test_lr_factor_warmup_ramp_then_schedule_starts_at_one():
    factors = [schedules.lr_factor(s, 20, 4, schedules.cosine) for s in range(6)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    assert factors[5] == pytest.approx(schedules.cosine(1 / 16))


def test_lr_factor_without_warmup_starts_the_schedule_at_step_0():
    assert schedules.lr_factor(0, 10, 0, schedules.cosine) == 1.0
    assert schedules.lr_factor(5, 10, 0, schedules.cosine) == pytest.approx(0.5)


def sgd(lr: float = 0.2) -> torch.optim.SGD:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr)


def run_scheduler(cfg: dict, steps_per_epoch: int, max_epochs: int, lr: float = 0.2) -> list[float]:
    optimizer = sgd(lr)
    scheduler = schedules.build_scheduler(OmegaConf.create(cfg), optimizer, steps_per_epoch, max_epochs)
    lrs = []
    for _ in range(steps_per_epoch * max_epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_build_scheduler_cosine_with_warmup_follows_closed_form_every_step():
    lrs = run_scheduler({"name": "cosine", "warmup_epochs": 1, "min_lr_fraction": 0.1}, 4, 3)
    expected = [0.2 * (k + 1) / 4 for k in range(4)]
    expected += [0.2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 4) / 8))) for k in range(4, 12)]
    assert lrs == pytest.approx(expected)


def test_build_scheduler_none_with_fractional_warmup_then_constant():
    lrs = run_scheduler({"name": "none", "warmup_epochs": 0.5}, 4, 2, lr=0.1)
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])


def test_build_scheduler_cosine_without_warmup():
    lrs = run_scheduler({"name": "cosine", "warmup_epochs": 0, "min_lr_fraction": 0.0}, 2, 2, lr=1.0)
    assert lrs == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])


def test_build_scheduler_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError, match=r"scheduler='cosin'.*choose one of none, cosine"):
        schedules.build_scheduler(OmegaConf.create({"name": "cosin", "warmup_epochs": 0}), sgd(), 4, 3)


@pytest.mark.parametrize("cfg", [{"name": "cosine", "warmup_epochs": 0, "gamma": 0.5},
                                 {"name": "none", "warmup_epochs": 0, "min_lr_fraction": 0.1}])
def test_build_scheduler_unknown_knob_raises(cfg):
    with pytest.raises(ConfigError, match=rf"scheduler={cfg['name']}: .*unexpected keyword"):
        schedules.build_scheduler(OmegaConf.create(cfg), sgd(), 4, 3)


@pytest.mark.parametrize("warmup", [3, 5, -1])
def test_build_scheduler_warmup_not_shorter_than_run_raises(warmup):
    with pytest.raises(ConfigError, match=r"scheduler.warmup_epochs=.*trainer.max_epochs=3"):
        schedules.build_scheduler(OmegaConf.create({"name": "none", "warmup_epochs": warmup}), sgd(), 4, 3)


# --- models ----------------------------------------------------------------------------------------


def test_mlp_layer_order_with_batch_norm_and_dropout():
    mlp = models.MLP([8, 4], "relu", input_shape=(1, 2, 3), num_classes=3, norm=BATCH, dropout=0.25)
    assert [type(m) for m in mlp] == [nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout,
                                      nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]
    assert [(m.in_features, m.out_features, m.bias is not None) for m in mlp if isinstance(m, nn.Linear)] == [
        (6, 8, False), (8, 4, False), (4, 3, True)]
    assert mlp[4].p == 0.25


def test_mlp_without_norm_keeps_biases_and_has_no_dropout_at_zero():
    mlp = models.MLP([5], "tanh", input_shape=(4,), num_classes=2, norm=NO_NORM)
    assert [type(m) for m in mlp] == [nn.Flatten, nn.Linear, nn.Identity, nn.Tanh, nn.Linear]
    assert mlp[1].bias is not None and mlp[4].bias is not None
    assert mlp.activation == "tanh"


def test_batch_norm_takes_eps_and_momentum_from_cfg():
    mlp = models.MLP([3], input_shape=(2,), num_classes=2, norm={"name": "batch", "eps": 1e-3, "momentum": 0.2})
    assert (mlp[2].eps, mlp[2].momentum) == (1e-3, 0.2)


def test_unknown_norm_raises():
    with pytest.raises(ConfigError, match=r"normalization='weight'.*none, batch, layer, instance, group"):
        models.MLP([3], input_shape=(2,), num_classes=2, norm={"name": "weight"})


@pytest.mark.parametrize("depth", [20, 56])
@pytest.mark.parametrize("residual", [True, False])
def test_cnn_has_depth_weighted_layers(depth, residual):
    cnn = models.CNN(depth=depth, width=4, residual=residual, input_shape=(3, 32, 32), num_classes=10, norm=BATCH)
    assert models.count_weighted_layers(cnn) == depth


def test_cnn_resnet20_parameter_count_is_option_a():
    # Option A shortcuts add no parameters. By hand: stem 432 + 32, stage 1 3 * (2 * 2304 + 64) = 14016,
    # stage 2 (4608 + 9216 + 128) + 2 * (2 * 9216 + 128) = 51072, stage 3 (18432 + 36864 + 256)
    # + 2 * (2 * 36864 + 256) = 203520, head 650: 269722. (272474 is the option-B count: + 1x1 projections
    # 16*32 + 32*64 and their batch norms 64 + 128.)
    residual = models.CNN(depth=20, width=16, residual=True, input_shape=(3, 32, 32), num_classes=10, norm=BATCH)
    plain = models.CNN(depth=20, width=16, residual=False, input_shape=(3, 32, 32), num_classes=10, norm=BATCH)
    assert sum(p.numel() for p in residual.parameters()) == 269722
    assert sum(p.numel() for p in plain.parameters()) == 269722


def test_cnn_conv_bias_only_without_norm():
    with_bn = models.CNN(depth=8, width=4, input_shape=(1, 8, 8), num_classes=3, norm=BATCH)
    without = models.CNN(depth=8, width=4, input_shape=(1, 8, 8), num_classes=3, norm=NO_NORM)
    assert all(m.bias is None for m in with_bn.modules() if isinstance(m, nn.Conv2d))
    assert all(m.bias is not None for m in without.modules() if isinstance(m, nn.Conv2d))


def test_cnn_residual_and_plain_differ_with_identical_weights():
    torch.manual_seed(0)
    residual = models.CNN(depth=8, width=4, residual=True, input_shape=(3, 8, 8), num_classes=5, norm=BATCH).eval()
    plain = models.CNN(depth=8, width=4, residual=False, input_shape=(3, 8, 8), num_classes=5, norm=BATCH).eval()
    plain.load_state_dict(residual.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(residual.state_dict().values(), plain.state_dict().values()))
    x = torch.randn(4, 3, 8, 8, generator=gen(0))
    assert not torch.allclose(residual(x), plain(x))


def test_cnn_with_residual_false_on_both_equals_itself():
    torch.manual_seed(0)
    a = models.CNN(depth=8, width=4, residual=False, input_shape=(3, 8, 8), num_classes=5, norm=BATCH).eval()
    b = models.CNN(depth=8, width=4, residual=False, input_shape=(3, 8, 8), num_classes=5, norm=BATCH).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 8, 8, generator=gen(1))
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_cnn_output_shape(shape):
    cnn = models.CNN(depth=20, width=4, input_shape=shape, num_classes=10, norm=BATCH)
    assert cnn(torch.randn(5, *shape, generator=gen(0))).shape == (5, 10)


def test_cnn_invalid_depth_lists_valid_depths():
    with pytest.raises(ConfigError, match=r"model.depth=21 .*valid depths: 8, 14, 20, 26, 32, \.\.\."):
        models.CNN(depth=21, input_shape=(3, 32, 32), num_classes=10, norm=BATCH)


def test_cnn_depth_too_small_raises():
    with pytest.raises(ConfigError, match=r"model.depth=2 "):
        models.CNN(depth=2, input_shape=(3, 32, 32), num_classes=10, norm=BATCH)


def test_cnn_rejects_non_image_input():
    with pytest.raises(ConfigError, match=r"the data gives \[64\]"):
        models.CNN(depth=8, input_shape=(64,), num_classes=10, norm=BATCH)


def test_unknown_activation_names_valid_choices():
    with pytest.raises(ConfigError, match=r"'swish'.*relu, leaky_relu, tanh, sigmoid, gelu, elu"):
        models.make_activation("swish")
    with pytest.raises(ConfigError, match=r"'swish'"):
        models.MLP([3], "swish", input_shape=(2,), num_classes=2, norm=BATCH)


@pytest.mark.parametrize("name, kind", [("relu", nn.ReLU), ("leaky_relu", nn.LeakyReLU), ("tanh", nn.Tanh),
                                        ("sigmoid", nn.Sigmoid), ("gelu", nn.GELU), ("elu", nn.ELU)])
def test_activation_name_maps_to_module_type(name, kind):
    assert type(models.make_activation(name)) is kind
    mlp = models.MLP([3], name, input_shape=(2,), num_classes=2, norm=BATCH)
    assert type(mlp[3]) is kind
    cnn = models.CNN(depth=8, width=2, activation=name, input_shape=(1, 4, 4), num_classes=2, norm=BATCH)
    assert type(cnn.stem[2]) is kind and type(cnn.blocks[0].act2) is kind


def test_leaky_relu_slope_is_0_01():
    assert models.make_activation("leaky_relu").negative_slope == 0.01


def test_batch_norm_eval_uses_running_stats():
    torch.manual_seed(0)
    mlp = models.MLP([16], input_shape=(6,), num_classes=3, norm=BATCH)
    x = torch.randn(8, 6, generator=gen(0)) * 3 + 2
    mlp.train()
    train_out = mlp(x)
    mlp.eval()
    batch_out = mlp(x)
    single_out = mlp(x[:1])
    other_batch = mlp(torch.cat([x[:1], torch.randn(7, 6, generator=gen(1)) * 10]))
    assert torch.allclose(single_out[0], batch_out[0], atol=1e-6)
    assert torch.allclose(other_batch[0], batch_out[0], atol=1e-6)
    assert not torch.allclose(train_out[0], batch_out[0], atol=1e-3)


def test_build_model_from_cfg_passes_norm_and_dropout():
    cfg = OmegaConf.create({"model": {"_target_": "trainlab.models.CNN", "_partial_": True, "depth": 8, "width": 4},
                            "normalization": {"name": "batch", "momentum": 0.3},
                            "regularization": {"dropout": 0.1}})
    model = models.build_model(cfg, (1, 8, 8), 7)
    assert isinstance(model, models.CNN)
    assert model.blocks[0].drop.p == 0.1 and isinstance(model.blocks[0].drop, nn.Dropout2d)
    assert model.stem[1].momentum == 0.3
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 7)


# --- initialization --------------------------------------------------------------------------------


def seeded_linear(fan_in: int, fan_out: int) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(fan_in, fan_out)


def test_kaiming_normal_relu_fan_in_std_and_zero_bias():
    layer = seeded_linear(1000, 1000)
    initialization.initialize(layer, {"name": "kaiming_normal"}, "relu")
    assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / 1000), rel=0.03)
    assert layer.weight.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert torch.equal(layer.bias, torch.zeros(1000))


def test_kaiming_normal_fan_out_uses_output_width():
    layer = seeded_linear(500, 2000)
    initialization.initialize(layer, {"name": "kaiming_normal", "mode": "fan_out"}, "relu")
    assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / 2000), rel=0.03)


@pytest.mark.parametrize("activation, gain", [("tanh", 5 / 3), ("sigmoid", 1.0), ("gelu", 1.534),
                                              ("leaky_relu", math.sqrt(2 / (1 + 0.01**2)))])
def test_kaiming_normal_gain_follows_activation(activation, gain):
    layer = seeded_linear(1000, 1000)
    initialization.initialize(layer, OmegaConf.create({"name": "kaiming_normal", "mode": "fan_in"}), activation)
    assert layer.weight.std().item() == pytest.approx(gain / math.sqrt(1000), rel=0.03)


def test_kaiming_normal_reaches_conv_layers_inside_a_cnn():
    torch.manual_seed(0)
    cnn = models.CNN(depth=8, width=32, input_shape=(3, 8, 8), num_classes=4, norm=NO_NORM)
    initialization.initialize(cnn, {"name": "kaiming_normal"}, "relu")
    conv = cnn.blocks[2].conv2  # third stage: 128 -> 128 channels, fan_in 128 * 9
    assert conv.weight.shape == (128, 128, 3, 3)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (128 * 9)), rel=0.03)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in cnn.modules() if isinstance(m, nn.Conv2d))


def test_default_initialization_leaves_weights_unchanged():
    model = models.MLP([8], input_shape=(4,), num_classes=2, norm=NO_NORM)
    before = copy.deepcopy(model.state_dict())
    initialization.initialize(model, {"name": "default"})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_initialization_raises():
    with pytest.raises(ConfigError, match=r"initialization='xavier'.*default, kaiming_normal"):
        initialization.initialize(nn.Linear(2, 2), {"name": "xavier"})


def test_unknown_initialization_mode_raises():
    with pytest.raises(ConfigError, match=r"initialization.mode='fan_avg'"):
        initialization.initialize(nn.Linear(2, 2), {"name": "kaiming_normal", "mode": "fan_avg"})


# --- optim -----------------------------------------------------------------------------------------


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))


def opt_cfg(target: str = "torch.optim.SGD", lr: float = 0.1, weight_decay: float = 0.01, **extra):
    return OmegaConf.create({"optimizer": {"_target_": target, "_partial_": True, "lr": lr,
                                           "decay_norm_and_bias": False, **extra},
                             "regularization": {"dropout": 0.0, "weight_decay": weight_decay}})


def ids(params) -> list[int]:
    return [id(p) for p in params]


def test_parameter_groups_exempt_biases_and_norm_params():
    net = small_net()
    decay, no_decay = optim.parameter_groups(net, decay_norm_and_bias=False)
    assert ids(decay) == ids([net[0].weight, net[3].weight])
    assert ids(no_decay) == ids([net[0].bias, net[1].weight, net[1].bias, net[3].bias])


def test_parameter_groups_decay_everything_when_asked():
    net = small_net()
    decay, no_decay = optim.parameter_groups(net, decay_norm_and_bias=True)
    assert ids(decay) == ids(net.parameters())
    assert no_decay == []


def test_parameter_groups_skip_frozen_params():
    net = small_net()
    net[0].weight.requires_grad_(False)
    decay, no_decay = optim.parameter_groups(net, decay_norm_and_bias=False)
    assert ids(decay) == ids([net[3].weight])
    assert len(no_decay) == 4


def zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)


def test_build_optimizer_groups_carry_decoupled_decay():
    opt = optim.build_optimizer(opt_cfg(), small_net())
    assert isinstance(opt, torch.optim.SGD)
    assert [(g["name"], g["weight_decay_decoupled"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        ("decay", 0.01, 0.1, 0), ("no_decay", 0.0, 0.1, 0)]


def test_without_weight_decay_one_group_holds_the_decayed_parameters_first():
    net = small_net()
    opt = optim.build_optimizer(opt_cfg(weight_decay=0.0), net)
    decay, no_decay = optim.parameter_groups(net, decay_norm_and_bias=False)
    assert [g["name"] for g in opt.param_groups] == ["all"]
    assert opt.param_groups[0]["params"] == decay + no_decay and optim.decayed_parameters(opt) == decay


def test_sgd_step_with_zero_grad_applies_decoupled_decay_to_weights_only():
    net = small_net()
    before = copy.deepcopy(net.state_dict())
    opt = optim.build_optimizer(opt_cfg(), net)
    zero_grads(net)
    opt.step()
    after = net.state_dict()
    for key in ("0.weight", "3.weight"):
        assert torch.allclose(after[key], before[key] * (1 - 0.1 * 0.01), rtol=0, atol=1e-8)
        assert not torch.equal(after[key], before[key])
    for key in ("0.bias", "1.weight", "1.bias", "3.bias"):
        assert torch.equal(after[key], before[key])


def test_decoupled_decay_follows_the_groups_current_lr():
    net = small_net()
    before = net[0].weight.detach().clone()
    opt = optim.build_optimizer(opt_cfg(), net)
    for group in opt.param_groups:
        group["lr"] = 0.05  # as a scheduler would set it
    zero_grads(net)
    opt.step()
    assert torch.allclose(net[0].weight, before * (1 - 0.05 * 0.01), rtol=0, atol=1e-8)


def test_zero_weight_decay_leaves_weights_unchanged_on_zero_grad():
    net = small_net()
    before = copy.deepcopy(net.state_dict())
    opt = optim.build_optimizer(opt_cfg(weight_decay=0.0), net)
    zero_grads(net)
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_decay_norm_and_bias_true_decays_everything():
    net = small_net()
    before = copy.deepcopy(net.state_dict())
    cfg = opt_cfg()
    cfg.optimizer.decay_norm_and_bias = True
    opt = optim.build_optimizer(cfg, net)
    assert len(opt.param_groups) == 1
    zero_grads(net)
    opt.step()
    for key in ("0.bias", "1.weight", "1.bias", "3.bias"):
        assert torch.allclose(net.state_dict()[key], before[key] * 0.999, rtol=0, atol=1e-8)


def test_adam_with_decoupled_decay_matches_adamw():
    net = small_net()
    reference = copy.deepcopy(net)
    opt = optim.build_optimizer(opt_cfg("torch.optim.Adam", lr=0.01, weight_decay=0.01), net)
    decay, no_decay = optim.parameter_groups(reference, decay_norm_and_bias=False)
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=0.01)
    g = gen(0)
    for _ in range(3):
        for p, q in zip(net.parameters(), reference.parameters()):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        adamw.step()
    for p, q in zip(net.parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-7)
    assert not torch.equal(net[0].weight, small_net()[0].weight)


def test_optimizer_weight_decay_key_is_rejected():
    cfg = opt_cfg(weight_decay=0.0)
    cfg.optimizer.weight_decay = 0.1
    with pytest.raises(ConfigError, match=r"optimizer.weight_decay: set regularization.weight_decay"):
        optim.build_optimizer(cfg, small_net())


def test_misspelt_optimizer_key_raises_config_error():
    with pytest.raises(ConfigError, match=r"optimizer=torch.optim.SGD: .*momentom"):
        optim.build_optimizer(opt_cfg(momentom=0.9), small_net())


# --- early stopping --------------------------------------------------------------------------------


def feed(stopper: EarlyStopping, values) -> list[tuple[bool, bool]]:
    """(improved, should_stop) after each value, epochs numbered from 1."""
    return [(stopper.update(v, epoch), stopper.should_stop) for epoch, v in enumerate(values, start=1)]


def test_early_stopping_scripted_sequence():
    stopper = EarlyStopping(patience=3, mode="min")
    trace = feed(stopper, [1.0, 0.9, 0.95, 0.93, 0.92])
    assert trace == [(True, False), (True, False), (False, False), (False, False), (False, True)]
    assert (stopper.best, stopper.best_epoch, stopper.bad_epochs) == (0.9, 2, 3)
    assert stopper.reason() == ("early stopping: val/loss did not improve by more than 0 for 3 epochs "
                                "(best 0.9 at epoch 2)")


def test_early_stopping_min_delta():
    stopper = EarlyStopping(patience=5, min_delta=0.05)
    assert stopper.update(1.0, 1) is True
    assert stopper.update(0.9, 2) is True  # 0.9 < 1.0 - 0.05
    assert stopper.update(0.88, 3) is False  # not below 0.9 - 0.05
    assert (stopper.best, stopper.best_epoch, stopper.bad_epochs) == (0.9, 2, 1)


def test_early_stopping_mode_max():
    stopper = EarlyStopping(monitor="val/acc", mode="max", patience=2)
    trace = feed(stopper, [0.5, 0.7, 0.6, 0.7, 0.8])
    assert [improved for improved, _ in trace] == [True, True, False, False, True]
    assert (stopper.best, stopper.best_epoch, stopper.bad_epochs) == (0.8, 5, 0)
    assert not stopper.should_stop


def test_early_stopping_mode_max_stops_after_patience():
    stopper = EarlyStopping(mode="max", patience=2)
    assert [stop for _, stop in feed(stopper, [0.5, 0.4, 0.5])] == [False, False, True]


def test_early_stopping_nan_and_inf_never_improve():
    stopper = EarlyStopping(patience=10)
    assert stopper.update(math.nan, 1) is False
    assert math.isnan(stopper.best)
    assert stopper.update(1.0, 2) is True
    assert stopper.update(math.nan, 3) is False
    assert stopper.update(-math.inf, 4) is False
    assert (stopper.best, stopper.best_epoch, stopper.bad_epochs) == (1.0, 2, 2)


def test_early_stopping_disabled_never_stops():
    stopper = EarlyStopping(patience=1, enabled=False)
    trace = feed(stopper, [1.0, 2.0, 3.0, 4.0])
    assert [stop for _, stop in trace] == [False, False, False, False]
    assert stopper.bad_epochs == 3


def test_early_stopping_state_dict_round_trip():
    stopper = EarlyStopping(patience=3)
    feed(stopper, [1.0, 0.9, 0.95])
    state = stopper.state_dict()
    assert state == {"monitor": "val/loss", "mode": "min", "patience": 3, "min_delta": 0.0, "enabled": True,
                     "best": 0.9, "best_epoch": 2, "bad_epochs": 1}
    restored = EarlyStopping(patience=3)
    restored.load_state_dict(state)
    assert (restored.best, restored.best_epoch, restored.bad_epochs) == (0.9, 2, 1)
    assert feed(restored, [0.99, 0.98]) == [(False, False), (False, True)]


# --- data ------------------------------------------------------------------------------------------


def test_split_index_deterministic_disjoint_covering():
    kept, held = data.split_index(100, 0.25, seed=3)
    kept2, held2 = data.split_index(100, 0.25, seed=3)
    assert torch.equal(kept, kept2) and torch.equal(held, held2)
    assert len(held) == 25 and len(kept) == 75
    assert torch.equal(torch.cat([kept, held]).sort().values, torch.arange(100))
    assert torch.equal(kept, kept.sort().values) and torch.equal(held, held.sort().values)


def test_split_index_rounds_and_holds_out_at_least_one():
    assert len(data.split_index(1797, 0.2, 0)[1]) == 359
    assert len(data.split_index(1438, 0.1, 0)[1]) == 144
    assert len(data.split_index(10, 0.01, 0)[1]) == 1


def test_split_index_other_seed_differs():
    assert not torch.equal(data.split_index(100, 0.25, 0)[1], data.split_index(100, 0.25, 1)[1])


def test_split_index_holding_everything_raises():
    with pytest.raises(ConfigError, match="leaves nothing to train on"):
        data.split_index(10, 1.0, 0)


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


@pytest.fixture(scope="module")
def digits_seed0():
    return data.build_data(OmegaConf.structured(DigitsConfig(split_seed=0)))


def test_load_digits_shape_and_dtype(digits):
    images, labels = digits
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and int(images.max()) == 16
    assert torch.equal(labels.unique(), torch.arange(10))


def test_build_data_digits_splits_are_disjoint_and_cover_everything(digits, digits_seed0):
    images, labels = digits
    d = digits_seed0
    assert (len(d.train), len(d.val), len(d.test)) == (1294, 144, 359)
    assert (d.name, d.num_classes, d.input_shape) == ("digits", 10, (1, 8, 8))
    train_all, test_idx = data.split_index(1797, 0.2, seed=0)
    fit, val = data.split_index(len(train_all), 0.1, seed=0)
    train_idx, val_idx = train_all[fit], train_all[val]
    for split, index in ((d.train, train_idx), (d.val, val_idx), (d.test, test_idx)):
        assert torch.equal(split.images, images[index]) and torch.equal(split.labels, labels[index])
    assert torch.equal(torch.cat([train_idx, val_idx, test_idx]).sort().values, torch.arange(1797))


def test_build_data_test_split_fixed_val_split_seeded(digits_seed0):
    other = data.build_data(OmegaConf.structured(DigitsConfig(split_seed=1)))
    assert torch.equal(other.test.images, digits_seed0.test.images)
    assert torch.equal(other.test.labels, digits_seed0.test.labels)
    assert not torch.equal(other.val.images, digits_seed0.val.images)
    assert len(other.val) == len(digits_seed0.val)


def test_build_data_statistics_come_from_train_split_only(digits_seed0):
    d = digits_seed0
    train_pixels = d.train.images.double()
    assert d.mean.shape == (1,) and d.std.shape == (1,)
    assert d.mean.item() == pytest.approx(train_pixels.mean().item(), rel=1e-5)
    assert d.std.item() == pytest.approx(train_pixels.std().item(), rel=1e-5)
    assert d.mean.item() != pytest.approx(d.test.images.double().mean().item(), rel=1e-3)


def synthetic_cfg(**kwargs):
    base = {"num_samples": 200, "shape": [2, 5, 6], "num_classes": 4, "split_seed": 0}
    return OmegaConf.structured(SyntheticConfig(**{**base, **kwargs}))


def test_build_data_synthetic_shape_classes_and_per_channel_stats():
    d = data.build_data(synthetic_cfg())
    assert (d.name, d.num_classes, d.input_shape) == ("synthetic", 4, (2, 5, 6))
    assert (len(d.train), len(d.val), len(d.test)) == (144, 16, 40)
    assert d.train.images.dtype == torch.uint8
    labels = torch.cat([d.train.labels, d.val.labels, d.test.labels])
    assert torch.equal(labels.bincount(), torch.tensor([50, 50, 50, 50]))
    expected_mean = d.train.images.double().mean(dim=(0, 2, 3))
    assert torch.allclose(d.mean.double(), expected_mean, rtol=1e-5)


def test_make_synthetic_is_seeded():
    a = data.make_synthetic(40, [1, 2, 2], 2, 10.0, seed=1)
    b = data.make_synthetic(40, [1, 2, 2], 2, 10.0, seed=1)
    c = data.make_synthetic(40, [1, 2, 2], 2, 10.0, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("kwargs, message", [({"shape": [5, 6]}, r"data.shape=\[5, 6\]"),
                                             ({"num_classes": 1}, r"data.num_classes=1"),
                                             ({"num_samples": 7}, r"data.num_samples=7")])
def test_build_data_synthetic_invalid_raises(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        data.build_data(synthetic_cfg(**kwargs))


def test_build_data_unknown_name_raises():
    with pytest.raises(ConfigError, match=r"data.name='imagenet'"):
        data.build_data(OmegaConf.create({"name": "imagenet"}))


def id_split(n: int) -> data.Split:
    """Images whose every pixel is the example's index, labels equal to the index."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 2, 3, 3).contiguous()
    return data.Split(images, torch.arange(n))


def loader(n: int = 10, batch_size: int = 4, **kwargs) -> data.DeviceLoader:
    return data.DeviceLoader(id_split(n), torch.zeros(2), torch.ones(2), batch_size, torch.device("cpu"), **kwargs)


def epoch_labels(dl: data.DeviceLoader) -> list[list[int]]:
    return [y.tolist() for _, y in dl]


def test_device_loader_batch_count_with_and_without_drop_last():
    assert (len(loader(10, 4)), loader(10, 4).num_examples) == (3, 10)
    assert (len(loader(10, 4, drop_last=True)), loader(10, 4, drop_last=True).num_examples) == (2, 8)
    assert [len(y) for y in epoch_labels(loader(10, 4))] == [4, 4, 2]
    assert [len(y) for y in epoch_labels(loader(10, 4, drop_last=True))] == [4, 4]
    assert len(loader(12, 4, drop_last=True)) == 3


def test_device_loader_batch_larger_than_split_gives_one_full_batch():
    dl = loader(5, 64, drop_last=True)
    assert (dl.batch_size, len(dl), dl.num_examples) == (5, 1, 5)


def test_device_loader_unshuffled_order_is_sequential():
    assert epoch_labels(loader(10, 4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_device_loader_shuffled_epoch_visits_every_example_once():
    dl = loader(37, 8, shuffle=True, seed=3)
    seen = sum(epoch_labels(dl), [])
    assert sorted(seen) == list(range(37))
    assert seen != list(range(37))


def test_device_loader_order_is_a_function_of_seed_and_epoch():
    a, b = loader(30, 7, shuffle=True, seed=1), loader(30, 7, shuffle=True, seed=1)
    a.set_epoch(4)
    b.set_epoch(4)
    assert epoch_labels(a) == epoch_labels(b)
    assert epoch_labels(a) == epoch_labels(a)  # iterating again repeats the epoch
    b.set_epoch(5)
    assert epoch_labels(a) != epoch_labels(b)
    other_seed = loader(30, 7, shuffle=True, seed=2)
    other_seed.set_epoch(4)
    assert epoch_labels(a) != epoch_labels(other_seed)


def test_device_loader_images_follow_labels():
    for x, y in loader(10, 4, shuffle=True, seed=0):
        assert torch.equal(x, y.float().view(-1, 1, 1, 1).expand(-1, 2, 3, 3))


def test_device_loader_normalises_to_zero_mean_over_an_epoch(digits_seed0):
    d = digits_seed0
    dl = data.DeviceLoader(d.train, d.mean, d.std, 100, torch.device("cpu"), shuffle=True, seed=0)
    xs = torch.cat([x for x, _ in dl])
    assert xs.shape == (1294, 1, 8, 8) and xs.dtype == torch.float32
    assert abs(xs.double().mean().item()) < 1e-5
    assert xs.double().std().item() == pytest.approx(1.0, rel=1e-4)


def test_device_loader_calls_augment_in_pixel_units_only_when_given():
    calls = []

    def spy(images, labels, generator):
        calls.append((images.clone(), generator))
        return images + 1, labels

    mean, std = torch.tensor([2.0, 2.0]), torch.tensor([4.0, 4.0])
    split = id_split(10)
    with_aug = data.DeviceLoader(split, mean, std, 4, torch.device("cpu"), augment=spy)
    batches = list(with_aug)
    assert len(calls) == 3
    assert all(isinstance(g, torch.Generator) for _, g in calls)
    assert torch.equal(calls[0][0], split.images[:4].float())  # raw pixels reach the augmentation
    assert torch.equal(batches[0][0], (split.images[:4].float() + 1 - 2) / 4)
    plain = list(data.DeviceLoader(split, mean, std, 4, torch.device("cpu")))
    assert len(calls) == 3
    assert torch.equal(plain[0][0], (split.images[:4].float() - 2) / 4)


def test_device_loader_augment_generator_is_seeded_by_seed_and_epoch():
    images = id_split(16)
    fn = augment.build_augment(aug_node(hflip=0.5, crop_padding=1), 16, (2, 3, 3))

    def run(seed, epoch):
        dl = data.DeviceLoader(images, torch.zeros(2), torch.ones(2), 16, torch.device("cpu"), seed=seed, augment=fn)
        dl.set_epoch(epoch)
        return next(iter(dl))[0]

    assert torch.equal(run(0, 1), run(0, 1))
    assert not torch.equal(run(0, 1), run(0, 2))


# --- checkpoint ------------------------------------------------------------------------------------

UNPICKLE_CALLS: list[str] = []


def _record(tag: str) -> str:
    UNPICKLE_CALLS.append(tag)
    return tag


class Payload:
    """Unpickling this calls _record: what a malicious checkpoint would do with a worse function."""

    def __reduce__(self):
        return (_record, ("unpickled",))


def test_save_atomic_then_load_round_trips(tmp_path):
    state = {"format_version": checkpoint.FORMAT_VERSION, "epoch": 3, "weights": torch.arange(6.0).view(2, 3),
             "nested": {"name": "x", "values": [1, 2.5, None]}}
    path = tmp_path / "deep" / "dir" / "last.pt"
    checkpoint.save_atomic(state, path)
    loaded = checkpoint.load(path)
    assert loaded.keys() == state.keys()
    assert loaded["format_version"] == checkpoint.FORMAT_VERSION and loaded["epoch"] == 3
    assert torch.equal(loaded["weights"], state["weights"])
    assert loaded["nested"] == {"name": "x", "values": [1, 2.5, None]}


def test_save_atomic_overwrites_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"format_version": 1, "epoch": 1}, path)
    checkpoint.save_atomic({"format_version": 1, "epoch": 2}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert checkpoint.load(path)["epoch"] == 2


def test_save_atomic_failure_keeps_old_file_and_cleans_up(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"format_version": 1, "epoch": 1}, path)
    with pytest.raises(Exception):
        checkpoint.save_atomic({"format_version": 1, "bad": lambda: None}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert checkpoint.load(path)["epoch"] == 1


def test_load_missing_path_raises_with_path(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(ConfigError, match=rf"checkpoint {path} does not exist"):
        checkpoint.load(path)


def test_load_directory_raises_with_path(tmp_path):
    with pytest.raises(ConfigError, match=rf"checkpoint {tmp_path} is a directory"):
        checkpoint.load(tmp_path)


def test_load_truncated_file_raises_with_path(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"format_version": 1, "w": torch.arange(1000.0)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ConfigError, match=rf"checkpoint {path} is corrupted or incomplete"):
        checkpoint.load(path)


def test_load_empty_file_raises_with_path(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"checkpoint {path} "):
        checkpoint.load(path)


def test_load_refuses_to_unpickle_custom_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "payload": Payload()}, path)
    UNPICKLE_CALLS.clear()
    with pytest.raises(ConfigError, match=rf"checkpoint {path} holds objects that are not plain tensors"):
        checkpoint.load(path)
    assert UNPICKLE_CALLS == []


def test_load_without_format_version_raises(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ConfigError, match=rf"checkpoint {path} is not a trainlab checkpoint"):
        checkpoint.load(path)


def draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()


def test_rng_state_restores_python_numpy_and_torch():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = checkpoint.rng_state()
    first = draws()
    checkpoint.set_rng_state(state)
    assert draws() == first


def test_rng_state_survives_a_checkpoint_file(tmp_path):
    random.seed(4)
    np.random.seed(5)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    torch.manual_seed(6)
    path = tmp_path / "rng.pt"
    checkpoint.save_atomic({"format_version": 1, "rng": checkpoint.rng_state()}, path)
    first = draws()
    draws()
    checkpoint.set_rng_state(checkpoint.load(path)["rng"])
    assert draws() == first


# --- config.slug -----------------------------------------------------------------------------------


def test_slug_empty_is_empty():
    assert slug("") == ""


def test_slug_replaces_unsafe_characters():
    assert slug("a/b") == "_a_b"
    assert slug("data.shape=[1,8,8],x=a b:c") == "_data.shape=[1,8,8],x=a_b_c"
    assert slug("optimizer=adam,seed=1") == "_optimizer=adam,seed=1"


def test_slug_truncates_long_input_to_the_limit():
    assert slug("x" * 120) == "_" + "x" * 120
    assert slug("x" * 200) == "_" + "x" * 117 + "..."
    assert slug("abcdefgh", limit=5) == "_ab..."


def test_slug_resolver_is_registered():
    register_configs()
    assert OmegaConf.create({"s": "${trainlab.slug:a/b}"}).s == "_a_b"


# --- config.validate -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def composed():
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train")


@pytest.fixture
def cfg(composed):
    return copy.deepcopy(composed)


def test_validate_accepts_the_default_config(cfg):
    assert cfg.data.name == "digits" and cfg.model._target_ == "trainlab.models.MLP"
    assert validate(cfg) is None


def test_validate_rejects_disallowed_model_target(cfg):
    OmegaConf.update(cfg, "model._target_", "os.system")
    with pytest.raises(ConfigError, match=r"_target_ at model: 'os.system' is not allowed"):
        validate(cfg)


def test_validate_finds_nested_targets_in_dicts_and_lists(cfg):
    with open_dict(cfg):
        cfg.optimizer.extra = {"deep": {"_target_": "subprocess.run"}}
        cfg.model.layers = [1, {"_target_": "subprocess.run"}]
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert "_target_ at optimizer.extra.deep: 'subprocess.run' is not allowed" in message
    assert "_target_ at model.layers[1]: 'subprocess.run' is not allowed" in message


def test_validate_rejects_interpolated_target_even_when_it_resolves(cfg, monkeypatch):
    monkeypatch.setenv("TRAINLAB_TARGET", "os.system")
    with open_dict(cfg):
        cfg.model._target_ = "${oc.env:TRAINLAB_TARGET}"
    with pytest.raises(ConfigError, match=r"_target_ at model: 'os.system' is not allowed"):  # the resolved name
        validate(cfg)


def test_validate_reports_val_fraction(cfg):
    cfg.data.val_fraction = 1.5
    with pytest.raises(ConfigError, match=r"data.val_fraction=1.5: must be between 0 and 1"):
        validate(cfg)


def test_validate_reports_all_problems_in_one_message(cfg):
    cfg.data.val_fraction = 1.5
    OmegaConf.update(cfg, "model._target_", "os.system")
    cfg.trainer.max_epochs = 0
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid config:"
    assert len(lines) == 4
    assert any("'os.system'" in line for line in lines)
    assert "  - data.val_fraction=1.5: must be between 0 and 1" in lines
    assert "  - trainer.max_epochs=0: must be at least 1" in lines


def test_validate_reports_missing_values(cfg):
    cfg.data.name = "???"
    with pytest.raises(ConfigError, match=r"missing values .*: data.name"):
        validate(cfg)


@pytest.mark.parametrize("key, value, message", [
    ("trainer.device", "gpu", r"trainer.device='gpu'"),
    ("trainer.precision", "fp8", r"trainer.precision='fp8'"),
    ("early_stopping.monitor", "val/f1", r"early_stopping.monitor='val/f1'"),
    ("augmentation.hflip", 1.5, r"augmentation.hflip=1.5"),
    ("regularization.dropout", 1.0, r"regularization.dropout=1.0"),
])
def test_validate_reports_bad_values(cfg, key, value, message):
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_validate_rejects_target_that_escapes_allowed_package(cfg):
    assert _locate("torch.os.system") is os.system  # what instantiate would build
    OmegaConf.update(cfg, "model._target_", "torch.os.system")
    with pytest.raises(ConfigError, match=r"torch.os.system"):
        validate(cfg)


def test_validate_rejects_target_hidden_in_an_interpolated_node(cfg):
    with open_dict(cfg):
        cfg.optimizer.extra = "${oc.create:{_target_: subprocess.run}}"
    assert OmegaConf.to_container(cfg.optimizer, resolve=True)["extra"] == {"_target_": "subprocess.run"}
    with pytest.raises(ConfigError, match=r"subprocess.run"):
        validate(cfg)


def test_validate_reports_unresolvable_interpolation_as_config_error(cfg, monkeypatch):
    monkeypatch.delenv("TRAINLAB_UNSET_DEVICE", raising=False)
    cfg.trainer.device = "${oc.env:TRAINLAB_UNSET_DEVICE}"
    with pytest.raises(ConfigError):
        validate(cfg)


@pytest.mark.parametrize("run_dir", ["/tmp/outputs/runs/2026-12-01_06-38-25.561557_optimizer=adam,seed=1",
                                     "/tmp/it's here/run [1]", "/tmp/plain/run"])
def test_the_printed_resume_command_parses_back_to_the_same_directory(run_dir):
    """Default run directories hold `=` and `,`: the command a stopped run printed was refused by Hydra's grammar
    ("mismatched input '='"), and a `,` would have made the resume a sweep."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from trainlab.run import resume_command

    command = resume_command(["optimizer=adam", "seed=1"], pathlib.Path(run_dir))
    words = shlex.split(command)
    assert words[:3] == ["train", "optimizer=adam", "seed=1"] and words[-1] == "checkpoint.resume=auto"
    (parsed,) = OverridesParser.create().parse_overrides([words[3]])
    assert parsed.key_or_group == "hydra.run.dir" and parsed.value() == run_dir
    assert (words[3] == f"hydra.run.dir={run_dir}") == (run_dir == "/tmp/plain/run")  # quoted only when needed
