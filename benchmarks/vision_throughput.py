"""Where the time of a SimCLR step goes, and our way against the usual one, in one run.

The usual way (lightly's documentation, torchvision's references): a torchvision v2 `Compose` applied
to each PIL image in the DataLoader (RandomResizedCrop, flip, ColorJitter, grayscale, ToImage,
Normalize), the two views stacked by the collate function, then the model. Ours: the collator draws
each example's crop box / flip / jitter factors from its seed, and the pixel work runs on the whole
batch at once (one `grid_sample` for crop + resize + flip, broadcast jitter) — on the device when
there is one. Same backbone, data, batch and steps for both; the two sides alternate rep by rep so
both see the same load on a shared machine, and the medians are compared.

    OMP_NUM_THREADS=1 python benchmarks/vision_throughput.py --batch 256 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.transforms import v2

from sslcore.api import build_config
from sslcore.data import example_seed
from sslcore.objective import LossContext
from sslcore.registry import get_objective
from visionssl.views import ViewConfig, apply_views, view_params


def torchvision_views(size: int, mean: list[float], std: list[float], config: ViewConfig) -> v2.Compose:
    """The same recipe as `ViewConfig` as a per-image torchvision v2 pipeline (how lightly's SimCLRTransform works)."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(config.crop_scale_min, config.crop_scale_max),
                             ratio=(config.crop_ratio_min, config.crop_ratio_max), antialias=True),
        v2.RandomHorizontalFlip(config.flip_p),
        v2.RandomApply([v2.ColorJitter(config.brightness, config.contrast, config.saturation, config.hue)],
                       p=config.jitter_p),
        v2.RandomGrayscale(config.grayscale_p),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="recipes/configs/simclr_tiny.yaml")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    # No online probe: the reference loop has none either.
    config = build_config(args.config, {"data": {"max_train_examples": 4 * args.batch}, "probe": {"online": False}})
    objective = get_objective(config.objective)(config)
    objective.prepare()
    model = objective.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = objective.train_images.images
    size, mean, std = objective.input_size, objective.mean.tolist(), objective.std.tolist()
    pil = [v2.functional.to_pil_image(image) for image in images[: args.batch]]
    reference = torchvision_views(size, mean, std, config.view1)
    from visionssl.losses import NTXentLoss

    criterion = NTXentLoss(config.loss.temperature, reduction="mean")

    def ours_augment(rep):
        seeds = [example_seed(rep, 0, i) for i in range(args.batch)]
        started = time.perf_counter()
        batch = objective.collate([objective.train_images[i] for i in range(args.batch)], seeds)
        drawn = time.perf_counter()
        views = [apply_views(batch["images"], view_params(batch, v), size, objective.mean, objective.std) for v in (0, 1)]
        return drawn - started, time.perf_counter() - drawn, batch, views

    def reference_augment():
        started = time.perf_counter()
        views = torch.stack([torch.stack([reference(image) for image in pil]) for _ in range(2)])
        return time.perf_counter() - started, views

    def step(views):
        started = time.perf_counter()
        z, _ = model(torch.cat(list(views)))
        n = len(views[0])
        s, p = NTXentLoss.pair_indices(2, n, 0)
        loss = criterion(z, z, s, p)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - started

    timings = {"ours_draw": [], "ours_pixels": [], "ours_step": [], "ref_augment": [], "ref_step": []}
    for rep in range(args.reps + 1):  # rep 0 warms up both sides
        draw, pixels, batch, _ = ours_augment(rep)
        started = time.perf_counter()
        loss, _ = objective.loss(model, batch, LossContext(objective.targets(batch)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ours_step = time.perf_counter() - started  # includes making the views again inside loss()
        ref_aug, ref_views = reference_augment()
        ref_step = step(ref_views)
        if rep:
            for key, value in zip(timings, (draw, pixels, ours_step - pixels, ref_aug, ref_step)):
                timings[key].append(value)
    med = {k: statistics.median(v) for k, v in timings.items()}
    views_per_batch = 2 * args.batch
    ours_aug, ours_total = med["ours_draw"] + med["ours_pixels"], med["ours_draw"] + med["ours_pixels"] + med["ours_step"]
    ref_total = med["ref_augment"] + med["ref_step"]
    print(f"threads {torch.get_num_threads()}, batch {args.batch} x 2 views at {size}px, {args.reps} reps (medians)")
    print(f"augmentation only: ours {views_per_batch / ours_aug:,.0f} views/s (draw params {med['ours_draw'] * 1e3:.0f} ms, "
          f"pixels {med['ours_pixels'] * 1e3:.0f} ms) vs torchvision per image {views_per_batch / med['ref_augment']:,.0f} "
          f"views/s: {med['ref_augment'] / ours_aug:.1f}x")
    print(f"model forward+backward+step: {med['ours_step'] * 1e3:.0f} ms (ours) / {med['ref_step'] * 1e3:.0f} ms (reference)")
    print(f"whole step: ours {args.batch / ours_total:,.0f} images/s vs reference {args.batch / ref_total:,.0f} images/s: "
          f"{ref_total / ours_total:.2f}x; augmentation is {100 * ours_aug / ours_total:.0f}% of our step, "
          f"{100 * med['ref_augment'] / ref_total:.0f}% of the reference's")


if __name__ == "__main__":
    main()
