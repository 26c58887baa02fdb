"""Fine-tune and score a pretrained encoder on a labelled task: did pretraining pay off?

    import textssl
    result = textssl.finetune(model="runs/bert_mlm_tiny/model", task="movie-sentiment", seeds=[0, 1, 2])
    print(result.summary())          # accuracy 0.71 ± 0.01 over 3 seeds ...
    result.model_dirs[0]             # a stock AutoModelForSequenceClassification folder

Two protocols, each run once per seed (mean ± std reported):

- ``full``: `AutoModelForSequenceClassification` from the checkpoint, every weight trained by the
  shared `sslcore.trainer.Trainer` through the `sequence_classification` objective; validation
  metrics after every `train.eval_every` steps, the best weights kept, early stopping on the
  task's main metric; the test split is scored once, with the best weights.
- model selection per arm (`grid.learning_rates: [1e-4, 3e-4, 1e-3]`, optionally `grid.warmup_ratios`,
  `grid.max_steps`): the full protocol trains every setting once per seed, keeps the setting with the
  best mean validation score, and scores the test split only with that setting's models -- the BERT
  GLUE protocol, run for each arm on its own (`sslcore.finetune.select_on_validation`).
- ``probe``: the encoder frozen; mean-pooled (or [CLS]) hidden states of one layer feed an L2-regularised
  logistic regression (ridge for regression tasks) fitted by L-BFGS, its strength chosen on
  validation. Cheap, and the honest measure of what the representation holds. Each seed fits on its
  own random `probe.train_fraction` of the training split, so the seeds vary something real in the
  pretrained arm too (its features do not depend on the seed) and the spread over seeds means something.

`model.init: random` builds the same architecture with fresh weights (the scratch baseline) and
keeps the checkpoint's tokenizer, so both arms see the same input.

`label_budget: 100` trains each seed on a stratified subset of 100 training examples, fixed per seed and
nested (a seed's 100 are among its 300): the points of a label-budget curve (`benchmarks/downstream.py
--labels 100 300 1000 all`). Validation and test stay whole.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from sslcore import config as cfg
from sslcore.errors import MissingPathError
from sslcore.finetune import (EarlyStopping, EarlyStoppingConfig, FinetuneTrainConfig, GridConfig, Selection,
                              add_scores_to_model_card, eval_results_for, select_on_validation)
from sslcore.finetune import FinetuneResult as SharedFinetuneResult
from sslcore.finetune_runs import (EarlyStoppingObjective, build_run_config, check_seeds, finetune_keywords,
                                   finished_run, launch_state, per_seed_scores, quiet_load_report, run_fingerprint,
                                   save_result, seed_config, seed_run_dir, train_with_early_stopping, with_setting,
                                   write_scores)
from sslcore.objective import LossContext, Ratio
from sslcore.registry import register_objective
from sslcore.run_config import RunConfig
from sslcore.splits import stratified_subset
from sslcore.metrics import compute_metrics
from textssl.tasks import Task, TaskConfig, load_task

logger = logging.getLogger(__name__)

Protocol = Literal["full", "probe"]
PROTOCOL_NAMES = {"full": "full fine-tuning", "probe": "linear probe (frozen encoder)"}


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class FinetuneModelConfig:
    """The encoder to fine-tune and how to start it."""

    path: str = "runs/bert_mlm_tiny/model"
    """Pretrained model folder (an exported `output_dir/model`) or Hub id; its tokenizer is used too."""
    init: Literal["pretrained", "random"] = "pretrained"
    """pretrained = the weights at `path`; random = the same architecture with fresh weights (the scratch
    baseline, same tokenizer)."""
    max_seq_length: int = 128
    """Longer inputs are truncated to this many tokens."""
    classifier_dropout: float | None = None
    """Dropout before the classification head; None = the model config's."""
    trust_remote_code: bool = False
    """Allow model code from the Hub repo to run. Off: only architectures transformers ships load."""


