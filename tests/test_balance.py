"""Class imbalance: data.imbalance makes a long-tailed training split; data.balance evens it out (oversampling each
epoch, or a class-weighted loss); test/balanced_acc scores every class alike."""

from __future__ import annotations

import csv
import json
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg, run_cli
from trainlab import data
from trainlab.config import ConfigError, validate
from trainlab.loop import evaluate
from trainlab.monitor import CSV_COLUMNS


def counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()


def balanced_split(per_class: int, num_classes: int) -> data.Split:
    """Example i is image i (its first pixel, mod 256) of class i % num_classes."""
    n = per_class * num_classes
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return data.Split(images, torch.arange(n) % num_classes)


# --- data.imbalance ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "expected"), [
    (1.0, [100, 100, 100, 100, 100]),
    (10.0, [100, 56, 32, 18, 10]),  # 100 * 10 ** (-c / 4): 100, 56.2, 31.6, 17.8, 10
    (100.0, [100, 32, 10, 3, 1]),
    (1000.0, [100, 18, 3, 1, 1]),  # 0.56 and 0.1 keep one example: a class never vanishes
])
def test_each_class_keeps_its_geometric_share(ratio, expected):
    train = balanced_split(100, 5)
    assert counts(data.imbalanced_subset(train, ratio, 5, seed=0).labels, 5) == expected


def test_a_larger_ratio_only_takes_examples_away_and_each_seed_draws_its_own():
    train = balanced_split(100, 5)

    def kept(ratio: float, seed: int) -> set[int]:
        """The indices of the examples kept (each example's image holds its index)."""
        subset = data.imbalanced_subset(data.Split(torch.arange(500).view(500, 1, 1, 1), train.labels), ratio, 5, seed)
        return set(subset.images.flatten().tolist())

    assert kept(100.0, 0) < kept(10.0, 0) < kept(2.0, 0)
    assert kept(10.0, 0) != kept(10.0, 1)
    assert kept(10.0, 1) == kept(10.0, 1)


def test_digits_imbalance_thins_the_training_split_only():
    plain = data.build_data(compose_cfg([]).data)
    tail = data.build_data(compose_cfg(["data.imbalance=20"]).data)
    assert torch.equal(tail.val.labels, plain.val.labels) and torch.equal(tail.test.labels, plain.test.labels)
    full, thin = plain.train_per_class, tail.train_per_class
    assert thin[0] == full[0] and thin[9] == round(full[9] / 20)
    assert all(thin[c] == max(1, round(full[c] * 20 ** (-c / 9))) for c in range(10))
    # the normalization statistics are those of the examples trained on
    assert torch.allclose(tail.mean, tail.train.images.double().mean(dim=(0, 2, 3)).float(), rtol=1e-5)


@pytest.mark.parametrize(("ratio", "fraction", "expected"), [
    (10.0, 0.5, [100, 100, 10, 10, 10]),  # 0.5 of 5 classes rounds half up: the last 3 are rare
    (10.0, 0.2, [100, 100, 100, 100, 10]),
    (10.0, 0.8, [100, 10, 10, 10, 10]),
    (1000.0, 0.5, [100, 100, 1, 1, 1]),  # a class never vanishes
    (1.0, 0.5, [100, 100, 100, 100, 100]),
])
def test_the_step_profile_makes_the_last_classes_rare(ratio, fraction, expected):
    train = balanced_split(100, 5)
    assert counts(data.imbalanced_subset(train, ratio, 5, 0, "step", fraction).labels, 5) == expected


@pytest.mark.parametrize(("classes", "fraction", "rare"), [
    (10, 0.5, 5), (3, 0.5, 2), (2, 0.5, 1), (10, 0.01, 1), (10, 0.99, 9), (100, 0.1, 10), (10, 0.25, 3),
])
def test_the_step_profile_keeps_at_least_one_class_of_each_kind(classes, fraction, rare):
    assert data.minority_classes(classes, fraction) == rare


