"""What every modality's fine-tuning shares: early stopping on validation, the per-seed result, and the
downstream scores written into model cards.

- `EarlyStopping`: a trainer callback that scores validation every `train.eval_every` steps, keeps
  the best weights (on CPU), stops after `patience` evaluations without improvement, and scores the
  test split with the best weights at the last evaluation. What "score" means is the modality's: it
  passes a `score(model, split, accelerator) -> {metric: value}` function. Error rates (CER, WER)
  improve downwards: name them in `lower_is_better`.
- `GridConfig`, `Selection`, `select_on_validation`: per-arm model selection, the BERT GLUE protocol:
  every setting of a small grid (learning rates; optionally warm-up and step budgets) is trained once
  per seed, each arm keeps the setting with the best mean validation score over its seeds, and only
  that setting's models are scored on the test split (once per seed).
- `FinetuneResult`: one (model, task, protocol) over seeds -- the arm `sslcore.compare` compares --
  with what its model selection tried and chose, and its label budget.
- `add_scores_to_model_card`: model-index metadata and a "Downstream results" table in README.md.

`textssl.finetune`, `speechssl.finetune` and `visionssl.finetune` build on these (their seed loop through `sslcore.finetune_runs`).
"""

from __future__ import annotations

import copy
import logging
import math
import re
import statistics
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from sslcore.config import ConfigError
from sslcore.errors import MissingPathError, UserError
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
                 task_name: str = "", lower_is_better: Collection[str] = (), score_test: bool = True):
        """`score_test=False`: never touch the test split here; the caller scores the exported best model once
        its setting has been chosen on validation (`select_on_validation`)."""
        if metric not in metrics:
            raise ValueError(f"early_stopping.metric={metric!r} is not computed for task {task_name!r}; choose one "
                             f"of {list(metrics)}")
        self.options, self.metric, self.score, self.score_test = options, metric, score, score_test
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
        if self.score_test and (trainer.should_stop or step >= trainer.args.max_steps):
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
class GridConfig:
    """Per-arm model selection for full fine-tuning, as BERT does for GLUE: every combination of the lists
    below is trained once per seed, each arm (pretrained, scratch) keeps the setting whose mean validation
    score over its seeds is best, and the test split is scored only with that setting (once per seed).
    Pretrained and randomly initialised models want different learning rates; one shared rate favours one
    arm. An empty list = the `train` value alone; every list empty (or of one value) = a single run per seed,
    no search. The probe protocol has its own grid (its L2 strength, chosen on validation per seed)."""

    learning_rates: list[float] = field(default_factory=list)
    """Peak learning rates to try, e.g. [1e-4, 3e-4, 1e-3]; empty = train.learning_rate."""
    warmup_ratios: list[float] = field(default_factory=list)
    """Warm-up fractions of the run to try, e.g. [0.0, 0.1]; empty = train's warm-up."""
    max_steps: list[int] = field(default_factory=list)
    """Step budgets to try (the epochs of the GLUE grid), e.g. [300, 1000]; empty = train.max_steps."""

    def __post_init__(self) -> None:
        for name, values in (("learning_rates", self.learning_rates), ("warmup_ratios", self.warmup_ratios),
                             ("max_steps", self.max_steps)):
            if len(set(values)) != len(values):
                raise ConfigError(f"grid.{name}={values} repeats a value; each value is one setting to try")
        if any(rate < 0 for rate in self.learning_rates):
            raise ConfigError(f"grid.learning_rates={self.learning_rates}: learning rates must be >= 0")
        if any(not 0 <= ratio < 1 for ratio in self.warmup_ratios):
            raise ConfigError(f"grid.warmup_ratios={self.warmup_ratios}: warm-up ratios must be in [0, 1)")
        if any(steps < 1 for steps in self.max_steps):
            raise ConfigError(f"grid.max_steps={self.max_steps}: step budgets must be >= 1")

    @property
    def searches(self) -> bool:
        """Whether there is more than one setting to choose from."""
        return len(self.settings()) > 1

    def settings(self) -> list[dict[str, Any]]:
        """Every combination as `train` overrides ({"learning_rate": 3e-4, "warmup_ratio": 0.1}); [{}] when every
        list is empty (the `train` values alone)."""
        axes = [(key, values) for key, values in (("learning_rate", self.learning_rates),
                                                  ("warmup_ratio", self.warmup_ratios),
                                                  ("max_steps", self.max_steps)) if values]
        combos: list[dict[str, Any]] = [{}]
        for key, values in axes:
            combos = [{**combo, key: value} for combo in combos for value in values]
        return combos


def apply_setting(train: TrainConfig, setting: dict[str, Any]) -> TrainConfig:
    """A copy of the trainer options with one grid setting applied (a warm-up ratio replaces warmup_steps)."""
    train = copy.deepcopy(train)
    for key, value in setting.items():
        setattr(train, key, value)
    if "warmup_ratio" in setting:
        train.warmup_steps = None
    return train


_SHORT_NAMES = {"learning_rate": "lr", "warmup_ratio": "warm-up", "max_steps": "steps", "l2": "l2"}


