"""wav2vec 2.0 throughput: our trainer against the way transformers' `run_wav2vec2_pretraining_no_trainer.py`
trains, in one run.

    python benchmarks/wav2vec2_throughput.py [--steps 40] [--repeats 3] [--skip-steps 10]
        [--config recipes/configs/wav2vec2_tiny.yaml] [--results FILE] [--section.key VALUE ...]

Both sides train the same `Wav2Vec2ForPreTraining` (same `Wav2Vec2Config`, same seeded init) on the same
audio (the preset's corpus, cached by `speechssl.audio`), with the same clips per batch, crop length,
optimiser settings, LR schedule, Gumbel decay and number of steps:

(a) ours: `sslcore.trainer.Trainer` with the `wav2vec2` objective: length-grouped batches, random crops,
    masks/negatives/Gumbel noise drawn in torch from example seeds, only masked frames projected and
    quantized, the loss normalised through `LossContext`, fused AdamW.
(b) the example's way: `DataCollatorForWav2Vec2Pretraining` as in that script (feature-extractor padding,
    `_compute_mask_indices` / `_sample_negative_indices` in NumPy), a shuffled `DataLoader`, clips cut to
    `data.max_seconds` by the feature extractor (its `truncation=True`), a plain Accelerate loop: the
    model's own loss, `backward`, gradients rescaled by hand by 1 / masked frames (`multiply_grads`),
    clipping, AdamW over all parameters, the Gumbel temperature set after each step.

Sides run in lockstep (one process each, one optimizer step each in turn) so that both see the same load
on a shared machine. A side's step time runs from getting its turn to the end of its optimizer step (data,
collation, forward, backward, optimizer). audio seconds/s = true (unpadded) audio seconds of the timed steps
/ their time. At the end each trained model is scored the same way on the held-out clips: contrastive loss
and accuracy (argmax codes, the same masks and negatives for both), so "no worse" is measured, not assumed.
"""

from __future__ import annotations

import datetime
import logging
import math
import multiprocessing
import os
import queue
import shlex
import statistics
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from mlm_throughput import (  # noqa: E402  (same lockstep timing, options and device report as the MLM benchmark)
    LOSS_WINDOW,
    Lockstep,
    StepClock,
    device_name,
    parse_benchmark_args,
    quiet_config,
)
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining, get_scheduler, set_seed  # noqa: E402
from transformers.models.wav2vec2.modeling_wav2vec2 import (  # noqa: E402
    _compute_mask_indices,
    _sample_negative_indices,
)

from sslcore import config as cfg  # noqa: E402
from sslcore.trainer import Trainer  # noqa: E402
from speechssl.wav2vec2 import (  # noqa: E402
    Wav2Vec2Contrastive,
    Wav2Vec2Objective,
    Wav2Vec2PretrainConfig,
    contrastive_loss,
)

DEFAULT_CONFIG = "recipes/configs/wav2vec2_tiny.yaml"
DEFAULT_RESULTS = Path(__file__).parent / "results" / "wav2vec2_throughput.md"
REFERENCE = "run_wav2vec2_pretraining_no_trainer"
OURS = "ours"
EVAL_BATCHES = 8


@dataclass
class RunResult:
    side: str
    repeat: int
    seed: int
    audio_s_per_s: float
    median_step_s: float
    fastest_step_s: float
    final_loss: float
    """Mean contrastive loss per masked frame over the last LOSS_WINDOW steps (both sides compute it)."""
    eval_loss: float
    eval_accuracy: float


# -- the two sides -----------------------------------------------------------------------------
class _ClockedWav2Vec2(Wav2Vec2Objective):
    """`wav2vec2` plus a step hook that takes the timestamp, and a record of each batch's audio seconds and
    contrastive loss per masked frame."""

    def __init__(self, config: Wav2Vec2PretrainConfig, clock: StepClock):
        super().__init__(config)
        self.clock, self.audio_seconds, self.contrastive = clock, [], []

    def step_hooks(self):
        return [*super().step_hooks(), lambda model, step: self.clock.tick()]

    def loss(self, model, batch, ctx):
        total, logs = super().loss(model, batch, ctx)
        if ctx.training:
            self.audio_seconds.append(self.count(batch))
            contrastive, count, _ = ctx.terms["contrastive"]
            self.contrastive.append(float(contrastive) / float(batch["mask_time_indices"].sum()))
        return total, logs


def run_ours(config: Wav2Vec2PretrainConfig, seed: int, clock: StepClock, out: str):
    with tempfile.TemporaryDirectory(prefix="w2v-bench-ours-") as run_dir:
        run_config = cfg.build(Wav2Vec2PretrainConfig,
                               cfg.merge(cfg.to_dict(config), {"train": {"output_dir": run_dir, "seed": seed}}))
        objective = _ClockedWav2Vec2(run_config, clock)
        trainer = Trainer(objective)
        trainer.fit()
        trainer.accelerator.unwrap_model(trainer.model).model.save_pretrained(out)
    return objective.audio_seconds, objective.contrastive


