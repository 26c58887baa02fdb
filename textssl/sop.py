"""ALBERT pretraining: masked-LM + sentence-order prediction (`AlbertForPreTraining`).

ALBERT's two parameter savings are kept: factorized embeddings (vocab -> `embedding_size` ->
`hidden_size`) and one set of transformer weights shared by every layer. The tokenizer is a
SentencePiece-style Unigram model trained locally with `tokenizers` ("▁" marks word starts, which
whole-word masking reads). SOP pairs are two consecutive segments of one document, swapped with
probability `pairs.negative_prob`; the swap is drawn per example at collate time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import AlbertConfig, AlbertForPreTraining

from sslcore.registry import register_objective
from sslcore.run_config import RunConfig
from textssl.data import TextDataConfig
from textssl.masking import MaskingConfig
from textssl.nsp import SentencePairObjective
from textssl.pairs import PairConfig
from textssl.tokenizer import TokenizerConfig


@dataclass
class AlbertModelConfig:
    """ALBERT encoder shape (names as in `transformers.AlbertConfig`; vocab size comes from the tokenizer)."""

    embedding_size: int = 64
    """Width of the factorized token embeddings, projected up to hidden_size (ALBERT: 128)."""
    hidden_size: int = 128
    """Width of the encoder."""
    num_hidden_layers: int = 2
    """Transformer layers (applied with shared weights)."""
    num_hidden_groups: int = 1
    """Groups of layers that share weights; 1 = every layer shares one set (ALBERT's default)."""
    num_attention_heads: int = 2
    """Attention heads per layer."""
    intermediate_size: int = 512
    """Feed-forward width."""
    hidden_dropout_prob: float = 0.0
    """Dropout on hidden states (ALBERT trains without dropout)."""
    attention_probs_dropout_prob: float = 0.0
    """Dropout on attention weights."""
    classifier_dropout_prob: float = 0.1
    """Dropout before the sentence-order classifier."""
    max_position_embeddings: int = 512
    """Longest sequence the position table covers (>= data.max_seq_length)."""
    initializer_range: float = 0.02
    """Std of the normal init."""


@dataclass
class SOPConfig(RunConfig):
    """ALBERT pretraining: masked-LM + sentence-order prediction."""

    objective: str = "albert_sop"
    """Registered objective name."""
    data: TextDataConfig = field(default_factory=TextDataConfig)
    """Corpus and sequence length (pairs are padded to the longest in a batch, at most max_seq_length)."""
    pairs: PairConfig = field(default_factory=PairConfig)
    """How documents become segments and pairs (negative_prob: share of swapped pairs)."""
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(kind="unigram"))
    """SentencePiece-style Unigram tokenizer trained on the corpus (or a given one)."""
    model: AlbertModelConfig = field(default_factory=AlbertModelConfig)
    """Encoder shape."""
    masking: MaskingConfig = field(default_factory=lambda: MaskingConfig(whole_word=True))
    """Masking rate and scheme (whole words by default, read from the "▁" word starts)."""


@register_objective
class SentenceOrderObjective(SentencePairObjective):
    """ALBERT masked-LM + SOP on consecutive segments; exports `AlbertForPreTraining` (MLM and SOP heads)."""

    name = "albert_sop"
    config_class = SOPConfig
    task = "sop"
    pair_name = "sop"
    heads = ("predictions", "sop_classifier")
    config: SOPConfig

    def build_model(self) -> nn.Module:
        model = self.config.model
        if model.max_position_embeddings < self.config.data.max_seq_length:
            raise ValueError(f"model.max_position_embeddings={model.max_position_embeddings} is below "
                             f"data.max_seq_length={self.config.data.max_seq_length}; raise it")
        if model.num_hidden_layers % model.num_hidden_groups:
            raise ValueError(f"model.num_hidden_layers={model.num_hidden_layers} must be a multiple of "
                             f"model.num_hidden_groups={model.num_hidden_groups}")
        tok = self.tokenizer
        config = AlbertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                              eos_token_id=tok.sep_token_id, type_vocab_size=2, **vars(model))
        return self.wrap(AlbertForPreTraining(config))

    def describe(self, summary: dict[str, Any]) -> str:
        model = self.config.model
        return (f"An ALBERT encoder ({model.num_hidden_layers} layers sharing {model.num_hidden_groups} weight "
                f"group(s), hidden {model.hidden_size}, embeddings {model.embedding_size}) pretrained with "
                f"masked-LM and sentence-order prediction for {summary.get('steps')} steps. Loads with "
                "`AutoModelForPreTraining` (both heads) or `AutoModelForMaskedLM` / `pipeline('fill-mask')`.")
