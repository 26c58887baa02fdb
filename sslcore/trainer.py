"""One Accelerate training loop for every objective and modality.

The loop knows no objective by name: it asks the objective for data, a model, a loss and an
export, and does the rest — accumulation, mixed precision, clipping, warm-up/decay, logging
with throughput and ETA, trackers, eval, a non-finite-loss guard, and atomic checkpoints that
resume exactly (same data position, same RNG, same final weights).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, send_to_device, set_seed
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from sslcore.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from sslcore.config import to_dict
from sslcore.data import EpochSampler, SeededCollator, SeededDataset, SeededIterable
from sslcore.objective import Objective
from sslcore.run_config import TrainConfig

logger = logging.getLogger("sslcore.trainer")

# A callback gets (trainer, step) at each eval and returns extra metrics to log (probes, samples).
EvalCallback = Callable[["Trainer", int], dict[str, float]]

_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup",
              "inverse_sqrt": "inverse_sqrt"}
_MAX_SKIPPED_IN_A_ROW = 10
_EVAL_EPOCH = -1  # example seeds for eval batches: fixed, so every eval sees the same masks


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
        if accelerator is None:
            # Accelerate keeps precision/accumulation settings in a process-wide singleton; a second
            # run in the same process (a notebook) must not inherit the first one's.
            AcceleratorState._reset_state()
        self.accelerator = accelerator or Accelerator(
            cpu=_multi_process_without_gpu(),
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            mixed_precision=self.args.mixed_precision,
            log_with=_available_trackers(self.args.report_to) or None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")),
        )
        self.history: list[dict[str, Any]] = []
        self.model = None
        self.should_stop = False
        """Set by a callback (early stopping) to end training after the current step."""

    # -- building -------------------------------------------------------------------------
    def _train_loader(self) -> tuple[DataLoader, EpochSampler | SeededIterable]:
        dataset = self.objective.train_dataset()
        if isinstance(dataset, datasets.IterableDataset):
            return self._stream_loader(dataset)
        sampler = EpochSampler(len(dataset), seed=self.args.seed, shuffle=True)
        loader = DataLoader(
            SeededDataset(dataset, self.args.seed), batch_size=self.args.per_device_batch_size,
            sampler=sampler, collate_fn=SeededCollator(self.objective.collate), drop_last=True,
            num_workers=self.args.num_workers, persistent_workers=self.args.num_workers > 0,
            # Every new iterator draws a base seed from this generator; from the global one it would
            # shift the dropout stream whenever a loader is (re)created, e.g. on resume.
            generator=torch.Generator().manual_seed(self.args.seed),
        )
        if len(loader) // self.accelerator.num_processes == 0:
            raise ValueError(
                f"the training set has {len(dataset)} examples, fewer than one global batch of "
                f"{self.args.per_device_batch_size * self.accelerator.num_processes}; use more data or a "
                "smaller train.per_device_batch_size"
            )
        return loader, sampler

    def _stream_loader(self, dataset: datasets.IterableDataset) -> tuple[DataLoader, SeededIterable]:
        """A streamed corpus: each process reads its own shard (`split_dataset_by_node`).

        Not passed to `accelerator.prepare` (which would make every process read everything and
        keep one batch in N); no workers, so the recorded position is exactly what was consumed.
        """
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
        sampler = EpochSampler(len(dataset), seed=self.args.seed, shuffle=False)
        loader = DataLoader(SeededDataset(dataset, self.args.seed), batch_size=self.args.per_device_batch_size,
                            sampler=sampler, collate_fn=SeededCollator(self.objective.collate),
                            generator=torch.Generator().manual_seed(self.args.seed))
        return self.accelerator.prepare(loader)

    def _optimizer_and_schedule(self, model: torch.nn.Module):
        args = self.args
        optimizer = self.objective.build_optimizer(model, args)
        warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(args.warmup_ratio * args.max_steps)
        scheduler = get_scheduler(_SCHEDULES[args.lr_schedule], optimizer, num_warmup_steps=warmup,
                                  num_training_steps=args.max_steps)
        return optimizer, scheduler

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        args, acc = self.args, self.accelerator
        if acc.is_main_process:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        set_seed(args.seed)  # same seed on every process: identical init, dropout streams per rank
        with acc.main_process_first():
            self.objective.prepare(acc)
        train_loader, sampler = self._train_loader()
        # Seed again: what `prepare` drew (building a corpus, or finding it cached) must not move the init.
        set_seed(args.seed)
        model = self.objective.build_model()
        optimizer, scheduler = self._optimizer_and_schedule(model)
        # The scheduler is stepped by hand once per optimizer step: prepared schedulers step once
        # per process, which would make the LR depend on the process count.
        streaming = isinstance(sampler, SeededIterable)
        model, optimizer = acc.prepare(model, optimizer)
        if not streaming:
            train_loader = acc.prepare(train_loader)
        eval_loader = self._eval_loader()
        self.model = model

        step, epoch, batches_done, start_state = 0, 0, 0, None
        resume_path = resolve_resume(args.resume, self.output_dir)
        if args.resume and resume_path is None:
            logger.warning("--resume %s: no checkpoint in %s yet, starting from scratch", args.resume, self.output_dir)
        if resume_path is not None:
            start_state = load_checkpoint(acc, model, optimizer, scheduler, resume_path, self.objective.fingerprint())
            step, epoch, batches_done = start_state["step"], start_state["epoch"], start_state["batches_in_epoch"]
            self.history = start_state.get("history", [])
            if streaming:
                sampler.load_state_dict(start_state["process_state"])
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, step, epoch, batches_done)

        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(to_dict(self.objective.config), indent=1))
        if acc.log_with:
            acc.init_trackers(self.objective.name, config=_flat(to_dict(self.objective.config)))

        hooks = self.objective.step_hooks()
        global_batch = args.per_device_batch_size * acc.num_processes * args.gradient_accumulation_steps
        logger.info("training %s: %d steps, global batch %d (%d process(es) x %d x %d accumulation), %.2fM params",
                    self.objective.name, args.max_steps, global_batch, acc.num_processes,
                    args.per_device_batch_size, args.gradient_accumulation_steps,
                    sum(p.numel() for p in model.parameters()) / 1e6)
        bar = tqdm(total=args.max_steps, initial=step, disable=not (args.progress_bar and acc.is_local_main_process),
                   desc=self.objective.name, dynamic_ncols=True)

        window = {"units": 0, "time": time.perf_counter(), "logs": [], "skipped": 0,
                  "start": time.perf_counter(), "start_step": step}  # start/start_step: for the ETA
        skipped_in_a_row, last_loss, eval_logs = 0, float("nan"), {}
        model.train()
        while step < args.max_steps and not self.should_stop:
            sampler.set_epoch(epoch)
            if streaming:  # the stream itself knows its position; batches go to the device by hand
                loader = (send_to_device(batch, acc.device) for batch in train_loader)
            else:
                loader = acc.skip_first_batches(train_loader, batches_done) if batches_done else train_loader
                # Accelerate's loaders re-apply their own epoch counter when iterated: set it there,
                # or a resumed (new) loader would replay epoch 0's order.
                loader.set_epoch(epoch)
            batches_at_epoch_start = batches_done
            for batch in loader:
                batches_done += 1
                with acc.accumulate(model):
                    loss, logs = self.objective.loss(model, batch)
                    if not self._all_finite(loss):
                        skipped_in_a_row += 1
                        self._on_nonfinite(loss, logs, step, batches_done, skipped_in_a_row)
                        optimizer.zero_grad(set_to_none=True)
                        window["skipped"] += 1
                        continue
                    skipped_in_a_row = 0
                    acc.backward(loss)
                    if acc.sync_gradients and args.max_grad_norm is not None:
                        logs["grad_norm"] = acc.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window["units"] += self.objective.count(batch)
                window["logs"].append({"loss": loss.detach(), **logs})
                if not acc.sync_gradients:
                    continue

                step += 1
                scheduler.step()
                unwrapped = acc.unwrap_model(model)
                for hook in hooks:
                    hook(unwrapped, step)
                bar.update(1)
                if step % args.log_every == 0 or step == args.max_steps:
                    last_loss = self._log_window(window, step, scheduler.get_last_lr()[0], bar)
                if eval_loader is not None and args.eval_every and step % args.eval_every == 0:
                    eval_logs = self.evaluate(eval_loader, step)
                if (args.save_every and step % args.save_every == 0) or step == args.max_steps or self.should_stop:
                    self._save(model, optimizer, scheduler, step, epoch, batches_done,
                               sampler.state_dict() if streaming else None)
                if step >= args.max_steps or self.should_stop:
                    break
            else:  # the epoch ran out
                if batches_done == batches_at_epoch_start == 0:
                    raise ValueError(f"the training data gave no full batch of {args.per_device_batch_size} on process "
                                     f"{acc.process_index}; add data or lower train.per_device_batch_size")
                epoch, batches_done = epoch + 1, 0
        bar.close()
        if eval_loader is not None and not (args.eval_every and step % args.eval_every == 0):
            eval_logs = self.evaluate(eval_loader, step)
        return self._finish(model, step, last_loss, eval_logs)

    # -- pieces of the loop -----------------------------------------------------------------
    def _all_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).all().float()
        if self.accelerator.num_processes > 1:  # all ranks must agree, or DDP would hang in backward
            finite = self.accelerator.reduce(finite.to(self.accelerator.device), reduction="min")
        return bool(finite.item())

    def _on_nonfinite(self, loss, logs, step, batch, in_a_row) -> None:
        where = f"non-finite loss ({loss.item()}) at step {step + 1} (batch {batch} of the epoch); logs: " + ", ".join(
            f"{k}={float(v):.4g}" for k, v in logs.items())
        advice = ("Lower train.learning_rate, raise train.warmup_steps, keep train.max_grad_norm set, or use "
                  "bf16 instead of fp16. Checkpoints already written are untouched; resume with --resume latest.")
        if self.args.on_nonfinite == "stop":
            raise NonFiniteLossError(f"{where}. {advice}")
        if in_a_row >= _MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteLossError(f"{where}; {in_a_row} batches in a row were skipped, stopping. {advice}")
        logger.warning("%s; skipping this batch (train.on_nonfinite=skip)", where)

    def _log_window(self, window: dict, step: int, lr: float, bar: tqdm) -> float:
        """Average the logs since the last report over micro-batches and processes; print; track."""
        acc = self.accelerator
        # grad_norm exists only on micro-batches that stepped, so average each key where present.
        keys = list(dict.fromkeys(k for entry in window["logs"] for k in entry))
        means = torch.stack([torch.stack([torch.as_tensor(entry[k], dtype=torch.float32).detach().cpu()
                                          for entry in window["logs"] if k in entry]).mean()
                             for k in keys]) if keys else torch.zeros(0)
        means = acc.reduce(means.to(acc.device), reduction="mean").cpu() if acc.num_processes > 1 else means
        logs = {k: float(v) for k, v in zip(keys, means)}
        elapsed = time.perf_counter() - window["time"]
        per_second = window["units"] * acc.num_processes / max(elapsed, 1e-9)
        logs.update({"lr": lr, f"{self.objective.unit}_per_s": per_second, "skipped_batches": window["skipped"]})
        steps_run = step - window["start_step"]
        eta = _format_duration((self.args.max_steps - step) * (time.perf_counter() - window["start"]) / steps_run)
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
        window.update(units=0, time=time.perf_counter(), logs=[], skipped=0)
        return logs.get("loss", float("nan"))

    @torch.no_grad()
    def evaluate(self, eval_loader: DataLoader, step: int) -> dict[str, float]:
        """Mean of the objective's logs over (a cap of) the eval set, gathered over processes."""
        acc, model = self.accelerator, self.model
        model.eval()
        sums: dict[str, list[torch.Tensor]] = {}
        eval_loader.set_epoch(_EVAL_EPOCH)  # the same masks/negatives at every evaluation
        for i, batch in enumerate(eval_loader):
            if self.args.eval_batches is not None and i >= self.args.eval_batches:
                break
            loss, logs = self.objective.loss(model, batch)
            for key, value in {"loss": loss, **logs}.items():
                value = torch.as_tensor(value, dtype=torch.float32, device=acc.device).detach().reshape(1)
                sums.setdefault(key, []).append(value)
        model.train()
        results = {f"eval_{k}": float(acc.gather_for_metrics(torch.cat(v)).mean()) for k, v in sums.items()}
        if "eval_loss" in results and self.objective.reports_perplexity:
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

    def _save(self, model, optimizer, scheduler, step: int, epoch: int, batches_done: int,
              process_state: dict | None) -> None:
        state = {"step": step, "epoch": epoch, "batches_in_epoch": batches_done,
                 "num_processes": self.accelerator.num_processes, "objective": self.objective.name,
                 "fingerprint": self.objective.fingerprint(), "history": self.history}
        path = save_checkpoint(self.accelerator, model, optimizer, scheduler, state, self.output_dir,
                               self.args.keep_checkpoints, process_state)
        logger.info("checkpoint written: %s", path)

    def _finish(self, model, step: int, last_loss: float, eval_logs: dict[str, float]) -> TrainResult:
        acc = self.accelerator
        acc.wait_for_everyone()
        result = TrainResult(output_dir=self.output_dir, step=step, final_loss=last_loss, history=self.history,
                             eval=eval_logs)
        if acc.is_main_process:
            from sslcore.plotting import plot_history

            plot_history(self.history, self.output_dir / "loss_curve.png", title=self.objective.name)
            if self.args.export:
                summary = {"steps": step, "final_loss": last_loss, **eval_logs,
                           "checkpoint": str(list_checkpoints(self.output_dir)[-1:] or "")}
                result.export_dir = self.objective.export(acc.unwrap_model(model), self.output_dir / "model", summary)
                logger.info("exported to %s", result.export_dir)
        acc.end_training()
        return result
