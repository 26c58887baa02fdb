"""The one seam: an objective is everything that makes a pretext task, and nothing else.

The trainer calls only what is declared here. Adding a method = one subclass in its modality
package + `register_objective` + a YAML preset; if it needs a trainer change, the seam is wrong.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import nn

from sslcore.config import to_dict
from sslcore.distributed import gather_with_grad
from sslcore.run_config import RunConfig, TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.data import Dataset, IterableDataset

    from sslcore.data import BatchPlan


class Ratio(NamedTuple):
    """A logged metric reduced exactly: sum(numerator) / sum(denominator) over micro-batches and
    processes (accuracy over masked tokens), instead of a mean of per-batch means."""

    numerator: torch.Tensor | float
    denominator: torch.Tensor | float


class LossContext:
    """What a loss needs to know about the step it is part of, and nothing about how it is run.

    The trainer builds one per micro-batch. `counts` holds, for each loss term, how many items it
    averages over in the WHOLE optimizer step: summed over the accumulation window and over all
    processes (from `Objective.targets`, computed before any forward). So a loss written as

        loss = ctx.mean("tokens", per_token_losses.sum()) + ctx.mean("pairs", per_pair.sum())

    gives, after DDP's gradient averaging, the gradient of the global mean of each term: 2
    processes at batch B equal 1 process at 2B, and a micro-batch with more masked tokens weighs
    more (never a mean of per-batch means). In eval, counts are this micro-batch's own and the
    trainer sums the recorded (total, count) pairs over the whole eval set and all processes.
    """

    def __init__(self, counts: dict[str, float], num_processes: int = 1, process_index: int = 0,
                 training: bool = True):
        self.counts, self.num_processes, self.process_index = counts, num_processes, process_index
        self.training = training
        self.terms: dict[str, tuple[torch.Tensor, float, float]] = {}
        """name -> (total, count, weight) of every term this micro-batch reported (for exact logs)."""

    def mean(self, name: str, total: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """`weight x total / (global count of name)`, scaled for DDP: `total` is the SUM of the term
        over this micro-batch's items, as counted by `Objective.targets()[name]`."""
        if name not in self.counts:
            raise KeyError(f"loss term {name!r} has no count; Objective.targets() returned {sorted(self.counts)}")
        count = max(float(self.counts[name]), 1.0)
        self.terms[name] = (total.detach().float(), count, weight)
        # DDP averages gradients over processes; multiply back so the result is the global mean's.
        return total * (weight * self.num_processes / count)

    def sum(self, name: str, total: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """A term that is summed, not averaged, over the step (word2vec's update is a sum)."""
        self.terms[name] = (total.detach().float(), 1.0, weight)
        return total * (weight * self.num_processes)

    def gather(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Rows of all processes (negatives from every rank), gradient kept for the local rows;
        returns (all rows, offset of this process's rows). On one process: (tensor, 0)."""
        return gather_with_grad(tensor)


class Objective:
    """A pretext task. Subclasses implement the abstract parts; defaults cover the rest.

    Contract with the trainer:
    - `prepare()` builds data artefacts once (corpus, tokenizer, tokenized cache). It runs on
      the main process first, then on the others, which then read the cache.
    - `build_model()` returns the module to train; its `forward` must do all the work that
      needs gradients, because DDP only syncs what goes through the wrapper's forward.
    - `collate(examples, seeds)` turns dataset rows into a batch. `seeds` holds one integer per
      example, derived from (run seed, epoch, example index): randomness drawn from them makes
      batches identical on 1 or N processes and after a resume, with no RNG state to carry.
    - `targets(batch)` counts, before the forward, what each loss term averages over (masked
      tokens, pairs, masked frames, views); `loss(model, batch, ctx)` sums each term over the
      micro-batch and passes it through `ctx.mean(name, total)`, which divides by the count of
      the whole step (accumulation window x processes). Returns `(loss, {name: scalar | Ratio})`.
      Cross-process needs (negatives from other ranks) go through `ctx.gather`.
    - State that must survive a resume (momentum encoder, queue, temperature, early-stopping
      best) is `state_dict()` / `load_state_dict()`, saved in every checkpoint.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[RunConfig]] = RunConfig
    unit: ClassVar[str] = "samples"
    """What `count()` counts, for throughput logs (tokens/s, samples/s, words/s)."""
    reports_perplexity: ClassVar[bool] = False
    """True when the loss is a mean token cross-entropy, so exp(eval loss) is a perplexity."""
    supports_accumulation: ClassVar[bool] = True
    """False when micro-batches are not independent pieces of one batch (in-batch negatives:
    accumulating 4 x 64 is not a batch of 256); the trainer then refuses accumulation > 1."""

    def __init__(self, config: RunConfig):
        self.config = config

    # -- data -----------------------------------------------------------------------------
    def prepare(self, accelerator: Accelerator | None = None) -> None:
        """Build (or load from cache) everything the datasets and model need."""

    def train_dataset(self) -> Dataset | IterableDataset:
        raise NotImplementedError

    def eval_dataset(self) -> Dataset | None:
        """Held-out rows for the periodic eval loss; None = no eval."""
        return None

    def collate(self, examples: list[dict[str, Any]], seeds: list[int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def batch_sampler(self, dataset: Dataset, batch_size: int, seed: int) -> BatchPlan | None:
        """Optional: how micro-batches are formed (length buckets for audio). None = a seeded
        shuffle cut into `batch_size` rows. See `sslcore.data.BatchPlan`."""
        return None

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """How many `unit`s a batch holds (throughput)."""
        return len(next(iter(batch.values())))

    def targets(self, batch: dict[str, torch.Tensor]) -> dict[str, float | torch.Tensor]:
        """Items each loss term averages over in this micro-batch, from the batch alone (before the
        forward): {"tokens": masked tokens, "pairs": pairs}. Default: one term, one per example."""
        return {"loss": len(next(iter(batch.values())))}

    # -- model and loss -----------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def prepare_model(self, model: nn.Module, accelerator: Accelerator) -> nn.Module:
        """Called before `accelerator.prepare`: convert to SyncBatchNorm, freeze parts, ..."""
        return model

    def ddp_options(self) -> dict[str, Any]:
        """`DistributedDataParallel` options, e.g. {"broadcast_buffers": False} when each rank keeps its
        own buffers (BatchNorm statistics, queues), or {"find_unused_parameters": True}."""
        return {}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             ctx: LossContext) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: no decay on biases and norms (as BERT/GPT training does)."""
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def build_optimizer(self, model: nn.Module, args: TrainConfig) -> torch.optim.Optimizer:
        """AdamW over `parameter_groups` by default; override for SGD/sparse updates (word2vec)."""
        return torch.optim.AdamW(self.parameter_groups(model, args.weight_decay), lr=args.learning_rate,
                                 betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)

    def step_hooks(self) -> list[Callable[[nn.Module, int], None]]:
        """Called after every optimizer step with (unwrapped model, step): EMA, temperatures, queues."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Objective state a resume needs beyond the model and optimizer (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    # -- identity and export ----------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: every section but train/hub by default."""
        sections = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)}
        return {k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in sections.items()
                if k not in ("train", "hub")}

    def export(self, model: nn.Module, out_dir: Path, summary: dict[str, Any]) -> Path:
        """Write what a downstream user loads (HF folder, KeyedVectors...) and a model card."""
        raise NotImplementedError
