"""BYOL (Grill et al. 2020): online network + predictor regress an EMA target network's projections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sslcore.objective import LossContext
from sslcore.registry import register_objective
from visionssl.backbone import MLPHead, features
from visionssl.losses import BYOLLoss
from visionssl.objective import MomentumTargetObjective, VisionConfig, VisionModel, backbone_and_size
from visionssl.views import ViewConfig


@dataclass
class MomentumConfig:
    """The target network's EMA: m rises from `base` to `final` on a cosine schedule of the step."""

    base: float = 0.99
    """Momentum at step 0 (BYOL: 0.996 for long ImageNet runs; lower for short runs)."""
    final: float = 1.0
    """Momentum at the last step."""


def byol_second_view() -> ViewConfig:
    return ViewConfig(blur_p=0.0, solarize_p=0.2)


@dataclass
class BYOLConfig(VisionConfig):
    """BYOL pretraining."""

    objective: str = "byol"
    """Registered objective name."""
    momentum: MomentumConfig = field(default_factory=MomentumConfig)
    """Target EMA schedule."""
    view2: ViewConfig = field(default_factory=byol_second_view)
    """BYOL's second view: rarer blur, solarize 0.2."""


class BYOLOnline(VisionModel):
    """Backbone + projector (the part the target copies) + predictor."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module):
        super().__init__()
        self.encoder = nn.ModuleDict({"backbone": backbone, "projector": projector})
        self.predictor = predictor

    @property
    def backbone(self) -> nn.Module:
        return self.encoder["backbone"]

    def forward(self, pixel_values: torch.Tensor, probe_rows: int = 0) -> tuple[torch.Tensor, ...]:
        h = features(self.backbone, pixel_values)
        z = self.encoder["projector"](h)
        return z, self.predictor(z), self.probe(h, probe_rows)


def project(encoder: nn.ModuleDict, pixel_values: torch.Tensor) -> torch.Tensor:
    return encoder["projector"](features(encoder["backbone"], pixel_values))


@register_objective
class BYOLObjective(MomentumTargetObjective):
    """2 - 2 cos(q(online(v1)), sg(target(v2))), symmetrised; target = EMA of online (a step hook)."""

    name = "byol"
    loss_term = "byol"
    config_class = BYOLConfig
    method_description = "BYOL (online network + predictor regressing an EMA target; cosine momentum schedule)"
    config: BYOLConfig

    def build_model(self) -> nn.Module:
        backbone, dim = backbone_and_size(self.config, self.image_size)
        head = self.config.head
        online = BYOLOnline(backbone, MLPHead(dim, head.hidden_dim, head.out_dim, head.layers, head.batch_norm),
                            MLPHead(head.out_dim, head.predictor_hidden_dim, head.out_dim, 2, head.batch_norm))
        self.criterion = BYOLLoss(reduction="sum")
        self.build_target(online)
        return self.with_probe(online, dim)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: LossContext) -> tuple[torch.Tensor, dict[str, Any]]:
        views = self.both_views(batch)
        z, p, probe_logits = model(views, len(batch["images"]))
        target = self.target.to(views.device)
        target.train(model.training)  # the target uses batch statistics in training, as the online does
        with torch.no_grad():
            t1, t2 = project(target, views).chunk(2)
        p1, p2 = p.chunk(2)
        total = self.criterion(p1, t2) + self.criterion(p2, t1)
        return self.with_probe_loss(ctx.mean(self.loss_term, total), probe_logits, batch, ctx,
                                    self.monitor(z.chunk(2)[0], ctx.training))
