"""Backbones stock transformers loads (`ResNetModel`, `ViTModel`), heads, and the export.

Why the ResNet's input is upscaled 2x for 28x28 images (`input_size` = 56): transformers'
`ResNetModel` has one stem, the ImageNet one (7x7 conv stride 2, then a 3x3 max-pool stride 2),
with no option for the CIFAR stem (3x3 conv stride 1, no pool); a custom stem would need our code
at load time, and the export must load with stock `AutoModel`. On a 28x28 input that stem leaves
a 7x7 map after its first two operations: most of the image is gone before the first residual
block. Resizing to 56 in the image processor (so users' inputs get the same treatment) makes the
stride-2 conv produce one output per original pixel (28x28: nothing thrown away by the first
layer), and the pool then halves to 14x14. Measured on one CPU thread (`benchmarks/vision_input_size.py`: tiny ResNet,
forward + backward, batch 256, channels-last input): native 28: 2,238 img/s but a 7x7 map after the
stem; 56: 699 img/s (14x14); 112 (stage 1 at full 28x28 - what the CIFAR stem would cost): 150
img/s. 56 is the trade-off we take on CPU; set `backbone.input_size` to 112 when there is a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel, ResNetConfig, ResNetModel, ViTConfig, ViTImageProcessor, ViTModel


@dataclass
class BackboneConfig:
    """The encoder that is pretrained and exported (names as in transformers' configs)."""

    kind: Literal["resnet", "vit"] = "resnet"
    """`resnet` (transformers `ResNetModel`, BatchNorm) or `vit` (`ViTModel`, LayerNorm: no batch coupling)."""
    input_size: int | None = None
    """Side of the model input; None = 2x the image size for resnet (see the module docstring), the image
    size for vit. The exported image processor resizes to it."""
    num_channels: int = 3
    """Input channels; grayscale images are repeated to 3 (the processor converts to RGB), so the export
    takes any image."""
    embedding_size: int = 32
    """ResNet stem width."""
    hidden_sizes: list[int] = field(default_factory=lambda: [32, 64, 128])
    """ResNet stage widths (the last is the feature size)."""
    depths: list[int] = field(default_factory=lambda: [1, 1, 1])
    """ResNet blocks per stage."""
    layer_type: Literal["basic", "bottleneck"] = "basic"
    """ResNet block type (basic = ResNet-18/34 style)."""
    patch_size: int = 4
    """ViT patch side."""
    hidden_size: int = 128
    """ViT width (the feature size)."""
    num_hidden_layers: int = 4
    """ViT layers."""
    num_attention_heads: int = 4
    """ViT heads."""
    intermediate_size: int = 256
    """ViT feed-forward width."""


def model_input_size(config: BackboneConfig, image_size: int) -> int:
    if config.input_size is not None:
        return config.input_size
    return 2 * image_size if config.kind == "resnet" else image_size


def build_backbone(config: BackboneConfig, image_size: int) -> PreTrainedModel:
    size = model_input_size(config, image_size)
    if config.kind == "resnet":
        return ResNetModel(ResNetConfig(num_channels=config.num_channels, embedding_size=config.embedding_size,
                                        hidden_sizes=list(config.hidden_sizes), depths=list(config.depths),
                                        layer_type=config.layer_type, downsample_in_first_stage=False))
    if config.kind == "vit":
        if size % config.patch_size:
            raise ValueError(f"backbone.input_size {size} is not a multiple of backbone.patch_size {config.patch_size}")
        return ViTModel(ViTConfig(image_size=size, patch_size=config.patch_size, num_channels=config.num_channels,
                                  hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                                  num_attention_heads=config.num_attention_heads,
                                  intermediate_size=config.intermediate_size, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0), add_pooling_layer=False)
    raise ValueError(f"backbone.kind={config.kind!r}; use resnet or vit")


def feature_size(backbone: PreTrainedModel) -> int:
    config = backbone.config
    return config.hidden_sizes[-1] if isinstance(backbone, ResNetModel) else config.hidden_size


def features(backbone: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, D] representation: ResNet's global-average-pooled map, ViT's [CLS] after the final norm."""
    out = backbone(pixel_values=pixel_values)
    if isinstance(backbone, ResNetModel):
        return out.pooler_output.flatten(1)
    return out.last_hidden_state[:, 0]


class MLPHead(nn.Module):
    """Linear -> [BatchNorm] -> ReLU ... -> Linear (SimCLR/MoCo v2 projector, BYOL/SimSiam predictor)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, batch_norm: bool = True,
                 last_batch_norm: bool = False):
        super().__init__()
        modules: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            modules += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
            modules += [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
            modules += [nn.ReLU(inplace=True)]
            dim = hidden_dim
        modules.append(nn.Linear(dim, out_dim, bias=not last_batch_norm))
        if last_batch_norm:  # SimSiam's projector ends with BN (no affine)
            modules.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class HeadConfig:
    """Projector (and predictor) MLP shapes."""

    hidden_dim: int = 512
    """Hidden width of the projector."""
    out_dim: int = 128
    """Projection (embedding) size the loss sees."""
    layers: int = 2
    """Linear layers in the projector."""
    batch_norm: bool = True
    """BatchNorm in the heads (off for batch-independent runs: CPU multi-process has no SyncBatchNorm)."""
    predictor_hidden_dim: int = 512
    """Hidden width of the predictor (BYOL, SimSiam, MoCo v3)."""


def image_processor(input_size: int, mean: list[float], std: list[float]) -> ViTImageProcessor:
    """What users' images go through before the exported model: RGB, resize to `input_size`, normalise."""
    return ViTImageProcessor(do_resize=True, size={"height": input_size, "width": input_size}, do_rescale=True,
                             do_normalize=True, image_mean=mean, image_std=std, do_convert_rgb=True)


def save_backbone(backbone: PreTrainedModel, out_dir: Path, input_size: int, mean: list[float],
                  std: list[float]) -> None:
    """`save_pretrained` (safetensors) + a preprocessor config that `AutoImageProcessor` loads."""
    backbone.save_pretrained(out_dir)
    image_processor(input_size, mean, std).save_pretrained(out_dir)
