"""Full fine-tuning of a pretrained vision backbone (or the same one from random init) on labelled images.

    import visionssl.finetune as vf
    result = vf.finetune(model="runs/simclr_tiny/model", source="fashion-mnist", seeds=[0, 1, 2],
                         train_examples=1000)
    print(result.summary())          # accuracy 0.81 ± 0.01 over 3 seeds ...
    result.model_dirs[0]             # a ResNetForImageClassification folder for pipeline("image-classification")

The exported backbone (`ResNetModel` / `ViTModel` + its image processor) becomes a stock
`AutoModelForImageClassification` (`ResNetForImageClassification`: global pool + linear;
`ViTForImageClassification`: [CLS] + linear), every weight trained by the shared
`sslcore.trainer.Trainer` through the `image_classification` objective: light augmentation drawn
from each example's seed (the pretraining views' machinery), validation scored every
`train.eval_every` steps, the best weights kept, early stopping (`sslcore.finetune`); the test split
is scored once, with the best weights. `model.init: random` builds the same architecture with fresh
weights and the same image processor: the scratch arm. One run per seed, mean ± std reported.

Splits: the source's own test split is the test split; validation is a stratified share of its
training split (`sslcore.splits`, a hash of each image's index: the same on every machine and seed);
`split.train_examples` keeps exactly that many of the rest as a run's labelled training set
(`sslcore.splits.stratified_subset`: stratified, fixed per run seed -- the same images in both arms --
and nested: a seed's smaller budget lies inside its larger one). `grid.learning_rates` (and warm-up,
steps) selects each arm's setting on validation, the BERT GLUE protocol (`sslcore.finetune`).
The frozen-feature probes (kNN, linear) are in `visionssl.probe`;
`benchmarks/vision_pretrain_vs_scratch.py` runs all three.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from sslcore import config as cfg
from sslcore.errors import MissingPathError
from sslcore.finetune import (EarlyStopping, EarlyStoppingConfig, FinetuneResult, FinetuneTrainConfig, GridConfig,
                              select_on_validation)
from sslcore.finetune_runs import (EarlyStoppingObjective, build_run_config, check_seeds, finetune_keywords,
                                   finished_run, per_seed_scores, quiet_load_report, run_fingerprint, save_result,
                                   seed_config, seed_run_dir, train_with_early_stopping, with_setting, write_scores)
from sslcore.hub import write_model_card
from sslcore.metrics import compute_metrics
from sslcore.objective import LossContext, Ratio
from sslcore.registry import register_objective
from sslcore.run_config import RunConfig
from sslcore.splits import split_digest, stratified_split, stratified_subset
from visionssl.data import (NO_LABEL, ImageDataConfig, ImageDataError, ImageTensors, describe_source,
                            load_image_tensors)
from visionssl.views import ViewConfig, apply_views, collate_views, plain_view, view_params

logger = logging.getLogger(__name__)

PROTOCOL_NAMES = {"full": "full fine-tuning"}
METRICS = ["accuracy", "f1"]
"""Scored on validation and test (f1 is macro-averaged over classes)."""


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class VisionModelConfig:
    """The backbone to fine-tune and how to start it."""

    path: str = "runs/simclr_tiny/model"
    """An exported backbone folder (a pretraining run's output_dir/model: `ResNetModel`/`ViTModel` + its image
    processor) or any stock transformers image-model folder with a preprocessor_config.json."""
    init: Literal["pretrained", "random"] = "pretrained"
    """pretrained = the weights at `path`; random = the same config with fresh weights and the same image
    processor (the scratch arm)."""


@dataclass
class ImageSplitConfig:
    """How the labelled images are split (fixed: the same for every seed and both arms)."""

    validation_fraction: float = 0.1
    """Share of the source's training split held out (stratified) for early stopping."""
    train_examples: int | None = None
    """Labelled training images per run (exactly this many: a stratified subset of the rest, fixed per run seed,
    smaller budgets nested in larger ones); None = all. Pretraining pays most when labels are few."""
    test_examples: int | None = None
    """Test images scored (a fixed seeded subset of the source's test split); None = all."""
    seed: int = 0
    """Seed of the validation split and the test subset (the same for every run; the labelled subset follows
    each run's seed)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.validation_fraction < 1.0:
            raise cfg.ConfigError(f"split.validation_fraction must be in (0, 1), got {self.validation_fraction}")
        for name in ("train_examples", "test_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise cfg.ConfigError(f"split.{name} must be >= 1 or null (all), got {value}")


def light_augmentation() -> ViewConfig:
    """Fine-tuning's augmentation: a mild random-resized crop, no flip (it changes digits and letters), no
    colour changes."""
    return ViewConfig(crop_scale_min=0.7, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)


@dataclass
class VisionFinetuneTrainConfig(FinetuneTrainConfig):
    """The fine-tuning trainer options, with vision's defaults."""

    output_dir: str = "runs/vision_finetune"
    """Parent folder of the runs: one `full-<init>-seed<N>/` per seed, and the result JSON."""
    max_steps: int = 600
    """Optimizer steps per run at most (early stopping may end it sooner): the budget both arms share."""
    per_device_batch_size: int = 128
    """Images per micro-batch."""
    learning_rate: float = 1e-3
    """Peak learning rate of AdamW (small ResNets from scratch want ~1e-3; both arms get the same)."""
    weight_decay: float = 1e-4
    """AdamW decoupled weight decay (not on biases and norms)."""
    lr_schedule: Literal["linear", "cosine", "constant", "inverse_sqrt"] = "cosine"
    """Decay after warm-up."""
    eval_every: int = 50
    """Score validation (and apply early stopping) every N steps."""
    eval_batches: int | None = 4
    """Eval-loss batches per evaluation (the early-stopping scores always cover the whole validation split)."""
    log_every: int = 25
    """Log loss and throughput every N steps."""


