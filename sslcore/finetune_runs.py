"""The seed loop's pieces that every modality's `finetune(...)` shares: building its config from defaults,
a preset, overrides and keyword arguments; checking the seeds; naming each run's folder; the objective base
whose early stopping is saved with checkpoints and whose export writes the best weights; one full
fine-tuning run on the shared trainer with early stopping on validation; and writing the scores.

    class MyObjective(EarlyStoppingObjective): ...  # prepare() sets self.early_stopping; export() calls
                                                    # save_best (the best weights) and write_card

    keywords = finetune_keywords(model=model, init=init, seeds=seeds, output_dir=output_dir, protocol=protocol)
    config = build_run_config(VisionFinetuneConfig, preset_or_config, overrides, keywords)
    check_seeds(config.seeds)
    run_dir = seed_run_dir(config.train.output_dir, "full", config.model.init, budget, seed, setting)
    objective = MyObjective(seed_config(with_setting(config, setting), seed, run_dir))
    run = train_with_early_stopping(objective, run_dir, keep_checkpoints=False, tolerate_failure=searching)
    run["validation"], run["steps"], run["model_dir"] (run["test"] when early stopping scored it)
    write_scores(run_dir, {**run, "config": run_fingerprint(config, seed)})   # finished_run(...) reuses it
    ...
    result = MyResult(**per_seed_scores(chosen_runs, metrics), ...)
    save_result(result)                # <output_dir>/<protocol>-<init>[-labels<N>]-result.json, model cards

`visionssl.finetune`, `textssl.finetune` and `speechssl.finetune` build on these.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sslcore import config as cfg
from sslcore.finetune import add_scores_to_model_card, apply_setting, setting_tag
from sslcore.objective import Objective
from sslcore.run_config import RunConfig

if TYPE_CHECKING:
    from accelerate import PartialState
    from torch import nn

    from sslcore.finetune import EarlyStopping, FinetuneResult

logger = logging.getLogger(__name__)

C = TypeVar("C", bound=RunConfig)


def finetune_keywords(model: str | Path | None = None, init: str | None = None, seeds: Sequence[int] | None = None,
                      output_dir: str | Path | None = None, **sections: Any) -> dict[str, Any]:
    """The keyword arguments every modality's `finetune(...)` takes, as the nested dict `build_run_config` merges
    last: `model` -> model.path, `init` -> model.init, `seeds`, `output_dir` -> train.output_dir, and each of
    `sections` (protocol="probe", task={"name": ...}) as given. None means "not given" and sets nothing."""
    keywords: dict[str, Any] = {name: value for name, value in sections.items() if value is not None}
    model_keys = {key: value for key, value in (("path", model), ("init", init)) if value is not None}
    if model_keys:
        keywords["model"] = {key: str(value) for key, value in model_keys.items()}
    if seeds is not None:
        keywords["seeds"] = list(seeds)
    if output_dir is not None:
        keywords["train"] = {"output_dir": str(output_dir)}
    return keywords


def build_run_config(config_class: type[C], config: C | str | Path | None = None,
                     overrides: dict[str, Any] | list[str] | None = None,
                     keywords: dict[str, Any] | None = None) -> C:
    """Defaults, then a YAML preset (or a config object), then overrides (CLI list or nested dict), then
    `keywords` (a nested dict: the API's keyword arguments, which win over everything)."""
    values = cfg.to_dict(config) if isinstance(config, config_class) else cfg.read_yaml(config) if config else {}
    if overrides:
        values = cfg.merge(values, cfg.parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    if keywords:
        values = cfg.merge(values, keywords)
    return cfg.build(config_class, values)


def check_seeds(seeds: list[int]) -> None:
    """At least one seed, none repeated (a repeated seed is the same run again, not another sample)."""
    if not seeds:
        raise cfg.ConfigError("seeds is empty; give at least one seed, e.g. seeds=[0]")
    if len(set(seeds)) != len(seeds):
        raise cfg.ConfigError(f"seeds={seeds} repeats a seed; a repeated seed is the same run, not another sample")


def launch_state() -> PartialState:
    """The launch's processes as the trainer sets them up (a gloo group under torchrun on a machine with no GPU).
    A plain `PartialState()` made before the first trainer would pin every process to single-process mode for the
    whole run."""
    from accelerate import PartialState

    from sslcore.trainer import _multi_process_without_gpu

    return PartialState(cpu=_multi_process_without_gpu())


def budget_tag(label_budget: int | None) -> str:
    """`labels100` for a label budget of 100; empty for the whole training split."""
    return "" if label_budget is None else f"labels{label_budget}"


def seed_run_dir(output_dir: str | Path, protocol: str, init: str, label_budget: int | None, seed: int,
                 setting: dict[str, Any] | None = None) -> Path:
    """`<output_dir>/<protocol>-<init>[-labels<N>][-<grid setting>]-seed<N>`, e.g.
    `full-random-labels100-lr1e-3-seed0`: one folder per seed of one setting of one arm."""
    parts = [protocol, init, budget_tag(label_budget), setting_tag(setting or {}), f"seed{seed}"]
    return Path(output_dir) / "-".join(part for part in parts if part)


def with_setting(config: C, setting: dict[str, Any]) -> C:
    """The config of one grid setting: its values in `train` (the rest shared with `config`)."""
    run_config = copy.copy(config)
    run_config.train = apply_setting(config.train, setting)
    return run_config


def seed_config(config: C, seed: int, run_dir: str | Path) -> C:
    """A copy of `config` for one seed's run: `train.seed` and `train.output_dir` set."""
    run_config = copy.deepcopy(config)
    run_config.train.seed, run_config.train.output_dir = seed, str(run_dir)
    return run_config


@contextlib.contextmanager
def quiet_load_report() -> Iterator[None]:
    """transformers reports every `from_pretrained` that adds a head or drops pretraining heads; both are
    expected when fine-tuning, and a benchmark loads the checkpoint once per seed."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


class EarlyStoppingObjective(Objective):
    """A fine-tuning objective selected on validation: its `prepare` sets `early_stopping` (an
    `sslcore.finetune.EarlyStopping`, which `train_with_early_stopping` calls every `train.eval_every` steps) and
    its `export` writes the best weights (`save_best`). The early stopping's state (best scores, step, weights,
    patience count) goes into checkpoints: a resumed run keeps the best weights it had seen and stops when the
    uninterrupted run would."""

    def __init__(self, config: RunConfig):
        super().__init__(config)
        self.early_stopping: EarlyStopping | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.early_stopping.state_dict() if self.early_stopping is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.early_stopping is not None:
            self.early_stopping.load_state_dict(state)

    @property
    def started_from(self) -> str:
        """How the fine-tuned model began, for its card: `pretrained from` or `randomly initialised like` the
        checkpoint at `config.model.path`."""
        return "pretrained from" if self.config.model.init == "pretrained" else "randomly initialised like"

    def save_best(self, model: nn.Module, out_dir: str | Path, summary: dict[str, Any]) -> dict[str, Any]:
        """The best validation weights put back into `model` and saved in `out_dir` (`save_pretrained`: a stock
        transformers folder). Returns the model card's metrics: the run's numeric summary, the best validation
        scores (`best_validation_<metric>`) and their step."""
        stopper = self.early_stopping
        if stopper is not None:
            stopper.restore_best(model)
        model.save_pretrained(Path(out_dir))
        metrics = {k: v for k, v in summary.items() if isinstance(v, int | float)}
        if stopper is not None and stopper.best:
            metrics.update({f"best_validation_{k}": v for k, v in stopper.best.items()})
            metrics["best_step"] = stopper.best_step
        return metrics

    def write_card(self, model: nn.Module, out_dir: str | Path, metrics: dict[str, Any], *, task_name: str,
                   detail: str, training_data: str, pipeline_tag: str, tags: list[str], usage: str) -> None:
        """The exported model's card (`sslcore.hub.write_model_card`), named `<checkpoint folder>-<task>` and
        summarised as `<model class> (pretrained from `<checkpoint>`) fine-tuned on <task> (<detail>, best
        validation <metric> kept).`, with the run's config and `metrics` (what `save_best` returned)."""
        from sslcore.hub import write_model_card

        stopper = self.early_stopping
        path = self.config.model.path
        write_model_card(
            out_dir, model_name=f"{Path(path).name}-{Path(task_name).name}",
            summary=f"{type(model).__name__} ({self.started_from} `{path}`) fine-tuned on {task_name} ({detail}, best "
                    f"validation {stopper.metric if stopper else ''} kept).",
            config=cfg.to_dict(self.config), training_data=training_data, metrics=metrics, pipeline_tag=pipeline_tag,
            tags=tags, usage=usage)


def train_with_early_stopping(objective: Objective, run_dir: Path, keep_checkpoints: bool = False,
                              tolerate_failure: bool = False) -> dict[str, Any]:
    """One full fine-tuning run: `objective` (whose `prepare` sets `objective.early_stopping`, an
    `sslcore.finetune.EarlyStopping`, and whose `eval_dataset` is the validation split) trained by the shared
    trainer, validation scored every `train.eval_every` steps and at the end. Returns the best validation
    scores, the test scores of the best weights (absent when the early stopping was told not to score the test
    split: model selection scores only the chosen setting's models), the steps taken and the exported model
    folder. Training checkpoints are removed afterwards unless `keep_checkpoints`.

    `tolerate_failure` (a grid search): a run whose loss went non-finite is returned as failed (`"failed"`: the
    reason; never chosen by `select_on_validation`) and its checkpoints removed, instead of ending the search."""
    from sslcore.trainer import NonFiniteLossError, Trainer

    def validate(trainer, step: int) -> dict[str, float]:  # early stopping exists once fit() has prepared
        return objective.early_stopping(trainer, step)

    trainer = Trainer(objective, callbacks=[validate])
    try:
        fit = trainer.fit()
    except NonFiniteLossError as error:
        if not tolerate_failure:
            raise
        reason = str(error).splitlines()[0]
        logger.warning("grid setting %s failed: %s", Path(run_dir).name, reason)
        if trainer.accelerator.is_main_process:
            shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)
        return {"failed": reason[:300], "validation": {}, "model_dir": "", "steps": 0}
    stopper = getattr(objective, "early_stopping", None)
    if stopper is None or stopper.best is None:
        raise RuntimeError(f"{objective.name}: no validation ran, so no model was selected; the objective's "
                           "eval_dataset() must return the validation split")
    stopper.best_state = None  # exported already; a grid keeps many objectives alive
    if not keep_checkpoints and trainer.accelerator.is_main_process:
        shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)
    run = {"validation": stopper.best, "steps": fit.step, "best_step": stopper.best_step,
           "model_dir": str(fit.export_dir or Path(run_dir) / "model")}
    if stopper.test is not None:
        run["test"] = stopper.test
    return run


