"""word2vec: skip-gram and CBOW with negative sampling, on the shared trainer or on gensim.

Two backends behind one config and one artifact:

- ``backend: torch`` -- our objective, trained by `sslcore.trainer.Trainer` (so on GPUs and on
  several processes with `accelerate launch`). A dataset row is a block of ~1,000 in-vocabulary
  words (whole sentences); `collate` turns a batch of blocks into one index tensor -- per prediction
  its context window (or pair's context word) for skip-gram, its padded context window for CBOW, then
  the word to predict and its negatives -- and
  `NegativeSamplingStep` scores them and writes both tables' gradients by hand (no autograd through
  the gathers: one batched product forward; backward gathers and sums each distinct word's rows with
  `embedding_bag`, one sparse row per word), which plain SGD applies. On CPU the same step runs as one
  compiled loop over rows (`CompiledNegativeSamplingStep`, C++ built on first use), like word2vec.c's.
- ``backend: gensim`` -- `gensim.models.Word2Vec` with the same options mapped over, for CPU users.

What makes word2vec good is done as in word2vec.c (which gensim follows): words under `min_count`
are dropped before windows are taken; frequent words are subsampled with the keep probability
``(sqrt(f/t) + 1) * t/f``; each position draws a window shrunk uniformly in ``1..window``; negatives
come from the unigram distribution raised to 0.75 (an alias table: O(1) a draw); the learning rate
decays linearly to zero; skip-gram predicts the centre word from each context word; CBOW averages
the context vectors and hands the error back to every context word unscaled. Two things differ because a batch is not a loop:
skip-gram shares one draw of negatives across a window (HogBatch; `model.shared_negatives: false`
draws them per pair, as word2vec.c), and each word's summed batch gradient takes an implicit SGD
step, 1 / (1 + lr * curvature), which leaves most words at the plain sum but keeps the thousands of
stale terms a very frequent word collects in one batch from overshooting (skip-gram's default; CBOW,
with about a sixth of the terms per batch, takes the plain sum by default). Both backends end in the same folder: gensim
`KeyedVectors` (native `vectors.kv` and word2vec-format `vectors.bin`), a model card with the
intrinsic scores, and `push_to_hub` as for every other objective. `load_vectors(dir)` reads either.

    from textssl.word2vec import train_word2vec, load_vectors
    result = train_word2vec("recipes/configs/word2vec_skipgram_tiny.yaml")
    vectors = load_vectors(result.export_dir)

    accelerate launch recipes/pretrain.py --config recipes/configs/word2vec_skipgram_tiny.yaml
    python -m textssl.word2vec --config recipes/configs/word2vec_cbow_tiny.yaml --backend gensim
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslcore import config as cfg
from sslcore.config import ConfigError, to_dict
from sslcore.data import generator_for
from sslcore.distributed import all_reduce_sum
from sslcore.errors import DEBUG_HELP, UserError, run_cli
from sslcore.hub import check_push_access, push_to_hub, redact, write_model_card
from sslcore.objective import LossContext, Objective, Ratio
from sslcore.registry import register_objective
from sslcore.run_config import RunConfig, TrainConfig
from textssl.corpus import CorpusConfig, load_corpus
from textssl.word_eval import WordEvalConfig, evaluate_vectors, model_index_results

if TYPE_CHECKING:
    from gensim.models import KeyedVectors

logger = logging.getLogger(__name__)

WORD2VEC_DATA_VERSION = 1
"""Bump when tokenization or block packing changes, so cached datasets built by older code are not reused."""
MAX_TOKEN_CHARS = 40
"""Longer "words" are markup or noise; dropped by the tokenizer."""
VECTORS_KV = "vectors.kv"
VECTORS_BIN = "vectors.bin"
VECTORS_TXT = "vectors.txt"


class Word2VecDataError(UserError, ValueError):
    """The corpus cannot train word vectors (empty, or no word frequent enough); says what to change."""


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class Word2VecDataConfig:
    """Corpus, vocabulary and subsampling (shared by both backends)."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Which documents to train on (see textssl.corpus); each sentence is one word2vec sentence."""
    min_count: int = 5
    """Words seen fewer times are dropped before windows are taken (as if they were not there)."""
    max_vocab_size: int | None = None
    """Cap the vocabulary by raising min_count just enough (gensim's `max_final_vocab`); None = no cap."""
    sample: float = 1e-3
    """Subsampling threshold t: a word of corpus frequency f is kept with probability (sqrt(f/t)+1)*t/f; 0 = off."""
    block_words: int = 1000
    """torch backend: in-vocabulary words per dataset row (whole sentences packed together)."""
    num_proc: int = 2
    """Processes for tokenizing and packing (`datasets.map(num_proc=...)`)."""


@dataclass
class Word2VecModelConfig:
    """The word2vec model and its training task."""

    mode: Literal["skipgram", "cbow"] = "skipgram"
    """skipgram: predict the centre word from each context word; cbow: from the mean of the context."""
    vector_size: int = 100
    """Dimension of the word vectors."""
    window: int = 5
    """Largest distance between the centre word and a context word."""
    shrink_windows: bool = True
    """Draw each position's window uniformly from 1..window (word2vec.c): near words count more."""
    negative: int = 5
    """Noise words drawn per prediction (negative sampling)."""
    ns_exponent: float = 0.75
    """Noise distribution: unigram counts raised to this power (0.75 in word2vec.c)."""
    cbow_mean: bool = True
    """CBOW: average the context vectors (True) or sum them."""
    shared_negatives: bool = True
    """Skip-gram: draw one set of negatives per window, shared by its context words (Ji et al. 2016's
    HogBatch), instead of one per (context, centre) pair as word2vec.c (false): a window's ~6 pairs share
    one row of 1 + K output vectors, so a step gathers and updates ~5x fewer output rows, with the same
    scores as gensim (benchmarks/word2vec_quality.py)."""
    implicit_updates: bool | None = None
    """torch backend: scale each word's batch update by 1 / (1 + lr * its curvature), an implicit SGD step:
    the plain sum of its gradients for most words, but no overshoot for very frequent ones. False = the
    plain sum, which diverges once batches hold thousands of terms of one word. None = on for skip-gram
    (a shared draw of negatives gives a frequent word's output row a term per context word, so it needs
    it), off for CBOW: one prediction per centre collects ~1/(2 x mean window) as many terms, the plain sum
    trained without trouble at 4 x 1,000 words per batch (3.1M-word corpus, 5 epochs), and the damping cost CBOW 0.03-0.04 WS353
    Spearman against gensim (benchmarks/word2vec_quality.py). Set true for CBOW with much larger batches."""
    sparse_gradients: bool | None = None
    """torch backend: sparse gradients (the rows a step touches; fast on CPU, all-reduced as sparse tensors
    by gloo); None = sparse except on multi-GPU, whose NCCL all-reduce has no sparse tensors (dense there)."""


@dataclass
class GensimBackendConfig:
    """Options that exist only for backend=gensim."""

    workers: int = 0
    """gensim worker threads; 0 = one per CPU core."""


@dataclass
class Word2VecTrainConfig(TrainConfig):
    """The shared trainer's options with word2vec's defaults: plain SGD at 0.025 decaying linearly to 0,
    no warm-up, no clipping (word2vec.c has none, and sparse gradients cannot be clipped)."""

    output_dir: str = "runs/word2vec"
    """Run folder: checkpoints/, the exported model/, metrics.jsonl."""
    learning_rate: float = 0.025
    """SGD's step size (word2vec.c's alpha), decayed linearly to 0 by lr_schedule linear."""
    warmup_steps: int | None = 0
    """word2vec has no warm-up."""
    max_grad_norm: float | None = None
    """Must stay null with sparse gradients."""
    weight_decay: float = 0.0
    """Not used: word2vec's SGD has no weight decay."""
    per_device_batch_size: int = 4
    """Blocks (of data.block_words words) per process per step."""
    log_every: int = 50
    """Log loss and words/s every N steps."""
    report_to: list[str] = field(default_factory=list)
    """Accelerate trackers (tensorboard, wandb, ...); none by default."""


