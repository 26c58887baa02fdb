"""wav2vec 2.0 contrastive pretraining on raw audio (Baevski et al., 2020) on the shared trainer.

A conv feature encoder turns 16 kHz audio into ~50 frames/s; spans of frames are masked before the
context transformer; each masked frame's context vector must pick its own quantized feature (product
codebooks, Gumbel-softmax) out of K distractors quantized from other masked frames of the same
utterance. Loss = contrastive + alpha x codebook diversity + a feature L2 penalty, each averaged over
the step's frames on all processes (`LossContext.mean`), so N processes train like one.

Masks, negatives, crops and the quantizer's Gumbel noise are drawn at collate time from each example's
seed alone (not NumPy's global RNG as in transformers' `_compute_mask_indices`/`_sample_negative_indices`):
a batch is the same on 1 or N processes and after a resume. The model is a stock `Wav2Vec2ForPreTraining`; the quantizer and the loss
run in fp32 under autocast (half-precision Gumbel-softmax and cosine logits are where NaNs come from).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining

from sslcore.config import to_dict
from sslcore.data import LengthGroupedBatches, generator_for
from sslcore.hub import write_model_card
from sslcore.objective import LossContext, Objective, Ratio
from sslcore.registry import register_objective
from sslcore.run_config import RunConfig, TrainConfig
from speechssl.audio import AudioDataConfig, describe_audio, load_audio

logger = logging.getLogger(__name__)


@dataclass
class Wav2Vec2ModelConfig:
    """Model shape (names as in `transformers.Wav2Vec2Config`); defaults are the paper's BASE (95M)."""

    hidden_size: int = 768
    """Width of the context transformer."""
    num_hidden_layers: int = 12
    """Transformer layers."""
    num_attention_heads: int = 12
    """Attention heads per layer."""
    intermediate_size: int = 3072
    """Feed-forward width."""
    conv_dim: list[int] = field(default_factory=lambda: [512] * 7)
    """Channels of each conv layer of the feature encoder."""
    conv_kernel: list[int] = field(default_factory=lambda: [10, 3, 3, 3, 3, 2, 2])
    """Kernel sizes of the feature encoder."""
    conv_stride: list[int] = field(default_factory=lambda: [5, 2, 2, 2, 2, 2, 2])
    """Strides of the feature encoder (product 320: one frame per 20 ms at 16 kHz)."""
    conv_bias: bool = False
    """Bias in the conv layers."""
    feat_extract_norm: Literal["group", "layer"] = "group"
    """`group`: group norm on the first conv layer (BASE); `layer`: layer norm on every conv layer."""
    do_stable_layer_norm: bool = False
    """Pre-norm transformer (LARGE-style; steadier at high learning rates)."""
    num_conv_pos_embeddings: int = 128
    """Kernel of the convolutional relative position embedding."""
    num_conv_pos_embedding_groups: int = 16
    """Groups of that convolution."""
    num_codevector_groups: int = 2
    """G: codebooks of the product quantizer."""
    num_codevectors_per_group: int = 320
    """V: entries per codebook (G x V codevectors; perplexity at most V per group)."""
    codevector_dim: int = 256
    """Width of a quantized vector (split over the G groups)."""
    proj_codevector_dim: int = 256
    """Width of the space where context vectors and quantized targets are compared."""
    hidden_dropout: float = 0.1
    """Dropout in the transformer."""
    attention_dropout: float = 0.1
    """Dropout on attention weights."""
    activation_dropout: float = 0.0
    """Dropout after the feed-forward activation."""
    feat_proj_dropout: float = 0.1
    """Dropout on the projected features (the transformer's input)."""
    feat_quantizer_dropout: float = 0.0
    """Dropout on the features before quantization."""
    layerdrop: float = 0.05
    """Probability of skipping a whole transformer layer in training (LayerDrop)."""


@dataclass
class SpanMaskingConfig:
    """Which frames are masked and what the contrastive task compares them with."""

    mask_prob: float = 0.065
    """Probability that a frame starts a masked span (the paper's p = 0.065; about half the frames end up masked).
    fairseq's and transformers' `mask_time_prob` is this x mask_length (0.65)."""
    mask_length: int = 10
    """Frames per masked span (10 frames = 200 ms)."""
    min_masks: int = 2
    """At least this many spans per utterance."""
    num_negatives: int = 100
    """K distractors per masked frame, from the same utterance's masked frames (chance accuracy 1/(K+1))."""