def write_scores(run_dir: str | Path, run: dict[str, Any]) -> None:
    """A run's `scores.json` in its folder, written by the main process (every process holds the same run)."""
    if launch_state().is_main_process:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "scores.json").write_text(json.dumps(run, indent=1))


def run_fingerprint(config: RunConfig, seed: int) -> dict[str, Any]:
    """What a finished run must match to be reused: every option that changes its result, and its seed. The grid
    is not part of it (a run is one setting, already in `train`), so widening the grid reuses the runs it had."""
    fingerprint = json.loads(json.dumps({**cfg.to_dict(config), "seed": seed}))
    for key in ("seeds", "keep_checkpoints", "hub", "grid"):  # hub: where to upload (and a token) change no score
        fingerprint.pop(key, None)
    if fingerprint.get("label_budget", 0) is None:  # runs from before label budgets existed stay reusable
        fingerprint.pop("label_budget")
    return _without_neutral_options(fingerprint)


_NEUTRAL_TRAIN_OPTIONS = ("output_dir", "progress_bar", "log_every", "report_to", "read_ahead", "num_workers")
"""Train options that change no score (batches are seeded per example, whoever builds them)."""


_NEUTRAL_MODEL_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")
"""config.json keys that change nothing a model built from the config computes."""

_SCRATCH_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                  "preprocessor_config.json", "feature_extractor_config.json")
"""What a random-init arm takes from its checkpoint folder: the architecture and the preprocessing, no weight."""


