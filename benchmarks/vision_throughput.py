"""Where the time of a SimCLR step goes, and our way against the usual one, in one run.

The usual way (lightly's documentation, torchvision's references): a torchvision v2 `Compose` applied
to each PIL image in the DataLoader (RandomResizedCrop, flip, ColorJitter, grayscale, ToImage,
Normalize), the two views stacked by the collate function, then the model. Ours: the collator draws
each example's crop box / flip / jitter factors from its seed, and the pixel work runs on the whole
batch at once (one `grid_sample` for crop + resize + flip, broadcast jitter) — on the device when
there is one. Same backbone, data, batch and steps for both; the two sides alternate rep by rep so
both see the same load on a shared machine, and the medians are compared.

    OMP_NUM_THREADS=1 python benchmarks/vision_throughput.py --batch 256 --steps 200

Both sides train their own copy of the same initial model for the same steps on the same images; the
kNN and linear probes of both backbones at the end say whether the faster way learns as well.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torchvision.transforms import v2
from tqdm.auto import tqdm

from sslcore.api import build_config
from sslcore.data import example_seed
from sslcore.objective import LossContext
from sslcore.registry import get_objective
from visionssl.probe import probe_backbone
from visionssl.views import ViewConfig


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
    parser.add_argument("--steps", type=int, default=200,
                        help="training steps per side (the first is a warm-up, left out of the timings)")
    parser.add_argument("--probe-train", type=int, default=5000)
    parser.add_argument("--probe-test", type=int, default=2000)
    args = parser.parse_args()

    # No online probe: the reference loop has none either.
    config = build_config(args.config, {"data": {"max_train_examples": args.steps * args.batch},
                                        "probe": {"online": False, "train_examples": args.probe_train,
                                                  "test_examples": args.probe_test}})
    objective = get_objective(config.objective)(config)
    objective.prepare()
    torch.manual_seed(0)
    ours_model = objective.build_model()
    ref_model = copy.deepcopy(ours_model)  # the same initial weights on both sides
    ours_optimizer = torch.optim.AdamW(ours_model.parameters(), lr=config.train.learning_rate)
    ref_optimizer = torch.optim.AdamW(ref_model.parameters(), lr=config.train.learning_rate)
    images = objective.train_images.images
    size, mean, std = objective.input_size, objective.mean.tolist(), objective.std.tolist()
    reference = torchvision_views(size, mean, std, config.view1)
    from visionssl.losses import NTXentLoss

    criterion = NTXentLoss(config.loss.temperature, reduction="mean")
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=generator)

    def rows(step):
        return order[(step * args.batch) % len(order):][: args.batch].tolist()

    def ours_step(step):
        """The trainer's path: the collator draws view params from example seeds; loss() makes the views."""
        started = time.perf_counter()
        batch = objective.collate([objective.train_images[i] for i in rows(step)],
                                  [example_seed(0, step, i) for i in range(args.batch)])
        drawn = time.perf_counter()
        views = objective.both_views(batch)  # timed apart here; loss() below makes them again
        made = time.perf_counter()
        loss, _ = objective.loss(ours_model, batch, LossContext(objective.targets(batch)))
        loss.backward()
        ours_optimizer.step()
        ours_optimizer.zero_grad()
        done = time.perf_counter()
        del views
        return drawn - started, made - drawn, done - made

    def reference_step(step):
        """A Dataset that returns PIL images (as torchvision's FashionMNIST does), the per-image v2 pipeline
        applied twice, views stacked, then model + NT-Xent."""
        started = time.perf_counter()
        pil = [v2.functional.to_pil_image(images[i]) for i in rows(step)]
        views = torch.stack([torch.stack([reference(image) for image in pil]) for _ in range(2)])
        augmented = time.perf_counter()
        z, _ = ref_model(torch.cat(list(views)))
        s, p = NTXentLoss.pair_indices(2, args.batch, 0)
        criterion(z, z, s, p).backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        return augmented - started, time.perf_counter() - augmented

    timings = {"ours_draw": [], "ours_pixels": [], "ours_step": [], "ref_augment": [], "ref_step": []}
    for step in tqdm(range(args.steps), desc="steps (both sides)"):  # the sides alternate: same load for both
        draw, pixels, ours_total = ours_step(step)
        ref_augment, ref_total = reference_step(step)
        if step:
            for key, value in zip(timings, (draw, pixels, ours_total - pixels, ref_augment, ref_total)):
                timings[key].append(value)
    med = {k: statistics.median(v) for k, v in timings.items()}
    views_per_batch = 2 * args.batch
    ours_aug, ours_total = med["ours_draw"] + med["ours_pixels"], med["ours_draw"] + med["ours_pixels"] + med["ours_step"]
    ref_total = med["ref_augment"] + med["ref_step"]
    print(f"threads {torch.get_num_threads()}, batch {args.batch} x 2 views at {size}px, {args.steps} steps per side "
          "(medians)")
    print(f"augmentation only: ours {views_per_batch / ours_aug:,.0f} views/s (draw params {med['ours_draw'] * 1e3:.0f} ms, "
          f"pixels {med['ours_pixels'] * 1e3:.0f} ms) vs torchvision per image {views_per_batch / med['ref_augment']:,.0f} "
          f"views/s: {med['ref_augment'] / ours_aug:.1f}x")
    print(f"model forward+backward+step: {med['ours_step'] * 1e3:.0f} ms (ours: channels-last input) / "
          f"{med['ref_step'] * 1e3:.0f} ms (reference: NCHW)")
    print(f"whole step: ours {args.batch / ours_total:,.0f} images/s vs reference {args.batch / ref_total:,.0f} images/s: "
          f"{ref_total / ours_total:.2f}x; augmentation is {100 * ours_aug / ours_total:.0f}% of our step, "
          f"{100 * med['ref_augment'] / ref_total:.0f}% of the reference's")
    for name, model in (("ours", ours_model), ("reference", ref_model)):
        scores = probe_backbone(objective.backbone_of(model), objective.train_images, objective.test_images, size,
                                objective.mean, objective.std, config.probe, seed=0)
        print(f"after {args.steps} steps, {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
              + f" ({args.probe_train} train / {args.probe_test} test images)")


if __name__ == "__main__":
    main()