def test_both_profiles_draw_a_class_from_the_same_seeded_order():
    """A rare class keeps the same examples under either profile where its share is the same (the last class:
    1 / ratio), so a step and a long tail of one ratio and seed differ only in how many examples a class keeps."""
    labels = balanced_split(100, 5).labels
    indexed = data.Split(torch.arange(500).view(500, 1, 1, 1), labels)
    splits = (data.imbalanced_subset(indexed, 10.0, 5, 3), data.imbalanced_subset(indexed, 10.0, 5, 3, "step", 0.5))
    last = [set(split.images[split.labels == 4].flatten().tolist()) for split in splits]
    assert last[0] == last[1] and len(last[0]) == 10


def test_digits_step_imbalance():
    plain = data.build_data(compose_cfg([]).data).train_per_class
    step = data.build_data(compose_cfg(["data.imbalance=10", "data.imbalance_profile=step"]).data).train_per_class
    assert step[:5] == plain[:5] and step[5:] == [round(n / 10) for n in plain[5:]]
    fifth = data.build_data(compose_cfg(["data.imbalance=10", "data.imbalance_profile=step",
                                         "data.minority_fraction=0.2"]).data).train_per_class
    assert fifth[:8] == plain[:8] and fifth[8:] == [round(n / 10) for n in plain[8:]]


def test_imbalance_applies_to_the_train_size_subset():
    d = data.build_data(compose_cfg(["data.train_size=200", "data.imbalance=10"]).data)
    assert d.train_per_class[0] == 20 and d.train_per_class[9] == 2


# --- data.balance=oversample -------------------------------------------------------------------------


def long_tailed_labels() -> torch.Tensor:
    """200, 50, 10 and 3 examples of classes 0-3, shuffled."""
    labels = torch.tensor([0] * 200 + [1] * 50 + [2] * 10 + [3] * 3)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(5))]


def test_an_oversampled_epoch_draws_each_class_equally_and_keeps_its_length():
    labels = long_tailed_labels()
    groups = data.class_groups(labels)
    order = data.balanced_order(groups, len(labels), torch.Generator().manual_seed(0))
    assert len(order) == len(labels) == 263
    per_class = counts(labels[order], 4)
    assert sorted(per_class) == [65, 66, 66, 66]  # 263 = 4 * 65 + 3: three classes drawn at random get one more
    # the small classes' examples all come, each as often as the others (to one); the large class's draws are
    # distinct examples, another part of it each epoch
    for c, size in ((2, 10), (3, 3)):
        seen = torch.bincount(order[labels[order] == c], minlength=len(labels))[labels == c]
        assert seen.min() >= per_class[c] // size and seen.max() <= -(-per_class[c] // size)
    big = order[labels[order] == 0]
    assert len(set(big.tolist())) == len(big)
    other = data.balanced_order(groups, len(labels), torch.Generator().manual_seed(1))
    assert set(other[labels[other] == 0].tolist()) != set(big.tolist())


def test_occurrences_count_earlier_repeats():
    assert data.occurrences(torch.tensor([3, 1, 3, 3, 0, 1])).tolist() == [0, 0, 1, 2, 0, 1]


def loader(split: data.Split, **keys) -> data.DeviceLoader:
    return data.DeviceLoader(split, torch.zeros(1), torch.ones(1), 16, torch.device("cpu"), shuffle=True, seed=3,
                             **keys)


