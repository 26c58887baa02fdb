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
    read_ahead: bool = False
    """With num_workers 0: build the next batches in a thread of the training process while the step runs, not
    in turn with it. Pays where the step leaves the Python lock most of its time (a compiled or native
    kernel, as word2vec's CPU step) and batch building is cheap; no process hand-over. Ignored with workers
    or a streamed corpus."""
    num_threads: int | None = None
    """torch threads per process; None = OMP_NUM_THREADS if you set it (outside `accelerate launch`),
    else this machine's cores / its processes, less num_workers (or one for the read-ahead thread;
    `accelerate launch` alone would leave one thread)."""
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
    save_on_each_node: bool = False
    """Multi-node runs without a shared file system: every machine writes the checkpoint to its own disk."""
    resume: str | None = None
    """`latest` (the newest checkpoint in output_dir; an error if there is none), `auto` (resume if
    there is one, else start: for job schedulers that restart the same command), or a checkpoint path."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss: stop with an error, or skip that batch (stopping after 10 in a row)."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Accelerate trackers (tensorboard, wandb, ...) used when installed; [] = none."""
    progress_bar: bool = True
    """Show a tqdm bar on the main process."""
    export: bool = True
    """Export the trained model to output_dir/model at the end."""

    def __post_init__(self) -> None:
        # Ranges a type cannot express; `sslcore.config.build` reports these as config errors.
        at_least = {"max_steps": 1, "per_device_batch_size": 1, "gradient_accumulation_steps": 1, "log_every": 1,
                    "keep_checkpoints": 1, "eval_every": 0, "save_every": 0, "num_workers": 0, "warmup_steps": 0,
                    "eval_batches": 1, "num_threads": 1, "learning_rate": 0.0, "weight_decay": 0.0}
        for name, low in at_least.items():
            value = getattr(self, name, None)
            if value is not None and value < low:
                raise ValueError(f"train.{name} must be >= {low}, got {value}")
        for name in ("warmup_ratio", "adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"train.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.adam_epsilon <= 0 or (self.max_grad_norm is not None and self.max_grad_norm <= 0):
            raise ValueError("train.adam_epsilon and train.max_grad_norm must be > 0 (max_grad_norm: null turns "
                             "clipping off)")


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
