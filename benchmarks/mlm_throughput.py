"""Masked-LM throughput: our trainer against the way transformers' `run_mlm.py` trains, in one run.

    python benchmarks/mlm_throughput.py [--steps 60] [--repeats 3] [--skip-steps 10] [--ablations]
        [--config recipes/configs/bert_mlm_tiny.yaml] [--results FILE] [--section.key VALUE ...]

Both sides train the same `BertForMaskedLM` (same `BertConfig`, same seeded init) on the same
corpus and tokenizer, with the same batch, optimiser settings, LR schedule and number of steps:

(a) ours: `sslcore.trainer.Trainer` with the `bert_mlm` objective on blocks from
    `textssl.packing.pack_for_bert`, token-level masking (`masking.whole_word` forced to false,
    because run_mlm masks single tokens).
(b) run_mlm: `transformers.Trainer` + `TrainingArguments` + `DataCollatorForLanguageModeling
    (mlm_probability=0.15)`, data tokenized the example script's way
    (`tokenizer(text, return_special_tokens_mask=True)`, then its `group_texts`).

Lockstep, so that every side sees the same machine load: each side trains in its own process
and they take turns, one optimizer step each (the order rotates across repeats; repeat r uses
seed `train.seed + r` on every side). A side's step time runs from getting its turn to a
timestamp taken after its optimizer step (a step hook on ours, `TrainerCallback.on_step_end`
on theirs): data loading, collation/masking, forward, backward, clipping, the optimizer, the LR
schedule and per-step logging. Model building, data preparation, the final checkpoint and
eval are outside it, and so are the first `skip_steps` steps (warm-up of allocators and caches).
tokens/s = steps x global batch x sequence length / the sum of a side's timed step times
(blocks are full: no padding). The loss each side reports is the mean training loss of the
last 10 steps (both log every 10).
`--ablations` adds our side with each of its speed-ups switched off (the last-layer cut of
`MaskedPositionsHead`, fused AdamW), so what each is worth is measured in the same run.
The device is whatever Accelerate / `transformers.Trainer` pick (a GPU when there is one).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import multiprocessing
import os
import platform
import queue
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    DataCollatorForLanguageModeling,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

import textssl  # noqa: E402,F401  (registers bert_mlm)
from sslcore import config as cfg  # noqa: E402
from sslcore.api import build_config  # noqa: E402
from sslcore.objective import Objective  # noqa: E402
from sslcore.trainer import Trainer  # noqa: E402
from textssl.data import load_text  # noqa: E402
from textssl.mlm import MaskedLMObjective, MLMConfig  # noqa: E402

DEFAULT_CONFIG = "recipes/configs/bert_mlm_tiny.yaml"
DEFAULT_RESULTS = Path(__file__).parent / "results" / "mlm_throughput.md"
LOSS_WINDOW = 10
"""Both trainers log the mean loss of the last LOSS_WINDOW steps; the last such log is compared."""

# Keys a throughput benchmark sets itself (timing and fairness); overriding them would break the comparison.
TRAIN_OWNED_KEYS = {
    "train.max_steps": "use --steps / --skip-steps",
    "train.log_every": f"both sides log every {LOSS_WINDOW} steps so their losses compare",
    "train.save_every": "periodic checkpoints would be timed on our side only",
    "train.eval_every": "periodic eval would be timed on our side only",
    "train.export": "the export is not part of training",
    "train.progress_bar": "the bar is off on both sides",
    "train.report_to": "trackers are off on both sides",
    "train.output_dir": "runs go to a temporary folder",
    "train.resume": "both sides start from scratch",
}
_OWNED_KEYS = {**TRAIN_OWNED_KEYS,
               "masking.whole_word": "run_mlm masks single tokens, so ours must too for the losses to compare"}
_HF_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup",
                 "inverse_sqrt": "inverse_sqrt"}


# -- timing -----------------------------------------------------------------------------------
class Lockstep:
    """Processes take turns in a fixed rotation; a finished process leaves the rotation."""

    def __init__(self, context, sides: int):
        self.sides = sides
        self.changed = context.Condition()
        self.turn = context.Value("i", 0, lock=False)  # guarded by `changed`
        self.finished = context.Array("b", sides, lock=False)

    def wait_turn(self, side: int) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.turn.value == side)

    def pass_turn(self, side: int, finished: bool = False) -> None:
        with self.changed:
            self.finished[side] = self.finished[side] or finished
            waiting = [s for s in range(side + 1, side + self.sides + 1) if not self.finished[s % self.sides]]
            if waiting:
                self.turn.value = waiting[0] % self.sides
            self.changed.notify_all()


class StepClock:
    """How long each optimizer step of one side took, counting only the time it held the turn."""

    def __init__(self, lockstep: Lockstep | None = None, side: int = 0) -> None:
        self.lockstep, self.side = lockstep, side
        self.durations: list[float] = []
        self.started = time.perf_counter()

    def tick(self) -> None:
        """Called after every optimizer step: close this step, let the other sides take theirs."""
        if torch.cuda.is_available():  # queued GPU work belongs to the step that queued it
            torch.cuda.synchronize()
        self.durations.append(time.perf_counter() - self.started)
        if self.lockstep is not None:
            self.lockstep.pass_turn(self.side)
            self.lockstep.wait_turn(self.side)
        self.started = time.perf_counter()

    def timed(self, skip_steps: int, steps: int) -> list[float]:
        """Durations of optimizer steps skip_steps + 1 ... skip_steps + steps."""
        if len(self.durations) < skip_steps + steps:
            raise RuntimeError(f"{len(self.durations)} steps were clocked, {skip_steps + steps} expected")
        return self.durations[skip_steps:skip_steps + steps]

    def seconds(self, skip_steps: int, steps: int) -> float:
        return sum(self.timed(skip_steps, steps))

    def median_step(self, skip_steps: int, steps: int) -> float:
        return statistics.median(self.timed(skip_steps, steps))


class _ClockCallback(TrainerCallback):
    """transformers side: a timestamp after each optimizer step (before its logging, as on ours)."""

    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.tick()


@dataclass(frozen=True)
class OursVariant:
    """Our side with some of its speed-ups switched off (for `--ablations`); all on = `bert_mlm` as shipped."""

    name: str
    cut_last_layer: bool = True
    """`MaskedPositionsHead` runs BERT's last layer only at masked positions."""
    fused_adamw: bool = True
    """`MaskedLMObjective.build_optimizer` uses fused AdamW (off: `Objective`'s default AdamW)."""