@dataclass
class ProbeConfig:
    """The frozen-encoder linear probe."""

    pooling: Literal["mean", "cls"] = "mean"
    """mean = average of the non-padding tokens' states; cls = the first token's state."""
    layer: int = -1
    """Hidden layer to read (-1 = last, 0 = embeddings)."""
    l2_grid: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    """L2 strengths tried (on standardised features); the best on validation is kept."""
    max_iter: int = 300
    """L-BFGS iterations per L2 strength."""
    batch_size: int = 128
    """Examples per forward pass when extracting features."""
    train_fraction: float = 0.8
    """Each seed fits the probe on its own stratified random subset of this fraction of the training split
    (the same subset in both arms for the same seed). A pretrained encoder's features do not depend on the
    seed, so without this its seeds would all give the same score and the comparison's spread would come
    from the scratch arm alone. 1.0 = the whole split for every seed."""

    def __post_init__(self) -> None:
        if not 0.0 < self.train_fraction <= 1.0:
            raise cfg.ConfigError(f"probe.train_fraction must be in (0, 1], got {self.train_fraction}")
        if not self.l2_grid or any(l2 < 0 for l2 in self.l2_grid):
            raise cfg.ConfigError(f"probe.l2_grid must hold at least one strength >= 0, got {self.l2_grid}")


@dataclass
class FinetuneConfig(RunConfig):
    """Fine-tune (or probe) an encoder on a labelled task over several seeds."""

    objective: str = "sequence_classification"
    """Registered objective name."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The labelled data (a built-in task, a `datasets` name or local files)."""
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    """Encoder checkpoint and initialisation."""
    protocol: Literal["full", "probe"] = "full"
    """full = train every weight (early stopping on validation); probe = frozen encoder + linear classifier."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """One run per seed (init of new weights, data order, dropout); scores are reported as mean ± std."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Validation-based model selection of the full protocol."""
    grid: GridConfig = field(default_factory=GridConfig)
    """Settings the full protocol tries per arm (learning rates, warm-up, steps); the best mean validation score
    over the seeds is kept and only it is scored on test. Empty = train's values alone."""
    label_budget: int | None = None
    """Labelled training examples per seed: a stratified subset of the training split, fixed per seed and nested
    across budgets (in both protocols; the probe then ignores probe.train_fraction). None = the whole split."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """Options of the probe protocol."""
    keep_checkpoints: bool = False
    """Keep each run's training checkpoints (for resume); the exported best model is always kept."""
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    """Trainer options; `seed` and `output_dir` are set per run (`<output_dir>/<protocol>-<init>-seed<N>`)."""


# --------------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------------


def check_model_path(model: FinetuneModelConfig) -> None:
    """Fail at once, with the fix, when `model.path` names a local folder that is not there or holds no model
    (a Hub id, `user/name`, is left to transformers)."""
    path = Path(model.path).expanduser()
    looks_local = path.exists() or model.path.startswith((".", "/", "~")) or model.path.count("/") > 1
    if not looks_local:
        return
    if not path.is_dir():
        raise MissingPathError(f"model.path={model.path!r}: no such folder. Point it at an exported model folder (a "
                               "pretraining run's output_dir/model; make one with `accelerate launch recipes/pretrain.py "
                               "--config recipes/configs/bert_mlm_tiny.yaml`) or a Hub id `user/name`")
    if not (path / "config.json").is_file():
        raise MissingPathError(f"model.path={model.path!r} holds no config.json: not an exported model folder. Use a "
                               "pretraining run's output_dir/model (not the run folder or a checkpoint)")


def load_tokenizer(model: FinetuneModelConfig) -> PreTrainedTokenizerBase:
    check_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    except OSError as error:
        raise MissingPathError(
            f"model.path={model.path!r}: no tokenizer could be loaded ({str(error).splitlines()[0][:200]}). Point it at "
            "an exported model folder (a pretraining run's output_dir/model; make one with `accelerate launch "
            "recipes/pretrain.py --config recipes/configs/bert_mlm_tiny.yaml`) or a Hub id (needs the network)"
        ) from error
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers: pad with end-of-text, masked out anyway
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {model.path} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def sequence_limit(model: FinetuneModelConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """`model.max_seq_length`, capped by what the checkpoint's position table and tokenizer allow."""
    limits = [model.max_seq_length]
    if tokenizer.model_max_length < 1_000_000:  # transformers' "no limit" is a huge sentinel
        limits.append(tokenizer.model_max_length)
    positions = getattr(AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code),
                        "max_position_embeddings", None)
    if positions:
        limits.append(positions)
    if min(limits) < model.max_seq_length:
        logger.info("model.max_seq_length=%d capped to %d by %s", model.max_seq_length, min(limits), model.path)
    return min(limits)


