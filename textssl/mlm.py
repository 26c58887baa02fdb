"""BERT masked-LM: dynamic masking on packed blocks, the vocab head only at masked positions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertLayer, eager_attention_forward

from sslcore.data import generator_for
from sslcore.objective import LossContext, Objective, Ratio
from sslcore.registry import register_objective
from sslcore.run_config import RunConfig, TrainConfig
from textssl.data import TextDataConfig, describe_corpus, export_text_model, load_text, materialize
from textssl.embedding_init import Word2VecInitConfig, cached_piece_vectors, load_into
from textssl.masking import IGNORE_INDEX, MaskingConfig, mask_tokens
from textssl.packing import pack_for_bert, tokenizer_fingerprint
from textssl.tokenizer import TokenizerConfig, word_start_table


@dataclass
class BertModelConfig:
    """BERT encoder shape (names as in `transformers.BertConfig`; vocab size comes from the tokenizer)."""

    hidden_size: int = 128
    """Width of the encoder."""
    num_hidden_layers: int = 2
    """Transformer layers."""
    num_attention_heads: int = 2
    """Attention heads per layer."""
    intermediate_size: int = 512
    """Feed-forward width."""
    hidden_dropout_prob: float = 0.1
    """Dropout on hidden states."""
    attention_probs_dropout_prob: float = 0.1
    """Dropout on attention weights."""
    max_position_embeddings: int = 512
    """Longest sequence the position table covers (>= data.max_seq_length)."""
    initializer_range: float = 0.02
    """Std of the normal init."""


@dataclass
class MLMConfig(RunConfig):
    """BERT masked-LM pretraining."""

    objective: str = "bert_mlm"
    """Registered objective name."""
    data: TextDataConfig = field(default_factory=TextDataConfig)
    """Corpus and sequence length."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """WordPiece tokenizer trained on the corpus (or a given one)."""
    model: BertModelConfig = field(default_factory=BertModelConfig)
    """Encoder shape."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """Masking rate and scheme."""
    embedding_init: Word2VecInitConfig = field(default_factory=Word2VecInitConfig)
    """Start the token embeddings from skip-gram vectors of the tokenizer's pieces (off by default)."""


class MaskedPositionsHead(nn.Module):
    """Wraps a `*ForMaskedLM` model so the work after the encoder runs only where labels are set.

    The projection onto the vocabulary is most of the compute of a small BERT; scoring the 15%
    masked positions instead of all of them is where most of our speed over `run_mlm.py` comes
    from. For BERT the last layer is cut the same way: every position still serves as a key and
    value, but queries, the attention output and the feed-forward block run only at the masked
    positions, because nothing else reaches the loss (same outputs and gradients as the full
    layer). Kept inside `forward` so DDP sees (and syncs) every parameter that gets a gradient.
    """

    def __init__(self, model: BertForMaskedLM):
        super().__init__()
        self.model = model
        config = model.config
        self.prunes_last_layer = (isinstance(model.base_model, BertModel) and not config.is_decoder
                                  and not config.add_cross_attention)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        selected = labels != IGNORE_INDEX
        bert = self.model.base_model
        *first_layers, last_layer = bert.encoder.layer
        # Padded batches take the full path (the cut is written for blocks without padding), and so
        # does a layer wrapped by FSDP (its type changes): only its own forward gathers its shards.
        if (self.prunes_last_layer and type(last_layer) is BertLayer and attention_mask is None
                and bool(selected.any())):
            hidden = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            for layer in first_layers:
                hidden = layer(hidden, None)
            return self.model.cls(bert_layer_at(last_layer, hidden, selected)), labels[selected]
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       token_type_ids=token_type_ids).last_hidden_state
        return self.model.cls(hidden[selected]), labels[selected]


def bert_layer_at(layer: BertLayer, hidden: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """`layer(hidden)[selected]` (unpadded self-attention) computed only at the selected positions.

    Keys and values come from every position; each row's selected positions become its queries,
    padded to the longest row so attention stays one batched call through the model's own
    attention function (SDPA, eager...), with its dropout.
    """
    attention = layer.attention.self
    batch, length, width = hidden.shape
    counts = selected.sum(1)
    slots = int(counts.max())
    # A stable sort puts each row's selected positions first, in order: row-major like hidden[selected].
    positions = torch.argsort((~selected).to(torch.uint8), dim=1, stable=True)[:, :slots]
    filled = torch.arange(slots, device=hidden.device) < counts[:, None]
    residual = hidden.gather(1, positions[..., None].expand(-1, -1, width))
    heads = (batch, -1, attention.num_attention_heads, attention.attention_head_size)
    query = attention.query(residual).view(heads).transpose(1, 2)
    key = attention.key(hidden).view(heads).transpose(1, 2)
    value = attention.value(hidden).view(heads).transpose(1, 2)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    context, _ = attend(attention, query, key, value, None, scaling=attention.scaling,
                        dropout=attention.dropout.p if attention.training else 0.0)
    attended = layer.attention.output(context.reshape(batch, slots, -1), residual)
    return layer.feed_forward_chunk(attended)[filled]


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, Ratio]]:
    """SUMMED cross-entropy over masked positions (the caller divides by the step's masked-token
    count), plus accuracy as an exact ratio (logits/targets already selected)."""
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    correct = (logits.detach().argmax(-1) == targets).sum()
    return loss, {"mlm_accuracy": Ratio(correct, targets.numel())}