@dataclass
class Word2VecConfig(RunConfig):
    """word2vec (skip-gram or CBOW with negative sampling) on the torch or the gensim backend."""

    objective: str = "word2vec"
    """Registered objective name."""
    backend: Literal["torch", "gensim"] = "torch"
    """torch: the shared Accelerate trainer (GPUs, several processes); gensim: gensim's C code (CPU)."""
    epochs: int | None = 5
    """Passes over the corpus; sets train.max_steps for the torch backend. None = train.max_steps decides
    (torch backend only)."""
    data: Word2VecDataConfig = field(default_factory=Word2VecDataConfig)
    """Corpus, vocabulary and subsampling."""
    model: Word2VecModelConfig = field(default_factory=Word2VecModelConfig)
    """Mode, vector size, window and negatives."""
    gensim: GensimBackendConfig = field(default_factory=GensimBackendConfig)
    """Options of the gensim backend."""
    evaluation: WordEvalConfig = field(default_factory=WordEvalConfig)
    """Evaluations run on the exported vectors (scores go into the model card)."""
    text_format: bool = False
    """Also export vectors.txt (word2vec text format, ~3x the size of vectors.bin)."""
    train: Word2VecTrainConfig = field(default_factory=Word2VecTrainConfig)
    """The shared trainer's options, with word2vec's defaults (SGD at 0.025, linear decay, no warm-up or clipping)."""


def _check_config(config: Word2VecConfig) -> None:
    data, model = config.data, config.model
    problems = []
    if data.min_count < 1:
        problems.append(f"data.min_count must be >= 1, got {data.min_count}")
    if not 0.0 <= data.sample < 1.0:
        problems.append(f"data.sample must be in [0, 1) (1e-3 is usual, 0 turns subsampling off), got {data.sample}")
    if data.max_vocab_size is not None and data.max_vocab_size < 1:
        problems.append(f"data.max_vocab_size must be >= 1 or null, got {data.max_vocab_size}")
    if data.block_words < 2:
        problems.append(f"data.block_words must be >= 2, got {data.block_words}")
    for name in ("vector_size", "window", "negative"):
        if getattr(model, name) < 1:
            problems.append(f"model.{name} must be >= 1, got {getattr(model, name)}")
    if config.epochs is not None and config.epochs < 1:
        problems.append(f"epochs must be >= 1 or null, got {config.epochs}")
    if config.backend == "gensim" and config.epochs is None:
        problems.append("backend gensim counts training in epochs; set `epochs`")
    if problems:
        raise ConfigError("; ".join(problems))


# --------------------------------------------------------------------------------------------------
# Words: tokenizing, vocabulary, blocks
# --------------------------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """Lower-cased alphabetic words (gensim's `simple_preprocess`, keeping one-letter words)."""
    from gensim.utils import simple_preprocess

    return simple_preprocess(text, deacc=False, min_len=1, max_len=MAX_TOKEN_CHARS)


