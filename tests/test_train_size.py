"""data.train_size: a stratified, seeded, nested subset of the training split; validation and test unchanged."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import compose_cfg, run_cli
from test_data import write_image_folder, write_mnist
from trainlab import data
from trainlab.distributed import Ranks


def counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()


def uneven_labels() -> torch.Tensor:
    """600, 300 and 100 examples of classes 0, 1 and 2, shuffled."""
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    return labels[torch.randperm(1000, generator=torch.Generator().manual_seed(3))]


def digits(*overrides: str) -> data.Dataset:
    return data.build_data(compose_cfg(list(overrides)).data)


def ids(split: data.Split) -> set[int]:
    """The write_mnist images' numbers (their first pixel)."""
    return set(split.images[:, 0, 0, 0].tolist())


# --- the draw ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "expected"), [(3, [1, 1, 1]), (7, [4, 2, 1]), (10, [6, 3, 1]), (15, [9, 5, 1]),
                                                (33, [20, 10, 3]), (100, [60, 30, 10]), (999, [599, 300, 100])])
def test_each_class_keeps_its_share_rounded_to_the_nearest_and_at_least_one(size, expected):
    # 7: shares 4.2, 2.1, 0.7; 15: 9, 4.5, 1.5 (the tie goes to the lower class); 33: 19.8, 9.9, 3.3
    labels = uneven_labels()
    for seed in (0, 1):  # the counts depend on N and the class sizes only
        subset = data.train_subset(data.Split(torch.zeros(1000, 1, 1, 1, dtype=torch.uint8), labels), size, seed,
                                   "toy")
        assert counts(subset.labels, 3) == expected


def test_digits_subsets_hold_each_class_in_proportion():
    full = digits()
    assert counts(digits("data.train_size=10").train.labels, 10) == [1] * 10
    for size in (50, 200):
        d = digits(f"data.train_size={size}")
        share = torch.bincount(full.train.labels).double() * size / len(full.train)
        assert len(d.train) == size and d.train_available == len(full.train)
        assert (torch.bincount(d.train.labels, minlength=10) - share).abs().max() < 1


def test_smaller_subsets_lie_inside_larger_ones_and_each_seed_draws_its_own():
    labels = uneven_labels()
    order = data.stratified_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(1000))
    assert torch.equal(order, data.stratified_order(labels, seed=0))
    assert not torch.equal(order[:100], data.stratified_order(labels, seed=1)[:100])
    for small, large in ((3, 10), (10, 33), (33, 500)):
        assert set(order[:small].tolist()) < set(order[:large].tolist())


def test_the_subset_of_a_file_dataset_is_nested_seeded_and_leaves_validation_and_test_alone(tmp_path):
    write_mnist(tmp_path, n_train=200, n_test=30)  # image i's first pixel is i: each one findable

    def build(size, split_seed=0):
        cfg = compose_cfg(["data=mnist", f"data.root={tmp_path}", f"data.train_size={size}",
                           f"data.split_seed={split_seed}"])
        return data.build_data(cfg.data)

    full = build("null")
    subsets = {n: build(n) for n in (10, 25, 60, 180)}
    for small, large in ((10, 25), (25, 60), (60, 180)):
        assert ids(subsets[small].train) < ids(subsets[large].train) <= ids(full.train)
    assert len(subsets[180].train) == len(full.train) == 180 and subsets[180].sizes.startswith("train 180 /")
    assert subsets[25].sizes == "train 25 of 180 / val 20 / test 30"
    again, other = build(25), build(25, split_seed=1)
    assert torch.equal(again.train.images, subsets[25].train.images)
    assert ids(other.train) != ids(subsets[25].train) and torch.equal(other.test.images, full.test.images)


@pytest.mark.parametrize("option", ["digits", "synthetic", "mnist", "image_folder"])
def test_validation_test_and_statistics_with_and_without_train_size(tmp_path, option):
    keys = {"digits": [], "synthetic": ["data.num_samples=300", "data.shape=[3,4,4]"],
            "mnist": [f"data.root={tmp_path}"],
            "image_folder": [f"data.path={tmp_path / 'imgs'}", "data.cache_dir=null", "data.image_size=6"]}[option]
    if option == "mnist":
        write_mnist(tmp_path, n_train=100)
    if option == "image_folder":
        write_image_folder(tmp_path / "imgs", per_class=12)
    full = data.build_data(compose_cfg([f"data={option}", *keys]).data)
    small = data.build_data(compose_cfg([f"data={option}", *keys, "data.train_size=12"]).data)
    for split in ("val", "test"):
        assert torch.equal(getattr(small, split).images, getattr(full, split).images)
        assert torch.equal(getattr(small, split).labels, getattr(full, split).labels)
    assert len(small.train) == 12 and small.train_available == len(full.train) > 12
    # normalised with the subset's own statistics, not the whole training split's
    mean, std = data.channel_stats(small.train.images)
    assert torch.equal(small.mean, mean) and torch.equal(small.std, std)
    assert not torch.allclose(small.mean, full.mean)


