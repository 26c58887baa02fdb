"""What every text objective shares: the data section, corpus + tokenizer, and the export."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from sslcore.config import to_dict
from sslcore.hub import write_model_card
from textssl.corpus import CorpusConfig, load_corpus
from textssl.tokenizer import TokenizerConfig, tokenizer_for_corpus

logger = logging.getLogger(__name__)


@dataclass
class TextDataConfig:
    """Corpus and sequence shape for a text objective."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Which documents to pretrain on (see textssl.corpus)."""
    max_seq_length: int = 128
    """Tokens per training sequence (blocks are packed full, no padding)."""
    num_proc: int = 2
    """Processes for tokenization and packing (`datasets.map(num_proc=...)`)."""
    max_eval_examples: int = 2000
    """Cap on held-out sequences taken from a streamed corpus for the eval loss."""


def load_text(data: TextDataConfig, tokenizer_config: TokenizerConfig
              ) -> tuple[datasets.DatasetDict, PreTrainedTokenizerFast]:
    """The corpus (train/validation documents) and its tokenizer, both cached on disk.

    With `data.corpus.streaming` the splits are `IterableDataset`s read lazily.
    """
    corpus = load_corpus(data.corpus)
    tokenizer = tokenizer_for_corpus(corpus["train"], tokenizer_config, data.corpus.cache_dir,
                                     model_max_length=data.max_seq_length,
                                     corpus_key=json.dumps(asdict(data.corpus), sort_keys=True))
    return corpus, tokenizer


def materialize(split: datasets.Dataset | datasets.IterableDataset, limit: int) -> datasets.Dataset:
    """A map-style dataset of at most `limit` rows (eval sets of a streamed corpus)."""
    if isinstance(split, datasets.Dataset):
        return split
    return datasets.Dataset.from_list(list(split.take(limit)))


def describe_corpus(data: TextDataConfig, corpus: datasets.DatasetDict) -> str:
    """One paragraph for model cards: sources and sizes."""
    docs = {name: len(split) if isinstance(split, datasets.Dataset) else "streamed"
            for name, split in corpus.items()}
    return (f"Sources: {', '.join(data.corpus.sources)} (built offline by `textssl.corpus`); "
            f"{docs.get('train', 0)} training documents, {docs.get('validation', 0)} held out; "
            f"sequences of {data.max_seq_length} tokens.")


def export_text_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: Path, *,
                      config: Any, training_data: str, summary: dict[str, Any], pipeline_tag: str,
                      description: str, usage: str) -> Path:
    """`save_pretrained` (safetensors) + tokenizer + model card: loads in stock transformers."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_model_card(out_dir, model_name=out_dir.name if out_dir.name != "model" else type(model).__name__,
                     summary=description, config=to_dict(config), training_data=training_data,
                     metrics={k: v for k, v in summary.items() if isinstance(v, int | float)},
                     pipeline_tag=pipeline_tag, usage=usage.format(path=out_dir))
    return out_dir