def format_value(value: Any) -> str:
    """3e-4 as `3e-4`, 0.1 as `0.1`, 750 as `750`: what a grid value looks like in names and tables."""
    if isinstance(value, float) and value != 0 and not 1e-2 <= abs(value) < 1e4:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def setting_text(setting: dict[str, Any], short: bool = False) -> str:
    """`learning_rate=3e-4, warmup_ratio=0.1` (short: `lr 3e-4, warm-up 0.1`); `defaults` for the empty setting."""
    if not setting:
        return "defaults"
    if short:
        return ", ".join(f"{_SHORT_NAMES.get(k, k)} {format_value(v)}" for k, v in setting.items())
    return ", ".join(f"{k}={format_value(v)}" for k, v in setting.items())


def setting_tag(setting: dict[str, Any]) -> str:
    """A folder-name fragment for a setting: `lr3e-4-wu0.1-steps750`; empty for the empty setting."""
    tags = {"learning_rate": "lr", "warmup_ratio": "wu", "max_steps": "steps"}
    return "-".join(f"{tags.get(k, k)}{format_value(v)}" for k, v in setting.items())


def label_budget(text: str) -> int | None:
    """A label budget as given on a command line: `100` -> 100, `all` -> None (the whole training split). As an
    argparse `type`, a bad value reads `invalid label_budget value: 'x'`."""
    if text.strip().lower() == "all":
        return None
    budget = int(text)
    if budget < 1:
        raise ValueError(f"label budget {budget} < 1")
    return budget


class GridFailedError(UserError, RuntimeError):
    """Every setting of a model-selection grid failed (non-finite losses): nothing to choose from."""


@dataclass
class Selection:
    """Model selection of one arm on the validation split: the settings tried and the one kept."""

    metric: str
    """Validation metric selected on."""
    lower_is_better: bool
    """The metric is an error rate (CER, WER)."""
    settings: list[dict[str, Any]]
    """The grid: each setting's values, e.g. {"learning_rate": 3e-4} (the probe: {"l2": 0.01})."""
    validation: list[list[float | None]]
    """Per setting, each seed's best validation score (None: that run failed, e.g. with a non-finite loss)."""
    chosen: list[int]
    """Per seed, the index of the setting kept: one index for every seed when the setting is chosen on the mean
    over seeds (full fine-tuning); each seed its own when selection is per seed (the probe's L2 strength, on
    the seed's own training subset)."""
    scope: Literal["mean over seeds", "per seed"] = "mean over seeds"

    @property
    def searched(self) -> bool:
        return len(self.settings) > 1

    def mean_validation(self) -> list[float | None]:
        """Per setting, the mean validation score over seeds (None where a seed failed or was not scored)."""
        return [None if not row or any(v is None or math.isnan(v) for v in row) else statistics.fmean(row)
                for row in self.validation]

    def chosen_settings(self) -> list[dict[str, Any]]:
        return [self.settings[index] for index in self.chosen]

    def short(self) -> str:
        """What was kept, for a table cell: `lr 3e-4`, or for per-seed choices `l2 0.01 (x2), 0.1`."""
        counts: dict[int, int] = {}
        for index in self.chosen:
            counts[index] = counts.get(index, 0) + 1
        return ", ".join(setting_text(self.settings[i], short=True) + (f" (x{n})" if n > 1 and len(counts) > 1 else "")
                         for i, n in counts.items())

    def describe(self) -> str:
        """`learning_rate=3e-4 (validation accuracy, mean over 3 seeds: 1e-4 0.790, [3e-4 0.812], 1e-3 failed)`."""
        if self.scope == "per seed":
            return (f"chosen per seed on validation {self.metric}: "
                    + ", ".join(setting_text(s) for s in self.chosen_settings()))
        means = self.mean_validation()
        tried = ", ".join(
            ("[" if i in self.chosen else "") + setting_text(setting, short=True) + " "
            + ("failed" if mean is None else f"{mean:.4f}") + ("]" if i in self.chosen else "")
            for i, (setting, mean) in enumerate(zip(self.settings, means)))
        return (f"{setting_text(self.settings[self.chosen[0]])} (validation {self.metric}, mean over "
                f"{len(self.chosen)} seed(s): {tried})")


