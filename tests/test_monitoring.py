"""Monitoring: what the event file holds (read back with TensorBoard's own reader), layer statistics, console."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from conftest import compose_cfg, run_cli
from trainlab.config import ConfigError, validate
from trainlab.layer_stats import (LayerRecorder, dead_layers, first_layer_filters, global_norm, histogram,
                                  vanishing_gradient)

STEPS_PER_EPOCH = (1797 - 359 - 144) // 64  # digits: 1294 training images, drop_last


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0,
                                                                "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars(acc: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def hparams_content(acc: EventAccumulator) -> tuple[dict, list[str]]:
    """The run's hyper-parameters (name -> value) and the experiment's metric tags, from the HParams plugin data."""
    from google.protobuf.json_format import MessageToDict
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    values = {k: MessageToDict(v) for k, v in start.session_start_info.hparams.items()}  # google.protobuf.Value
    return values, [m.name.tag for m in experiment.experiment.metric_infos]


@pytest.fixture(scope="module")
def momentum_run(tmp_path_factory):
    """4 epochs of SGD with momentum and weight decay (two parameter groups), the lr halved every epoch, layer
    statistics every 2 epochs."""
    from trainlab.run import execute

    overrides = ["trainer.max_epochs=4", "logger.every_n_steps=5", "optimizer=momentum", "scheduler=step",
                 "scheduler.step_epochs=1", "logger.layer_stats_every_n_epochs=2", "early_stopping.enabled=false",
                 "regularization.weight_decay=1e-4"]
    run_dir = tmp_path_factory.mktemp("momentum") / "run"
    status, code, _ = execute(compose_cfg(overrides), run_dir, overrides)
    assert (status, code) == ("completed", 0)
    return run_dir, events(run_dir), json.loads((run_dir / "summary.json").read_text())


def test_interval_scalars_follow_the_run(momentum_run):
    run_dir, acc, _ = momentum_run
    tags = scalars(acc)
    interval_steps = list(range(5, 4 * STEPS_PER_EPOCH + 1, 5))
    for tag in ("train/loss", "lr", "lr/decay", "lr/no_decay", "momentum/decay", "momentum/no_decay",
                "train/grad_norm", "perf/samples_per_s"):
        assert [s for s, _ in tags[tag]] == interval_steps, tag
    # the lr of each point is the rate its step used: 0.01 halved at every epoch boundary
    for step, lr in tags["lr"]:
        assert lr == pytest.approx(0.01 * 0.5 ** ((step - 1) // STEPS_PER_EPOCH)), step
    assert tags["lr/decay"] == tags["lr"] and tags["lr/no_decay"] == tags["lr"]
    assert all(v == pytest.approx(0.9) for _, v in tags["momentum/decay"])
    assert all(0 < v < 100 and math.isfinite(v) for _, v in tags["train/grad_norm"])
    assert all(v > 0 for _, v in tags["perf/samples_per_s"])


def test_epoch_scalars_match_metrics_csv_and_the_weights(momentum_run):
    run_dir, acc, summary = momentum_run
    tags = scalars(acc)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    epoch_ends = [STEPS_PER_EPOCH * e for e in range(1, 5)]
    for tag in ("train/acc", "val/loss", "val/acc", "epoch", "perf/epoch_time_s", "train/weight_norm"):
        assert [s for s, _ in tags[tag]] == epoch_ends, tag
    assert [v for _, v in tags["perf/epoch_time_s"]] == pytest.approx([float(r["epoch_time_s"]) for r in rows])
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    params = [v for k, v in last.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert tags["train/weight_norm"][-1][1] == pytest.approx(float(global_norm(params)), rel=1e-5)
    assert ("perf/gpu_max_memory_mib" in tags) == torch.cuda.is_available()  # on CUDA only
    assert tags["test/acc"] == [(epoch_ends[-1], pytest.approx(summary["test"]["test/acc"]))]


def test_layer_statistics_histograms_and_filters_only_on_recorded_epochs(momentum_run):
    _, acc, _ = momentum_run
    recorded = [1, STEPS_PER_EPOCH + 1, 3 * STEPS_PER_EPOCH + 1]  # the first step of epochs 1 (the init), 2 and 4
    tags = scalars(acc)
    kinds = ("act_mean", "act_std", "dead_relu", "grad_norm", "update_ratio")
    layer_tags = [t for t in tags if t.split("/")[0] in kinds]
    assert {"act_std/3.relu", "act_std/6.relu", "dead_relu/3.relu", "grad_norm/1.weight", "update_ratio/7.weight"} \
        <= set(layer_tags)
    for tag in layer_tags:
        assert [s for s, _ in tags[tag]] == recorded, tag
    # SGD's update is lr * velocity: a small fraction of the weights, never zero
    assert all(0 < v < 0.5 for t in layer_tags if t.startswith("update_ratio") for _, v in tags[t])
    histograms = acc.Tags()["histograms"]
    assert {"weights/1.weight", "grads/1.weight", "activations/3.relu", "activations/6.relu"} <= set(histograms)
    for tag in histograms:
        assert [e.step for e in acc.Histograms(tag)] == recorded, tag
    weights = acc.Histograms("weights/1.weight")[0].histogram_value
    assert weights.num == 64 * 256 and sum(weights.bucket) == 64 * 256 and weights.min < 0 < weights.max
    filters = acc.Images("first_layer/filters")  # the MLP's first layer reads whole 8x8 images
    assert [e.step for e in filters] == recorded and filters[0].width == 2 + 8 * (8 + 2)  # the first 64 units, 8x8


def test_confusion_matrix_image_and_csv(momentum_run):
    run_dir, acc, summary = momentum_run
    assert [e.step for e in acc.Images("test/confusion_matrix")] == [4 * STEPS_PER_EPOCH]
    rows = list(csv.reader((run_dir / "confusion_matrix.csv").open()))
    counts = torch.tensor([[int(v) for v in row[1:]] for row in rows[1:]])
    assert counts.shape == (10, 10) and int(counts.sum()) == 359
    assert int(counts.trace()) / 359 == pytest.approx(summary["test"]["test/acc"])


def test_hparams_hold_the_overrides_and_final_metrics(momentum_run):
    _, acc, summary = momentum_run
    hparams, metric_tags = hparams_content(acc)
    assert hparams["optimizer"] == "momentum" and hparams["scheduler"] == "step"  # group choices from overrides
    assert hparams["optimizer.lr"] == pytest.approx(0.01) and hparams["optimizer.momentum"] == pytest.approx(0.9)
    assert hparams["scheduler.step_epochs"] == 1 and hparams["model.hidden"] == "[256, 256]"
    assert hparams["seed"] == 0 and hparams["status"] == "completed"
    assert set(metric_tags) == {"hparams/best_val_loss", "hparams/best_val_acc", "hparams/best_val_balanced_acc",
                                "hparams/test_loss", "hparams/test_acc", "hparams/test_balanced_acc",
                                "hparams/epochs_run"}
    tags = scalars(acc)
    assert tags["hparams/test_acc"][0][1] == pytest.approx(summary["test"]["test/acc"])
    assert tags["hparams/test_balanced_acc"][0][1] == pytest.approx(summary["test"]["test/balanced_acc"])
    assert tags["hparams/best_val_balanced_acc"][0][1] == pytest.approx(summary["best"]["val/balanced_acc"])
    assert tags["test/balanced_acc"][0][1] == pytest.approx(summary["test"]["test/balanced_acc"])
    assert tags["hparams/best_val_loss"][0][1] == pytest.approx(summary["best"]["val/loss"])
    assert tags["hparams/epochs_run"][0][1] == 4


def test_custom_scalars_layout_puts_train_and_val_on_one_chart(momentum_run):
    from tensorboard.plugins.custom_scalar import layout_pb2

    _, acc, _ = momentum_run
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts == {"loss": ["train/loss", "val/loss"], "accuracy": ["train/acc", "val/acc"]}


def test_logger_switches(train_inprocess, tmp_path):
    base = ["trainer.max_epochs=1", "logger.every_n_steps=5", "logger.layer_stats_every_n_epochs=1"]
    train_inprocess([*base, "logger.grad_norm=false", "logger.histograms=false", "logger.graph=true"], "a")
    acc = events(tmp_path / "a")
    assert "train/grad_norm" not in acc.Tags()["scalars"] and "act_std/3.relu" in acc.Tags()["scalars"]
    assert acc.Tags()["histograms"] == [] and acc.Tags()["graph"]
    train_inprocess([*base[:2], "logger.layer_stats_every_n_epochs=0"], "b")
    acc = events(tmp_path / "b")
    assert not [t for t in acc.Tags()["scalars"] if t.startswith(("act_", "dead_relu", "update_ratio"))]
    assert acc.Tags()["images"] == ["test/confusion_matrix"] and not acc.Tags()["graph"]


def test_dead_layers_are_the_relus_dead_for_the_whole_batch():
    scalars = {"dead_relu/3.relu": 1.0, "dead_relu/6.relu": 0.99, "act_std/3.relu": 1.0, "dead_relu/9.relu": 0.0}
    assert dead_layers(scalars) == {"3.relu": 1.0}
    assert dead_layers(scalars, share=0.5) == {"3.relu": 1.0, "6.relu": 0.99}
    assert dead_layers({"act_std/3.relu": 0.0}) == {}


def test_a_relu_layer_that_dies_is_named_once(train_inprocess, tmp_path, caplog, threads_restored):
    """Plain SGD at lr 2.0 without normalization: the loss explodes in epoch 1, at epoch 2's first step most units are
    silent and the first layer gets no gradient, by epoch 3's every unit of the second ReLU layer is dead, by epoch
    4's the first's; the run goes on at chance (README *Activations, measured*)."""
    caplog.set_level("WARNING", logger="trainlab")
    dying = ["normalization=none", "initialization=kaiming_normal", "optimizer.lr=2.0", "seed=1",
             "logger.layer_stats_every_n_epochs=1", "logger.histograms=false", "trainer.threads=1"]  # one rounding
    status, _, _ = train_inprocess([*dying, "trainer.max_epochs=5"], "dying")
    assert status == "completed"
    acc = events(tmp_path / "dying")
    dead = {layer: [e.value for e in acc.Scalars(f"dead_relu/{layer}")] for layer in ("3.relu", "6.relu")}
    assert dead["6.relu"][2:] == [1.0, 1.0, 1.0] and dead["3.relu"][3] == 1.0, dead  # epochs 1-5
    assert min(dead["3.relu"][1:]) > 0.99, dead  # a unit or two that fire on another batch: it stays a warning
    warned = [r.getMessage() for r in caplog.records if "outputs 0 for the whole batch" in r.getMessage()]
    assert [m[:43] for m in warned] == ["epoch 3: every unit of ReLU layer(s) 6.relu",
                                       "epoch 4: every unit of ReLU layer(s) 3.relu"]  # each once, when it dies
    assert "(lr now 2): lower optimizer.lr" in warned[0]
    vanishing = [r.getMessage() for r in caplog.records if "vanishing gradients" in r.getMessage()]
    assert len(vanishing) == 1 and vanishing[0].startswith("epoch 2: the first layer's gradient"), vanishing
    assert "(vanishing gradients): most units of ReLU layer(s) 3.relu (99.6%), 6.relu (94.1%) output 0" \
        in vanishing[0]  # before either layer is wholly dead, the cause named is the ReLUs, not the activation
    caplog.clear()
    alive = ["normalization=none", "initialization=kaiming_normal", "optimizer.lr=0.1", "seed=1",
             "logger.layer_stats_every_n_epochs=1", "logger.histograms=false", "trainer.max_epochs=3"]
    assert train_inprocess(alive, "alive")[0] == "completed"
    assert max(e.value for e in events(tmp_path / "alive").Scalars("dead_relu/6.relu")) < 0.5
    assert "outputs 0 for the whole batch" not in caplog.text


def test_vanishing_gradient_compares_the_first_layers_gradient_with_the_last():
    def stats(first: float, last: float) -> dict[str, float]:
        return {"act_std/3.relu": 1.0, "grad_norm/1.weight": first, "grad_norm/4.weight": 0.5,
                "grad_norm/7.weight": last}

    assert vanishing_gradient(stats(1e-6, 1.0)) == ("1.weight", 1e-6, "7.weight", 1.0)
    assert vanishing_gradient(stats(1.01e-4, 1.0)) is None  # at least 1e-4 of the last layer's: learning
    assert vanishing_gradient(stats(0.0, 0.0)) is None and vanishing_gradient(stats(0.0, math.inf)) is None
    assert vanishing_gradient({"grad_norm/1.weight": 0.0}) is None  # one layer: nothing to compare


def test_a_deep_sigmoid_net_is_told_its_gradient_vanishes_once(train_inprocess, caplog):
    """Ten sigmoid layers: the first layer's gradient is 1e-6 of the last's and the run stays at chance; ten ReLU
    layers with Kaiming's init train, and say nothing (README *Activations, measured*)."""
    caplog.set_level("WARNING", logger="trainlab")
    deep = ["model.hidden=[128,128,128,128,128,128,128,128,128,128]", "normalization=none", "trainer.max_epochs=2",
            "logger.layer_stats_every_n_epochs=1", "logger.histograms=false"]
    train_inprocess([*deep, "model.activation=sigmoid", "initialization=xavier_normal"], "sigmoid")
    warned = [r.getMessage() for r in caplog.records if "vanishing gradients" in r.getMessage()]
    assert len(warned) == 1, warned
    assert re.match(r"epoch 1: the first layer's gradient \(1\.weight: 1\.\de-06\) is 1e-06 of the last layer's "
                    r"\(31\.weight: 1\.\d\)", warned[0]), warned[0]
    assert "(vanishing gradients): a deep net of sigmoid or tanh units" in warned[0]  # no ReLU to blame
    caplog.clear()
    train_inprocess([*deep, "model.activation=relu", "initialization=kaiming_normal"], "relu")
    assert "vanishing gradients" not in caplog.text


