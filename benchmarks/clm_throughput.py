"""GPT next-token throughput: our trainer against the way transformers' `run_clm.py` trains, in one run.

    python benchmarks/clm_throughput.py [--steps 30] [--skip-steps 10] [--repeats 3] [--ablations]
        [--config recipes/configs/gpt_clm_tiny.yaml] [--results FILE] [--section.key VALUE ...]

Both sides train a `GPT2LMHeadModel` of the same shape (the `GPT2Config` the `gpt_clm` objective
builds, seeded the same way) on the same packed blocks (our `<|endoftext|>`-separated blocks from
`textssl.packing`), with the same batch, optimiser settings, LR schedule and number of steps:

(a) ours: `sslcore.trainer.Trainer` with the `gpt_clm` objective as shipped.
(b) run_clm: `transformers.Trainer` + `TrainingArguments` + `default_data_collator` on rows shaped
    the way run_clm's `group_texts` leaves them (`input_ids`, `attention_mask` of ones, `labels` =
    a copy of `input_ids`); the model computes its own loss from `labels`. Its `GPT2Config` declares
    the activation the preset names (`gelu_new`, GPT-2's), which transformers runs as 8 separate ops.

Where our speed comes from (all the same math; `--ablations` switches each off in turn so what it
is worth is measured in the same run): the fused vocab head + cross-entropy (no `[tokens, vocab]`
logits held, no log-softmax stored), no KV cache built during training, GPT-2's tanh-GELU as one
fused kernel (`gelu_pytorch_tanh`), fused AdamW (transformers' Trainer uses it too on torch >= 2.8).
`--ablations` also runs run_clm with the fused activation, to show what the activation alone is worth.

What is timed, identically on both sides: the wall time from the end of optimizer step
`skip_steps` to the end of step `skip_steps + steps` (a timestamp after every optimizer step: a
step hook on ours, `TrainerCallback.on_step_end` on theirs): data loading, collation, forward,
backward, clipping, optimizer, LR schedule, per-step logging. tokens/s = timed steps x tokens per
step / that time. The loss each side reports is the mean training loss of the last 10 steps.
Repeats rotate which side runs first; repeat r uses seed `train.seed + r` on every side.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2LMHeadModel, TrainingArguments, default_data_collator, set_seed  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from mlm_throughput import (  # noqa: E402  (same timing, config fixing and device report as the MLM benchmark)
    LOSS_WINDOW,
    StepClock,
    _ClockCallback,
    device_name,
    parse_benchmark_args,
    quiet_config,
)

import textssl  # noqa: E402,F401  (registers gpt_clm)
from sslcore import config as cfg  # noqa: E402
from sslcore.objective import Objective  # noqa: E402
from sslcore.trainer import Trainer  # noqa: E402
from textssl.clm import (  # noqa: E402
    FUSED_ACTIVATIONS,
    CausalLMObjective,
    CausalLMWithFusedLoss,
    CLMConfig,
    fused_linear_cross_entropy,
)

DEFAULT_CONFIG = "recipes/configs/gpt_clm_tiny.yaml"
DEFAULT_RESULTS = Path(__file__).parent / "results" / "clm_throughput.md"
_HF_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup",
                 "inverse_sqrt": "inverse_sqrt"}


@dataclass(frozen=True)
class OursVariant:
    """Our side with some speed-ups switched off (`--ablations`); all on = `gpt_clm` as shipped."""

    name: str
    fused_head: bool = True
    """Vocab projection + cross-entropy fused, chunk by chunk (off: `lm_head` then `F.cross_entropy`)."""
    no_cache: bool = True
    """The decoder runs with `use_cache=False` (off: GPT2's default, which builds a KV cache)."""
    fused_gelu: bool = True
    """`gelu_new` runs as `gelu_pytorch_tanh` (off: transformers' 8-op `gelu_new`)."""
    fused_adamw: bool = True
    """Fused AdamW (off: `Objective`'s default AdamW)."""


OURS = OursVariant("ours")
ABLATIONS = (OursVariant("ours, unfused head + loss", fused_head=False),
             OursVariant("ours, with KV cache", no_cache=False),
             OursVariant("ours, 8-op gelu_new", fused_gelu=False),
             OursVariant("ours, unfused AdamW", fused_adamw=False),
             OursVariant("ours, none of them", fused_head=False, no_cache=False, fused_gelu=False,
                         fused_adamw=False))
REFERENCE = "run_clm"
REFERENCE_FUSED_GELU = "run_clm, fused gelu"


class _CachingCausalLM(CausalLMWithFusedLoss):
    """Ablation only: the decoder builds GPT2's default KV cache, as `model(**batch)` does."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.transformer(input_ids=input_ids).last_hidden_state
        hidden, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), input_ids[:, 1:].reshape(-1)
        if self.chunk_tokens:
            return fused_linear_cross_entropy(hidden, self.model.lm_head.weight, targets, self.chunk_tokens)
        return torch.nn.functional.cross_entropy(self.model.lm_head(hidden).float(), targets)


class _ClockedCausalLM(CausalLMObjective):
    """`gpt_clm` plus one step hook that takes the timestamp, and the variant's switches."""

    def __init__(self, config: CLMConfig, clock: StepClock, variant: OursVariant = OURS):
        super().__init__(config)
        self.clock, self.variant = clock, variant

    def step_hooks(self):
        return [*super().step_hooks(), lambda model, step: self.clock.tick()]

    def build_model(self):
        variant = self.variant
        if variant.fused_head and variant.no_cache and variant.fused_gelu:
            return super().build_model()  # as shipped
        declared = self.config.model.activation_function
        activation = FUSED_ACTIVATIONS.get(declared, declared) if variant.fused_gelu else declared
        gpt = GPT2LMHeadModel(reference_gpt2_config(self.config, self.tokenizer, activation))
        wrapper = CausalLMWithFusedLoss if variant.no_cache else _CachingCausalLM
        return wrapper(gpt, self.config.head.fused_chunk_tokens if variant.fused_head else 0)

    def build_optimizer(self, model, args):
        if self.variant.fused_adamw:
            return super().build_optimizer(model, args)
        return Objective.build_optimizer(self, model, args)


@dataclass
class RunResult:
    side: str
    repeat: int
    seed: int
    tokens_per_s: float
    median_step_s: float
    final_loss: float


# -- configuration ---------------------------------------------------------------------------
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    return parse_benchmark_args(argv, "gpt_clm", "run_clm", DEFAULT_CONFIG, 30, DEFAULT_RESULTS,
                                "also run our side with each speed-up switched off, and run_clm with the fused GELU")


def benchmark_config(path: str, overrides: list[str], max_steps: int) -> CLMConfig:
    return quiet_config(path, overrides, max_steps, "gpt_clm")


def reference_gpt2_config(config: CLMConfig, tokenizer, activation: str | None = None) -> transformers.GPT2Config:
    """The `GPT2Config` the preset describes, activation as declared (what run_clm builds from it)."""
    eos = tokenizer.eos_token_id
    settings = {**vars(config.model), "activation_function": activation or config.model.activation_function}
    return transformers.GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, **settings)