@dataclass
class Wav2Vec2LossConfig:
    """Loss weights, temperatures and schedules."""

    contrastive_temperature: float = 0.1
    """kappa: cosine similarities are divided by it."""
    diversity_weight: float = 0.1
    """alpha: weight of the codebook diversity loss (raise it when codebooks collapse)."""
    feature_penalty_weight: float = 10.0
    """Weight of the L2 penalty on the feature encoder's output (fairseq's feature_pen)."""
    gumbel_max_temperature: float = 2.0
    """Gumbel-softmax temperature at step 0."""
    gumbel_min_temperature: float = 0.5
    """Floor of the annealed temperature."""
    gumbel_decay: float = 0.999995
    """Temperature x this per optimizer step (the paper: 2 -> 0.5 over its 400k updates)."""
    feature_grad_scale: float = 0.1
    """Gradient into the conv feature encoder scaled by this (fairseq's feature_grad_mult; 1 = off)."""
    collapse_fraction: float = 0.05
    """Alarm when a codebook's perplexity falls below this fraction of its size (codebook collapse)."""


@dataclass
class Wav2Vec2PretrainConfig(RunConfig):
    """wav2vec 2.0 contrastive pretraining on raw audio."""

    objective: str = "wav2vec2"
    """Registered objective name."""
    data: AudioDataConfig = field(default_factory=AudioDataConfig)
    """Audio sources, sample rate, crop length, held-out split."""
    model: Wav2Vec2ModelConfig = field(default_factory=Wav2Vec2ModelConfig)
    """Encoder, quantizer and transformer shape."""
    masking: SpanMaskingConfig = field(default_factory=SpanMaskingConfig)
    """Span masks and negatives."""
    loss: Wav2Vec2LossConfig = field(default_factory=Wav2Vec2LossConfig)
    """Weights, temperatures, schedules, collapse alarm."""
    max_batch_seconds: float | None = None
    """Audio per micro-batch (padded seconds, fairseq's max_tokens): batches of short clips hold more clips,
    up to train.per_device_batch_size; None = always per_device_batch_size clips."""


# --------------------------------------------------------------------------------------------------
# Masks and negatives (collate time, from example seeds)
# --------------------------------------------------------------------------------------------------


def frame_lengths(num_samples: torch.Tensor, conv_kernel: list[int], conv_stride: list[int]) -> torch.Tensor:
    """Frames the conv feature encoder makes of each length (the valid-convolution formula, layer by layer)."""
    lengths = num_samples.long()
    for kernel, stride in zip(conv_kernel, conv_stride):
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths.clamp(min=0)


def span_masks(frames: torch.Tensor, generators: list[torch.Generator], mask_prob: float, mask_length: int,
               min_masks: int = 2) -> torch.Tensor:
    """(B, T) bool: spans of `mask_length` frames whose starts are drawn without replacement per example.

    Example b has `frames[b]` true frames; mask_prob x frames spans (rounded at random,
    at least `min_masks`) start in [0, frames - mask_length], so spans never reach padding. Spans may
    overlap (as in fairseq), which is why p = 0.065 with span 10 masks about half the frames. Each
    example's draw depends on its own seed and length only, not on the batch it lands in.
    """
    batch, longest = len(generators), int(frames.max()) if len(frames) else 0
    rounding = torch.empty(batch)
    scores = torch.full((batch, longest), 2.0)  # 2 > any uniform draw: never chosen
    for b, gen in enumerate(generators):  # the only per-example work: drawing from each example's own stream
        n = int(frames[b])
        rounding[b] = torch.rand((), generator=gen)
        scores[b, :n] = torch.rand(n, generator=gen)
    starts_allowed = (frames - mask_length + 1).clamp(min=0)  # valid start positions per example
    positions = torch.arange(longest)
    scores = scores.masked_fill(positions[None, :] >= starts_allowed[:, None], 2.0)
    num_spans = torch.floor(mask_prob * frames + rounding).long().clamp(min=min_masks)
    num_spans = torch.minimum(num_spans, starts_allowed)
    rank = scores.argsort(dim=1, stable=True).argsort(dim=1)  # rank of each position among this example's scores
    starts = (rank < num_spans[:, None]).long()
    # Frame t is masked when a span starts in (t - mask_length, t]: a windowed count of starts via cumsum.
    covered = starts.cumsum(dim=1)
    shifted = F.pad(covered, (mask_length, 0))[:, :longest]
    return (covered - shifted) > 0


