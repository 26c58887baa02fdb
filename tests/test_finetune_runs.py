"""The seed loop's shared pieces (`sslcore.finetune_runs`) on a toy objective: a run keeps its best validation
weights and clears its checkpoints, a diverging grid run is recorded as failed (not fatal) and cleaned up, and
the run folders, keyword arguments and result files follow the documented names."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sslcore.checkpoint import list_checkpoints
from sslcore.config import ConfigError
from sslcore.finetune import EarlyStopping, EarlyStoppingConfig, FinetuneResult
from sslcore.finetune_runs import (EarlyStoppingObjective, build_run_config, check_seeds, finetune_keywords,
                                   per_seed_scores, save_result, seed_config, seed_run_dir, train_with_early_stopping,
                                   with_setting)
from sslcore.run_config import RunConfig, TrainConfig
from sslcore.trainer import NonFiniteLossError

TRUE_W = torch.tensor([1.0, -2.0, 0.5, 3.0])


@dataclass
class ToyModelConfig:
    path: str = "runs/toy/model"
    """The checkpoint named in the model card."""
    init: str = "pretrained"
    """pretrained or random (only named in the model card here)."""


@dataclass
class ToyFinetuneConfig(RunConfig):
    objective: str = "toy_finetune"
    """Name."""
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    """How the model began."""
    early_stopping: EarlyStoppingConfig = field(default_factory=lambda: EarlyStoppingConfig(patience=0))
    """Keep the best validation weights, never stop early."""
    nan_at_step: int | None = None
    """Make the training loss NaN from this step on (a diverging grid setting)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=12, per_device_batch_size=8, learning_rate=0.3, warmup_steps=0, log_every=100, eval_every=3,
        save_every=2, keep_checkpoints=3, progress_bar=False, report_to=[], lr_schedule="constant",
        max_grad_norm=None, weight_decay=0.0, num_threads=1))
    """Trainer options."""


class ToyLinear(nn.Linear):
    def save_pretrained(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(out_dir / "model.safetensors"))


class ToyFinetune(EarlyStoppingObjective):
    """Regression y = x . w; validation scored as the negative mean squared error (higher is better)."""

    name = "toy_finetune"
    config_class = ToyFinetuneConfig

    def prepare(self, accelerator=None):
        xs = torch.randn(64, 4, generator=torch.Generator().manual_seed(123))
        self.rows = [{"x": x, "y": x @ TRUE_W} for x in xs]
        self.steps = 0
        self.exported_metrics = None
        self.early_stopping = EarlyStopping(self.config.early_stopping, "neg_mse", ["neg_mse"], self.score,
                                            score_test=False)

    def train_dataset(self):
        return self.rows

    def eval_dataset(self):
        return self.rows[:16]

    def collate(self, examples, seeds):
        return {"x": torch.stack([e["x"] for e in examples]), "y": torch.stack([e["y"] for e in examples])}

    def build_model(self):
        return ToyLinear(4, 1, bias=False)

    def loss(self, model, batch, ctx):
        total = ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).sum()
        if self.config.nan_at_step is not None and model.training:
            self.steps += 1
            if self.steps >= self.config.nan_at_step:
                total = total * float("nan")
        return ctx.mean("loss", total), {}

    @torch.no_grad()
    def score(self, model, split, accelerator=None):
        rows = self.rows[:16]
        x, y = torch.stack([r["x"] for r in rows]), torch.stack([r["y"] for r in rows])
        return {"neg_mse": -float(((model(x).squeeze(-1) - y) ** 2).mean())}

    def export(self, model, out_dir, summary):
        self.exported_metrics = self.save_best(model, out_dir, summary)
        self.write_card(model, out_dir, self.exported_metrics, task_name="toy/regression", detail="all weights",
                        training_data="64 rows of y = x . w", pipeline_tag="tabular-regression", tags=["toy"],
                        usage="load model.safetensors")
        self.exported_weights = {k: v.clone() for k, v in model.state_dict().items()}
        return out_dir


