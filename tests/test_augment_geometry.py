"""Shear, perspective, elastic, blur, sharpness, gamma and invert: each batched function against torchvision's
functional for fixed parameters, their random draws against the documented ranges, both loader paths against each
other, the checks, and every preset through a short run on both loaders."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from conftest import compose_cfg, run_cli
from trainlab import augment
from trainlab.config import AugmentationConfig, ConfigError, validate

BILINEAR = InterpolationMode.BILINEAR
CPU = torch.device("cpu")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images_of(n: int, c: int = 3, h: int = 8, w: int = 12, seed: int = 0) -> torch.Tensor:
    """Random pixel-unit images in [0, 255)."""
    return torch.rand(n, c, h, w, generator=gen(seed)) * 255


def node(**kwargs):
    return OmegaConf.structured(AugmentationConfig(**kwargs))


# --- shear -----------------------------------------------------------------------------------------


def test_shear_matches_torchvision_affine_along_x_on_non_square_images():
    images = images_of(2)
    assert torch.allclose(augment.shear(images, torch.zeros(2)), images, atol=1e-3)
    for angle in (-30.0, 12.5, 45.0):
        theirs = TF.affine(images, angle=0.0, translate=[0, 0], scale=1.0, shear=[angle, 0.0], interpolation=BILINEAR)
        assert torch.allclose(augment.shear(images, torch.full((2,), angle)), theirs, atol=1e-2), angle


def test_shear_slants_rows_and_leaves_the_middle_row_in_place():
    images = images_of(1, h=9, w=9)  # odd height: the middle row is the centre, which a shear along x keeps
    out = augment.shear(images, torch.tensor([45.0]))  # row y (up from the centre) moves by tan(45°)·y = y pixels
    assert torch.allclose(out[..., 4, :], images[..., 4, :], atol=1e-3)
    assert torch.allclose(out[..., 3, 1:], images[..., 3, :-1], atol=1e-3)  # one up: one pixel right
    assert torch.allclose(out[..., 6, :-2], images[..., 6, 2:], atol=1e-3)  # two down: two pixels left


def test_random_shear_draws_one_angle_per_image_uniformly_within_the_bound():
    images = images_of(1, h=9, w=9).expand(2000, -1, -1, -1).contiguous()
    out = augment.random_shear(images, 20.0, gen(1))
    angles = augment._uniform(2000, -20.0, 20.0, gen(1), CPU)
    assert torch.allclose(out, augment.shear(images, angles), atol=1e-4)
    assert angles.abs().max() <= 20.0 and angles.min() < -19.5 and angles.max() > 19.5
    assert angles.std().item() == pytest.approx(40 / 12 ** 0.5, rel=0.05)  # uniform on [-20, 20]


# --- perspective -----------------------------------------------------------------------------------


def corners_of(dx: torch.Tensor, dy: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Corners moved inwards by dx, dy pixels ([N, 4] each), top-left, top-right, bottom-right, bottom-left."""
    start = torch.tensor([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=torch.float32)
    inwards = torch.tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    return start + inwards * torch.stack([dx, dy], -1)


def test_perspective_matches_torchvision_for_given_corners():
    n, h, w = 16, 8, 12
    images = images_of(n, h=h, w=w)
    dx, dy = torch.randint(0, 6, (n, 4), generator=gen(2)), torch.randint(0, 4, (n, 4), generator=gen(3))
    corners = corners_of(dx, dy, h, w)
    ours = augment.perspective(images, corners)
    start = [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]
    for mine, image, end in zip(ours, images, corners.long().tolist()):
        theirs = TF.perspective(image, start, end, interpolation=BILINEAR)
        ok = theirs.isfinite()  # torchvision gives NaN where a pixel lies on the vanishing line; ours is 0 (outside)
        assert torch.allclose(mine[ok], theirs[ok], atol=1e-2) and (mine[~ok] == 0).all()
    unmoved = corners_of(torch.zeros(n, 4, dtype=torch.long), torch.zeros(n, 4, dtype=torch.long), h, w)
    assert torch.allclose(augment.perspective(images, unmoved), images, atol=1e-2)


def test_perspective_is_finite_even_where_pixels_lie_on_the_vanishing_line():
    images = images_of(1, c=1, h=8, w=8)
    out = augment.perspective(images, torch.tensor([[[0.0, 1.0], [5.0, 0.0], [5.0, 6.0], [2.0, 5.0]]]))
    assert out.isfinite().all() and out[0, 0, 7, 0] == 0


def test_random_perspective_moves_corners_by_torchvisions_ranges_with_probability_p(monkeypatch):
    seen = []
    monkeypatch.setattr(augment, "perspective", lambda images, corners: seen.append(corners) or images + 1)
    n, h, w = 4000, 6, 8  # reach: int(0.5 · (8 // 2)) = 2 pixels in x, int(0.5 · (6 // 2)) = 1 in y
    out = augment.random_perspective(torch.zeros(n, 1, h, w), 0.5, 0.3, gen(4))
    warped = out[:, 0, 0, 0] == 1
    assert warped.float().mean().item() == pytest.approx(0.3, abs=0.03)
    moved = (seen[0] - corners_of(torch.zeros(n, 4), torch.zeros(n, 4), h, w)).abs()  # [N, 4, 2]
    assert set(moved[..., 0].flatten().tolist()) == {0, 1, 2} and set(moved[..., 1].flatten().tolist()) == {0, 1}
    for corner in range(4):  # each corner coordinate uniform over its range
        counts = torch.bincount(moved[:, corner, 0].long(), minlength=3).float() / n
        assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.03)
    images = images_of(8, h=h, w=w)
    assert torch.equal(augment.random_perspective(images, 0.5, 0.0, gen(5)), images)  # p = 0: untouched