def test_event_records_carry_tensorboards_checksums(momentum_run):
    """The records' CRCs (google-crc32c where installed) are the ones TensorBoard's own code computes."""
    import struct

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    run_dir, _, _ = momentum_run
    data = next(run_dir.glob("events.out.tfevents.*")).read_bytes()
    records, at = 0, 0
    while at < len(data):
        header = data[at:at + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[at + 8:at + 12])
        body = data[at + 12:at + 12 + length]
        (body_crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
        assert header_crc == masked_crc32c(header) and body_crc == masked_crc32c(body)
        records, at = records + 1, at + 16 + length
    assert records > 20


def test_every_epoch_ends_with_a_train_loss_point(train_inprocess, tmp_path):
    """Intervals longer than the epoch, and one that does not divide it: the epoch's last step closes it."""
    import csv as csv_module

    for name, every, expected in (("long", 50, [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]),
                                  ("uneven", 7, [7, 14, 20, 27, 34, 40])):
        assert STEPS_PER_EPOCH == 20
        train_inprocess(["trainer.max_epochs=2", f"logger.every_n_steps={every}", "early_stopping.enabled=false"], name)
        points = scalars(events(tmp_path / name))["train/loss"]
        assert [s for s, _ in points] == expected, name
    # intervals of whole epochs: each point is the epoch's mean training loss of metrics.csv
    rows = list(csv_module.DictReader((tmp_path / "long" / "metrics.csv").open()))
    long = scalars(events(tmp_path / "long"))["train/loss"]
    assert [v for _, v in long] == pytest.approx([float(r["train/loss"]) for r in rows], rel=1e-5)


def test_clipped_gradient_norm_is_the_clip_threshold(train_inprocess, tmp_path):
    train_inprocess(["trainer.max_epochs=1", "logger.every_n_steps=5", "regularization.grad_clip_norm=0.001"])
    points = scalars(events(tmp_path / "run"))["train/grad_norm"]
    assert len(points) == STEPS_PER_EPOCH // 5 and all(v == pytest.approx(0.001, rel=1e-3) for _, v in points)


def test_momentum_tag_follows_the_momentum_ramp(train_inprocess, tmp_path):
    train_inprocess(["trainer.max_epochs=1", "logger.every_n_steps=5", "optimizer=momentum_schedule",
                     "optimizer.momentum_warmup_epochs=2"])
    momentum = [v for _, v in scalars(events(tmp_path / "run"))["momentum/all"]]  # one group: no weight decay
    assert 0.5 <= momentum[0] < momentum[-1] < 0.9 and momentum == sorted(momentum)  # half-way up the ramp
    assert momentum[-1] == pytest.approx(0.5 + 0.4 * (STEPS_PER_EPOCH - 1) / (2 * STEPS_PER_EPOCH), abs=0.02)


def test_each_run_keeps_its_hparams_in_its_own_event_file(train_inprocess, tmp_path):
    """A sweep directory's HPARAMS tab lists one row per job: no sub-run directories, different values."""
    for name, lr in (("job0", "0.05"), ("job1", "0.2")):
        train_inprocess(["trainer.max_epochs=1", f"optimizer.lr={lr}", "logger.layer_stats_every_n_epochs=0"], name)
    values = []
    for name in ("job0", "job1"):
        run_dir = tmp_path / name
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
        assert not [p for p in run_dir.rglob("events.out.tfevents.*") if p.parent != run_dir]
        values.append(hparams_content(events(run_dir))[0]["optimizer.lr"])
    assert values == [pytest.approx(0.05), pytest.approx(0.2)]


def test_small_normal_init_shows_vanishing_activations(train_inprocess, tmp_path):
    """A deep plain MLP: N(0, 0.01^2) weights shrink the signal layer by layer; Kaiming keeps its scale."""
    deep = ["trainer.max_epochs=1", "model.hidden=[64,64,64,64,64,64]", "normalization=none",
            "logger.layer_stats_every_n_epochs=1", "logger.histograms=false"]
    train_inprocess([*deep, "initialization=normal", "initialization.std=0.01"], "small")
    train_inprocess([*deep, "initialization=kaiming_normal"], "kaiming")
    small, kaiming = (scalars(events(tmp_path / name)) for name in ("small", "kaiming"))
    last = "act_std/18.relu"  # the sixth hidden layer's activation
    assert last in small
    assert small[last][0][1] < 1e-6 < 0.1 < kaiming[last][0][1]
    assert small["act_std/3.relu"][0][1] > 100 * small[last][0][1]  # shrinks with depth


def test_layer_recorder_dead_units_gradients_and_update_ratio():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[2].bias.fill_(-1e3)  # every unit of the second layer is dead
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = LayerRecorder(model, optimizer, histograms=True)
    recorder.attach()
    before = model[0].weight.detach().clone()
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    nn.functional.cross_entropy(model(x), y).backward()
    grad = model[0].weight.grad.clone()
    optimizer.step()
    stats = recorder.result.scalars
    assert stats["dead_relu/3.relu"] == 1.0 and stats["act_std/3.relu"] == 0.0
    assert stats["dead_relu/1.relu"] < 1.0
    assert stats["grad_norm/0.weight"] == pytest.approx(float(grad.norm()))
    assert stats["update_ratio/0.weight"] == pytest.approx(float(0.1 * grad.norm() / before.norm()), rel=1e-5)
    assert "grad_norm/0.bias" not in stats  # weights of linear and conv layers only
    hist = recorder.result.histograms["activations/1.relu"]
    assert hist.num == 32 * 8 and sum(hist.bucket_counts) == 32 * 8 and hist.min == 0.0
    # every hook is gone after the recorded step: the next steps run without them
    assert not recorder.attached and not model._forward_pre_hooks and not model[1]._forward_hooks
    assert not optimizer._optimizer_step_post_hooks


def test_a_module_applied_twice_per_forward_is_recorded_per_call():
    from torchvision.models.resnet import BasicBlock

    block = BasicBlock(4, 4)  # applies its one self.relu twice
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    recorder = LayerRecorder(block, optimizer, histograms=False)
    recorder.attach()
    block(torch.randn(2, 4, 5, 5)).square().mean().backward()
    optimizer.step()
    assert {"act_std/relu", "act_std/relu#2", "dead_relu/relu#2", "update_ratio/conv1.weight"} \
        <= set(recorder.result.scalars)
    assert recorder.result.histograms == {}


def test_vanishing_gradients_read_as_their_size_not_as_zero():
    """Gradients of 1e-24 (a 20-layer MLP at initialization std 0.01) square to 0 in float32: both norms read 0."""
    tiny = [torch.full((128, 128), 1e-24), torch.full((3,), 1e-25)]
    expected = math.sqrt(128 * 128 * 1e-48 + 3 * 1e-50)
    assert float(global_norm(tiny)) == pytest.approx(expected, rel=1e-5)
    layer = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    recorder = LayerRecorder(layer, optimizer, histograms=False)
    recorder.attach()
    (layer(torch.ones(1, 4)).sum() * 1e-30).backward()  # every weight's gradient is 1e-30
    optimizer.step()
    assert recorder.result.scalars["grad_norm/weight"] == pytest.approx(math.sqrt(8) * 1e-30, rel=1e-5)


def test_histogram_counts_every_value_between_min_and_max():
    values = torch.tensor([0.0, 1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 4.0])
    row = histogram(values, bins=4).tolist()
    assert row[:4] == [0.0, 4.0, 17.0, 49.0]
    assert row[4:] == [1.0, 2.0, 1.0, 4.0]  # [0,1) [1,2) [2,3) [3,4]


def test_first_layer_filters_of_a_conv_model_are_one_image():
    conv = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU())
    grid = first_layer_filters(conv, (3, 32, 32))
    assert grid.shape[0] == 3 and grid.min() >= 0 and grid.max() <= 1
    assert grid.shape[1] == grid.shape[2] == 2 + 4 * (3 * 2 + 2)  # 4x4 tiles of 3x3 kernels scaled 2x, 2px apart
    assert first_layer_filters(nn.Sequential(nn.Flatten(), nn.Linear(10, 2)), (10,)) is None


