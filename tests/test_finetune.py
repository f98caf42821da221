"""Transfer learning (finetune group): weights of another run or torchvision's, a new classifier, frozen or slower
features, and the errors of weights that cannot be loaded."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from conftest import compose_cfg
from trainlab import finetune, optim
from trainlab.config import ConfigError
from trainlab.initialization import initialize
from trainlab.models import TorchvisionModel
from trainlab.run import Run, execute

DATA = ["data=synthetic", "data.num_samples=600", "data.shape=[1,8,8]", "logger.every_n_steps=5"]
TARGET = [*DATA, "data.num_classes=4", "data.seed=1"]  # another task: 4 classes of other images
HEAD = ("7.weight", "7.bias")  # the default MLP's classifier


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """best.pt of a 2-epoch MLP run on 10 classes."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    overrides = [*DATA, "trainer.max_epochs=2"]
    assert execute(compose_cfg(overrides), run_dir, overrides)[:2] == ("completed", 0)
    return run_dir / "checkpoints" / "best.pt"


def built(tmp_path: Path, overrides: list[str]) -> Run:
    run = Run(compose_cfg(overrides), tmp_path / "run")
    run.build()
    return run


def saved(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_weights_of_another_run_load_all_but_a_classifier_of_another_class_count(tmp_path, pretrained, caplog):
    caplog.set_level(logging.INFO, logger="trainlab")
    run = built(tmp_path, [*TARGET, f"finetune.weights={pretrained}"])
    source, state = saved(pretrained), run.model.state_dict()
    for name, tensor in state.items():
        if name in HEAD:
            assert tensor.shape[0] == 4 and source[name].shape[0] == 10
        else:
            assert torch.equal(tensor, source[name]), name
    assert "loaded 10 of 12 tensors" in caplog.text and "kept the initialization of 7.weight ([10, 256]" in caplog.text
    assert [g["name"] for g in run.optimizer.param_groups] == ["all"]  # every layer trains at optimizer.lr


def test_frozen_features_stay_as_loaded_batch_norm_statistics_included(tmp_path, pretrained):
    overrides = [*TARGET, "trainer.max_epochs=2", "finetune=frozen", f"finetune.weights={pretrained}"]
    status, code, run = execute(compose_cfg(overrides), tmp_path / "run", overrides)
    assert (status, code) == ("completed", 0)
    trained, source = saved(tmp_path / "run" / "checkpoints" / "last.pt"), saved(pretrained)
    assert {n for n, t in trained.items() if n in source and t.shape == source[n].shape
            and not torch.equal(t, source[n])} == set()  # weights, running means and variances: as loaded
    assert [p.numel() for g in run.optimizer.param_groups for p in g["params"]] == [4 * 256, 4]
    assert run.summary["test"]["test/acc"] > 0.5  # a linear probe on the loaded features learns the new task

    # extended by a third epoch, the weights file gone: last.pt holds the weights and what was frozen
    moved = tmp_path / "moved.pt"
    pretrained.rename(moved)
    try:
        extended = [*overrides[:-3], "trainer.max_epochs=3", *overrides[-2:], "checkpoint.resume=auto"]
        assert execute(compose_cfg(extended), tmp_path / "run", extended)[:2] == ("completed", 0)
    finally:
        moved.rename(pretrained)
    again = saved(tmp_path / "run" / "checkpoints" / "last.pt")
    assert all(torch.equal(again[n], trained[n]) for n in trained if n not in HEAD)
    assert not torch.equal(again["7.weight"], trained["7.weight"])


def test_swa_keeps_the_frozen_batch_norm_statistics(tmp_path, pretrained):
    overrides = [*TARGET, "trainer.max_epochs=4", "finetune=frozen", f"finetune.weights={pretrained}",
                 "regularization=swa"]
    assert execute(compose_cfg(overrides), tmp_path / "run", overrides)[:2] == ("completed", 0)
    averaged, source = saved(tmp_path / "run" / "checkpoints" / "swa.pt"), saved(pretrained)
    for name in ("2.running_mean", "2.running_var", "5.running_mean", "5.running_var"):
        assert torch.equal(averaged[name], source[name]), name  # update_bn reset every batch norm


def test_low_lr_features_train_at_a_tenth_of_the_classifiers_rate_through_the_schedule(tmp_path, pretrained):
    run = built(tmp_path, [*TARGET, "finetune=low_lr", f"finetune.weights={pretrained}", "scheduler=cosine",
                           "regularization.weight_decay=1e-3", "regularization.l2=1e-4"])
    groups = run.optimizer.param_groups
    assert [g["name"] for g in groups] == ["head_decay", "head_no_decay", "features_decay", "features_no_decay"]
    for _ in range(7):
        head, features = groups[0]["lr"], groups[2]["lr"]
        assert features == pytest.approx(0.1 * head) and head > 0
        run.scheduler.step()
    assert sum(p.numel() for p in groups[0]["params"]) == 4 * 256  # the classifier's weight; its bias is not decayed
    plain = built(tmp_path / "plain", [*TARGET, "regularization.weight_decay=1e-3", "regularization.l2=1e-4"])
    decayed = {n for n, p in run.model.named_parameters() if any(p is q for q in optim.decayed_parameters(
        run.optimizer))}
    assert decayed == {n for n, p in plain.model.named_parameters()
                       if any(p is q for q in optim.decayed_parameters(plain.optimizer))}  # l2 skips the same ones


def test_a_three_channel_first_conv_loads_into_a_grey_one_summed_over_the_colours(tmp_path):
    colour = [*DATA[:-1], "data.shape=[3,8,8]", "model=cnn", "model.depth=8", "model.width=4", "trainer.max_epochs=1"]
    assert execute(compose_cfg(colour), tmp_path / "pre", colour)[:2] == ("completed", 0)
    source = saved(tmp_path / "pre" / "checkpoints" / "best.pt")
    first = next(n for n, t in source.items() if t.ndim == 4)
    run = built(tmp_path, [*colour[:-1], "data.shape=[1,8,8]",
                           f"finetune.weights={tmp_path / 'pre' / 'checkpoints' / 'best.pt'}"])
    state = run.model.state_dict()
    assert torch.equal(state[first], source[first].sum(dim=1, keepdim=True))


def test_torchvision_weights_load_from_the_hub_cache_with_a_new_stem_and_classifier(tmp_path, monkeypatch, caplog):
    import torchvision

    caplog.set_level(logging.INFO, logger="trainlab")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    reference = {k: v + torch.rand_like(v) if v.is_floating_point() else v  # stands in for the download (no
                 for k, v in torchvision.models.resnet18().state_dict().items()}  # internet here): "trained" values
    torch.save(reference, cached)
    run = built(tmp_path, ["model=torchvision", "model.name=resnet18", "data=synthetic", "data.num_samples=200",
                           "finetune=low_lr", "finetune.weights=IMAGENET1K_V1", "trainer.device=cpu"])
    state = run.model.state_dict()
    assert torch.equal(state["net.layer1.0.conv1.weight"], reference["layer1.0.conv1.weight"])
    assert torch.equal(state["net.layer4.1.bn2.running_var"], reference["layer4.1.bn2.running_var"])
    assert state["net.conv1.weight"].shape[-1] == 3 and state["net.fc.weight"].shape[0] == 10  # CIFAR stem, 10 classes
    # all but the new stem conv, the batch norm after it (its statistics were the old stem's) and the classifier
    assert "loaded 95 of 102 tensors from torchvision resnet18 IMAGENET1K_V1" in caplog.text
    assert not torch.equal(state["net.bn1.running_var"], reference["bn1.running_var"])
    head = {id(p) for p in run.optimizer.param_groups[0]["params"]}
    assert {id(run.model.net.conv1.weight), id(run.model.net.fc.weight)} <= head  # new layers train at full lr


@pytest.mark.parametrize("case", ["offline", "unknown-name", "missing-file", "other-architecture", "other-width",
                                  "other-normalization", "infinite-scale", "not-torchvision"])
def test_weights_that_cannot_be_loaded_are_named_with_the_fix(tmp_path, monkeypatch, pretrained, case):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    tv = ["model=torchvision", "model.name=resnet18", "data=synthetic", "data.num_samples=200"]
    overrides, message = {
        "offline": ([*tv, "finetune.weights=DEFAULT"], r"resnet18's IMAGENET1K_V1 weights are not in .*torch/hub/"
                    r"checkpoints and cannot be downloaded \(.*name resolution.*\); download https://download.pytorch"
                    r".org/models/resnet18-f37072fd.pth elsewhere and copy it to .*resnet18-f37072fd.pth"),
        "unknown-name": ([*tv, "finetune.weights=IMAGENET"], "not a file, nor weights of resnet18; choose one of "
                         "DEFAULT, IMAGENET1K_V1"),
        "missing-file": ([*TARGET, f"finetune.weights={tmp_path / 'none.pt'}"], "finetune.weights=.*none.pt: no "
                         "such file; give the path of a trainlab checkpoint"),
        "other-architecture": ([*TARGET, "model=cnn", f"finetune.weights={pretrained}"], r"is not of this model's "
                               r"architecture \(missing: stem.0.weight.*not in this model: 1.weight.*or train with "
                               r"the options of the weights' run: model=mlp model.hidden=\[256,256\] .*"
                               r"normalization=batch"),
        "other-width": ([*TARGET, "finetune=frozen", "model.hidden=[128,128]", f"finetune.weights={pretrained}"],
                        r"other shapes: 2.weight \(\[256\] in the weights, \[128\] here\)"),
        "other-normalization": ([*TARGET, "normalization=layer", f"finetune.weights={pretrained}"],
                                r"not in this model: 2.running_mean"),
        "infinite-scale": ([*TARGET, "finetune=low_lr", "finetune.feature_lr_scale=inf",
                            f"finetune.weights={pretrained}"], "finetune.feature_lr_scale=inf: must be a number > 0"),
        "not-torchvision": ([*TARGET, "finetune.weights=DEFAULT"], "no such file; give the path of a trainlab "
                            "checkpoint"),
    }[case]
    status, code, run = execute(compose_cfg(overrides), tmp_path / "run", overrides)
    assert (status, code) == ("failed", 2) and not run.started
    assert __import__("re").search(message, run.summary["error"]), run.summary["error"]
    assert not (tmp_path / "torch" / "hub" / "checkpoints").exists() or not any(
        (tmp_path / "torch" / "hub" / "checkpoints").iterdir())  # no partial download


def test_a_model_without_a_linear_layer_cannot_be_fine_tuned():
    with pytest.raises(ConfigError, match="no linear layer"):
        finetune.prepare(torch.nn.Conv2d(1, 2, 3), compose_cfg(["finetune=frozen"]).finetune)


def test_torchvision_googlenet_weights_load_without_their_auxiliary_classifiers(tmp_path, monkeypatch, caplog):
    import torchvision

    caplog.set_level(logging.INFO, logger="trainlab")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # torchvision's file holds aux1 and aux2 (its builder drops them after loading); trainlab builds googlenet without
    reference = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).state_dict()
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(torchvision.models.GoogLeNet_Weights.DEFAULT.url).name
    cached.parent.mkdir(parents=True)
    torch.save(reference, cached)
    model = TorchvisionModel("googlenet", input_shape=(3, 32, 32), num_classes=4, norm={"name": "batch"})
    transfer = finetune.prepare(model, compose_cfg(["finetune.weights=DEFAULT"]).finetune, "googlenet")
    aux = [k for k in reference if k.startswith("aux")]
    assert len(aux) == 20 and "20 tensors of its auxiliary classifiers left out" in caplog.text
    state = model.state_dict()
    assert all(torch.equal(state[f"net.{k}"], v) for k, v in reference.items() if k not in aux and "fc." not in k)
    assert len(transfer.features) == sum(1 for n, _ in model.named_parameters()) - 2  # all but the new classifier