def encode_task(task: Task, tokenizer: PreTrainedTokenizerBase, max_seq_length: int):
    """Tokenized splits (input_ids, attention_mask[, token_type_ids], label); padding is per batch."""
    columns = task.text_columns

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(*[batch[c] for c in columns], truncation=True, max_length=max_seq_length)

    keep = {"label"}
    return task.splits.map(tokenize, batched=True, desc="tokenizing",
                           remove_columns=[c for c in task.splits["train"].column_names if c not in keep])


def _label_config(task: Task) -> dict[str, Any]:
    if task.problem == "regression":
        return {"num_labels": 1, "problem_type": "regression"}
    return {"num_labels": task.num_labels, "problem_type": "single_label_classification",
            "id2label": dict(enumerate(task.label_names)),
            "label2id": {name: i for i, name in enumerate(task.label_names)}}


def build_classifier(model: FinetuneModelConfig, task: Task, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """`AutoModelForSequenceClassification` from the checkpoint, or the same config with fresh weights."""
    options = _label_config(task)
    if model.classifier_dropout is not None:
        options["classifier_dropout"] = model.classifier_dropout
    options["pad_token_id"] = tokenizer.pad_token_id
    if model.init == "pretrained":
        with quiet_load_report():
            return AutoModelForSequenceClassification.from_pretrained(
                model.path, trust_remote_code=model.trust_remote_code, **options)
    config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code, **options)
    return AutoModelForSequenceClassification.from_config(config, trust_remote_code=model.trust_remote_code)


def build_encoder(model: FinetuneModelConfig) -> nn.Module:
    """The bare encoder (`AutoModel`) for the probe: from the checkpoint or freshly initialised."""
    if model.init == "pretrained":
        with quiet_load_report():
            return AutoModel.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    return AutoModel.from_config(config, trust_remote_code=model.trust_remote_code)


def task_scores(task: Task, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics from model outputs (logits or regression values) and reference labels."""
    if task.problem == "regression":
        return compute_metrics(task.metrics, outputs.reshape(-1), labels)
    return compute_metrics(task.metrics, outputs.argmax(-1), labels)


def by_length(dataset) -> tuple[Any, np.ndarray]:
    """The split sorted by token count, and the permutation that restores the original order: batches
    of similar lengths waste little compute on padding (short sentences vary 5-100 tokens)."""
    order = np.argsort([len(ids) for ids in dataset["input_ids"]], kind="stable")
    return dataset.select(order), np.argsort(order)


@torch.no_grad()
def predict(model: nn.Module, dataset, collator, batch_size: int, accelerator=None) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) over a tokenized split in its order, gathered over processes when there are several."""
    dataset, restore = by_length(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False)
    distributed = accelerator is not None and accelerator.num_processes > 1
    if distributed:
        loader = accelerator.prepare(loader)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        targets = batch["labels"]
        if distributed:  # drops the samples Accelerate repeated to even out the last batch
            out, targets = accelerator.gather_for_metrics((out, targets))
        logits.append(out.cpu())
        labels.append(targets.cpu())
    model.train(was_training)
    return torch.cat(logits).numpy()[restore], torch.cat(labels).numpy()[restore]


# --------------------------------------------------------------------------------------------------
# Full fine-tuning: an objective on the shared trainer
# --------------------------------------------------------------------------------------------------


@register_objective
class SequenceClassificationObjective(EarlyStoppingObjective):
    """Supervised fine-tuning of `AutoModelForSequenceClassification` on a task (not a pretext task,
    but the same trainer: accumulation, clipping, schedules, checkpoints and multi-process come free)."""

    name = "sequence_classification"
    config_class = FinetuneConfig
    unit = "samples"
    config: FinetuneConfig

    def prepare(self, accelerator=None) -> None:
        self.task = load_task(self.config.task)
        self.tokenizer = load_tokenizer(self.config.model)
        self.encoded = encode_task(self.task, self.tokenizer, sequence_limit(self.config.model, self.tokenizer))
        if self.config.label_budget is not None:
            self.encoded["train"] = self.encoded["train"].select(
                label_budget_rows(self.task, self.config.label_budget, self.config.train.seed))
        self.collator = DataCollatorWithPadding(self.tokenizer)
        # The test split is scored after model selection, and only for the chosen setting (`finetune`).
        self.early_stopping = EarlyStopping(
            self.config.early_stopping, self.config.early_stopping.metric or self.task.main_metric, self.task.metrics,
            self.score, task_name=self.task.name, score_test=False)

    def score(self, model: nn.Module, split: str, accelerator=None) -> dict[str, float]:
        """The task's metrics of `model` on one encoded split (gathered over processes)."""
        logits, labels = predict(model, self.encoded[split], self.collator, self.config.train.per_device_batch_size,
                                 accelerator)
        return task_scores(self.task, logits, labels)

    def train_dataset(self):
        return self.encoded["train"]

    def eval_dataset(self):
        return self.encoded["validation"]

    def collate(self, examples: list[dict[str, Any]], seeds: list[int]) -> dict[str, torch.Tensor]:
        # Nothing random here: dropout draws from the torch RNG the trainer seeds with train.seed.
        return self.collator(examples)

    def build_model(self) -> nn.Module:
        return build_classifier(self.config.model, self.task, self.tokenizer)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             ctx: LossContext) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(**batch)
        rows = len(batch["labels"])
        total = ctx.mean("loss", out.loss * rows)  # the model's mean over this batch, as a sum
        if self.task.problem == "regression":
            return total, {}
        return total, {"accuracy": Ratio((out.logits.detach().argmax(-1) == batch["labels"]).sum(), rows)}

    def export(self, model: nn.Module, out_dir: Path, summary: dict[str, Any]) -> Path:
        """The best validation weights as a stock transformers folder, with a model card."""
        out_dir = Path(out_dir)
        metrics = self.save_best(model, out_dir, summary)
        self.tokenizer.save_pretrained(out_dir)
        self.write_card(
            model, out_dir, metrics, task_name=self.task.name, detail="all weights",
            training_data=self.task.description, pipeline_tag="text-classification",
            tags=["text-classification", self.task.name],
            usage=f'from transformers import pipeline\nclassify = pipeline("text-classification", model="{out_dir}")\n'
                  f'print(classify("{_example_text(self.task)}"))')
        return out_dir