def sample_negatives(mask: torch.Tensor, generators: list[torch.Generator], num_negatives: int) -> torch.Tensor:
    """(M, K) long: for each masked frame (row-major order of `mask`), K other masked frames of the same
    utterance, as indices into the M masked rows. Uniform with replacement, never the frame itself.

    Needs at least 2 masked frames per utterance that has any (`span_masks` with mask_length >= 2 gives that).
    """
    batch, longest = mask.shape
    counts = mask.sum(dim=1)
    # One (masked frames, K) block of uniforms per utterance, from its own stream; stacked they line up with
    # the masked rows (row-major order puts each utterance's masked frames together, in time order).
    draws = torch.cat([torch.rand(int(n), num_negatives, generator=gen) for n, gen in zip(counts, generators)])
    masked_rank = mask.long().cumsum(dim=1) - 1  # t -> its rank among the utterance's masked frames
    # Rank of the j-th masked frame of this utterance -> its row among all M masked frames of the batch.
    row_offset = F.pad(counts.cumsum(0), (1, 0))[:-1]
    own = masked_rank[mask]  # (M,) rank of each masked frame within its utterance
    utterance = torch.arange(batch)[:, None].expand(batch, longest)[mask]  # (M,)
    others = (counts[utterance] - 1).clamp(min=1)
    pick = torch.floor(draws * others[:, None]).long().clamp(max=(others - 1)[:, None])
    pick = pick + (pick >= own[:, None]).long()  # skip the frame itself: uniform over the other n-1
    return row_offset[utterance][:, None] + pick


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient x scale backward (fairseq's GradMultiply)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def conv_features(feature_encoder: nn.Module, input_values: torch.Tensor) -> torch.Tensor:
    """(B, T, C) output of a stock `Wav2Vec2FeatureEncoder` (B, samples -> frames), computed with its own
    parameters in frames-first layout: each conv is `unfold` (a view of the sliding windows) + one matmul.

    Same math as `feature_encoder(input_values).transpose(1, 2)`, but the layer norm over channels that
    `feat_extract_norm="layer"` puts after every conv needs no transposes (the stock layer transposes twice and
    copies, and runs GELU on strided memory), and the weight gradient is one GEMM (oneDNN's 1-D strided conv
    backward is slow on CPU). Measured on CPU, 1 thread, the tiny preset's encoder on 16 x 2 s: forward +
    backward 2x faster, outputs equal to 1e-5 (float rounding)."""
    from transformers.models.wav2vec2.modeling_wav2vec2 import (
        Wav2Vec2GroupNormConvLayer,
        Wav2Vec2LayerNormConvLayer,
        Wav2Vec2NoLayerNormConvLayer,
    )

    layers = list(feature_encoder.conv_layers)
    known = (Wav2Vec2LayerNormConvLayer, Wav2Vec2GroupNormConvLayer, Wav2Vec2NoLayerNormConvLayer)
    if not all(type(layer) in known for layer in layers):  # another architecture's encoder: its own forward
        return feature_encoder(input_values).transpose(1, 2)
    hidden = input_values[:, :, None]  # (B, samples, 1 channel)
    for layer in layers:
        conv = layer.conv
        (kernel,), (stride,) = conv.kernel_size, conv.stride
        batch, length, channels = hidden.shape
        frames = (length - kernel) // stride + 1
        windows = hidden.unfold(1, kernel, stride).reshape(batch, frames, channels * kernel)  # (B, T', C, k)
        hidden = F.linear(windows, conv.weight.reshape(conv.out_channels, channels * kernel), conv.bias)
        if isinstance(layer, Wav2Vec2LayerNormConvLayer):  # each frame over channels
            hidden = layer.layer_norm(hidden)
        elif isinstance(layer, Wav2Vec2GroupNormConvLayer):  # each channel over time (BASE's first layer)
            hidden = layer.layer_norm(hidden.transpose(1, 2)).transpose(1, 2)
        hidden = layer.activation(hidden)
    return hidden


class Wav2Vec2Contrastive(nn.Module):
    """A stock `Wav2Vec2ForPreTraining` run through its parts, so that the pieces the loss needs come out:
    the conv features (for the L2 penalty and the gradient scale), only the masked frames projected and
    quantized (negatives are masked frames too), and the quantizer in fp32.
    Everything that needs gradients happens in `forward` (DDP syncs what goes through it)."""

    def __init__(self, model: Wav2Vec2ForPreTraining, feature_grad_scale: float = 1.0):
        super().__init__()
        self.model, self.feature_grad_scale = model, feature_grad_scale

    def quantize(self, features: torch.Tensor, temperature: float,
                 gumbel_uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(codevectors (M, codevector_dim), per-codebook sum of code probabilities (G, V)), in fp32.

        Training: hard Gumbel-softmax (straight-through) with the noise made from `gumbel_uniform` (M, G, V)
        uniforms the collator drew from the example seeds, and the marginal from the soft distribution as in
        the paper's diversity loss; eval: argmax codes, the marginal from those."""
        quantizer = self.model.quantizer
        groups, entries = quantizer.num_groups, quantizer.num_vars
        logits = quantizer.weight_proj(features.float()).view(-1, groups, entries)
        if self.training:
            if gumbel_uniform is None:
                gumbel_uniform = torch.rand_like(logits)
            gumbel = -torch.log(-torch.log(gumbel_uniform.float().clamp(1e-10, 1 - 1e-7)))
            soft = ((logits + gumbel) / temperature).softmax(dim=-1)
            hard = F.one_hot(soft.argmax(dim=-1), entries).to(soft.dtype)
            codes = hard - soft.detach() + soft  # straight-through: hard codes forward, soft gradient
            usage = logits.softmax(dim=-1).sum(dim=0)
        else:
            codes = F.one_hot(logits.argmax(dim=-1), entries).float()
            usage = codes.sum(dim=0)
        codebooks = quantizer.codevectors.float().view(groups, entries, -1)
        return torch.einsum("mgv,gvd->mgd", codes, codebooks).flatten(1), usage

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor, frame_mask: torch.Tensor,
                mask_time_indices: torch.Tensor, negative_indices: torch.Tensor, gumbel_temperature: float,
                contrastive_temperature: float, gumbel_uniform: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        wav2vec2 = self.model.wav2vec2
        conv = conv_features(wav2vec2.feature_extractor, input_values)  # (B, T, C)
        if self.training and self.feature_grad_scale != 1.0:
            conv = _ScaleGrad.apply(conv, self.feature_grad_scale)
        if conv.shape[1] != frame_mask.shape[1]:
            raise ValueError(f"the feature encoder made {conv.shape[1]} frames, the collator expected "
                             f"{frame_mask.shape[1]}: model.conv_kernel/conv_stride differ from the collator's")
        # Mean square of each true frame's features, summed (padding frames excluded): the L2 penalty.
        feature_penalty = (conv.float().pow(2).mean(dim=-1) * frame_mask).sum()
        hidden, normed = wav2vec2.feature_projection(conv)
        hidden = wav2vec2._mask_hidden_states(hidden, mask_time_indices=mask_time_indices)
        hidden = wav2vec2.encoder(hidden, attention_mask=frame_mask).last_hidden_state

        with torch.autocast(device_type=input_values.device.type, enabled=False):
            predicted = self.model.project_hid(hidden[mask_time_indices].float())  # (M, D)
            codevectors, usage = self.quantize(self.model.dropout_features(normed[mask_time_indices]),
                                               gumbel_temperature, gumbel_uniform)
            targets = self.model.project_q(codevectors)  # (M, D)
            negatives = targets[negative_indices]  # (M, K, D)
            candidates = torch.cat([targets[:, None], negatives], dim=1)
            logits = F.cosine_similarity(predicted[:, None].float(), candidates, dim=-1) / contrastive_temperature
            # A distractor quantized to exactly the positive's codes is no distractor (low codebook use).
            same = (negatives == targets[:, None]).all(dim=-1)
            logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(same, float("-inf"))], dim=1)
        return {"logits": logits, "usage": usage, "feature_penalty": feature_penalty}


