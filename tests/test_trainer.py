"""The shared trainer on a toy objective: loss falls, accumulation = big batch, the non-finite
guard, checkpoint rotation, per-example seeds, logs/plots/trackers."""

import json
import os
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


# --------------------------------------------------------------------------------------------------
# Issue 13: the seam for three modalities
# --------------------------------------------------------------------------------------------------


class UnevenToy(ToyRegression):
    """Each example carries 1-4 targets (like masked tokens or frames): micro-batches hold different
    numbers of items, so a mean of per-batch means is not the mean over the step."""

    def prepare(self, accelerator=None):
        super().prepare(accelerator)
        g = torch.Generator().manual_seed(7)
        for i, row in enumerate(self.rows):
            k = 1 + (i * 7 + 3) % 4 if i % 5 else 4  # uneven, and batch-order dependent
            row["xs"] = torch.randn(4, 4, generator=g)
            row["k"] = k

    def collate(self, examples, seeds):
        xs = torch.cat([e["xs"][: e["k"]] for e in examples])
        return {"x": xs, "y": xs @ TRUE_W, "n": torch.tensor(len(xs))}

    def targets(self, batch):
        return {"loss": batch["n"]}


class MeanOfMeansToy(UnevenToy):
    """The old seam: each micro-batch's own mean, averaged (what the tests below must catch)."""

    def targets(self, batch):
        return {"loss": 1}

    def loss(self, model, batch, ctx):
        error = model(batch["x"]).squeeze(-1) - batch["y"]
        return ctx.mean("loss", (error ** 2).mean()), {}


def fit_uneven(tmp_path, objective_class=UnevenToy, **train):
    config = ToyConfig()
    for key, value in {"output_dir": str(tmp_path), **train}.items():
        setattr(config.train, key, value)
    objective = objective_class(config)
    return Trainer(objective).fit(), objective


def test_accumulation_with_uneven_targets_equals_one_big_batch(tmp_path):
    from safetensors.torch import load_file

    fit_uneven(tmp_path / "big", per_device_batch_size=16, max_steps=6, learning_rate=0.05)
    fit_uneven(tmp_path / "acc", per_device_batch_size=8, gradient_accumulation_steps=2, max_steps=6,
               learning_rate=0.05)
    a = load_file(str(tmp_path / "big" / "model" / "model.safetensors"))["weight"]
    b = load_file(str(tmp_path / "acc" / "model" / "model.safetensors"))["weight"]
    assert torch.allclose(a, b, atol=1e-6), (a, b)
    # The test can fail: the old mean of per-batch means moves the weights elsewhere.
    fit_uneven(tmp_path / "old", MeanOfMeansToy, per_device_batch_size=8, gradient_accumulation_steps=2,
               max_steps=6, learning_rate=0.05)
    c = load_file(str(tmp_path / "old" / "model" / "model.safetensors"))["weight"]
    assert not torch.allclose(a, c, atol=1e-4)


def test_eval_loss_is_the_exact_mean_whatever_the_batch_size(tmp_path):
    # learning_rate 0: the model stays at its init, so only the eval reduction can differ.
    small, objective = fit_uneven(tmp_path / "8", per_device_batch_size=4, max_steps=1, learning_rate=0.0,
                                  eval_batches=None, export=False)
    large, _ = fit_uneven(tmp_path / "16", per_device_batch_size=16, max_steps=1, learning_rate=0.0,
                          eval_batches=None, export=False)
    assert small.eval["eval_loss"] == pytest.approx(large.eval["eval_loss"], rel=1e-6)
    old, _ = fit_uneven(tmp_path / "old", MeanOfMeansToy, per_device_batch_size=4, max_steps=1, learning_rate=0.0,
                        eval_batches=None, export=False)
    assert old.eval["eval_loss"] != pytest.approx(large.eval["eval_loss"], rel=1e-3)  # a mean of means differs
    # ... and it is the mean over every target of the eval rows, computed the obvious way.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(tmp_path / "8" / "checkpoints" / "step-000001" / "model.safetensors")))
    errors = torch.cat([(model(r["xs"][: r["k"]]).squeeze(-1) - r["xs"][: r["k"]] @ TRUE_W) ** 2
                        for r in objective.rows[:16]])
    assert small.eval["eval_loss"] == pytest.approx(errors.mean().item(), rel=1e-5)


def test_training_log_reports_the_exact_step_mean(tmp_path):
    result, _ = fit_uneven(tmp_path, per_device_batch_size=8, gradient_accumulation_steps=2, max_steps=1,
                           log_every=1, learning_rate=0.0, export=False)
    first = next(h for h in result.history if "loss" in h)
    # Step 1 = micro-batches 0 and 1 of epoch 0's permutation; recompute the loss over their targets.
    config = ToyConfig()
    objective = UnevenToy(config)
    objective.prepare()
    from sslcore.data import ShuffledBatches

    from safetensors.torch import load_file

    model = torch.nn.Linear(4, 1, bias=False)
    model.load_state_dict(load_file(str(tmp_path / "checkpoints" / "step-000001" / "model.safetensors")))
    indices = sum(ShuffledBatches(64, 8, seed=0).batches(0)[:2], [])
    xs = torch.cat([objective.rows[i]["xs"][: objective.rows[i]["k"]] for i in indices])
    expected = ((model(xs).squeeze(-1) - xs @ TRUE_W) ** 2).mean().item()
    assert first["loss"] == pytest.approx(expected, rel=1e-5)


