"""Frozen-feature evaluation: kNN (k=200, temperature-weighted cosine votes, as in InstDisc/solo-learn),
a linear probe (multinomial logistic regression on standardised features), collapse monitors, and
the raw-pixel baseline."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from visionssl.backbone import features
from visionssl.data import ImageDataError, ImageTensors
from visionssl.views import plain_view

logger = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    """Frozen-feature probes run at export (their scores go into the model card), and the online probe."""

    enabled: bool = True
    """Run kNN and linear probes on the exported backbone."""
    online: bool = True
    """Train a linear classifier on detached features during pretraining (logged as online_probe_accuracy)."""
    train_examples: int | None = 10000
    """Labelled training images the probes fit on (a seeded subset); None = all."""
    test_examples: int | None = None
    """Test images they are scored on; None = all."""
    knn_k: int = 200
    """Neighbours that vote."""
    knn_temperature: float = 0.1
    """Votes weigh exp(cosine / temperature)."""
    linear_epochs: int = 100
    """Full-batch L-BFGS iterations of the linear probe."""
    linear_weight_decay: float = 1e-4
    """L2 penalty of the linear probe."""


def require_labels(data: ImageTensors, split: str) -> None:
    if not data.has_labels:
        raise ImageDataError(f"the {split} split has no labels, so probes cannot be scored; use a source with a "
                             "label column (set data.label_column) or class sub-folders, or set probe.enabled false")


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, data: ImageTensors, input_size: int, mean: torch.Tensor,
                     std: torch.Tensor, batch_size: int = 512, device: torch.device | str | None = None
                     ) -> torch.Tensor:
    """Backbone features of every image (eval mode, no augmentation: resize + normalise only)."""
    device = device or next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    channels = backbone.config.num_channels
    out = [features(backbone, plain_view(data.images[i: i + batch_size].to(device), input_size, mean, std,
                                         channels)).float().cpu()
           for i in range(0, len(data), batch_size)]
    backbone.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> float:
    """Weighted kNN: the k most cosine-similar training rows vote for their class with exp(sim / T)."""
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_x))
    correct = 0
    for start in range(0, len(test_x), chunk):
        sims, index = (test_x[start: start + chunk] @ train_x.T).topk(k, dim=1)
        votes = torch.zeros(len(sims), classes).scatter_add_(1, train_y[index], (sims / temperature).exp())
        correct += int((votes.argmax(1) == test_y[start: start + chunk]).sum())
    return correct / len(test_x)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                          epochs: int = 100, weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Multinomial logistic regression on standardised frozen features, full-batch L-BFGS."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(train_x.shape[1], classes, generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=epochs, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float(((test_x @ weight + bias).argmax(1) == test_y).float().mean())


def probe_scores(train_x, train_y, test_x, test_y, config: ProbeConfig) -> dict[str, float]:
    return {"knn_accuracy": knn_accuracy(train_x, train_y, test_x, test_y, config.knn_k, config.knn_temperature),
            "linear_probe_accuracy": linear_probe_accuracy(train_x, train_y, test_x, test_y, config.linear_epochs,
                                                           config.linear_weight_decay)}


def probe_backbone(backbone: torch.nn.Module, train: ImageTensors, test: ImageTensors, input_size: int,
                   mean: torch.Tensor, std: torch.Tensor, config: ProbeConfig, seed: int = 0) -> dict[str, float]:
    """kNN and linear-probe accuracy of a frozen backbone (on `config`'s subsets of train and test)."""
    require_labels(train, "train")
    require_labels(test, "test")
    train, test = train.subset(config.train_examples, seed), test.subset(config.test_examples, seed)
    train_x = extract_features(backbone, train, input_size, mean, std)
    test_x = extract_features(backbone, test, input_size, mean, std)
    return probe_scores(train_x, train.labels, test_x, test.labels, config)


def pixel_baseline(train: ImageTensors, test: ImageTensors, config: ProbeConfig, seed: int = 0) -> dict[str, float]:
    """kNN and logistic regression on raw pixels: what a representation has to beat."""
    train, test = train.subset(config.train_examples, seed), test.subset(config.test_examples, seed)
    train_x, test_x = train.images.flatten(1).float() / 255, test.images.flatten(1).float() / 255
    return probe_scores(train_x, train.labels, test_x, test.labels, config)


@torch.no_grad()
def collapse_stats(embeddings: torch.Tensor) -> dict[str, float]:
    """SimSiam's check and the effective rank, on one batch of embeddings [N, d].

    `embedding_std`: mean per-dimension std of the L2-normalised embeddings times sqrt(d): about 1 when
    they spread over the sphere, 0 when collapsed to a point. `effective_rank`: exp(entropy of the
    normalised singular values) (Roy & Vetterli 2007): d when all directions are used, 1 when collapsed.
    """
    z = F.normalize(embeddings.detach().float(), dim=1)
    d = z.shape[1]
    std = float(z.std(0).mean()) * d ** 0.5
    singular = torch.linalg.svdvals(z - z.mean(0))
    p = singular / singular.sum().clamp_min(1e-12)
    rank = float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
    return {"embedding_std": std, "effective_rank": rank}
