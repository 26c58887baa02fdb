"""The shared trainer on a toy objective: loss falls, accumulation = big batch, the non-finite
guard, checkpoint rotation, per-example seeds, logs/plots/trackers."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model
from torch import nn

from sslcore.checkpoint import CheckpointError, list_checkpoints
from sslcore.objective import Objective
from sslcore.run_config import RunConfig, TrainConfig
from sslcore.trainer import NonFiniteLossError, Trainer

TRUE_W = torch.tensor([1.0, -2.0, 0.5, 3.0])


@dataclass
class ToyConfig(RunConfig):
    objective: str = "toy"
    """Name."""
    nan_at_step: int | None = None
    """Make the loss NaN on this step's batches (guard tests)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=30, per_device_batch_size=8, learning_rate=0.3, warmup_steps=0, log_every=5, progress_bar=False,
        report_to=[], lr_schedule="constant", max_grad_norm=None, weight_decay=0.0))
    """Trainer options."""


class ToyRegression(Objective):
    """y = x . w with per-example noise drawn from the example seed."""

    name = "toy"
    config_class = ToyConfig

    def prepare(self, accelerator=None):
        g = torch.Generator().manual_seed(123)
        xs = torch.randn(64, 4, generator=g)
        self.rows = [{"x": x, "y": x @ TRUE_W} for x in xs]
        self.seen_seeds = []
        self.steps = 0

    def train_dataset(self):
        return self.rows

    def eval_dataset(self):
        return self.rows[:16]

    def collate(self, examples, seeds):
        self.seen_seeds.extend(seeds)
        noise = torch.stack([torch.randn(1, generator=torch.Generator().manual_seed(s)) for s in seeds]).squeeze(1)
        return {"x": torch.stack([e["x"] for e in examples]), "y": torch.stack([e["y"] for e in examples]) + 0.01 * noise}

    def build_model(self):
        return nn.Linear(4, 1, bias=False)

    def loss(self, model, batch, ctx):
        error = model(batch["x"]).squeeze(-1) - batch["y"]
        total = (error ** 2).sum()
        if self.config.nan_at_step is not None and model.training:
            self.steps += 1
            if self.steps >= self.config.nan_at_step:
                total = total * float("nan")
        return ctx.mean("loss", total), {"abs_error": error.abs().mean().detach()}

    def export(self, model, out_dir, summary):
        out_dir.mkdir(parents=True, exist_ok=True)
        save_model(model, str(out_dir / "model.safetensors"))
        return out_dir


def fit(tmp_path, callbacks=None, **train):
    config = ToyConfig()
    nan_at = train.pop("nan_at_step", None)
    config.nan_at_step = nan_at
    for key, value in {"output_dir": str(tmp_path), **train}.items():
        setattr(config.train, key, value)
    objective = ToyRegression(config)
    return Trainer(objective, callbacks=callbacks).fit(), objective


def test_loss_falls_and_outputs_are_written(tmp_path):
    result, _ = fit(tmp_path)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < 0.05 * losses[0]
    assert result.eval["eval_loss"] < 0.05 * losses[0]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20, 25, 30]
    assert all(r["samples_per_s"] > 0 for r in records if "loss" in r)
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "config.json").is_file()


def test_accumulation_equals_one_big_batch(tmp_path):
    big, _ = fit(tmp_path / "big", per_device_batch_size=16, max_steps=6)
    small, _ = fit(tmp_path / "acc", per_device_batch_size=8, gradient_accumulation_steps=2, max_steps=6)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "big" / "model" / "model.safetensors"))["weight"]
    b = load_file(str(tmp_path / "acc" / "model" / "model.safetensors"))["weight"]
    assert torch.allclose(a, b, atol=1e-6), (a, b)


def test_examples_get_stable_per_example_seeds(tmp_path):
    _, first = fit(tmp_path / "a", max_steps=4, export=False)
    _, second = fit(tmp_path / "b", max_steps=4, export=False)
    assert first.seen_seeds == second.seen_seeds
    epoch0 = first.seen_seeds[:64]
    assert len(set(epoch0)) == len(epoch0)  # distinct within an epoch