OURS = OursVariant("ours")
ABLATIONS = (OursVariant("ours, full last layer", cut_last_layer=False),
             OursVariant("ours, unfused AdamW", fused_adamw=False),
             OursVariant("ours, neither", cut_last_layer=False, fused_adamw=False))
REFERENCE = "run_mlm"


class _ClockedMaskedLM(MaskedLMObjective):
    """`bert_mlm` plus one step hook that takes the timestamp, and the variant's switches."""

    def __init__(self, config: MLMConfig, clock: StepClock, variant: OursVariant = OURS):
        super().__init__(config)
        self.clock, self.variant = clock, variant

    def step_hooks(self):
        return [*super().step_hooks(), lambda model, step: self.clock.tick()]

    def build_model(self):
        model = super().build_model()
        model.prunes_last_layer = model.prunes_last_layer and self.variant.cut_last_layer
        return model

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
    fastest_step_s: float
    final_loss: float


# -- configuration ---------------------------------------------------------------------------
def parse_benchmark_args(argv: list[str], objective: str, reference: str, default_config: str, default_steps: int,
                         default_results: Path, ablations_help: str) -> tuple[argparse.Namespace, list[str]]:
    """The options every throughput benchmark takes; unknown `--section.key VALUE` ones are config overrides."""
    parser = argparse.ArgumentParser(
        description=f"Tokens/s and final loss of our {objective} trainer vs transformers' {reference}.py way, "
                    "in one run. Extra --section.key VALUE arguments override the config.",
        allow_abbrev=False)
    parser.add_argument("--config", default=default_config, help=f"{objective} YAML preset (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=default_steps,
                        help="timed optimizer steps per run (default: %(default)s)")
    parser.add_argument("--skip-steps", type=int, default=10,
                        help="untimed optimizer steps before the timed ones (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, order rotating (default: %(default)s)")
    parser.add_argument("--ablations", action="store_true", help=ablations_help)
    parser.add_argument("--results", type=Path, default=default_results,
                        help="markdown file the table is written to (default: %(default)s)")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < LOSS_WINDOW or args.skip_steps < 1 or args.repeats < 1:
        parser.error(f"need --steps >= {LOSS_WINDOW}, --skip-steps >= 1 and --repeats >= 1")
    if (args.steps + args.skip_steps) % LOSS_WINDOW:
        parser.error(f"--steps + --skip-steps must be a multiple of {LOSS_WINDOW} so the last logged loss is "
                     f"the mean of the last {LOSS_WINDOW} steps on both sides; got {args.steps} + {args.skip_steps}")
    return args, overrides


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    return parse_benchmark_args(argv, "bert_mlm", "run_mlm", DEFAULT_CONFIG, 60, DEFAULT_RESULTS,
                                "also run our side with each speed-up switched off: "
                                + "; ".join(v.name for v in ABLATIONS))


