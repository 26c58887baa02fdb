"""What every modality's fine-tuning shares: early stopping on validation, the per-seed result, and the
downstream scores written into model cards.

- `EarlyStopping`: a trainer callback that scores validation every `train.eval_every` steps, keeps
  the best weights (on CPU), stops after `patience` evaluations without improvement, and scores the
  test split with the best weights at the last evaluation. What "score" means is the modality's: it
  passes a `score(model, split, accelerator) -> {metric: value}` function. Error rates (CER, WER)
  improve downwards: name them in `lower_is_better`.
- `FinetuneResult`: one (model, task, protocol) over seeds -- the arm `sslcore.compare` compares.
- `add_scores_to_model_card`: model-index metadata and a "Downstream results" table in README.md.

`textssl.finetune` and `speechssl.finetune` build on these.
"""

from __future__ import annotations

import copy
import logging
import re
import statistics
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from sslcore.errors import MissingPathError
from sslcore.run_config import TrainConfig

logger = logging.getLogger(__name__)

Scorer = Callable[[nn.Module, str, Any], dict[str, float]]
"""`score(model, split name, accelerator or None)` -> {metric: value} on that split."""


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """The shared trainer's options with fine-tuning defaults (short runs, frequent validation)."""

    output_dir: str = "runs/finetune"
    """Parent folder of the runs: one `<protocol>-<init>-seed<N>/` per seed (under the task for speech), and
    the result JSON."""
    max_steps: int = 1000
    """Optimizer steps per run at most (early stopping may end it sooner): the budget both arms share."""
    learning_rate: float = 1e-4
    """Peak learning rate of AdamW."""
    warmup_ratio: float = 0.1
    """Warm-up as a fraction of max_steps."""
    eval_every: int = 100
    """Score validation (and apply early stopping) every N steps."""
    eval_batches: int | None = None
    """Eval-loss batches per evaluation; None = the whole validation split."""
    log_every: int = 50
    """Log loss and throughput every N steps."""
    keep_checkpoints: int = 1
    """Checkpoints kept while a run trains (removed at the end unless `keep_checkpoints` is set above)."""
    report_to: list[str] = field(default_factory=list)
    """Accelerate trackers; none by default (many short runs)."""


@dataclass
class EarlyStoppingConfig:
    """Model selection during full fine-tuning (evaluations happen every `train.eval_every` steps)."""

    metric: str | None = None
    """Validation metric to select on; None = the task's main metric. Error rates (cer, wer) count as
    better when lower, every other metric when higher."""
    patience: int = 5
    """Stop after this many evaluations without improvement; 0 = never stop early (still keep the best)."""
    min_delta: float = 0.0
    """An improvement smaller than this does not reset the patience."""