def _fingerprint(*parts: Any) -> str:
    payload = json.dumps([WORD2VEC_DATA_VERSION, *parts], default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class _TokenizeSentences:
    """Batched map: documents -> one row of words per non-empty sentence."""

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        rows = (tokenize(sentence) for sentences in batch["sentences"] for sentence in sentences)
        return {"tokens": [row for row in rows if row]}


def tokenized_sentences(documents: datasets.Dataset, num_proc: int = 1) -> datasets.Dataset:
    """One row per sentence of `documents` with its words in `tokens`; cached by `datasets`."""
    return documents.map(
        _TokenizeSentences(), batched=True, batch_size=256, remove_columns=documents.column_names,
        features=datasets.Features({"tokens": datasets.List(datasets.Value("string"))}),
        new_fingerprint=_fingerprint("tokens", documents._fingerprint, MAX_TOKEN_CHARS),
        num_proc=num_proc if num_proc > 1 and len(documents) > 256 else None, desc="tokenizing words")


@dataclass
class Vocabulary:
    """Words kept for training, most frequent first, with their corpus counts."""

    words: list[str]
    counts: np.ndarray
    total_distinct: int = 0
    """Distinct words in the corpus before min_count (for messages and model cards)."""

    def __len__(self) -> int:
        return len(self.words)

    @property
    def index(self) -> dict[str, int]:
        return {word: i for i, word in enumerate(self.words)}

    @classmethod
    def from_counts(cls, counts: dict[str, int], min_count: int, max_size: int | None = None) -> Vocabulary:
        """Keep words seen >= min_count times; with `max_size`, raise min_count as gensim's
        `max_final_vocab` does (ties are kept or dropped together, so the result may be smaller)."""
        if not counts:
            raise Word2VecDataError("the corpus holds no word: check that data.corpus.sources point at text "
                                    "(words are alphabetic tokens, numbers and punctuation are skipped)")
        ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        effective_min = min_count
        if max_size is not None and max_size < len(ordered):
            effective_min = max(min_count, ordered[max_size][1] + 1)
        kept = [(word, n) for word, n in ordered if n >= effective_min]
        if not kept:
            top_word, top_count = ordered[0]
            raise Word2VecDataError(
                f"no word occurs at least {effective_min} times (data.min_count={min_count}"
                + (f", raised to fit data.max_vocab_size={max_size}" if effective_min != min_count else "")
                + f"): the corpus has {len(ordered)} distinct words and the most frequent, {top_word!r}, occurs "
                f"{top_count} times; lower data.min_count or use a larger corpus")
        return cls([w for w, _ in kept], np.array([n for _, n in kept], dtype=np.int64), total_distinct=len(ordered))

    @classmethod
    def from_sentences(cls, sentences: datasets.Dataset, min_count: int, max_size: int | None = None) -> Vocabulary:
        """Count words with Arrow (no Python loop over tokens), then `from_counts`."""
        import pyarrow.compute as pc

        if len(sentences) == 0:
            return cls.from_counts({}, min_count, max_size)
        tokens = sentences.with_format("arrow")[:]["tokens"]  # respects any indices mapping
        counted = pc.value_counts(pc.list_flatten(tokens))
        words, numbers = counted.field("values").to_pylist(), counted.field("counts").to_pylist()
        return cls.from_counts(dict(zip(words, numbers)), min_count, max_size)

    def keep_probabilities(self, sample: float) -> np.ndarray:
        """Probability of keeping each word under subsampling (word2vec.c's formula, as gensim)."""
        if sample <= 0:
            return np.ones(len(self.counts))
        threshold = sample * self.counts.sum()
        counts = self.counts.astype(np.float64)
        return np.minimum(1.0, (np.sqrt(counts / threshold) + 1.0) * threshold / counts)

    def noise_distribution(self, exponent: float) -> np.ndarray:
        """Negative-sampling probabilities: counts ** exponent, normalised."""
        weights = self.counts.astype(np.float64) ** exponent
        return weights / weights.sum()


@dataclass
class NoiseSampler:
    """Draws negatives from a fixed distribution in O(1) per draw: Walker's alias method (Vose's table).

    Column c of `accept` / `alias` is picked uniformly; it gives word c with probability accept[c], else
    word alias[c]. Two gathers and a compare per draw, where a cumulative table needs a binary search
    (`searchsorted`: ~1 ms for a batch's 14k negatives, the largest cost of collate).
    """

    accept: torch.Tensor
    """(words,) float64: the chance column c keeps its own word."""
    alias: torch.Tensor
    """(words,) int64: the word column c gives otherwise."""

    @classmethod
    def from_probabilities(cls, probabilities: np.ndarray) -> NoiseSampler:
        scaled = np.asarray(probabilities, dtype=np.float64) * len(probabilities) / np.sum(probabilities)
        accept, alias = np.ones(len(scaled)), np.arange(len(scaled))
        small, large = [i for i, s in enumerate(scaled) if s < 1.0], [i for i, s in enumerate(scaled) if s >= 1.0]
        while small and large:
            low, high = small.pop(), large[-1]
            accept[low], alias[low] = scaled[low], high  # column `low`: its own mass, topped up by `high`
            scaled[high] -= 1.0 - scaled[low]
            if scaled[high] < 1.0:
                small.append(large.pop())
        return cls(torch.from_numpy(accept), torch.from_numpy(alias))  # columns left over keep all their mass

    def draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` word ids (int64) from `generator`."""
        return self.words(torch.rand(count, dtype=torch.float64, generator=generator))

    def words(self, uniform: torch.Tensor) -> torch.Tensor:
        """The word ids (int64) that float64 uniforms in [0, 1) pick: the integer part of u x words is the
        column, the fraction decides between its word and its alias."""
        spread = uniform * len(self.accept)
        column = spread.long().clamp_(max=len(self.accept) - 1)
        keep = (spread - column) < self.accept.index_select(0, column)
        return torch.where(keep, column, self.alias.index_select(0, column))


class _EncodeAndPack:
    """Batched map: sentences of words -> blocks of <= block_words vocabulary ids, whole sentences.

    Out-of-vocabulary words are removed first, so windows reach over them (as word2vec.c and gensim
    do); sentences left with fewer than two words have no context pairs and are dropped.
    """

    def __init__(self, words: list[str], block_words: int):
        self.words, self.block_words = words, block_words
        self._index: dict[str, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"words": self.words, "block_words": self.block_words, "_index": None}

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self._index is None:
            self._index = {word: i for i, word in enumerate(self.words)}
        index, size = self._index, self.block_words
        blocks, block_lengths = [], []
        ids: list[int] = []
        lengths: list[int] = []
        for tokens in batch["tokens"]:
            sentence = [i for i in map(index.get, tokens) if i is not None]
            for start in range(0, len(sentence), size):
                piece = sentence[start:start + size]
                if len(piece) < 2:
                    continue
                if len(ids) + len(piece) > size:
                    blocks.append(ids)
                    block_lengths.append(lengths)
                    ids, lengths = [], []
                ids.extend(piece)
                lengths.append(len(piece))
        if ids:
            blocks.append(ids)
            block_lengths.append(lengths)
        return {"ids": blocks, "lengths": block_lengths}


def pack_blocks(sentences: datasets.Dataset, vocabulary: Vocabulary, block_words: int,
                num_proc: int = 1) -> datasets.Dataset:
    """Rows of `ids` (int32 vocabulary ids) and `lengths` (the sentence lengths inside the block)."""
    vocab_hash = hashlib.sha256("\n".join(vocabulary.words).encode()).hexdigest()[:16]
    features = datasets.Features({"ids": datasets.List(datasets.Value("int32")),
                                  "lengths": datasets.List(datasets.Value("int32"))})
    return sentences.map(
        _EncodeAndPack(vocabulary.words, block_words), batched=True, batch_size=2000,
        remove_columns=sentences.column_names, features=features,
        new_fingerprint=_fingerprint("blocks", sentences._fingerprint, vocab_hash, block_words),
        num_proc=num_proc if num_proc > 1 and len(sentences) > 2000 else None, desc="packing word blocks")


class BlockRows(torch.utils.data.Dataset):
    """Packed blocks read straight from Arrow: each row's `ids` and `lengths` as int32 tensors.

    `datasets`' torch format converts a batch row by row and column by column (2.5 ms for 4 blocks of
    1,000 words, half of the collate worker's time); one Arrow `take` and two buffer copies take 0.1 ms.
    """

    def __init__(self, blocks: datasets.Dataset):
        self.blocks = blocks.with_format("arrow")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        table = self.blocks[indices]
        columns = {}
        for name in ("ids", "lengths"):
            lists = table.column(name).combine_chunks()
            values = torch.from_numpy(lists.values.to_numpy().copy())  # a copy: Arrow's buffers are read-only
            offsets = lists.offsets.to_numpy().tolist()
            columns[name] = [values[start:end] for start, end in zip(offsets[:-1], offsets[1:])]
        return [{"ids": ids, "lengths": lengths} for ids, lengths in zip(columns["ids"], columns["lengths"])]


@dataclass
class Word2VecCorpus:
    """What both backends train on: the documents, their tokenized sentences and the vocabulary."""

    documents: datasets.DatasetDict
    sentences: dict[str, datasets.Dataset]
    vocabulary: Vocabulary

    def describe(self, data: Word2VecDataConfig) -> str:
        """One paragraph for model cards."""
        return (f"Sources: {', '.join(data.corpus.sources)} (built offline by `textssl.corpus`): "
                f"{len(self.documents['train'])} documents, {len(self.sentences['train'])} sentences, "
                f"{int(self.vocabulary.counts.sum()):,} in-vocabulary words; vocabulary of {len(self.vocabulary):,} "
                f"words seen at least {data.min_count} times (of {self.vocabulary.total_distinct:,} distinct), "
                "lower-cased alphabetic tokens (gensim `simple_preprocess`).")


def load_word2vec_corpus(data: Word2VecDataConfig) -> Word2VecCorpus:
    """Documents -> tokenized sentences -> vocabulary (train split), every step cached on disk."""
    if data.corpus.streaming:
        raise ConfigError("word2vec counts its vocabulary before training; set data.corpus.streaming=false "
                          "(the corpus is memory-mapped from disk, so large corpora still fit)")
    documents = load_corpus(data.corpus)
    sentences = {split: tokenized_sentences(docs, data.num_proc) for split, docs in documents.items()}
    vocabulary = Vocabulary.from_sentences(sentences["train"], data.min_count, data.max_vocab_size)
    logger.info("word2vec vocabulary: %d words (min_count %d) of %d distinct, %d in-vocabulary words",
                len(vocabulary), data.min_count, vocabulary.total_distinct, int(vocabulary.counts.sum()))
    return Word2VecCorpus(documents, sentences, vocabulary)


# --------------------------------------------------------------------------------------------------
# Batches: subsampling, dynamic windows, negatives
# --------------------------------------------------------------------------------------------------


def context_slots(sentence: torch.Tensor, reduced: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's 2*window neighbour positions and whether each is one of its contexts.

    `sentence` holds a sentence id per position (ids differ across sentences and examples); a
    neighbour counts when it is in the same sentence and within the position's window, shrunk by
    `reduced` (0..window-1, drawn per position as in word2vec.c).
    """
    offsets = torch.cat([torch.arange(-window, 0), torch.arange(1, window + 1)])
    n = len(sentence)
    positions = torch.arange(n).unsqueeze(1) + offsets
    inside = (positions >= 0) & (positions < n)
    positions = positions.clamp(0, max(n - 1, 0))
    near = offsets.abs().unsqueeze(0) <= (window - reduced).unsqueeze(1)
    same_sentence = sentence.index_select(0, positions.view(-1)).view_as(positions) == sentence.unsqueeze(1)
    return positions, inside & near & same_sentence


def unpack_batch(batch: dict[str, Any], negative: int) -> dict[str, Any]:
    """A collated batch as `Word2VecModel.forward` takes it.

    `batch["rows"]` holds, per prediction, its m input word ids (-1 where a slot holds no context word),
    then the word to predict and its `negative` noise words. Returns `inputs` (rows, m; padding slots
    read word 0, masked out), `context_mask`, `targets` (rows, 1 + K), `negative_mask` (a negative that
    equals its target is skipped) and `spans` (None, or how many rows have each window size).
    """
    rows = batch["rows"]
    contexts, targets = rows[:, :-1 - negative], rows[:, -1 - negative:]
    context_mask = contexts >= 0
    spans = batch.get("spans")
    return {"inputs": contexts.clamp(min=0), "context_mask": context_mask, "targets": targets,
            "negative_mask": targets[:, 1:] != targets[:, :1],
            "spans": None if spans is None else torch.as_tensor(spans)}


def resolved_implicit_updates(model: Word2VecModelConfig) -> bool:
    """`model.implicit_updates`, with None resolved by mode: on for skip-gram, off for CBOW (see the option)."""
    return model.implicit_updates if model.implicit_updates is not None else model.mode == "skipgram"


@dataclass(frozen=True)
class StepOptions:
    """How `NegativeSamplingStep` scores a batch and shapes its gradients."""

    mode: str = "skipgram"
    """skipgram: every valid input row is scored on its own; cbow: the inputs of a row are pooled first."""
    cbow_mean: bool = True
    """CBOW pools by the mean (True) or the sum of the context vectors."""
    implicit: bool = False
    """Scale each word's summed gradient by 1 / (1 + lr * its curvature) (see `implicit_row_scales`)."""
    sparse: bool = True
    """Sparse COO gradients (rows touched only); dense (vocabulary x dim) ones where the all-reduce needs them."""


def implicit_row_scales(ids: torch.Tensor, curvature: torch.Tensor, vocab_size: int,
                        learning_rate: torch.Tensor) -> torch.Tensor:
    """Per word: 1 / (1 + lr * the curvature it collects over the whole step), summed over processes.

    word2vec.c applies each prediction's gradient before computing the next; a batch sums them all at
    one stale point. Scaling a word's summed gradient by 1 / (1 + lr * h), h its share of the loss's
    curvature (an implicit SGD step, Toulis & Airoldi 2017), changes nothing for the many words with
    small h -- the sum is what sequential SGD does to first order -- and stops a very frequent word
    (thousands of aligned terms per batch, above all as a negative) from overshooting. The totals are
    summed over processes, so N processes at batch B take the step one process takes at N x B (with
    gradient accumulation each micro-batch is scaled by its own curvature: the later ones are not known
    yet when it runs).
    """
    return _implicit_scales(torch.bincount(ids, weights=curvature.float(), minlength=vocab_size), learning_rate)


def _implicit_scales(curvature_per_word: torch.Tensor, learning_rate: torch.Tensor) -> torch.Tensor:
    """1 / (1 + lr x each word's curvature summed over processes), from this process's (vocabulary,) totals."""
    return 1.0 / (1.0 + learning_rate * all_reduce_sum(curvature_per_word))


class NegativeSamplingStep(torch.autograd.Function):
    """Negative-sampling loss of a batch of predictions, with both tables' gradients computed by hand.

    Autograd through embedding gathers writes several (predictions x window x dim) tensors per step and
    scatters each gradient twice; word2vec needs far less. Forward gathers the input rows (CBOW: pools
    them with one `embedding_bag`) and the output rows of each target and its negatives, scores them
    with batched products and keeps the sigmoid error (sigmoid(score) - label, zero where a slot is
    padding or a negative equals its target). Backward multiplies the error by the partner rows
    (skip-gram: two batched products; CBOW: one `embedding_bag` weighted by the error straight from the
    output table), applies the implicit step's per-word scale, and sums each table's gradient per
    distinct word (`_sum_by_word`: one sort, one `embedding_bag`), so the update touches each row once
    -- a coalesced sparse COO tensor, or a dense one. The optimizer step is then word2vec's update: lr x
    summed error x partner row, through the shared trainer, so DDP, accumulation and the LR schedule
    still apply.

    Inputs: the two weight tables; `inputs` (rows, m) input word ids with `context_mask` (rows, m);
    `targets` (rows, 1 + K) the word to predict then K negatives, `negative_mask` (rows, K); `spans`
    (skip-gram, optional) how many rows have each window size 1..window, rows sorted by it, so a row of
    window b is scored on its 2b possible contexts only, not all 2 x window slots; the `learning_rate`
    the coming update uses (for the implicit scale); `StepOptions`. Returns the loss SUMMED over
    predictions (word2vec's SGD applies each prediction's gradient at the full rate).
    """

    @staticmethod
    def forward(ctx, input_weight: torch.Tensor, output_weight: torch.Tensor, inputs: torch.Tensor,
                context_mask: torch.Tensor, targets: torch.Tensor, negative_mask: torch.Tensor,
                spans: torch.Tensor | None, learning_rate: torch.Tensor, options: StepOptions) -> torch.Tensor:
        rows, width = targets.shape
        dim = output_weight.shape[1]
        outputs = output_weight.index_select(0, targets.reshape(-1)).view(rows, width, dim)
        # "Slots" are what is scored against a row's outputs: its context words (skip-gram) or its pooled
        # context (CBOW, one per row). groups: (first row, end row, first slot, slots per row).
        noise_keep = torch.cat([negative_mask.new_ones(rows, 1), negative_mask], 1)  # (rows, 1 + K)
        if options.mode == "cbow":
            input_ids = inputs.masked_select(context_mask)  # row-major
            counts = context_mask.sum(1)
            members = torch.arange(rows, device=inputs.device).repeat_interleave(counts, output_size=len(input_ids))
            hidden = F.embedding_bag(input_ids, input_weight, counts.cumsum(0) - counts,
                                     mode="mean" if options.cbow_mean else "sum")  # (rows, dim)
            slot_rows, groups, keep = None, [(0, rows, 0, 1)], noise_keep
        else:
            members = counts = None
            input_ids, slot_mask, slot_rows, groups = _skipgram_slots(inputs, context_mask, spans)
            hidden = input_weight.index_select(0, input_ids)  # (slots, dim)
            keep = noise_keep.index_select(0, slot_rows) & slot_mask.unsqueeze(1)  # (slots, 1 + K)
        scores = hidden.new_empty(len(hidden), width)
        for first, end, slot, m in groups:
            n, part = end - first, slice(slot, slot + (end - first) * m)
            torch.bmm(hidden[part].view(n, m, dim), outputs[first:end].transpose(1, 2), out=scores[part].view(n, m, width))
        # -log sigmoid(s) for the word to predict, -log sigmoid(-s) = softplus(s) for each noise word.
        signed = scores.clone()
        signed[:, 0].neg_()
        loss = torch.where(keep, F.softplus(signed), 0.0).sum()
        if not any(ctx.needs_input_grad[:2]):
            return loss
        probability = torch.sigmoid(scores)
        error = probability.clone()
        error[:, 0] -= 1.0  # d loss / d score = sigmoid(score) - label
        error = error * keep
        input_error = output_error = error
        ctx.input_scale = None
        if options.implicit:
            # Curvature of the logistic loss along a row: sigmoid' times the squared norm of its partner.
            curvature = probability * (1 - probability) * keep  # (slots, 1 + K)
            output_norms = torch.linalg.vector_norm(outputs, dim=-1).square()  # (rows, 1 + K)
            hidden_norms = torch.linalg.vector_norm(hidden, dim=-1).square()  # (slots,)
            slot_output_norms = output_norms if slot_rows is None else output_norms.index_select(0, slot_rows)
            input_curvature = (curvature * slot_output_norms).sum(1)  # (slots,)
            output_curvature = curvature * hidden_norms.unsqueeze(1)
            if slot_rows is not None:  # a row's outputs collect the curvature of all its slots
                output_curvature = output_curvature.new_zeros(rows, width).index_add_(0, slot_rows, output_curvature)
            vocab = input_weight.shape[0]
            if options.mode == "cbow":  # each context word gets the pooled error: its curvature / count
                per_word = (input_curvature / counts.clamp(min=1))[members]
                # A context word's scale cannot fold into its row's error (the row is shared): applied to
                # the word's summed gradient in backward.
                ctx.input_scale = implicit_row_scales(input_ids, per_word, vocab, learning_rate)
            else:
                input_scale = implicit_row_scales(input_ids, input_curvature, vocab, learning_rate)
                input_error = error * input_scale[input_ids].unsqueeze(1)
            output_scale = implicit_row_scales(targets.reshape(-1), output_curvature.reshape(-1), vocab, learning_rate)
            # The scales multiply the rows' gradients; folded into the (small) error, they cost nothing more.
            output_scale = output_scale[targets]
            output_error = error * (output_scale if slot_rows is None else output_scale.index_select(0, slot_rows))
        ctx.options, ctx.groups, ctx.shapes = options, groups, (input_weight.shape, output_weight.shape)
        # Backward reads the output rows straight from the table (fused gathers-and-sums), so the
        # (rows, 1 + K, dim) gathered copy is freed here.
        ctx.save_for_backward(input_error, output_error, hidden, output_weight, input_ids, targets, members, counts,
                              slot_rows)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        input_error, output_error, hidden, output_weight, input_ids, targets, members, counts, slot_rows = \
            ctx.saved_tensors
        options, groups, (input_shape, output_shape) = ctx.options, ctx.groups, ctx.shapes
        rows, width = targets.shape
        dim = hidden.shape[1]
        # The trainer's scale (the process count) enters on the small error tensors, not on the rows.
        input_error, output_error = input_error * grad_loss, output_error * grad_loss
        if options.mode == "cbow":
            # A row's pooled-input gradient, sum_k error_k x output row k, gathered and summed in one kernel.
            row_grads = F.embedding_bag(targets, output_weight, mode="sum", per_sample_weights=input_error)  # (rows, dim)
            if not options.cbow_mean:  # a summed context hands each word the error / count (as gensim)
                row_grads = row_grads / counts.clamp(min=1).unsqueeze(1)
            # Every context word gets its row's gradient whole; an output word gets error x its row's pooled input.
            input_words, input_sums = _sum_by_word(input_ids, row_grads, members)
            if ctx.input_scale is not None:
                input_sums = input_sums * ctx.input_scale.index_select(0, input_words).unsqueeze(1)
            output_words, output_sums = _sum_by_word(targets.reshape(-1), hidden, width, output_error.reshape(-1))
        else:
            # A context word's gradient, sum over its slots and k of error x its row's output k, gathered and
            # summed from the table in one kernel (half the time of a batched product into per-slot rows).
            slot_targets = targets if slot_rows is None else targets.index_select(0, slot_rows)  # (slots, 1 + K)
            input_words, input_sums = _sum_by_word(input_ids, output_weight, slot_targets, input_error)
            output_rows = hidden.new_empty(rows, width, dim)  # one per (row, target or negative)
            for first, end, slot, m in groups:
                n, part = end - first, slice(slot, slot + (end - first) * m)
                torch.bmm(output_error[part].view(n, m, width).transpose(1, 2), hidden[part].view(n, m, dim),
                          out=output_rows[first:end])
            output_words, output_sums = _sum_by_word(targets.reshape(-1), output_rows.view(-1, dim))
        grads = (_word_gradient(input_words, input_sums, input_shape, options.sparse) if ctx.needs_input_grad[0]
                 else None,
                 _word_gradient(output_words, output_sums, output_shape, options.sparse) if ctx.needs_input_grad[1]
                 else None)
        return *grads, None, None, None, None, None, None, None


def _skipgram_slots(inputs: torch.Tensor, context_mask: torch.Tensor, spans: torch.Tensor | None):
    """Skip-gram's slots, flat: (word ids, valid, row of each, groups as in `NegativeSamplingStep`).

    Without `spans`, every row has all its m slots. With them (rows sorted by window size b = 1..window,
    `spans[b - 1]` rows each), a row of window b keeps only the 2b slots its window can reach (the
    middle columns: offsets -b..-1, 1..b): with windows shrunk uniformly, 6 of 10 slots on average.
    """
    rows, m = inputs.shape
    if spans is None:
        slot_rows = torch.arange(rows, device=inputs.device).repeat_interleave(m)
        return inputs.reshape(-1), context_mask.reshape(-1), slot_rows, [(0, rows, 0, m)]
    window = m // 2
    ids, valid, widths, groups = [], [], [], []
    first = slot = 0
    for span, n in enumerate(spans.tolist(), start=1):
        if n == 0:
            continue
        columns = slice(window - span, window + span)
        ids.append(inputs[first:first + n, columns].reshape(-1))
        valid.append(context_mask[first:first + n, columns].reshape(-1))
        widths.append(2 * span)
        groups.append((first, first + n, slot, 2 * span))
        first, slot = first + n, slot + n * 2 * span
    if first != rows:
        raise ValueError(f"spans count {first} rows, the batch has {rows}")
    counts = torch.tensor([end - start for start, end, _, _ in groups], device=inputs.device)
    slot_rows = torch.arange(rows, device=inputs.device).repeat_interleave(
        torch.tensor(widths, device=inputs.device).repeat_interleave(counts))
    return torch.cat(ids), torch.cat(valid), slot_rows, groups


def _group_by_word(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions of `ids` grouped by word: (positions in the order of their ids, the distinct ids
    ascending, where each one's positions start in that order).

    One sort of (id, position) packed into one int64 key: the keys are distinct, so a plain sort is
    deterministic and yields the order with the ids. On CPU numpy's vectorised sort (about 5x
    `torch.sort` on 17k keys); elsewhere `torch.sort`.
    """
    n = len(ids)
    bits = max(n - 1, 1).bit_length()
    keys = ids * (1 << bits) + torch.arange(n, device=ids.device)
    keys = torch.from_numpy(np.sort(keys.numpy())) if keys.device.type == "cpu" else torch.sort(keys).values
    order, sorted_ids = keys & ((1 << bits) - 1), keys >> bits
    first = torch.ones(n, dtype=torch.bool, device=ids.device)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    starts = first.nonzero().squeeze(1)
    return order, sorted_ids[starts], starts


def _sum_by_word(ids: torch.Tensor, values: torch.Tensor, value_rows: torch.Tensor | int | None = None,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A table's gradient summed per distinct word: (the words ascending, their summed rows).

    Occurrence i of word ids[i] contributes weights[i] x values[value_rows[i]] (value_rows None: row i;
    an int n: row i // n, for ids flattened from rows of n; weights None: 1), or, with 2-D value_rows
    and weights, sum_j weights[i, j] x values[value_rows[i, j]]. One `embedding_bag` gathers and sums
    each word's rows, so the update writes each table row once instead of once per occurrence (a batch's
    frequent words repeat tens of times: 17k output rows hold ~5k distinct words, 15k context words ~1k).
    """
    order, words, starts = _group_by_word(ids)
    if value_rows is None:
        index = order
    elif isinstance(value_rows, int):
        index = order // value_rows
    else:
        index = value_rows.index_select(0, order)
    per_occurrence = 1 if index.dim() == 1 else index.shape[1]
    sums = F.embedding_bag(index.reshape(-1), values, starts * per_occurrence, mode="sum",
                           per_sample_weights=None if weights is None else weights.index_select(0, order).reshape(-1))
    return words, sums


def _word_gradient(words: torch.Tensor, sums: torch.Tensor, shape: torch.Size, sparse: bool) -> torch.Tensor:
    """A table's gradient from its distinct `words` (ascending) and their summed rows: sparse COO (coalesced:
    sorted, no repeats) or dense."""
    if sparse:
        return torch.sparse_coo_tensor(words.unsqueeze(0), sums, shape, check_invariants=False, is_coalesced=True)
    return sums.new_zeros(shape).index_copy_(0, words, sums)


_compiled_step: Any = None
"""The compiled CPU kernel's module once loaded; False when it cannot be built (see `compiled_cpu_step`)."""


def compiled_cpu_step() -> Any | None:
    """The compiled CPU step (`textssl._word2vec_kernel`), built on first use (about a second), once per
    machine; None, with one log line saying why, where it cannot be built (no C++ compiler): the tensor-op
    `NegativeSamplingStep` then runs instead, slower on CPU but the same update."""
    global _compiled_step
    if _compiled_step is None:
        from textssl import _word2vec_kernel

        started = time.perf_counter()
        try:
            _compiled_step = _word2vec_kernel.load()
        except Exception as error:  # noqa: BLE001 - any build failure means: use the tensor ops
            reason = " ".join(str(error).split())[:300] or type(error).__name__
            logger.warning("word2vec: the compiled CPU step could not be built (%s); batches and the CPU step use "
                           "tensor ops instead (the same batches and update, slower on CPU). It needs a C++ "
                           "compiler: install g++ or clang++, or point CXX at one.", reason)
            _compiled_step = False
        else:
            logger.info("word2vec: compiled CPU step ready in %.1f s (%s build)", time.perf_counter() - started,
                        "AVX2+FMA" if _compiled_step.uses_avx2() else "baseline")
    return _compiled_step or None


class CompiledNegativeSamplingStep(torch.autograd.Function):
    """`NegativeSamplingStep` on CPU in one compiled pass over the rows (`textssl._word2vec_kernel`).

    Per row it gathers (CBOW: pools) the input rows, scores them against the target's and the negatives'
    output rows, and adds error x partner row into one summed row per distinct word of each table (its
    curvature too, for the implicit step), as word2vec.c's loop does but without applying the update.
    The tensor-op step's separate passes over (predictions x window x dim) tensors are what bound it on
    CPU; here each row is read from the table and its gradient written once. Same inputs, loss and
    gradients as `NegativeSamplingStep` (tests/test_word2vec.py checks both against autograd); `spans`
    is not needed (slots outside a row's window are masked, and the loop skips them).
    """

    @staticmethod
    def forward(ctx, input_weight: torch.Tensor, output_weight: torch.Tensor, inputs: torch.Tensor,
                context_mask: torch.Tensor, targets: torch.Tensor, negative_mask: torch.Tensor,
                learning_rate: torch.Tensor, options: StepOptions, kernel: Any) -> torch.Tensor:
        grads = any(ctx.needs_input_grad[:2])
        loss, input_words, input_sums, input_curvature, output_words, output_sums, output_curvature = \
            kernel.negative_sampling_step(input_weight.detach(), output_weight.detach(), inputs.contiguous(),
                                          context_mask.contiguous(), targets.contiguous(),
                                          negative_mask.contiguous(), options.mode == "cbow", options.cbow_mean,
                                          options.implicit, grads)
        if grads and options.implicit:  # each word's summed row times its implicit-step scale
            vocab = input_weight.shape[0]
            for words, sums, curvature in ((input_words, input_sums, input_curvature),
                                           (output_words, output_sums, output_curvature)):
                totals = sums.new_zeros(vocab).index_copy_(0, words, curvature.float())
                sums.mul_(_implicit_scales(totals, learning_rate).index_select(0, words).unsqueeze(1))
        ctx.options, ctx.shapes = options, (input_weight.shape, output_weight.shape)
        ctx.summed = (input_words, input_sums, output_words, output_sums) if grads else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        input_words, input_sums, output_words, output_sums = ctx.summed
        ctx.summed = None
        if float(grad_loss) != 1.0:  # the trainer's scale (the process count); CPU, so no device sync
            input_sums, output_sums = input_sums * grad_loss, output_sums * grad_loss
        sparse, (input_shape, output_shape) = ctx.options.sparse, ctx.shapes
        return (_word_gradient(input_words, input_sums, input_shape, sparse) if ctx.needs_input_grad[0] else None,
                _word_gradient(output_words, output_sums, output_shape, sparse) if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None, None)


class Word2VecModel(nn.Module):
    """Two embedding tables: input vectors (the word vectors exported) and output vectors (syn1neg).

    `forward(inputs, context_mask, targets, negative_mask)` returns the negative-sampling loss summed
    over a batch of predictions (see `NegativeSamplingStep` for the layout). Row n has up to m input
    words (`inputs[n]`, valid where `context_mask[n]`) and 1 + K output words (`targets[n]`: the word to
    predict, then K negatives). Skip-gram scores every valid input against every output (m = 1 when
    negatives are drawn per pair); CBOW first pools the inputs. All gradient work happens here, so DDP
    syncs it. On CPU the step is `CompiledNegativeSamplingStep` (unless `compiled` is false or the kernel
    cannot be built), elsewhere `NegativeSamplingStep`: the same loss and update.
    """

    def __init__(self, vocab_size: int, vector_size: int, mode: str = "skipgram", sparse: bool = True,
                 cbow_mean: bool = True, implicit_updates: bool = True, compiled: bool = True):
        super().__init__()
        # On CPU, the compiled step when it can be built (`compiled_cpu_step`); the tensor ops elsewhere.
        self.compiled = compiled
        # nn.Embedding for the parameter names checkpoints and exports use; the step gathers by hand.
        self.input_vectors = nn.Embedding(vocab_size, vector_size, sparse=sparse)
        self.output_vectors = nn.Embedding(vocab_size, vector_size, sparse=sparse)
        self.mode, self.cbow_mean, self.implicit_updates, self.sparse = mode, cbow_mean, implicit_updates, sparse
        # The SGD step size of the coming update (set by a step hook); a buffer, so a checkpoint keeps it.
        self.register_buffer("learning_rate", torch.zeros(()))
        # word2vec.c's init: small uniform input vectors, zero output vectors.
        nn.init.uniform_(self.input_vectors.weight, -0.5 / vector_size, 0.5 / vector_size)
        nn.init.zeros_(self.output_vectors.weight)

    def forward(self, inputs: torch.Tensor, context_mask: torch.Tensor, targets: torch.Tensor,
                negative_mask: torch.Tensor, spans: torch.Tensor | None = None) -> torch.Tensor:
        options = StepOptions(mode=self.mode, cbow_mean=self.cbow_mean, sparse=self.sparse,
                              implicit=self.implicit_updates and self.training and torch.is_grad_enabled())
        # float32 throughout: the update is lr x error x row, too small for half precision's mantissa.
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            kernel = compiled_cpu_step() if self.compiled and inputs.device.type == "cpu" else None
            if kernel is not None and self.input_vectors.weight.dtype == torch.float32:
                return CompiledNegativeSamplingStep.apply(
                    self.input_vectors.weight, self.output_vectors.weight, inputs, context_mask, targets,
                    negative_mask, self.learning_rate, options, kernel)
            return NegativeSamplingStep.apply(self.input_vectors.weight, self.output_vectors.weight, inputs,
                                              context_mask, targets, negative_mask, spans, self.learning_rate, options)


class Word2VecObjective(Objective):
    """Skip-gram or CBOW with negative sampling on blocks of words; exports gensim KeyedVectors."""

    name = "word2vec"
    config_class = Word2VecConfig
    unit = "words"
    config: Word2VecConfig
    compiled_batches = True
    """Build batches with the compiled loop when it can be built (the same rows as the tensor ops)."""

    def prepare(self, accelerator=None) -> None:
        started = time.perf_counter()
        config = self.config
        _check_config(config)
        if config.backend != "torch":
            raise ConfigError("backend gensim does not train through the shared trainer; run it with "
                              "`python -m textssl.word2vec --config FILE` or textssl.word2vec.train_word2vec")
        self.corpus = load_word2vec_corpus(config.data)
        data = config.data
        self.blocks = {split: pack_blocks(sentences, self.corpus.vocabulary, data.block_words, data.num_proc)
                       for split, sentences in self.corpus.sentences.items()}
        if len(self.blocks["train"]) == 0:
            raise Word2VecDataError("no sentence has two in-vocabulary words, so there is nothing to predict; "
                                    "lower data.min_count or use a larger corpus")
        self.rows = {split: BlockRows(blocks) for split, blocks in self.blocks.items()}
        vocabulary = self.corpus.vocabulary
        self.keep_probability = torch.from_numpy(vocabulary.keep_probabilities(data.sample)).float()
        self.noise = NoiseSampler.from_probabilities(vocabulary.noise_distribution(config.model.ns_exponent))
        processes = accelerator.num_processes if accelerator is not None else 1
        on_gpus = accelerator is not None and accelerator.device.type != "cpu"
        sparse = config.model.sparse_gradients
        self.sparse = sparse if sparse is not None else not (processes > 1 and on_gpus)
        compiled_cpu_step()  # built (first run on this machine) or loaded here, not in a step or a loader worker
        self.words_per_epoch = self._count_words()
        if config.epochs is not None:
            per_step = config.train.per_device_batch_size * processes
            steps_per_epoch = len(self.blocks["train"]) // per_step // config.train.gradient_accumulation_steps
            if steps_per_epoch == 0:
                raise Word2VecDataError(
                    f"the corpus packs into {len(self.blocks['train'])} blocks of <= {data.block_words} words, "
                    f"fewer than one step of {per_step} blocks; lower train.per_device_batch_size or "
                    "data.block_words")
            config.train.max_steps = config.epochs * steps_per_epoch  # the trainer reads it after prepare()
        logger.info("word2vec %s: %d blocks, %s words per epoch, %d steps", config.model.mode,
                    len(self.blocks["train"]), f"{self.words_per_epoch:,}", config.train.max_steps)
        self.prepare_seconds = time.perf_counter() - started

    def _count_words(self) -> int:
        import pyarrow.compute as pc

        ids = self.blocks["train"].with_format("arrow")[:]["ids"]
        return int(pc.sum(pc.list_value_length(ids)).as_py() or 0)

    def train_dataset(self):
        return self.rows["train"]

    def eval_dataset(self):
        validation = self.rows.get("validation")
        return validation if validation is not None and len(validation) else None

    def position_draws(self, examples: list[dict[str, Any]], generators: list[torch.Generator]
                       ) -> dict[str, torch.Tensor]:
        """Every position of the batch with its random draws: `ids`, `uniform` (its subsampling draw) and
        `reduced` (its window shrink); the sentences' `lengths` and the examples' `sizes`; `words`."""
        model = self.config.model
        ids = torch.cat([example["ids"] for example in examples]).long()
        sizes = [len(example["ids"]) for example in examples]
        # Per-example draws (one call each) keep batches identical on 1 or N processes; the rest is batched.
        uniform = torch.cat([torch.rand(n, generator=g) for n, g in zip(sizes, generators)])
        reduced = (torch.cat([torch.randint(0, model.window, (n,), generator=g) for n, g in zip(sizes, generators)])
                   if model.shrink_windows else torch.zeros(len(ids), dtype=torch.long))
        return {"ids": ids, "uniform": uniform, "reduced": reduced, "sizes": torch.tensor(sizes),
                "lengths": torch.cat([example["lengths"] for example in examples]).long(),
                "words": torch.tensor(sum(sizes))}

    def sample_positions(self, examples: list[dict[str, Any]], generators: list[torch.Generator]
                         ) -> dict[str, torch.Tensor]:
        """Subsample the batch's words and draw each kept position's window shrink.

        Returns the kept `ids` with their `sentence` (unique across the batch), `example` index and
        `reduced` window shrink, plus `words`, the batch's in-vocabulary words before subsampling.
        """
        drawn = self.position_draws(examples, generators)
        lengths, sizes = drawn["lengths"], drawn["sizes"]
        drawn["sentence"] = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        drawn["example"] = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        # Subsampling comes before windows, so windows reach further in text full of frequent words.
        kept = (drawn["uniform"] < self.keep_probability.index_select(0, drawn["ids"])).nonzero().squeeze(1)
        # index_select throughout collate: tensor indexing (`ids[mask]`) costs several times as much on CPU.
        return {name: drawn[name].index_select(0, kept) for name in ("ids", "sentence", "example", "reduced")} | {
            "words": drawn["words"]}

    def context_rows(self, examples: list[dict[str, Any]], generators: list[torch.Generator], kernel: Any = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(rows, spans, rows per example, words): per prediction its input slots (-1 where a slot holds no
        context word) then the word to predict, followed by `negative` columns for its noise words (not yet
        drawn); its centre's window; how many rows each example has; the batch's words before subsampling.
        Built by the compiled loop `kernel` when given, else by tensor ops: the same rows."""
        model = self.config.model
        pairs = model.mode == "skipgram" and not model.shared_negatives
        if kernel is not None:
            drawn = self.position_draws(examples, generators)
            rows, spans, per_example = kernel.context_rows(
                drawn["ids"], drawn["uniform"], drawn["reduced"] if model.shrink_windows else None, drawn["lengths"],
                drawn["sizes"], self.keep_probability, model.window, pairs, model.negative)
            return rows, spans, per_example, int(drawn["words"])
        kept = self.sample_positions(examples, generators)
        ids = kept["ids"]
        positions, is_context = context_slots(kept["sentence"], kept["reduced"], model.window)
        if pairs:
            # One row per (context, centre) pair, in centre order: the context word's input vector predicts
            # the centre word against its own negatives (word2vec.c's and gensim's skip-gram).
            pair_index = is_context.view(-1).nonzero().squeeze(1)  # (centre, slot) flattened, centre-major
            centres = pair_index // is_context.shape[1]
            inputs = ids.index_select(0, positions.view(-1).index_select(0, pair_index)).unsqueeze(1)
            context_mask = torch.ones_like(inputs, dtype=torch.bool)
        else:  # one row per centre with its (padded) window
            centres = is_context.any(1).nonzero().squeeze(1)
            window_ids = ids.index_select(0, positions.index_select(0, centres).view(-1)).view(len(centres), -1)
            inputs, context_mask = window_ids, is_context.index_select(0, centres)
        rows = torch.cat([torch.where(context_mask, inputs, -1), ids.index_select(0, centres).unsqueeze(1),
                          torch.empty(len(centres), model.negative, dtype=torch.long)], 1)
        per_example = torch.bincount(kept["example"].index_select(0, centres), minlength=len(examples))
        return rows, model.window - kept["reduced"].index_select(0, centres), per_example, int(kept["words"])

    def collate(self, examples: list[dict[str, Any]], seeds: list[int]) -> dict[str, torch.Tensor]:
        model = self.config.model
        generators = [generator_for(seed) for seed in seeds]
        kernel = compiled_cpu_step() if self.compiled_batches else None
        rows, spans, per_example, words = self.context_rows(examples, generators, kernel)
        # Negatives from each example's own generator, so a batch is the same on 1 or N processes.
        uniform = torch.cat([torch.rand(n * model.negative, dtype=torch.float64, generator=g)
                             for n, g in zip(per_example.tolist(), generators)])
        if kernel is not None:
            kernel.noise_words(uniform, self.noise.accept, self.noise.alias, rows, model.negative)
        else:
            rows[:, -model.negative:] = self.noise.words(uniform).view(len(rows), model.negative)
        # One tensor per batch: a DataLoader worker hands each tensor over as its own shared-memory segment
        # (a socket connect and an mmap each): 0.29 s of a 5.4 s CBOW run when it was five. Masks are
        # rebuilt by `unpack_batch`: -1 marks a slot that is not a context, and a negative equal to its
        # target is skipped. `words` and `spans` are Python ints (pickled with the batch, no segment).
        batch: dict[str, Any] = {"rows": rows, "words": words}
        if model.mode == "skipgram" and model.shared_negatives and model.shrink_windows:
            # Rows sorted by window size (after the per-example draws, which stay in example order): the
            # step then scores a row of window b on its 2b possible contexts, not all 2 x window slots.
            batch["rows"] = rows.index_select(0, torch.argsort(spans, stable=True))
            batch["spans"] = tuple(torch.bincount(spans, minlength=model.window + 1)[1:].tolist())
        return batch

    def unpack(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The step's inputs of a collated batch (see `unpack_batch`)."""
        return unpack_batch(batch, self.config.model.negative)

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["words"])

    def build_model(self) -> nn.Module:
        model = self.config.model
        return Word2VecModel(len(self.corpus.vocabulary), model.vector_size, mode=model.mode, sparse=self.sparse,
                             cbow_mean=model.cbow_mean, implicit_updates=resolved_implicit_updates(model))

    def predictions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Predictions (word to predict + its negatives) in a batch: valid (context, centre) pairs for
        skip-gram, centres for CBOW."""
        if self.config.model.mode == "skipgram":
            return self.unpack(batch)["context_mask"].sum()
        return torch.tensor(len(batch["rows"]))

    def targets(self, batch: dict[str, torch.Tensor]) -> dict[str, float | torch.Tensor]:
        return {"predictions": self.predictions(batch)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             ctx: LossContext) -> tuple[torch.Tensor, dict[str, Any]]:
        step = self.unpack(batch)
        total = model(step["inputs"], step["context_mask"], step["targets"], step["negative_mask"], step["spans"])
        predictions = step["context_mask"].sum() if self.config.model.mode == "skipgram" else len(step["targets"])
        logs = {"ns_loss": Ratio(total.detach(), predictions)}
        # word2vec's update is the SUM of per-prediction gradients (each at the full learning rate);
        # ctx.sum undoes DDP's averaging. The eval loss is the mean per prediction.
        return (ctx.sum("predictions", total) if ctx.training else ctx.mean("predictions", total)), logs

    def build_optimizer(self, model: nn.Module, args: TrainConfig) -> torch.optim.Optimizer:
        if self.sparse and args.max_grad_norm is not None:
            raise ConfigError("train.max_grad_norm must be null for word2vec with sparse gradients (sparse "
                              "gradients cannot be clipped, and word2vec.c never clips); set --train.max_grad_norm "
                              "null, or model.sparse_gradients false")
        if args.weight_decay:
            logger.info("word2vec uses plain SGD: train.weight_decay=%g is not applied", args.weight_decay)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
        self._optimizer = optimizer
        model.learning_rate.fill_(optimizer.param_groups[0]["lr"])
        return optimizer

    def step_hooks(self):
        def follow_learning_rate(model: Word2VecModel, step: int) -> None:
            # The implicit step needs the rate the next update will use (the scheduler has just set it).
            model.learning_rate.fill_(self._optimizer.param_groups[0]["lr"])

        return [follow_learning_rate]

    def fingerprint(self) -> dict[str, Any]:
        return {"backend": self.config.backend, "epochs": self.config.epochs, "data": to_dict(self.config.data),
                "model": to_dict(self.config.model)}

    def keyed_vectors(self, model: Word2VecModel) -> KeyedVectors:
        return to_keyed_vectors(self.corpus.vocabulary, model.input_vectors.weight.detach().float().cpu().numpy())

    def export(self, model: Word2VecModel, out_dir: Path, summary: dict[str, Any]) -> Path:
        started = time.perf_counter()
        summary = {**summary, "words_per_epoch": self.words_per_epoch}
        exported = export_vectors(self.keyed_vectors(model), out_dir, config=self.config, summary=summary,
                                  training_data=self.corpus.describe(self.config.data))
        self.export_seconds = time.perf_counter() - started
        return exported


# `python -m textssl.word2vec` runs this file a second time as __main__: only the imported module registers.
if __name__ != "__main__":
    register_objective(Word2VecObjective)


# --------------------------------------------------------------------------------------------------
# The artifact: KeyedVectors, word2vec formats, model card
# --------------------------------------------------------------------------------------------------


def to_keyed_vectors(vocabulary: Vocabulary, vectors: np.ndarray) -> KeyedVectors:
    """gensim KeyedVectors of `vectors` (one row per vocabulary word), with the corpus counts."""
    from gensim.models import KeyedVectors

    keyed = KeyedVectors(vector_size=vectors.shape[1], dtype=np.float32)
    keyed.add_vectors(vocabulary.words, vectors.astype(np.float32))
    for word, count in zip(vocabulary.words, vocabulary.counts.tolist()):
        keyed.set_vecattr(word, "count", count)  # as gensim keeps them (sorting, frequency filters)
    return keyed


def export_vectors(vectors: KeyedVectors, out_dir: str | Path, *, config: Word2VecConfig, summary: dict[str, Any],
                   training_data: str) -> Path:
    """Write `vectors.kv` (gensim native), `vectors.bin` (word2vec binary; plus `vectors.txt` when
    `text_format`), run the evaluations and write the model card. Returns `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vectors.save(str(out_dir / VECTORS_KV))
    vectors.save_word2vec_format(str(out_dir / VECTORS_BIN), binary=True)
    if config.text_format:
        vectors.save_word2vec_format(str(out_dir / VECTORS_TXT), binary=False)
    scores = evaluate_vectors(vectors, config.evaluation, cache_dir=config.data.corpus.cache_dir, tokenize=tokenize)
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=1))
    mode = "skip-gram" if config.model.mode == "skipgram" else "CBOW"
    model = config.model
    write_model_card(
        out_dir, model_name=out_dir.name if out_dir.name != "model" else f"word2vec-{config.model.mode}",
        summary=(f"{len(vectors):,} word vectors of dimension {vectors.vector_size}, trained with word2vec "
                 f"{mode} and negative sampling ({model.negative} negatives, window {model.window}, "
                 f"{config.epochs or '?'} epochs) on the {config.backend} backend."),
        config=to_dict(config), training_data=training_data,
        metrics={**{k: v for k, v in summary.items() if isinstance(v, int | float)}, **scores},
        library_name="gensim", tags=["word2vec", "word-embeddings", config.model.mode, config.backend],
        eval_results=model_index_results(scores, config.evaluation.downstream_task) or None,
        usage=("from gensim.models import KeyedVectors\n"
               f'vectors = KeyedVectors.load_word2vec_format("{VECTORS_BIN}", binary=True)  # or KeyedVectors.load('
               f'"{VECTORS_KV}")\nprint(vectors.most_similar("king"))'))
    return out_dir