def test_nonfinite_loss_stops_with_advice_and_keeps_earlier_checkpoints(tmp_path):
    with pytest.raises(NonFiniteLossError) as error:
        fit(tmp_path, nan_at_step=4, save_every=1, keep_checkpoints=5)
    message = str(error.value)
    assert "non-finite loss" in message and "step 4" in message and "learning_rate" in message
    kept = list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step-000001", "step-000002", "step-000003"]
    assert all((p / "model.safetensors").is_file() for p in kept)


def test_nonfinite_skip_mode_skips_then_gives_up(tmp_path):
    with pytest.raises(NonFiniteLossError, match="10 steps in a row"):
        fit(tmp_path, nan_at_step=3, on_nonfinite="skip")


def test_checkpoints_rotate_and_leave_no_temp_dirs(tmp_path):
    fit(tmp_path, save_every=5, keep_checkpoints=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000025", "step-000030"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    state = json.loads((tmp_path / "checkpoints" / "step-000030" / "trainer_state.json").read_text())
    assert state["step"] == 30 and state["num_processes"] == 1 and "fingerprint" in state


def test_resume_continues_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    fit(tmp_path / "full", save_every=10)
    fit(tmp_path / "part", save_every=10, max_steps=10)
    fit(tmp_path / "part", save_every=10, resume="latest")
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))["weight"]
    b = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))["weight"]
    assert torch.equal(a, b)


def test_resume_from_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        fit(tmp_path, resume=str(tmp_path))


def test_callbacks_add_metrics_and_can_stop_training(tmp_path):
    def stop_after_first_eval(trainer, step):
        trainer.should_stop = True
        return {"probe_score": 0.5}

    result, _ = fit(tmp_path, eval_every=10, callbacks=[stop_after_first_eval])
    assert result.step == 10 and result.eval["probe_score"] == 0.5
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000010"]


def test_tensorboard_tracker_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    fit(tmp_path, report_to=["tensorboard"], max_steps=10)
    assert list(Path(tmp_path / "logs").rglob("events.out.tfevents*"))


class StreamingToy(ToyRegression):
    """The same regression read as a sharded `datasets.IterableDataset` (a corpus too big for memory)."""

    def train_dataset(self):
        import datasets

        rows = self.rows

        def generate(shards):
            for shard in shards:
                yield from ({"x": r["x"].tolist(), "y": float(r["y"])} for r in rows[shard::4])

        stream = datasets.IterableDataset.from_generator(generate, gen_kwargs={"shards": [0, 1, 2, 3]})
        return stream.with_format("torch")


def fit_streaming(tmp_path, **train):
    config = ToyConfig()
    for key, value in {"output_dir": str(tmp_path), **train}.items():
        setattr(config.train, key, value)
    return Trainer(StreamingToy(config)).fit()


def test_streaming_dataset_trains_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    full = fit_streaming(tmp_path / "full", save_every=5, max_steps=20)  # 64 rows / 8 = 8 batches an epoch
    losses = [h["loss"] for h in full.history if "loss" in h]
    assert losses[-1] < 0.2 * losses[0]
    fit_streaming(tmp_path / "part", save_every=5, max_steps=11)  # stops mid-epoch 1, checkpoint at step 11
    state = json.loads((tmp_path / "part" / "checkpoints" / "step-000011" / "data-0.json").read_text())
    assert state["epoch"] == 1 and state["position"] == 3 * 8
    fit_streaming(tmp_path / "part", save_every=5, max_steps=20, resume="latest")
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))["weight"]
    b = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))["weight"]
    assert torch.equal(a, b)


def test_mixed_precision_then_full_precision_in_one_process(tmp_path):
    bf16, _ = fit(tmp_path / "bf16", mixed_precision="bf16", max_steps=10, export=False)
    assert bf16.final_loss < bf16.history[0]["loss"]
    full, _ = fit(tmp_path / "fp32", mixed_precision="no", max_steps=10, export=False)  # no leftover state
    assert full.final_loss < full.history[0]["loss"]