class DataCollatorForWav2Vec2Pretraining:
    """The collator of transformers' examples/pytorch/speech-pretraining/run_wav2vec2_pretraining_no_trainer.py,
    as written there: pad with the feature extractor, masks and negatives from the NumPy helpers."""

    def __init__(self, model: Wav2Vec2ForPreTraining, feature_extractor: Wav2Vec2FeatureExtractor,
                 mask_time_prob: float, mask_time_length: int):
        self.model, self.feature_extractor = model, feature_extractor
        self.mask_time_prob, self.mask_time_length = mask_time_prob, mask_time_length

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.feature_extractor.pad(features, padding="longest", return_tensors="pt")
        device = batch["input_values"].device
        batch_size = batch["input_values"].shape[0]
        mask_indices_seq_length = int(self.model._get_feat_extract_output_lengths(batch["input_values"].shape[-1]))
        if batch.get("attention_mask") is not None:
            batch["sub_attention_mask"] = self.model._get_feature_vector_attention_mask(
                mask_indices_seq_length, batch["attention_mask"])
        features_shape = (batch_size, mask_indices_seq_length)
        mask_time_indices = _compute_mask_indices(features_shape, self.mask_time_prob, self.mask_time_length,
                                                  attention_mask=batch.get("sub_attention_mask"))
        sampled_negative_indices = _sample_negative_indices(features_shape, self.model.config.num_negatives,
                                                            mask_time_indices=mask_time_indices)
        batch["mask_time_indices"] = torch.tensor(mask_time_indices, dtype=torch.long, device=device)
        batch["sampled_negative_indices"] = torch.tensor(sampled_negative_indices, dtype=torch.long, device=device)
        return batch


def multiply_grads(params, c) -> None:
    """The example's helper: multiply gradients by a constant."""
    for p in params:
        if p.grad is not None:
            if torch.is_tensor(c):
                c = c.to(p.grad.device)
            p.grad.data.mul_(c)


def run_reference(config: Wav2Vec2PretrainConfig, seed: int, clock: StepClock, audio, out: str):
    """The example script's training loop on `audio` (our cached clips), ticking `clock` after each step."""
    from accelerate import Accelerator

    t, loss_cfg = config.train, config.loss
    if t.num_threads:  # the thread count our side gets from the trainer (train.num_threads)
        torch.set_num_threads(t.num_threads)
    objective = Wav2Vec2Objective(config)
    accelerator = Accelerator(mixed_precision=t.mixed_precision or "no")
    set_seed(seed)  # the example seeds before building the model: the same init as ours
    model = Wav2Vec2ForPreTraining(objective.hf_config())
    feature_extractor = objective.feature_extractor()
    feature_extractor.return_attention_mask = config.model.feat_extract_norm == "layer"  # as the example's
    max_length = int(config.data.max_seconds * feature_extractor.sampling_rate)

    def prepare_dataset(batch):  # the example's `prepare_dataset`: normalise, cut to max_duration_in_seconds
        inputs = feature_extractor(np.asarray(batch["audio"], dtype=np.float32), sampling_rate=feature_extractor.sampling_rate,
                                   max_length=max_length, truncation=True)
        return {"input_values": inputs.input_values[0], "input_length": len(inputs.input_values[0])}

    train = audio.map(prepare_dataset, remove_columns=audio.column_names, desc="the example's prepare_dataset")
    collator = DataCollatorForWav2Vec2Pretraining(model, feature_extractor, config.masking.mask_prob *
                                                  config.masking.mask_length, config.masking.mask_length)
    seconds: list[float] = []

    def counting_collator(features):
        batch = collator(features)
        seconds.append(sum(len(f["input_values"]) for f in features) / feature_extractor.sampling_rate)
        return batch

    loader = torch.utils.data.DataLoader(train, shuffle=True, collate_fn=counting_collator,
                                         batch_size=t.per_device_batch_size,
                                         generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(list(model.parameters()), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  eps=t.adam_epsilon)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * t.max_steps)
    scheduler = get_scheduler(t.lr_schedule if t.lr_schedule != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=warmup, num_training_steps=t.max_steps)
    completed, contrastive = 0, []
    model.train()
    while completed < t.max_steps:
        for batch in loader:
            num_losses = batch["mask_time_indices"].sum()
            batch.pop("sub_attention_mask", None)
            outputs = model(**batch)
            loss = outputs.loss / t.gradient_accumulation_steps
            accelerator.backward(loss)
            multiply_grads(model.parameters(), 1 / num_losses)  # one process, as the example does it there
            if t.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            completed += 1
            gumbel = max(loss_cfg.gumbel_max_temperature * loss_cfg.gumbel_decay ** completed,
                          loss_cfg.gumbel_min_temperature)
            accelerator.unwrap_model(model).set_gumbel_temperature(gumbel)
            contrastive.append(float(outputs.contrastive_loss.detach()) / float(num_losses))  # the example logs it too
            clock.tick()
            if completed >= t.max_steps:
                break
    accelerator.unwrap_model(model).save_pretrained(out)
    return seconds, contrastive