def _example_text(task: Task) -> str:
    text = task.splits["test"][0]["text"]
    return re.sub(r'["\\]', "", text)[:80]


# --------------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset, collator, probe: ProbeConfig) -> torch.Tensor:
    """Pooled hidden states of `probe.layer` for every example of a tokenized split (float64, on CPU)."""
    encoder.eval()
    device = next(encoder.parameters()).device
    dataset, restore = by_length(dataset.remove_columns("label"))
    pooled = []
    for batch in DataLoader(dataset, batch_size=probe.batch_size, collate_fn=collator):
        batch = {k: v.to(device) for k, v in batch.items()}
        states = encoder(**batch, output_hidden_states=True).hidden_states[probe.layer]
        if probe.pooling == "cls":
            pooled.append(states[:, 0])
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled.append((states * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(pooled).double().cpu()[torch.from_numpy(restore)]


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int,
                            init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: mean cross-entropy + l2/2 ||W||^2, full-batch L-BFGS (deterministic)."""
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype) if init is None else init[0].clone()
    bias = torch.zeros(num_classes, dtype=x.dtype) if init is None else init[1].clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def fit_ridge(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares + l2/2 ||w||^2 per example (closed form), for regression tasks."""
    mean = y.mean()
    gram = x.T @ x / len(x) + l2 * torch.eye(x.shape[1], dtype=x.dtype)
    weight = torch.linalg.solve(gram, x.T @ (y - mean) / len(x))
    return weight.unsqueeze(1), mean.reshape(1)


def probe_features(config: FinetuneConfig, encoded, tokenizer, seed: int) -> dict[str, torch.Tensor]:
    """Frozen-encoder features of every split; the seed matters only to a randomly initialised encoder."""
    set_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = build_encoder(config.model).to(device)
    collator = DataCollatorWithPadding(tokenizer)
    return {name: extract_features(encoder, split, collator, config.probe) for name, split in encoded.items()}


def probe_subset(labels: torch.Tensor, fraction: float, seed: int, stratify: bool = True) -> torch.Tensor:
    """Sorted indices of a seeded random `fraction` of the rows, per class when `stratify` (at least one row of
    each class); every row when `fraction` is 1. The same (labels, fraction, seed) give the same rows."""
    if fraction >= 1.0:
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    groups = [(labels == c).nonzero().squeeze(1) for c in labels.unique()] if stratify else [torch.arange(len(labels))]
    chosen = [rows[torch.randperm(len(rows), generator=generator)[:max(1, round(fraction * len(rows)))]]
              for rows in groups]
    return torch.cat(chosen).sort().values


def label_budget_rows(task: Task, budget: int | None, seed: int) -> list[int]:
    """The training rows a seed learns from under `label_budget`: every row (None), or a stratified subset of
    `budget` rows fixed per seed and nested across budgets (`sslcore.splits.stratified_subset`, keyed by the
    example id, else its text)."""
    train = task.splits["train"]
    if budget is None:
        return list(range(len(train)))
    check_label_budget(task, budget)
    keys = [str(key) for key in train["id" if "id" in train.column_names else "text"]]
    strata = train["label"] if task.problem == "classification" else [0] * len(train)
    return stratified_subset(keys, strata, budget, seed, salt="label-budget")


def check_label_budget(task: Task, budget: int | None) -> None:
    if budget is None:
        return
    size = len(task.splits["train"])
    if budget > size:
        raise cfg.ConfigError(f"label_budget={budget} is more than the {size} training examples of {task.name!r}; "
                              "use a smaller budget, or null (`all`) for the whole split")
    least = task.num_labels if task.problem == "classification" else 2
    if budget < least:
        raise cfg.ConfigError(f"label_budget={budget} is fewer than the {least} examples {task.name!r} needs "
                              f"({'one per class' if task.problem == 'classification' else 'to fit a regression'})")


def run_probe(config: FinetuneConfig, task: Task, encoded, features: dict[str, torch.Tensor], seed: int,
              out_dir: Path) -> dict[str, Any]:
    """Linear model on frozen features, fitted on this seed's subset of the training split (its `label_budget`
    rows, else `probe.train_fraction`), L2 strength chosen on validation; scores and the saved head."""
    labels = {name: torch.tensor(split["label"]) for name, split in encoded.items()}
    if config.label_budget is not None:
        rows = torch.tensor(label_budget_rows(task, config.label_budget, seed))
    else:
        rows = probe_subset(labels["train"], config.probe.train_fraction, seed,
                            stratify=task.problem == "classification")
    features, labels = {**features, "train": features["train"][rows]}, {**labels, "train": labels["train"][rows]}
    # Standardise with train statistics so one L2 grid suits every encoder and layer.
    mean, std = features["train"].mean(0), features["train"].std(0).clamp(min=1e-6)
    features = {name: (x - mean) / std for name, x in features.items()}
    metric = config.early_stopping.metric or task.main_metric
    best: dict[str, Any] | None = None
    previous = None
    tried: dict[str, float] = {}
    for l2 in sorted(config.probe.l2_grid, reverse=True):  # strong to weak, each warm-started from the last
        if task.problem == "regression":
            weight, bias = fit_ridge(features["train"], labels["train"].double(), l2)
        else:
            weight, bias = fit_logistic_regression(features["train"], labels["train"], task.num_labels, l2,
                                                   config.probe.max_iter, init=previous)
            previous = (weight, bias)
        validation = task_scores(task, (features["validation"] @ weight + bias).numpy(), labels["validation"].numpy())
        tried[repr(l2)] = validation[metric]
        if best is None or validation[metric] > best["validation"][metric]:
            best = {"l2": l2, "weight": weight, "bias": bias, "validation": validation}
    assert best is not None
    test = task_scores(task, (features["test"] @ best["weight"] + best["bias"]).numpy(), labels["test"].numpy())
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"weight": best["weight"].T.float().contiguous(), "bias": best["bias"].float(),
               "feature_mean": mean.float(), "feature_std": std.float()}, str(out_dir / "probe_head.safetensors"))
    (out_dir / "probe_head.json").write_text(json.dumps({
        "encoder": config.model.path, "init": config.model.init, "seed": seed, "pooling": config.probe.pooling,
        "layer": config.probe.layer, "l2": best["l2"], "labels": task.label_names, "problem": task.problem,
        "train_rows": len(rows), "train_fraction": config.probe.train_fraction, "label_budget": config.label_budget,
        "usage": "logits = ((pooled_hidden_state - feature_mean) / feature_std) @ weight.T + bias"}, indent=1))
    return {"validation": best["validation"], "test": test, "model_dir": str(out_dir), "l2": best["l2"], "steps": 0,
            "train_rows": len(rows), "l2_validation": tried}


