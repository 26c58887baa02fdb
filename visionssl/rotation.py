"""RotNet (Gidaris et al. 2018): predict which of 4 rotations (0, 90, 180, 270 degrees) was applied."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslcore.objective import LossContext, Ratio
from sslcore.registry import register_objective
from visionssl.backbone import features
from visionssl.objective import VisionConfig, VisionModel, VisionObjective, backbone_and_size
from visionssl.views import ViewConfig

ROTATIONS = 4


def light_view() -> ViewConfig:
    """A mild crop and no flip: a horizontal flip would make 90 and 270 degrees look alike on symmetric
    objects; no colour changes (they carry no rotation cue)."""
    return ViewConfig(crop_scale_min=0.6, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)


@dataclass
class RotationConfig(VisionConfig):
    """Rotation-prediction pretraining: each image appears in all 4 rotations in its batch."""

    objective: str = "rotation"
    """Registered objective name."""
    view1: ViewConfig = field(default_factory=light_view)
    """The one view that is rotated."""


class RotationModel(VisionModel):
    """Backbone + a linear 4-way rotation classifier."""

    def __init__(self, backbone: nn.Module, dim: int):
        super().__init__()
        self.backbone, self.classifier = backbone, nn.Linear(dim, ROTATIONS)

    def forward(self, pixel_values: torch.Tensor, probe_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = features(self.backbone, pixel_values)
        return self.classifier(h), self.probe(h, probe_rows)


def rotate_all(views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, H, W] -> every image in 4 rotations [4B, ...] and the rotation labels [4B]."""
    rotated = torch.cat([torch.rot90(views, k, dims=(2, 3)) for k in range(ROTATIONS)]
                        ).contiguous(memory_format=torch.channels_last)  # rot90 drops the fast layout (views.normalize)
    labels = torch.arange(ROTATIONS, device=views.device).repeat_interleave(len(views))
    return rotated, labels


@register_objective
class RotationObjective(VisionObjective):
    """Cross-entropy of the rotation class, averaged over the 4B rotated images of the global step."""

    name = "rotation"
    loss_term = "rotation"
    config_class = RotationConfig
    method_description = "rotation prediction (RotNet: 4-way classification of 0/90/180/270 degree rotations)"
    num_views = 1
    config: RotationConfig

    def targets(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {**super().targets(batch), self.loss_term: ROTATIONS * len(batch["images"])}

    def build_model(self) -> nn.Module:
        backbone, dim = backbone_and_size(self.config, self.image_size)
        return self.with_probe(RotationModel(backbone, dim), dim)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: LossContext) -> tuple[torch.Tensor, dict[str, Any]]:
        inputs, labels = rotate_all(self.views(batch, 0))
        logits, probe_logits = model(inputs, len(batch["images"]))  # the unrotated quarter comes first
        total = F.cross_entropy(logits.float(), labels, reduction="sum")
        correct = (logits.detach().argmax(1) == labels).sum().float()
        return self.with_probe_loss(ctx.mean(self.loss_term, total), probe_logits, batch, ctx,
                                    {"rotation_accuracy": Ratio(correct, float(len(labels)))})