def test_image_grid_matches_torchvision_make_grid():
    from torchvision.utils import make_grid

    from trainlab.layer_stats import image_grid

    tiles = torch.rand(10, 3, 4, 5)
    assert torch.equal(image_grid(tiles, padding=2), make_grid(tiles, nrow=4, padding=2, pad_value=1.0))


def test_layer_stats_every_n_epochs_must_not_be_negative():
    with pytest.raises(ConfigError, match=r"logger.layer_stats_every_n_epochs=-1.*>= 0"):
        validate(compose_cfg(["logger.layer_stats_every_n_epochs=-1"]))


def test_live_bar_shows_step_loss_lr_speed_and_eta(tmp_path):
    from trainlab.loop import Interval
    from trainlab.monitor import RunMonitor

    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = RunMonitor(tmp_path, tensorboard=False, live=True, max_epochs=3, steps_per_epoch=10,
                         model=model, optimizer=optimizer)
    try:
        monitor.start_epoch(2, 10, 10, batch_size=32)
        monitor.train_interval(Interval(step=15, loss=0.25, lrs=[0.1]))
        fields = monitor.progress.tasks[0].fields
        assert monitor.progress.tasks[0].completed == 5
        assert (fields["epoch"], fields["step"], fields["loss"], fields["lr"]) == (2, 15, "0.2500", "0.1")
        assert float(fields["speed"].replace(",", "")) > 0 and fields["eta"].count(":") == 2
    finally:
        monitor.close()