def test_random_perspective_with_p_one_warps_every_image_by_its_own_corners():
    images = images_of(1, h=8, w=8).expand(64, -1, -1, -1).contiguous()
    out = augment.random_perspective(images, 1.0, 1.0, gen(6))
    assert out.isfinite().all()
    assert len({round(float(o.sum()), 1) for o in out}) > 48  # corners drawn per image


# --- elastic ---------------------------------------------------------------------------------------


def test_elastic_matches_torchvision_for_a_given_displacement():
    n, h, w = 4, 8, 12
    images = images_of(n, h=h, w=w)
    displacement = (torch.rand(n, h, w, 2, generator=gen(7)) - 0.5) * 0.4
    ours = augment.elastic(images, displacement)
    for mine, image, field in zip(ours, images, displacement):
        assert torch.allclose(mine, TF.elastic(image, field[None], interpolation=BILINEAR), atol=1e-2)
    assert torch.allclose(augment.elastic(images, torch.zeros(n, h, w, 2)), images, atol=1e-3)


def test_elastic_displacement_is_torchvisions_draw():
    image = torch.rand(1, 16, 20)
    torch.manual_seed(8)
    theirs = v2.ElasticTransform(alpha=30.0, sigma=1.5).make_params([image])["displacement"]
    torch.manual_seed(8)
    ours = augment.elastic_displacement(1, 16, 20, 30.0, 1.5, None, CPU)
    assert ours.shape == (1, 16, 20, 2) and torch.allclose(ours, theirs, atol=1e-6)


def test_elastic_field_scales_with_alpha_and_smooths_with_sigma():
    fields = {s: augment.elastic_displacement(8, 64, 64, 10.0, s, gen(9), CPU) for s in (0.5, 1.0, 3.0)}
    assert torch.allclose(augment.elastic_displacement(8, 64, 64, 20.0, 1.0, gen(9), CPU), 2 * fields[1.0])
    # blurring uniform noise of variance 1/3 with a unit-sum gaussian of std s (in 2-D) leaves variance about
    # 1/3 / (4π s²); the field is that times alpha / size (away from the border, where reflection repeats the noise)
    for s in (1.0, 3.0):
        expected = (1 / 3 / (4 * torch.pi * s ** 2)) ** 0.5 * 10.0 / 64
        assert fields[s][:, 16:48, 16:48].std().item() == pytest.approx(expected, rel=0.1), s
    roughness = {s: (f[:, :, 1:] - f[:, :, :-1]).std() / f.std() for s, f in fields.items()}
    assert roughness[0.5] > roughness[1.0] > roughness[3.0]


