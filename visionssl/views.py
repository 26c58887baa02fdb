"""Augmented views (SimCLR/BYOL recipes), drawn from per-example seeds and applied to whole batches.

Two halves. `draw_view_params` runs in the collator: it draws each example's crop box, flip,
jitter factors, grayscale, blur and solarize from that example's seed (the same draws as
torchvision's v2 `RandomResizedCrop`, `RandomHorizontalFlip`, `ColorJitter`, `RandomGrayscale`,
`GaussianBlur`, `RandomSolarize`), so a batch is the same on 1 or N processes and after a resume,
with no RNG state to carry. `apply_views` then does the pixel work on the whole batch at once on
whatever device the batch is on: crop + resize + flip as ONE `grid_sample` (a per-example affine
grid), jitter as per-example broadcasts, blur as one grouped convolution. Per-image PIL
transforms in DataLoader workers (the usual way) spend most of their time in Python per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from sslcore.data import generator_for


@dataclass
class ViewConfig:
    """One view's augmentation recipe (defaults: SimCLR's, with a gentler crop for 28x28 images)."""

    crop_scale_min: float = 0.2
    """Smallest crop area as a share of the image (RandomResizedCrop scale=(min, max))."""
    crop_scale_max: float = 1.0
    """Largest crop area as a share of the image."""
    crop_ratio_min: float = 3 / 4
    """Smallest aspect ratio of the crop."""
    crop_ratio_max: float = 4 / 3
    """Largest aspect ratio of the crop."""
    flip_p: float = 0.5
    """Probability of a horizontal flip."""
    jitter_p: float = 0.8
    """Probability of colour jitter (brightness, contrast, saturation, hue)."""
    brightness: float = 0.4
    """Brightness factor drawn from [1 - b, 1 + b]."""
    contrast: float = 0.4
    """Contrast factor drawn from [1 - c, 1 + c]."""
    saturation: float = 0.2
    """Saturation factor drawn from [1 - s, 1 + s] (colour images only)."""
    hue: float = 0.1
    """Hue shift drawn from [-h, h] (colour images only)."""
    grayscale_p: float = 0.2
    """Probability of converting to grayscale (colour images only)."""
    blur_p: float = 0.0
    """Probability of a Gaussian blur (SimCLR uses 0.5 on ImageNet, BYOL 1.0 / 0.1; off for 28x28)."""
    blur_sigma_min: float = 0.1
    """Smallest blur sigma, in pixels of the output."""
    blur_sigma_max: float = 2.0
    """Largest blur sigma, in pixels of the output."""
    solarize_p: float = 0.0
    """Probability of solarizing (BYOL's second view: 0.2)."""


_FIELDS = ("box", "flip", "jitter", "factors", "gray", "blur_sigma", "solarize")


def _crop_box(generator: torch.Generator, config: ViewConfig, height: int, width: int) -> list[float]:
    """RandomResizedCrop's box (top, left, h, w) as fractions of the image (torchvision's 10-try draw)."""
    area = height * width
    log_ratio = (math.log(config.crop_ratio_min), math.log(config.crop_ratio_max))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(config.crop_scale_min, config.crop_scale_max, generator=generator).item()
        ratio = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, (1,), generator=generator).item()
            left = torch.randint(0, width - w + 1, (1,), generator=generator).item()
            return [top / height, left / width, h / height, w / width]
    ratio = width / height  # fallback: a central crop at the nearest allowed ratio
    if ratio < config.crop_ratio_min:
        w, h = width, int(round(width / config.crop_ratio_min))
    elif ratio > config.crop_ratio_max:
        h, w = height, int(round(height * config.crop_ratio_max))
    else:
        w, h = width, height
    return [(height - h) / 2 / height, (width - w) / 2 / width, h / height, w / width]


def draw_view_params(seeds: list[int], config: ViewConfig, view: int, height: int, width: int
                     ) -> dict[str, torch.Tensor]:
    """Each example's random choices for view number `view`, from its seed only."""
    rows = {name: [] for name in _FIELDS}
    for seed in seeds:
        # One stream per (example, view): view 1 of an example never depends on view 0's draws.
        g = generator_for((seed * 1_000_003 + view * 7919 + 1) & ((1 << 63) - 1))
        u = torch.rand(6, generator=g).tolist()
        rows["box"].append(_crop_box(g, config, height, width))
        rows["flip"].append(u[0] < config.flip_p)
        rows["jitter"].append(u[1] < config.jitter_p)
        factors = torch.rand(4, generator=g)
        rows["factors"].append([1 + config.brightness * (2 * factors[0].item() - 1),
                                1 + config.contrast * (2 * factors[1].item() - 1),
                                1 + config.saturation * (2 * factors[2].item() - 1),
                                config.hue * (2 * factors[3].item() - 1)])
        rows["gray"].append(u[2] < config.grayscale_p)
        sigma = config.blur_sigma_min + (config.blur_sigma_max - config.blur_sigma_min) * u[4]
        rows["blur_sigma"].append(sigma if u[3] < config.blur_p else 0.0)
        rows["solarize"].append(u[5] < config.solarize_p)
    return {name: torch.tensor(values, dtype=torch.bool if name in ("flip", "jitter", "gray", "solarize")
                               else torch.float32) for name, values in rows.items()}