@torch.no_grad()
def held_out_scores(config: Wav2Vec2PretrainConfig, model_dir: str, validation) -> tuple[float, float]:
    """(contrastive loss per masked frame, contrastive accuracy) of a trained model on held-out clips, with our
    eval batches (fixed seeds: the same masks and negatives for every model) and argmax codes."""
    objective = Wav2Vec2Objective(config)
    objective.max_samples = int(config.data.max_seconds * config.data.sampling_rate)
    model = Wav2Vec2Contrastive(Wav2Vec2ForPreTraining.from_pretrained(model_dir)).eval()
    total = correct = frames = 0.0
    size = config.train.per_device_batch_size
    for start in range(0, min(len(validation), EVAL_BATCHES * size), size):
        rows = [validation[i] for i in range(start, min(start + size, len(validation)))]
        batch = objective.collate(rows, list(range(start, start + len(rows))))
        out = model(**batch, gumbel_temperature=1.0, contrastive_temperature=config.loss.contrastive_temperature)
        loss, right = contrastive_loss(out["logits"])
        total, correct, frames = total + float(loss), correct + float(right), frames + len(out["logits"])
    return total / frames, correct / frames


def _train_side(index: int, side: str, config, seed: int, shared_dir: str, lockstep: Lockstep, results) -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("sslcore").setLevel(logging.WARNING)
    logging.getLogger("speechssl").setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    lockstep.wait_turn(index)
    clock = StepClock(lockstep, index)
    out = f"{shared_dir}/{side}-{seed}"
    try:
        if side == REFERENCE:
            import datasets

            audio = datasets.load_from_disk(f"{shared_dir}/train_audio")
            seconds, contrastive = run_reference(config, seed, clock, audio, out)
        else:
            seconds, contrastive = run_ours(config, seed, clock, out)
        results.put((index, clock.durations, seconds, contrastive, out, None))
    except BaseException:
        results.put((index, clock.durations, [], [], out, traceback.format_exc()))
    finally:
        lockstep.pass_turn(index, finished=True)


def run_lockstep(sides: list[str], config, seed: int, shared_dir: str) -> list[tuple]:
    context = multiprocessing.get_context("spawn")
    lockstep, results = Lockstep(context, len(sides)), context.Queue()
    processes = [context.Process(target=_train_side, args=(i, side, config, seed, shared_dir, lockstep, results))
                 for i, side in enumerate(sides)]
    for process in processes:
        process.start()
    reported: dict[int, tuple] = {}
    while len(reported) < len(sides):
        try:
            index, *rest = results.get(timeout=5)
            reported[index] = tuple(rest)
        except queue.Empty:
            for i, process in enumerate(processes):
                if i not in reported and process.exitcode is not None:
                    reported[i] = ([], [], [], "", f"the process exited with code {process.exitcode}")
                    lockstep.pass_turn(i, finished=True)
    for process in processes:
        process.join()
    errors = [f"{sides[i]}: {r[-1]}" for i, r in sorted(reported.items()) if r[-1]]
    if errors:
        raise RuntimeError("a side failed:\n" + "\n".join(errors))
    return [reported[i][:4] for i in range(len(sides))]