def test_random_elastic_deforms_each_image_by_its_own_field():
    images = images_of(8, h=10, w=10)
    out = augment.random_elastic(images, 20.0, 2.0, gen(10))
    expected = augment.elastic(images, augment.elastic_displacement(8, 10, 10, 20.0, 2.0, gen(10), CPU))
    assert torch.equal(out, expected) and not torch.allclose(out, images, atol=1.0)


# --- blur ------------------------------------------------------------------------------------------


def test_blur_kernel_size_is_torchvisions_elastic_rule_capped_by_the_image():
    assert [augment.blur_kernel_size(s, 32, 32) for s in (0.1, 0.5, 1.0, 1.2, 5.0)] == [1, 5, 9, 11, 41]
    assert augment.blur_kernel_size(5.0, 8, 12) == 15  # reflect padding of 7 fits an 8-pixel side


def test_gaussian_blur_matches_torchvision_with_a_sigma_per_image():
    images = images_of(4, h=9, w=11)
    sigmas = torch.tensor([0.3, 1.0, 2.5, 0.1])
    ours = augment.gaussian_blur(images, sigmas, 9)
    for mine, image, sigma in zip(ours, images, sigmas.tolist()):
        assert torch.allclose(mine, TF.gaussian_blur(image, [9, 9], [sigma, sigma]), atol=1e-3)
    flat = torch.full((2, 3, 6, 6), 7.0)
    assert torch.allclose(augment.gaussian_blur(flat, torch.tensor([0.5, 3.0]), 11), flat)  # weights sum to 1


def test_random_blur_draws_sigma_uniformly_from_a_tenth_to_the_maximum():
    images = images_of(1, h=10, w=10).expand(2000, -1, -1, -1).contiguous()
    out = augment.random_blur(images, 2.0, gen(11))
    sigmas = augment._uniform(2000, 0.1, 2.0, gen(11), CPU)
    assert torch.allclose(out, augment.gaussian_blur(images, sigmas, 17), atol=1e-4)
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0 and sigmas.min() < 0.12 and sigmas.max() > 1.98
    sharpness = (out[:, :, :, 1:] - out[:, :, :, :-1]).abs().mean((1, 2, 3))
    assert sharpness.max() > 2 * sharpness.min()  # images blurred by different amounts


# --- sharpness, gamma, invert ----------------------------------------------------------------------


@pytest.mark.parametrize(("ours", "theirs", "factors"), [
    (augment.adjust_sharpness, TF.adjust_sharpness, [0.0, 0.5, 1.0, 2.0]),
    (augment.adjust_gamma, TF.adjust_gamma, [0.5, 0.8, 1.0, 1.5]),
])
def test_sharpness_and_gamma_match_torchvision_per_image(ours, theirs, factors):
    images = images_of(4, h=7, w=9)
    out = ours(images, torch.tensor(factors))
    for mine, image, factor in zip(out, images, factors):  # torchvision's float images are on the [0, 1] scale
        assert torch.allclose(mine, theirs(image / 255, factor) * 255, atol=1e-3), factor
    assert torch.allclose(out[2], images[2], atol=1e-3)  # factor 1 is the identity


def test_sharpness_zero_is_the_smoothed_image_with_its_border_kept():
    images = images_of(2, c=1, h=6, w=6)
    out = augment.adjust_sharpness(images, torch.zeros(2))
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    inner = torch.nn.functional.conv2d(images, kernel.view(1, 1, 3, 3))
    assert torch.allclose(out[..., 1:-1, 1:-1], inner, atol=1e-4)
    assert torch.equal(out[..., 0, :], images[..., 0, :]) and torch.equal(out[..., :, -1], images[..., :, -1])