def contrastive_loss(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy of picking column 0, the positive; how many rows ranked it first)."""
    target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), target, reduction="sum"), (logits.argmax(dim=1) == 0).sum()


def codebook_perplexity(usage: torch.Tensor) -> torch.Tensor:
    """(G,) perplexity of each codebook's average code distribution, from the summed probabilities (G, V)."""
    probs = usage / usage.sum(dim=-1, keepdim=True).clamp(min=1e-9)
    return torch.exp(-torch.xlogy(probs, probs).sum(dim=-1))


def diversity_loss(perplexity: torch.Tensor, entries: int) -> torch.Tensor:
    """(G V - sum of perplexities) / (G V): 0 when every code of every codebook is used equally."""
    total = perplexity.numel() * entries
    return (total - perplexity.sum()) / total


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------


@register_objective
class Wav2Vec2Objective(Objective):
    """wav2vec 2.0: span-masked contrastive prediction of quantized features; exports `Wav2Vec2ForPreTraining`
    (stock `AutoModel` gives the `Wav2Vec2Model` encoder) and its `Wav2Vec2FeatureExtractor`."""

    name = "wav2vec2"
    config_class = Wav2Vec2PretrainConfig
    unit = "audio_s"
    config: Wav2Vec2PretrainConfig

    def __init__(self, config: Wav2Vec2PretrainConfig):
        super().__init__(config)
        self.gumbel_temperature = config.loss.gumbel_max_temperature
        self._last_perplexity: torch.Tensor | None = None
        self._check()

    def _check(self) -> None:
        masking, model = self.config.masking, self.config.model
        if masking.mask_length < 2 or masking.num_negatives < 1 or not 0 < masking.mask_prob < 1:
            raise ValueError("masking: need mask_length >= 2 (negatives come from other masked frames), "
                             f"num_negatives >= 1 and 0 < mask_prob < 1; got {masking}")
        if not (len(model.conv_dim) == len(model.conv_kernel) == len(model.conv_stride)):
            raise ValueError(f"model.conv_dim, conv_kernel and conv_stride need one entry per conv layer; got "
                             f"{len(model.conv_dim)}, {len(model.conv_kernel)}, {len(model.conv_stride)}")
        if model.codevector_dim % model.num_codevector_groups:
            raise ValueError(f"model.codevector_dim ({model.codevector_dim}) must be divisible by "
                             f"num_codevector_groups ({model.num_codevector_groups})")
        shortest = frame_lengths(torch.tensor([int(self.config.data.min_seconds * self.config.data.sampling_rate)]),
                                 model.conv_kernel, model.conv_stride)
        if int(shortest) <= masking.mask_length:
            raise ValueError(f"data.min_seconds={self.config.data.min_seconds} gives {int(shortest)} frames, not more "
                             f"than one mask span ({masking.mask_length}); raise data.min_seconds")

    # -- data -----------------------------------------------------------------------------
    def prepare(self, accelerator=None) -> None:
        self.splits = load_audio(self.config.data)
        self.splits = {name: split.with_format("numpy") for name, split in self.splits.items()}
        self.max_samples = int(self.config.data.max_seconds * self.config.data.sampling_rate)
        chance = 1.0 / (self.config.masking.num_negatives + 1)
        model = self.config.model
        logger.info("wav2vec2: %d negatives (chance accuracy %.4f); %d codebooks x %d codes (perplexity at most %d "
                    "each); collapse alarm below %.0f%% of that", self.config.masking.num_negatives, chance,
                    model.num_codevector_groups, model.num_codevectors_per_group, model.num_codevectors_per_group,
                    100 * self.config.loss.collapse_fraction)

    def train_dataset(self):
        return self.splits["train"]

    def eval_dataset(self):
        return self.splits.get("validation")

    def batch_sampler(self, dataset, batch_size: int, seed: int):
        lengths = np.minimum(np.asarray(dataset["num_samples"]), self.max_samples).tolist()
        max_units = (None if self.config.max_batch_seconds is None
                     else int(self.config.max_batch_seconds * self.config.data.sampling_rate))
        if max_units is not None and max_units < self.max_samples:
            raise ValueError(f"max_batch_seconds={self.config.max_batch_seconds} is shorter than one crop "
                             f"(data.max_seconds={self.config.data.max_seconds}); raise it")
        return LengthGroupedBatches(lengths, batch_size, seed, max_units=max_units)

    def collate(self, examples: list[dict[str, Any]], seeds: list[int]) -> dict[str, torch.Tensor]:
        generators = [generator_for(seed) for seed in seeds]
        clips = []
        for example, gen in zip(examples, generators):
            audio = torch.tensor(example["audio"], dtype=torch.float32)  # a copy: Arrow buffers are read-only
            if len(audio) > self.max_samples:  # a random window, from the example's own stream
                start = int(torch.randint(len(audio) - self.max_samples + 1, (), generator=gen))
                audio = audio[start: start + self.max_samples]
            clips.append(audio)
        lengths = torch.tensor([len(c) for c in clips])
        padded = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True)
        attention_mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
        # Zero mean, unit variance per utterance over its true samples (what Wav2Vec2FeatureExtractor does).
        mean = padded.sum(dim=1) / lengths
        var = ((padded - mean[:, None]).pow(2) * attention_mask).sum(dim=1) / lengths
        input_values = ((padded - mean[:, None]) / torch.sqrt(var[:, None] + 1e-7)) * attention_mask
        model, masking = self.config.model, self.config.masking
        frames = frame_lengths(lengths, model.conv_kernel, model.conv_stride)
        longest = int(frame_lengths(torch.tensor([padded.shape[1]]), model.conv_kernel, model.conv_stride))
        frame_mask = torch.arange(longest)[None, :] < frames[:, None]
        mask = span_masks(frames, generators, masking.mask_prob, masking.mask_length, masking.min_masks)
        mask = F.pad(mask, (0, longest - mask.shape[1]))
        negatives = sample_negatives(mask, generators, masking.num_negatives)
        # The quantizer's Gumbel noise comes from the example seeds too, not the process's RNG: the codes
        # picked are then the same on 1 or N processes and after a resume.
        masked_per_example = mask.sum(dim=1).tolist()
        gumbel_uniform = torch.cat([torch.rand(n, model.num_codevector_groups, model.num_codevectors_per_group,
                                               generator=gen) for n, gen in zip(masked_per_example, generators)])
        return {"input_values": input_values, "attention_mask": attention_mask.long(), "frame_mask": frame_mask,
                "mask_time_indices": mask, "negative_indices": negatives, "gumbel_uniform": gumbel_uniform}

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        return float(batch["attention_mask"].sum()) / self.config.data.sampling_rate

    def targets(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        masked = batch["mask_time_indices"].sum()
        return {"contrastive": masked, "diversity": masked, "features": batch["frame_mask"].sum()}

    # -- model and loss -------------------------------------------------------------------
    def hf_config(self) -> Wav2Vec2Config:
        masking, loss = self.config.masking, self.config.loss
        return Wav2Vec2Config(
            **vars(self.config.model), mask_time_prob=min(masking.mask_prob * masking.mask_length, 0.95), mask_time_length=masking.mask_length,
            mask_time_min_masks=masking.min_masks, num_negatives=masking.num_negatives,
            contrastive_logits_temperature=loss.contrastive_temperature, diversity_loss_weight=loss.diversity_weight,
        )

    def build_model(self) -> nn.Module:
        model = Wav2Vec2ForPreTraining(self.hf_config())
        model.set_gumbel_temperature(self.gumbel_temperature)
        return Wav2Vec2Contrastive(model, self.config.loss.feature_grad_scale)

    def ddp_options(self) -> dict[str, Any]:
        # A layer skipped by LayerDrop gets no gradient in that step.
        return {"find_unused_parameters": self.config.model.layerdrop > 0}

    def build_optimizer(self, model: nn.Module, args: TrainConfig) -> torch.optim.Optimizer:
        """AdamW over `parameter_groups`, fused on CPU/GPU (one kernel per tensor)."""
        return torch.optim.AdamW(self.parameter_groups(model, args.weight_decay), lr=args.learning_rate,
                                 betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, fused=True)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             ctx: LossContext) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(**batch, gumbel_temperature=self.gumbel_temperature,
                    contrastive_temperature=self.config.loss.contrastive_temperature)
        contrastive, correct = contrastive_loss(out["logits"])
        masked = len(out["logits"])
        perplexity = codebook_perplexity(out["usage"])
        # Diversity of this micro-batch's code usage, weighted by its masked frames in the step's mean.
        diversity = diversity_loss(perplexity, self.config.model.num_codevectors_per_group) * masked
        loss_cfg = self.config.loss
        total = (ctx.mean("contrastive", contrastive)
                 + ctx.mean("diversity", diversity, weight=loss_cfg.diversity_weight)
                 + ctx.mean("features", out["feature_penalty"], weight=loss_cfg.feature_penalty_weight))
        if ctx.training:
            self._last_perplexity = perplexity.detach()
        samples = batch["attention_mask"]
        logs: dict[str, Any] = {"contrastive_accuracy": Ratio(correct.float(), float(masked)),
                                "codevector_perplexity": perplexity.sum().detach(),
                                # Share of the batch's samples that are padding (length grouping keeps it small).
                                "padding_fraction": Ratio((samples.numel() - samples.sum()).float(), float(samples.numel()))}
        if ctx.training:  # eval picks codes by argmax: no temperature
            logs["gumbel_temperature"] = self.gumbel_temperature
        logs.update({f"perplexity_g{g}": p for g, p in enumerate(perplexity.detach())})
        return total, logs

    # -- schedules and state --------------------------------------------------------------
    def temperature_at(self, step: int) -> float:
        loss = self.config.loss
        return max(loss.gumbel_max_temperature * loss.gumbel_decay ** step, loss.gumbel_min_temperature)

    def step_hooks(self):
        def anneal_gumbel(model: nn.Module, step: int) -> None:
            self.gumbel_temperature = self.temperature_at(step)
            model.model.set_gumbel_temperature(self.gumbel_temperature)

        def collapse_alarm(model: nn.Module, step: int) -> None:
            if step % self.config.train.log_every or self._last_perplexity is None:
                return
            entries = self.config.model.num_codevectors_per_group
            worst = float(self._last_perplexity.min())
            if worst < self.config.loss.collapse_fraction * entries and _is_main_process():
                logger.warning(
                    "codebook collapse at step %d: a codebook's perplexity is %.1f of %d possible codes (alarm below "
                    "%.0f%%): the quantizer uses few codes, so the contrastive task gets easy and teaches little. "
                    "Try a lower train.learning_rate, a longer train.warmup_steps, a larger loss.diversity_weight, "
                    "or a higher loss.gumbel_min_temperature.", step, worst, entries,
                    100 * self.config.loss.collapse_fraction)

        return [anneal_gumbel, collapse_alarm]

    def state_dict(self) -> dict[str, Any]:
        return {"gumbel_temperature": self.gumbel_temperature}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gumbel_temperature = float(state["gumbel_temperature"])

    # -- export ---------------------------------------------------------------------------
    def feature_extractor(self) -> Wav2Vec2FeatureExtractor:
        return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=self.config.data.sampling_rate,
                                        padding_value=0.0, do_normalize=True, return_attention_mask=True)

    def export(self, model: Wav2Vec2Contrastive, out_dir: Path, summary: dict[str, Any]) -> Path:
        out_dir = Path(out_dir)
        model.model.save_pretrained(out_dir)
        self.feature_extractor().save_pretrained(out_dir)
        shape = self.config.model
        chance = 1.0 / (self.config.masking.num_negatives + 1)
        write_model_card(
            out_dir, model_name=out_dir.name if out_dir.name != "model" else "Wav2Vec2ForPreTraining",
            summary=(f"A wav2vec 2.0 encoder ({shape.num_hidden_layers} transformer layers, hidden {shape.hidden_size}, "
                     f"{shape.num_codevector_groups}x{shape.num_codevectors_per_group} codebooks) pretrained with "
                     f"the contrastive objective for {summary.get('steps')} steps. Contrastive accuracy: chance is "
                     f"{chance:.4f} with {self.config.masking.num_negatives} distractors."),
            config=to_dict(self.config), training_data=describe_audio(self.config.data, self.splits),
            metrics={k: v for k, v in summary.items() if isinstance(v, int | float)},
            pipeline_tag="feature-extraction", tags=["audio", "speech", "wav2vec2"],
            usage=("from transformers import AutoFeatureExtractor, AutoModel\n"
                   f'extractor = AutoFeatureExtractor.from_pretrained("{out_dir}")\n'
                   f'encoder = AutoModel.from_pretrained("{out_dir}")  # Wav2Vec2Model\n'
                   f"inputs = extractor(waveform_16khz, sampling_rate={self.config.data.sampling_rate}, "
                   'return_tensors="pt")\nhidden = encoder(**inputs).last_hidden_state'),
        )
        return out_dir


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def masked_fraction(batch: dict[str, torch.Tensor]) -> float:
    """Share of true frames that are masked (about 0.49 at p = 0.065, span 10)."""
    return float(batch["mask_time_indices"].sum()) / max(float(batch["frame_mask"].sum()), 1.0)


__all__ = ["Wav2Vec2Contrastive", "Wav2Vec2ModelConfig", "Wav2Vec2Objective", "Wav2Vec2PretrainConfig",
           "codebook_perplexity", "contrastive_loss", "diversity_loss", "frame_lengths", "masked_fraction",
           "sample_negatives", "span_masks"]
