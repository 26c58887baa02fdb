"""One Accelerate training loop for every objective and modality.

The loop knows no objective by name: it asks the objective for data, a model, a loss and an
export, and does the rest — accumulation, mixed precision, clipping, warm-up/decay, logging
with throughput and ETA, trackers, eval, a non-finite-loss guard, and atomic checkpoints that
resume exactly (same data position, same RNG, same final weights).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import accelerate.optimizer as _accelerate_optimizer
from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, send_to_device, set_seed
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from sslcore.checkpoint import (
    CheckpointRotation,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    resolve_resume,
    save_checkpoint,
)
from sslcore.config import ConfigError, to_dict
from sslcore.data import (
    ProcessBatches,
    SeededCollator,
    SeededDataset,
    SeededIterable,
    ShuffledBatches,
    example_seed,
    read_ahead,
)
from sslcore.hub import redact
from sslcore.objective import LossContext, Objective, Ratio
from sslcore.run_config import TrainConfig

logger = logging.getLogger("sslcore.trainer")

# Accelerate's optimizer wrapper asks importlib whether `lomo_optim` is installed twice per step (a sys.path
# search: ~2 ms of CPU, a fifth of a word2vec CBOW step). The answer cannot change within a run: ask once.
_accelerate_optimizer.is_lomo_available = functools.cache(_accelerate_optimizer.is_lomo_available)

# A callback gets (trainer, step) at each eval and returns extra metrics to log (probes, samples).
EvalCallback = Callable[["Trainer", int], dict[str, float]]

_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup",
              "inverse_sqrt": "inverse_sqrt"}
_MAX_SKIPPED_IN_A_ROW = 10
_EVAL_EPOCH = -1  # example seeds for eval batches: fixed, so every eval sees the same masks
_RANK_STREAM = -3  # "epoch" of the per-rank model RNG seed (dropout), apart from data seeds


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message says where and what usually fixes it."""


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    final_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)
    export_dir: Path | None = None
    eval: dict[str, float] = field(default_factory=dict)


def _available_trackers(names: list[str]) -> list[str]:
    """Keep the requested trackers whose packages are installed (a missing one is a warning)."""
    import importlib.util

    modules = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
               "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}
    kept = []
    for name in names:
        if importlib.util.find_spec(modules.get(name, name)) is None:
            logger.warning("tracker %r requested but its package is not installed; skipping it", name)
        else:
            kept.append(name)
    return kept


