"""Training-time augmentation: pure batched functions of [N, C, H, W] pixel tensors and an explicit generator
(the device path), and the equivalent torchvision.transforms.v2 pipeline for the DataLoader path.

Images are float tensors in pixel units (uint8 levels, before normalisation), so zero fill is black.
Every random draw comes from the generator passed in, one value (or box, or angle) per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from trainlab.config import AUGMENT_POLICIES, ConfigError

# augment(images, labels, generator) -> (images, targets): int64 labels [N] in; out the same labels, or
# float soft targets [N, num_classes] when mixup or cutmix ran.
Augment = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
Step = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
PIXEL_MAX = 255.0  # colour adjustments clamp to the uint8 range, like torchvision's
BLUR_MIN_SIGMA = 0.1  # pixels: blur sigmas are drawn from [0.1, augmentation.blur_sigma]


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


# --- geometry --------------------------------------------------------------------------------------


def hflip(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of [N, C, H, W] left-right with probability p, independently."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def vflip(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image upside down with probability p, independently."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-2), images)


def _windows(padded: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The h x w window of each padded image [N, C, H', W'] whose top-left corner is (top[i], left[i])."""
    n, c, _, wp = padded.shape
    rows = (top.view(n, 1) + torch.arange(h, device=padded.device)).view(n, 1, h, 1)
    cols = (left.view(n, 1) + torch.arange(w, device=padded.device)).view(n, 1, 1, w)
    index = (rows * wp + cols).expand(n, c, h, w).flatten(2)
    return padded.flatten(2).gather(2, index).view(n, c, h, w)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator, mode: str = "zeros") -> torch.Tensor:
    """Pad each side of [N, C, H, W] by `padding` (zeros or reflect), then crop H x W at a random offset per image."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4, mode="constant" if mode == "zeros" else "reflect")
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=images.device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=images.device)
    return _windows(padded, top, left, h, w)


def translate(images: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by round(U(-f·W, f·W)) pixels right and round(U(-f·H, f·H)) down; zero fill.

    The same draw as torchvision's RandomAffine(translate=(f, f)).
    """
    n, _, h, w = images.shape
    dx = _uniform(n, -fraction * w, fraction * w, generator, images.device).round().long()
    dy = _uniform(n, -fraction * h, fraction * h, generator, images.device).round().long()
    py, px = math.floor(fraction * h + 0.5), math.floor(fraction * w + 0.5)  # the largest |shift| possible
    padded = F.pad(images, (px, px, py, py))
    return _windows(padded, py - dy, px - dx, h, w)


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate image i counter-clockwise by degrees[i] about its centre; bilinear, zero fill (as torchvision)."""
    n, _, h, w = images.shape
    angle = torch.deg2rad(degrees.to(images.dtype))
    cos, sin = angle.cos(), angle.sin()
    zero = torch.zeros_like(cos)
    # affine_grid maps each output point to the input point it samples, in coordinates normalised to
    # [-1, 1] per axis; the aspect factors keep the rotation rigid on non-square images.
    theta = torch.stack([torch.stack([cos, -sin * h / w, zero], 1), torch.stack([sin * w / h, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_rotate(images: torch.Tensor, max_degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by an angle drawn uniformly from [-max_degrees, max_degrees]."""
    return rotate(images, _uniform(images.shape[0], -max_degrees, max_degrees, generator, images.device))