def test_an_initialization_reaches_the_query_key_and_value_weights_of_attention():
    # a ViT's attention keeps them in MultiheadAttention.in_proj_weight (or q/k/v_proj_weight), not in Linear modules
    shared, separate = torch.nn.MultiheadAttention(16, 2), torch.nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    model = torch.nn.ModuleList([shared, separate])
    torch.nn.init.ones_(shared.in_proj_bias)
    initialize(model, {"name": "orthogonal"}, "relu")  # W W^T = 2 I (W^T W for more rows than columns), gain sqrt(2)
    for w in (*shared.in_proj_weight.detach().chunk(3), separate.q_proj_weight, separate.k_proj_weight,
              separate.v_proj_weight):
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(gram, 2 * torch.eye(len(gram)), atol=1e-5, rtol=0)
    assert torch.equal(shared.in_proj_bias, torch.zeros(48))
    initialize(model, {"name": "constant", "value": 0.01}, "relu")
    assert (shared.in_proj_weight == 0.01).all() and (separate.k_proj_weight == 0.01).all()


def test_the_small_image_stem_of_a_torchvision_resnet_starts_with_torchvisions_init():
    torch.manual_seed(0)  # resnet's own: kaiming_normal_(fan_out, relu), std sqrt(2 / (64 * 3 * 3)) = 0.0589
    model = TorchvisionModel("resnet18", input_shape=(1, 8, 8), num_classes=10, norm={"name": "batch"})
    stem, second = model.net.conv1.weight, model.net.layer1[0].conv1.weight
    assert stem.shape == (64, 1, 3, 3)
    assert stem.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.1)  # PyTorch's default: 1/sqrt(3 * 9) = 0.19
    assert second.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.1)  # as the layer after it