def toy_objective(run_dir: Path, **options) -> ToyFinetune:
    config = ToyFinetuneConfig(**{k: v for k, v in options.items() if k != "train"})
    for key, value in options.get("train", {}).items():
        setattr(config.train, key, value)
    return ToyFinetune(seed_config(config, 0, run_dir))


def test_a_run_exports_its_best_validation_weights_and_clears_its_checkpoints(tmp_path):
    objective = toy_objective(tmp_path / "run")
    run = train_with_early_stopping(objective, tmp_path / "run")
    assert set(run) == {"validation", "steps", "best_step", "model_dir"}  # no "test": score_test=False
    assert run["steps"] == 12 and run["best_step"] in (3, 6, 9, 12)
    assert run["model_dir"] == str(tmp_path / "run" / "model")
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert torch.equal(saved["weight"], objective.exported_weights["weight"])
    assert objective.exported_metrics["best_validation_neg_mse"] == run["validation"]["neg_mse"]
    assert objective.exported_metrics["best_step"] == run["best_step"]
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "ToyLinear (pretrained from `runs/toy/model`) fine-tuned on toy/regression (all weights, best validation " \
           "neg_mse kept)." in card and "model-regression" in card
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert objective.early_stopping.best_state is None  # a grid keeps every run's objective: no weights held

    kept = toy_objective(tmp_path / "kept")
    train_with_early_stopping(kept, tmp_path / "kept", keep_checkpoints=True)
    assert list_checkpoints(tmp_path / "kept")


def test_early_stopping_state_round_trips_through_the_objective(tmp_path):
    objective = toy_objective(tmp_path / "run")
    assert objective.state_dict() == {}  # before prepare: nothing to save
    objective.prepare()
    stopper = objective.early_stopping
    stopper.best, stopper.best_step, stopper.best_state = {"neg_mse": -0.5}, 6, {"weight": torch.ones(1, 4)}
    restored = toy_objective(tmp_path / "run")
    restored.prepare()
    restored.load_state_dict(objective.state_dict())
    assert restored.early_stopping.best == {"neg_mse": -0.5} and restored.early_stopping.best_step == 6
    assert torch.equal(restored.early_stopping.best_state["weight"], torch.ones(1, 4))


def test_a_diverging_grid_run_is_recorded_as_failed_and_cleaned_up(tmp_path):
    run = train_with_early_stopping(toy_objective(tmp_path / "a", nan_at_step=5), tmp_path / "a",
                                    tolerate_failure=True)
    assert run["failed"].startswith("non-finite loss") and run["validation"] == {} and run["model_dir"] == ""
    assert not (tmp_path / "a" / "checkpoints").exists()  # checkpoints of a diverged run are never resumed
    with pytest.raises(NonFiniteLossError):
        train_with_early_stopping(toy_objective(tmp_path / "b", nan_at_step=5), tmp_path / "b")


