"""The config sections every objective shares: `train` (the trainer) and `hub` (upload)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TrainConfig:
    """Options of the shared trainer. A step is one optimizer update."""

    output_dir: str = "runs/default"
    """Run folder: checkpoints/, the exported model/, metrics.jsonl, loss_curve.png, tracker logs."""
    seed: int = 0
    """Seeds model init, data order, masking and dropout; the same seed gives the same run."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    per_device_batch_size: int = 32
    """Examples per process per micro-batch. Global batch = this x processes x accumulation."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    learning_rate: float = 5e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.98
    """AdamW beta2 (0.98 as in RoBERTa: steadier for short, large-LR runs)."""
    adam_epsilon: float = 1e-6
    """AdamW epsilon."""
    lr_schedule: Literal["linear", "cosine", "constant", "inverse_sqrt"] = "linear"
    """Decay after warm-up."""
    warmup_steps: int | None = None
    """Linear warm-up steps; None = warmup_ratio x max_steps."""
    warmup_ratio: float = 0.06
    """Warm-up as a fraction of max_steps, when warmup_steps is None."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None = no clipping."""
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """Autocast precision; None = what `accelerate config` / `accelerate launch` says."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process; best on 2 cores)."""
    log_every: int = 10
    """Log loss, throughput and ETA every N steps."""
    eval_every: int = 0
    """Run the eval loss (and callbacks) every N steps; 0 = only at the end."""
    eval_batches: int | None = 50
    """Cap on eval batches per evaluation; None = the whole eval set."""
    save_every: int = 0
    """Write a checkpoint every N steps (and always at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """How many most recent checkpoints to keep."""
    resume: str | None = None
    """Resume from `latest` (the newest checkpoint in output_dir) or a checkpoint path."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss: stop with an error, or skip that batch (stopping after 10 in a row)."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Accelerate trackers (tensorboard, wandb, ...) used when installed; [] = none."""
    progress_bar: bool = True
    """Show a tqdm bar on the main process."""
    export: bool = True
    """Export the trained model to output_dir/model at the end."""


@dataclass
class HubConfig:
    """Where the exported model goes on the Hugging Face Hub (optional)."""

    repo_id: str | None = None
    """`user/name` to upload the exported folder to at the end of training; None = no upload."""
    private: bool = False
    """Create the Hub repo as private."""
    token: str | None = None
    """Hub token; default reads HF_TOKEN / the cached login. Never written to logs or model cards."""


@dataclass
class RunConfig:
    """Base of every objective's config: the `objective` name plus the shared sections.

    Subclasses add their own typed sections (`data`, `model`, `masking`, ...).
    """

    objective: str = ""
    """Registered objective name (see `sslcore.registry.list_objectives()`)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The shared trainer's options (steps, batch, optimiser, checkpoints, logging)."""
    hub: HubConfig = field(default_factory=HubConfig)
    """Optional upload of the exported model."""