def load_vectors(path: str | Path) -> KeyedVectors:
    """Word vectors exported by either backend: a folder (reads its word2vec-format file, which needs no
    unpickling), or a `.bin`/`.txt`/`.vec` (word2vec format) or `.kv` (gensim native) file."""
    from gensim.models import KeyedVectors

    path = Path(path)
    if path.is_dir():
        for name, binary in ((VECTORS_BIN, True), (VECTORS_TXT, False)):
            if (path / name).is_file():
                return KeyedVectors.load_word2vec_format(str(path / name), binary=binary)
        if (path / VECTORS_KV).is_file():
            return KeyedVectors.load(str(path / VECTORS_KV))
        raise FileNotFoundError(f"{path} holds no word vectors ({VECTORS_BIN}, {VECTORS_TXT} or {VECTORS_KV}); "
                                "pass the folder a word2vec run exported (output_dir/model)")
    if not path.is_file():
        raise FileNotFoundError(f"no word vectors at {path}")
    if path.suffix == ".kv":
        return KeyedVectors.load(str(path))
    if path.suffix in (".bin", ".txt", ".vec"):
        return KeyedVectors.load_word2vec_format(str(path), binary=path.suffix == ".bin")
    raise ValueError(f"{path}: unknown word-vector file type {path.suffix!r}; expected .bin, .txt, .vec or .kv")