def quiet_config(path: str, overrides: list[str], max_steps: int, objective: str,
                 owned_keys: dict[str, str] = TRAIN_OWNED_KEYS, fixed: dict | None = None):
    """The preset + the user's overrides + what a throughput benchmark fixes for a fair, quiet comparison
    (no checkpoints, eval, export, bar or trackers; logs every LOSS_WINDOW steps; precision pinned)."""
    user = cfg.parse_overrides(overrides) if overrides else {}
    for dotted, why in owned_keys.items():
        section, key = dotted.split(".")
        if key in user.get(section, {}):
            raise cfg.ConfigError(f"--{dotted} is set by the benchmark ({why}); drop it from the command line")
    quiet = {"train": {"max_steps": max_steps, "log_every": LOSS_WINDOW, "save_every": 0, "eval_every": 0,
                       "export": False, "progress_bar": False, "report_to": [], "resume": None}}
    config = build_config(path, cfg.merge(cfg.merge(user, quiet), fixed or {}))
    if config.objective != objective:
        raise cfg.ConfigError(f"{path} trains {config.objective!r}; this benchmark compares {objective} configs")
    if config.train.mixed_precision is None:
        config.train.mixed_precision = "no"  # pin it: an `accelerate config` default would apply to ours only
    return config


def benchmark_config(path: str, overrides: list[str], max_steps: int) -> MLMConfig:
    """`quiet_config` for bert_mlm, with single-token masking (what run_mlm's collator does)."""
    return quiet_config(path, overrides, max_steps, "bert_mlm", _OWNED_KEYS, {"masking": {"whole_word": False}})


# -- the two sides -----------------------------------------------------------------------------
def run_ours(config: MLMConfig, seed: int, clock: StepClock, variant: OursVariant = OURS) -> float:
    """Train with our trainer, ticking `clock` after every step; the mean loss of the last 10 steps."""
    with tempfile.TemporaryDirectory(prefix="mlm-bench-ours-") as out:
        run_config = cfg.build(MLMConfig, cfg.merge(cfg.to_dict(config), {"train": {"output_dir": out, "seed": seed}}))
        result = Trainer(_ClockedMaskedLM(run_config, clock, variant)).fit()
    last = [r for r in result.history if "loss" in r and r["step"] == config.train.max_steps]
    return last[-1]["loss"]


def run_mlm_dataset(corpus_train: datasets.Dataset, tokenizer, max_seq_length: int, num_proc: int) -> datasets.Dataset:
    """The training set exactly as run_mlm.py builds it (without --line_by_line)."""
    def tokenize_function(examples):
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // max_seq_length) * max_seq_length
        return {k: [t[i: i + max_seq_length] for i in range(0, total_length, max_seq_length)]
                for k, t in concatenated.items()}

    tokenized = corpus_train.map(tokenize_function, batched=True, num_proc=num_proc,
                                 remove_columns=corpus_train.column_names, desc="run_mlm: tokenizing")
    return tokenized.map(group_texts, batched=True, num_proc=num_proc, desc=f"run_mlm: grouping into {max_seq_length}")


def run_reference(config: MLMConfig, seed: int, clock: StepClock, train_dataset: datasets.Dataset, tokenizer) -> float:
    """Train with transformers.Trainer the run_mlm.py way, ticking `clock`; the mean loss of the last 10 steps."""
    t = config.train
    set_seed(seed)  # run_mlm seeds before building the model, so both sides start from the same weights
    model = BertForMaskedLM(bert_config(config, tokenizer))
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=config.masking.mlm_probability)
    with tempfile.TemporaryDirectory(prefix="mlm-bench-run_mlm-") as out:
        args = TrainingArguments(
            output_dir=out, seed=seed, max_steps=t.max_steps, per_device_train_batch_size=t.per_device_batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
            weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon,
            max_grad_norm=t.max_grad_norm or 0.0, lr_scheduler_type=_HF_SCHEDULES[t.lr_schedule],
            warmup_steps=warmup_steps(config), bf16=t.mixed_precision == "bf16", fp16=t.mixed_precision == "fp16",
            logging_strategy="steps", logging_steps=LOSS_WINDOW, save_strategy="no", eval_strategy="no",
            report_to="none", dataloader_num_workers=t.num_workers, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                                       data_collator=collator, callbacks=[_ClockCallback(clock)])
        trainer.train()
    last = [r for r in trainer.state.log_history if "loss" in r and r["step"] == t.max_steps]
    return last[-1]["loss"]