def test_random_sharpness_and_gamma_draw_one_factor_per_image_within_the_range():
    images = images_of(2000, c=1, h=5, w=5)
    for fn, adjust, strength, low, high in ((augment.random_sharpness, augment.adjust_sharpness, 1.5, 0.0, 2.5),
                                            (augment.random_gamma, augment.adjust_gamma, 0.8, 0.2, 1.8)):
        out = fn(images, strength, gen(16))
        factors = augment._uniform(2000, low, high, gen(16), CPU)
        assert torch.allclose(out, adjust(images, factors), atol=1e-3)
        assert factors.min() < low + 0.01 and factors.max() > high - 0.01 and factors.min() >= low


@pytest.mark.parametrize(("name", "adjust"), [("adjust_sharpness", augment.adjust_sharpness),
                                              ("adjust_gamma", augment.adjust_gamma)])
def test_v2_factor_step_is_the_device_function_rounded_to_uint8(name, adjust):
    """The DataLoader step draws its factor as the device does and rounds (torchvision alone truncates uint8)."""
    image = (torch.rand(3, 9, 9, generator=gen(19)) * 255).round().to(torch.uint8)
    step = augment.RandomFactor(name, 0.3, 1.7)
    for seed in range(20):
        torch.manual_seed(seed)
        out = step(image)
        torch.manual_seed(seed)
        factor = augment._uniform(1, 0.3, 1.7, None, CPU)
        assert out.dtype == torch.uint8
        assert (out.float() - adjust(image[None].float(), factor)[0].round()).abs().max() <= 1  # float ties only
        assert (out.float() - adjust(image[None].float(), factor)[0].round()).abs().mean() < 0.01


def test_invert_flips_each_image_with_probability_p():
    images = images_of(4000, c=1, h=2, w=2)
    out = augment.invert(images, 0.3, gen(17))
    inverted = torch.isclose(out, 255 - images).flatten(1).all(1)
    assert bool((inverted | (out == images).flatten(1).all(1)).all())
    assert inverted.float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert torch.equal(augment.invert(images, 0.0, gen(17)), images)


@pytest.mark.parametrize("loader", ["device", "dataloader"])
def test_gamma_and_invert_work_against_the_digits_white_of_16_on_both_paths(loader, train_inprocess,
                                                                             threads_restored):
    """The digits' levels are 0-16: against 255, invert gave 239-255 and gamma 0.5 lifted a 4 to 32, far outside
    the data the normalization was computed on."""
    status, _, run = train_inprocess(["augmentation.invert=1.0", "augmentation.gamma=0.5", f"data.loader={loader}",
                                      "data.num_workers=0", "trainer.threads=1", "trainer.max_epochs=1",
                                      "data.batch_size=512", "logger.tensorboard=false"])
    assert status == "completed" and run.data.white == 16.0
    images = run.data.train.images[:256]
    if loader == "device":
        out, _ = run.train_batches.augment(images.float(), run.data.train.labels[:256], gen(19))
    else:
        torch.manual_seed(19)
        out = torch.stack([run.train_batches.loader.dataset.transform(image) for image in images]).float()
    assert out.min() >= 0 and out.max() <= 16  # inverted (16 - x), then a gamma against 16: still digits' levels
    assert out[images.float() == 0].min() > 0  # black became white and stayed bright
    mean = out.mean().item()  # inverted digits are mostly white: the mean level rises from about 4.9 to about 11
    assert 9 < mean < 14, mean
    levels = (IMAGE[None].float() / 16).floor()  # 1 to 14
    assert torch.equal(augment.invert(levels, 1.0, gen(1), white=16.0), 16.0 - levels)
    assert torch.equal(augment.adjust_gamma(torch.tensor([[[[4.0]]]]), torch.tensor([0.5]), white=16.0),
                       torch.tensor([[[[8.0]]]]))


def test_a_perspective_draw_without_a_homography_leaves_the_image_alone_on_both_paths():
    """On a 1x8 image every corner draw has three corners on one line: torchvision's RandomPerspective raised
    (torch.linalg.lstsq: not full rank) and failed the run on the DataLoader path."""
    image = (torch.arange(8) * 30).to(torch.uint8).view(1, 1, 8)
    pipeline = augment.build_v2_transform(node(perspective=1.0, perspective_p=1.0))
    torch.manual_seed(0)
    assert all(torch.equal(pipeline(image), image) for _ in range(20))
    batch = image.float().expand(20, -1, -1, -1)
    assert torch.equal(augment.random_perspective(batch, 1.0, 1.0, gen(0)), batch)


