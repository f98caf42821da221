"""Each augmentation against its definition, on small seeded batches; the v2 pipeline; the wiring into a run."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from conftest import FAST, compose_cfg
from trainlab import augment
from trainlab.config import AugmentationConfig, ConfigError, validate


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distinct(n: int, c: int = 3, h: int = 6, w: int = 6) -> torch.Tensor:
    """Images whose pixels are all different and positive (so a zero or a moved pixel is recognisable)."""
    return (torch.arange(n * c * h * w, dtype=torch.float32) + 1).view(n, c, h, w)


def node(**kwargs):
    return OmegaConf.structured(AugmentationConfig(**kwargs))


# --- flips -----------------------------------------------------------------------------------------


def test_hflip_reverses_columns_and_vflip_reverses_rows():
    images = distinct(4)
    assert torch.equal(augment.hflip(images, 1.0, gen(0)), images[..., torch.arange(5, -1, -1)])
    assert torch.equal(augment.vflip(images, 1.0, gen(0)), images[..., torch.arange(5, -1, -1), :])
    assert torch.equal(augment.vflip(images, 0.0, gen(0)), images)


def test_vflip_half_flips_some_images_and_leaves_the_others():
    images = distinct(64)
    out = augment.vflip(images, 0.5, gen(1))
    flipped = torch.tensor([torch.equal(o, i.flip(-2)) for o, i in zip(out, images)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert bool((flipped ^ kept).all()) and 16 < int(flipped.sum()) < 48


# --- crop and translate ----------------------------------------------------------------------------


def offsets_of(out: torch.Tensor, padded: torch.Tensor, span: int) -> list[tuple[int, int]]:
    """The (top, left) window of each padded image that each output equals (fails if none does)."""
    h, w = out.shape[-2:]
    found = []
    for o, p in zip(out, padded):
        hits = [(t, l) for t in range(span) for l in range(span) if torch.equal(o, p[:, t:t + h, l:l + w])]
        assert len(hits) == 1
        found.append(hits[0])
    return found


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_crop_offsets_stay_within_the_padding_and_all_occur(mode):
    images = distinct(200, h=5, w=5)
    out = augment.random_crop(images, 2, gen(3), mode)
    padded = torch.nn.functional.pad(images, (2,) * 4, mode="constant" if mode == "zeros" else "reflect")
    offsets = offsets_of(out, padded, span=5)
    assert set(offsets) == {(t, l) for t in range(5) for l in range(5)}  # 0..2p, each one drawn


def test_translate_shifts_whole_pixels_within_the_fraction_with_zero_fill():
    images = distinct(300, h=8, w=8)
    out = augment.translate(images, 0.25, gen(4))  # at most round(0.25 * 8) = 2 pixels each way
    padded = torch.nn.functional.pad(images, (2,) * 4)
    offsets = offsets_of(out, padded, span=5)
    shifts = {(2 - t, 2 - l) for t, l in offsets}  # (down, right)
    assert shifts == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    assert torch.equal(augment.translate(images, 0.0, gen(4)), images)


def test_translate_moves_content_right_and_down_like_torchvision():
    images = distinct(1, h=8, w=8).expand(16, -1, -1, -1)
    moved = augment.translate(images, 0.25, gen(5))
    shifts = []
    for out in moved:  # torchvision's translate=[dx, dy] moves the content dx right and dy down
        (shift,) = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                    if torch.equal(out, TF.affine(images[0], angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0]))]
        shifts.append(shift)
    assert len(set(shifts)) > 8


# --- rotate ----------------------------------------------------------------------------------------


def test_rotate_by_zero_is_identity_and_by_90_is_rot90():
    images = distinct(3, h=7, w=7)
    assert torch.allclose(augment.rotate(images, torch.zeros(3)), images, atol=1e-3)
    turned = augment.rotate(images, torch.full((3,), 90.0))
    assert torch.allclose(turned, torch.rot90(images, 1, dims=(-2, -1)), atol=1e-2)  # counter-clockwise


def test_rotate_is_rigid_on_non_square_images_and_matches_torchvision():
    images = distinct(2, h=6, w=10)
    assert torch.allclose(augment.rotate(images, torch.full((2,), 180.0)), images.flip(-1).flip(-2), atol=1e-2)
    for angle in (-30.0, 12.5):
        theirs = TF.rotate(images, angle, interpolation=InterpolationMode.BILINEAR)
        assert torch.allclose(augment.rotate(images, torch.full((2,), angle)), theirs, atol=1e-2)


def test_random_rotate_draws_one_angle_per_image_within_the_bound():
    image = distinct(1, h=9, w=9)
    images = image.expand(64, -1, -1, -1).contiguous()
    out = augment.random_rotate(images, 10.0, gen(6))
    angles = augment._uniform(64, -10.0, 10.0, gen(6), images.device)
    assert angles.abs().max() <= 10.0 and angles.std() > 3.0
    assert torch.allclose(out, augment.rotate(images, angles), atol=1e-4)
    assert len({round(float(o.sum()), 1) for o in out}) > 32  # the angles differ per image


# --- zoom ------------------------------------------------------------------------------------------


def test_zoom_matches_torchvision_in_and_out_and_keeps_the_centre():
    images = distinct(2, h=8, w=12)
    assert torch.allclose(augment.zoom(images, torch.ones(2)), images, atol=1e-4)
    for factor in (0.75, 1.5, 2.0):
        theirs = TF.affine(images, angle=0.0, translate=[0, 0], scale=factor, shear=[0.0, 0.0],
                           interpolation=InterpolationMode.BILINEAR)
        assert torch.allclose(augment.zoom(images, torch.full((2,), factor)), theirs, atol=1e-3), factor
    out = augment.zoom(images, torch.full((2,), 0.5))
    assert out[..., 0, :].abs().max() == 0 and out[..., :, -1].abs().max() == 0  # zoomed out: a black border


def test_random_zoom_draws_one_factor_per_image_within_the_bound():
    images = distinct(1, h=9, w=9).expand(64, -1, -1, -1).contiguous()
    out = augment.random_zoom(images, 0.2, gen(3))
    factors = augment._uniform(64, 0.8, 1.2, gen(3), images.device)
    assert factors.min() >= 0.8 and factors.max() <= 1.2 and factors.std() > 0.05
    assert torch.allclose(out, augment.zoom(images, factors), atol=1e-5)


# --- cutout and noise ------------------------------------------------------------------------------


def test_cutout_zeroes_exactly_one_square_of_the_given_size_inside_each_image():
    images = distinct(500, c=2, h=7, w=7)
    out = augment.cutout(images, 3, gen(7))
    corners = set()
    for o, i in zip(out, images):
        zero = o == 0
        assert torch.equal(zero[0], zero[1])  # every channel
        rows, cols = zero[0].nonzero(as_tuple=True)
        assert len(rows) == 9 and int(rows.max() - rows.min()) == 2 and int(cols.max() - cols.min()) == 2
        assert torch.equal(o[~zero], i[~zero])
        corners.add((int(rows.min()), int(cols.min())))
    assert corners == {(t, l) for t in range(5) for l in range(5)}  # wholly inside, every placement drawn


def test_cutout_larger_than_the_image_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        augment.cutout(distinct(1, h=4, w=4), 5, gen(0))
    with pytest.raises(ConfigError, match=r"augmentation.cutout_size=9 .* choose at most 8"):
        augment.build_augment(node(cutout_size=9), 10, (1, 8, 8))


def test_noise_adds_zero_mean_gaussian_of_the_given_std_in_pixel_units():
    images = torch.full((64, 3, 16, 16), 100.0)
    out = augment.gaussian_noise(images, 8.0, gen(8))
    noise = out - images
    assert abs(noise.mean().item()) < 0.1 and noise.std().item() == pytest.approx(8.0, rel=0.02)
    assert torch.equal(out, augment.gaussian_noise(images, 8.0, gen(8)))


# --- colour ----------------------------------------------------------------------------------------


def test_colour_factor_one_is_identity():
    images = distinct(4, h=4, w=4) % 250
    ones = torch.ones(4)
    for adjust in (augment.adjust_brightness, augment.adjust_contrast, augment.adjust_saturation):
        assert torch.allclose(adjust(images, ones), images, atol=1e-4)
    assert torch.equal(augment.color_jitter(images, 0.0, 0.0, 0.0, gen(0)), images)


@pytest.mark.parametrize(("ours", "theirs"), [(augment.adjust_brightness, TF.adjust_brightness),
                                              (augment.adjust_contrast, TF.adjust_contrast),
                                              (augment.adjust_saturation, TF.adjust_saturation)])
def test_colour_adjustments_match_torchvision_per_image(ours, theirs):
    images = torch.rand(3, 3, 5, 5, generator=gen(9)) * 255
    factors = torch.tensor([0.5, 1.3, 0.0])
    expected = torch.stack([theirs(x / 255, float(f)) * 255 for x, f in zip(images, factors)])
    assert torch.allclose(ours(images, factors), expected, atol=1e-3)


def test_saturation_leaves_grey_images_alone_and_jitter_factors_stay_in_range():
    grey = torch.rand(8, 1, 4, 4, generator=gen(10)) * 100 + 50
    assert torch.equal(augment.adjust_saturation(grey, torch.zeros(8)), grey)
    out = augment.color_jitter(grey, 0.3, 0.0, 0.0, gen(11))  # brightness only: out = f * x, f in [0.7, 1.3]
    factors = (out / grey).flatten(1)
    assert torch.allclose(factors.min(1).values, factors.max(1).values, atol=1e-5)
    assert factors.min() >= 0.7 - 1e-5 and factors.max() <= 1.3 + 1e-5 and factors.std() > 0.05


# --- mixup and cutmix ------------------------------------------------------------------------------


def one_hot_batch(n: int) -> torch.Tensor:
    """Targets with one class per image (class i for image i), so a mixed row shows both partners."""
    return torch.eye(n)


def partner(row: torch.Tensor, i: int) -> int:
    """The image that row i of mixed targets was mixed with (i itself when it drew itself)."""
    others = [j for j in row.nonzero().flatten().tolist() if j != i]
    assert len(others) <= 1
    return others[0] if others else i


def test_beta_draws_have_the_beta_mean_and_variance():
    for alpha in (0.2, 1.0, 4.0):
        lam = augment.sample_beta(alpha, 200_000, gen(12), torch.device("cpu"))
        assert 0 <= lam.min() and lam.max() <= 1
        assert lam.mean().item() == pytest.approx(0.5, abs=5e-3)
        assert lam.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.03)


def test_mixup_is_a_convex_combination_with_matching_label_weights():
    n = 32
    images = distinct(n)
    out, targets = augment.mixup(images, one_hot_batch(n), 0.4, gen(13))
    assert torch.allclose(targets.sum(1), torch.ones(n)) and targets.min() >= 0
    weights = []
    for i in range(n):
        j = partner(targets[i], i)
        lam = targets[i, i].item() if j != i else 1.0
        assert torch.allclose(out[i], lam * images[i] + (1 - lam) * images[j], rtol=1e-5)
        weights.append(lam)
    assert len({round(w, 4) for w in weights}) > n // 2  # one weight per image


def test_cutmix_weights_equal_the_pasted_area():
    n, h, w = 64, 8, 8
    images = distinct(n, h=h, w=w)
    out, targets = augment.cutmix(images, one_hot_batch(n), 1.0, gen(14))
    assert torch.allclose(targets.sum(1), torch.ones(n))
    areas = []
    for i in range(n):
        j = partner(targets[i], i)
        pasted = (out[i] != images[i]).all(0)  # every channel of a pasted pixel comes from another image
        rows, cols = pasted.nonzero(as_tuple=True)
        if j == i:
            assert not pasted.any()
            continue
        assert torch.equal(out[i][:, pasted], images[j][:, pasted])
        assert torch.equal(out[i][:, ~pasted], images[i][:, ~pasted])
        if len(rows) > 0:  # a box: its bounding rectangle is full
            assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert targets[i, j].item() == pytest.approx(len(rows) / (h * w))
        areas.append(len(rows))
    assert len(set(areas)) > 5


def test_mixup_and_cutmix_together_mix_each_image_by_one_of_them():
    n = 64
    images = distinct(n)
    fn = augment.build_augment(node(mixup_alpha=1.0, cutmix_alpha=1.0), n, (3, 6, 6))
    out, targets = fn(images, torch.arange(n), gen(15))
    kinds = []
    for i in range(n):
        j = partner(targets[i], i)
        if j == i:
            continue
        lam = targets[i, i].item()
        blended = torch.allclose(out[i], lam * images[i] + (1 - lam) * images[j], rtol=1e-5)
        boxed = bool(((out[i] == images[i]) | (out[i] == images[j])).all())
        assert blended or boxed
        kinds.append(blended and not boxed)
    assert 0 < sum(kinds) < len(kinds)


# --- the built device-path function ----------------------------------------------------------------

EVERYTHING = dict(crop_padding=2, crop_padding_mode="reflect", translate=0.2, rotate=10.0, scale=0.1, hflip=0.5,
                  vflip=0.5,
                  brightness=0.3, contrast=0.3, saturation=0.3, cutout_size=3, noise_std=2.0, mixup_alpha=0.2,
                  cutmix_alpha=1.0)


def test_same_seed_same_augmented_batch_other_seed_differs():
    fn = augment.build_augment(node(**EVERYTHING), 10, (3, 8, 8))
    images, labels = torch.rand(16, 3, 8, 8, generator=gen(0)) * 255, torch.arange(16) % 10
    first = fn(images, labels, gen(16))
    again = fn(images, labels, gen(16))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[1].shape == (16, 10) and first[1].dtype == torch.float32
    assert not torch.equal(first[0], fn(images, labels, gen(17))[0])


def test_without_mixing_the_labels_pass_through_as_int64():
    fn = augment.build_augment(node(hflip=1.0, cutout_size=2), 10, (3, 6, 6))
    labels = torch.arange(4)
    out, targets = fn(distinct(4), labels, gen(0))
    assert targets is labels and targets.dtype == torch.int64


def test_device_path_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match=r"augmentation.policy=randaugment .* data.loader=dataloader"):
        augment.build_augment(node(policy="randaugment"), 10, (3, 32, 32))
    with pytest.raises(ConfigError, match=r"augmentation.crop_padding=8: reflect .* at most 7"):
        augment.build_augment(node(crop_padding=8, crop_padding_mode="reflect"), 10, (1, 8, 8))
    assert augment.build_augment(node(), 10, (3, 8, 8)) is None


@pytest.mark.parametrize(("override", "message"), [
    ("augmentation.translate=1.5", r"augmentation.translate=1.5: is a fraction"),
    ("augmentation.mixup_alpha=-1", r"augmentation.mixup_alpha=-1.0: must be >= 0"),
    ("augmentation.vflip=2", r"augmentation.vflip=2.0: is a probability"),
    ("augmentation.rotate=400", r"augmentation.rotate=400.0: is in degrees"),
    ("augmentation.cutout_size=-3", r"augmentation.cutout_size=-3: must be >= 0"),
    ("augmentation.scale=1.0", r"augmentation.scale=1.0: is the largest zoom change, in \[0, 1\)"),
    ("augmentation.policy=autoaug", r"augmentation.policy='autoaug': choose one of autoaugment, randaugment"),
    ("augmentation=trivialaugment", r"augmentation.policy='trivialaugment': runs only on the DataLoader path"),
    ("augmentation.randaugment_magnitude=31", r"augmentation.randaugment_magnitude=31: must be in \[0, 30\]"),
])
def test_invalid_augmentation_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg([override]))


def test_presets_combine_over_one_node():
    cfg = compose_cfg(["augmentation=flip_crop", "augmentation.cutout_size=8", "augmentation.mixup_alpha=0.2"])
    aug = cfg.augmentation
    assert (aug.hflip, aug.crop_padding, aug.crop_padding_mode, aug.cutout_size, aug.mixup_alpha) == (
        0.5, 4, "reflect", 8, 0.2)


# --- the DataLoader path: torchvision.transforms.v2 ------------------------------------------------


def uint8_image(c: int = 3, h: int = 8, w: int = 8) -> torch.Tensor:
    return (torch.arange(c * h * w) % 200 + 20).to(torch.uint8).view(c, h, w)


def test_v2_transform_is_none_without_per_image_augmentation():
    assert augment.build_v2_transform(node()) is None
    assert augment.build_v2_transform(node(mixup_alpha=0.2, cutmix_alpha=1.0)) is None  # batch-level only


def test_v2_transform_maps_each_option_to_its_torchvision_counterpart():
    pipeline = augment.build_v2_transform(node(**EVERYTHING))
    kinds = [type(t) for t in pipeline.transforms]
    assert kinds == [augment.PadRandomCrop, v2.RandomAffine, v2.RandomRotation, v2.RandomAffine,
                     v2.RandomHorizontalFlip, v2.RandomVerticalFlip, augment.ColorJitter, augment.Cutout, v2.ToDtype,
                     v2.GaussianNoise]
    affine, rotation, zoom, jitter, noise = (pipeline.transforms[k] for k in (1, 2, 3, 6, 9))
    assert affine.translate == (0.2, 0.2) and list(affine.degrees) == [0.0, 0.0]
    assert zoom.scale == (0.9, 1.1) and zoom.translate is None and zoom.interpolation == InterpolationMode.BILINEAR
    assert list(rotation.degrees) == [-10.0, 10.0] and rotation.interpolation == InterpolationMode.BILINEAR
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.white) == (0.3, 0.3, 0.3, 255.0)
    assert (noise.sigma, noise.clip) == (2.0, False)
    out = pipeline(uint8_image())
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32


def test_v2_flip_crop_and_cutout_follow_the_batched_definitions():
    image = uint8_image()
    assert torch.equal(augment.build_v2_transform(node(hflip=1.0))(image), image.flip(-1))
    assert torch.equal(augment.build_v2_transform(node(vflip=1.0))(image), image.flip(-2))
    crop = augment.build_v2_transform(node(crop_padding=2, crop_padding_mode="reflect"))
    padded = torch.nn.functional.pad(image[None].float(), (2,) * 4, mode="reflect")[0].to(torch.uint8)
    torch.manual_seed(0)
    outs = torch.stack([crop(image) for _ in range(100)]).float()
    assert len(set(offsets_of(outs, padded[None].float().expand(100, -1, -1, -1), span=5))) > 15
    cut = augment.build_v2_transform(node(cutout_size=3))(image)
    zero = (cut == 0).all(0)
    rows, cols = zero.nonzero(as_tuple=True)
    assert len(rows) == 9 and int(rows.max() - rows.min()) == 2 and int(cols.max() - cols.min()) == 2
    assert torch.equal(cut[:, ~zero], image[:, ~zero])


@pytest.mark.parametrize(("keys", "kind", "attrs"), [
    (dict(policy="autoaugment", autoaugment_dataset="svhn"), v2.AutoAugment, {"policy": v2.AutoAugmentPolicy.SVHN}),
    (dict(policy="randaugment", randaugment_num_ops=3, randaugment_magnitude=5), v2.RandAugment,
     {"num_ops": 3, "magnitude": 5}),
    (dict(policy="trivialaugment"), v2.TrivialAugmentWide, {}),
])
def test_policies_exist_on_the_dataloader_path(keys, kind, attrs):
    pipeline = augment.build_v2_transform(node(**keys))
    (scaled,) = pipeline.transforms
    policy = scaled.transform  # torchvision's, on the image scaled to 0-255 (here it already is)
    assert isinstance(scaled, augment.OnFullScale) and scaled.white == 255.0
    assert isinstance(policy, kind) and all(getattr(policy, k) == v for k, v in attrs.items())
    out = pipeline(uint8_image(1, 8, 8))
    assert out.shape == (1, 8, 8) and out.dtype == torch.uint8


def test_batch_mix_alone_is_what_the_dataloader_path_adds_on_the_device():
    assert augment.build_batch_mix(node(hflip=0.5), 10) is None
    mix = augment.build_batch_mix(node(cutmix_alpha=1.0), 10)
    images, labels = distinct(8), torch.arange(8)
    out, targets = mix(images, labels, gen(18))
    expected = augment.cutmix(images, torch.eye(10)[:8], 1.0, gen(18))
    assert torch.equal(out, expected[0]) and torch.equal(targets, expected[1])


# --- in a run --------------------------------------------------------------------------------------


def test_label_smoothing_applies_to_soft_targets():
    logits = torch.randn(4, 5, generator=gen(19))
    soft = torch.softmax(torch.randn(4, 5, generator=gen(20)), 1)
    smoothed = 0.9 * soft + 0.1 / 5
    expected = -(smoothed * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(nn.CrossEntropyLoss(label_smoothing=0.1)(logits, soft), expected, atol=1e-6)


def test_a_run_with_mixup_trains_on_soft_targets_and_logs_finite_losses(train_inprocess):
    status, code, run = train_inprocess([*FAST, "trainer.max_epochs=3", "augmentation=mixup",
                                         "augmentation.mixup_alpha=0.4", "regularization.label_smoothing=0.1"])
    assert (status, code) == ("completed", 0), run.summary.get("error")
    _, targets = next(iter(run.train_batches))
    assert targets.shape == (run.cfg.data.batch_size, 10) and targets.dtype == torch.float32
    rows = list(csv.DictReader((run.run_dir / "metrics.csv").open()))
    assert len(rows) == 3 and all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert float(rows[-1]["train/loss"]) < float(rows[0]["train/loss"])
    assert 0.5 < float(rows[-1]["train/acc"]) <= 1.0  # compared with the argmax of the mixed targets
    assert run.summary["test"]["test/acc"] > 0.8


def test_evaluation_never_augments(train_inprocess):
    status, _, run = train_inprocess([*FAST, "trainer.max_epochs=1", "augmentation=cutout",
                                      "augmentation.cutmix_alpha=1.0", "regularization=swa",
                                      "regularization.swa_start=0.0"])  # SWA's batch-norm pass takes mixed batches
    assert status == "completed", run.summary.get("error")
    assert run.train_batches.augment is not None
    d = run.data
    for batches, split in ((run.val_batches, d.val), (run.test_batches, d.test)):
        assert batches.augment is None
        x, y = next(iter(batches))
        plain = (split.images[: len(y)].float() - d.mean.view(1, -1, 1, 1)) / d.std.view(1, -1, 1, 1)
        assert torch.allclose(x, plain, atol=1e-5) and torch.equal(y, split.labels[: len(y)])
    assert "swa" in run.summary