# --------------------------------------------------------------------------------------------------
# One entry point for both backends
# --------------------------------------------------------------------------------------------------


@dataclass
class Word2VecResult:
    """What `train_word2vec` returns on either backend."""

    vectors: KeyedVectors
    """The trained word vectors (gensim KeyedVectors)."""
    backend: str
    export_dir: Path | None
    """The exported folder (None when train.export is false)."""
    train_seconds: float
    """Wall time of the training itself (data already prepared; no export or evaluation)."""
    words: int
    """In-vocabulary corpus words processed: words per epoch x epochs (before subsampling)."""
    scores: dict[str, float] = field(default_factory=dict)
    """Evaluation scores of the exported vectors (see textssl.word_eval)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Trainer logs (torch backend)."""

    @property
    def words_per_second(self) -> float:
        return self.words / max(self.train_seconds, 1e-9)


def _as_config(config: Word2VecConfig | str | Path, overrides: list[str] | dict[str, Any] | None) -> Word2VecConfig:
    if isinstance(config, Word2VecConfig):
        if overrides:
            updates = overrides if isinstance(overrides, dict) else cfg.parse_overrides(overrides)
            config = cfg.build(Word2VecConfig, cfg.merge(to_dict(config), updates))
        return config
    values = cfg.read_yaml(config)
    if overrides:
        values = cfg.merge(values, overrides if isinstance(overrides, dict) else cfg.parse_overrides(overrides))
    if values.get("objective", "word2vec") != "word2vec":
        raise ConfigError(f"{config} is a config for objective {values['objective']!r}, not word2vec")
    return cfg.build(Word2VecConfig, values)