# --- the two loader paths --------------------------------------------------------------------------

# rotate and scale too: their DataLoader side takes fill=None like the new ones (torchvision's fill=0 darkens borders)
OPTIONS = {"shear": dict(shear=20.0), "perspective": dict(perspective=0.6, perspective_p=0.5),
           "elastic": dict(elastic_alpha=40.0, elastic_sigma=1.5), "blur": dict(blur_sigma=1.5),
           "rotate": dict(rotate=20.0), "scale": dict(scale=0.2), "sharpness": dict(sharpness=0.8),
           "gamma": dict(gamma=0.5), "invert": dict(invert=0.3)}


# a gradient (which the sharpness kernel leaves alone) plus a checkerboard of 30 levels, in 20..228
IMAGE = (torch.arange(100.0).view(1, 10, 10) * 1.8 + 20 + 30 * ((torch.arange(10) + torch.arange(10).view(-1, 1)) % 2)
         ).round().to(torch.uint8)


def v2_copies(pipeline, image: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n outputs of the per-image pipeline, one thread as in a DataLoader worker (and fast on a busy machine)."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.stack([pipeline(image) for _ in range(n)]).float()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("option", OPTIONS)
def test_device_and_dataloader_paths_draw_the_same_distribution(option):
    """Over 2000 augmented copies of one image, each pixel's mean and mean square agree between the batched device
    function (rounded, as the uint8 DataLoader path rounds) and the per-image v2 pipeline: |z| < 5 at every pixel.
    Calibrated: correct paths reach |z| 3.1; 15 % less shear, rotate, scale, elastic_alpha, blur_sigma or gamma, or
    torchvision's default fill=0 for shear, rotate or scale, give 6 to 40. Subtler changes (a probability 15 % off,
    sharpness's spread) stay under 5 here; the exact tests of each draw above catch those on the device."""
    cfg, n = node(**OPTIONS[option]), 2000
    image = IMAGE
    device_fn = augment.build_augment(cfg, 10, (1, 10, 10))
    ours, _ = device_fn(image.float().expand(n, -1, -1, -1).contiguous(), torch.zeros(n, dtype=torch.long), gen(13))
    ours, theirs = ours.round(), v2_copies(augment.build_v2_transform(cfg), image, n, seed=12)
    assert (ours != image.float()).flatten(1).any(1).float().mean() > 0.25  # it changes the copies (invert: 0.3)
    for a, b in ((ours, theirs), (ours ** 2, theirs ** 2)):
        z = (a.mean(0) - b.mean(0)) / ((a.var(0) + b.var(0)) / n + 1e-6).sqrt()
        assert z.abs().max() < 5, (option, z.abs().max())


# colour steps after one another on the digits' levels: each must clamp at their white of 16, or invert wraps (the
# DataLoader path's uint8 took 16 - 22 to 250) and a gamma leaves values above 16 there
DIGITS_OPTIONS = {"brightness+invert": dict(brightness=0.4, invert=0.5), "sharpness+invert": dict(sharpness=1.0,
                  invert=0.5), "contrast+sharpness+gamma": dict(contrast=0.4, sharpness=1.0, gamma=0.5)}


@pytest.mark.parametrize("option", DIGITS_OPTIONS)
def test_colour_steps_on_the_digits_levels_stay_within_them_alike_on_both_paths(option):
    cfg, n, white = node(**DIGITS_OPTIONS[option]), 2000, 16.0
    image = (IMAGE.float() / 16).floor().to(torch.uint8)  # levels 1 to 14
    device_fn = augment.build_augment(cfg, 10, (1, 10, 10), white)
    ours, _ = device_fn(image.float().expand(n, -1, -1, -1).contiguous(), torch.zeros(n, dtype=torch.long), gen(13))
    ours, theirs = ours.round(), v2_copies(augment.build_v2_transform(cfg, white), image, n, seed=12)
    for copies in (ours, theirs):
        assert copies.min() >= 0 and copies.max() <= white, (option, copies.min(), copies.max())
    for a, b in ((ours, theirs), (ours ** 2, theirs ** 2)):
        z = (a.mean(0) - b.mean(0)) / ((a.var(0) + b.var(0)) / n + 1e-6).sqrt()
        assert z.abs().max() < 5, (option, z.abs().max())


def test_built_device_function_runs_the_new_steps_in_order_with_one_generator():
    keys = dict(shear=10.0, perspective=0.4, perspective_p=1.0, elastic_alpha=20.0, elastic_sigma=2.0, hflip=1.0,
                blur_sigma=1.0)
    fn = augment.build_augment(node(**keys), 10, (3, 8, 12))
    images, labels = images_of(16), torch.arange(16) % 10
    out, targets = fn(images, labels, gen(13))
    g = gen(13)
    expected = augment.random_shear(images, 10.0, g)
    expected = augment.random_perspective(expected, 0.4, 1.0, g)
    expected = augment.random_elastic(expected, 20.0, 2.0, g)
    expected = augment.random_blur(augment.hflip(expected, 1.0, g), 1.0, g)
    assert torch.equal(out, expected) and targets is labels
    assert augment.build_augment(node(perspective=0.5, perspective_p=0.0), 10, (3, 8, 8)) is None


def test_v2_transform_maps_each_new_option_to_its_torchvision_counterpart():
    keys = dict(shear=10.0, perspective=0.4, perspective_p=0.7, elastic_alpha=20.0, elastic_sigma=2.0,
                blur_sigma=1.0, cutout_size=2)
    pipeline = augment.build_v2_transform(node(**keys))
    kinds = [type(t) for t in pipeline.transforms]
    assert kinds == [v2.RandomAffine, augment.RandomPerspective, augment.Elastic, augment.RandomBlur, augment.Cutout]
    shear, warp, elastic, blur, _ = pipeline.transforms
    assert list(shear.shear) == [-10.0, 10.0] and list(shear.degrees) == [0.0, 0.0]  # x only
    assert shear.interpolation == BILINEAR and shear.scale is None and shear.translate is None
    warp = warp.transform  # torchvision's, which the wrapper calls
    assert (warp.distortion_scale, warp.p, warp.interpolation) == (0.4, 0.7, BILINEAR)
    assert (elastic.alpha, elastic.sigma, blur.max_sigma) == (20.0, 2.0, 1.0)
    image = (torch.arange(3 * 8 * 8) % 200 + 20).to(torch.uint8).view(3, 8, 8)
    out = pipeline(image)
    assert out.shape == image.shape and out.dtype == torch.uint8


def test_colour_extras_come_after_colour_jitter_on_both_paths():
    keys = dict(brightness=0.2, sharpness=0.5, gamma=0.3, invert=0.4, blur_sigma=1.0)
    pipeline = augment.build_v2_transform(node(**keys))
    kinds = [type(t) for t in pipeline.transforms]
    assert kinds == [augment.ColorJitter, augment.RandomFactor, augment.RandomFactor, augment.RandomInvert,
                     augment.RandomBlur]
    sharp, gamma, inv = pipeline.transforms[1:4]
    assert (sharp.name, sharp.low, sharp.high) == ("adjust_sharpness", 0.5, 1.5)
    assert (gamma.name, gamma.low, gamma.high) == ("adjust_gamma", 0.7, 1.3) and inv.p == 0.4
    images = images_of(16)
    out, _ = augment.build_augment(node(**keys), 10, (3, 8, 12))(images, torch.arange(16) % 10, gen(18))
    g = gen(18)
    expected = augment.random_gamma(augment.random_sharpness(augment.color_jitter(images, 0.2, 0.0, 0.0, g), 0.5, g),
                                    0.3, g)
    assert torch.equal(out, augment.random_blur(augment.invert(expected, 0.4, g), 1.0, g))


def test_elastic_and_blur_fit_images_smaller_than_torchvisions_kernel():
    image = (torch.arange(64) * 3).to(torch.uint8).view(1, 8, 8)
    for keys in (dict(elastic_alpha=50.0, elastic_sigma=5.0), dict(blur_sigma=5.0)):  # 41 taps, capped at 15
        torch.manual_seed(14)
        assert augment.build_v2_transform(node(**keys))(image).shape == (1, 8, 8)
        fn = augment.build_augment(node(**keys), 10, (1, 8, 8))
        assert fn(image[None].float(), torch.zeros(1, dtype=torch.long), gen(14))[0].isfinite().all()


# --- checks and presets ----------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ("augmentation.shear=90", r"augmentation.shear=90.0: is in degrees, 0 to below 90"),
    ("augmentation.shear=-5", r"augmentation.shear=-5.0: is in degrees"),
    ("augmentation.perspective=1.5", r"augmentation.perspective=1.5: must be in \[0, 1\]"),
    ("augmentation.perspective_p=-0.1", r"augmentation.perspective_p=-0.1: must be in \[0, 1\]"),
    ("augmentation.elastic_alpha=-1", r"augmentation.elastic_alpha=-1.0: must be >= 0"),
    ("augmentation.elastic_sigma=0", r"augmentation.elastic_sigma=0.0: is the smoothing std in pixels and must be > 0"),
    ("augmentation.blur_sigma=0.05", r"augmentation.blur_sigma=0.05: must be 0 \(off\) or at least 0.1"),
    ("augmentation.blur_sigma=-1", r"augmentation.blur_sigma=-1.0: must be 0 \(off\) or at least 0.1"),
    ("augmentation.sharpness=-0.5", r"augmentation.sharpness=-0.5: must be >= 0"),
    ("augmentation.gamma=1", r"augmentation.gamma=1.0: is the largest change of the exponent, in \[0, 1\)"),
    ("augmentation.invert=1.5", r"augmentation.invert=1.5: is a probability in \[0, 1\]"),
    ("augmentation.blur_sigma=inf", r"augmentation.blur_sigma=inf: must be a finite number"),  # was an OverflowError
    ("augmentation.elastic_alpha=inf", r"augmentation.elastic_alpha=inf: must be a finite number"),  # was NaN losses
])
def test_invalid_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg([override]))