class EarlyStopping:
    """Trainer callback: score validation, keep the best weights (on CPU), stop after `patience` misses."""

    def __init__(self, options: EarlyStoppingConfig, metric: str, metrics: Collection[str], score: Scorer,
                 task_name: str = "", lower_is_better: Collection[str] = ()):
        if metric not in metrics:
            raise ValueError(f"early_stopping.metric={metric!r} is not computed for task {task_name!r}; choose one "
                             f"of {list(metrics)}")
        self.options, self.metric, self.score = options, metric, score
        self.lower = metric in lower_is_better
        self.best: dict[str, float] | None = None
        self.best_step = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.misses = 0
        self.test: dict[str, float] | None = None
        """Test scores of the best weights, computed at the last evaluation of the run."""

    def improves(self, value: float) -> bool:
        if self.best is None:
            return True
        best = self.best[self.metric]
        return value < best - self.options.min_delta if self.lower else value > best + self.options.min_delta

    def __call__(self, trainer, step: int) -> dict[str, float]:
        scores = self.score(trainer.model, "validation", trainer.accelerator)
        if self.improves(scores[self.metric]):
            self.best, self.best_step, self.misses = scores, step, 0
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in unwrapped.state_dict().items()}
        else:
            self.misses += 1
            if self.options.patience and self.misses >= self.options.patience:
                logger.info("early stopping at step %d: validation %s has not improved on %.4f (step %d) for %d "
                            "evaluations", step, self.metric, self.best[self.metric], self.best_step, self.misses)
                trainer.should_stop = True
        if trainer.should_stop or step >= trainer.args.max_steps:
            self.test = self._score_test(trainer)
        return {**{f"eval_{k}": v for k, v in scores.items()}, f"eval_best_{self.metric}": self.best[self.metric]}

    def _score_test(self, trainer) -> dict[str, float]:
        """Test scores of the best weights. Runs inside the last evaluation, while the trainer's process
        group still exists (its end of training tears it down), on a copy: the model being trained, and
        so its final checkpoint, keep their own weights."""
        best = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model))
        self.restore_best(best)
        return self.score(best, "test", trainer.accelerator)

    def restore_best(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        """Best scores, step, weights and patience count: a resumed run must keep the best weights it had
        seen and stop when the uninterrupted run would."""
        if self.best is None:
            return {}
        return {"best": self.best, "best_step": self.best_step, "misses": self.misses, "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.best, self.best_step = dict(state["best"]), int(state["best_step"])
            self.misses, self.best_state = int(state["misses"]), dict(state["best_state"])


@dataclass
class FinetuneResult:
    """Scores of one (model, task, protocol) over seeds, and where each fine-tuned model is."""

    PROTOCOL_NAMES: ClassVar[Mapping[str, str]] = {}
    """Protocol -> the words shown in summaries and cards (each modality's subclass sets its own)."""

    task: str
    protocol: str
    model: str
    init: str
    seeds: list[int]
    main_metric: str
    test: dict[str, list[float]]
    """Metric -> test score of each seed (in `seeds` order)."""
    validation: dict[str, list[float]]
    """Metric -> best validation score of each seed."""
    model_dirs: list[str]
    """Per seed: the fine-tuned model folder (full) or the probe head folder (probe)."""
    steps: list[int]
    """Optimizer steps each run took (early stopping may end it before max_steps)."""
    output_dir: str
    dataset_id: str = ""
    seconds: float = 0.0
    """Wall time of the runs, summed over seeds (as measured when each ran; reused runs count too)."""
    task_type: str = "text-classification"
    """Hub task type for model-index metadata (automatic-speech-recognition, audio-classification...)."""
    lower_is_better: bool = False
    """The main metric is an error rate: a lower score is better (sslcore.compare flips its verdict)."""

    def protocol_name(self) -> str:
        return self.PROTOCOL_NAMES.get(self.protocol, self.protocol)

    def mean(self, metric: str | None = None) -> float:
        return statistics.fmean(self.test[metric or self.main_metric])

    def std(self, metric: str | None = None) -> float:
        """Sample standard deviation over seeds (0 for a single seed)."""
        values = self.test[metric or self.main_metric]
        return statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def scores(self) -> dict[str, float]:
        """Metric -> mean test score over seeds."""
        return {metric: self.mean(metric) for metric in self.test}

    @property
    def best_model_dir(self) -> str:
        """The run with the best validation score on the main metric."""
        values = self.validation[self.main_metric]
        pick = min if self.lower_is_better else max
        return self.model_dirs[pick(range(len(values)), key=values.__getitem__)]

    def summary(self) -> str:
        shown = ", ".join(f"{m} {self.mean(m):.4f} ± {self.std(m):.4f}" for m in self.test)
        return (f"{self.task} | {self.protocol_name()} | {self.init} {self.model} | test {shown} "
                f"over {len(self.seeds)} seed(s)")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": self.scores, "std": {m: self.std(m) for m in self.test}}


# --------------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------------

_RESULTS_SECTION = re.compile(r"\n## Downstream results\n.*?(?=\n## |\Z)", re.DOTALL)


def eval_results_for(result: FinetuneResult) -> list[dict[str, Any]]:
    """model-index entries (huggingface_hub `EvalResult` fields) for a result's mean test scores.

    The protocol goes in the metric's name and `args`: model-index groups results by task and dataset,
    so it cannot live in the task name.
    """
    return [{"task_type": result.task_type, "task_name": result.task, "dataset_type": result.dataset_id or result.task,
             "dataset_name": result.task, "dataset_split": "test", "metric_type": metric,
             "metric_value": round(result.mean(metric), 6),
             "metric_name": f"{metric}, {result.protocol_name()} (mean ± {result.std(metric):.4f} over "
                            f"{len(result.seeds)} seeds)",
             "metric_args": {"protocol": result.protocol, "init": result.init, "seeds": len(result.seeds),
                             "std": round(result.std(metric), 6)}}
            for metric in result.test]


def _card_key(entry) -> tuple:
    return entry.dataset_name, entry.metric_type, (entry.metric_args or {}).get("protocol")


def add_scores_to_model_card(model_dir: str | Path, results: FinetuneResult | list[FinetuneResult]) -> Path:
    """Add downstream test scores to the README.md model card in `model_dir`: model-index metadata (so the
    Hub shows them) and a "Downstream results" table. Results for the same task, protocol and metric replace
    older ones; others are kept."""
    from huggingface_hub import EvalResult, ModelCard

    path = Path(model_dir) / "README.md"
    if not path.is_file():
        raise MissingPathError(f"{path} does not exist; add scores to an exported model folder (output_dir/model)")
    results = results if isinstance(results, list) else [results]
    card = ModelCard.load(path)
    new = [EvalResult(**entry) for result in results for entry in eval_results_for(result)]
    replaced = {_card_key(entry) for entry in new}
    card.data.eval_results = [e for e in card.data.eval_results or [] if _card_key(e) not in replaced] + new
    if not card.data.model_name:
        card.data.model_name = Path(model_dir).resolve().name
    rows = "\n".join(f"| {e.dataset_name} | {(e.metric_args or {}).get('protocol', '')} | {e.metric_type} | "
                     f"{e.metric_value:.4f} | {(e.metric_args or {}).get('std', '')} | {(e.metric_args or {}).get('seeds', '')} |"
                     for e in card.data.eval_results)
    protocols = "; ".join(f"{key} = {name}" for key, name in
                          {k: v for r in results for k, v in r.PROTOCOL_NAMES.items()}.items())
    section = ("\n## Downstream results\n\nTest split, mean and standard deviation over seeds"
               + (f" ({protocols})" if protocols else "") + ".\n\n"
               f"| task | protocol | metric | mean | std | seeds |\n|---|---|---|---|---|---|\n{rows}\n")
    text = card.text
    card.text = (_RESULTS_SECTION.sub(lambda _: section, text, count=1) if _RESULTS_SECTION.search(text)
                 else text.rstrip("\n") + "\n" + section)
    card.save(path)
    return path


__all__ = ["EarlyStopping", "EarlyStoppingConfig", "FinetuneResult", "Scorer", "add_scores_to_model_card",
           "eval_results_for"]