# --------------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------------


class FinetuneResult(SharedFinetuneResult):
    """`sslcore.finetune.FinetuneResult` with the text protocols' names."""

    PROTOCOL_NAMES = PROTOCOL_NAMES


def _run_dir(config: FinetuneConfig, seed: int, setting: dict[str, Any] | None = None) -> Path:
    """`<output_dir>/<protocol>-<init>[-labels<N>][-<grid setting>]-seed<N>`, e.g. `full-random-labels100-lr1e-3-seed0`."""
    return seed_run_dir(config.train.output_dir, config.protocol, config.model.init, config.label_budget, seed, setting)


def _encoded(config: FinetuneConfig, task: Task, cache: dict[str, Any]):
    """The task tokenized once per `finetune` call (the probe's features and the test scoring share it)."""
    if "encoded" not in cache:
        tokenizer = load_tokenizer(config.model)
        cache.update(tokenizer=tokenizer, encoded=encode_task(task, tokenizer, sequence_limit(config.model, tokenizer)))
    return cache["encoded"]


def _score_test(config: FinetuneConfig, task: Task, run: dict[str, Any], run_dir: Path, state: PartialState,
                cache: dict[str, Any]) -> dict[str, float]:
    """Test scores of a chosen run's exported best model: computed once, on the main process (an evaluation of a
    few thousand rows), saved in the run's scores.json (a rerun reuses them) and read by every process."""
    scores_path = run_dir / "scores.json"
    if state.is_main_process:
        objective = SequenceClassificationObjective(config)  # its score(), on the task this call already loaded
        objective.task, objective.encoded = task, _encoded(config, task, cache)
        objective.tokenizer = cache["tokenizer"]
        objective.collator = DataCollatorWithPadding(objective.tokenizer)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with quiet_load_report():
            model = AutoModelForSequenceClassification.from_pretrained(run["model_dir"]).to(device)
        test = objective.score(model, "test")
        scores_path.write_text(json.dumps({**json.loads(scores_path.read_text()), "test": test}, indent=1))
    state.wait_for_everyone()
    return json.loads(scores_path.read_text())["test"]


