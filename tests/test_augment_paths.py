"""Where the two loader paths could part: the policies against the data's white, sizes refused alike on
both loader paths (and translate or perspective values too small to move a pixel), colour jitter in one fixed order
on both paths, and the DataLoader path's per-image seeding leaving the accelerators' generators alone."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.transforms.v2 import functional as TF

from conftest import CONF_DIR, compose_cfg, run_cli
from trainlab import augment
from trainlab.config import AUGMENT_POLICIES, AugmentationConfig, ConfigError
from trainlab.data import Split, _Samples, make_synthetic

DIGITS_WHITE = 16.0


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def node(**kwargs):
    return OmegaConf.structured(AugmentationConfig(**kwargs))


def digits_like(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 images [n, 1, 8, 8] of the digits' levels 0 to 16, a third of the pixels black as in the digits."""
    levels = torch.randint(0, 17, (n, 1, 8, 8), generator=gen(seed))
    return torch.where(torch.rand(n, 1, 8, 8, generator=gen(seed + 1)) < 0.33, 0, levels).to(torch.uint8)


# --- the policies work against the data's white -----------------------------------------------------


@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
def test_policies_keep_the_digits_levels(policy):
    """On 0-255 levels, invert sent the digits' black background to 255 (41 sigma after normalisation) and
    brightness lifted a 16 past the data's white: every output must stay within the digits' 0 to 16."""
    pipeline = augment.build_v2_transform(node(policy=policy, randaugment_magnitude=15), DIGITS_WHITE)
    images = digits_like(400)
    torch.manual_seed(0)
    out = torch.stack([pipeline(image) for image in images])
    assert out.dtype == torch.uint8 and int(out.max()) <= DIGITS_WHITE
    assert (out != images).flatten(1).any(1).float().mean() > 0.3  # the policy does act


def test_policy_operations_act_against_white():
    """Each level 0..16 through torchvision's functional ops on the scaled image: invert and solarize mirror it
    about 16, posterize to 4 bits keeps every ink level (on the 0-16 scale it erased 80 % of them)."""
    levels = torch.arange(17, dtype=torch.uint8).view(1, 1, 17)
    white = 16
    assert torch.equal(augment.OnFullScale(TF.invert, DIGITS_WHITE)(levels), white - levels)
    solarized = augment.OnFullScale(lambda x: TF.solarize(x, 128), DIGITS_WHITE)(levels)  # 128 of 255: level 8.03
    assert torch.equal(solarized, torch.where(levels >= 9, white - levels, levels))
    posterized = augment.OnFullScale(lambda x: TF.posterize(x, 4), DIGITS_WHITE)(levels)
    assert bool((posterized[levels > 0] > 0).all()) and int(posterized.max()) <= white
    assert torch.equal(augment.OnFullScale(lambda x: x, DIGITS_WHITE)(levels), levels)  # the scalings undo each other


def test_policies_on_0_to_255_data_are_torchvisions_unchanged():
    image = (torch.arange(3 * 8 * 8) * 7 % 256).to(torch.uint8).view(3, 8, 8)
    for policy in AUGMENT_POLICIES:
        pipeline = augment.build_v2_transform(node(policy=policy))
        bare = augment.build_policy(node(policy=policy))
        for seed in range(5):
            torch.manual_seed(seed)
            ours = pipeline(image)
            torch.manual_seed(seed)
            assert torch.equal(ours, bare(image)), (policy, seed)


# --- sizes: refused alike on both paths -------------------------------------------------------------


@pytest.mark.parametrize(("keys", "message"), [
    (dict(cutout_size=9), r"augmentation.cutout_size=9 is larger than the 8x8 images; choose at most 8"),
    (dict(crop_padding=8, crop_padding_mode="reflect"), r"augmentation.crop_padding=8: reflect .* at most 7"),
    (dict(translate=0.0625), r"augmentation.translate=0.0625 moves no pixel of the 8x8 images .* more than 0.0625"),
    (dict(perspective=0.2, perspective_p=0.5), r"augmentation.perspective=0.2 moves no corner of the 8x8 images "
                                               r".* at least 0.25"),
])
def test_check_sizes_refuses_what_does_not_fit_the_images(keys, message):
    with pytest.raises(ConfigError, match=message):
        augment.check_sizes(node(**keys), (1, 8, 8))
    with pytest.raises(ConfigError, match=message):
        augment.build_augment(node(**keys), 10, (1, 8, 8))


def test_translate_and_perspective_bounds_are_where_pixels_start_to_move():
    """The refused values move nothing on either path; just above the bound named in the message they move some."""
    images = (torch.arange(64, dtype=torch.float32) + 1).view(1, 1, 8, 8).expand(1000, -1, -1, -1)
    moved = lambda out: int((out != images).flatten(1).any(1).sum())  # noqa: E731
    assert moved(augment.translate(images, 0.0625, gen(0))) == 0
    assert moved(augment.translate(images, 0.07, gen(0))) > 50  # |U(±0.56)| > 0.5 for 11 % of each axis's draws
    assert moved(augment.random_perspective(images, 0.2499, 1.0, gen(0))) == 0
    assert moved(augment.random_perspective(images, 0.25, 1.0, gen(0))) > 900  # 1 - (1/2)^8 of them
    for keys in (dict(translate=0.0625), dict(perspective=0.2499, perspective_p=1.0)):
        pipeline = augment.build_v2_transform(node(**keys))
        torch.manual_seed(0)
        assert all(torch.equal(pipeline(image), image) for image in images[:200].to(torch.uint8))
    augment.check_sizes(node(translate=0.07, perspective=0.25), (1, 8, 8))
    augment.check_sizes(node(translate=0.0625, perspective=0.2), (3, 32, 32))  # 2 and 3 pixels there
    augment.check_sizes(node(translate=0.0625, perspective=0.2, perspective_p=0.0), (1, 8, 16))  # wider: x moves
    with pytest.raises(ConfigError, match=r"choose at least 0.3334"):  # int(0.3333 * 3) is 0
        augment.check_sizes(node(perspective=0.3), (1, 7, 6))
    with pytest.raises(ConfigError, match=r"1x1 images .* choose 0"):
        augment.check_sizes(node(perspective=1.0), (1, 1, 1))


