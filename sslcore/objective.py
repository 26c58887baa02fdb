"""The one seam: an objective is everything that makes a pretext task, and nothing else.

The trainer calls only what is declared here. Adding a method = one subclass in its modality
package + `register_objective` + a YAML preset; if it needs a trainer change, the seam is wrong.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from sslcore.config import to_dict
from sslcore.run_config import RunConfig, TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.data import Dataset, IterableDataset


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
    - `loss(model, batch)` is pure: returns `(scalar loss, {name: scalar})`.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[RunConfig]] = RunConfig
    unit: ClassVar[str] = "samples"
    """What `count()` counts, for throughput logs (tokens/s, samples/s, words/s)."""
    reports_perplexity: ClassVar[bool] = False
    """True when the loss is a mean token cross-entropy, so exp(eval loss) is a perplexity."""

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

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """How many `unit`s a batch holds (throughput)."""
        return len(next(iter(batch.values())))

    # -- model and loss -----------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
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

    # -- identity and export ----------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: every section but train/hub by default."""
        sections = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)}
        return {k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in sections.items()
                if k not in ("train", "hub")}

    def export(self, model: nn.Module, out_dir: Path, summary: dict[str, Any]) -> Path:
        """Write what a downstream user loads (HF folder, KeyedVectors...) and a model card."""
        raise NotImplementedError
