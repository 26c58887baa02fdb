"""MoCo v2 (He et al. 2020, Chen et al. 2020): a momentum key encoder and a queue of negatives;
MoCo v3 (Chen, Xie & He 2021): no queue, in-batch keys from every process, a predictor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslcore.objective import LossContext
from sslcore.registry import register_objective
from visionssl.backbone import MLPHead
from visionssl.byol import MomentumConfig, project
from visionssl.losses import InfoNCELoss
from visionssl.backbone import features
from visionssl.objective import MomentumTargetObjective, VisionConfig, VisionModel, backbone_and_size


@dataclass
class MoCoLossConfig:
    """InfoNCE and queue options."""

    temperature: float = 0.2
    """Softmax temperature (MoCo v2: 0.2)."""
    queue_size: int = 4096
    """Negatives kept from earlier steps (v2 only); a multiple of the global batch is tidiest."""


@dataclass
class MoCoV2Config(VisionConfig):
    """MoCo v2 pretraining."""

    objective: str = "moco_v2"
    """Registered objective name."""
    loss: MoCoLossConfig = field(default_factory=MoCoLossConfig)
    """InfoNCE temperature and queue size."""
    momentum: MomentumConfig = field(default_factory=lambda: MomentumConfig(base=0.99, final=1.0))
    """Key-encoder EMA schedule."""


@dataclass
class MoCoV3Config(MoCoV2Config):
    """MoCo v3 pretraining (queue_size unused)."""

    objective: str = "moco_v3"
    """Registered objective name."""


class MoCoEncoder(VisionModel):
    """Backbone + projector; returns (queries, probe logits) of a stack of views."""

    def __init__(self, backbone: nn.Module, projector: nn.Module):
        super().__init__()
        self.encoder = nn.ModuleDict({"backbone": backbone, "projector": projector})

    @property
    def backbone(self) -> nn.Module:
        return self.encoder["backbone"]

    def forward(self, pixel_values: torch.Tensor, probe_rows: int = 0) -> tuple[torch.Tensor, ...]:
        h = features(self.backbone, pixel_values)
        return self.encoder["projector"](h), self.probe(h, probe_rows)


class _MoCoBase(MomentumTargetObjective):
    config: MoCoV2Config
    loss_term = "info_nce"

    def _online(self, backbone: nn.Module, dim: int) -> nn.Module:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        backbone, dim = backbone_and_size(self.config, self.image_size)
        online = self._online(backbone, dim)
        self.criterion = InfoNCELoss(self.config.loss.temperature, reduction="sum")
        self._init_state()
        self.build_target(online)
        return self.with_probe(online, dim)

    def _init_state(self) -> None:
        pass

    def _keys(self, model: nn.Module, views: torch.Tensor) -> torch.Tensor:
        target = self.target.to(views.device)
        target.train(model.training)
        with torch.no_grad():
            return project(target, views)


@register_objective
class MoCoV2Objective(_MoCoBase):
    """Queries from the online encoder, keys from the momentum encoder, negatives from a queue of
    earlier keys (all processes' keys enqueued in rank order, so every process holds the same queue).
    Symmetrised: both views serve as query and key. The queue is updated in a step hook."""

    name = "moco_v2"
    config_class = MoCoV2Config
    method_description = "MoCo v2 (momentum key encoder, queue of negatives, InfoNCE)"

    def _online(self, backbone: nn.Module, dim: int) -> nn.Module:
        head = self.config.head
        return MoCoEncoder(backbone, MLPHead(dim, head.hidden_dim, head.out_dim, head.layers, head.batch_norm))

    def _init_state(self) -> None:
        size, dim = self.config.loss.queue_size, self.config.head.out_dim
        generator = torch.Generator().manual_seed(self.config.train.seed)
        self.queue = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.queue_ptr = 0
        self._pending_keys: list[torch.Tensor] = []

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: LossContext) -> tuple[torch.Tensor, dict[str, Any]]:
        views = self.both_views(batch)
        q, probe_logits = model(views, len(batch["images"]))
        k = self._keys(model, views)
        self.queue = self.queue.to(views.device)
        q1, q2 = q.chunk(2)
        k1, k2 = k.chunk(2)
        total = (self.criterion(q1, positives=k2, negatives=self.queue)
                 + self.criterion(q2, positives=k1, negatives=self.queue))
        if ctx.training:  # enqueued after the optimizer step (hook): this step's negatives are earlier keys
            everyone, _ = ctx.gather(F.normalize(k2.float(), dim=1))
            self._pending_keys.append(everyone.detach())
        return self.with_probe_loss(ctx.mean(self.loss_term, total), probe_logits, batch, ctx, self.monitor(q1, ctx.training))

    def _enqueue(self) -> None:
        for keys in self._pending_keys:
            for start in range(0, len(keys), len(self.queue)):
                chunk = keys[start: start + len(self.queue)].to(self.queue)
                end = self.queue_ptr + len(chunk)
                if end <= len(self.queue):
                    self.queue[self.queue_ptr: end] = chunk
                else:
                    split = len(self.queue) - self.queue_ptr
                    self.queue[self.queue_ptr:] = chunk[:split]
                    self.queue[: end - len(self.queue)] = chunk[split:]
                self.queue_ptr = end % len(self.queue)
        self._pending_keys = []

    def step_hooks(self) -> list[Callable[[nn.Module, int], None]]:
        return [*super().step_hooks(), lambda model, step: self._enqueue()]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "queue": self.queue.detach().cpu().clone(), "queue_ptr": self.queue_ptr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if hasattr(self, "queue"):
            self.queue = state["queue"].clone().to(self.queue.device)
            self.queue_ptr = int(state["queue_ptr"])


class MoCoV3Model(MoCoEncoder):
    """MoCo v3's online side: backbone + projector + predictor."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module):
        super().__init__(backbone, projector)
        self.predictor = predictor

    def forward(self, pixel_values: torch.Tensor, probe_rows: int = 0) -> tuple[torch.Tensor, ...]:
        h = features(self.backbone, pixel_values)
        z = self.encoder["projector"](h)
        return self.predictor(z), z, self.probe(h, probe_rows)


@register_objective
class MoCoV3Objective(_MoCoBase):
    """Queries (online + predictor) against the momentum encoder's keys of the global batch: each
    query's key is its other view, every other key of every process is a negative. No queue."""

    name = "moco_v3"
    config_class = MoCoV3Config
    supports_accumulation = False  # in-batch keys
    method_description = "MoCo v3 (momentum key encoder, predictor, in-batch keys from all processes, InfoNCE)"

    def _online(self, backbone: nn.Module, dim: int) -> nn.Module:
        head = self.config.head
        return MoCoV3Model(backbone, MLPHead(dim, head.hidden_dim, head.out_dim, head.layers, head.batch_norm),
                           MLPHead(head.out_dim, head.predictor_hidden_dim, head.out_dim, 2, head.batch_norm))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: LossContext) -> tuple[torch.Tensor, dict[str, Any]]:
        n = len(batch["images"])
        views = self.both_views(batch)
        q, z, probe_logits = model(views, n)
        k = self._keys(model, views)
        q1, q2 = q.chunk(2)
        k1, k2 = k.chunk(2)
        all_k1, offset = ctx.gather(k1)
        all_k2, _ = ctx.gather(k2)
        positive = torch.arange(n, device=q.device) + offset
        total = (self.criterion(q1, keys=all_k2, positive_index=positive)
                 + self.criterion(q2, keys=all_k1, positive_index=positive))
        return self.with_probe_loss(ctx.mean(self.loss_term, total), probe_logits, batch, ctx,
                                    self.monitor(z.chunk(2)[0], ctx.training))