PRESETS = sorted(path.stem for path in (CONF_DIR / "augmentation").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_fits_the_digits_and_32_pixel_images(preset):
    aug = compose_cfg([f"augmentation={preset}"]).augmentation
    for shape in ((1, 8, 8), (3, 32, 32)):
        augment.check_sizes(aug, shape)


@pytest.mark.parametrize("loader", ["device", "dataloader"])
@pytest.mark.parametrize("override", ["augmentation.cutout_size=9", "augmentation.crop_padding=8",
                                      "augmentation.translate=0.05", "augmentation.perspective=0.2"])
def test_sizes_that_do_not_fit_are_refused_before_training_on_both_loaders(override, loader, train_inprocess):
    """On the DataLoader path a cutout or reflect padding larger than the image failed mid-training (exit 1)."""
    extra = ["augmentation.crop_padding_mode=reflect"] if "crop_padding" in override else []
    status, code, run = train_inprocess([override, *extra, f"data.loader={loader}", "data.num_workers=0",
                                         "trainer.max_epochs=1", "logger.tensorboard=false"])
    assert (status, code) == ("failed", 2) and not run.started
    assert run.summary["stop_reason"] == "invalid config" and override.split("=")[0] in run.summary["error"]
    assert not hasattr(run, "train_batches")  # refused before any loader was built


def test_the_dataloader_path_leaves_no_run_directory_for_a_size_that_does_not_fit(tmp_path):
    result = run_cli(["data.loader=dataloader", "augmentation=cutout", "augmentation.cutout_size=9",
                      "hydra.run.dir=run"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "augmentation.cutout_size=9 is larger than the 8x8 images" in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()


# --- colour jitter: one fixed order on both paths ----------------------------------------------------


def test_dataloader_colour_jitter_applies_brightness_then_contrast_then_saturation():
    image = (torch.rand(3, 8, 8, generator=gen(3)) * 255).to(torch.uint8)
    step = augment.build_v2_transform(node(brightness=0.5, contrast=0.5, saturation=0.5), 255.0).transforms[0]
    for seed in range(20):
        torch.manual_seed(seed)
        out = step(image)
        torch.manual_seed(seed)  # the factors, drawn in that order from the global generator, one per property
        factors = [0.5 + torch.rand(1) for _ in range(3)]
        x = image[None].float()
        for adjust, factor in zip((augment.adjust_brightness, augment.adjust_contrast, augment.adjust_saturation),
                                  factors):
            x = adjust(x, factor)
        assert out.dtype == torch.uint8 and torch.equal(out, x[0].round().to(torch.uint8)), seed


def test_colour_jitter_clips_as_many_pixels_at_white_on_both_paths():
    """torchvision's ColorJitter shuffles the order per image: with the clamp at white it clipped 30 % more pixels
    than the device path (a share at 255 of 0.064 against 0.048 here; seeds vary it by about 0.003)."""
    images, labels = make_synthetic(1000, [3, 8, 8], 10, 40.0, 0)
    cfg = node(brightness=0.4, contrast=0.4, saturation=0.4)
    device_out, _ = augment.build_augment(cfg, 10, (3, 8, 8))(images.float(), labels, gen(1))
    pipeline = augment.build_v2_transform(cfg)
    torch.manual_seed(1)
    loader_out = torch.stack([pipeline(image) for image in images]).float()
    at_white = [float((out.round() >= 255).float().mean()) for out in (device_out, loader_out)]
    at_black = [float((out.round() <= 0).float().mean()) for out in (device_out, loader_out)]
    assert abs(at_white[0] - at_white[1]) < 0.008, at_white
    assert abs(at_black[0] - at_black[1]) < 0.008, at_black


# --- the DataLoader path's seeding -------------------------------------------------------------------


def test_per_image_seeding_reseeds_only_the_cpu_generator(monkeypatch):
    """torch.manual_seed also reseeds every CUDA (and MPS) generator, which fork_rng(devices=[]) does not restore:
    dropout on the GPU would restart from the last image's seed every batch. The CPU draws stay those of
    torch.manual_seed(key), bit for bit."""
    split = Split(digits_like(6), torch.arange(6))
    samples = _Samples(split, augment.build_v2_transform(node(hflip=0.5, translate=0.25, noise_std=1.0)), seed=3)
    expected = []
    for i in range(6):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((3 * 1_000_003 + 2) * 100_000_007 + i) % 2**63)
            expected.append(samples.transform(split.images[i]))
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("cuda", seed)))
    monkeypatch.setattr(torch.mps, "manual_seed", lambda seed: calls.append(("mps", seed)))
    state = torch.get_rng_state()
    for i in range(6):
        assert torch.equal(samples[(2, i)][0], expected[i])
    assert calls == [] and torch.equal(torch.get_rng_state(), state)
