"""What every vision objective shares: the config sections, data, views, BatchNorm under DDP, export.

A method subclasses `VisionObjective` and writes `build_model` and `loss` (and, for momentum
methods, `step_hooks` and `state_dict`). The trainer is the shared `sslcore.trainer.Trainer`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sslcore.config import to_dict
from sslcore.hub import write_model_card
from sslcore.objective import LossContext, Objective, Ratio
from sslcore.run_config import RunConfig
from visionssl.backbone import BackboneConfig, HeadConfig, build_backbone, model_input_size, save_backbone
from visionssl.data import ImageDataConfig, ImageTensors, describe_source, load_image_tensors
from visionssl.probe import ProbeConfig, collapse_stats, probe_backbone
from visionssl.views import ViewConfig, apply_views, collate_views, view_params

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

COLLAPSE_STD = 0.1
"""`embedding_std` below this (healthy is ~1) is reported as a collapse."""


@dataclass
class VisionConfig(RunConfig):
    """Sections every vision objective has; methods add their own (`loss`, `momentum`...)."""

    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    """Which images, at what size."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The encoder that is pretrained and exported."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """Projector / predictor shapes."""
    view1: ViewConfig = field(default_factory=ViewConfig)
    """Augmentation of the first view."""
    view2: ViewConfig = field(default_factory=ViewConfig)
    """Augmentation of the second view (BYOL's differs: rarer blur, some solarize)."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """kNN / linear probes on the frozen export."""


class VisionModel(nn.Module):
    """Base of the methods' models: an optional online linear probe (solo-learn's) on detached features.

    Trained beside the method on the labels of the first view's rows, with no gradient into the
    backbone, it shows at every log and eval how linearly separable the features are becoming.
    Lives inside the model so DDP syncs it; not exported.
    """

    def __init__(self):
        super().__init__()
        self.online_probe: nn.Module | None = None  # set by VisionObjective.with_probe when there are labels

    def probe(self, h: torch.Tensor, rows: int) -> torch.Tensor | None:
        if self.online_probe is None or rows == 0:
            return None
        return self.online_probe(h[:rows].detach())


class VisionObjective(Objective):
    """Data (uint8 tensors), views drawn from example seeds, SyncBatchNorm on GPUs, and the export."""

    config: VisionConfig
    unit = "images"
    method_description = ""
    """One line for the model card."""
    num_views = 2
    loss_term = "ssl"
    """Name of the method's loss term (logged as `<term>_loss` beside the online probe's)."""

    def prepare(self, accelerator: Accelerator | None = None) -> None:
        data = self.config.data
        splits, _ = load_image_tensors(data)
        self.train_images: ImageTensors = splits["train"].subset(data.max_train_examples, seed=0)
        self.test_images: ImageTensors = splits["test"]
        self.eval_images = self.test_images.subset(data.max_eval_examples, seed=0)
        self.image_size = int(self.train_images.images.shape[-1])
        self.input_size = model_input_size(self.config.backbone, self.image_size)
        pixels = self.train_images.images[:20000].float() / 255  # channel statistics for normalisation
        channels = self.config.backbone.num_channels
        mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3))
        if len(mean) != channels:  # grayscale data, RGB model: the processor repeats the channel
            mean, std = mean.mean().repeat(channels), std.mean().repeat(channels)
        self.mean, self.std = mean, std

    def train_dataset(self) -> ImageTensors:
        return self.train_images

    def eval_dataset(self) -> ImageTensors | None:
        return self.eval_images if len(self.eval_images) else None

    def view_configs(self) -> list[ViewConfig]:
        return [self.config.view1, self.config.view2][: self.num_views]

    def collate(self, examples: list[dict[str, Any]], seeds: list[int]) -> dict[str, torch.Tensor]:
        images = torch.stack([e["image"] for e in examples])
        batch = collate_views(images, seeds, self.view_configs())
        batch["labels"] = torch.stack([torch.as_tensor(e["label"]) for e in examples])
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["images"])

    def targets(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        counts = {self.loss_term: self.num_views * len(batch["images"])}
        if self.has_online_probe:
            counts["online_probe"] = int((batch["labels"] >= 0).sum())
        return counts

    # -- the online probe ----------------------------------------------------------------------------
    @property
    def has_online_probe(self) -> bool:
        return self.config.probe.online and self.train_images.has_labels

    def with_probe(self, model: VisionModel, dim: int) -> VisionModel:
        if self.has_online_probe:
            classes = int(max(self.train_images.labels.max(), self.test_images.labels.max())) + 1
            model.online_probe = nn.Linear(dim, classes)
        return model

    def with_probe_loss(self, loss: torch.Tensor, probe_logits: torch.Tensor | None, batch: dict[str, torch.Tensor],
                        ctx: LossContext, logs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Add the online probe's cross-entropy (its own term, averaged over labelled images) and accuracy."""
        if probe_logits is None:
            return loss, logs
        labels = batch["labels"]
        cross_entropy = F.cross_entropy(probe_logits.float(), labels, ignore_index=-1, reduction="sum")
        correct = ((probe_logits.detach().argmax(1) == labels) & (labels >= 0)).sum().float()
        logs = {**logs, "online_probe_accuracy": Ratio(correct, float((labels >= 0).sum()))}
        return loss + ctx.mean("online_probe", cross_entropy), logs

    def views(self, batch: dict[str, torch.Tensor], view: int) -> torch.Tensor:
        """View number `view` of the batch, made on the batch's device."""
        return apply_views(batch["images"], view_params(batch, view), self.input_size, self.mean, self.std,
                           self.config.backbone.num_channels)

    def both_views(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[view0 of B; view1 of B] in one tensor: one forward, so BatchNorm sees all 2B."""
        return torch.cat([self.views(batch, 0), self.views(batch, 1)])

    # -- distributed -------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, accelerator: Accelerator) -> nn.Module:
        """BatchNorm statistics over the global batch (SimCLR/BYOL do): SyncBatchNorm, which torch
        runs only on accelerators. On CPU processes each keeps its own batch statistics (a warning)."""
        if accelerator.num_processes > 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                 for m in model.modules()):
            if accelerator.device.type == "cpu":
                logger.warning("BatchNorm on %d CPU processes normalises each process's batch on its own "
                               "(torch's SyncBatchNorm needs a GPU): results differ from one process at the "
                               "global batch. For exact parity use backbone.kind vit and head.batch_norm false.",
                               accelerator.num_processes)
            else:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
                self.on_sync_batchnorm()
        return model

    def on_sync_batchnorm(self) -> None:
        """Convert objective-held networks (momentum targets) too."""

    def ddp_options(self) -> dict[str, Any]:
        # Each rank's BatchNorm buffers are its own (or already synced); broadcasting rank 0's every
        # forward would only overwrite them.
        return {"broadcast_buffers": False}

    # -- logs ----------------------------------------------------------------------------------------
    def monitor(self, embeddings: torch.Tensor, training: bool) -> dict[str, float]:
        """Collapse monitors: embedding std each step; effective rank (an SVD) at eval only."""
        stats = collapse_stats(embeddings)
        if training:
            return {"embedding_std": stats["embedding_std"]}
        if stats["embedding_std"] < COLLAPSE_STD:
            logger.warning("%s embeddings look collapsed: per-dimension std %.3g x sqrt(d) (healthy ~1), effective "
                           "rank %.1f of %d", self.name, stats["embedding_std"], stats["effective_rank"],
                           embeddings.shape[1])
        return stats

    # -- export --------------------------------------------------------------------------------------
    def backbone_of(self, model: nn.Module) -> nn.Module:
        return model.backbone

    def export(self, model: nn.Module, out_dir: Path, summary: dict[str, Any]) -> Path:
        out_dir = Path(out_dir)
        backbone = self.backbone_of(model)
        save_backbone(backbone, out_dir, self.input_size, self.mean.tolist(), self.std.tolist())
        scores: dict[str, float] = {}
        if self.config.probe.enabled and self.train_images.has_labels and self.test_images.has_labels:
            started = time.perf_counter()
            scores = probe_backbone(backbone, self.train_images, self.test_images, self.input_size, self.mean,
                                    self.std, self.config.probe, seed=0)  # same probe images for every run
            logger.info("probes of the export (%.0f s): %s", time.perf_counter() - started,
                        ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            (out_dir / "probe_scores.json").write_text(json.dumps(scores, indent=1))
        elif self.config.probe.enabled:
            logger.warning("no labels in %s: the export carries no probe scores", self.config.data.source)
        self.write_card(out_dir, backbone, {**summary, **scores}, scores)
        return out_dir

    def write_card(self, out_dir: Path, backbone: nn.Module, summary: dict[str, Any], scores: dict[str, float]) -> None:
        from accelerate.state import PartialState

        train = self.config.train
        processes = PartialState().num_processes if PartialState._shared_state else 1
        global_batch = train.per_device_batch_size * processes * train.gradient_accumulation_steps
        budget = (f"{summary.get('steps')} steps at a global batch of {global_batch} ({processes} process(es)), "
                  f"peak learning rate {train.learning_rate}")
        probe = self.config.probe
        names = {"knn_accuracy": f"kNN accuracy (k={probe.knn_k}, frozen features)",
                 "linear_probe_accuracy": "linear-probe accuracy (frozen features)"}
        eval_results = [
            {"task_type": "image-classification", "task_name": names.get(name, name), "dataset_type":
             self.config.data.source, "dataset_name": self.config.data.source, "metric_type": "accuracy",
             "metric_name": names.get(name, name), "metric_value": value} for name, value in scores.items()]
        kind = type(backbone).__name__
        write_model_card(
            out_dir, model_name=f"{self.name}-{kind}", pipeline_tag="image-feature-extraction",
            summary=(f"A `{kind}` ({sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M parameters, input "
                     f"{self.input_size}x{self.input_size}) pretrained with {self.method_description}. Budget: {budget}."
                     + (f" Probes (frozen features; {probe.train_examples or 'all'} training images, kNN k="
                        f"{probe.knn_k} T={probe.knn_temperature}, L-BFGS logistic regression): "
                        + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()) if scores else "")),
            config=to_dict(self.config),
            training_data=describe_source(self.config.data, {"train": len(self.train_images),
                                                             "test": len(self.test_images)}),
            metrics={k: v for k, v in summary.items() if isinstance(v, int | float)}, eval_results=eval_results,
            usage=('from transformers import pipeline\nextract = pipeline("image-feature-extraction", model="{path}")\n'
                   'features = extract(image, pool=True)  # a PIL image; pool=True for ResNet').format(path=out_dir))


class MomentumTarget:
    """A slowly moving copy of (part of) the online network: BYOL's target, MoCo's key encoder.

    Lives in the objective, not the model: it gets no gradients, DDP must not see it, and its
    weights are objective state saved in checkpoints. Updated in a step hook, never in forward.
    """

    def __init__(self, online: nn.Module, base_momentum: float, final_momentum: float, max_steps: int):
        self.network = copy.deepcopy(online).requires_grad_(False)
        self.base, self.final, self.max_steps = base_momentum, final_momentum, max(max_steps, 1)

    def momentum_at(self, step: int) -> float:
        """BYOL's cosine schedule: base at step 0, rising to `final` at the last step."""
        progress = min(step / self.max_steps, 1.0)
        return self.final - (self.final - self.base) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def update(self, online: nn.Module, step: int) -> None:
        """target = m * target + (1 - m) * online, m from the schedule at the step just taken; buffers copied."""
        tau = self.momentum_at(step - 1)
        for target, source in zip(self.network.parameters(), online.parameters()):
            target.mul_(tau).add_(source.detach().to(target), alpha=1 - tau)
        for target, source in zip(self.network.buffers(), online.buffers()):
            target.copy_(source)

    def to(self, device: torch.device) -> nn.Module:
        if next(self.network.parameters()).device != device:
            self.network.to(device)
        return self.network

    def state_dict(self) -> dict[str, Any]:
        return {"network": {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])


def backbone_and_size(config: VisionConfig, image_size: int) -> tuple[nn.Module, int]:
    from visionssl.backbone import feature_size

    backbone = build_backbone(config.backbone, image_size)
    return backbone, feature_size(backbone)


class MomentumTargetObjective(VisionObjective):
    """A method with a momentum (EMA) copy of its online encoder: BYOL's target, MoCo's key encoder.
    The target is objective state (saved in checkpoints) and moves in a step hook, never in forward."""

    def build_target(self, online: nn.Module) -> None:
        momentum = self.config.momentum
        self.target = MomentumTarget(online.encoder, momentum.base, momentum.final, self.config.train.max_steps)
        if getattr(self, "_pending_state", None) is not None:  # loaded before the model was built
            self.load_state_dict(self._pending_state)

    def on_sync_batchnorm(self) -> None:
        self.target.network = nn.SyncBatchNorm.convert_sync_batchnorm(self.target.network)

    def step_hooks(self) -> list[Callable[[nn.Module, int], None]]:
        return [lambda model, step: self.target.update(model.encoder, step)]

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not hasattr(self, "target"):
            self._pending_state = state
            return
        self._pending_state = None
        self.target.load_state_dict(state["target"])