def train_word2vec(config: Word2VecConfig | str | Path, overrides: list[str] | dict[str, Any] | None = None,
                   callbacks=None) -> Word2VecResult:
    """Train word vectors on the backend the config names; export them (and upload if hub.repo_id is set)."""
    config = _as_config(config, overrides)
    _check_config(config)
    if config.hub.repo_id:  # fail before training, not after, when the upload cannot work (one process asks the Hub)
        check_push_access(config.hub.repo_id, config.hub.token, ask_hub=os.environ.get("RANK", "0") == "0")
    result = _train_torch(config, callbacks) if config.backend == "torch" else _train_gensim(config)
    if config.hub.repo_id and result.export_dir is not None and _is_main_process():
        push_to_hub(result.export_dir, config.hub.repo_id, token=config.hub.token, private=config.hub.private)
    return result


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _train_torch(config: Word2VecConfig, callbacks) -> Word2VecResult:
    from sslcore.trainer import Trainer

    objective = Word2VecObjective(config)
    trainer = Trainer(objective, callbacks=callbacks)
    started = time.perf_counter()
    fit = trainer.fit()
    elapsed = time.perf_counter() - started
    vectors = objective.keyed_vectors(trainer.accelerator.unwrap_model(trainer.model))
    steps_per_epoch = config.train.max_steps / (config.epochs or 1) if config.epochs else None
    words = round(objective.words_per_epoch * fit.step / steps_per_epoch) if steps_per_epoch else 0
    # The training alone: fit() also prepares the (cached) data and exports + evaluates at the end.
    train_seconds = elapsed - objective.prepare_seconds - getattr(objective, "export_seconds", 0.0)
    return Word2VecResult(vectors, "torch", fit.export_dir, train_seconds, words, _read_scores(fit.export_dir),
                          fit.history)