def zoom(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Scale image i by factors[i] about its centre: > 1 zooms in (the border leaves the frame), < 1 zooms out
    (black border); bilinear, as torchvision's affine(scale=...)."""
    inverse = 1.0 / factors.to(images.dtype)
    zero = torch.zeros_like(inverse)
    theta = torch.stack([torch.stack([inverse, zero, zero], 1), torch.stack([zero, inverse, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_zoom(images: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """Scale each image by a factor drawn uniformly from [1 - amount, 1 + amount] (RandomAffine's scale draw)."""
    return zoom(images, _uniform(images.shape[0], 1.0 - amount, 1.0 + amount, generator, images.device))


def shear(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Shear image i along x by degrees[i] about its centre: row y moves by tan(degrees[i])·y pixels (y up from the
    centre, so positive angles slant the content right at the top); bilinear, zero fill, as torchvision's
    affine(shear=[degrees[i], 0])."""
    _, _, h, w = images.shape
    slope = torch.tan(torch.deg2rad(degrees.to(images.dtype)))
    one, zero = torch.ones_like(slope), torch.zeros_like(slope)
    # output (x, y), y down from the centre, samples the input at (x + slope·y, y); h/w converts y's normalised units
    theta = torch.stack([torch.stack([one, slope * h / w, zero], 1), torch.stack([zero, one, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_shear(images: torch.Tensor, max_degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Shear each image along x by an angle drawn uniformly from [-max_degrees, max_degrees] (RandomAffine's shear)."""
    return shear(images, _uniform(images.shape[0], -max_degrees, max_degrees, generator, images.device))


def _corners(h: int, w: int, device: torch.device) -> torch.Tensor:
    """The pixel coordinates (x, y) of the top-left, top-right, bottom-right and bottom-left pixels, [4, 2]."""
    return torch.tensor([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=torch.float32, device=device)


def _three_on_a_line(points: torch.Tensor) -> torch.Tensor:
    """[N] bool: whether some three of the four points of each [N, 4, 2] lie on one line (exactly: whole pixels)."""
    triples = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]], device=points.device)
    a, b, c = points[:, triples].unbind(2)  # [N, 4, 2] each
    ab, ac = b - a, c - a
    return (ab[..., 0] * ac[..., 1] - ab[..., 1] * ac[..., 0] == 0).any(1)


def perspective(images: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """Warp image i so that its corner pixels land on corners[i] ([N, 4, 2]: (x, y) pixel coordinates of the new
    top-left, top-right, bottom-right, bottom-left); bilinear, zero fill, as torchvision's perspective. An image
    whose corners admit no homography (three of them on one line) is returned unchanged."""
    n, _, h, w = images.shape
    # Solved in grid_sample's [-1, 1] units (p / (size / 2) - 1, torchvision's mapping of its pixel coordinates),
    # where the 8x8 system is well conditioned in float32: the homography takes each output point (x, y) to the
    # input point ((a x + b y + c) / (g x + h y + 1), (d x + e y + f) / (g x + h y + 1)).
    half = torch.tensor([w / 2, h / 2], dtype=images.dtype, device=images.device)
    src = (_corners(h, w, images.device).to(images.dtype) / half - 1).expand(n, 4, 2)
    dst = corners.to(images.dtype) / half - 1
    x, y, sx, sy = dst[..., 0], dst[..., 1], src[..., 0], src[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_x = torch.stack([x, y, one, zero, zero, zero, -sx * x, -sx * y], -1)
    rows_y = torch.stack([zero, zero, zero, x, y, one, -sy * x, -sy * y], -1)
    system = torch.stack([rows_x, rows_y], 2).view(n, 8, 8)
    coeffs, info = torch.linalg.solve_ex(system, torch.stack([sx, sy], 2).view(n, 8))
    identity = torch.eye(2, 3, dtype=images.dtype, device=images.device).expand(n, 2, 3)
    base = F.affine_grid(identity, list(images.shape), align_corners=False).view(n, h * w, 2)
    points = torch.cat([base, torch.ones_like(base[..., :1])], -1)  # [N, H·W, 3]
    numerator = points @ coeffs[:, :6].view(n, 2, 3).transpose(1, 2)
    denominator = points @ torch.cat([coeffs[:, 6:], torch.ones_like(coeffs[:, :1])], 1).unsqueeze(-1)
    # a pixel on the homography's vanishing line maps to infinity (0/0 exactly on it): outside, so zero fill
    grid = torch.nan_to_num(numerator / denominator, nan=2.0).clamp(-2.0, 2.0).view(n, h, w, 2)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # solve_ex misses some singular systems (four corners on one line leave a pivot of rounding size), so both
    # corner sets are tested for three on a line as well (a 1-pixel-high image's own corners coincide in pairs)
    valid = (info == 0) & ~_three_on_a_line(corners.to(images.dtype)) & ~_three_on_a_line(
        _corners(h, w, images.device).to(images.dtype).expand(n, 4, 2))
    return torch.where(valid.view(n, 1, 1, 1), warped, images)


def random_perspective(images: torch.Tensor, distortion: float, p: float, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomPerspective(distortion, p) per image: with probability p, move each corner inwards by
    whole pixels drawn uniformly from 0..int(distortion·(W // 2)) in x and 0..int(distortion·(H // 2)) in y."""
    n, _, h, w = images.shape
    apply = torch.rand(n, generator=generator, device=images.device) < p
    reach_x, reach_y = int(distortion * (w // 2)) + 1, int(distortion * (h // 2)) + 1
    dx = torch.randint(0, reach_x, (n, 4), generator=generator, device=images.device)
    dy = torch.randint(0, reach_y, (n, 4), generator=generator, device=images.device)
    inwards = torch.tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]], device=images.device)  # from each corner
    corners = _corners(h, w, images.device) + inwards * torch.stack([dx, dy], -1)
    return torch.where(apply.view(n, 1, 1, 1), perspective(images, corners), images)


def elastic(images: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Output pixel (x, y) of image i samples the input at (x, y) + displacement[i, y, x] ([N, H, W, 2]: x then y,
    in grid_sample's [-1, 1] units, as torchvision's elastic_transform); bilinear, zero fill."""
    n = images.shape[0]
    identity = torch.eye(2, 3, dtype=images.dtype, device=images.device).expand(n, 2, 3)
    grid = F.affine_grid(identity, list(images.shape), align_corners=False) + displacement.to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def elastic_displacement(n: int, h: int, w: int, alpha: float, sigma: float, generator: torch.Generator | None,
                         device: torch.device) -> torch.Tensor:
    """torchvision's ElasticTransform(alpha, sigma) field for n images, [N, H, W, 2]: per axis, uniform noise in
    [-1, 1] per pixel, gaussian-blurred with std sigma pixels (blur_kernel_size), times alpha / W (x) or alpha / H
    (y); so a pixel moves by alpha / 2 times the smoothed noise, in pixels."""
    size = blur_kernel_size(sigma, h, w)
    sigmas = torch.full((n,), float(sigma), device=device)
    fields = []
    for extent in (w, h):  # x, then y: torchvision's order of draws
        noise = 2 * torch.rand(n, 1, h, w, generator=generator, device=device) - 1
        fields.append(gaussian_blur(noise, sigmas, size) * (alpha / extent))
    return torch.cat(fields, 1).permute(0, 2, 3, 1)


def random_elastic(images: torch.Tensor, alpha: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Elastic deformation of each image by its own field from elastic_displacement (Simard et al. 2003)."""
    n, _, h, w = images.shape
    return elastic(images, elastic_displacement(n, h, w, alpha, sigma, generator, images.device))


# --- blur ------------------------------------------------------------------------------------------


def blur_kernel_size(sigma: float, h: int, w: int) -> int:
    """Taps per axis of a gaussian of std `sigma` pixels: int(8·sigma + 1) made odd (about ±4 sigma, torchvision's
    ElasticTransform rule), at most 2·min(H, W) - 1 so that its reflect padding fits inside the image."""
    size = int(8 * sigma + 1)
    return min(size + 1 - size % 2, 2 * min(h, w) - 1)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur image i with a gaussian of std sigmas[i] pixels, kernel_size (odd) taps per axis, reflect padding; as
    torchvision's gaussian_blur. One separable, grouped convolution over the whole batch."""
    n, c, h, w = images.shape
    offsets = torch.arange(kernel_size, dtype=images.dtype, device=images.device) - kernel_size // 2
    taps = torch.softmax(-0.5 * (offsets / sigmas.to(images.dtype).view(n, 1)) ** 2, dim=1)  # [N, k], sums to 1
    taps = taps.repeat_interleave(c, 0)  # one filter per (image, channel)
    pad = kernel_size // 2
    out = F.pad(images.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, taps.view(n * c, 1, kernel_size, 1), groups=n * c)
    out = F.conv2d(out, taps.view(n * c, 1, 1, kernel_size), groups=n * c)
    return out.view(n, c, h, w)


def random_blur(images: torch.Tensor, max_sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Blur each image with a sigma drawn uniformly from [0.1, max_sigma] pixels (torchvision's GaussianBlur draw)
    and the kernel of blur_kernel_size(max_sigma)."""
    n, _, h, w = images.shape
    sigmas = _uniform(n, BLUR_MIN_SIGMA, max_sigma, generator, images.device)
    return gaussian_blur(images, sigmas, blur_kernel_size(max_sigma, h, w))


# --- occlusion and noise ---------------------------------------------------------------------------


def cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one size x size square per image (all channels), placed uniformly so that it lies wholly
    inside the image: every image loses exactly size² pixels. (DeVries & Taylor 2017 centre the square
    anywhere and clip it at the border, so theirs can be smaller; this is torchvision's RandomErasing
    with a fixed square.)"""
    n, _, h, w = images.shape
    if size > min(h, w):
        raise ValueError(f"a cutout of {size}x{size} pixels does not fit in {h}x{w} images")
    top = torch.randint(0, h - size + 1, (n, 1, 1), generator=generator, device=images.device)
    left = torch.randint(0, w - size + 1, (n, 1, 1), generator=generator, device=images.device)
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return images.masked_fill(inside.unsqueeze(1), 0.0)


def coarse_salt_pepper(images: torch.Tensor, p: float, size: int, generator: torch.Generator | None,
                       white: float = PIXEL_MAX) -> torch.Tensor:
    """Coarse salt-and-pepper noise (imgaug's CoarseSaltAndPepper): cut each image of [N, C, H, W] into size x size
    pixel cells from its top-left corner (the last row and column of cells cut off by the border) and replace each
    cell, with probability p, by salt (`white`: 255, the digits' 16) or pepper (0), each with probability 1/2, in
    every channel alike. One uniform draw u per cell: u < p/2 salt, p/2 <= u < p pepper. Keeps the dtype (uint8 in,
    uint8 out)."""
    n, _, h, w = images.shape
    cells = torch.rand(n, 1, -(-h // size), -(-w // size), generator=generator, device=images.device)
    # nearest-neighbour upsampling by the whole factor `size`: pixel (y, x) lies in cell (y // size, x // size)
    rows = torch.arange(h, device=images.device) // size
    cols = torch.arange(w, device=images.device) // size
    u = cells[:, :, rows][:, :, :, cols]  # [N, 1, H, W]
    return images.masked_fill(u < p / 2, white).masked_fill((u >= p / 2) & (u < p), 0)


def gaussian_noise(images: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Add independent N(0, std²) noise to every pixel (std in pixel units); no clamping."""
    return images + std * torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)


# --- colour ----------------------------------------------------------------------------------------


def _gray(images: torch.Tensor) -> torch.Tensor:
    """Luma [N, 1, H, W] of RGB images; a 1-channel image is its own."""
    if images.shape[1] != 3:
        return images
    r, g, b = images.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factors: torch.Tensor, white: float) -> torch.Tensor:
    f = factors.view(-1, 1, 1, 1).to(images.dtype)
    return (f * images + (1 - f) * other).clamp(0, white)


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor, white: float = PIXEL_MAX) -> torch.Tensor:
    """Image i times factors[i] (blend with black), clamped to [0, white] (255; the digits' 16)."""
    return _blend(images, torch.zeros_like(images), factors, white)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor, white: float = PIXEL_MAX) -> torch.Tensor:
    """Blend image i with its mean grey level by factors[i] (0: flat grey, 1: unchanged), clamped."""
    return _blend(images, _gray(images).mean(dim=(1, 2, 3), keepdim=True), factors, white)


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor, white: float = PIXEL_MAX) -> torch.Tensor:
    """Blend image i with its own grey version by factors[i]; grey (1-channel) images are returned as they are."""
    if images.shape[1] != 3:
        return images
    return _blend(images, _gray(images), factors, white)


def color_jitter(images: torch.Tensor, brightness: float, contrast: float, saturation: float,
                 generator: torch.Generator | None, white: float = PIXEL_MAX) -> torch.Tensor:
    """Brightness, then contrast, then saturation, each with a factor drawn per image from
    U(max(0, 1 - s), 1 + s) for its strength s; a strength of 0 leaves that property alone. Clamped to [0, white]."""
    n, device = images.shape[0], images.device
    for strength, adjust in ((brightness, adjust_brightness), (contrast, adjust_contrast),
                             (saturation, adjust_saturation)):
        if strength > 0:
            images = adjust(images, _uniform(n, max(0.0, 1 - strength), 1 + strength, generator, device), white)
    return images


def adjust_sharpness(images: torch.Tensor, factors: torch.Tensor, white: float = PIXEL_MAX) -> torch.Tensor:
    """Blend image i with its smoothed copy (3x3 kernel: 5/13 in the centre, 1/13 around; the 1-pixel border kept)
    by factors[i]: 0 smoothed, 1 unchanged, 2 sharpened; clamped to [0, white], as torchvision's adjust_sharpness."""
    _, c, h, w = images.shape
    if h <= 2 or w <= 2:
        return images
    kernel = torch.full((3, 3), 1 / 13, dtype=images.dtype, device=images.device)
    kernel[1, 1] = 5 / 13
    smoothed = images.clone()
    smoothed[..., 1:-1, 1:-1] = F.conv2d(images, kernel.expand(c, 1, 3, 3), groups=c)
    return _blend(images, smoothed, factors, white)


def adjust_gamma(images: torch.Tensor, gammas: torch.Tensor, white: float = PIXEL_MAX) -> torch.Tensor:
    """white·(x / white)^gammas[i] for image i (< 1 brightens the darks, > 1 darkens), as torchvision's adjust_gamma
    (white 255; the digits' is 16)."""
    g = gammas.view(-1, 1, 1, 1).to(images.dtype)
    return white * (images.clamp(0, white) / white) ** g


def invert(images: torch.Tensor, p: float, generator: torch.Generator | None, white: float = PIXEL_MAX) -> torch.Tensor:
    """white - x for each image with probability p, independently (torchvision's RandomInvert on uint8 images: white
    255; the digits' is 16)."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), white - images.clamp(0, white), images)


def random_sharpness(images: torch.Tensor, strength: float, generator: torch.Generator,
                     white: float = PIXEL_MAX) -> torch.Tensor:
    """adjust_sharpness by a factor drawn per image from U(max(0, 1 - strength), 1 + strength)."""
    factors = _uniform(images.shape[0], max(0.0, 1 - strength), 1 + strength, generator, images.device)
    return adjust_sharpness(images, factors, white)


def random_gamma(images: torch.Tensor, strength: float, generator: torch.Generator,
                 white: float = PIXEL_MAX) -> torch.Tensor:
    """adjust_gamma by a gamma drawn per image from U(1 - strength, 1 + strength), strength < 1."""
    gammas = _uniform(images.shape[0], 1 - strength, 1 + strength, generator, images.device)
    return adjust_gamma(images, gammas, white)


# --- label mixing ----------------------------------------------------------------------------------


def sample_beta(alpha: float, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """n draws of Beta(alpha, alpha), as G1 / (G1 + G2) of two Gamma(alpha) draws from `generator`."""
    concentration = torch.full((2, n), float(alpha), device=device)
    gammas = torch._standard_gamma(concentration, generator=generator)
    return gammas[0] / (gammas[0] + gammas[1]).clamp_min(torch.finfo(gammas.dtype).tiny)


def mixup(images: torch.Tensor, targets: torch.Tensor, alpha: float,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Zhang et al. 2018, per image: x_i = λ_i·x_i + (1 − λ_i)·x_π(i) with λ_i ~ Beta(alpha, alpha) and π a
    random permutation of the batch; the soft targets [N, K] mix with the same weights."""
    n = images.shape[0]
    lam = sample_beta(alpha, n, generator, images.device)
    perm = torch.randperm(n, generator=generator, device=images.device)
    mixed = torch.lerp(images[perm], images, lam.view(-1, 1, 1, 1).to(images.dtype))
    return mixed, torch.lerp(targets[perm], targets, lam.view(-1, 1).to(targets.dtype))


def cutmix(images: torch.Tensor, targets: torch.Tensor, alpha: float,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Yun et al. 2019, per image: paste a box of x_π(i) into x_i. λ_i ~ Beta(alpha, alpha) sets the box to
    int(H·√(1−λ)) x int(W·√(1−λ)) around a uniform centre, clipped at the border; the targets take
    the pasted share of the area, exactly, from y_π(i)."""
    n, _, h, w = images.shape
    device = images.device
    ratio = (1 - sample_beta(alpha, n, generator, device)).sqrt()
    cut_h, cut_w = (h * ratio).long(), (w * ratio).long()
    cy = torch.randint(0, h, (n,), generator=generator, device=device)
    cx = torch.randint(0, w, (n,), generator=generator, device=device)
    y0, y1 = (cy - cut_h // 2).clamp(0, h), (cy + cut_h // 2).clamp(0, h)
    x0, x1 = (cx - cut_w // 2).clamp(0, w), (cx + cut_w // 2).clamp(0, w)
    perm = torch.randperm(n, generator=generator, device=device)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    box = ((rows >= y0.view(-1, 1, 1)) & (rows < y1.view(-1, 1, 1))
           & (cols >= x0.view(-1, 1, 1)) & (cols < x1.view(-1, 1, 1)))
    pasted = ((y1 - y0) * (x1 - x0)).to(targets.dtype) / (h * w)  # the share of each image replaced
    mixed = torch.where(box.unsqueeze(1), images[perm], images)
    return mixed, torch.lerp(targets, targets[perm], pasted.view(-1, 1))


# --- builders --------------------------------------------------------------------------------------


def check_sizes(cfg: DictConfig, input_shape: tuple[int, int, int]) -> None:
    """Refuse (ConfigError) the sizes of cfg that do not fit the (C, H, W) images, on either path: reflect padding
    as wide as the image, a cutout square larger than it, and a translate or perspective too small to move a pixel
    (their draws are whole pixels, so such a value would silently change nothing)."""
    _, h, w = input_shape
    padding, side = int(cfg.crop_padding), max(h, w)
    if cfg.crop_padding_mode == "reflect" and padding >= min(h, w):
        raise ConfigError(f"augmentation.crop_padding={padding}: reflect padding must be smaller than the "
                          f"{h}x{w} images; choose at most {min(h, w) - 1} or crop_padding_mode=zeros")
    if int(cfg.cutout_size) > min(h, w):
        raise ConfigError(f"augmentation.cutout_size={cfg.cutout_size} is larger than the {h}x{w} images; "
                          f"choose at most {min(h, w)}")
    # round(U(-f·W, f·W)), rounding half to even, is 0 for every draw while f·W <= 0.5
    if 0 < cfg.translate and cfg.translate * side <= 0.5:
        raise ConfigError(f"augmentation.translate={cfg.translate} moves no pixel of the {h}x{w} images (shifts are "
                          f"round(U(±translate·{side})) whole pixels, all 0 up to half a pixel); choose more than "
                          f"{0.5 / side:.4g}, or 0 for off")
    # corners move by U{0..int(d·(W // 2))} pixels: none while d·(W // 2) < 1
    if 0 < cfg.perspective and 0 < cfg.perspective_p and int(cfg.perspective * (side // 2)) == 0:
        least = (f"choose at least {math.ceil(1e4 / (side // 2)) / 1e4:.4g}, or 0 for off" if side >= 2
                 else "no distortion moves one, so choose 0")
        raise ConfigError(f"augmentation.perspective={cfg.perspective} moves no corner of the {h}x{w} images "
                          f"(corners move by whole pixels up to int(perspective·{side // 2})); {least}")


def _per_sample_steps(cfg: DictConfig, input_shape: tuple[int, int, int], white: float) -> list[Step]:
    """The per-image transforms of cfg, in the order they run: geometry, colour, blur, occlusion, noise. `white` is
    the data's brightest level (the colour steps and coarse salt clamp at it, invert reflects about it)."""
    check_sizes(cfg, input_shape)
    padding, mode = int(cfg.crop_padding), str(cfg.crop_padding_mode)
    translate_f, degrees, flip_h, flip_v = float(cfg.translate), float(cfg.rotate), float(cfg.hflip), float(cfg.vflip)
    amount, shear_deg = float(cfg.scale), float(cfg.shear)
    distortion, distortion_p = float(cfg.perspective), float(cfg.perspective_p)
    alpha, sigma, blur_max = float(cfg.elastic_alpha), float(cfg.elastic_sigma), float(cfg.blur_sigma)
    colour = (float(cfg.brightness), float(cfg.contrast), float(cfg.saturation))
    sharpness, gamma, invert_p = float(cfg.sharpness), float(cfg.gamma), float(cfg.invert)
    size, std = int(cfg.cutout_size), float(cfg.noise_std)
    salt_p, salt_size = float(cfg.coarse_salt_p), int(cfg.coarse_salt_size)
    steps: list[Step] = []
    if padding > 0:
        steps.append(lambda x, g: random_crop(x, padding, g, mode))
    if translate_f > 0:
        steps.append(lambda x, g: translate(x, translate_f, g))
    if degrees > 0:
        steps.append(lambda x, g: random_rotate(x, degrees, g))
    if amount > 0:
        steps.append(lambda x, g: random_zoom(x, amount, g))
    if shear_deg > 0:
        steps.append(lambda x, g: random_shear(x, shear_deg, g))
    if distortion > 0 and distortion_p > 0:
        steps.append(lambda x, g: random_perspective(x, distortion, distortion_p, g))
    if alpha > 0:
        steps.append(lambda x, g: random_elastic(x, alpha, sigma, g))
    if flip_h > 0:
        steps.append(lambda x, g: hflip(x, flip_h, g))
    if flip_v > 0:
        steps.append(lambda x, g: vflip(x, flip_v, g))
    if max(colour) > 0:
        steps.append(lambda x, g: color_jitter(x, *colour, g, white))
    if sharpness > 0:
        steps.append(lambda x, g: random_sharpness(x, sharpness, g, white))
    if gamma > 0:
        steps.append(lambda x, g: random_gamma(x, gamma, g, white))
    if invert_p > 0:
        steps.append(lambda x, g: invert(x, invert_p, g, white))
    if blur_max > 0:
        steps.append(lambda x, g: random_blur(x, blur_max, g))
    if size > 0:
        steps.append(lambda x, g: cutout(x, size, g))
    if salt_p > 0:
        steps.append(lambda x, g: coarse_salt_pepper(x, salt_p, salt_size, g, white))
    if std > 0:
        steps.append(lambda x, g: gaussian_noise(x, std, g))
    return steps


def build_batch_mix(cfg: DictConfig, num_classes: int) -> Augment | None:
    """mixup and/or cutmix of cfg as an augment function (labels in, soft targets out), or None when both
    are off. With both on, each image is mixed by one of them, chosen with probability 1/2 (as timm)."""
    mix_a, cut_a = float(cfg.mixup_alpha), float(cfg.cutmix_alpha)
    if mix_a == 0 and cut_a == 0:
        return None

    def mix(images: torch.Tensor, labels: torch.Tensor,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        targets = F.one_hot(labels, num_classes).to(images.dtype)
        if cut_a == 0:
            return mixup(images, targets, mix_a, generator)
        if mix_a == 0:
            return cutmix(images, targets, cut_a, generator)
        use_cut = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
        mixed_x, mixed_t = mixup(images, targets, mix_a, generator)
        cut_x, cut_t = cutmix(images, targets, cut_a, generator)
        return (torch.where(use_cut.view(-1, 1, 1, 1), cut_x, mixed_x),
                torch.where(use_cut.view(-1, 1), cut_t, mixed_t))

    return mix


def build_augment(cfg: DictConfig, num_classes: int, input_shape: tuple[int, int, int],
                  white: float = PIXEL_MAX) -> Augment | None:
    """The device path: the whole augmentation node as one batched function of (images, labels, generator),
    or None when it does nothing. `input_shape` (C, H, W) lets sizes be checked before training; `white` is the
    data's brightest level (255; the digits' 16), which gamma, invert and coarse salt work against."""
    if cfg.policy is not None:
        raise ConfigError(f"augmentation.policy={cfg.policy} exists only on the DataLoader path (torchvision's "
                          "per-image implementation); set data.loader=dataloader, or pick a batched option")
    steps = _per_sample_steps(cfg, input_shape, white)
    mix = build_batch_mix(cfg, num_classes)
    if not steps and mix is None:
        return None

    def augment(images: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        for step in steps:
            images = step(images, generator)
        return (images, labels) if mix is None else mix(images, labels, generator)

    return augment


# --- the DataLoader path: torchvision.transforms.v2, one image at a time -----------------------------


class PadRandomCrop:
    """v2 counterpart of random_crop: pad by `padding` (zeros or reflect), crop back to the input size."""

    def __init__(self, padding: int, mode: str):
        self.padding, self.mode = padding, mode

    def __repr__(self) -> str:
        return f"PadRandomCrop(padding={self.padding}, mode={self.mode})"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        h, w = image.shape[-2:]
        padded = TF.pad(image, [self.padding] * 4, padding_mode="constant" if self.mode == "zeros" else "reflect")
        top, left = torch.randint(0, 2 * self.padding + 1, (2,)).tolist()
        return TF.crop(padded, top, left, h, w)


class Cutout:
    """v2 counterpart of cutout: zero one size x size square lying wholly inside the image."""

    def __init__(self, size: int):
        self.size = size

    def __repr__(self) -> str:
        return f"Cutout(size={self.size})"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        h, w = image.shape[-2:]
        top = int(torch.randint(0, h - self.size + 1, ()))
        left = int(torch.randint(0, w - self.size + 1, ()))
        return TF.erase(image, top, left, self.size, self.size, torch.zeros((), dtype=image.dtype))


class CoarseSaltPepper:
    """v2 counterpart of coarse_salt_pepper: the same cells and draw for one image, salt at the data's `white`."""

    def __init__(self, p: float, size: int, white: float = PIXEL_MAX):
        self.p, self.size, self.white = p, size, white

    def __repr__(self) -> str:
        return f"CoarseSaltPepper(p={self.p}, size={self.size}, white={self.white})"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return coarse_salt_pepper(image[None], self.p, self.size, None, self.white)[0]


class Elastic:
    """v2 counterpart of random_elastic: torchvision's ElasticTransform draw with blur_kernel_size's kernel, which
    fits images of any size (torchvision's own int(8·sigma + 1) taps need images larger than 4·sigma)."""

    def __init__(self, alpha: float, sigma: float):
        self.alpha, self.sigma = alpha, sigma

    def __repr__(self) -> str:
        return f"Elastic(alpha={self.alpha}, sigma={self.sigma})"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        h, w = image.shape[-2:]
        displacement = elastic_displacement(1, h, w, self.alpha, self.sigma, None, image.device)
        return TF.elastic(image, displacement, interpolation=TF.InterpolationMode.BILINEAR)


class RandomBlur:
    """v2 counterpart of random_blur: sigma uniform in [0.1, max_sigma], the kernel of blur_kernel_size(max_sigma)."""

    def __init__(self, max_sigma: float):
        self.max_sigma = max_sigma

    def __repr__(self) -> str:
        return f"RandomBlur(max_sigma={self.max_sigma})"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        size = blur_kernel_size(self.max_sigma, *image.shape[-2:])
        sigma = float(_uniform(1, BLUR_MIN_SIGMA, self.max_sigma, None, image.device))
        return TF.gaussian_blur(image, [size, size], [sigma, sigma])


class InWhiteUnits:
    """A torchvision transform run on the image as a share of `white` (the data's brightest level: 255, the digits'
    16), float, so that its clamp at 1 is the data's white, then rounded back to uint8 (on uint8 images
    torchvision's colour functions clamp at 255 and truncate: half a level darker on average)."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor], white: float = PIXEL_MAX):
        self.transform, self.white = transform, white

    def __repr__(self) -> str:
        return f"InWhiteUnits({self.transform!r}, white={self.white})"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        out = self.transform((image.float() / self.white).clamp(0, 1)) * self.white
        return out.round().to(image.dtype)


class ColorJitter:
    """v2 counterpart of color_jitter: the same factors in the same fixed order (brightness, contrast, saturation) on
    one image, rounded back to its dtype. (torchvision's ColorJitter shuffles the order per image, which with the clamp
    at white clips more pixels than the device path.)"""

    def __init__(self, brightness: float, contrast: float, saturation: float, white: float = PIXEL_MAX):
        self.brightness, self.contrast, self.saturation, self.white = brightness, contrast, saturation, white

    def __repr__(self) -> str:
        return (f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, "
                f"white={self.white})")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        out = color_jitter(image[None].float(), self.brightness, self.contrast, self.saturation, None, self.white)
        return out[0].round().to(image.dtype)


class OnFullScale:
    """A torchvision policy (`transform`) run on the uint8 image scaled from [0, white] to [0, 255] and scaled back,
    each rounded: its operations (invert, posterize, solarize's threshold, brightness's clamp) assume 255 is white,
    and the digits' white is 16. With white 255 both scalings are exact identities."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor], white: float = PIXEL_MAX):
        self.transform, self.white = transform, white

    def __repr__(self) -> str:
        return f"OnFullScale({self.transform!r}, white={self.white})"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        full = (image.float() * (PIXEL_MAX / self.white)).round().to(torch.uint8)
        return (self.transform(full).float() * (self.white / PIXEL_MAX)).round().to(image.dtype)


class RandomFactor:
    """v2 counterpart of random_sharpness and random_gamma: torchvision's functional `name` (adjust_sharpness or
    adjust_gamma) with a factor drawn uniformly from [low, high] per image, run as InWhiteUnits does."""

    def __init__(self, name: str, low: float, high: float, white: float = PIXEL_MAX):
        self.name, self.low, self.high, self.white = name, low, high, white

    def __repr__(self) -> str:
        return f"RandomFactor({self.name}, low={self.low}, high={self.high})"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        factor = float(_uniform(1, self.low, self.high, None, image.device))
        return InWhiteUnits(lambda x: getattr(TF, self.name)(x, factor), self.white)(image)


class RandomPerspective:
    """torchvision's RandomPerspective (`transform`), except that a draw whose corners admit no homography (three on
    one line: possible on images of a few pixels near distortion 1) leaves the image as it is, as on the device,
    instead of failing the run."""

    def __init__(self, distortion_scale: float, p: float, **kwargs: object):
        from torchvision.transforms import v2

        self.transform = v2.RandomPerspective(distortion_scale, p, **kwargs)

    def __repr__(self) -> str:
        return repr(self.transform)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        try:
            return self.transform(image)
        except torch.linalg.LinAlgError:
            return image


class RandomInvert:
    """v2 counterpart of invert: white - x with probability p (torchvision's RandomInvert, whose white is 255)."""

    def __init__(self, p: float, white: float = PIXEL_MAX):
        self.p, self.white = p, white

    def __repr__(self) -> str:
        return f"RandomInvert(p={self.p}, white={self.white})"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return invert(image[None], self.p, None, self.white)[0].to(image.dtype)


def build_v2_transform(cfg: DictConfig, white: float = PIXEL_MAX) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The per-image part of the augmentation node as a torchvision.transforms.v2 pipeline, or None; `white` is the
    data's brightest level (the colour steps, coarse salt and the policies).

    In: one uint8 image [C, H, W]. Out: pixel units, uint8 (float32 when noise_std > 0); the loader
    converts to float and normalises as on the device path. Randomness comes from torch's global
    generator (the loader seeds it per image). mixup and cutmix act on batches: see build_batch_mix.
    """
    from torchvision.transforms import v2

    steps: list[Callable] = []
    if cfg.crop_padding > 0:
        steps.append(PadRandomCrop(int(cfg.crop_padding), str(cfg.crop_padding_mode)))
    if cfg.translate > 0:
        steps.append(v2.RandomAffine(degrees=0.0, translate=(float(cfg.translate), float(cfg.translate))))
    # fill=None: grid_sample's zero padding, as on the device. (Their default fill=0 multiplies the border pixels by
    # the interpolated coverage a second time, darkening them.)
    bilinear = {"interpolation": v2.InterpolationMode.BILINEAR, "fill": None}
    if cfg.rotate > 0:
        steps.append(v2.RandomRotation(float(cfg.rotate), **bilinear))
    if cfg.scale > 0:
        steps.append(v2.RandomAffine(degrees=0.0, scale=(1.0 - float(cfg.scale), 1.0 + float(cfg.scale)), **bilinear))
    if cfg.shear > 0:  # one number: along x only, U(-shear, shear)
        steps.append(v2.RandomAffine(degrees=0.0, shear=float(cfg.shear), **bilinear))
    if cfg.perspective > 0 and cfg.perspective_p > 0:
        steps.append(RandomPerspective(float(cfg.perspective), float(cfg.perspective_p), **bilinear))
    if cfg.elastic_alpha > 0:
        steps.append(Elastic(float(cfg.elastic_alpha), float(cfg.elastic_sigma)))
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(float(cfg.hflip)))
    if cfg.vflip > 0:
        steps.append(v2.RandomVerticalFlip(float(cfg.vflip)))
    if max(cfg.brightness, cfg.contrast, cfg.saturation) > 0:
        steps.append(ColorJitter(float(cfg.brightness), float(cfg.contrast), float(cfg.saturation), white))
    if cfg.sharpness > 0:
        low, high = max(0.0, 1 - float(cfg.sharpness)), 1 + float(cfg.sharpness)
        steps.append(RandomFactor("adjust_sharpness", low, high, white))
    if cfg.gamma > 0:
        steps.append(RandomFactor("adjust_gamma", 1 - float(cfg.gamma), 1 + float(cfg.gamma), white))
    if cfg.invert > 0:
        steps.append(RandomInvert(float(cfg.invert), white))
    if cfg.policy is not None:
        steps.append(OnFullScale(build_policy(cfg), white))
    if cfg.blur_sigma > 0:
        steps.append(RandomBlur(float(cfg.blur_sigma)))
    if cfg.cutout_size > 0:
        steps.append(Cutout(int(cfg.cutout_size)))
    if cfg.coarse_salt_p > 0:
        steps.append(CoarseSaltPepper(float(cfg.coarse_salt_p), int(cfg.coarse_salt_size), white))
    if cfg.noise_std > 0:
        steps += [v2.ToDtype(torch.float32, scale=False), v2.GaussianNoise(0.0, float(cfg.noise_std), clip=False)]
    return v2.Compose(steps) if steps else None


def build_policy(cfg: DictConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchvision's searched or random augmentation policy named by augmentation.policy."""
    from torchvision.transforms import v2

    if cfg.policy == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy(str(cfg.autoaugment_dataset)))
    if cfg.policy == "randaugment":
        return v2.RandAugment(num_ops=int(cfg.randaugment_num_ops), magnitude=int(cfg.randaugment_magnitude))
    if cfg.policy == "trivialaugment":
        return v2.TrivialAugmentWide()
    raise ConfigError(f"augmentation.policy={cfg.policy!r} is not a policy; choose one of "
                      f"{', '.join(AUGMENT_POLICIES)} or null")