def _multi_process_without_gpu() -> bool:
    """True under torchrun/`accelerate launch --multi_gpu` on a machine with no GPU.

    Accelerate only sets up a CPU process group (gloo) when told `cpu=True`; without it each of
    the N processes would silently train alone. (`accelerate launch --cpu` starts a single
    process unless given an MPI hostfile, so `--multi_gpu --num_processes N` is the CPU route.)
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


# Set by `accelerate launch` / torchrun, which both export OMP_NUM_THREADS=1 unless told otherwise.
_LAUNCHER_VARIABLES = {"ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID"}


def configure_threads(requested: int | None, loader_workers: int = 0) -> tuple[int, str]:
    """Set torch's intra-op threads for this process; return (threads, why).

    `accelerate launch` and torchrun export OMP_NUM_THREADS=1 unless told otherwise, so a
    one-process CPU run would use one core of many. Policy: `train.num_threads` if set; else
    OMP_NUM_THREADS when set outside a launcher; else the cores this process may use divided by
    the processes on this machine, less its DataLoader workers (each keeps a core busy collating).
    """
    if requested is not None:
        threads, why = requested, "train.num_threads"
    elif "OMP_NUM_THREADS" in os.environ and not _LAUNCHER_VARIABLES & set(os.environ):
        threads, why = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, cores // local - loader_workers)
        why = (f"{cores} cores / {local} process(es) on this machine"
               + (f" - {loader_workers} loader worker(s)" if loader_workers else "") + "; pin with --train.num_threads")
    torch.set_num_threads(threads)
    return threads, why


class _Window:
    """Logged values since the last report, reduced exactly over micro-batches and processes:
    each key holds (sum of numerators, sum of denominators)."""

    def __init__(self, step: int):
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.units, self.skipped, self.time = 0, 0, time.perf_counter()
        self.start, self.start_step = self.time, step  # for the ETA

    def add(self, key: str, value: Any) -> None:
        numerator, denominator = value if isinstance(value, Ratio) else (value, 1.0)
        entry = self.sums.setdefault(key, [torch.zeros((), dtype=torch.float64)] * 2)
        entry[0] = entry[0] + torch.as_tensor(numerator, dtype=torch.float64).detach().cpu().sum()
        entry[1] = entry[1] + torch.as_tensor(denominator, dtype=torch.float64).detach().cpu().sum()

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        keys = sorted(self.sums)
        if not keys:
            return {}
        table = torch.stack([torch.stack(self.sums[k]) for k in keys])
        if accelerator.num_processes > 1:
            table = accelerator.reduce(table.to(accelerator.device), reduction="sum").cpu()
        return {k: float(num / den) if den > 0 else float("nan") for k, (num, den) in zip(keys, table)}

    def reset(self) -> None:
        self.sums, self.units, self.skipped, self.time = {}, 0, 0, time.perf_counter()


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config for trackers (tensorboard hparams take scalars only)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, int | float | str | bool):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Trainer:
    """Trains `objective` with the `train` section of its config. Call `fit()`."""

    def __init__(self, objective: Objective, accelerator: Accelerator | None = None,
                 callbacks: list[EvalCallback] | None = None):
        self.objective = objective
        self.args: TrainConfig = objective.config.train
        self.callbacks = list(callbacks or [])
        self.output_dir = Path(self.args.output_dir)
        if self.args.gradient_accumulation_steps > 1 and not objective.supports_accumulation:
            raise ConfigError(
                f"objective {objective.name} draws negatives from within the batch, so accumulating "
                f"{self.args.gradient_accumulation_steps} micro-batches is not one batch of that size; set "
                "train.gradient_accumulation_steps 1 and raise train.per_device_batch_size or the process count")
        if accelerator is None:
            # Accelerate keeps precision settings in a process-wide singleton; a second run in the same
            # process (a notebook) must not inherit the first one's.
            AcceleratorState._reset_state()
        ddp = objective.ddp_options()
        # Accumulation is done here, not by Accelerate: the loss is normalised by the count of the whole
        # window (LossContext), so Accelerate must not divide it again.
        self.accelerator = accelerator or Accelerator(
            cpu=_multi_process_without_gpu(),
            mixed_precision=self.args.mixed_precision,
            log_with=_available_trackers(self.args.report_to) or None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")),
            kwargs_handlers=[DistributedDataParallelKwargs(**ddp)] if ddp else None,
        )
        if self.accelerator.gradient_accumulation_steps != 1:
            raise ConfigError("pass gradient accumulation as train.gradient_accumulation_steps, not to Accelerate "
                              "(the trainer normalises the loss over the accumulation window itself)")
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError(
                f"{self.accelerator.distributed_type.value} shards weights across processes; selfsup's checkpoints "
                "and exports do not gather sharded weights yet, so they would hang or write partial files. Use DDP "
                "(`accelerate launch --multi_gpu`), which every preset fits on one GPU.")
        self.history: list[dict[str, Any]] = []
        self.model = None
        self.should_stop = False
        """Set by a callback (early stopping) to end training after the current step."""

    # -- building -------------------------------------------------------------------------
    def _train_loader(self) -> tuple[DataLoader, ProcessBatches | SeededIterable]:
        dataset = self.objective.train_dataset()
        if isinstance(dataset, datasets.IterableDataset):
            return self._stream_loader(dataset)
        acc, args = self.accelerator, self.args
        plan = (self.objective.batch_sampler(dataset, args.per_device_batch_size, args.seed)
                or ShuffledBatches(len(dataset), args.per_device_batch_size, args.seed))
        batches = ProcessBatches(plan, acc.process_index, acc.num_processes,
                                 accumulation=args.gradient_accumulation_steps)
        if len(batches) == 0:
            raise ValueError(
                f"the training set has {len(dataset)} examples, fewer than one global batch of "
                f"{args.per_device_batch_size * acc.num_processes * args.gradient_accumulation_steps}; use more "
                "data, a smaller train.per_device_batch_size or less accumulation")
        loader = DataLoader(
            SeededDataset(dataset, args.seed), batch_sampler=batches, collate_fn=SeededCollator(self.objective.collate),
            num_workers=args.num_workers, persistent_workers=args.num_workers > 0,
            # Every new iterator draws a base seed from this generator; from the global one it would
            # shift the dropout stream whenever a loader is (re)created, e.g. on resume.
            generator=torch.Generator().manual_seed(args.seed),
        )
        return loader, batches

    def _stream_loader(self, dataset: datasets.IterableDataset) -> tuple[DataLoader, SeededIterable]:
        """A streamed corpus: each process reads its own shard (`split_dataset_by_node`); no workers,
        so the recorded position is exactly what was consumed."""
        acc = self.accelerator
        shard = split_dataset_by_node(dataset, rank=acc.process_index, world_size=acc.num_processes)
        stream = SeededIterable(shard, self.args.seed, acc.process_index)
        loader = DataLoader(stream, batch_size=self.args.per_device_batch_size, drop_last=True,
                            collate_fn=SeededCollator(self.objective.collate))
        return loader, stream

    def _eval_loader(self) -> DataLoader | None:
        dataset = self.objective.eval_dataset()
        if dataset is None or len(dataset) == 0:
            return None
        acc, args = self.accelerator, self.args
        plan = ShuffledBatches(len(dataset), args.per_device_batch_size, args.seed, shuffle=False, drop_last=False)
        # eval_batches counts micro-batches over all processes: N processes evaluate the same rows as one.
        limit = None if args.eval_batches is None else max(1, args.eval_batches // acc.num_processes)
        batches = ProcessBatches(plan, acc.process_index, acc.num_processes, limit=limit)
        batches.set_epoch(_EVAL_EPOCH)  # the same masks/negatives at every evaluation
        if len(batches) == 0:
            return None
        return DataLoader(SeededDataset(dataset, args.seed), batch_sampler=batches,
                          collate_fn=SeededCollator(self.objective.collate))

    def _optimizer_and_schedule(self, model: torch.nn.Module):
        args = self.args
        optimizer = self.objective.build_optimizer(model, args)
        warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(args.warmup_ratio * args.max_steps)
        if warmup >= args.max_steps > 0:
            logger.warning("train.warmup_steps (%d) >= train.max_steps (%d): the run ends before the learning rate "
                           "has finished warming up; lower the warm-up or train longer", warmup, args.max_steps)
        scheduler = get_scheduler(_SCHEDULES[args.lr_schedule], optimizer, num_warmup_steps=warmup,
                                  num_training_steps=args.max_steps)
        return optimizer, scheduler

    def _micro_batches(self, train_loader, sampler, streaming: bool, epoch: int, start: int) -> Iterator[dict]:
        if streaming:  # the stream itself knows its position
            sampler.set_epoch(epoch)
        else:  # skip to the position by index: no batch before it is read or collated
            sampler.set_epoch(epoch, start)
        # A stream's position is what was consumed, so it is never read ahead; a planned epoch's is its index.
        threaded = self.args.read_ahead and self.args.num_workers == 0 and not streaming
        for batch in read_ahead(train_loader) if threaded else train_loader:
            yield send_to_device(batch, self.accelerator.device)

    def _windows(self, batches: Iterator[dict]) -> Iterator[list[dict]]:
        """Group micro-batches into accumulation windows (whole ones: the batch plan deals whole steps;
        only a stream can end an epoch mid-window)."""
        window: list[dict] = []
        for batch in batches:
            window.append(batch)
            if len(window) == self.args.gradient_accumulation_steps:
                yield window
                window = []
        if window:
            yield window

    def _global_counts(self, window: list[dict]) -> tuple[dict[str, float], list[dict[str, float]]]:
        """Each loss term's item count over the window and all processes (one all-reduce a step)."""
        local = [{k: float(v) for k, v in self.objective.targets(batch).items()} for batch in window]
        keys = sorted(local[0])
        totals = torch.tensor([sum(c[k] for c in local) for k in keys], dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction="sum").cpu()
        return dict(zip(keys, totals.tolist())), local

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        args, acc = self.args, self.accelerator
        if acc.is_main_process:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # A read-ahead thread keeps a core busy building batches, as a worker does.
        threads, why = configure_threads(args.num_threads, args.num_workers or int(args.read_ahead))
        logger.info("torch uses %d thread(s) per process (%s)", threads, why)
        resume_path = resolve_resume(args.resume, self.output_dir)
        if resume_path is not None and self._already_finished(resume_path):
            return self._finished_result(resume_path)
        set_seed(args.seed)
        with acc.main_process_first():
            self.objective.prepare(acc)
        train_loader, sampler = self._train_loader()
        # Seed again: what `prepare` drew (building a corpus, or finding it cached) must not move the init.
        set_seed(args.seed)
        model = self.objective.prepare_model(self.objective.build_model(), acc)
        optimizer, scheduler = self._optimizer_and_schedule(model)
        # The scheduler is stepped by hand once per optimizer step: prepared schedulers step once
        # per process, which would make the LR depend on the process count.
        streaming = isinstance(sampler, SeededIterable)
        model, optimizer = acc.prepare(model, optimizer)
        # Same init everywhere (above); from here on each rank draws its own dropout/LayerDrop masks.
        torch.manual_seed(example_seed(args.seed, _RANK_STREAM, acc.process_index))
        eval_loader = self._eval_loader()
        self.model = model

        step, epoch, batches_done = 0, 0, 0
        rotation = CheckpointRotation(self.output_dir, args.keep_checkpoints, resumed_from=resume_path)
        if resume_path is not None:
            start_state = load_checkpoint(acc, model, optimizer, scheduler, resume_path, self._fingerprint(),
                                          self.objective)
            step, epoch, batches_done = start_state["step"], start_state["epoch"], start_state["batches_in_epoch"]
            self.history = start_state.get("history", [])
            if streaming:
                sampler.load_state_dict(start_state["process_state"])
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, step, epoch, batches_done)
        elif rotation.stale and acc.is_main_process:
            logger.warning("%s holds checkpoints of an earlier run (%s); this run starts from scratch and removes "
                           "them at its first checkpoint. To continue that run instead, pass --resume.",
                           self.output_dir, rotation.stale[-1].name)

        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(redact(to_dict(self.objective.config)), indent=1))
        if acc.log_with:
            acc.init_trackers(self.objective.name, config=_flat(redact(to_dict(self.objective.config))))

        hooks = self.objective.step_hooks()
        unwrapped = acc.unwrap_model(model)  # once: unwrapping every step cost ~0.7 ms (word2vec steps take ~10)
        global_batch = args.per_device_batch_size * acc.num_processes * args.gradient_accumulation_steps
        logger.info("training %s: %d steps, global batch %d (%d process(es) x %d x %d accumulation), %.2fM params",
                    self.objective.name, args.max_steps, global_batch, acc.num_processes,
                    args.per_device_batch_size, args.gradient_accumulation_steps,
                    sum(p.numel() for p in model.parameters()) / 1e6)
        bar = tqdm(total=args.max_steps, initial=step, disable=not (args.progress_bar and acc.is_local_main_process),
                   desc=self.objective.name, dynamic_ncols=True)

        window = _Window(step)
        skipped_in_a_row, last_loss, eval_logs = 0, float("nan"), {}
        model.train()
        while step < args.max_steps and not self.should_stop:
            micro = self._micro_batches(train_loader, sampler, streaming, epoch, batches_done)
            stepped_this_epoch = False
            for batches in self._windows(micro):
                batches_done += len(batches)
                finite = self._accumulate(model, batches, window)
                if not finite:
                    skipped_in_a_row += 1
                    self._on_nonfinite(window, step, batches_done, skipped_in_a_row)
                    optimizer.zero_grad(set_to_none=True)
                    continue
                skipped_in_a_row = 0
                if args.max_grad_norm is not None:
                    window.add("grad_norm", acc.clip_grad_norm_(model.parameters(), args.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stepped_this_epoch = True

                step += 1
                scheduler.step()
                for hook in hooks:
                    hook(unwrapped, step)
                bar.update(1)
                if step % args.log_every == 0 or step == args.max_steps:
                    last_loss = self._log_window(window, step, scheduler.get_last_lr()[0], bar)
                if eval_loader is not None and args.eval_every and step % args.eval_every == 0:
                    eval_logs = self.evaluate(eval_loader, step)
                if (args.save_every and step % args.save_every == 0) or step == args.max_steps or self.should_stop:
                    self._save(model, optimizer, scheduler, step, epoch, batches_done, rotation,
                               sampler.state_dict() if streaming else None)
                if step >= args.max_steps or self.should_stop:
                    break
            else:  # the epoch ran out
                if not stepped_this_epoch and batches_done == 0:
                    raise ValueError(f"the training data gave no full batch of {args.per_device_batch_size} on process "
                                     f"{acc.process_index}; add data or lower train.per_device_batch_size")
                epoch, batches_done = epoch + 1, 0
        bar.close()
        if eval_loader is not None and not (args.eval_every and step % args.eval_every == 0):
            eval_logs = self.evaluate(eval_loader, step)
        return self._finish(model, step, last_loss, eval_logs)

    # -- pieces of the loop -----------------------------------------------------------------
    def _accumulate(self, model, batches: list[dict], window: _Window) -> bool:
        """Forward and backward every micro-batch of one optimizer step; False if a loss was not finite.

        Gradients are synchronised across processes only on the last micro-batch (`no_sync` before).
        Finiteness is checked once per step (one host sync, agreed by all processes), not per batch.
        """
        acc = self.accelerator
        counts, local_counts = self._global_counts(batches)
        finite = torch.ones((), device=acc.device)
        logged: list[tuple[str, Any]] = []
        step_loss = torch.zeros((), dtype=torch.float64, device=acc.device)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else acc.no_sync(model):
                ctx = LossContext(counts, acc.num_processes, acc.process_index, training=True)
                loss, logs = self.objective.loss(model, batch, ctx)
                finite = finite * torch.isfinite(loss.detach()).all()
                acc.backward(loss)
            step_loss += loss.detach().double()
            window.units += self.objective.count(batch)
            logged.extend(logs.items())
            if len(ctx.terms) > 1:  # each term's exact mean, beside the total
                logged.extend((f"{name}_loss", Ratio(total * weight, local_counts[i][name] if name in local_counts[i]
                                                     else 1.0)) for name, (total, _, weight) in ctx.terms.items())
        if acc.num_processes > 1:  # all ranks must agree, or one would step while another skips
            finite = acc.reduce(finite.float(), reduction="min")
        if not bool(finite):
            window.skipped += 1
            self._last_bad = (step_loss, logged)
            return False
        # Each process's share was scaled by P (LossContext.mean), so the shares summed over processes
        # are P x the global mean, and the denominators (1 per process) sum to P.
        window.add("loss", Ratio(step_loss, 1.0))
        for key, value in logged:
            window.add(key, value)
        return True

    def _on_nonfinite(self, window: _Window, step: int, batch: int, in_a_row: int) -> None:
        loss, logged = self._last_bad
        where = (f"non-finite loss ({float(loss)}) at step {step + 1} (batch {batch} of the epoch); logs: "
                 + ", ".join(f"{k}={float(v[0] / v[1] if isinstance(v, Ratio) else v):.4g}" for k, v in logged))
        advice = ("Lower train.learning_rate, raise train.warmup_steps, keep train.max_grad_norm set, or use "
                  "bf16 instead of fp16. Checkpoints already written are untouched; resume with --resume latest.")
        if self.args.on_nonfinite == "stop":
            raise NonFiniteLossError(f"{where}. {advice}")
        if in_a_row >= _MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteLossError(f"{where}; {in_a_row} steps in a row were skipped, stopping. {advice}")
        logger.warning("%s; skipping this step (train.on_nonfinite=skip)", where)

    def _log_window(self, window: _Window, step: int, lr: float, bar: tqdm) -> float:
        """Report the window's exact means over micro-batches and processes; print; track."""
        acc = self.accelerator
        logs = window.reduce(acc)
        elapsed = time.perf_counter() - window.time
        per_second = window.units * acc.num_processes / max(elapsed, 1e-9)
        logs.update({"lr": lr, f"{self.objective.unit}_per_s": per_second, "skipped_steps": window.skipped})
        steps_run = max(step - window.start_step, 1)
        eta = _format_duration((self.args.max_steps - step) * (time.perf_counter() - window.start) / steps_run)
        record = {"step": step, **logs}
        self.history.append(record)
        if acc.is_main_process:
            bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}", **{self.objective.unit + "/s": f"{per_second:,.0f}"})
            shown = " | ".join(f"{k} {v:.4g}" for k, v in logs.items() if k not in ("lr", f"{self.objective.unit}_per_s"))
            logger.info("step %d/%d | %s | lr %.3g | %s %s/s | eta %s", step, self.args.max_steps, shown, lr,
                        f"{per_second:,.0f}", self.objective.unit, eta)
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if acc.log_with:
            acc.log({f"train/{k}": v for k, v in logs.items()}, step=step)
        window.reset()
        return logs.get("loss", float("nan"))

    @torch.no_grad()
    def evaluate(self, eval_loader: DataLoader, step: int) -> dict[str, float]:
        """Exact means over (a global cap of) the eval set and all processes: each loss term's summed
        total over its summed count, so the eval loss does not depend on the batch or process count."""
        acc, model = self.accelerator, self.model
        model.eval()
        window = _Window(step)
        terms: dict[str, float] = {}
        for batch in eval_loader:
            batch = send_to_device(batch, acc.device)
            counts = {k: float(v) for k, v in self.objective.targets(batch).items()}
            ctx = LossContext(counts, acc.num_processes, acc.process_index, training=False)
            _, logs = self.objective.loss(model, batch, ctx)
            for name, (total, count, weight) in ctx.terms.items():
                terms[name] = weight
                window.add(f"term:{name}", Ratio(total, count))
            for key, value in logs.items():
                window.add(key, value)
        model.train()
        reduced = window.reduce(acc)
        results = {f"eval_{k}": v for k, v in reduced.items() if not k.startswith("term:")}
        term_means = {name: reduced[f"term:{name}"] for name in terms}
        results["eval_loss"] = sum(terms[name] * mean for name, mean in term_means.items())
        if len(term_means) > 1:
            results.update({f"eval_{name}_loss": terms[name] * mean for name, mean in term_means.items()})
        if self.objective.reports_perplexity:
            results["eval_perplexity"] = math.exp(min(results["eval_loss"], 50.0))
        for callback in self.callbacks:
            results.update(callback(self, step))
        if acc.is_main_process:
            logger.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **results}) + "\n")
        self.history.append({"step": step, **results})
        if acc.log_with:
            acc.log({k.replace("eval_", "eval/"): v for k, v in results.items()}, step=step)
        return results

    def _fingerprint(self) -> dict[str, Any]:
        """The objective's fingerprint plus what fixes the data position: a different seed, batch size or
        accumulation would resume at the wrong place in the data."""
        args = self.args
        return {**self.objective.fingerprint(),
                "data_order": {"seed": args.seed, "per_device_batch_size": args.per_device_batch_size,
                               "gradient_accumulation_steps": args.gradient_accumulation_steps}}

    def _save(self, model, optimizer, scheduler, step: int, epoch: int, batches_done: int,
              rotation: CheckpointRotation, process_state: dict | None) -> None:
        state = {"step": step, "epoch": epoch, "batches_in_epoch": batches_done, "max_steps": self.args.max_steps,
                 "num_processes": self.accelerator.num_processes, "objective": self.objective.name,
                 "fingerprint": self._fingerprint(), "history": self.history}
        path = save_checkpoint(self.accelerator, model, optimizer, scheduler, state, self.output_dir, rotation,
                               process_state, objective_state=self.objective.state_dict(),
                               on_each_node=self.args.save_on_each_node)
        logger.info("checkpoint written: %s", path)

    def _already_finished(self, checkpoint: Path) -> bool:
        return read_trainer_state(checkpoint)["step"] >= self.args.max_steps

    def _finished_result(self, checkpoint: Path) -> TrainResult:
        """Resuming a run that already reached max_steps: nothing to train, nothing rewritten."""
        state = read_trainer_state(checkpoint)
        if self.accelerator.is_main_process:
            logging.getLogger().setLevel(logging.INFO)
            logger.info("%s already finished at step %d (train.max_steps %d): nothing to do. Raise "
                        "--train.max_steps to train further.", checkpoint, state["step"], self.args.max_steps)
        history = state.get("history", [])
        losses = [h["loss"] for h in history if "loss" in h]
        evals = [h for h in history if any(k.startswith("eval_") for k in h)]
        export = self.output_dir / "model"
        self._end_trackers()
        return TrainResult(output_dir=self.output_dir, step=state["step"], final_loss=losses[-1] if losses else float("nan"),
                           history=history, export_dir=export if export.is_dir() else None,
                           eval={k: v for k, v in evals[-1].items() if k != "step"} if evals else {})

    def _finish(self, model, step: int, last_loss: float, eval_logs: dict[str, float]) -> TrainResult:
        acc = self.accelerator
        acc.wait_for_everyone()
        result = TrainResult(output_dir=self.output_dir, step=step, final_loss=last_loss, history=self.history,
                             eval=eval_logs)
        if acc.is_main_process:
            from sslcore.plotting import plot_history

            plot_history(self.history, self.output_dir / "loss_curve.png", title=self.objective.name)
            if self.args.export:
                latest = latest_checkpoint(self.output_dir)
                summary = {"steps": step, "final_loss": last_loss, **eval_logs, "checkpoint": str(latest or "")}
                result.export_dir = self.objective.export(acc.unwrap_model(model), self.output_dir / "model", summary)
                logger.info("exported to %s", result.export_dir)
        self._end_trackers()
        return result

    def _end_trackers(self) -> None:
        """What `Accelerator.end_training` does, minus destroying the process group: the launcher owns the
        group (`run_cli` releases it at exit), so one launch can train several runs (fine-tuning seeds)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
