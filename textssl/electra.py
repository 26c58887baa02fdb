"""ELECTRA replaced-token detection (Clark et al., 2020).

A small masked-LM, the generator, fills the masked positions of a block with tokens sampled from
its own predictions; the discriminator -- the encoder that is kept -- reads the corrupted block
and tells, at EVERY token, whether it is the original or a replacement. So the discriminator
learns from all tokens of a block instead of the 15% a masked-LM scores, which the paper shows is
far more compute-efficient for small models.

As in the paper and its code: the two share the whole embedding layer (token, position and
token-type tables and their LayerNorm); the generator has the discriminator's depth and a fraction
of its width (1/4 for ELECTRA-Small, 1/3 for Base); loss = generator MLM + 50 x RTD; no gradient
flows through the sampling; a sampled token equal to the original is labelled "original"; 85% of
the masked positions show [MASK] to the generator and the rest keep their token.

Randomness: the mask and one uniform number per position come from the example's seed (collate),
and the sample is the inverse CDF of the generator's distribution at that number, so a batch is
corrupted the same way on 1 or N processes and after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining

from sslcore.config import ConfigError
from sslcore.data import example_seed, generator_for
from sslcore.objective import LossContext, Ratio
from sslcore.registry import register_objective
from sslcore.run_config import RunConfig
from textssl.data import TextDataConfig, describe_corpus, export_text_model
from textssl.embedding_init import Word2VecInitConfig, load_into
from textssl.masking import IGNORE_INDEX, MaskingConfig
from textssl.mlm import MaskedLMObjective, masked_token_count, mlm_loss
from textssl.tokenizer import TokenizerConfig

SAMPLING_STREAM = 1
"""Index of the per-example stream the generator's sampling uniforms come from (the mask uses the
example seed itself): independent draws, both fixed by the example's seed."""


@dataclass
class ElectraModelConfig:
    """Discriminator shape (names as in `transformers.ElectraConfig`) and the generator's size relative to it."""

    embedding_size: int = 128
    """Width of the shared embedding tables (projected to each model's hidden size when it differs)."""
    hidden_size: int = 128
    """Width of the discriminator."""
    num_hidden_layers: int = 2
    """Transformer layers of the discriminator and of the generator (same depth, as in the paper)."""
    num_attention_heads: int = 2
    """Attention heads per discriminator layer."""
    intermediate_size: int = 512
    """Feed-forward width of the discriminator."""
    generator_size: float = 0.25
    """Generator width (hidden, feed-forward, heads) as a fraction of the discriminator's: 1/4 for
    ELECTRA-Small, 1/3 for Base. The paper finds 1/4-1/2 best; a generator as strong as the
    discriminator makes the task too hard."""
    hidden_dropout_prob: float = 0.1
    """Dropout on hidden states (both models)."""
    attention_probs_dropout_prob: float = 0.1
    """Dropout on attention weights (both models)."""
    max_position_embeddings: int = 512
    """Longest sequence the position table covers (>= data.max_seq_length)."""
    initializer_range: float = 0.02
    """Std of the normal init."""

    def __post_init__(self) -> None:
        if not 0.0 < self.generator_size <= 1.0:
            raise ConfigError(f"model.generator_size must be in (0, 1], got {self.generator_size} "
                              "(a fraction of the discriminator's width: 0.25 for ELECTRA-Small, 1/3 for Base)")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not a multiple of model.num_attention_heads="
                              f"{self.num_attention_heads}; change one of them")
        hidden, heads = self.generator_shape()[:2]
        if hidden % heads:
            raise ConfigError(f"the generator's width {hidden} (model.hidden_size x model.generator_size) is not a "
                              f"multiple of its {heads} attention heads; pick a generator_size that divides evenly")

    def generator_shape(self) -> tuple[int, int, int]:
        """(hidden, heads, feed-forward) of the generator: the discriminator's scaled by `generator_size`."""
        return (max(1, round(self.hidden_size * self.generator_size)),
                max(1, round(self.num_attention_heads * self.generator_size)),
                max(1, round(self.intermediate_size * self.generator_size)))

    def electra_configs(self, vocab_size: int, pad_token_id: int) -> tuple[ElectraConfig, ElectraConfig]:
        """(generator, discriminator) `ElectraConfig`s."""
        shared = {"vocab_size": vocab_size, "pad_token_id": pad_token_id, "type_vocab_size": 2,
                  "embedding_size": self.embedding_size, "num_hidden_layers": self.num_hidden_layers,
                  "hidden_dropout_prob": self.hidden_dropout_prob,
                  "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
                  "max_position_embeddings": self.max_position_embeddings,
                  "initializer_range": self.initializer_range}
        hidden, heads, intermediate = self.generator_shape()
        generator = ElectraConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=intermediate,
                                  **shared)
        discriminator = ElectraConfig(hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                                      intermediate_size=self.intermediate_size, **shared)
        return generator, discriminator