def crop_resize_flip(images: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Every example's crop box resized to `size` x `size` (bilinear) and flipped, as one grid_sample.

    `box` rows are (top, left, height, width) as fractions of the image; affine_grid maps the output
    square onto that box in the [-1, 1] coordinates grid_sample reads from.
    """
    top, left, h, w = box.unbind(1)
    theta = torch.zeros(len(images), 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = torch.where(flip, -w, w)
    theta[:, 0, 2] = 2 * left + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * top + h - 1
    grid = F.affine_grid(theta, [len(images), images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(images: torch.Tensor) -> torch.Tensor:
    return TF.rgb_to_grayscale(images, num_output_channels=1) if images.shape[1] == 3 else images


def color_jitter(images: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation, hue (torchvision's formulas, fixed order) per example."""
    def where(new):
        return torch.where(apply[:, None, None, None], new, images)

    b, c, s = (factors[:, i, None, None, None] for i in range(3))
    images = where((images * b).clamp(0, 1))
    mean = _gray(images).mean(dim=(1, 2, 3), keepdim=True)
    images = where((c * images + (1 - c) * mean).clamp(0, 1))
    if images.shape[1] == 3:
        images = where((s * images + (1 - s) * _gray(images)).clamp(0, 1))
        shift = apply & (factors[:, 3] != 0)
        if bool(shift.any()):  # hue: torchvision's HSV round trip, only for the examples that shift
            index = shift.nonzero().flatten()
            images = images.clone()
            images[index] = torch.stack([TF.adjust_hue(images[i], float(factors[i, 3])) for i in index.tolist()])
    return images


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A separable Gaussian blur with each example's own sigma (0 = untouched), one grouped conv."""
    blurred = sigma > 0
    if not bool(blurred.any()):
        return images
    n, c, height, width = images.shape
    radius = max(1, int(math.ceil(2 * float(sigma.max()))))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    safe = torch.where(blurred, sigma, torch.ones_like(sigma)).to(images.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / safe[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    identity = (offsets == 0).to(images.dtype)[None].expand(n, -1)
    kernel = torch.where(blurred[:, None], kernel, identity).repeat_interleave(c, 0)  # [n*c, k]
    flat = F.pad(images.reshape(1, n * c, height, width), [radius] * 4, mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    return flat.reshape(n, c, height, width)


def apply_views(images: torch.Tensor, params: dict[str, torch.Tensor], size: int, mean: torch.Tensor,
                std: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """uint8 images [B, C, H, W] + one view's params -> normalised float views [B, channels, size, size]."""
    x = images.float().div_(255)
    x = crop_resize_flip(x, params["box"], params["flip"], size)
    x = color_jitter(x, params["jitter"], params["factors"])
    if x.shape[1] == 3:
        x = torch.where(params["gray"][:, None, None, None], _gray(x).expand_as(x), x)
    x = gaussian_blur(x, params["blur_sigma"])
    x = torch.where(params["solarize"][:, None, None, None] & (x >= 0.5), 1 - x, x)
    return normalize(x, mean, std, channels)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels: int) -> torch.Tensor:
    """(x - mean) / std, grayscale repeated to `channels` (the exported processor does the same).

    The result is channels-last: oneDNN's CPU convolutions run 1.4-1.7x faster on it than on NCHW
    (tiny ResNet at 56 px, forward + backward, 1 thread; README, Vision), and the weights can stay
    in the default layout, so checkpoints and exports are unchanged."""
    if x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1)
    x = x.contiguous(memory_format=torch.channels_last)
    return (x - mean.to(x)[None, :, None, None]) / std.to(x)[None, :, None, None]


def plain_view(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor, channels: int = 3
               ) -> torch.Tensor:
    """The un-augmented input the exported image processor makes: resize (bilinear) and normalise."""
    x = images.float().div(255)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x, mean, std, channels)


def collate_views(images: torch.Tensor, seeds: list[int], configs: list[ViewConfig]) -> dict[str, torch.Tensor]:
    """A batch of raw uint8 images plus each view's drawn params (flat keys `view{i}.{field}`)."""
    height, width = images.shape[-2:]
    batch = {"images": images}
    for v, config in enumerate(configs):
        for name, value in draw_view_params(seeds, config, v, height, width).items():
            batch[f"view{v}.{name}"] = value
    return batch


def view_params(batch: dict[str, torch.Tensor], view: int) -> dict[str, torch.Tensor]:
    prefix = f"view{view}."
    return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