def test_the_speed_after_a_mid_epoch_resume_counts_only_the_steps_this_process_took(tmp_path, monkeypatch):
    """Resumed at step 15 with 5 of the epoch's 10 steps done, one step in 0.5 s logged 384 samples/s, not 64."""
    from trainlab import monitor as monitoring
    from trainlab.loop import Interval

    now = [100.0]
    monkeypatch.setattr(monitoring.time, "perf_counter", lambda: now[0])
    monitor = monitoring.RunMonitor(tmp_path, tensorboard=True, live=False, max_epochs=3, steps_per_epoch=10)
    written = {}
    monkeypatch.setattr(monitor, "_scalars", lambda values, step: written.update(values))
    monitor.start_epoch(2, 10, 10, batch_size=32, done=5)
    now[0] += 0.5
    monitor.train_interval(Interval(step=16, loss=0.25, lrs=[0.1]))
    monitor.close()
    assert written["perf/samples_per_s"] == pytest.approx(64.0)


def test_console_off_a_terminal_is_plain_text(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["trainer.max_epochs=1", "logger.progress=auto", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "\x1b" not in out and "\r" not in out  # no colours, no cursor moves, no redrawn bar
    assert "config" in result.stdout and "optimizer" in result.stdout and "max_epochs: 1" in result.stdout  # tree
    assert "monitoring: tensorboard True" in out and "epoch 1/1" in out
    table = re.sub(r"[\s│]", "", result.stdout)  # the table folds long paths over several rows
    assert "val/lossatbestepoch" in table and "testedweightsbest.pt" in table and f"tensorboard--logdir{run_dir}" in table


@pytest.mark.slow
def test_monitor_benchmark_prints_the_ratio():
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "scripts" / "monitor_benchmark.py"
    result = subprocess.run([sys.executable, str(script), "--blocks", "1", "--epochs", "2"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ratio" in result.stdout and "target >= 0.97" in result.stdout


def test_messages_paths_and_values_are_printed_as_they_are_not_as_rich_markup():
    """A gloo error ("[/__w/...pair.cc:561]") once crashed the final table; "[bold]x" would have lost its text."""
    from rich.console import Console

    from trainlab.monitor import config_tree, final_table, where_to_look

    reason = "error: RuntimeError: [/__w/gloo/pair.cc:561] Connection closed; expected [batch, channels]"
    summary = {"status": "failed", "stop_reason": reason, "wall_time_s": 1.0, "device": "cpu",
               "run_dir": "/runs/[bold]a"}
    console = Console(width=400, record=True, color_system=None)
    console.print(final_table(summary))
    console.print(config_tree(compose_cfg(["data=image_folder", "data.root='/data/[red]x[/red]'"])))
    out = console.export_text()
    assert reason in out
    assert where_to_look(summary) == ["run directory: /runs/[bold]a", "curves: tensorboard --logdir '/runs/[bold]a'"]
    assert "root: /data/[red]x[/red]" in out


@pytest.mark.parametrize("name", ["Adagrad", "RMSprop", "Adam", "Adadelta"])
def test_effective_step_size_of_adaptive_optimizers_is_the_median_of_their_rule(name):
    from trainlab.layer_stats import effective_lrs

    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    optimizer = getattr(torch.optim, name)(model.parameters(), lr=0.05)
    assert effective_lrs(optimizer) == {}  # no state before the first step
    sizes = []
    for _ in range(30):
        optimizer.zero_grad()
        model(torch.randn(16, 6)).pow(2).mean().backward()
        optimizer.step()
        sizes.append(effective_lrs(optimizer)["0"])
    states = [optimizer.state[p] for p in model.parameters()]
    if name == "Adagrad":
        rule = [0.05 / (s["sum"].sqrt() + 1e-10) for s in states]
        assert all(b <= a for a, b in zip(sizes, sizes[1:]))  # the sum only grows: the step only shrinks
    elif name == "RMSprop":
        rule = [0.05 / (s["square_avg"].sqrt() + 1e-8) for s in states]
    elif name == "Adam":
        rule = [0.05 / (1 - 0.9 ** 30) / (s["exp_avg_sq"].sqrt() / (1 - 0.999 ** 30) ** 0.5 + 1e-8) for s in states]
    else:
        rule = [0.05 * (s["acc_delta"] + 1e-6).sqrt() / (s["square_avg"] + 1e-6).sqrt() for s in states]
    assert sizes[-1] == pytest.approx(float(torch.cat([r.flatten() for r in rule]).median()), rel=1e-6)
    assert effective_lrs(torch.optim.SGD(model.parameters(), lr=0.1)) == {}  # one rate for all: the lr tag


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("scale", [1e-2, 1e-7])
def test_adams_effective_step_size_is_the_update_it_took_per_unit_gradient(name, scale):
    """eps sat outside the bias correction of v: for gradients near eps (1e-7) lr_effective read 0.26 of the step."""
    from trainlab.layer_stats import effective_lrs

    param = nn.Parameter(torch.zeros(101))
    optimizer = getattr(torch.optim, name)([param], lr=1e-3, betas=(0.0, 0.999), weight_decay=0.0)  # m = g
    gradient = torch.linspace(0.5, 1.5, 101) * scale
    for _ in range(3):
        before = param.detach().clone()
        param.grad = gradient.clone()
        optimizer.step()
    taken = (before - param.detach()) / gradient
    assert effective_lrs(optimizer)["0"] == pytest.approx(float(taken.median()), rel=1e-4)


def test_effective_step_size_is_the_median_over_every_coordinate_not_a_strided_sample(monkeypatch):
    """A layer 256 x 64 read at every 4th coordinate saw the same 16 input columns in every row: with inputs whose
    columns differ in scale, that median was 3x the true one. Up to layer_stats.SAMPLE coordinates every one is read;
    beyond, a uniform draw in proportion to each tensor's size estimates the median."""
    from trainlab import layer_stats

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    scale = torch.ones(64)
    scale[::4] = 10.0  # every 4th input column 10x larger: a strided sample sees only these
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(32, 64) * scale).logsumexp(dim=1).mean().backward()
        optimizer.step()
    exact = float(torch.cat([(0.1 / (optimizer.state[p]["sum"].sqrt() + 1e-10)).flatten()
                             for p in model.parameters()]).median())
    assert layer_stats.effective_lrs(optimizer)["0"] == pytest.approx(exact, rel=1e-6)
    monkeypatch.setattr(layer_stats, "SAMPLE", 4096)  # the 19,210 coordinates through a sample of 4096
    assert layer_stats.effective_lrs(optimizer)["0"] == pytest.approx(exact, rel=0.1)
    before = torch.random.get_rng_state()
    layer_stats.effective_lrs(optimizer)
    assert torch.equal(torch.random.get_rng_state(), before)  # the run's random stream is untouched


def test_adagrad_run_logs_its_shrinking_effective_step_size(train_inprocess, tmp_path):
    train_inprocess(["trainer.max_epochs=3", "optimizer=adagrad", "early_stopping.enabled=false"])
    sizes = [v for _, v in scalars(events(tmp_path / "run"))["lr_effective/all"]]
    assert len(sizes) == 3 and sizes[0] > sizes[1] > sizes[2] > 0


def test_the_final_table_names_the_tested_weights_and_the_best_epochs_metrics_as_such():
    """With SWA the test rows came from swa.pt under the best epoch's rows, and "best val/loss" under a val/acc
    monitor was the loss at the best-accuracy epoch, not the lowest val/loss."""
    from rich.console import Console

    from trainlab.monitor import final_table

    summary = {"status": "completed", "stop_reason": "reached trainer.max_epochs=4", "best_epoch": 3, "epochs_run": 4,
               "best": {"epoch": 3, "val/acc": 0.99, "val/loss": 0.2}, "swa": {"epochs_averaged": 2,
               "val/loss": 0.09, "val/acc": 0.985}, "test": {"test/loss": 0.1, "test/acc": 0.97},
               "tested_weights": "swa.pt", "wall_time_s": 1.0, "device": "cpu", "run_dir": "/runs/a"}
    console = Console(width=200, record=True, color_system=None)
    console.print(final_table(summary))
    shown = " ".join(console.export_text().replace("│", " ").split())
    assert "best epoch 3 of 4 run val/acc at best epoch 0.9900 val/loss at best epoch 0.2000" in shown
    assert "SWA average (2 epochs) val/loss 0.0900 val/acc 0.9850 tested weights swa.pt test/loss 0.1000" in shown