def scratch_source(path: str) -> str:
    """What a random-init run reads from the checkpoint folder `path`, as a digest: two exports of the same shape
    and tokenizer (pretrained differently, or elsewhere) give the same scratch runs, which are then reused. A Hub
    id (not a local folder) stays as it is."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        return path
    digest = hashlib.sha256()
    for name in _SCRATCH_FILES:
        file = folder / name
        if not file.is_file():
            continue
        content = file.read_bytes()
        if name == "config.json":
            config = {k: v for k, v in json.loads(content).items() if k not in _NEUTRAL_MODEL_CONFIG_KEYS}
            content = json.dumps(config, sort_keys=True).encode()
        elif name == "tokenizer_config.json":
            config = {k: v for k, v in json.loads(content).items() if k != "name_or_path"}
            content = json.dumps(config, sort_keys=True).encode()
        digest.update(name.encode() + b"\0" + content)
    return f"scratch-of:{digest.hexdigest()[:16]}"


def _without_neutral_options(fingerprint: Any) -> Any:
    """`fingerprint` less `_NEUTRAL_TRAIN_OPTIONS`, also for one saved before an option was added or dropped; the
    checkpoint folder of a random-init run replaced by `scratch_source` (its weights are never read)."""
    if isinstance(fingerprint, dict) and isinstance(fingerprint.get("train"), dict):
        fingerprint = {**fingerprint, "train": {key: value for key, value in fingerprint["train"].items()
                                                if key not in _NEUTRAL_TRAIN_OPTIONS}}
    model = fingerprint.get("model") if isinstance(fingerprint, dict) else None
    if isinstance(model, dict) and model.get("init") == "random" and isinstance(model.get("path"), str):
        fingerprint = {**fingerprint, "model": {**model, "path": scratch_source(model["path"])}}
    return fingerprint


def finished_run(config: RunConfig, seed: int, run_dir: str | Path) -> dict[str, Any] | None:
    """The scores.json of a finished run of this config and seed (`run_fingerprint` saved as its "config"), or
    None: a rerun of a benchmark reuses what an interrupted one finished."""
    scores_path = Path(run_dir) / "scores.json"
    if scores_path.is_file():
        saved = json.loads(scores_path.read_text())
        if _without_neutral_options(saved.get("config")) == run_fingerprint(config, seed):
            logger.info("reusing finished run %s", run_dir)
            return saved
    return None


def per_seed_scores(runs: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """The per-seed fields of a `FinetuneResult` from the kept runs (in seed order): test and best validation
    scores of each metric (NaN where validation did not compute one), model folders and steps."""
    return {"test": {m: [run["test"][m] for run in runs] for m in metrics},
            "validation": {m: [run["validation"].get(m, math.nan) for run in runs] for m in metrics},
            "model_dirs": [run["model_dir"] for run in runs], "steps": [run["steps"] for run in runs]}


def save_result(result: FinetuneResult, model_cards: bool = True) -> Path:
    """On the main process: the kept models' cards gain the scores over seeds (`model_cards`; a probe's head folder
    has no card), and the result goes to `<output_dir>/<protocol>-<init>[-labels<N>]-result.json` (returned)."""
    name = "-".join(part for part in (result.protocol, result.init, budget_tag(result.label_budget), "result.json")
                    if part)
    path = Path(result.output_dir) / name
    if launch_state().is_main_process:
        if model_cards:
            for model_dir in result.model_dirs:
                add_scores_to_model_card(model_dir, result)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_dict(), indent=1))
    logger.info("%s", result.summary())
    return path


__all__ = ["EarlyStoppingObjective", "budget_tag", "build_run_config", "check_seeds", "finetune_keywords",
           "finished_run", "launch_state", "per_seed_scores", "quiet_load_report", "run_fingerprint", "save_result",
           "seed_config", "seed_run_dir", "train_with_early_stopping", "with_setting", "write_scores"]
