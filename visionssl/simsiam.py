"""SimSiam (Chen & He 2021): predictor + stop-gradient, no negatives, no momentum encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sslcore.objective import LossContext
from sslcore.registry import register_objective
from visionssl.backbone import MLPHead, features
from visionssl.losses import NegativeCosineSimilarity
from visionssl.objective import VisionConfig, VisionModel, VisionObjective, backbone_and_size


@dataclass
class SimSiamConfig(VisionConfig):
    """SimSiam pretraining (the projector ends in BatchNorm; the predictor is a bottleneck MLP)."""

    objective: str = "simsiam"
    """Registered objective name."""


class SimSiamModel(VisionModel):
    """Backbone + projector + predictor; returns (projections z, predictions p, probe logits)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor

    def forward(self, pixel_values: torch.Tensor, probe_rows: int = 0) -> tuple[torch.Tensor, ...]:
        h = features(self.backbone, pixel_values)
        z = self.projector(h)
        return z, self.predictor(z), self.probe(h, probe_rows)


@register_objective
class SimSiamObjective(VisionObjective):
    """-cos(p1, sg(z2)) - cos(p2, sg(z1)), averaged over the 2B (prediction, target) pairs."""

    name = "simsiam"
    loss_term = "negative_cosine"
    config_class = SimSiamConfig
    method_description = "SimSiam (symmetric negative cosine, predictor, stop-gradient)"
    config: SimSiamConfig

    def build_model(self) -> nn.Module:
        backbone, dim = backbone_and_size(self.config, self.image_size)
        head = self.config.head
        projector = MLPHead(dim, head.hidden_dim, head.out_dim, max(head.layers, 2), head.batch_norm,
                            last_batch_norm=head.batch_norm)
        predictor = MLPHead(head.out_dim, head.predictor_hidden_dim, head.out_dim, 2, head.batch_norm)
        self.criterion = NegativeCosineSimilarity(reduction="sum")
        return self.with_probe(SimSiamModel(backbone, projector, predictor), dim)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: LossContext) -> tuple[torch.Tensor, dict[str, Any]]:
        z, p, probe_logits = model(self.both_views(batch), len(batch["images"]))
        z1, z2 = z.chunk(2)
        p1, p2 = p.chunk(2)
        total = self.criterion(p1, z2) + self.criterion(p2, z1)  # targets detached inside: stop-gradient
        return self.with_probe_loss(ctx.mean(self.loss_term, total), probe_logits, batch, ctx, self.monitor(z1, ctx.training))