def warmup_steps(config: CLMConfig) -> int:
    t = config.train
    return t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * t.max_steps)


# -- the two sides -----------------------------------------------------------------------------
def run_ours(config: CLMConfig, seed: int, variant: OursVariant = OURS) -> tuple[StepClock, float]:
    """(step timestamps, mean loss of the last 10 steps) of our trainer."""
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="clm-bench-ours-") as out:
        run_config = cfg.build(CLMConfig, cfg.merge(cfg.to_dict(config), {"train": {"output_dir": out, "seed": seed}}))
        result = Trainer(_ClockedCausalLM(run_config, clock, variant)).fit()
    last = [r for r in result.history if "loss" in r and r["step"] == config.train.max_steps]
    return clock, last[-1]["loss"]


def run_clm_rows(blocks: datasets.Dataset) -> datasets.Dataset:
    """Our packed blocks in the shape run_clm's `group_texts` gives the Trainer."""
    def add_labels(batch):
        return {"input_ids": batch["input_ids"], "attention_mask": [[1] * len(ids) for ids in batch["input_ids"]],
                "labels": [list(ids) for ids in batch["input_ids"]]}

    return blocks.with_format(None).map(add_labels, batched=True, desc="run_clm: labels")


def run_reference(config: CLMConfig, seed: int, train_dataset: datasets.Dataset, tokenizer,
                  activation: str | None = None) -> tuple[StepClock, float]:
    """(step timestamps, mean loss of the last 10 steps) of transformers.Trainer the run_clm.py way."""
    t = config.train
    clock = StepClock()
    set_seed(seed)  # run_clm seeds before building the model
    model = GPT2LMHeadModel(reference_gpt2_config(config, tokenizer, activation))
    with tempfile.TemporaryDirectory(prefix="clm-bench-run_clm-") as out:
        args = TrainingArguments(
            output_dir=out, seed=seed, max_steps=t.max_steps, per_device_train_batch_size=t.per_device_batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
            weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon,
            max_grad_norm=t.max_grad_norm or 0.0, lr_scheduler_type=_HF_SCHEDULES[t.lr_schedule],
            warmup_steps=warmup_steps(config), bf16=t.mixed_precision == "bf16", fp16=t.mixed_precision == "fp16",
            logging_strategy="steps", logging_steps=LOSS_WINDOW, save_strategy="no", eval_strategy="no",
            report_to="none", dataloader_num_workers=t.num_workers, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                                       data_collator=default_data_collator, callbacks=[_ClockCallback(clock)])
        trainer.train()
    last = [r for r in trainer.state.log_history if "loss" in r and r["step"] == t.max_steps]
    return clock, last[-1]["loss"]