def _read_scores(export_dir: Path | None) -> dict[str, float]:
    if export_dir is None or not (export_dir / "scores.json").is_file():
        return {}
    return json.loads((export_dir / "scores.json").read_text())


def gensim_options(config: Word2VecConfig) -> dict[str, Any]:
    """Our config as `gensim.models.Word2Vec` keyword arguments (the mapping both backends share)."""
    data, model = config.data, config.model
    return dict(
        vector_size=model.vector_size, window=model.window, shrink_windows=model.shrink_windows,
        negative=model.negative, ns_exponent=model.ns_exponent, hs=0, sg=int(model.mode == "skipgram"),
        cbow_mean=int(model.cbow_mean), min_count=data.min_count, max_final_vocab=data.max_vocab_size,
        sample=data.sample, alpha=config.train.learning_rate,
        min_alpha=0.0,  # the trainer's linear schedule also ends at 0
        epochs=config.epochs, seed=config.train.seed, workers=config.gensim.workers or cpu_cores(),
    )


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and `taskset` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _train_gensim(config: Word2VecConfig) -> Word2VecResult:
    from gensim.models import Word2Vec

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("backend gensim runs in one process (its threads use the cores); launch it without "
                          "--num_processes, or use backend torch for several processes")
    corpus = load_word2vec_corpus(config.data)
    # gensim reads Python lists of words; materialise them once (as its users do) so every epoch is fast.
    sentences = corpus.sentences["train"].with_format("arrow")[:]["tokens"].to_pylist()
    model = Word2Vec(**gensim_options(config))
    model.build_vocab(sentences)
    if len(model.wv) != len(corpus.vocabulary):
        logger.warning("gensim kept %d words, our vocabulary %d", len(model.wv), len(corpus.vocabulary))
    started = time.perf_counter()
    model.train(sentences, total_examples=model.corpus_count, epochs=model.epochs)
    elapsed = time.perf_counter() - started
    words = int(corpus.vocabulary.counts.sum()) * config.epochs
    export_dir = None
    output_dir = Path(config.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps(redact(to_dict(config)), indent=1))  # no hub.token on disk
    if config.train.export:
        summary = {"train_seconds": round(elapsed, 2), "words_per_second": round(words / elapsed)}
        export_dir = export_vectors(model.wv, output_dir / "model", config=config, summary=summary,
                                    training_data=corpus.describe(config.data))
    return Word2VecResult(model.wv, "gensim", export_dir, elapsed, words, _read_scores(export_dir))