class StatefulToy(ToyRegression):
    """An objective with state of its own (like a momentum encoder or a queue): a running mean of the
    weights, updated in a step hook, that pulls the loss. Resume must restore it."""

    def prepare(self, accelerator=None):
        super().prepare(accelerator)
        self.average = torch.zeros(1, 4)

    def step_hooks(self):
        def follow(model, step):
            self.average.mul_(0.9).add_(0.1 * model.weight.detach())
        return [follow]

    def loss(self, model, batch, ctx):
        total, logs = super().loss(model, batch, ctx)
        pull = ((model.weight - self.average) ** 2).sum()
        return total + ctx.sum("pull", pull * 0.1), logs

    def state_dict(self):
        return {"average": self.average.clone()}

    def load_state_dict(self, state):
        self.average = state["average"].clone()


def test_resume_restores_objective_state(tmp_path):
    from safetensors.torch import load_file

    def run(out, **train):
        config = ToyConfig()
        for key, value in {"output_dir": str(out), "save_every": 5, **train}.items():
            setattr(config.train, key, value)
        return Trainer(StatefulToy(config)).fit()

    run(tmp_path / "full", max_steps=12)
    run(tmp_path / "part", max_steps=5)
    run(tmp_path / "part", max_steps=12, resume="latest")
    assert (tmp_path / "part" / "checkpoints" / "step-000012" / "objective.pt").is_file()
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))["weight"]
    b = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))["weight"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_resume_is_exact_with_accumulation_capped_eval_and_workers(tmp_path, precision):
    from safetensors.torch import load_file

    # (fp16's grad scaler needs a GPU: on CPU Accelerate makes none; its state is saved as scaler.pt.)
    common = dict(per_device_batch_size=4, gradient_accumulation_steps=3, eval_every=2, eval_batches=2,
                  save_every=4, num_workers=1, learning_rate=0.05, mixed_precision=precision)
    fit_uneven(tmp_path / "full", max_steps=10, **common)  # 64 rows / 4 / 3 -> an epoch ends mid-run
    fit_uneven(tmp_path / "part", max_steps=4, **common)
    fit_uneven(tmp_path / "part", max_steps=10, resume="latest", **common)
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))["weight"]
    b = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))["weight"]
    assert torch.equal(a, b)