def test_an_invalid_value_exits_2_on_the_command_line(tmp_path):
    result = run_cli(["augmentation=elastic", "augmentation.elastic_sigma=-2"], cwd=tmp_path)
    assert result.returncode == 2
    assert "augmentation.elastic_sigma=-2.0: is the smoothing std in pixels" in result.stdout + result.stderr
    assert not (tmp_path / "outputs").exists()


PRESETS = {"shear": dict(shear=15), "perspective": dict(perspective=0.5, perspective_p=0.5),
           "elastic": dict(elastic_alpha=50, elastic_sigma=5), "blur": dict(blur_sigma=1.0),
           "sharpness": dict(sharpness=1.0), "gamma": dict(gamma=0.5), "invert": dict(invert=0.5)}


@pytest.mark.parametrize("loader", ["device", "dataloader"])
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_sets_its_keys_and_trains_two_steps_on_each_loader(preset, loader, train_inprocess, threads_restored):
    cfg = compose_cfg([f"augmentation={preset}"])
    assert {k: cfg.augmentation[k] for k in PRESETS[preset]} == PRESETS[preset]
    # one thread, as in a DataLoader worker: the per-image transforms run in this process (num_workers=0), where
    # thread hand-offs for 8x8 images cost more than the work on a busy machine
    status, code, run = train_inprocess([f"augmentation={preset}", f"data.loader={loader}", "data.num_workers=0",
                                         "trainer.threads=1", "trainer.max_epochs=1", "data.batch_size=512",
                                         "logger.tensorboard=false"])
    assert (status, code) == ("completed", 0), run.summary.get("error")
    assert run.step == 2 and 0.0 <= run.summary["test"]["test/acc"] <= 1.0
    images = run.data.train.images[:64]
    if loader == "device":  # the batched function; on the DataLoader path, the per-image pipeline in the workers
        out, _ = run.train_batches.augment(images.float(), run.data.train.labels[:64], gen(15))
    else:
        torch.manual_seed(15)
        out = torch.stack([run.train_batches.loader.dataset.transform(image) for image in images]).float()
    assert out.shape == images.shape and not torch.equal(out, images.float())