# -- report ------------------------------------------------------------------------------------
def report(results: list[RunResult], args, config: Wav2Vec2PretrainConfig, argv: list[str],
           load: tuple[float, float], clips: int) -> str:
    med = statistics.median
    by = {(r.side, r.repeat): r for r in results}
    repeats = sorted({r.repeat for r in results})
    m, t = config.model, config.train
    chance = 1 / (config.masking.num_negatives + 1)
    lines = [
        "# wav2vec 2.0 throughput: selfsup trainer vs transformers `run_wav2vec2_pretraining_no_trainer.py`",
        "",
        f"Command: `{shlex.join(['python', 'benchmarks/wav2vec2_throughput.py', *argv])}`",
        "",
        f"- {datetime.date.today()}, {device_name()}"
        f"{f' (each side pinned to {t.num_threads} by train.num_threads)' if t.num_threads else ''}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, one process per side. 1-minute load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end (other processes on the same cores slow both sides).",
        f"- Audio: {', '.join(config.data.sources)} ({clips} training clips), 16 kHz, at most {config.data.max_seconds} s "
        f"per clip. Model: conv {m.conv_dim} (kernels {m.conv_kernel}, strides {m.conv_stride}, {m.feat_extract_norm} "
        f"norm), {m.num_hidden_layers} layers x {m.hidden_size}, {m.num_codevector_groups}x"
        f"{m.num_codevectors_per_group} codebooks, K={config.masking.num_negatives} negatives (chance "
        f"{chance:.3f}); batch {t.per_device_batch_size} clips; AdamW lr {t.learning_rate:g}, {t.lr_schedule}, "
        f"precision {t.mixed_precision}.",
        f"- Timed: optimizer steps {args.skip_steps + 1}-{args.skip_steps + args.steps} of {t.max_steps}. audio s/s = "
        "true audio seconds of the timed steps / their time; ratios within each repeat, then the median over "
        "repeats. Train loss: contrastive loss per masked frame, mean of the last "
        f"{LOSS_WINDOW} steps. Held-out: contrastive loss and accuracy on up to {EVAL_BATCHES} batches of the "
        "validation clips, scored the same way for both (argmax codes, the same masks and negatives).",
        "",
        f"| side | audio s/s (median of {len(repeats)}) | ratio vs example | ratio, median step | train contrastive "
        "loss | held-out contrastive loss | held-out accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in (OURS, REFERENCE):
        speed = med(by[name, i].audio_s_per_s for i in repeats)
        ratio = med(by[name, i].audio_s_per_s / by[REFERENCE, i].audio_s_per_s for i in repeats)
        step_ratio = med(by[REFERENCE, i].median_step_s / by[name, i].median_step_s for i in repeats)
        lines.append(f"| {name} | {speed:,.1f} | {ratio:.2f}x | {step_ratio:.2f}x | "
                     f"{med(by[name, i].final_loss for i in repeats):.4f} | "
                     f"{med(by[name, i].eval_loss for i in repeats):.4f} | "
                     f"{med(by[name, i].eval_accuracy for i in repeats):.4f} |")
    lines += ["", "Every run:", "", "| repeat | side | audio s/s | median step (ms) | fastest step (ms) | train loss | "
              "held-out loss | held-out accuracy |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.repeat} | {r.side} | {r.audio_s_per_s:,.1f} | {r.median_step_s * 1000:.0f} | "
              f"{r.fastest_step_s * 1000:.0f} | {r.final_loss:.4f} | {r.eval_loss:.4f} | {r.eval_accuracy:.4f} |"
              for r in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_benchmark_args(argv, "wav2vec2", REFERENCE.removesuffix("_no_trainer"), DEFAULT_CONFIG,
                                           40, DEFAULT_RESULTS, "(no ablations for wav2vec2)")
    try:
        config = quiet_config(args.config, overrides, args.skip_steps + args.steps, "wav2vec2")
    except cfg.ConfigError as error:
        sys.exit(f"config error: {error}")
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()

    # The audio is decoded and cached before anything is timed; both sides train on the same clips.
    data = Wav2Vec2Objective(config)
    data.prepare()
    train_audio = data.splits["train"].with_format(None).select_columns(["audio"])
    validation = data.splits["validation"]
    results: list[RunResult] = []
    load_at_start = os.getloadavg()[0]
    sides = [OURS, REFERENCE]
    with tempfile.TemporaryDirectory(prefix="w2v-bench-") as shared_dir:
        train_audio.save_to_disk(f"{shared_dir}/train_audio")
        for repeat in range(args.repeats):
            seed = config.train.seed + repeat
            order = sides[repeat % 2:] + sides[:repeat % 2]
            for side, (durations, seconds, contrastive, out) in zip(order, run_lockstep(order, config, seed,
                                                                                          shared_dir)):
                timed = slice(args.skip_steps, args.skip_steps + args.steps)
                if len(durations) < args.skip_steps + args.steps:
                    raise RuntimeError(f"{side} ran {len(durations)} steps, expected {config.train.max_steps}")
                eval_loss, eval_accuracy = held_out_scores(config, out, validation)
                result = RunResult(side, repeat, seed, sum(seconds[timed]) / sum(durations[timed]),
                                   statistics.median(durations[timed]), min(durations[timed]),
                                   float(np.mean(contrastive[-LOSS_WINDOW:])), eval_loss, eval_accuracy)
                results.append(result)
                print(f"repeat {repeat} {side}: {result.audio_s_per_s:,.1f} audio s/s, median step "
                      f"{result.median_step_s * 1000:.0f} ms, train contrastive {result.final_loss:.4f}, held-out "
                      f"loss {eval_loss:.4f} accuracy {eval_accuracy:.4f}", flush=True)
    table = report(results, args, config, argv, (load_at_start, os.getloadavg()[0]), len(train_audio))
    print("\n" + table)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(table)
    print(f"written to {args.results}")
    return table


if __name__ == "__main__":
    main()
