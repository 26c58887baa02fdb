"""Vision SSL losses: pure functions of tensors, one per file (no torch.distributed, no devices).

Each returns one loss per anchor (`reduction="none"`) or their sum, so objectives can pass sums
to `LossContext.mean` (the global mean over processes and accumulation). What comes from other
processes (negatives) is handed in by the caller, gathered with `ctx.gather`.
"""

from visionssl.losses.infonce import InfoNCELoss
from visionssl.losses.negative_cosine import BYOLLoss, NegativeCosineSimilarity
from visionssl.losses.ntxent import NTXentLoss

__all__ = ["BYOLLoss", "InfoNCELoss", "NTXentLoss", "NegativeCosineSimilarity"]