# --------------------------------------------------------------------------------------------------
# Command line: python -m textssl.word2vec --config FILE [--section.key value ...]
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Word2VecResult | None:
    """Both backends from the command line; torch runs under `accelerate launch` as well. A mistake in the
    command line, config or paths prints one line and exits with status 2 (`--debug`: the traceback)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> Word2VecResult | None:
    show_help = "-h" in argv or "--help" in argv
    argv = [a for a in argv if a not in ("-h", "--help")]
    path, overrides, i = None, [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name == "--config":
            path = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
            i += 1 if eq else 2
            continue
        overrides.append(argv[i])
        i += 1
    if show_help:
        print("usage: python -m textssl.word2vec --config FILE [--backend torch|gensim] [--section.key VALUE ...] "
              f"[--debug]\n\n{DEBUG_HELP}.\n\noptions, with the values this run would use (defaults, then the "
              "YAML, then your overrides; `default` shown where it differs):")
        print("\n".join(cfg.describe(_as_config(path, overrides) if path else Word2VecConfig)))
        return None
    if path is None:
        raise ConfigError("--config FILE is required, e.g. recipes/configs/word2vec_skipgram_tiny.yaml")
    config = _as_config(path, overrides)
    result = train_word2vec(config)
    if _is_main_process():
        print(f"{result.backend}: {len(result.vectors):,} vectors, {result.words_per_second:,.0f} words/s, "
              f"exported to {result.export_dir}; scores {result.scores}")
    return result


if __name__ == "__main__":
    main()
