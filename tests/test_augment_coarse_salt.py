"""Coarse salt-and-pepper noise (augmentation.coarse_salt_p, coarse_salt_size): whole grid cells become the data's
white or black at the configured rate, on both loader paths alike, in its place in the pipeline; the preset trains
on the digits against their white of 16; bad values are refused."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.transforms import v2

from conftest import compose_cfg, run_cli
from trainlab import augment
from trainlab.config import AugmentationConfig, ConfigError, validate

CPU = torch.device("cpu")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def node(**kwargs):
    return OmegaConf.structured(AugmentationConfig(**kwargs))


def grey_images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random pixel-unit images in [20, 200): no pixel is black or white before the step."""
    return 20 + torch.rand(n, c, h, w, generator=gen(seed)) * 180


def cell_states(images: torch.Tensor, out: torch.Tensor, white: float) -> torch.Tensor:
    """Per pixel and channel: 0 unchanged, 1 salt (white), 2 pepper (0); anything else changed is a failure."""
    changed = out != images
    salt, pepper = changed & (out == white), changed & (out == 0)
    assert torch.equal(changed, salt | pepper), "a changed pixel is neither white nor black"
    return salt.long() + 2 * pepper.long()


def within_binomial(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# --- the batched function --------------------------------------------------------------------------


@pytest.mark.parametrize(("p", "size", "h", "w"), [(0.3, 3, 10, 13), (0.1, 4, 8, 8), (0.6, 1, 5, 7)])
def test_whole_cells_of_the_grid_become_white_or_black_at_rate_p_half_each(p, size, h, w):
    n, c, white = 600, 3, 255.0
    images = grey_images(n, c, h, w)
    out = augment.coarse_salt_pepper(images, p, size, gen(1), white)
    state = cell_states(images, out, white)
    # the cells: size x size squares from the top-left corner; the last row and column cut off by the border
    gh, gw = -(-h // size), -(-w // size)
    cell = state[:, 0, ::size, ::size]  # each cell's state at its top-left pixel, [N, gh, gw]
    assert cell.shape == (n, gh, gw)
    rows, cols = torch.arange(h) // size, torch.arange(w) // size
    expanded = cell[:, rows][:, :, cols].unsqueeze(1).expand(n, c, h, w)
    assert torch.equal(state, expanded), "changed pixels do not make up whole cells, alike in every channel"
    cells, replaced, salt = cell.numel(), int((cell > 0).sum()), int((cell == 1).sum())
    assert within_binomial(replaced, cells, p), (replaced, cells, p)
    assert within_binomial(salt, replaced, 0.5), (salt, replaced)
    if h % size:  # the partial cells at the border are replaced like the others
        assert within_binomial(int((cell[:, -1] > 0).sum()), n * gw, p)


def test_each_image_draws_its_own_cells_and_the_same_seed_the_same_ones():
    images = grey_images(64, 1, 8, 8)
    out = augment.coarse_salt_pepper(images, 0.5, 2, gen(2))
    assert torch.equal(out, augment.coarse_salt_pepper(images, 0.5, 2, gen(2)))
    patterns = {tuple(cell_states(images[i], out[i], 255.0)[0, ::2, ::2].flatten().tolist()) for i in range(64)}
    assert len(patterns) > 60  # 3^16 patterns: images share one only by chance


def test_p_zero_changes_nothing_and_p_one_replaces_every_cell():
    images = grey_images(8, 3, 6, 6)
    assert torch.equal(augment.coarse_salt_pepper(images, 0.0, 2, gen(3)), images)
    full = augment.coarse_salt_pepper(images, 1.0, 2, gen(3), white=16.0)
    assert bool(((full == 0) | (full == 16)).all())
    assert augment.build_augment(node(coarse_salt_p=0.0, coarse_salt_size=3), 10, (3, 6, 6)) is None
    assert augment.build_v2_transform(node(coarse_salt_p=0.0, coarse_salt_size=3)) is None


def test_uint8_images_stay_uint8_with_salt_at_the_given_white():
    image = torch.full((2, 1, 4, 4), 100, dtype=torch.uint8)
    for white in (255.0, 16.0):
        out = augment.coarse_salt_pepper(image, 1.0, 1, gen(4), white)
        assert out.dtype == torch.uint8 and set(out.unique().tolist()) == {0, int(white)}


def test_a_cell_larger_than_the_image_is_the_whole_image():
    images = grey_images(400, 1, 3, 5)
    state = cell_states(images, augment.coarse_salt_pepper(images, 0.5, 8, gen(5)), 255.0)
    per_image = state.flatten(1)
    assert torch.equal(per_image, per_image[:, :1].expand_as(per_image))
    assert within_binomial(int((per_image[:, 0] > 0).sum()), 400, 0.5)


# --- the pipeline, on both paths -------------------------------------------------------------------


def test_it_runs_after_cutout_and_before_noise_with_one_generator():
    keys = dict(blur_sigma=1.0, cutout_size=2, coarse_salt_p=0.2, coarse_salt_size=3, noise_std=2.0)
    fn = augment.build_augment(node(**keys), 10, (3, 8, 12), white=16.0)
    images, labels = grey_images(16, 3, 8, 12) / 16, torch.arange(16) % 10
    out, targets = fn(images, labels, gen(6))
    g = gen(6)
    expected = augment.cutout(augment.random_blur(images, 1.0, g), 2, g)
    expected = augment.gaussian_noise(augment.coarse_salt_pepper(expected, 0.2, 3, g, 16.0), 2.0, g)
    assert torch.equal(out, expected) and targets is labels
    pipeline = augment.build_v2_transform(node(**keys), white=16.0)
    kinds = [type(t) for t in pipeline.transforms]
    assert kinds == [augment.RandomBlur, augment.Cutout, augment.CoarseSaltPepper, v2.ToDtype, v2.GaussianNoise]
    salt = pipeline.transforms[2]
    assert (salt.p, salt.size, salt.white) == (0.2, 3, 16.0)


def test_the_dataloader_step_is_the_batched_function_on_one_image():
    """The v2 step draws from torch's global generator what the batched function draws from its own: the same
    cells for the same seed, uint8 kept."""
    image = (torch.rand(3, 9, 11, generator=gen(7)) * 200 + 20).to(torch.uint8)
    step = augment.CoarseSaltPepper(0.4, 2, white=255.0)
    for seed in range(10):
        torch.manual_seed(seed)
        out = step(image)
        assert out.dtype == torch.uint8
        assert torch.equal(out, augment.coarse_salt_pepper(image[None], 0.4, 2, gen(seed), 255.0)[0])


# a gradient plus a checkerboard of 30 levels, in 20..228 (as tests/test_augment_geometry.py)
IMAGE = (torch.arange(100.0).view(1, 10, 10) * 1.8 + 20 + 30 * ((torch.arange(10) + torch.arange(10).view(-1, 1)) % 2)
         ).round().to(torch.uint8)


@pytest.mark.parametrize("white", [255.0, 16.0])
def test_device_and_dataloader_paths_draw_the_same_distribution(white):
    """Over 2000 copies of one image, |z| < 5 between the batched device function and the per-image v2 pipeline for:
    each pixel's mean and mean square, each pixel pair's mean product (which sees the cells: the pixels of a cell
    change together) and each copy's share of changed and of salt pixels (the rate p and the half of it that is
    salt). Calibrated: correct paths reach |z| 2.8; the DataLoader path with cells of 2 or 4 pixels instead of 3
    gives 13-15 (pair products), with p 0.25 or 0.35 instead of 0.3 gives 10-13 (shares), with salt at 255 on the
    digits' levels 19-60."""
    cfg, n = node(coarse_salt_p=0.3, coarse_salt_size=3), 2000
    image = IMAGE if white == 255 else (IMAGE.float() / 16).floor().to(torch.uint8)  # the digits' levels 1 to 14
    device_fn = augment.build_augment(cfg, 10, (1, 10, 10), white)
    ours, _ = device_fn(image.float().expand(n, -1, -1, -1).contiguous(), torch.zeros(n, dtype=torch.long), gen(8))
    pipeline = augment.build_v2_transform(cfg, white)
    torch.manual_seed(9)
    theirs = torch.stack([pipeline(image) for _ in range(n)]).float()
    a, b = ours.flatten(1) / white, theirs.flatten(1) / white
    start = image.flatten().float() / white  # neither black nor white anywhere: every replaced pixel changes

    def shares(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([(x != start).float().mean(1), (x == 1).float().mean(1)], 1)

    assert 0.25 < float(shares(a)[:, 0].mean()) < 0.35
    for x, y in ((a, b), (a ** 2, b ** 2), ((a[:, :, None] * a[:, None, :]).flatten(1),
                                            (b[:, :, None] * b[:, None, :]).flatten(1)), (shares(a), shares(b))):
        z = (x.mean(0) - y.mean(0)) / ((x.var(0) + y.var(0)) / n + 1e-6).sqrt()
        assert z.abs().max() < 5, z.abs().max()


# --- the preset, on the digits ---------------------------------------------------------------------


@pytest.mark.parametrize("loader", ["device", "dataloader"])
def test_the_preset_trains_on_the_digits_with_salt_at_their_white_of_16(loader, train_inprocess, threads_restored):
    cfg = compose_cfg(["augmentation=coarse_salt"])
    assert (cfg.augmentation.coarse_salt_p, cfg.augmentation.coarse_salt_size) == (0.1, 2)
    status, code, run = train_inprocess(["augmentation=coarse_salt", f"data.loader={loader}", "data.num_workers=0",
                                         "trainer.threads=1", "trainer.max_epochs=1", "data.batch_size=512",
                                         "logger.tensorboard=false"])
    assert (status, code) == ("completed", 0), run.summary.get("error")
    assert run.step == 2 and 0.0 <= run.summary["test"]["test/acc"] <= 1.0 and run.data.white == 16.0
    images = run.data.train.images[:512].float()
    if loader == "device":
        out, _ = run.train_batches.augment(images, run.data.train.labels[:512], gen(10))
    else:
        torch.manual_seed(10)
        out = torch.stack([run.train_batches.loader.dataset.transform(image) for image in images.to(torch.uint8)])
        assert out.dtype == torch.uint8
        out = out.float()
    cell_states(images, out, 16.0)  # changed pixels are 0 or 16, never 255
    assert bool(((out == 16) & (images < 16)).any()) and bool(((out == 0) & (images > 0)).any())
    # per 2x2 cell of the 8x8 digits: unchanged, or one value (0 or 16) throughout (some cells were that already)
    cells_in, cells_out = (x.view(512, 4, 2, 4, 2).transpose(2, 3).flatten(3) for x in (images[:, 0], out[:, 0]))
    changed = (cells_out != cells_in).any(-1)
    uniform = cells_out.amax(-1) == cells_out.amin(-1)
    assert bool((~changed | uniform).all())
    # a cell shows a change unless it already was all black (pepper) or all 16 (salt): a quarter are all black
    expected = 0.05 * (2 - (cells_in.amax(-1) == 0).float().mean() - (cells_in.amin(-1) == 16).float().mean())
    assert within_binomial(int(changed.sum()), changed.numel(), float(expected)), (changed.float().mean(), expected)


# --- checks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ("augmentation.coarse_salt_p=1.5", r"augmentation.coarse_salt_p=1.5: is the probability that a cell is "
                                       r"replaced, in \[0, 1\]"),
    ("augmentation.coarse_salt_p=-0.1", r"augmentation.coarse_salt_p=-0.1: is the probability"),
    ("augmentation.coarse_salt_p=inf", r"augmentation.coarse_salt_p=inf: must be a finite number"),
    ("augmentation.coarse_salt_p=nan", r"augmentation.coarse_salt_p=nan: must be a finite number"),
    ("augmentation.coarse_salt_size=0", r"augmentation.coarse_salt_size=0: is the side of a cell in pixels, a whole "
                                        r"number >= 1, e.g. 4"),
    ("augmentation.coarse_salt_size=-3", r"augmentation.coarse_salt_size=-3: is the side of a cell in pixels"),
    ("augmentation.coarse_salt_size=2.5", r"augmentation.coarse_salt_size=2.5: is the side of a cell in pixels"),
    ("augmentation.coarse_salt_size=4.0", r"coarse_salt_size=4.0: .* write it as augmentation.coarse_salt_size=4$"),
    ("augmentation.coarse_salt_size=inf", r"augmentation.coarse_salt_size=inf: must be a finite number"),
    ("augmentation.coarse_salt_size=true", r"augmentation.coarse_salt_size=True: is the side of a cell"),
    ("augmentation.coarse_salt_size=big", r"augmentation.coarse_salt_size='big': is the side of a cell"),
])
def test_invalid_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg(["augmentation=coarse_salt", override]))


@pytest.mark.parametrize("keys", [["augmentation.coarse_salt_p=0"], ["augmentation.coarse_salt_p=1"],
                                  ["augmentation.coarse_salt_p=0.5", "augmentation.coarse_salt_size=1"]])
def test_the_edges_of_the_ranges_are_accepted(keys):
    validate(compose_cfg(keys))


def test_an_invalid_value_exits_2_on_the_command_line(tmp_path):
    result = run_cli(["augmentation=coarse_salt", "augmentation.coarse_salt_size=2.5"], cwd=tmp_path)
    assert result.returncode == 2
    assert "augmentation.coarse_salt_size=2.5: is the side of a cell in pixels" in result.stdout + result.stderr
    assert not (tmp_path / "outputs").exists()
