"""BERT pretraining as in the paper: masked-LM + next-sentence prediction (`BertForPreTraining`).

The shared machinery of the sentence-pair objectives lives here too: `SentencePairObjective`
(segments cut once by a cached `datasets.map`, pairs drawn per example at collate time, dynamic
masking, the vocab head only at masked positions) and `PairHeadsAtMaskedPositions`. ALBERT's
sentence-order objective (`textssl.sop`) subclasses it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForPreTraining, PreTrainedModel

from sslcore.data import generator_for
from sslcore.objective import LossContext, Objective, Ratio
from sslcore.registry import register_objective
from sslcore.run_config import RunConfig, TrainConfig
from textssl.data import TextDataConfig, describe_corpus, export_text_model, load_text, materialize
from textssl.masking import IGNORE_INDEX, MaskingConfig, mask_tokens
from textssl.mlm import BertModelConfig, masked_token_count, mlm_loss
from textssl.pairs import (
    OtherDocumentSampler,
    PairConfig,
    build_segments,
    encode_pairs,
    max_pair_tokens,
    next_sentence_pair,
    sentence_order_pair,
    stream_pairs,
)
from textssl.tokenizer import TokenizerConfig, word_start_table

logger = logging.getLogger(__name__)


class PairHeadsAtMaskedPositions(nn.Module):
    """Wraps a `*ForPreTraining` model: the vocab head runs only where MLM labels are set, the
    pair head (NSP/SOP) on the pooled [CLS] output.

    As in `textssl.mlm.MaskedPositionsHead`, scoring the ~15% masked positions instead of all of
    them skips most of a small model's compute. Heads are looked up by name (not registered a
    second time) so the state dict keeps the stock layout; all work happens in `forward`, so DDP
    syncs every parameter that gets a gradient.
    """

    def __init__(self, model: PreTrainedModel, mlm_head: str, pair_head: str):
        super().__init__()
        self.model = model
        self.mlm_head_name, self.pair_head_name = mlm_head, pair_head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, token_type_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids)
        selected = labels != IGNORE_INDEX
        mlm_logits = self.model.get_submodule(self.mlm_head_name)(out.last_hidden_state[selected])
        pair_logits = self.model.get_submodule(self.pair_head_name)(out.pooler_output)
        return mlm_logits, labels[selected], pair_logits


def pair_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Ratio]:
    """SUMMED cross-entropy of the 2-way pair head, and its accuracy as an exact ratio."""
    return (F.cross_entropy(logits.float(), labels, reduction="sum"),
            Ratio((logits.detach().argmax(-1) == labels).sum(), labels.numel()))


class SentencePairObjective(Objective):
    """Masked-LM + a sentence-pair task on `[CLS] A [SEP] B [SEP]`. Subclasses set `task`, `pair_name`,
    the model and its heads.

    Segments are cut once (cached `datasets.map`, `textssl.pairs.build_segments`); each example's
    pair (the NSP negative or the SOP swap, and the truncation) and its mask are drawn at collate
    time from the example's seed: new pairs every epoch, identical on 1 or N processes and after resume.
    A streamed corpus (`data.corpus.streaming`) is paired lazily instead (`textssl.pairs.stream_pairs`).
    """

    task: ClassVar[str] = ""
    pair_name: ClassVar[str] = ""
    """Prefix of the pair logs: `nsp` -> nsp_loss, nsp_accuracy."""
    heads: ClassVar[tuple[str, str]] = ("", "")
    """Submodule names of the MLM head and the pair head in the `*ForPreTraining` model."""
    unit = "tokens"

    def prepare(self, accelerator=None) -> None:
        data, pairs = self.config.data, self.config.pairs
        self.corpus, self.tokenizer = load_text(data, self.config.tokenizer)
        for name in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id"):
            if getattr(self.tokenizer, name) is None:
                raise ValueError(f"the tokenizer has no {name.removesuffix('_id')}, which sentence pairs need; "
                                 "use tokenizer.kind wordpiece or unigram (not bpe), or a tokenizer.path that has it")
        self.max_num_tokens = max_pair_tokens(data.max_seq_length)
        self.datasets, self.samplers, self.first_doc = {}, {}, {}
        doc_offset = 0
        for split, documents in self.corpus.items():
            if isinstance(documents, datasets.IterableDataset):
                # A streamed corpus: pairs are made lazily, window by window (the trainer shards the stream).
                stream = stream_pairs(documents, self.tokenizer, data.max_seq_length, pairs, self.task,
                                      seed=self.config.train.seed)
                self.datasets[split] = stream if split == "train" else materialize(stream, data.max_eval_examples)
                continue
            # Document numbers run on across splits, so a row tells which split (and sampler) it belongs to.
            segments, stats = build_segments(documents, self.tokenizer, data.max_seq_length, pairs,
                                             seed=self.config.train.seed, num_proc=data.num_proc,
                                             doc_offset=doc_offset)
            self.first_doc[split] = doc_offset
            doc_offset += len(documents)
            stats.log(f"{self.name} {split}")
            usable = stats.documents - stats.documents_skipped
            if len(segments) == 0 or (self.task == "nsp" and usable < 2):
                if split == "train":
                    raise ValueError(
                        f"the training corpus gave {usable} document(s) with two or more sentences; "
                        + ("next-sentence prediction needs at least 2" if self.task == "nsp" else "pairs need one")
                        + ": add documents (data.corpus.sources)")
                logger.warning("the %s split has too few documents with two or more sentences (%d): no held-out "
                               "%s evaluation", split, usable, self.pair_name.upper())
                continue
            self.datasets[split] = segments
            self.samplers[split] = OtherDocumentSampler(segments) if self.task == "nsp" else None
        self.word_starts = word_start_table(self.tokenizer)
        special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)))
        vocab = torch.arange(len(self.tokenizer))
        self.special_ids = special
        self.random_token_ids = vocab[~torch.isin(vocab, special)]

    def train_dataset(self):
        return self.datasets["train"]

    def eval_dataset(self):
        return self.datasets.get("validation")

    def make_pair(self, row: dict[str, Any], gen: torch.Generator) -> tuple[list[int], list[int], int]:
        """A segment row -> (first, second, label), drawn from `gen`; a streamed pair row passes through."""
        if "label" in row:  # already a pair (streaming: `textssl.pairs.stream_pairs`)
            return list(row["first"]), list(row["second"]), int(row["label"])
        pairs = self.config.pairs
        if self.task == "nsp":
            # Negatives come from the row's own split: held-out pairs only ever see held-out documents.
            return next_sentence_pair(row, self.samplers[self._split_of(row["doc"])], row["doc"],
                                      self.max_num_tokens, pairs.negative_prob, gen)
        return sentence_order_pair(row, self.max_num_tokens, pairs.negative_prob, gen)

    def _split_of(self, doc: int) -> str:
        return max((first, split) for split, first in self.first_doc.items() if first <= doc)[1]

    def collate(self, examples: list[dict[str, Any]], seeds: list[int]) -> dict[str, torch.Tensor]:
        generators = [generator_for(s) for s in seeds]
        pairs = [self.make_pair(row, gen) for row, gen in zip(examples, generators)]
        batch = encode_pairs(pairs, self.tokenizer.cls_token_id, self.tokenizer.sep_token_id,
                             self.tokenizer.pad_token_id, pad_to_multiple_of=8)
        input_ids = batch["input_ids"]
        maskable = ~torch.isin(input_ids, self.special_ids)
        masked, labels = mask_tokens(
            input_ids, maskable, generators, mask_token_id=self.tokenizer.mask_token_id,
            random_token_ids=self.random_token_ids, config=self.config.masking,
            word_starts=self.word_starts[input_ids] if self.config.masking.whole_word else None)
        return {**batch, "input_ids": masked, "labels": labels}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Real tokens, padding excluded."""
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    def build_optimizer(self, model: nn.Module, args: TrainConfig) -> torch.optim.Optimizer:
        """AdamW, fused (one kernel per tensor instead of a pass over memory per operation)."""
        return torch.optim.AdamW(self.parameter_groups(model, args.weight_decay), lr=args.learning_rate,
                                 betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, fused=True)

    def targets(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | int]:
        """BERT's loss is the MLM mean over masked tokens plus the pair mean over pairs: two counts."""
        return {"mlm": masked_token_count(batch), self.pair_name: len(batch["pair_labels"])}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             ctx: LossContext) -> tuple[torch.Tensor, dict[str, Any]]:
        inputs = {k: v for k, v in batch.items() if k != "pair_labels"}
        mlm_logits, mlm_targets, pair_logits = model(**inputs)
        masked_lm, logs = mlm_loss(mlm_logits, mlm_targets)
        pair, pair_accuracy = pair_loss(pair_logits, batch["pair_labels"])
        # The trainer logs each term's exact mean as mlm_loss / <pair>_loss.
        return (ctx.mean("mlm", masked_lm) + ctx.mean(self.pair_name, pair),
                {**logs, f"{self.pair_name}_accuracy": pair_accuracy})

    def wrap(self, model: PreTrainedModel) -> PairHeadsAtMaskedPositions:
        return PairHeadsAtMaskedPositions(model, *self.heads)

    def export(self, model: PairHeadsAtMaskedPositions, out_dir: Path, summary: dict[str, Any]) -> Path:
        return export_text_model(
            model.model, self.tokenizer, out_dir, config=self.config,
            training_data=describe_corpus(self.config.data, self.corpus), summary=summary,
            pipeline_tag="fill-mask", description=self.describe(summary),
            usage=f'from transformers import AutoModelForPreTraining, pipeline\n'
                  f'model = AutoModelForPreTraining.from_pretrained("{{path}}")  # MLM + {self.pair_name.upper()} heads\n'
                  f'fill = pipeline("fill-mask", model="{{path}}")\n'
                  f'print(fill("the capital of france is {self.tokenizer.mask_token}."))',
        )

    def describe(self, summary: dict[str, Any]) -> str:
        raise NotImplementedError