def _probe_selection(config: FinetuneConfig, runs: list[dict[str, Any]], metric: str) -> Selection:
    """The probe's own model selection: its L2 strength, chosen on validation per seed (each seed fits its own
    training subset), as a `Selection` for the report."""
    grid = sorted(config.probe.l2_grid, reverse=True)  # the order they were tried in
    return Selection(metric=metric, lower_is_better=False, settings=[{"l2": l2} for l2 in grid],
                     validation=[[run.get("l2_validation", {}).get(repr(l2)) for run in runs] for l2 in grid],
                     chosen=[grid.index(run["l2"]) for run in runs], scope="per seed")


def build_finetune_config(config: FinetuneConfig | str | Path | None = None,
                          overrides: dict[str, Any] | list[str] | None = None) -> FinetuneConfig:
    """Defaults, then a YAML preset (or a config object), then overrides (CLI list or nested dict)."""
    return build_run_config(FinetuneConfig, config, overrides)


def finetune(model: str | None = None, task: str | TaskConfig | None = None, protocol: Protocol | None = None,
             seeds: list[int] | None = None, *, init: Literal["pretrained", "random"] | None = None,
             output_dir: str | None = None, config: FinetuneConfig | str | Path | None = None,
             overrides: dict[str, Any] | list[str] | None = None) -> FinetuneResult:
    """Fine-tune `model` on `task` with `protocol` once per seed; test scores as mean ± std.

    `config` (a FinetuneConfig or a YAML preset) and `overrides` (`{"train": {"max_steps": 300}}` or
    `["--train.max_steps", "300"]`) set everything else; the keyword arguments win over both. Each seed's
    run lives in `<train.output_dir>/<protocol>-<init>-seed<N>/` with its `scores.json`; a finished
    run with the same config is reused, not retrained. With a grid (`grid.learning_rates`), every setting is
    trained per seed (`...-lr3e-4-seed<N>/`), the one with the best mean validation score is kept, and only its
    models are scored on test (`result.selection` says what was tried and chosen). The fine-tuned models' cards
    gain their scores.
    """
    task_keys = cfg.to_dict(task) if isinstance(task, TaskConfig) else None if task is None else {"name": task}
    keywords = finetune_keywords(model, init, seeds, output_dir, task=task_keys, protocol=protocol)
    config = build_run_config(FinetuneConfig, config, overrides, keywords)
    check_seeds(config.seeds)
    check_model_path(config.model)
    state = launch_state()  # made now, as the trainer makes it: the probe and the test scoring sync on it
    task_data = load_task(config.task)
    check_label_budget(task_data, config.label_budget)
    metric = config.early_stopping.metric or task_data.main_metric
    if metric not in task_data.metrics:
        raise cfg.ConfigError(f"early_stopping.metric={metric!r} is not computed for task {task_data.name!r}; choose "
                              f"one of {task_data.metrics}")
    cache: dict[str, Any] = {}
    every_run: list[dict[str, Any]] = []  # the grid's runs too: the arm's cost includes its search
    if config.protocol == "probe":
        runs = [_finetune_one(config, task_data, seed, _run_dir(config, seed), state, cache) for seed in config.seeds]
        every_run += runs
        selection = _probe_selection(config, runs, metric)
    else:
        searching = config.grid.searches

        def train(setting: dict[str, Any], seed: int) -> dict[str, Any]:
            run = _finetune_one(with_setting(config, setting), task_data, seed, _run_dir(config, seed, setting),
                                state, cache, tolerate_failure=searching)
            every_run.append(run)
            return run

        def score_test(setting: dict[str, Any], seed: int, run: dict[str, Any]) -> dict[str, float]:
            return _score_test(with_setting(config, setting), task_data, run, _run_dir(config, seed, setting), state,
                               cache)

        selection, runs = select_on_validation(config.grid.settings(), config.seeds, train, score_test, metric)
    all_rows = len(task_data.splits["train"])
    result = FinetuneResult(
        task=task_data.name, protocol=config.protocol, model=config.model.path, init=config.model.init,
        seeds=list(config.seeds), main_metric=metric, **per_seed_scores(runs, task_data.metrics),
        output_dir=config.train.output_dir, dataset_id=task_data.dataset_id,
        seconds=sum(r.get("seconds", 0.0) for r in every_run), selection=selection, label_budget=config.label_budget,
        train_examples=[r.get("train_rows", config.label_budget or all_rows) for r in runs])
    save_result(result, model_cards=config.protocol == "full")
    return result


