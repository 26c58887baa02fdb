"""Negative cosine similarity (SimSiam) and BYOL's normalised MSE, against a stopped-gradient target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionssl.losses.ntxent import _reduce


class NegativeCosineSimilarity(nn.Module):
    """`-cos(p, z)` per row, with no gradient through `z` (SimSiam's stop-gradient)."""

    def __init__(self, reduction: str = "sum"):
        super().__init__()
        self.reduction = reduction

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cosine = F.cosine_similarity(predictions.float(), targets.detach().float(), dim=1)
        return _reduce(-cosine, self.reduction)


class BYOLLoss(nn.Module):
    """`||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)` per row, target `z` detached (from the EMA network)."""

    def __init__(self, reduction: str = "sum"):
        super().__init__()
        self.reduction = reduction

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cosine = F.cosine_similarity(predictions.float(), targets.detach().float(), dim=1)
        return _reduce(2 - 2 * cosine, self.reduction)
