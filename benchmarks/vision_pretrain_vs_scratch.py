"""Does vision pretraining pay? kNN and linear-probe accuracy of the pretrained backbone against the
same backbone from random init, over seeds, plus the raw-pixel baseline.

For each preset and seed: pretrain with that seed (the export runs the probes on frozen features),
then probe the same architecture with fresh weights of the same seed. Both arms are probed on the
same images (fixed subsets). The table comes from `sslcore.compare` (the one the text side uses).

    OMP_NUM_THREADS=1 python benchmarks/vision_pretrain_vs_scratch.py \
        --configs recipes/configs/simclr_tiny.yaml --seeds 0 1 2 --steps 150 --batch 128 \
        --results benchmarks/results/vision_fashion_mnist.md
    # anything after `--` overrides every preset, e.g. -- --data.source mnist
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.utils import set_seed

from sslcore.api import build_config, pretrain
from sslcore.compare import Comparison, write_report
from sslcore.registry import get_objective
from visionssl.probe import pixel_baseline, probe_backbone


@dataclass
class Arm:
    """One arm's scores over seeds (the `sslcore.compare.ArmResult` shape)."""

    seeds: list[int] = field(default_factory=list)
    main_metric: str = "accuracy"
    test: dict[str, list[float]] = field(default_factory=lambda: {"accuracy": []})
    seconds: float = 0.0
    steps: list[int] = field(default_factory=list)

    def add(self, seed: int, score: float, seconds: float, steps: int = 0) -> None:
        self.seeds.append(seed)
        self.test["accuracy"].append(score)
        self.seconds += seconds
        self.steps.append(steps)


PROBES = {"knn_accuracy": "kNN (k=200)", "linear_probe_accuracy": "linear probe"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["recipes/configs/simclr_tiny.yaml"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="pretraining steps per seed")
    parser.add_argument("--batch", type=int, default=128, help="per-device batch size")
    parser.add_argument("--probe-train", type=int, default=5000, help="labelled images the probes fit on")
    parser.add_argument("--probe-test", type=int, default=2000, help="test images the probes are scored on")
    parser.add_argument("--work-dir", default="runs/vision_benchmark")
    parser.add_argument("--results", default="benchmarks/results/vision_fashion_mnist.md")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    rows, notes, pixel_scores = [], [], None
    for path in args.configs:
        method = Path(path).stem
        pretrained = {name: Arm() for name in PROBES}
        scratch = {name: Arm() for name in PROBES}
        for seed in args.seeds:
            out = Path(args.work_dir) / method / f"seed{seed}"
            overrides = [*extra, "--train.seed", str(seed), "--train.max_steps", str(args.steps),
                         "--train.per_device_batch_size", str(args.batch), "--train.output_dir", str(out),
                         "--train.report_to", "[]", "--train.progress_bar", "false", "--train.save_every", "0",
                         "--train.eval_every", "0", "--train.log_every", str(max(1, args.steps // 5)),
                         "--probe.train_examples", str(args.probe_train), "--probe.test_examples", str(args.probe_test)]
            config = build_config(path, overrides)
            started = time.perf_counter()
            result = pretrain(config)
            seconds = time.perf_counter() - started
            scores = json.loads((Path(result.export_dir) / "probe_scores.json").read_text())
            for name in PROBES:
                pretrained[name].add(seed, scores[name], seconds / len(PROBES), result.step)
            print(f"{method} seed {seed}: pretrained {scores} ({seconds:.0f} s)", flush=True)

            started = time.perf_counter()
            objective = get_objective(config.objective)(config)
            objective.prepare()
            set_seed(seed)  # what the trainer does before build_model: the same init as the pretrained arm's start
            backbone = objective.backbone_of(objective.build_model())
            random_scores = probe_backbone(backbone, objective.train_images, objective.test_images, objective.input_size,
                                           objective.mean, objective.std, config.probe, seed=0)
            seconds = time.perf_counter() - started
            for name in PROBES:
                scratch[name].add(seed, random_scores[name], seconds / len(PROBES))
            print(f"{method} seed {seed}: random init {random_scores} ({seconds:.0f} s)", flush=True)
            if pixel_scores is None:
                pixel_scores = pixel_baseline(objective.train_images, objective.test_images, config.probe)
                print(f"raw pixels: {pixel_scores}", flush=True)
        for name, protocol in PROBES.items():
            rows.append(Comparison(f"{method} / {config.data.source}", protocol, pretrained[name], scratch[name]))
        backbone_shape = (f"{config.backbone.kind} {config.backbone.hidden_sizes} x {config.backbone.depths}"
                          if config.backbone.kind == "resnet" else f"vit {config.backbone.hidden_size}x"
                          f"{config.backbone.num_hidden_layers}")
        notes.append(f"{method}: {backbone_shape}, input {objective.input_size}px, {args.steps} steps x batch "
                     f"{args.batch} (1 process)")

    command = "python benchmarks/vision_pretrain_vs_scratch.py " + shlex.join(sys.argv[1:])
    pixel_note = ", ".join(f"{PROBES[k]} {v:.4f}" for k, v in (pixel_scores or {}).items())
    note = (f"Pretrained: {'; '.join(notes)}. Probes on frozen features of {args.probe_train} training and "
            f"{args.probe_test} test images (the same images for every run). Raw-pixel baseline on the same "
            f"images: {pixel_note}.")
    text = write_report(rows, args.results, command=command, checkpoint_note=note,
                        budget_note=f"{args.steps} steps x {args.batch}",
                        plot_title="vision probes: pretrained vs random init",
                        extra={"raw_pixel_baseline": pixel_scores, "notes": notes})
    print(text)


if __name__ == "__main__":
    main()