class _Wrapped(torch.nn.Module):
    """A tiny torchvision ViT held as TorchvisionModel holds its network (`net`)."""

    def __init__(self, image_size: int):
        super().__init__()
        from torchvision.models import VisionTransformer

        torch.manual_seed(image_size)
        self.net = VisionTransformer(image_size=image_size, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8,
                                     mlp_dim=16, num_classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_vit_weights_of_another_image_size_load_with_their_position_embedding_resampled(monkeypatch, caplog):
    """ImageNet's ViT weights hold a 14x14 grid of position embeddings (224-px images): they were refused on any
    other image size ('other shapes: net.encoder.pos_embedding'). Now the grid is resampled to the model's (bicubic,
    as torchvision's interpolate_embeddings), the class token's embedding kept, and every tensor is loaded."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    trained, model = _Wrapped(16), _Wrapped(32)  # 4x4 patches of 4 px -> 8x8
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    monkeypatch.setattr(finetune, "_source", lambda weights, name: (dict(state), "the weights", ""))
    caplog.set_level(logging.INFO, logger="trainlab")
    loaded = finetune.load_weights(model, "the weights", "vit_tiny", head=set())
    assert loaded == set(model.state_dict())
    position = model.net.encoder.pos_embedding
    expected = interpolate_embeddings(32, 4, {"encoder.pos_embedding": state["net.encoder.pos_embedding"]})
    assert position.shape == (1, 65, 8) and torch.equal(position, expected["encoder.pos_embedding"])
    assert torch.equal(position[:, 0], state["net.encoder.pos_embedding"][:, 0])  # the class token's
    assert torch.equal(model.net.conv_proj.weight, trained.net.conv_proj.weight)
    assert "resampled the position embedding from 4x4 patches (16-px images) to 8x8 (32-px)" in caplog.text
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    state["net.encoder.pos_embedding"] = torch.zeros(1, 17, 6)  # another width: another architecture, refused
    with pytest.raises(ConfigError, match=r"other shapes: net.encoder.pos_embedding \(\[1, 17, 6\] in the weights"):
        finetune.load_weights(model, "the weights", "vit_tiny", head=set())
