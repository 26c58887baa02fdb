"""NT-Xent (SimCLR): each embedding must pick out its other view among all 2N-1 other embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    raise ValueError(f"reduction={reduction!r}; use none, sum or mean")


class NTXentLoss(nn.Module):
    """Normalised-temperature cross-entropy over cosine similarities.

    `forward(anchors, candidates, self_index, positive_index)`: anchor i is row `self_index[i]` of
    `candidates` (excluded from its own softmax) and its positive is row `positive_index[i]`. On one
    process, anchors = candidates = both views stacked; across processes, candidates are every
    process's rows (`ctx.gather`) and the anchors this process's, so the loss over all processes
    is the loss of the global batch.
    """

    def __init__(self, temperature: float = 0.5, reduction: str = "sum"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature, self.reduction = temperature, reduction

    def forward(self, anchors: torch.Tensor, candidates: torch.Tensor, self_index: torch.Tensor,
                positive_index: torch.Tensor) -> torch.Tensor:
        anchors = F.normalize(anchors.float(), dim=1)
        candidates = F.normalize(candidates.float(), dim=1)
        logits = anchors @ candidates.T / self.temperature
        rows = torch.arange(len(anchors), device=logits.device)
        logits[rows, self_index] = float("-inf")  # an embedding is not its own negative
        losses = torch.logsumexp(logits, dim=1) - logits[rows, positive_index]
        return _reduce(losses, self.reduction)

    @staticmethod
    def pair_indices(views: int, batch: int, offset: int, device: torch.device | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self, positive) indices for rows laid out [view0 of B, view1 of B] starting at `offset`."""
        if views != 2:
            raise ValueError("NT-Xent pairs exactly two views")
        local = torch.arange(2 * batch, device=device)
        return local + offset, (local + batch) % (2 * batch) + offset