def test_run_folders_keywords_configs_and_result_files_follow_the_documented_names(tmp_path):
    assert seed_run_dir(tmp_path, "full", "random", 100, 0, {"learning_rate": 1e-3}) == \
        tmp_path / "full-random-labels100-lr1e-3-seed0"
    assert seed_run_dir(tmp_path, "probe", "pretrained", None, 2) == tmp_path / "probe-pretrained-seed2"
    assert finetune_keywords() == {}
    assert finetune_keywords(model=Path("m"), init="random", seeds=(0, 1), output_dir=tmp_path, protocol="probe",
                             task=None) == {"model": {"path": "m", "init": "random"}, "seeds": [0, 1],
                                            "train": {"output_dir": str(tmp_path)}, "protocol": "probe"}
    config = build_run_config(ToyFinetuneConfig, None, ["--train.max_steps", "7"], finetune_keywords(init="random"))
    assert config.train.max_steps == 7 and config.model.init == "random"
    tuned = with_setting(config, {"learning_rate": 1e-3, "warmup_ratio": 0.1})
    assert tuned.train.learning_rate == 1e-3 and config.train.learning_rate == 0.3
    one = seed_config(tuned, 4, tmp_path / "x")
    assert (one.train.seed, one.train.output_dir, tuned.train.seed) == (4, str(tmp_path / "x"), config.train.seed)
    for bad in ([], [1, 1]):
        with pytest.raises(ConfigError, match="seed"):
            check_seeds(bad)

    runs = [{"test": {"accuracy": 0.5}, "validation": {"accuracy": 0.6}, "model_dir": "a", "steps": 3},
            {"test": {"accuracy": 0.7}, "validation": {}, "model_dir": "b", "steps": 4}]
    fields = per_seed_scores(runs, ["accuracy"])
    assert fields["test"] == {"accuracy": [0.5, 0.7]} and fields["steps"] == [3, 4]
    assert fields["validation"]["accuracy"][0] == 0.6 and fields["validation"]["accuracy"][1] != 0.0  # NaN
    result = FinetuneResult(task="t", protocol="probe", model="m", init="random", seeds=[0, 1], main_metric="accuracy",
                            output_dir=str(tmp_path / "out"), label_budget=100, **fields)
    path = save_result(result, model_cards=False)
    assert path == tmp_path / "out" / "probe-random-labels100-result.json"
    assert json.loads(path.read_text())["mean"]["accuracy"] == pytest.approx(0.6)


def test_a_finished_run_is_reused_whatever_options_that_change_no_score_say(tmp_path):
    from sslcore.finetune_runs import finished_run, run_fingerprint

    config = build_run_config(ToyFinetuneConfig, None, [], finetune_keywords(init="random"))
    saved = run_fingerprint(config, 3)
    saved["train"].update(read_ahead=True, num_workers=4, progress_bar=False)  # as a run with other loading wrote it
    (tmp_path / "scores.json").write_text(json.dumps({"config": saved, "test": {"accuracy": 0.5}}))
    assert finished_run(config, 3, tmp_path)["test"] == {"accuracy": 0.5}
    assert finished_run(config, 4, tmp_path) is None  # another seed is another run
    retuned = with_setting(config, {"learning_rate": 1e-3})
    assert finished_run(retuned, 3, tmp_path) is None  # an option that changes the result


def test_a_random_init_run_is_reused_for_another_checkpoint_of_the_same_shape_and_tokenizer(tmp_path):
    from sslcore.finetune_runs import finished_run, run_fingerprint

    def export(name, hidden=8, vocab="a b c", weights=0.0):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"_name_or_path": str(folder), "hidden_size": hidden}))
        (folder / "tokenizer.json").write_text(json.dumps({"vocab": vocab.split()}))
        save_file({"w": torch.full((2,), weights)}, str(folder / "model.safetensors"))
        return str(folder)

    first, other_weights = export("first"), export("second", weights=1.0)
    wider, other_vocab = export("wider", hidden=16), export("vocab", vocab="a b d")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for init in ("random", "pretrained"):
        config = build_run_config(ToyFinetuneConfig, None, [], finetune_keywords(model=first, init=init))
        saved = run_fingerprint(config, 0)
        saved["model"]["path"] = first  # as a run saved before the digest existed wrote it
        (run_dir / "scores.json").write_text(json.dumps({"config": saved, "test": {"accuracy": 0.5}}))
        reused = {path: finished_run(build_run_config(ToyFinetuneConfig, None, [], finetune_keywords(
            model=path, init=init)), 0, run_dir) is not None for path in (first, other_weights, wider, other_vocab)}
        # Scratch never reads the weights: only the architecture and the tokenizer decide.
        expected = ({first: True, other_weights: True, wider: False, other_vocab: False} if init == "random" else
                    {first: True, other_weights: False, wider: False, other_vocab: False})
        assert reused == expected, init