def masked_token_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["labels"] != IGNORE_INDEX).sum()


@register_objective
class MaskedLMObjective(Objective):
    """Masked-LM on `[CLS] ... [SEP]` blocks packed from the corpus; exports `BertForMaskedLM`."""

    name = "bert_mlm"
    config_class = MLMConfig
    unit = "tokens"
    reports_perplexity = True
    config: MLMConfig

    def prepare(self, accelerator=None) -> None:
        data = self.config.data
        self.corpus, self.tokenizer = load_text(data, self.config.tokenizer)
        self.blocks = {split: pack_for_bert(docs, self.tokenizer, data.max_seq_length, data.num_proc)
                       for split, docs in self.corpus.items()}
        if "validation" in self.blocks:
            self.blocks["validation"] = materialize(self.blocks["validation"], data.max_eval_examples)
        if isinstance(self.blocks["train"], datasets.Dataset) and len(self.blocks["train"]) == 0:
            raise ValueError(f"the corpus gave no block of {data.max_seq_length} tokens; "
                             "add documents or lower data.max_seq_length")
        special_ids = sorted(set(self.tokenizer.all_special_ids))
        self.piece_vectors = None
        if self.config.embedding_init.epochs > 0:
            self.piece_vectors = cached_piece_vectors(
                self.config.train.output_dir, self.blocks["train"], len(self.tokenizer), special_ids,
                self.embedding_width(), self.config.embedding_init, self.config.train.seed,
                tokenizer_key=tokenizer_fingerprint(self.tokenizer))
        self.blocks = {split: ds.with_format("torch") for split, ds in self.blocks.items()}
        self.word_starts = word_start_table(self.tokenizer)
        special = torch.tensor(special_ids)
        vocab = torch.arange(len(self.tokenizer))
        self.special_ids = special
        self.random_token_ids = vocab[~torch.isin(vocab, special)]

    def embedding_width(self) -> int:
        """Width of the token embedding table."""
        return self.config.model.hidden_size

    def train_dataset(self):
        return self.blocks["train"]

    def eval_dataset(self):
        return self.blocks.get("validation")

    def collate(self, examples: list[dict[str, Any]], seeds: list[int]) -> dict[str, torch.Tensor]:
        input_ids = torch.stack([e["input_ids"] for e in examples]).long()
        maskable = ~torch.isin(input_ids, self.special_ids)
        masked, labels = mask_tokens(
            input_ids, maskable, [generator_for(s) for s in seeds], mask_token_id=self.tokenizer.mask_token_id,
            random_token_ids=self.random_token_ids, config=self.config.masking,
            word_starts=self.word_starts[input_ids] if self.config.masking.whole_word else None)
        # Blocks are full (no padding), so no attention mask: SDPA then takes its fastest path.
        return {"input_ids": masked, "labels": labels}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()

    def targets(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"mlm": masked_token_count(batch)}

    def build_model(self) -> nn.Module:
        config = BertConfig(vocab_size=len(self.tokenizer), pad_token_id=self.tokenizer.pad_token_id,
                            type_vocab_size=2, **vars(self.config.model))
        model = BertForMaskedLM(config)
        if self.piece_vectors is not None:
            load_into(model.get_input_embeddings(), *self.piece_vectors, std=config.initializer_range)
        return MaskedPositionsHead(model)

    def build_optimizer(self, model: nn.Module, args: TrainConfig) -> torch.optim.Optimizer:
        """AdamW over `parameter_groups`, fused: one kernel per tensor. The unfused CPU step makes a
        pass over memory per operation and costs ~100 ms a step at the tiny size (fused: ~2 ms)."""
        return torch.optim.AdamW(self.parameter_groups(model, args.weight_decay), lr=args.learning_rate,
                                 betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, fused=True)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             ctx: LossContext) -> tuple[torch.Tensor, dict[str, Any]]:
        logits, targets = model(**batch)
        total, logs = mlm_loss(logits, targets)
        return ctx.mean("mlm", total), logs

    def export(self, model: MaskedPositionsHead, out_dir: Path, summary: dict[str, Any]) -> Path:
        return export_text_model(
            model.model, self.tokenizer, out_dir, config=self.config,
            training_data=describe_corpus(self.config.data, self.corpus), summary=summary,
            pipeline_tag="fill-mask",
            description=f"A BERT encoder ({self.config.model.num_hidden_layers} layers, hidden "
                        f"{self.config.model.hidden_size}) pretrained with masked-LM for {summary.get('steps')} steps.",
            usage=f'from transformers import pipeline\nfill = pipeline("fill-mask", model="{{path}}")\n'
                  f'print(fill("the capital of france is {self.tokenizer.mask_token}."))',
        )
