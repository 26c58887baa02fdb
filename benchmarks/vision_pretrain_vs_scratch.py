"""Does vision pretraining pay? kNN, linear-probe and full fine-tuning accuracy of the pretrained backbone
against the same backbone from random init, over seeds, plus the raw-pixel baseline.

For each preset and seed: pretrain with that seed, then probe the exported backbone (loaded with stock
`AutoModel`) and the same architecture with fresh weights of the same seed, by the same call on the
same images: the whole official train and test splits by default, as solo-learn scores them (the
raw-pixel kNN of about 85.5% on Fashion-MNIST is a full-split figure); the export's card then carries no
probe scores. `full` then fine-tunes every weight of both arms (`visionssl.finetune`:
stock `AutoModelForImageClassification`, the same labelled images, steps and seed, each arm's
learning rate chosen on a held-out validation split from `--finetune-lrs`, early stopping on it).
The table comes from `sslcore.compare` (the one the text side uses).

    OMP_NUM_THREADS=1 python benchmarks/vision_pretrain_vs_scratch.py \
        --configs recipes/configs/simclr_tiny.yaml --seeds 0 1 2 --steps 400 --batch 256 \
        --protocols knn linear full --finetune-labels 1000 --finetune-steps 300 --finetune-lrs 1e-3 \
        --results benchmarks/results/vision_fashion_mnist.md
    # anything after `--` overrides every preset, e.g. -- --data.source mnist
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from transformers import AutoModel

from sslcore.api import build_config, pretrain
from sslcore.compare import Comparison, write_report
from sslcore.config import to_dict
from sslcore.registry import get_objective
from visionssl.finetune import finetune
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
PROTOCOLS = {"knn": "knn_accuracy", "linear": "linear_probe_accuracy", "full": "full"}
PROTOCOL_NAMES = {**PROBES, "full": "full fine-tuning"}


def finetune_arm(config, model_dir: Path, init: str, seed: int, args, out: Path) -> tuple[float, float, int, str]:
    """Test accuracy (of the best validation weights of the learning rate chosen on validation), seconds (the
    whole grid), steps and the chosen setting of one arm's full fine-tuning for one seed."""
    data = {k: v for k, v in to_dict(config.data).items() if k not in ("max_train_examples", "max_eval_examples")}
    result = finetune(seeds=[seed], learning_rates=args.finetune_lrs, overrides={
        "data": data, "model": {"path": str(model_dir), "init": init},
        "split": {"train_examples": args.finetune_labels, "test_examples": args.probe_test,
                  "validation_fraction": args.finetune_validation},
        "train": {"output_dir": str(out / "finetune"), "max_steps": args.finetune_steps,
                  # a label budget below one batch trains on the whole labelled set each step
                  "per_device_batch_size": min(args.batch, 128, args.finetune_labels or args.batch),
                  "eval_every": max(1, args.finetune_steps // 10),
                  "progress_bar": False, "report_to": []}})
    chosen = result.selection.short() if result.selection is not None else ""
    return result.test["accuracy"][0], result.seconds, result.steps[0], chosen


def probe(backbone, objective, config) -> dict[str, float]:
    """kNN and linear probe of a frozen backbone on the benchmark's images (the same for every run)."""
    return probe_backbone(backbone, objective.train_images, objective.test_images, objective.input_size,
                          objective.mean, objective.std, config.probe, seed=0)


def pretraining_seconds(out: Path, measured: float) -> float:
    """The pretraining wall time of the run in `out`: a run reused by `--train.resume auto` keeps the time it
    took when it trained (recorded beside it then)."""
    record = out / "pretrain_seconds.json"
    if record.exists():
        return float(json.loads(record.read_text())["seconds"])
    record.write_text(json.dumps({"seconds": round(measured, 1)}))
    return measured


def weights_key(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["recipes/configs/simclr_tiny.yaml"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="pretraining steps per seed")
    parser.add_argument("--batch", type=int, default=128, help="per-device batch size")
    parser.add_argument("--probe-train", type=int, default=0,
                        help="labelled training images the probes fit on (a fixed subset); 0 = the whole split")
    parser.add_argument("--probe-test", type=int, default=0,
                        help="test images the probes are scored on (a fixed subset); 0 = the whole split")
    parser.add_argument("--protocols", nargs="+", choices=list(PROTOCOLS), default=list(PROTOCOLS),
                        help="knn / linear: probes on frozen features; full: fine-tune every weight")
    parser.add_argument("--finetune-labels", type=int, default=1000,
                        help="labelled training images of full fine-tuning (a stratified subset); 0 = all")
    parser.add_argument("--finetune-steps", type=int, default=300, help="full fine-tuning steps at most per run")
    parser.add_argument("--finetune-validation", type=float, default=0.02,
                        help="share of the training split held out (stratified) to pick the learning rate and stop on")
    parser.add_argument("--finetune-lrs", nargs="+", type=float, default=[1e-3],
                        help="full fine-tuning peak learning rates: each arm keeps its best on validation")
    parser.add_argument("--work-dir", default="runs/vision_benchmark")
    parser.add_argument("--results", default="benchmarks/results/vision_fashion_mnist.md")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.finetune_labels = args.finetune_labels or None
    args.probe_train, args.probe_test = args.probe_train or None, args.probe_test or None
    probes = {PROTOCOLS[p]: PROBES[PROTOCOLS[p]] for p in args.protocols if p != "full"}
    arms = [*probes, *(["full"] if "full" in args.protocols else [])]

    rows, notes, pixel_scores = [], [], None
    scratch_scores: dict[str, dict[str, float]] = {}  # by weights: every tiny preset shares one backbone init
    for path in args.configs:
        method = Path(path).stem
        pretrained = {name: Arm() for name in arms}
        scratch = {name: Arm() for name in arms}
        for seed in args.seeds:
            out = Path(args.work_dir) / method / f"seed{seed}"
            overrides = [*extra, "--train.seed", str(seed), "--train.max_steps", str(args.steps),
                         "--train.per_device_batch_size", str(args.batch), "--train.output_dir", str(out),
                         "--train.report_to", "[]", "--train.progress_bar", "false", "--train.save_every", "0",
                         "--train.eval_every", "0", "--train.log_every", str(max(1, args.steps // 5)),
                         "--probe.enabled", "false"]  # both arms are probed below, by the same call
            config = build_config(path, overrides)
            config.probe.train_examples, config.probe.test_examples = args.probe_train, args.probe_test
            started = time.perf_counter()
            result = pretrain(config)
            seconds = pretraining_seconds(out, time.perf_counter() - started)
            objective = get_objective(config.objective)(config)
            objective.prepare()
            if probes:
                started = time.perf_counter()
                scores = probe(AutoModel.from_pretrained(result.export_dir), objective, config)
                seconds += time.perf_counter() - started
                for name in probes:
                    pretrained[name].add(seed, scores[name], seconds / len(probes), result.step)
                print(f"{method} seed {seed}: pretrained {scores} ({seconds:.0f} s)", flush=True)

                started = time.perf_counter()
                set_seed(seed)  # what the trainer does before build_model: the same init as the pretrained arm's start
                backbone = objective.backbone_of(objective.build_model())
                key = weights_key(backbone)
                if key not in scratch_scores:
                    scratch_scores[key] = probe(backbone, objective, config)
                random_scores = scratch_scores[key]
                seconds = time.perf_counter() - started
                for name in probes:
                    scratch[name].add(seed, random_scores[name], seconds / len(probes))
                print(f"{method} seed {seed}: random init {random_scores} ({seconds:.0f} s)", flush=True)
            if "full" in arms:
                for init, arm in (("pretrained", pretrained), ("random", scratch)):
                    accuracy, seconds, steps, chosen = finetune_arm(config, Path(result.export_dir), init, seed, args,
                                                                    out / init)
                    arm["full"].add(seed, accuracy, seconds, steps)
                    print(f"{method} seed {seed}: full fine-tuning from {init}: test accuracy {accuracy:.4f} "
                          f"({steps} steps, chosen on validation: {chosen}; {seconds:.0f} s)", flush=True)
            if pixel_scores is None and probes:
                pixel_scores = pixel_baseline(objective.train_images, objective.test_images, config.probe)
                print(f"raw pixels: {pixel_scores}", flush=True)
        for name in arms:
            rows.append(Comparison(f"{method} / {config.data.source}", PROTOCOL_NAMES[name], pretrained[name],
                                   scratch[name]))
        backbone_shape = (f"{config.backbone.kind} {config.backbone.hidden_sizes} x {config.backbone.depths}"
                          if config.backbone.kind == "resnet" else f"vit {config.backbone.hidden_size}x"
                          f"{config.backbone.num_hidden_layers}")
        notes.append(f"{method}: {backbone_shape}, input {objective.input_size}px, {args.steps} steps x batch "
                     f"{args.batch} (1 process)")

    command = "python benchmarks/vision_pretrain_vs_scratch.py " + shlex.join(sys.argv[1:])
    pixel_note = ", ".join(f"{PROBES[k]} {v:.4f}" for k, v in (pixel_scores or {}).items())
    note = f"Pretrained: {'; '.join(notes)}."
    if probes:
        note += (f" Probes on frozen features of {args.probe_train or 'all'} training and {args.probe_test or 'all'} "
                 f"test images (the same images for every run). Raw-pixel baseline on the same images: {pixel_note}.")
    if "full" in arms:
        note += (f" Full fine-tuning: every weight of ResNetForImageClassification/ViTForImageClassification, "
                 f"{args.finetune_labels or 'all'} labelled training images (stratified), at most "
                 f"{args.finetune_steps} steps, peak learning rate chosen per arm and seed on validation from "
                 f"{args.finetune_lrs}, best validation accuracy kept ({args.finetune_validation:.0%} of the training "
                 f"split held out), scored "
                 f"on the same {args.probe_test or 'all'} test images.")
    text = write_report(rows, args.results, command=command, checkpoint_note=note,
                        budget_note=f"{args.steps} steps x {args.batch}",
                        plot_title="vision probes: pretrained vs random init",
                        extra={"raw_pixel_baseline": pixel_scores, "notes": notes})
    print(text)


if __name__ == "__main__":
    main()