# --- loaders -----------------------------------------------------------------------------------------


def pixels(x: torch.Tensor, d: data.Dataset) -> list[tuple[int, ...]]:
    """The uint8 images a normalised batch came from, as sorted rows."""
    raw = (x * d.std.view(1, -1, 1, 1) + d.mean.view(1, -1, 1, 1)).round().to(torch.uint8)
    return sorted(map(tuple, raw.flatten(1).tolist()))


@pytest.mark.parametrize("loader", ["device", "dataloader"])
def test_an_epoch_serves_exactly_the_subset(loader):
    cfg = compose_cfg(["data.train_size=50", "data.batch_size=16", "data.drop_last=false", f"data.loader={loader}",
                       "data.num_workers=0"])
    d = data.build_data(cfg.data)
    batches = data.train_loader(cfg, d, torch.device("cpu"))
    expected = sorted(map(tuple, d.train.images.flatten(1).tolist()))
    for epoch in (1, 2):
        batches.set_epoch(epoch)
        served = list(batches)
        assert [len(y) for _, y in served] == [16, 16, 16, 2]
        assert pixels(torch.cat([x for x, _ in served]), d) == expected
    batches.set_batch_size(64)  # more than the subset (a batch_size_schedule factor): one batch of all 50
    assert [len(y) for _, y in batches] == [50]


def test_torchrun_ranks_split_the_subset_between_them():
    cfg = compose_cfg(["data.train_size=40", "data.batch_size=8", "data.drop_last=false"])
    d = data.build_data(cfg.data)
    served = [torch.cat([x for x, _ in data.train_loader(cfg, d, torch.device("cpu"), Ranks(rank, 2))])
              for rank in (0, 1)]
    assert len(served[0]) == len(served[1]) == 20
    assert pixels(torch.cat(served), d) == sorted(map(tuple, d.train.images.flatten(1).tolist()))


# --- refusals and a real run -------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "message"), [
    (0, "data.train_size=0: give a number of training examples, a whole number of at least 1"),
    (-5, "data.train_size=-5: give a number of training examples"),
    (0.25, "data.train_size=0.25: give a number of training examples, a whole number of at least 1 (e.g. 200), or null "
           "for the whole training split; a share is not taken: multiply it by the training split's size"),
    (50.0, "data.train_size=50.0: give a number of training examples, a whole number of at least 1 (e.g. 200), or "
           "null for the whole training split; write it as a whole number: data.train_size=50"),
    (5, "data.train_size=5: the subset is stratified by class and holds at least one example of each of the 10 "
        "classes of digits; give at least 10"),
])
def test_bad_sizes_are_config_errors(train_inprocess, value, message):
    status, code, run = train_inprocess([f"data.train_size={value}"])
    assert (status, code) == ("failed", 2)
    assert message in run.summary["error"] and not run.started


def test_the_command_line_refuses_more_than_the_training_split_before_training(tmp_path):
    refused = run_cli(["data.train_size=5000", f"hydra.run.dir={tmp_path / 'many'}"], cwd=tmp_path)
    output = refused.stdout + refused.stderr
    assert refused.returncode == 2 and not (tmp_path / "many").exists()
    assert "data.train_size=5000: the training split of digits holds 1294 examples" in output
    assert "give at most 1294, or null for all of them" in output


def test_a_run_on_50_digits_announces_and_records_its_size(tmp_path):
    run_dir = tmp_path / "run"
    # batches of 16 (3 steps, the last 2 examples dropped), then from epoch 2 of 64: capped at the subset, 1 step
    result = run_cli(["data.train_size=50", "data.batch_size=16", "data.batch_size_schedule=[[2,4]]",
                      "trainer.max_epochs=2", "logger.tensorboard=false", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data: digits  train 50 of 1294 / val 144 / test 359" in (run_dir / "train.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and "data.train_size=50" in summary["overrides"]
    assert summary["examples"] == {"train": 50, "train_available": 1294, "val": 144, "test": 359,
                                   "train_per_class": [5, 5, 4, 5, 5, 5, 5, 5, 5, 6]}  # classes of 112-138
    with open(run_dir / "metrics.csv") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [3, 4]


def test_any_split_seed_draws_a_subset(train_inprocess):
    """The subset's stream is seeded 2 * split_seed + 1: beyond torch's 64-bit seeds for the largest split seeds."""
    for seed in (2**63, -(2**63), 2**64 - 1):
        status, _, run = train_inprocess([f"data.split_seed={seed}", "data.train_size=50", "trainer.max_epochs=1"],
                                         name=f"seed{seed}")
        assert status == "completed" and len(run.data.train) == 50
