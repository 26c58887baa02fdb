"""Tokenizers trained locally with `tokenizers`, saved as `PreTrainedTokenizerFast` folders.

Three kinds cover the text objectives: WordPiece (BERT, "##" continuations), Unigram with
Metaspace (ALBERT/SentencePiece, "▁" word starts) and byte-level BPE (GPT-2, "Ġ" word starts).
`word_start_table` reads those markers back so whole-word masking works for any of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import datasets
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

TOKENIZER_VERSION = 1  # bump when training changes, to invalidate cached tokenizers


@dataclass
class TokenizerConfig:
    """How the tokenizer is obtained: trained on the corpus (cached), or loaded from `path`."""

    kind: Literal["wordpiece", "unigram", "bpe"] = "wordpiece"
    """wordpiece (BERT), unigram with ▁ word starts (ALBERT/SentencePiece), byte-level bpe (GPT-2)."""
    vocab_size: int = 8192
    """Target vocabulary size, special tokens included."""
    lowercase: bool = True
    """Lowercase and strip accents before tokenizing (BERT uncased style). Ignored by bpe."""
    min_frequency: int = 2
    """A merge/piece must be seen this often to enter the vocabulary."""
    path: str | None = None
    """Load this tokenizer (folder or Hub id) instead of training one."""
    max_training_documents: int = 100_000
    """With a streamed corpus, train on its first this-many documents."""


SPECIAL_TOKENS = {
    "wordpiece": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"},
    "unigram": {"pad_token": "<pad>", "unk_token": "<unk>", "cls_token": "[CLS]", "sep_token": "[SEP]",
                "mask_token": "[MASK]"},
    "bpe": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
}


def _backend(config: TokenizerConfig) -> tuple[Tokenizer, trainers.Trainer]:
    specials = list(dict.fromkeys(SPECIAL_TOKENS[config.kind].values()))
    if config.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=config.lowercase, strip_accents=config.lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                            special_tokens=specials, continuing_subword_prefix="##")
    elif config.kind == "unigram":
        tok = Tokenizer(models.Unigram())
        steps = [normalizers.NFKC(), normalizers.Replace("``", '"'), normalizers.Replace("''", '"')]
        if config.lowercase:
            steps.append(normalizers.Lowercase())
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(vocab_size=config.vocab_size, special_tokens=specials,
                                          unk_token="<unk>", shrinking_factor=0.75, max_piece_length=16)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                      special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return tok, trainer


def _post_processor(tok: Tokenizer, kind: str) -> None:
    """[CLS] A [SEP] (B [SEP]) for the BERT-style kinds; byte-level BPE adds nothing."""
    if kind == "bpe":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])


def train_tokenizer(texts: Iterator[list[str]] | list[str], config: TokenizerConfig, out_dir: str | Path,
                    model_max_length: int = 512, length: int | None = None) -> PreTrainedTokenizerFast:
    """Train on `texts` (strings, or batches of strings) and save a tokenizer folder to `out_dir`."""
    tok, trainer = _backend(config)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    _post_processor(tok, config.kind)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                   **SPECIAL_TOKENS[config.kind])
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    fast.save_pretrained(tmp)
    (tmp / "selfsup_tokenizer.json").write_text(json.dumps({"version": TOKENIZER_VERSION, **asdict(config)}))
    try:
        tmp.replace(out_dir)
    except OSError:  # another process finished the same tokenizer first: keep theirs, drop ours
        if not (out_dir / "tokenizer.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("trained a %s tokenizer with %d tokens -> %s", config.kind, tok.get_vocab_size(), out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def tokenizer_for_corpus(corpus_train, config: TokenizerConfig, cache_dir: str | Path,
                         model_max_length: int = 512, corpus_key: str | None = None) -> PreTrainedTokenizerFast:
    """The tokenizer of `config` for a corpus split with a `text` column, cached on disk.

    A streamed split trains on its first `config.max_training_documents` documents; pass
    `corpus_key` (what identifies the stream) since it has no fingerprint of its own.
    """
    if config.path:
        return AutoTokenizer.from_pretrained(config.path)
    streamed = isinstance(corpus_train, datasets.IterableDataset)
    identity = corpus_key if streamed else corpus_train._fingerprint
    key = hashlib.sha256(json.dumps([TOKENIZER_VERSION, asdict(config), identity,
                                     model_max_length]).encode()).hexdigest()[:16]
    out_dir = Path(cache_dir).expanduser() / "tokenizers" / f"{config.kind}-{config.vocab_size}-{key}"
    if (out_dir / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    if streamed:
        sample = corpus_train.take(config.max_training_documents)
        return train_tokenizer((row["text"] for row in sample), config, out_dir, model_max_length)

    def batches() -> Iterator[list[str]]:
        for start in range(0, len(corpus_train), 1000):
            yield corpus_train[start:start + 1000]["text"]

    return train_tokenizer(batches(), config, out_dir, model_max_length, length=len(corpus_train))


def word_start_table(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """Bool per vocab id: True where the token starts a new word (specials count as starts).

    WordPiece marks continuations ("##ing"), and punctuation is its own word. SentencePiece/Unigram
    and byte-level BPE mark word starts ("▁the", "Ġthe"): a piece without the marker, punctuation
    included, continues the whitespace-delimited word before it ("▁hello" "." is one word).
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model_type = backend["model"]["type"]
    vocab = tokenizer.get_vocab()
    starts = torch.ones(max(vocab.values()) + 1, dtype=torch.bool)
    if model_type == "WordPiece":
        prefix = backend["model"].get("continuing_subword_prefix", "##")
        for token, idx in vocab.items():
            starts[idx] = not token.startswith(prefix)
        return starts
    # A piece without the marker continues the whitespace-delimited word before it ("hello" ".").
    marker = "▁" if model_type == "Unigram" else "Ġ"
    specials = set(tokenizer.all_special_tokens)
    for token, idx in vocab.items():
        starts[idx] = token in specials or token.startswith(marker)
    return starts
