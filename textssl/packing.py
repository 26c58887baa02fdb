"""Tokenize documents and pack them into full fixed-length blocks (no padding waste).

Documents are concatenated with a separator token between them and cut into blocks of
`max_seq_length`; BERT-style blocks are `[CLS] ... [SEP]`. Work runs through `datasets.map`
(batched, multi-process, cached on disk by a fingerprint of the inputs).
"""

from __future__ import annotations

import hashlib
import json

import datasets
from transformers import PreTrainedTokenizerFast

PACKING_VERSION = 1


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps([PACKING_VERSION, *parts], default=str).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


class _Tokenize:
    """Picklable batched map function: text -> token ids without special tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, text_column: str):
        self.tokenizer, self.text_column = tokenizer, text_column

    def __call__(self, batch):
        # The backend encoder is fast and does not warn about lengths beyond model_max_length.
        encodings = self.tokenizer.backend_tokenizer.encode_batch(batch[self.text_column], add_special_tokens=False)
        return {"input_ids": [e.ids for e in encodings]}


class _Pack:
    """Concatenate documents with `separator` between them and cut blocks of `block_size`."""

    def __init__(self, block_size: int, separator: int, prefix: list[int], suffix: list[int]):
        self.block_size, self.separator, self.prefix, self.suffix = block_size, separator, prefix, suffix

    def __call__(self, batch):
        stream: list[int] = []
        for ids in batch["input_ids"]:
            stream.extend(ids)
            stream.append(self.separator)
        inner = self.block_size - len(self.prefix) - len(self.suffix)
        # The tail shorter than a block is dropped (as run_mlm/run_clm do): < 1 block per map batch.
        blocks = [self.prefix + stream[i:i + inner] + self.suffix
                  for i in range(0, len(stream) - inner + 1, inner)]
        return {"input_ids": blocks}


def tokenize_documents(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerFast, num_proc: int = 1,
                       text_column: str = "text") -> datasets.Dataset:
    """Add `input_ids` (no special tokens) to every document; cached by tokenizer and corpus.

    A streamed (`IterableDataset`) corpus is tokenized lazily as it is read.
    """
    if isinstance(dataset, datasets.IterableDataset):  # keep only the ids: the packer regroups rows
        return dataset.map(_Tokenize(tokenizer, text_column), batched=True, batch_size=256,
                           remove_columns=list(dataset.column_names or []))
    fingerprint = _fingerprint("tokenize", dataset._fingerprint, tokenizer_fingerprint(tokenizer), text_column)
    return dataset.map(_Tokenize(tokenizer, text_column), batched=True, batch_size=256,
                       num_proc=num_proc if len(dataset) > 256 else None, new_fingerprint=fingerprint,
                       desc="tokenizing")


def pack_blocks(tokenized: datasets.Dataset, block_size: int, separator: int, prefix: list[int] | None = None,
                suffix: list[int] | None = None, num_proc: int = 1) -> datasets.Dataset:
    """Rows of `input_ids` -> rows of exactly `block_size` ids (int32 on disk)."""
    prefix, suffix = prefix or [], suffix or []
    pack = _Pack(block_size, separator, prefix, suffix)
    if isinstance(tokenized, datasets.IterableDataset):
        return tokenized.map(pack, batched=True, batch_size=1000)
    fingerprint = _fingerprint("pack", tokenized._fingerprint, block_size, separator, prefix, suffix)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    return tokenized.map(pack, batched=True, batch_size=1000,
                         remove_columns=tokenized.column_names, features=features, new_fingerprint=fingerprint,
                         num_proc=num_proc if len(tokenized) > 1000 else None, desc=f"packing into {block_size}")


def pack_for_bert(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerFast, max_seq_length: int,
                  num_proc: int = 1) -> datasets.Dataset:
    """`[CLS] doc1 [SEP] doc2 ... [SEP]` blocks of `max_seq_length` tokens."""
    tokenized = tokenize_documents(dataset, tokenizer, num_proc)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    return pack_blocks(tokenized, max_seq_length, separator=sep, prefix=[cls], suffix=[sep], num_proc=num_proc)