@dataclass
class VisionFinetuneConfig(RunConfig):
    """Fine-tune a vision backbone on labelled images over several seeds."""

    objective: str = "image_classification"
    """Registered objective name."""
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    """The labelled images (fashion-mnist, mnist, digits, hf:NAME, or a folder with class sub-folders)."""
    split: ImageSplitConfig = field(default_factory=ImageSplitConfig)
    """Validation share, label budget, test subset."""
    model: VisionModelConfig = field(default_factory=VisionModelConfig)
    """Backbone checkpoint and initialisation."""
    augment: ViewConfig = field(default_factory=light_augmentation)
    """Training augmentation (drawn from each example's seed); validation and test images are only resized."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """One run per seed (head init, data order, augmentation; the scratch arm's whole init); mean ± std reported."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Validation-based model selection (evaluations every train.eval_every steps)."""
    grid: GridConfig = field(default_factory=GridConfig)
    """Settings tried per arm (learning rates, warm-up, steps); the best mean validation score over the seeds is
    kept and only its models are scored on test. Empty = train's values alone."""
    keep_checkpoints: bool = False
    """Keep each run's training checkpoints; the exported best model is always kept."""
    train: VisionFinetuneTrainConfig = field(default_factory=VisionFinetuneTrainConfig)
    """Trainer options; `seed` and `output_dir` are set per run."""


@dataclass
class VisionFinetuneResult(FinetuneResult):
    """`sslcore.finetune.FinetuneResult` with vision's protocol names."""

    PROTOCOL_NAMES = PROTOCOL_NAMES
    split_digests: dict[str, str] = field(default_factory=dict)
    """Short hash of each split's image indices: equal digests = the same images."""


# --------------------------------------------------------------------------------------------------
# Labelled images
# --------------------------------------------------------------------------------------------------


@dataclass
class ImageTask:
    """Labelled train/validation/test images of one source, split as `ImageSplitConfig` says."""

    name: str
    splits: dict[str, ImageTensors]
    label_names: list[str]
    description: str
    indices: dict[str, list[int]]
    """Rows of the source's training split in train and validation (the test split is the source's own)."""

    @property
    def digests(self) -> dict[str, str]:
        """Short order-free hash of each split's rows: equal digests = the same images."""
        return {name: split_digest({"id": [str(r) for r in rows]}) for name, rows in self.indices.items()}

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _labelled(part: ImageTensors, source: str, split: str) -> ImageTensors:
    keep = part.labels != NO_LABEL
    if not bool(keep.any()):
        raise ImageDataError(f"{source}: the {split} split has no labels, so there is nothing to fine-tune on; use a "
                             "source with a label column (set data.label_column) or a folder with one sub-folder per "
                             "class")
    if not bool(keep.all()):
        logger.warning("%s: %d %s image(s) without a label are left out of fine-tuning", source,
                       int((~keep).sum()), split)
        return ImageTensors(part.images[keep], part.labels[keep], part.class_names, part.skipped)
    return part


def _rows(part: ImageTensors, rows: list[int]) -> ImageTensors:
    index = torch.tensor(rows, dtype=torch.long)
    return ImageTensors(part.images[index], part.labels[index], part.class_names, part.skipped)


def load_image_task(data: ImageDataConfig, split: ImageSplitConfig, seed: int = 0) -> ImageTask:
    """The source's labelled images as train/validation/test (see the module docstring). `seed` (a run's) picks
    the `split.train_examples` labelled images; validation and test depend on `split.seed` alone."""
    tensors, _ = load_image_tensors(data)
    train, test = _labelled(tensors["train"], data.source, "train"), _labelled(tensors["test"], data.source, "test")
    keys = [str(i) for i in range(len(train))]  # the index in the source's train split: stable across runs
    labels = train.labels.tolist()
    parts = stratified_split(keys, labels, {"validation": split.validation_fraction}, seed=split.seed)
    chosen = parts["train"]
    if not chosen or not parts["validation"]:
        raise ImageDataError(f"{data.source}: {len(train)} labelled training image(s) are too few to hold out a "
                             "validation split and keep some to train on; add images or lower "
                             "split.validation_fraction")
    if split.train_examples is not None and split.train_examples < len(chosen):
        subset = stratified_subset([keys[i] for i in chosen], [labels[i] for i in chosen], split.train_examples,
                                   seed=seed, salt="label-budget")
        chosen = [chosen[i] for i in subset]
    splits = {"train": _rows(train, chosen), "validation": _rows(train, parts["validation"]),
              "test": test.subset(split.test_examples, seed=split.seed)}
    classes = int(max(int(train.labels.max()), int(test.labels.max()))) + 1
    names = list(train.class_names) if train.class_names and len(train.class_names) >= classes \
        else [str(i) for i in range(classes)]
    sizes = {name: len(part) for name, part in splits.items()}
    description = (describe_source(data, {"train": sizes["train"], "test": sizes["test"]})
                   + f" Validation: {sizes['validation']:,} training images held out (stratified, split seed "
                     f"{split.seed}).")
    return ImageTask(name=data.source, splits=splits, label_names=names, description=description,
                     indices={"train": chosen, "validation": parts["validation"]})


# --------------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------------


def load_image_processor(model: VisionModelConfig):
    """The checkpoint's image processor: what users' images go through, so fine-tuning sees the same input
    (size, mean, std) in both arms, and the export hands it on to `pipeline()`."""
    from transformers import AutoImageProcessor

    path = Path(model.path).expanduser()
    if not (path / "config.json").is_file():
        raise MissingPathError(
            f"model.path={model.path!r} is not a model folder (no config.json). Pretrain one with `python "
            "recipes/pretrain.py --config recipes/configs/simclr_tiny.yaml` and use its output_dir/model")
    if not (path / "preprocessor_config.json").is_file():
        raise MissingPathError(
            f"model.path={model.path!r} has no preprocessor_config.json, so the input size and normalisation are "
            "unknown; use a pretraining run's output_dir/model (the export writes one) or save an image processor "
            "there")
    processor = AutoImageProcessor.from_pretrained(str(path))
    size = processor.size  # a dict in older transformers, a SizeDict in newer ones, or an int
    side = size if isinstance(size, int) else next(
        (value for key in ("height", "shortest_edge")
         if (value := (size.get(key) if isinstance(size, dict) else getattr(size, key, None)))), None)
    if not side:
        raise MissingPathError(f"{path}/preprocessor_config.json gives no input size (size={size!r})")
    return processor, int(side)


def build_classifier(model: VisionModelConfig, label_names: list[str]) -> nn.Module:
    """`AutoModelForImageClassification` (ResNetForImageClassification, ViTForImageClassification, ...) from the
    checkpoint with a new linear head, or the same config with fresh weights."""
    from transformers import AutoConfig, AutoModelForImageClassification

    options = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
               "label2id": {name: i for i, name in enumerate(label_names)},
               "problem_type": "single_label_classification"}
    if model.init == "pretrained":
        with quiet_load_report():  # the new head is expected
            return AutoModelForImageClassification.from_pretrained(model.path, **options)
    return AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(model.path, **options))


