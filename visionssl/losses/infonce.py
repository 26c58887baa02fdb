"""InfoNCE (MoCo): a query against its key and a set of negatives (queue or other keys)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionssl.losses.ntxent import _reduce


class InfoNCELoss(nn.Module):
    """`-log softmax` of the positive among `[q.k+, q.negatives]` over temperature, per query.

    MoCo v2: `forward(q, k, negatives=queue)`. MoCo v3 (in-batch keys): `forward(q, k, keys=all_keys,
    positive_index=...)`: the logits are q against every key (from every process), the positive is
    the key at `positive_index`. Keys and negatives are constants (momentum encoder): detached.
    """

    def __init__(self, temperature: float = 0.2, reduction: str = "sum"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature, self.reduction = temperature, reduction

    def forward(self, queries: torch.Tensor, positives: torch.Tensor | None = None,
                negatives: torch.Tensor | None = None, keys: torch.Tensor | None = None,
                positive_index: torch.Tensor | None = None) -> torch.Tensor:
        q = F.normalize(queries.float(), dim=1)
        if keys is not None:
            if positive_index is None:
                raise ValueError("keys= needs positive_index= (the row of each query's key)")
            logits = q @ F.normalize(keys.detach().float(), dim=1).T
            target = positive_index
        else:
            if positives is None or negatives is None:
                raise ValueError("give positives= and negatives= (MoCo v2), or keys= and positive_index= (v3)")
            k = F.normalize(positives.detach().float(), dim=1)
            n = F.normalize(negatives.detach().float(), dim=1)
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ n.T], dim=1)
            target = torch.zeros(len(q), dtype=torch.long, device=q.device)
        losses = F.cross_entropy(logits / self.temperature, target, reduction="none")
        return _reduce(losses, self.reduction)
