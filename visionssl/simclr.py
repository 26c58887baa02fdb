"""SimCLR (Chen et al. 2020): two views, a projection MLP, NT-Xent over the global batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sslcore.objective import LossContext
from sslcore.registry import register_objective
from visionssl.backbone import MLPHead, features
from visionssl.losses import NTXentLoss
from visionssl.objective import VisionConfig, VisionModel, VisionObjective, backbone_and_size


@dataclass
class SimCLRLossConfig:
    """NT-Xent options."""

    temperature: float = 0.2
    """Softmax temperature over cosine similarities (0.1-0.5 in the paper; lower = harder negatives)."""


@dataclass
class SimCLRConfig(VisionConfig):
    """SimCLR pretraining."""

    objective: str = "simclr"
    """Registered objective name."""
    loss: SimCLRLossConfig = field(default_factory=SimCLRLossConfig)
    """Contrastive loss options."""


class SimCLRModel(VisionModel):
    """Backbone + projector; `forward` returns (projections, online-probe logits) of a stack of views."""

    def __init__(self, backbone: nn.Module, projector: nn.Module):
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def forward(self, pixel_values: torch.Tensor, probe_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = features(self.backbone, pixel_values)
        return self.projector(h), self.probe(h, probe_rows)


@register_objective
class SimCLRObjective(VisionObjective):
    """NT-Xent between two augmented views; negatives are every other view in the GLOBAL batch,
    gathered from all processes with gradient (so 2 processes at B = 1 process at 2B)."""

    name = "simclr"
    loss_term = "nt_xent"
    config_class = SimCLRConfig
    supports_accumulation = False  # in-batch negatives: 4 micro-batches of 64 are not a batch of 256
    method_description = "SimCLR (NT-Xent over two augmented views, projection MLP)"
    config: SimCLRConfig

    def build_model(self) -> nn.Module:
        backbone, dim = backbone_and_size(self.config, self.image_size)
        head = self.config.head
        self.criterion = NTXentLoss(self.config.loss.temperature, reduction="sum")
        return self.with_probe(SimCLRModel(backbone, MLPHead(dim, head.hidden_dim, head.out_dim, head.layers,
                                                             head.batch_norm)), dim)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: LossContext) -> tuple[torch.Tensor, dict[str, Any]]:
        n = len(batch["images"])
        z, probe_logits = model(self.both_views(batch), n)
        everyone, offset = ctx.gather(z)
        self_index, positive_index = NTXentLoss.pair_indices(2, n, offset, z.device)
        total = self.criterion(z, everyone, self_index, positive_index)
        return self.with_probe_loss(ctx.mean(self.loss_term, total), probe_logits, batch, ctx, self.monitor(z, ctx.training))