def test_resume_with_a_different_batch_or_seed_is_refused(tmp_path):
    fit(tmp_path, max_steps=5)
    for change, key in (({"per_device_batch_size": 4}, "per_device_batch_size"), ({"seed": 1}, "seed"),
                        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps")):
        with pytest.raises(CheckpointError, match=key):
            fit(tmp_path, max_steps=10, resume="latest", **change)


def test_resume_latest_without_a_checkpoint_is_an_error_and_auto_starts(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        fit(tmp_path / "none", resume="latest")
    result, _ = fit(tmp_path / "auto", resume="auto", max_steps=5)
    assert result.step == 5
    resumed, _ = fit(tmp_path / "auto", resume="auto", max_steps=8)
    assert resumed.step == 8


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    first, _ = fit(tmp_path, max_steps=5)
    card = tmp_path / "model" / "model.safetensors"
    before = (card.stat().st_mtime_ns, (tmp_path / "metrics.jsonl").read_text())
    again, _ = fit(tmp_path, max_steps=5, resume="latest")
    assert again.step == 5 and again.final_loss == first.final_loss
    assert again.export_dir == tmp_path / "model"
    assert (card.stat().st_mtime_ns, (tmp_path / "metrics.jsonl").read_text()) == before


def test_a_fresh_run_replaces_an_earlier_runs_checkpoints(tmp_path):
    from sslcore.checkpoint import latest_checkpoint

    fit(tmp_path, max_steps=20, save_every=10)  # leaves step-000010, step-000020
    fit(tmp_path, max_steps=6, save_every=3)  # a new run in the same folder
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000006"]
    assert latest_checkpoint(tmp_path).name == "step-000006"


def test_secrets_never_reach_a_file_the_run_writes(tmp_path):
    pytest.importorskip("tensorboard")
    secret = "hf_SECRETtoken1234567890"
    config = ToyConfig()
    config.hub.token = secret
    for key, value in {"output_dir": str(tmp_path), "max_steps": 5, "report_to": ["tensorboard"]}.items():
        setattr(config.train, key, value)
    Trainer(ToyRegression(config)).fit()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("tfevents" in p.name for p in written) and any(p.name == "config.json" for p in written)
    leaks = [p for p in written if secret.encode() in p.read_bytes()]
    assert not leaks, leaks


def test_warmup_longer_than_the_run_is_warned(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="sslcore.trainer"):
        fit(tmp_path, max_steps=5, warmup_steps=10, export=False)
    assert "warming up" in caplog.text


def test_in_batch_negative_objectives_refuse_accumulation(tmp_path):
    from sslcore.config import ConfigError

    class InBatch(ToyRegression):
        supports_accumulation = False

    config = ToyConfig()
    config.train.gradient_accumulation_steps = 2
    with pytest.raises(ConfigError, match="within the batch"):
        Trainer(InBatch(config))


def test_thread_policy(monkeypatch):
    from sslcore.trainer import configure_threads

    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == (1, "train.num_threads")
        # accelerate launch exports OMP_NUM_THREADS=1 itself: the trainer uses the cores instead.
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        threads, why = configure_threads(None)
        assert threads == len(os.sched_getaffinity(0)) and "cores" in why
        assert configure_threads(None, loader_workers=1)[0] == max(1, threads - 1)  # a worker keeps a core busy
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(threads))
        assert configure_threads(None)[0] == 1
        # Outside accelerate launch, a user's OMP_NUM_THREADS is respected.
        monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")
        assert configure_threads(None) == (1, "OMP_NUM_THREADS")
    finally:
        torch.set_num_threads(before)


def test_read_ahead_keeps_order_raises_where_reading_failed_and_stops_when_closed():
    import threading
    import time

    from sslcore.data import read_ahead

    assert list(read_ahead(range(50))) == list(range(50))

    def failing():
        yield from range(3)
        raise ValueError("row 3 is broken")

    seen = []
    with pytest.raises(ValueError, match="row 3 is broken"):
        for item in read_ahead(failing()):
            seen.append(item)
    assert seen == [0, 1, 2]  # every batch before the failure arrives first

    reads = []

    def endless():
        while True:
            reads.append(len(reads))
            yield reads[-1]

    ahead = read_ahead(endless(), depth=2)
    assert [next(ahead) for _ in range(5)] == [0, 1, 2, 3, 4]
    ahead.close()  # what the trainer's loop does at max_steps
    count = len(reads)
    time.sleep(0.2)
    assert len(reads) == count <= 5 + 2 + 1  # the thread stopped, having read at most `depth` (+1 in hand) ahead
    assert not any(t.name == "read-ahead" for t in threading.enumerate())


def test_batch_plans_deal_every_example_once_and_resume_by_position():
    from sslcore.data import LengthGroupedBatches, ProcessBatches, ShuffledBatches

    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    for plan in (ShuffledBatches(200, 8, seed=3), LengthGroupedBatches(lengths, 8, seed=3, group_batches=5)):
        shares = [list(ProcessBatches(plan, rank, 2)) for rank in range(2)]
        assert len(shares[0]) == len(shares[1])  # every process runs the same number of steps
        seen = [i for share in shares for batch in share for _, i in batch]
        assert len(seen) == len(set(seen)) and len(seen) >= 200 - 2 * 8
        resumed = ProcessBatches(plan, 1, 2)
        resumed.set_epoch(0, start=3)
        assert list(resumed) == shares[1][3:]
        assert plan.batches(1) != plan.batches(0) and plan.batches(0) == plan.batches(0)
    # Length groups: a batch spans a narrow range of lengths compared with random batches.
    grouped = LengthGroupedBatches(lengths, 8, seed=3, group_batches=5).batches(0)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped) / len(grouped)
    assert spread < 25
    budgeted = LengthGroupedBatches(lengths, 64, seed=3, max_units=400).batches(0)
    assert all(len(b) * max(lengths[i] for i in b) <= 400 for b in budgeted)
    assert sorted(i for b in budgeted for i in b) == list(range(200))


def test_sharded_strategies_are_refused_with_a_clear_message():
    from types import SimpleNamespace

    from accelerate import DistributedType

    from sslcore.config import ConfigError

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        sharded = SimpleNamespace(distributed_type=kind, gradient_accumulation_steps=1)
        with pytest.raises(ConfigError, match="shards weights"):
            Trainer(ToyRegression(ToyConfig()), accelerator=sharded)


def test_objective_ddp_options_reach_the_ddp_wrapper(tmp_path):
    class OwnBuffers(ToyRegression):
        def ddp_options(self):
            return {"broadcast_buffers": False}  # e.g. per-rank BatchNorm statistics or queues

    config = ToyConfig()
    config.train.output_dir = str(tmp_path)
    trainer = Trainer(OwnBuffers(config))
    assert trainer.accelerator.ddp_handler.broadcast_buffers is False


def test_accumulation_deals_whole_steps_like_more_processes():
    from sslcore.data import ProcessBatches, ShuffledBatches

    plan = ShuffledBatches(200, 8, seed=1)  # 25 micro-batches an epoch
    one = list(ProcessBatches(plan, 0, 1, accumulation=2))
    two = [list(ProcessBatches(plan, rank, 2)) for rank in range(2)]
    assert len(one) == 24 and len(two[0]) == len(two[1]) == 12  # the odd 25th never makes a short step
    interleaved = [batch for pair in zip(*two) for batch in pair]
    assert one == interleaved  # step k holds the same examples whichever way it is split