def select_on_validation(settings: Sequence[dict[str, Any]], seeds: Sequence[int],
                         train: Callable[[dict[str, Any], int], dict[str, Any]],
                         score_test: Callable[[dict[str, Any], int, dict[str, Any]], dict[str, float]],
                         metric: str, lower_is_better: bool = False) -> tuple[Selection, list[dict[str, Any]]]:
    """The GLUE protocol for one arm. `train(setting, seed)` runs one setting on one seed and returns its run
    (a dict with the best "validation" scores, or "failed" with the reason); the setting with the best mean
    validation `metric` over the seeds is kept (the first of equals; one with a failed seed is never kept);
    then `score_test(setting, seed, run)` scores the test split of that setting's runs only, unless a run
    already holds its "test" scores (a finished run reused). Returns the selection and the chosen runs in
    seed order, each with its "test" scores."""
    runs = [[train(setting, seed) for seed in seeds] for setting in settings]
    validation = [[None if run.get("failed") else run["validation"].get(metric) for run in row] for row in runs]
    selection = Selection(metric=metric, lower_is_better=lower_is_better, settings=[dict(s) for s in settings],
                          validation=validation, chosen=[])
    means = selection.mean_validation()
    usable = [i for i, mean in enumerate(means) if mean is not None]
    if not usable:
        reasons = "; ".join(f"{setting_text(s)}: {next((r['failed'] for r in row if r.get('failed')), 'not scored')}"
                            for s, row in zip(settings, runs))
        raise GridFailedError(f"every setting of the grid failed ({reasons}); try lower grid.learning_rates or "
                              "more warm-up")
    sign = 1.0 if lower_is_better else -1.0
    best = min(usable, key=lambda i: (sign * means[i], i))
    selection.chosen = [best] * len(seeds)
    chosen_runs = []
    for seed, run in zip(seeds, runs[best]):
        if run.get("test") is None:
            run = {**run, "test": score_test(settings[best], seed, run)}
        chosen_runs.append(run)
    if selection.searched:
        logger.info("model selection: %s", selection.describe())
    return selection, chosen_runs


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
    selection: Selection | None = None
    """What model selection tried on validation and what it kept (the scores above are the kept setting's)."""
    label_budget: int | None = None
    """Labelled training examples per seed (a stratified subset of the training split, fixed per seed and
    nested across budgets); None = the whole training split."""
    train_examples: list[int] = field(default_factory=list)
    """Training examples each seed learned from (in `seeds` order)."""

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

    def labels_text(self) -> str:
        """`100 labels` or `all labels`: how much of the training split each seed learned from."""
        return "all labels" if self.label_budget is None else f"{self.label_budget} labels"

    def summary(self) -> str:
        shown = ", ".join(f"{m} {self.mean(m):.4f} ± {self.std(m):.4f}" for m in self.test)
        budget = "" if self.label_budget is None else f" | {self.labels_text()}"
        chosen = f" | chosen on validation: {self.selection.describe()}" if self.selection and self.selection.searched else ""
        return (f"{self.task} | {self.protocol_name()}{budget} | {self.init} {self.model} | test {shown} "
                f"over {len(self.seeds)} seed(s){chosen}")

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
    budget = "" if result.label_budget is None else f", {result.labels_text()}"
    selection = result.selection
    chosen = {"selected": selection.short(), "grid": [setting_text(s) for s in selection.settings]} \
        if selection is not None and selection.searched else {}
    labels = {} if result.label_budget is None else {"labels": result.label_budget}
    return [{"task_type": result.task_type, "task_name": result.task, "dataset_type": result.dataset_id or result.task,
             "dataset_name": result.task, "dataset_split": "test", "metric_type": metric,
             "metric_value": round(result.mean(metric), 6),
             "metric_name": f"{metric}, {result.protocol_name()}{budget} (mean ± {result.std(metric):.4f} over "
                            f"{len(result.seeds)} seeds)",
             "metric_args": {"protocol": result.protocol, "init": result.init, "seeds": len(result.seeds),
                             "std": round(result.std(metric), 6), **labels, **chosen}}
            for metric in result.test]


def _card_key(entry) -> tuple:
    args = entry.metric_args or {}
    return entry.dataset_name, entry.metric_type, args.get("protocol"), args.get("labels")


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
                     f"{e.metric_value:.4f} | {(e.metric_args or {}).get('std', '')} | {(e.metric_args or {}).get('seeds', '')} | "
                     f"{(e.metric_args or {}).get('labels', 'all')} | {(e.metric_args or {}).get('selected', '')} |"
                     for e in card.data.eval_results)
    protocols = "; ".join(f"{key} = {name}" for key, name in
                          {k: v for r in results for k, v in r.PROTOCOL_NAMES.items()}.items())
    grids = sorted({f"{e.dataset_name}, {(e.metric_args or {}).get('protocol')}: {', '.join(e.metric_args['grid'])}"
                    for e in card.data.eval_results if (e.metric_args or {}).get("grid")})
    grid_note = (" Settings chosen on the validation split, from the grids: " + "; ".join(grids) + "."
                 if grids else "")
    section = ("\n## Downstream results\n\nTest split, mean and standard deviation over seeds"
               + (f" ({protocols})" if protocols else "") + "; labels = labelled training examples per seed." + grid_note
               + "\n\n| task | protocol | metric | mean | std | seeds | labels | selected on validation |\n"
               f"|---|---|---|---|---|---|---|---|\n{rows}\n")
    text = card.text
    card.text = (_RESULTS_SECTION.sub(lambda _: section, text, count=1) if _RESULTS_SECTION.search(text)
                 else text.rstrip("\n") + "\n" + section)
    card.save(path)
    return path


__all__ = ["EarlyStopping", "EarlyStoppingConfig", "FinetuneResult", "GridConfig", "GridFailedError", "Scorer",
           "Selection", "add_scores_to_model_card", "apply_setting", "eval_results_for", "format_value", "label_budget",
           "select_on_validation", "setting_tag", "setting_text"]