def electra_masking() -> MaskingConfig:
    """ELECTRA's masking: 15% of the tokens, 85% of them shown as [MASK], the rest unchanged (no random
    tokens: the generator's samples are the replacements)."""
    return MaskingConfig(mlm_probability=0.15, mask_replace_prob=0.85, random_replace_prob=0.0)


@dataclass
class RTDConfig:
    """How the two losses are combined."""

    rtd_weight: float = 50.0
    """lambda in loss = MLM(generator) + lambda x RTD(discriminator); 50 as in the paper (the
    per-token binary loss is much smaller than the MLM cross-entropy)."""

    def __post_init__(self) -> None:
        if self.rtd_weight <= 0:
            raise ConfigError(f"rtd.rtd_weight must be > 0, got {self.rtd_weight} (50 as in the ELECTRA paper)")


@dataclass
class ElectraRTDConfig(RunConfig):
    """ELECTRA pretraining: a small generator (masked-LM) and a discriminator (replaced-token detection)."""

    objective: str = "electra_rtd"
    """Registered objective name."""
    data: TextDataConfig = field(default_factory=TextDataConfig)
    """Corpus and sequence length."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """WordPiece tokenizer trained on the corpus (or a given one)."""
    model: ElectraModelConfig = field(default_factory=ElectraModelConfig)
    """Discriminator shape and the generator's relative size."""
    masking: MaskingConfig = field(default_factory=electra_masking)
    """Which positions the generator fills (ELECTRA: 15%, 85% of them [MASK], no random tokens)."""
    rtd: RTDConfig = field(default_factory=RTDConfig)
    """Weight of the replaced-token-detection loss."""
    embedding_init: Word2VecInitConfig = field(default_factory=Word2VecInitConfig)
    """Start the shared token embeddings from skip-gram vectors of the tokenizer's pieces (off by default)."""


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """One token per row of `logits` drawn from softmax(logits) by inverse CDF at `uniforms` (in [0, 1)).

    A pure function of its inputs (the uniforms come from the example seeds), so the draw does not
    depend on the device, the process count or an RNG state. `banned` (bool over the vocabulary)
    gets zero probability: special tokens would put [MASK]/[PAD] into the discriminator's input.
    """
    probs = torch.softmax(logits.detach().float().masked_fill(banned, float("-inf")), dim=-1)
    cdf = probs.cumsum(-1)
    # First token whose cumulative probability exceeds u x total (right=True skips zero-probability tokens).
    picked = torch.searchsorted(cdf, (uniforms.float() * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    # u x total can round up to the total (index = vocab size): take the last allowed token then.
    last_allowed = (~banned).cumsum(0).argmax()  # first index where the count of allowed tokens peaks; no host sync
    return torch.minimum(picked, last_allowed)


def replace_tokens(originals: torch.Tensor, selected: torch.Tensor,
                   sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The discriminator's input and labels: `sampled` (one per selected position, row-major) written
    over `originals` at `selected`; a position is "replaced" only where the token changed, so a
    sample equal to the original counts as original (as in the paper)."""
    corrupted = originals.clone()
    corrupted[selected] = sampled
    return corrupted, corrupted != originals


def rtd_loss(logits: torch.Tensor, replaced: torch.Tensor,
             real: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, Ratio]]:
    """SUMMED binary cross-entropy of the discriminator over the real (non-padding) tokens (the caller
    divides by the step's real-token count), and exact-ratio logs: its accuracy, the accuracy of always
    answering "original" (the baseline it must beat), recall on replaced tokens, the replaced fraction."""
    if real is None:
        real = torch.ones_like(replaced)
    logits, replaced = logits[real], replaced[real]
    loss = F.binary_cross_entropy_with_logits(logits.float(), replaced.float(), reduction="sum")
    said_replaced = logits.detach() > 0
    tokens, n_replaced = replaced.numel(), replaced.sum()
    return loss, {
        "rtd_accuracy": Ratio((said_replaced == replaced).sum(), tokens),
        "rtd_baseline_accuracy": Ratio(tokens - n_replaced, tokens),
        "rtd_replaced_recall": Ratio((said_replaced & replaced).sum(), n_replaced),
        "replaced_fraction": Ratio(n_replaced, tokens),
        "rtd_bce": Ratio(loss.detach(), tokens),
    }


class GeneratorDiscriminator(nn.Module):
    """The generator (`ElectraForMaskedLM`) and the discriminator (`ElectraForPreTraining`) with one
    shared embedding layer, run together in `forward` so DDP syncs every parameter that gets a gradient.

    The generator's vocabulary head runs only at the masked positions (most of a small MLM's compute
    otherwise); the discriminator scores every position.
    """

    def __init__(self, generator: ElectraForMaskedLM, discriminator: ElectraForPreTraining, banned: torch.Tensor):
        super().__init__()
        shared = discriminator.electra.embeddings
        generator.electra.embeddings = shared
        # The generator's output layer is tied to the (now shared) token table, as in the paper.
        generator.generator_lm_head.weight = shared.word_embeddings.weight
        self.generator, self.discriminator = generator, discriminator
        self.register_buffer("banned", banned, persistent=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, sample_uniforms: torch.Tensor,
                attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (generator logits at the masked positions, their targets, discriminator logits at every
        position, which positions were replaced)."""
        selected = labels != IGNORE_INDEX
        hidden = self.generator.electra(input_ids, attention_mask=attention_mask).last_hidden_state
        generator_logits = self.generator.generator_lm_head(self.generator.generator_predictions(hidden[selected]))
        targets = labels[selected]
        # The discriminator's loss is not propagated into the generator (sampling is not differentiable).
        with torch.no_grad():
            sampled = sample_tokens(generator_logits, sample_uniforms[selected], self.banned)
            originals = torch.where(selected, labels, input_ids)
            corrupted, replaced = replace_tokens(originals, selected, sampled)
        discriminator_logits = self.discriminator(corrupted, attention_mask=attention_mask).logits
        return generator_logits, targets, discriminator_logits, replaced


@register_objective
class ElectraRTDObjective(MaskedLMObjective):
    """ELECTRA on the masked-LM's packed `[CLS] ... [SEP]` blocks (same corpus, tokenizer and masking
    code); exports the discriminator as `ElectraForPreTraining` and the generator as `ElectraForMaskedLM`."""

    name = "electra_rtd"
    config_class = ElectraRTDConfig
    unit = "tokens"
    reports_perplexity = False  # the loss is MLM + lambda x RTD, not one token cross-entropy
    config: ElectraRTDConfig

    def collate(self, examples: list[dict[str, Any]], seeds: list[int]) -> dict[str, torch.Tensor]:
        batch = super().collate(examples, seeds)
        length = batch["input_ids"].shape[1]
        batch["sample_uniforms"] = torch.stack(
            [torch.rand(length, generator=generator_for(example_seed(seed, 0, SAMPLING_STREAM))) for seed in seeds])
        return batch

    def targets(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | int]:
        """The MLM term averages over masked tokens, the RTD term over every real token."""
        mask = batch.get("attention_mask")
        return {"mlm": masked_token_count(batch), "rtd": mask.sum() if mask is not None else batch["input_ids"].numel()}

    def build_model(self) -> nn.Module:
        model = self.config.model
        if model.max_position_embeddings < self.config.data.max_seq_length:
            raise ConfigError(f"model.max_position_embeddings={model.max_position_embeddings} is below "
                              f"data.max_seq_length={self.config.data.max_seq_length}; raise it")
        generator, discriminator = model.electra_configs(len(self.tokenizer), self.tokenizer.pad_token_id)
        banned = torch.zeros(len(self.tokenizer), dtype=torch.bool)
        banned[self.special_ids] = True
        pair = GeneratorDiscriminator(ElectraForMaskedLM(generator), ElectraForPreTraining(discriminator), banned)
        if self.piece_vectors is not None:  # the table both models share
            load_into(pair.discriminator.get_input_embeddings(), *self.piece_vectors, std=discriminator.initializer_range)
        return pair

    def embedding_width(self) -> int:
        return self.config.model.embedding_size

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             ctx: LossContext) -> tuple[torch.Tensor, dict[str, Any]]:
        generator_logits, targets, discriminator_logits, replaced = model(**batch)
        masked_lm, logs = mlm_loss(generator_logits, targets)
        mask = batch.get("attention_mask")
        detection, rtd_logs = rtd_loss(discriminator_logits, replaced, mask.bool() if mask is not None else None)
        # The trainer logs each term's share of the loss: mlm_loss, and rtd_loss = weight x rtd_bce.
        return (ctx.mean("mlm", masked_lm) + ctx.mean("rtd", detection, weight=self.config.rtd.rtd_weight),
                {**logs, **rtd_logs})

    def export(self, model: GeneratorDiscriminator, out_dir: Path, summary: dict[str, Any]) -> Path:
        """The discriminator (the encoder to fine-tune) to `out_dir`, the generator to `out_dir/../generator`;
        each a stock folder with the tokenizer and a model card."""
        out_dir = Path(out_dir)
        shape, training_data = self.config.model, describe_corpus(self.config.data, self.corpus)
        hidden = model.generator.config.hidden_size
        trained = (f"pretrained with ELECTRA replaced-token detection for {summary.get('steps')} steps (generator "
                   f"width {hidden}, RTD weight {self.config.rtd.rtd_weight:g})")
        export_text_model(
            model.generator, self.tokenizer, out_dir.parent / "generator", config=self.config,
            training_data=training_data, summary=summary, pipeline_tag="fill-mask",
            description=f"The generator (a small masked-LM, {shape.num_hidden_layers} layers, hidden {hidden}) of an "
                        f"ELECTRA discriminator {trained}. Its embeddings are the discriminator's.",
            usage=f'from transformers import pipeline\nfill = pipeline("fill-mask", model="{{path}}")\n'
                  f'print(fill("the capital of france is {self.tokenizer.mask_token}."))')
        return export_text_model(
            model.discriminator, self.tokenizer, out_dir, config=self.config, training_data=training_data,
            summary=summary, pipeline_tag="feature-extraction",
            description=f"An ELECTRA discriminator ({shape.num_hidden_layers} layers, hidden {shape.hidden_size}) "
                        f"{trained}: the encoder to fine-tune. The generator is exported beside it "
                        "(`../generator`, `pipeline('fill-mask')`).",
            usage='from transformers import AutoModelForPreTraining, AutoModelForSequenceClassification\n'
                  'detector = AutoModelForPreTraining.from_pretrained("{path}")  # per-token "replaced" logits\n'
                  'classifier = AutoModelForSequenceClassification.from_pretrained("{path}", num_labels=2)  # fine-tune')