# --------------------------------------------------------------------------------------------------
# Full fine-tuning: an objective on the shared trainer
# --------------------------------------------------------------------------------------------------


@register_objective
class ImageClassificationObjective(EarlyStoppingObjective):
    """Supervised fine-tuning of a stock image classifier on the shared trainer (accumulation, clipping,
    schedules, checkpoints, multi-process), validation-based early stopping in a trainer callback."""

    name = "image_classification"
    config_class = VisionFinetuneConfig
    unit = "images"
    config: VisionFinetuneConfig

    def __init__(self, config: VisionFinetuneConfig, score_test: bool = True):
        super().__init__(config)
        self.score_test = score_test
        """False: early stopping never scores the test split (model selection scores the chosen setting only)."""

    def prepare(self, accelerator=None) -> None:
        self.processor, self.input_size = load_image_processor(self.config.model)
        self.mean = torch.tensor(self.processor.image_mean, dtype=torch.float32)
        self.std = torch.tensor(self.processor.image_std, dtype=torch.float32)
        self.task = load_image_task(self.config.data, self.config.split, seed=self.config.train.seed)
        metric = self.config.early_stopping.metric or "accuracy"
        self.early_stopping = EarlyStopping(self.config.early_stopping, metric, METRICS, self.score,
                                            task_name=self.task.name, score_test=self.score_test)

    def train_dataset(self) -> ImageTensors:
        return self.task.splits["train"]

    def eval_dataset(self) -> ImageTensors:
        return self.task.splits["validation"]

    def collate(self, examples: list[dict[str, Any]], seeds: list[int]) -> dict[str, torch.Tensor]:
        images = torch.stack([e["image"] for e in examples])
        batch = collate_views(images, seeds, [self.config.augment])
        batch["labels"] = torch.stack([torch.as_tensor(e["label"]) for e in examples])
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["images"])

    def targets(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"loss": len(batch["images"])}

    def build_model(self) -> nn.Module:
        return build_classifier(self.config.model, self.task.label_names)

    def pixels(self, model: nn.Module, images: torch.Tensor, params: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """uint8 images -> the model's input: augmented when `params` are given, else only resized + normalised
        (what the exported image processor does)."""
        channels = model.config.num_channels
        if params is None:
            return plain_view(images, self.input_size, self.mean, self.std, channels)
        return apply_views(images, params, self.input_size, self.mean, self.std, channels)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             ctx: LossContext) -> tuple[torch.Tensor, dict[str, Any]]:
        unwrapped = getattr(model, "module", model)
        x = self.pixels(unwrapped, batch["images"], view_params(batch, 0) if ctx.training else None)
        out = model(pixel_values=x, labels=batch["labels"])
        rows = len(batch["labels"])
        total = ctx.mean("loss", out.loss * rows)  # the model's mean over this batch, as a sum
        return total, {"accuracy": Ratio((out.logits.detach().argmax(-1) == batch["labels"]).sum(), rows)}

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted class of every image (eval mode, no augmentation), on CPU."""
        was_training = model.training
        model.eval()
        unwrapped = getattr(model, "module", model)
        device = next(model.parameters()).device
        out = [model(pixel_values=self.pixels(unwrapped, images[i: i + batch_size].to(device), None)).logits
               .argmax(-1).cpu() for i in range(0, len(images), batch_size)]
        model.train(was_training)
        return torch.cat(out)

    def score(self, model: nn.Module, split: str, accelerator=None) -> dict[str, float]:
        """Accuracy and macro-F1 of `model` on one split (every process scores the whole split: they are small)."""
        data = self.task.splits[split]
        return compute_metrics(METRICS, self.predict(model, data.images).numpy(), data.labels.numpy())

    def export(self, model: nn.Module, out_dir: Path, summary: dict[str, Any]) -> Path:
        """The best validation weights as a stock transformers folder (model + the checkpoint's image processor)
        that `pipeline("image-classification")` loads, with a model card."""
        out_dir = Path(out_dir)
        metrics = self.save_best(model, out_dir, summary)
        self.processor.save_pretrained(out_dir)
        stopper = self.early_stopping
        write_model_card(
            out_dir, model_name=f"{Path(self.config.model.path).name}-{Path(self.task.name).name}",
            summary=f"{type(model).__name__} ({self.started_from} `{self.config.model.path}`) fine-tuned on "
                    f"{self.task.name} (all "
                    f"weights, {len(self.task.splits['train']):,} labelled training images, best validation "
                    f"{stopper.metric if stopper else ''} kept).",
            config=cfg.to_dict(self.config), training_data=self.task.description, metrics=metrics,
            pipeline_tag="image-classification", tags=["image-classification", "vision", Path(self.task.name).name],
            usage=f'from transformers import pipeline\nclassify = pipeline("image-classification", model="{out_dir}")\n'
                  'print(classify(image))  # a PIL image, a path or a URL')
        return out_dir


# --------------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------------


def build_vision_finetune_config(config: VisionFinetuneConfig | str | Path | None = None,
                                 overrides: dict[str, Any] | list[str] | None = None) -> VisionFinetuneConfig:
    """Defaults, then a YAML preset (or a config object), then overrides (CLI list or nested dict)."""
    return build_run_config(VisionFinetuneConfig, config, overrides)


def run_one(config: VisionFinetuneConfig, seed: int, setting: dict[str, Any] | None = None,
            score_test: bool = True, tolerate_failure: bool = False) -> dict[str, Any]:
    """One seed (of one grid setting) fine-tuned in `<output_dir>/full-<init>[-labels<N>][-<setting>]-seed<N>`: its
    best validation scores, the test scores of its best weights (unless `score_test` is off: model selection
    scores only the chosen setting), steps, seconds and model folder. `tolerate_failure` (a grid search): a
    non-finite loss is recorded as a failed run (never chosen) instead of ending the search."""
    run_dir = seed_run_dir(config.train.output_dir, "full", config.model.init, config.split.train_examples, seed,
                           setting)
    run_config = with_setting(config, setting or {})
    finished = finished_run(run_config, seed, run_dir)  # an interrupted benchmark's finished seed
    if finished is not None and (finished.get("test") is not None or not score_test):
        return finished
    objective = ImageClassificationObjective(seed_config(run_config, seed, run_dir), score_test=score_test)
    started = time.perf_counter()
    run = train_with_early_stopping(objective, run_dir, config.keep_checkpoints, tolerate_failure=tolerate_failure)
    run["seconds"] = round(time.perf_counter() - started, 1)
    if not run.get("failed"):
        run["digests"] = objective.task.digests
        run["task"] = {"name": objective.task.name, "description": objective.task.description,
                       "sizes": {name: len(part) for name, part in objective.task.splits.items()}}
        run["config"] = run_fingerprint(run_config, seed)
        write_scores(run_dir, run)
    return run


def score_export(config: VisionFinetuneConfig, model_dir: str, split: str = "test") -> dict[str, float]:
    """Scores of an exported fine-tuned model on one split of the task `config` describes."""
    from transformers import AutoModelForImageClassification

    objective = ImageClassificationObjective(config)
    objective.prepare()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return objective.score(AutoModelForImageClassification.from_pretrained(model_dir).to(device), split)


def finetune(model: str | None = None, source: str | None = None, seeds: list[int] | None = None, *,
             init: Literal["pretrained", "random"] | None = None, train_examples: int | None = None,
             learning_rates: list[float] | None = None, output_dir: str | None = None,
             config: VisionFinetuneConfig | str | Path | None = None,
             overrides: dict[str, Any] | list[str] | None = None) -> VisionFinetuneResult:
    """Fine-tune `model` on the labelled images of `source` once per seed; test scores as mean ± std.

    `config` (a VisionFinetuneConfig or a YAML preset) and `overrides` set everything else; the keyword
    arguments win over both. Each seed's run lives in `<train.output_dir>/full-<init>[-labels<N>]-seed<N>/` with
    its `scores.json`. With
    a grid (`learning_rates` / `grid.learning_rates`), every setting is trained per seed, the one with the
    best mean validation score is kept and only its models are scored on test (`result.selection`); the
    kept models' cards gain the scores over seeds.
    """
    keywords = finetune_keywords(model=model, init=init, seeds=seeds, output_dir=output_dir,
                                 data=None if source is None else {"source": source},
                                 split=None if train_examples is None else {"train_examples": train_examples},
                                 grid=None if learning_rates is None else {"learning_rates": list(learning_rates)})
    config = build_run_config(VisionFinetuneConfig, config, overrides, keywords)
    check_seeds(config.seeds)
    load_image_processor(config.model)  # a wrong path fails here, before any data is built
    metric = config.early_stopping.metric or "accuracy"
    searching = config.grid.searches
    every_run: list[dict[str, Any]] = []  # the grid's runs too: the arm's cost includes its search

    def train(setting: dict[str, Any], seed: int) -> dict[str, Any]:
        run = run_one(config, seed, setting, score_test=not searching, tolerate_failure=searching)
        every_run.append(run)
        return run

    def score_test(setting: dict[str, Any], seed: int, run: dict[str, Any]) -> dict[str, float]:
        test = score_export(with_setting(config, setting), run["model_dir"])
        write_scores(seed_run_dir(config.train.output_dir, "full", config.model.init, config.split.train_examples,
                                  seed, setting), {**run, "test": test})
        return test

    selection, runs = select_on_validation(config.grid.settings(), config.seeds, train, score_test, metric)
    result = VisionFinetuneResult(
        task=runs[0]["task"]["name"], protocol="full", model=config.model.path, init=config.model.init,
        seeds=list(config.seeds), main_metric=metric, **per_seed_scores(runs, METRICS),
        output_dir=config.train.output_dir, dataset_id=config.data.source,
        seconds=sum(r["seconds"] for r in every_run), task_type="image-classification", selection=selection,
        label_budget=config.split.train_examples, train_examples=[r["task"]["sizes"]["train"] for r in runs],
        split_digests=runs[0]["digests"])
    save_result(result)
    return result


__all__ = ["ImageClassificationObjective", "ImageSplitConfig", "ImageTask", "VisionFinetuneConfig",
           "VisionFinetuneResult", "VisionFinetuneTrainConfig", "VisionModelConfig", "build_classifier",
           "build_vision_finetune_config", "finetune", "load_image_processor", "load_image_task", "run_one",
           "score_export"]