def test_the_device_loader_serves_balanced_epochs_seeded_by_the_epoch():
    labels = long_tailed_labels()
    split = data.Split(torch.arange(len(labels)).view(-1, 1, 1, 1).float(), labels)
    balanced = loader(split, oversample=True)

    def epoch(source: data.DeviceLoader, number: int) -> torch.Tensor:
        source.set_epoch(number)
        return torch.cat([y for _, y in source])

    assert len(balanced) == len(loader(split)) == -(-263 // 16)
    first = epoch(balanced, 1)
    assert max(counts(first, 4)) - min(counts(first, 4)) <= 1
    assert counts(epoch(loader(split), 1), 4) == [200, 50, 10, 3]
    assert torch.equal(epoch(balanced, 1), first) and not torch.equal(epoch(balanced, 2), first)


def test_an_oversampled_epoch_resumes_mid_epoch_with_the_same_batches():
    labels = long_tailed_labels()
    split = data.Split(torch.arange(len(labels)).view(-1, 1, 1, 1).float(), labels)
    whole = loader(split, oversample=True)
    whole.set_epoch(4)
    batches = [x for x, _ in whole]
    interrupted = loader(split, oversample=True)
    interrupted.set_epoch(4)
    served = iter(interrupted)
    for _ in range(5):
        next(served)
    state = interrupted.state_dict()
    resumed = loader(split, oversample=True)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip([x for x, _ in resumed], batches[5:], strict=True))


def test_the_dataloader_path_serves_the_same_balanced_batches_and_repeats_get_draws_of_their_own():
    labels = long_tailed_labels()
    split = data.Split(torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8), labels)
    split.images[:, 0, 0, 0] = torch.arange(len(labels)) % 256  # which example: its first two pixels
    split.images[:, 0, 0, 1] = torch.arange(len(labels)) // 256
    plain = data.WorkerLoader(split, torch.zeros(1), torch.ones(1), 16, torch.device("cpu"), shuffle=True, seed=3,
                              oversample=True)
    device = loader(data.Split(split.images, labels), oversample=True)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, device, strict=True))

    noisy = data.WorkerLoader(split, torch.zeros(1), torch.ones(1), 263, torch.device("cpu"), shuffle=True, seed=3,
                              oversample=True, transform=lambda image: image.float() + torch.rand(image.shape))
    images, served = next(iter(noisy))
    index = (images[:, 0, 0, 0].floor() + 256 * images[:, 0, 0, 1].floor()).long()
    smallest = (labels[index] == 3).nonzero().squeeze(1)  # 66 draws of 3 examples: each repeated about 22 times
    noise = images[smallest, 0, 1, 1]
    assert len(smallest) >= 65 and len(set(noise.tolist())) == len(smallest)  # no two draws alike
    assert torch.equal(served, labels[index])


def test_torchrun_ranks_serve_equal_parts_of_the_same_balanced_batches():
    labels = long_tailed_labels()
    split = data.Split(torch.arange(len(labels)).view(-1, 1, 1, 1).float(), labels)
    whole = loader(split, oversample=True, drop_last=True)
    parts = [loader(split, oversample=True, drop_last=True, shard=(rank, 2)) for rank in (0, 1)]
    for source in (whole, *parts):
        source.set_epoch(2)
    for batch, *halves in zip(whole, *parts, strict=True):
        assert torch.equal(batch[0], torch.cat([x for x, _ in halves]))


# --- data.balance=reweight --------------------------------------------------------------------------


def test_class_weights_even_out_the_classes_share_of_the_loss():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    weights = data.class_weights(labels, 4)  # class 3 has no example: weight 1
    assert weights.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3, 1.0])
    per_class = torch.bincount(labels, weights=weights[labels], minlength=3)[:3]
    assert per_class.tolist() == pytest.approx([10 / 3] * 3)  # every class weighs as much in an epoch


def test_reweight_trains_on_the_class_weighted_cross_entropy(train_inprocess):
    status, code, run = train_inprocess(["data.imbalance=10", "data.balance=reweight", "trainer.max_epochs=1",
                                         "logger.tensorboard=false"])
    assert (status, code) == ("completed", 0)
    weight = data.class_weights(run.data.train.labels, 10)
    logits, targets = torch.randn(32, 10), torch.randint(0, 10, (32,))
    assert torch.allclose(run.loss_fn(logits, targets), F.cross_entropy(logits, targets, weight=weight))
    assert not torch.allclose(run.loss_fn(logits, targets), F.cross_entropy(logits, targets))
    # mixup's and cutmix's soft targets: the same weighted mean (torch would divide by the batch size)
    assert torch.allclose(run.loss_fn(logits, F.one_hot(targets, 10).float()), run.loss_fn(logits, targets))
    mixed = 0.7 * F.one_hot(targets, 10).float() + 0.3 * F.one_hot(targets.roll(1), 10).float()
    by_hand = -(mixed * weight * F.log_softmax(logits, dim=1)).sum() / (mixed @ weight).sum()
    assert torch.allclose(run.loss_fn(logits, mixed), by_hand)


