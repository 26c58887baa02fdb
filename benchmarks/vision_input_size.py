"""What the ResNet's input size costs: forward + backward images/s of the tiny backbone at 28, 56 and 112 px.

Why it matters: transformers' `ResNetModel` has only the ImageNet stem (7x7/2 conv + max-pool), so a
28x28 image leaves a 7x7 map after the stem; upscaling to 56 keeps one stem output per pixel
(`visionssl/backbone.py`). Channels-last input, as the views are. Sizes alternate over `--rounds`.

    OMP_NUM_THREADS=1 python benchmarks/vision_input_size.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from visionssl.backbone import BackboneConfig, build_backbone, features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(), 28)
    sizes = (28, 56, 112)
    seconds: dict[int, list[float]] = {size: [] for size in sizes}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for size in sizes:
            x = torch.randn(args.batch, 3, size, size).contiguous(memory_format=torch.channels_last)
            started = time.perf_counter()
            features(backbone, x).sum().backward()
            backbone.zero_grad()
            if round_:
                seconds[size].append(time.perf_counter() - started)
    print(f"tiny ResNet, forward + backward, batch {args.batch}, {torch.get_num_threads()} thread(s), "
          f"median of {args.rounds}")
    for size in sizes:
        with torch.no_grad():
            stem = backbone.embedder(torch.zeros(1, 3, size, size)).shape[-1]
        print(f"input {size:>3} px: {args.batch / statistics.median(seconds[size]):>7,.0f} img/s, "
              f"{stem}x{stem} map after the stem")


if __name__ == "__main__":
    main()