# -- report ------------------------------------------------------------------------------------
def report(results: list[RunResult], args: argparse.Namespace, config: CLMConfig, argv: list[str],
           tokens_per_step: int, load: tuple[float, float]) -> str:
    med = statistics.median
    names = list(dict.fromkeys(r.side for r in results))
    by = {(r.side, r.repeat): r for r in results}
    repeats = sorted({r.repeat for r in results})
    m, t = config.model, config.train
    lines = [
        "# Next-token (GPT) throughput: selfsup trainer vs transformers `run_clm.py`",
        "",
        f"Command: `{shlex.join(['python', 'benchmarks/clm_throughput.py', *argv])}`",
        "",
        f"- {datetime.date.today()}, {device_name()}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, one process. 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} "
        "at the end (other processes on the same cores slow both sides).",
        f"- GPT-2 {m.n_layer} layers, width {m.n_embd}, {m.n_head} heads, activation {m.activation_function}, "
        f"dropout {m.resid_pdrop:g}/{m.embd_pdrop:g}/{m.attn_pdrop:g}, vocab {config.tokenizer.vocab_size} "
        f"({config.tokenizer.kind}); blocks of {config.data.max_seq_length}, batch {t.per_device_batch_size} x "
        f"{t.gradient_accumulation_steps} accumulation = {tokens_per_step} tokens/step; AdamW lr {t.learning_rate:g}, "
        f"{warmup_steps(config)} warm-up steps, {t.lr_schedule} decay, precision {t.mixed_precision}; "
        f"fused head chunk {config.head.fused_chunk_tokens} tokens.",
        f"- Timed: optimizer steps {args.skip_steps + 1}-{args.skip_steps + args.steps} of {t.max_steps} "
        "(step end to step end). tokens/s = timed tokens / timed seconds. Ratios are taken within each repeat, "
        "then the median over repeats; \"ratio, median step\" compares median step times instead (robust to "
        f"bursts of load from other processes). Loss: mean training loss of the last {LOSS_WINDOW} steps. "
        f"Repeat r uses seed {t.seed}+r on every side; the order rotates.",
        "",
        f"| side | tokens/s (median of {len(repeats)}) | ratio vs run_clm | ratio, median step | loss (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names:
        speed = med(by[name, i].tokens_per_s for i in repeats)
        ratio = med(by[name, i].tokens_per_s / by[REFERENCE, i].tokens_per_s for i in repeats)
        step_ratio = med(by[REFERENCE, i].median_step_s / by[name, i].median_step_s for i in repeats)
        loss = med(by[name, i].final_loss for i in repeats)
        bold = "**" if name == OURS.name else ""
        lines.append(f"| {bold}{name}{bold} | {speed:,.0f} | {bold}{ratio:.2f}x{bold} | {step_ratio:.2f}x | "
                     f"{bold}{loss:.4f}{bold} |")
    lines += ["", "Every run:", "", "| repeat | side | tokens/s | median step (ms) | loss |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {r.repeat} | {r.side} | {r.tokens_per_s:,.0f} | {r.median_step_s * 1000:.0f} | {r.final_loss:.4f} |"
              for r in results]
    return "\n".join(lines) + "\n"


def _load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    try:
        config = benchmark_config(args.config, overrides, args.skip_steps + args.steps)
    except cfg.ConfigError as error:
        sys.exit(f"config error: {error}")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("sslcore").setLevel(logging.WARNING)  # our per-step log lines would drown the table
    transformers.logging.set_verbosity_error()

    # Corpus, tokenizer and blocks are built (or read from cache) before anything is timed; both sides
    # train on these blocks.
    data = CausalLMObjective(config)
    data.prepare()
    tokenizer, blocks = data.tokenizer, data.train_dataset()
    reference_train = run_clm_rows(blocks)
    t = config.train
    tokens_per_step = t.per_device_batch_size * t.gradient_accumulation_steps * config.data.max_seq_length
    if len(blocks) < t.max_steps * t.per_device_batch_size * t.gradient_accumulation_steps:
        print(f"note: the corpus holds {len(blocks)} blocks, fewer than {t.max_steps} steps use; both trainers "
              "start a new epoch when they run out", file=sys.stderr)

    results: list[RunResult] = []
    load_at_start = _load_average()
    sides: list[OursVariant | str] = [OURS, REFERENCE]
    if args.ablations:
        sides += [*ABLATIONS, REFERENCE_FUSED_GELU]
    for repeat in range(args.repeats):
        seed = t.seed + repeat
        # Rotate who goes first, so slow drifts of the machine's load do not favour one side.
        for side in sides[repeat % len(sides):] + sides[:repeat % len(sides)]:
            if side == REFERENCE:
                clock, loss = run_reference(config, seed, reference_train, tokenizer)
            elif side == REFERENCE_FUSED_GELU:
                clock, loss = run_reference(config, seed, reference_train, tokenizer, activation="gelu_pytorch_tanh")
            else:
                clock, loss = run_ours(config, seed, side)
            name = side if isinstance(side, str) else side.name
            result = RunResult(name, repeat, seed, tokens_per_step * args.steps / clock.seconds(args.skip_steps, args.steps),
                               clock.median_step(args.skip_steps, args.steps), loss)
            results.append(result)
            print(f"repeat {repeat} {name}: {result.tokens_per_s:,.0f} tokens/s, median step "
                  f"{result.median_step_s * 1000:.0f} ms, loss(last {LOSS_WINDOW}) {loss:.4f}", flush=True)

    table = report(results, args, config, argv, tokens_per_step, (load_at_start, _load_average()))
    print("\n" + table)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(table)
    print(f"written to {args.results}")
    return table


if __name__ == "__main__":
    main()