def _finetune_one(config: FinetuneConfig, task: Task, seed: int, run_dir: Path, state: PartialState,
                  cache: dict[str, Any], tolerate_failure: bool = False) -> dict:
    """One seed of one setting: reuse its finished scores.json when the config matches, else train (or probe)
    and write it. `tolerate_failure` (a grid search): a run whose loss went non-finite is recorded as failed
    (never chosen) instead of ending the search.

    `cache` keeps the tokenized task, and a pretrained encoder's probe features across seeds: they do not
    depend on the seed.
    """
    finished = finished_run(config, seed, run_dir)
    if finished is not None:
        return finished
    scores_path = run_dir / "scores.json"
    started = time.perf_counter()
    run: dict[str, Any] = {}
    if config.protocol == "full":
        # Every process holds the (gathered) scores. The test split is not touched here: only the setting chosen
        # on validation is scored on it (`_score_test`).
        objective = SequenceClassificationObjective(seed_config(config, seed, run_dir))
        run = train_with_early_stopping(objective, run_dir, config.keep_checkpoints, tolerate_failure)
        if not run.get("failed"):
            run["train_rows"] = len(objective.encoded["train"])
    elif state.is_main_process:
        # The probe is cheap and deterministic: one process runs it while the others wait.
        encoded = _encoded(config, task, cache)
        features = cache.get("pretrained") or probe_features(config, encoded, cache["tokenizer"], seed)
        if config.model.init == "pretrained":
            cache["pretrained"] = features
        run = run_probe(config, task, encoded, features, seed, run_dir / "probe")
    if run:  # the probe's other processes hold none: they read the main process's scores.json
        run["seconds"] = round(time.perf_counter() - started, 1)
        run["config"] = run_fingerprint(config, seed)
    write_scores(run_dir, run)
    state.wait_for_everyone()  # the trainer leaves the launcher's process group up: every seed can sync
    return run if run else json.loads(scores_path.read_text())


# --------------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------------

__all__ = ["EarlyStopping", "FinetuneConfig", "FinetuneModelConfig", "FinetuneResult", "ProbeConfig",
           "SequenceClassificationObjective", "add_scores_to_model_card", "build_classifier", "build_encoder",
           "encode_task", "eval_results_for", "extract_features", "finetune", "fit_logistic_regression",
           "fit_ridge", "label_budget_rows", "predict", "probe_features", "run_probe"]