# --- the run ---------------------------------------------------------------------------------------


class Logits(torch.nn.Module):
    """A 'model' whose inputs are its logits."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_balanced_accuracy_is_the_mean_recall_of_the_classes_present():
    # class 0: 10 examples, 8 right; class 1: 2 examples, 1 right; class 2: none in the split
    labels = torch.tensor([0] * 10 + [1] * 2)
    predicted = torch.tensor([0] * 8 + [1] * 2 + [1, 0])
    logits = F.one_hot(predicted, 3).float()
    batches = [(logits[:5], labels[:5]), (logits[5:], labels[5:])]
    result = evaluate(Logits(), batches, nullcontext())
    assert result["acc"] == pytest.approx(9 / 12) and result["balanced_acc"] == pytest.approx((0.8 + 0.5) / 2)
    # torchrun: a rank with no example of the split still adds its (empty) part when num_classes is given
    other = evaluate(Logits(), batches, nullcontext(), num_classes=3)
    assert other == result
    empty = evaluate(Logits(), [], nullcontext(), reduce=lambda values: values * 0 + torch.tensor(
        [float(F.cross_entropy(logits, labels, reduction="sum")), 2, 8, 1, 1, 0, 0]), num_classes=3)
    assert empty["balanced_acc"] == pytest.approx(result["balanced_acc"])


def test_early_stopping_on_balanced_accuracy_keeps_the_epoch_it_ranks_best(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["data.imbalance=20", "data.balance=oversample", "trainer.max_epochs=4",
                      "early_stopping.monitor=val/balanced_acc", "logger.tensorboard=false",
                      f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    scores = [float(row["val/balanced_acc"]) for row in rows]
    assert len(scores) == 4 and all(0 < score <= 1 for score in scores)
    summary = json.loads((run_dir / "summary.json").read_text())
    best = scores.index(max(scores)) + 1  # the first epoch of the highest value
    assert summary["best_epoch"] == best and summary["best"]["val/balanced_acc"] == pytest.approx(max(scores))
    assert torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["epoch"] == best
    per_class = summary["examples"]["train_per_class"]
    assert per_class[0] / per_class[9] == pytest.approx(20, rel=0.1) and sum(per_class) == summary["examples"]["train"]
    assert "imbalance 20  balance=oversample  (train per class " + ", ".join(map(str, per_class)) in result.stdout
    confusion = torch.tensor([[int(v) for v in line.split(",")[1:]] for line in
                              (run_dir / "confusion_matrix.csv").read_text().splitlines()[1:]])
    recalls = confusion.diagonal() / confusion.sum(dim=1)
    assert summary["test"]["test/balanced_acc"] == pytest.approx(float(recalls.mean()))
    assert f"balanced acc {summary['test']['test/balanced_acc']:.4f}" in result.stdout


def test_a_resumed_run_from_before_the_balanced_accuracy_column_keeps_one_header(train_inprocess, tmp_path):
    overrides = ["trainer.max_epochs=1", "logger.tensorboard=false"]
    assert train_inprocess(overrides)[1] == 0
    metrics = tmp_path / "run" / "metrics.csv"
    with open(metrics, newline="") as handle:
        old = [{k: v for k, v in row.items() if k != "val/balanced_acc"} for row in csv.DictReader(handle)]
    with open(metrics, "w", newline="") as handle:  # as a run of the last release wrote it
        writer = csv.DictWriter(handle, fieldnames=[c for c in CSV_COLUMNS if c != "val/balanced_acc"])
        writer.writeheader()
        writer.writerows(old)
    status, code, _ = train_inprocess(["trainer.max_epochs=2", "logger.tensorboard=false", "checkpoint.resume=auto"])
    assert (status, code) == ("completed", 0)
    with open(metrics, newline="") as handle:
        assert handle.readline().strip() == ",".join(CSV_COLUMNS)
        handle.seek(0)
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2"] and rows[0]["val/loss"] == old[0]["val/loss"]
    assert rows[0]["val/balanced_acc"] == "" and 0 < float(rows[1]["val/balanced_acc"]) <= 1
    assert None not in rows[1]  # no value beyond the header's columns


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.imbalance=0.5"], "data.imbalance=0.5: the largest class's size over the smallest's, a finite number of "
                             "at least 1"),
    (["data.imbalance=inf"], "data.imbalance=inf"),
    (["data.balance=undersample"], "data.balance='undersample': choose one of none, oversample, reweight"),
    (["data.imbalance_profile=linear"], "data.imbalance_profile='linear': choose one of exponential, step"),
    (["data.imbalance_profile=step", "data.minority_fraction=0"], "data.minority_fraction=0.0: the share of the "
                                                                  "classes that are rare, between 0 and 1"),
    (["data.imbalance_profile=step", "data.minority_fraction=1"], "data.minority_fraction=1.0"),
    (["data.imbalance=10", "data.minority_fraction=0.2"], "data.minority_fraction=0.2: only "
                                                          "data.imbalance_profile=step reads it (here: exponential)"),
])
def test_bad_imbalance_and_balance_values_are_refused(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_cfg(overrides))
    assert message in str(error.value)


def test_a_resume_with_another_balance_is_refused(train_inprocess, tmp_path):
    status, code, _ = train_inprocess(["trainer.max_epochs=1", "logger.tensorboard=false"])
    assert code == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    status, code, run = train_inprocess(["trainer.max_epochs=2", "logger.tensorboard=false", "data.balance=oversample",
                                         f"checkpoint.resume={last}"], name="again")
    assert code == 2 and "data.balance=none (here: oversample)" in run.summary["error"]


def test_a_checkpoint_from_before_the_keys_trained_at_their_defaults(train_inprocess, tmp_path):
    """Its config lacks data.imbalance and data.balance: it trained on the data as it came, so a resume that would
    thin or rebalance it is refused, and one that leaves them at their defaults continues."""
    from omegaconf import OmegaConf

    from trainlab import checkpoint

    assert train_inprocess(["trainer.max_epochs=1", "logger.tensorboard=false"])[1] == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    old = OmegaConf.create(state["config"])
    for key in ("imbalance", "imbalance_profile", "minority_fraction", "balance"):
        del old.data[key]
    state["config"] = OmegaConf.to_yaml(old)
    checkpoint.save_atomic(state, last)
    for change, message in (("data.imbalance=10", "data.imbalance=1.0 (here: 10.0)"),
                            ("data.imbalance_profile=step", "data.imbalance_profile=exponential (here: step)"),
                            ("data.balance=reweight", "data.balance=none (here: reweight)")):
        status, code, run = train_inprocess(["trainer.max_epochs=2", "logger.tensorboard=false", change,
                                             f"checkpoint.resume={last}"], name=change)
        assert code == 2 and message in run.summary["error"]
    status, code, _ = train_inprocess(["trainer.max_epochs=2", "logger.tensorboard=false", "checkpoint.resume=auto"])
    assert (status, code) == ("completed", 0)


def test_the_run_names_the_step_profiles_rare_classes(train_inprocess, caplog):
    caplog.set_level("INFO", logger="trainlab")
    status, code, run = train_inprocess(["data.imbalance=10", "data.imbalance_profile=step", "trainer.max_epochs=1",
                                         "logger.tensorboard=false"])
    assert code == 0
    per_class = run.summary["examples"]["train_per_class"]
    assert per_class[4] / per_class[5] == pytest.approx(10, rel=0.1)
    assert ("imbalance 10 (step: the last 5 of 10 classes rare)  (train per class "
            + ", ".join(map(str, per_class))) in caplog.text