def bert_config(config: MLMConfig, tokenizer) -> BertConfig:
    """The same `BertConfig` the bert_mlm objective builds."""
    return BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, type_vocab_size=2,
                      **vars(config.model))


def warmup_steps(config: MLMConfig) -> int:
    t = config.train
    return t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * t.max_steps)


# -- report ------------------------------------------------------------------------------------
def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA)"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"CPU {cpu} ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads"


def report(results: list[RunResult], args: argparse.Namespace, config: MLMConfig, argv: list[str],
           tokens_per_step: int, load: tuple[float, float]) -> str:
    med = statistics.median
    names = list(dict.fromkeys(r.side for r in results))
    by = {(r.side, r.repeat): r for r in results}
    repeats = sorted({r.repeat for r in results})
    m, t = config.model, config.train
    lines = [
        "# Masked-LM throughput: selfsup trainer vs transformers `run_mlm.py`",
        "",
        f"Command: `{shlex.join(['python', 'benchmarks/mlm_throughput.py', *argv])}`",
        "",
        f"- {datetime.date.today()}, {device_name()}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, one process. 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} "
        "at the end (other processes on the same cores slow both sides, and many small ops the most).",
        f"- BERT {m.num_hidden_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, FFN "
        f"{m.intermediate_size}, vocab {config.tokenizer.vocab_size} ({config.tokenizer.kind}); sequences of "
        f"{config.data.max_seq_length}, batch {t.per_device_batch_size} x {t.gradient_accumulation_steps} accumulation "
        f"= {tokens_per_step} tokens/step; AdamW lr {t.learning_rate:g}, {warmup_steps(config)} warm-up steps, "
        f"{t.lr_schedule} decay, precision {t.mixed_precision}.",
        f"- Sides run in lockstep (one process each, one optimizer step each in turn), so all see the same "
        f"machine load. Timed: optimizer steps {args.skip_steps + 1}-{args.skip_steps + args.steps} of "
        f"{t.max_steps}, each from the side getting its turn to the end of its optimizer step (data, masking, "
        "forward, backward, optimizer, logging). tokens/s = timed tokens / timed seconds. Ratios are taken "
        "within each repeat, then the median over repeats. \"median step\" and \"fastest step\" compare those step "
        "times instead: robust to bursts of load from other processes, the fastest being the closest to an idle "
        f"machine. Loss: mean training loss of the last {LOSS_WINDOW} steps. Both "
        f"sides mask single tokens at p={config.masking.mlm_probability:g} (ours: `masking.whole_word false`). "
        f"Repeat r uses seed {t.seed}+r on every side; who steps first rotates.",
        "",
        f"| side | tokens/s (median of {len(repeats)}) | ratio vs run_mlm | ratio, median step | ratio, fastest step "
        "| loss (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        speed = med(by[name, i].tokens_per_s for i in repeats)
        ratio = med(by[name, i].tokens_per_s / by[REFERENCE, i].tokens_per_s for i in repeats)
        step_ratio = med(by[REFERENCE, i].median_step_s / by[name, i].median_step_s for i in repeats)
        fastest_ratio = med(by[REFERENCE, i].fastest_step_s / by[name, i].fastest_step_s for i in repeats)
        loss = med(by[name, i].final_loss for i in repeats)
        bold = "**" if name == OURS.name else ""
        lines.append(f"| {bold}{name}{bold} | {speed:,.0f} | {bold}{ratio:.2f}x{bold} | {step_ratio:.2f}x | {fastest_ratio:.2f}x | "
                     f"{bold}{loss:.4f}{bold} |")
    lines += ["", "Every run:", "", "| repeat | side | tokens/s | median step (ms) | fastest step (ms) | loss |",
              "|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r.repeat} | {r.side} | {r.tokens_per_s:,.0f} | {r.median_step_s * 1000:.0f} | "
              f"{r.fastest_step_s * 1000:.0f} | {r.final_loss:.4f} |" for r in results]
    return "\n".join(lines) + "\n"


def _load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _quiet_logs() -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("sslcore").setLevel(logging.WARNING)  # our per-step log lines would drown the table
    transformers.logging.set_verbosity_error()  # run_mlm's "sequence longer than max length" warnings


def _train_side(index: int, side: OursVariant | str, config: MLMConfig, seed: int, shared_dir: str,
                lockstep: Lockstep, results) -> None:
    """One side in its own process: wait for the first turn, train in turn with the others, report."""
    _quiet_logs()
    lockstep.wait_turn(index)
    clock = StepClock(lockstep, index)
    try:
        if side == REFERENCE:
            loss = run_reference(config, seed, clock, datasets.load_from_disk(f"{shared_dir}/run_mlm_train"),
                                 AutoTokenizer.from_pretrained(f"{shared_dir}/tokenizer"))
        else:
            loss = run_ours(config, seed, clock, side)
        results.put((index, clock.durations, loss, None))
    except BaseException:
        results.put((index, clock.durations, float("nan"), traceback.format_exc()))
    finally:
        lockstep.pass_turn(index, finished=True)


def run_lockstep(sides: list[OursVariant | str], config: MLMConfig, seed: int, shared_dir: str
                 ) -> list[tuple[list[float], float]]:
    """Train every side at once, one optimizer step each in turn; (step durations, loss) per side."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds OpenMP threads
    lockstep, results = Lockstep(context, len(sides)), context.Queue()
    processes = [context.Process(target=_train_side, args=(i, side, config, seed, shared_dir, lockstep, results))
                 for i, side in enumerate(sides)]
    for process in processes:
        process.start()
    reported: dict[int, tuple[list[float], float, str | None]] = {}
    while len(reported) < len(sides):
        try:
            index, durations, loss, error = results.get(timeout=5)
            reported[index] = (durations, loss, error)
        except queue.Empty:
            for i, process in enumerate(processes):
                if i not in reported and process.exitcode is not None:  # killed before reporting (e.g. OOM)
                    reported[i] = ([], float("nan"), f"the process exited with code {process.exitcode}")
                    lockstep.pass_turn(i, finished=True)
    for process in processes:
        process.join()
    errors = [f"{_name(sides[i])}: {error}" for i, (_, _, error) in sorted(reported.items()) if error]
    if errors:
        raise RuntimeError("a side failed:\n" + "\n".join(errors))
    return [reported[i][:2] for i in range(len(sides))]


def _name(side: OursVariant | str) -> str:
    return side if isinstance(side, str) else side.name


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    try:
        config = benchmark_config(args.config, overrides, args.skip_steps + args.steps)
    except cfg.ConfigError as error:
        sys.exit(f"config error: {error}")
    _quiet_logs()

    # The corpus, tokenizer and both datasets are built (or read from cache) before anything is timed.
    corpus, tokenizer = load_text(config.data, config.tokenizer)
    reference_train = run_mlm_dataset(corpus["train"], tokenizer, config.data.max_seq_length, config.data.num_proc)
    MaskedLMObjective(config).prepare()  # our packed blocks, cached for the training processes
    t = config.train
    tokens_per_step = t.per_device_batch_size * t.gradient_accumulation_steps * config.data.max_seq_length
    if len(reference_train) < t.max_steps * t.per_device_batch_size * t.gradient_accumulation_steps:
        print(f"note: run_mlm's data holds {len(reference_train)} blocks, fewer than {t.max_steps} steps use; "
              "both trainers start a new epoch when they run out", file=sys.stderr)

    results: list[RunResult] = []
    load_at_start = _load_average()
    sides: list[OursVariant | str] = [OURS, REFERENCE, *(ABLATIONS if args.ablations else ())]
    with tempfile.TemporaryDirectory(prefix="mlm-bench-") as shared_dir:
        reference_train.save_to_disk(f"{shared_dir}/run_mlm_train")
        tokenizer.save_pretrained(f"{shared_dir}/tokenizer")
        for repeat in range(args.repeats):
            seed = t.seed + repeat
            order = sides[repeat % len(sides):] + sides[:repeat % len(sides)]  # who steps first rotates
            for side, (durations, loss) in zip(order, run_lockstep(order, config, seed, shared_dir)):
                timed = durations[args.skip_steps:args.skip_steps + args.steps]
                if len(timed) < args.steps:
                    raise RuntimeError(f"{_name(side)} ran {len(durations)} steps, expected {t.max_steps}: too "
                                       "little data for the requested steps?")
                result = RunResult(_name(side), repeat, seed, tokens_per_step * args.steps / sum(timed),
                                   statistics.median(timed), min(timed), loss)
                results.append(result)
                print(f"repeat {repeat} {result.side}: {result.tokens_per_s:,.0f} tokens/s, median step "
                      f"{result.median_step_s * 1000:.0f} ms, loss(last {LOSS_WINDOW}) {loss:.4f}", flush=True)

    table = report(results, args, config, argv, tokens_per_step, (load_at_start, _load_average()))
    print("\n" + table)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(table)
    print(f"written to {args.results}")
    return table


if __name__ == "__main__":
    main()