@dataclass
class NSPConfig(RunConfig):
    """BERT pretraining: masked-LM + next-sentence prediction."""

    objective: str = "bert_nsp"
    """Registered objective name."""
    data: TextDataConfig = field(default_factory=TextDataConfig)
    """Corpus and sequence length (pairs are padded to the longest in a batch, at most max_seq_length)."""
    pairs: PairConfig = field(default_factory=PairConfig)
    """How documents become segments and pairs (negative_prob: share of B drawn from another document)."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """WordPiece tokenizer trained on the corpus (or a given one)."""
    model: BertModelConfig = field(default_factory=BertModelConfig)
    """Encoder shape."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """Masking rate and scheme."""


@register_objective
class NextSentenceObjective(SentencePairObjective):
    """BERT masked-LM + NSP on sentence pairs; exports `BertForPreTraining` (MLM and NSP heads)."""

    name = "bert_nsp"
    config_class = NSPConfig
    task = "nsp"
    pair_name = "nsp"
    heads = ("cls.predictions", "cls.seq_relationship")
    config: NSPConfig

    def build_model(self) -> nn.Module:
        if self.config.model.max_position_embeddings < self.config.data.max_seq_length:
            raise ValueError(f"model.max_position_embeddings={self.config.model.max_position_embeddings} is below "
                             f"data.max_seq_length={self.config.data.max_seq_length}; raise it")
        config = BertConfig(vocab_size=len(self.tokenizer), pad_token_id=self.tokenizer.pad_token_id,
                            type_vocab_size=2, **vars(self.config.model))
        return self.wrap(BertForPreTraining(config))

    def describe(self, summary: dict[str, Any]) -> str:
        model = self.config.model
        return (f"A BERT encoder ({model.num_hidden_layers} layers, hidden {model.hidden_size}) pretrained with "
                f"masked-LM and next-sentence prediction for {summary.get('steps')} steps. Loads with "
                "`AutoModelForPreTraining` (both heads) or `AutoModelForMaskedLM` / `pipeline('fill-mask')`.")
