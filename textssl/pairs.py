"""Sentence pairs for next-sentence (BERT) and sentence-order (ALBERT) prediction.

Segments are cut from documents the way BERT's `create_pretraining_data` does: sentences are
gathered until a target length is reached (the full `max_seq_length - 3`, or with probability
`short_seq_prob` a random shorter one), and the chunk is split at a random sentence boundary
into A and B. What happens next is the pretext task:

- NSP: with probability `negative_prob`, B is replaced by a run of sentences from a DIFFERENT
  document (label 1, "random next"); otherwise B is the true continuation (label 0).
- SOP: A and B are always consecutive; with probability `negative_prob` they are swapped
  (label 1); otherwise kept in order (label 0).

Then the longer side is trimmed one token at a time, front or back at random, until the pair
fits (BERT's `truncate_seq_pair`).

Two ways to run it, sharing every function below:

- map-style (the trainer today): `build_segments` cuts segments once, as a cached `datasets.map`
  over documents. The pairing (negative, swap, truncation) is drawn at collate time from each
  example's seed, so every epoch sees new negatives and new swaps — unlike BERT's static pairs,
  which are fixed per "duplication" of the corpus.
- streaming: `pairs_from_documents` is a pure generator from a document stream to finished pairs;
  `stream_pairs` applies it lazily to a `datasets.IterableDataset`, window by window, keeping its
  shards, so `datasets.distributed.split_dataset_by_node` gives each process its own documents.
  NSP negatives come from other documents of the same window.

Bad input never reaches the collator: sentences that tokenize to nothing are dropped, a sentence
longer than a whole sequence (a line with no sentence boundary in it) is cut into pieces that
fit, and documents left with fewer than two sentences are skipped. `PairStats` counts each case and `log()` reports them.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers import PreTrainedTokenizerFast

from sslcore.data import generator_for
from textssl.packing import _fingerprint, tokenizer_fingerprint

logger = logging.getLogger(__name__)

PAIRS_VERSION = 1  # bump when segmentation changes, to invalidate cached segments
SPECIAL_TOKENS_IN_PAIR = 3  # [CLS] A [SEP] B [SEP]
Task = Literal["nsp", "sop"]


@dataclass
class PairConfig:
    """How documents become sentence pairs (segments as in BERT's create_pretraining_data)."""

    short_seq_prob: float = 0.1
    """Probability that a segment aims at a random length in [2, max) instead of filling the sequence, so the
    model also meets short inputs (BERT: 0.1)."""
    negative_prob: float = 0.5
    """NSP: probability that B comes from another document; SOP: probability that A and B are swapped."""
    dupe_factor: int = 5
    """Differently cut copies of the corpus (BERT: 10). Negatives, swaps and masks are redrawn every epoch
    anyway; more copies vary where segments start and end."""
    window_documents: int = 1000
    """Streaming only: documents read together; NSP negatives are drawn from the other documents of a window."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ValueError(f"pairs.short_seq_prob must be in [0, 1], got {self.short_seq_prob}")
        if not 0.0 <= self.negative_prob <= 1.0:
            raise ValueError(f"pairs.negative_prob must be in [0, 1], got {self.negative_prob}")
        if self.dupe_factor < 1:
            raise ValueError(f"pairs.dupe_factor must be >= 1, got {self.dupe_factor}")
        if self.window_documents < 2:
            raise ValueError(f"pairs.window_documents must be >= 2 (negatives need another document), "
                             f"got {self.window_documents}")


@dataclass
class PairStats:
    """What was dropped or changed on the way from documents to segments."""

    documents: int = 0
    """Documents read."""
    documents_skipped: int = 0
    """Documents with fewer than two usable sentences (no pair can be made from them)."""
    empty_sentences: int = 0
    """Sentences that tokenized to nothing (blank lines, characters the tokenizer drops)."""
    long_sentences_split: int = 0
    """Sentences longer than a whole pair's token budget, cut into pieces that fit."""
    segments: int = 0
    """Segments (one pair each) produced."""
    windows_without_negative: int = 0
    """Streaming NSP: windows holding a single document, whose segments were skipped (no other document)."""

    def add(self, other: PairStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def count_document(self, sentences: list[list[int]], empty: int, split: int) -> None:
        self.documents += 1
        self.documents_skipped += len(sentences) < 2
        self.empty_sentences += empty
        self.long_sentences_split += split

    def log(self, where: str) -> None:
        logger.info("%s: %d documents -> %d segments; skipped %d documents with < 2 sentences, dropped %d empty "
                    "sentences, split %d overlong sentences%s", where, self.documents, self.segments,
                    self.documents_skipped, self.empty_sentences, self.long_sentences_split,
                    f", skipped {self.windows_without_negative} single-document windows"
                    if self.windows_without_negative else "")


def max_pair_tokens(max_seq_length: int) -> int:
    """Tokens left for A and B once [CLS] and two [SEP] are in."""
    budget = max_seq_length - SPECIAL_TOKENS_IN_PAIR
    if budget < 4:
        raise ValueError(f"data.max_seq_length={max_seq_length} leaves {budget} tokens for a sentence pair; "
                         "use at least 7")
    return budget


# -- documents -> tokenized sentences -> segments (static: cut once per duplication) ---------------------------
def tokenize_sentences(documents: Sequence[Sequence[str]], tokenizer: PreTrainedTokenizerFast,
                       max_sentence_tokens: int) -> list[tuple[list[list[int]], int, int]]:
    """Per document: (token ids of its usable sentences, sentences dropped as empty, sentences split).

    One batched encode for all sentences. Sentences with no tokens are dropped; one longer than
    `max_sentence_tokens` is cut into pieces (a line with no sentence boundary in it would
    otherwise be truncated away, all but its first piece).
    """
    flat = [sentence for document in documents for sentence in document]
    encoded = tokenizer.backend_tokenizer.encode_batch(flat, add_special_tokens=False) if flat else []
    out, position = [], 0
    for document in documents:
        sentences, empty, split = [], 0, 0
        for encoding in encoded[position:position + len(document)]:
            ids = encoding.ids
            if not ids:
                empty += 1
            elif len(ids) > max_sentence_tokens:
                split += 1
                sentences.extend(ids[i:i + max_sentence_tokens] for i in range(0, len(ids), max_sentence_tokens))
            else:
                sentences.append(ids)
        position += len(document)
        out.append((sentences, empty, split))
    return out


def segment_document(sentences: list[list[int]], max_num_tokens: int, short_seq_prob: float,
                     rng: random.Random) -> list[dict[str, Any]]:
    """Cut one document's sentences into segments: chunks of >= 2 sentences with an A|B split point.

    Each segment: `input_ids` (the chunk's tokens), `sentence_lengths`, `a_sentences` (how many of
    them form A) and `target_length` (what the chunk aimed at; NSP negatives fill B up to it).
    As in BERT a chunk closes once it reaches its target; unlike BERT it also needs two sentences
    (a lone long sentence gets a partner instead of becoming an unpairable chunk), and a lone
    trailing sentence joins the chunk before it. The target is redrawn per chunk, so about
    `short_seq_prob` of all segments are short, whatever the document lengths.
    """
    if len(sentences) < 2:
        return []

    def draw_target() -> int:
        return rng.randint(2, max_num_tokens) if rng.random() < short_seq_prob else max_num_tokens

    chunks: list[tuple[list[list[int]], int]] = []
    current: list[list[int]] = []
    length, target = 0, draw_target()
    for sentence in sentences:
        current.append(sentence)
        length += len(sentence)
        if length >= target and len(current) >= 2:
            chunks.append((current, target))
            current, length, target = [], 0, draw_target()
    if len(current) == 1:
        chunks[-1] = (chunks[-1][0] + current, chunks[-1][1])
    elif current:
        chunks.append((current, target))
    return [{"input_ids": [t for s in chunk for t in s], "sentence_lengths": [len(s) for s in chunk],
             "a_sentences": rng.randint(1, len(chunk) - 1), "target_length": target} for chunk, target in chunks]


def split_segment(segment: dict[str, Any]) -> tuple[list[int], list[int]]:
    """A and B (the true continuation) of a segment."""
    ids = list(segment["input_ids"])
    a_length = sum(segment["sentence_lengths"][:segment["a_sentences"]])
    return ids[:a_length], ids[a_length:]


def _rng_for(seed: int, copy: int, doc_id: str) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`: the same cut on every machine, process and run.
    return random.Random(f"{seed}/{copy}/{doc_id}")


def _doc_seed(seed: int, doc_id: str, part: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{doc_id}/{part}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


# -- pairing (dynamic: drawn per example from its seed) --------------------------------------------------------
class _ListColumn:
    """Row access to a list column of an Arrow table as zero-copy numpy views (memory-mapped stays mapped)."""

    def __init__(self, column):
        self.values, self.offsets, self.first_row = [], [], [0]
        for chunk in column.chunks:
            if chunk.null_count:
                raise ValueError("segment columns must not hold nulls")
            offsets = chunk.offsets.to_numpy()
            self.values.append(chunk.values.to_numpy(zero_copy_only=False))
            self.offsets.append(offsets)
            self.first_row.append(self.first_row[-1] + len(chunk))

    def __getitem__(self, row: int) -> np.ndarray:
        chunk = int(np.searchsorted(self.first_row, row, side="right")) - 1
        offsets, local = self.offsets[chunk], row - self.first_row[chunk]
        return self.values[chunk][offsets[local]:offsets[local + 1]]


class OtherDocumentSampler:
    """Draws a run of sentences from a document other than a given one.

    `segments`: a `datasets.Dataset` of segments (as `build_segments` writes) or a list of segment
    dicts with `doc` and `part`; a document's segments must be contiguous. A row is drawn uniformly
    from the rows OUTSIDE the given document's block, in one draw: never the same document, no retry.
    """

    def __init__(self, segments: datasets.Dataset | Sequence[dict[str, Any]]):
        if isinstance(segments, datasets.Dataset):
            if segments._indices is not None:  # select()/shuffle(): read through the mapping once
                segments = segments.flatten_indices()
            table = segments.data.table
        else:
            columns = datasets.Features({k: SEGMENT_FEATURES[k] for k in ("input_ids", "sentence_lengths", "doc", "part")})
            table = pa.Table.from_pylist([{k: row[k] for k in columns} for row in segments],
                                         schema=columns.arrow_schema)
        self.input_ids = _ListColumn(table.column("input_ids"))
        self.sentence_lengths = _ListColumn(table.column("sentence_lengths"))
        self.docs = table.column("doc").to_numpy()
        self.parts = table.column("part").to_numpy()
        starts = np.flatnonzero(np.r_[True, self.docs[1:] != self.docs[:-1]])
        run_docs = self.docs[starts]
        if len(np.unique(run_docs)) != len(run_docs):
            raise ValueError("OtherDocumentSampler needs each document's segments to be contiguous")
        lengths = np.diff(np.r_[starts, len(self.docs)])
        self.block = {int(d): (int(s), int(n)) for d, s, n in zip(run_docs, starts, lengths)}

    @property
    def num_documents(self) -> int:
        return len(self.block)

    def draw(self, doc: int, min_tokens: int, gen: torch.Generator) -> list[int]:
        """Sentences from a random segment of another document, from a random sentence on, continuing
        into that document's next segment while fewer than `min_tokens` are gathered (as BERT does)."""
        start, size = self.block[int(doc)]
        others = len(self.docs) - size
        if others <= 0:
            raise ValueError("no other document to draw an NSP negative from; the corpus needs >= 2 documents "
                             "with two or more sentences")
        row = int(torch.randint(others, (1,), generator=gen))
        row += size if row >= start else 0  # skip over the block of `doc`
        lengths = self.sentence_lengths[row]
        first = int(torch.randint(len(lengths), (1,), generator=gen))
        pieces, gathered = [], 0
        while True:
            ids, offset = self.input_ids[row], int(lengths[:first].sum())
            for length in lengths[first:].tolist():
                pieces.append(ids[offset:offset + length])
                offset += length
                gathered += length
                if gathered >= min_tokens:
                    return np.concatenate(pieces).tolist()
            following = row + 1
            if (following >= len(self.docs) or self.docs[following] != self.docs[row]
                    or self.parts[following] != self.parts[row] + 1):
                return np.concatenate(pieces).tolist()  # the document (this cut of it) ended
            row, first, lengths = following, 0, self.sentence_lengths[following]


def truncate_pair(a: list[int], b: list[int], max_num_tokens: int, gen: torch.Generator
                  ) -> tuple[list[int], list[int]]:
    """BERT's truncate_seq_pair: trim the longer side (B on a tie), one token at a time from its front or
    back (a fair coin each), until `len(a) + len(b) <= max_num_tokens`."""
    excess = len(a) + len(b) - max_num_tokens
    if excess <= 0:
        return a, b
    longer, shorter = max(len(a), len(b)), min(len(a), len(b))
    if longer - excess >= shorter:  # only the longer side is ever trimmed
        keep_a, keep_b = (len(a) - excess, len(b)) if len(a) > len(b) else (len(a), len(b) - excess)
    else:  # trimmed down to equal, then alternately (B first on a tie): A keeps the odd token
        keep_a, keep_b = (max_num_tokens + 1) // 2, max_num_tokens // 2
    drop_a, drop_b = len(a) - keep_a, len(b) - keep_b
    coins = torch.rand(drop_a + drop_b, generator=gen) < 0.5
    front_a, front_b = int(coins[:drop_a].sum()), int(coins[drop_a:].sum())
    return a[front_a:front_a + keep_a], b[front_b:front_b + keep_b]


def next_sentence_pair(segment: dict[str, Any], negatives: OtherDocumentSampler, doc: int, max_num_tokens: int,
                       negative_prob: float, gen: torch.Generator) -> tuple[list[int], list[int], int]:
    """(A, B, label) for NSP: label 1 = B is from another document, 0 = B is A's continuation."""
    a, b = split_segment(segment)
    is_random = bool(torch.rand(1, generator=gen) < negative_prob)
    if is_random:
        b = negatives.draw(doc, max(1, segment["target_length"] - len(a)), gen)
    a, b = truncate_pair(a, b, max_num_tokens, gen)
    return a, b, int(is_random)


def sentence_order_pair(segment: dict[str, Any], max_num_tokens: int, negative_prob: float,
                        gen: torch.Generator) -> tuple[list[int], list[int], int]:
    """(first, second, label) for SOP: label 1 = the two segments are swapped, 0 = in order.

    Truncation is drawn before the swap, so a swapped pair is exactly the unswapped one reversed.
    """
    a, b = truncate_pair(*split_segment(segment), max_num_tokens, gen)
    if torch.rand(1, generator=gen) < negative_prob:
        return b, a, 1
    return a, b, 0


def encode_pairs(pairs: Sequence[tuple[list[int], list[int], int]], cls_id: int, sep_id: int, pad_id: int,
                 pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """`[CLS] A [SEP] B [SEP]` rows padded to the longest; token types 0 for A, 1 for B.

    `attention_mask` is returned only when some row is padded: without it SDPA takes its fastest path.
    """
    lengths = [len(a) + len(b) + SPECIAL_TOKENS_IN_PAIR for a, b, _ in pairs]
    width = -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (a, b, _) in enumerate(pairs):
        ids = [cls_id, *a, sep_id, *b, sep_id]
        input_ids[row, :len(ids)] = torch.tensor(ids)
        token_type_ids[row, len(a) + 2:len(ids)] = 1
    batch = {"input_ids": input_ids, "token_type_ids": token_type_ids,
             "pair_labels": torch.tensor([label for _, _, label in pairs], dtype=torch.long)}
    if min(lengths) < width:
        batch["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return batch


# -- map-style: cached datasets.map over documents -------------------------------------------------------------
class _TokenizeSentences:
    """Picklable batched map: documents -> cleaned sentence ids, with what was dropped per document."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, max_sentence_tokens: int):
        self.tokenizer, self.max_sentence_tokens = tokenizer, max_sentence_tokens

    def __call__(self, batch):
        documents = tokenize_sentences(batch["sentences"], self.tokenizer, self.max_sentence_tokens)
        return {"sentence_ids": [sentences for sentences, _, _ in documents],
                "empty_sentences": [empty for _, empty, _ in documents],
                "long_sentences_split": [split for _, _, split in documents]}


class _Segment:
    """Picklable batched map: tokenized documents -> segments, `dupe_factor` cuts of each."""

    def __init__(self, max_num_tokens: int, config: PairConfig, seed: int, doc_offset: int):
        self.max_num_tokens, self.config, self.seed, self.doc_offset = max_num_tokens, config, seed, doc_offset

    def __call__(self, batch, indices):
        out: dict[str, list] = {k: [] for k in ("input_ids", "sentence_lengths", "a_sentences", "target_length",
                                                "doc", "part")}
        for doc, doc_id, sentences in zip(indices, batch["doc_id"], batch["sentence_ids"]):
            part = 0  # counts segments across the copies, so "part + 1" is the next piece of text only within one
            for copy in range(self.config.dupe_factor):
                segments = segment_document(sentences, self.max_num_tokens, self.config.short_seq_prob,
                                            _rng_for(self.seed, copy, doc_id))
                for segment in segments:
                    for key, value in segment.items():
                        out[key].append(value)
                    out["doc"].append(self.doc_offset + doc)
                    out["part"].append(part)
                    part += 1
                part += 1  # a gap: the next copy does not continue this one
        return out


SEGMENT_FEATURES = datasets.Features({
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "sentence_lengths": datasets.Sequence(datasets.Value("int32")),
    "a_sentences": datasets.Value("int32"),
    "target_length": datasets.Value("int32"),
    "doc": datasets.Value("int32"),
    "part": datasets.Value("int32"),
})


def build_segments(documents: datasets.Dataset, tokenizer: PreTrainedTokenizerFast, max_seq_length: int,
                   config: PairConfig, seed: int, num_proc: int = 1, doc_offset: int = 0
                   ) -> tuple[datasets.Dataset, PairStats]:
    """Segments of a document split (columns doc_id + sentences), cached on disk, and what was skipped.

    Rows of one document are contiguous; `doc` is `doc_offset` + the document's row in `documents`
    (offsets keep document numbers distinct across splits).
    """
    for column in ("doc_id", "sentences"):
        if column not in documents.column_names:
            raise ValueError(f"sentence pairs need documents with a {column!r} column (as textssl.corpus."
                             f"load_corpus gives), got columns {documents.column_names}")
    max_num_tokens = max_pair_tokens(max_seq_length)
    tokenized = documents.map(
        _TokenizeSentences(tokenizer, max_num_tokens), batched=True, batch_size=64,
        remove_columns=[c for c in documents.column_names if c != "doc_id"],
        num_proc=num_proc if num_proc > 1 and len(documents) > 256 else None, desc="tokenizing sentences",
        new_fingerprint=_fingerprint("pair-sentences", PAIRS_VERSION, documents._fingerprint,
                                     tokenizer_fingerprint(tokenizer), max_num_tokens))
    segments = tokenized.map(
        _Segment(max_num_tokens, config, seed, doc_offset), batched=True, batch_size=64, with_indices=True,
        remove_columns=tokenized.column_names, features=SEGMENT_FEATURES,
        num_proc=num_proc if num_proc > 1 and len(tokenized) > 256 else None, desc="cutting segments",
        new_fingerprint=_fingerprint("pair-segments", PAIRS_VERSION, tokenized._fingerprint, max_num_tokens,
                                     config.short_seq_prob, config.dupe_factor, seed, doc_offset))
    # Counted from the Arrow columns (no Python pass over the rows): also right when loaded from cache.
    sentence_counts = pc.list_value_length(tokenized.data.column("sentence_ids"))
    stats = PairStats(
        documents=len(tokenized),
        documents_skipped=int(pc.sum(pc.less(sentence_counts, 2)).as_py() or 0),
        empty_sentences=int(pc.sum(tokenized.data.column("empty_sentences")).as_py() or 0),
        long_sentences_split=int(pc.sum(tokenized.data.column("long_sentences_split")).as_py() or 0),
        segments=len(segments),
    )
    return segments, stats


# -- streaming: a pure generator, applied window by window ------------------------------------------------------
def pairs_from_documents(documents: Iterable[dict[str, Any]], tokenizer: PreTrainedTokenizerFast,
                         max_seq_length: int, config: PairConfig, task: Task, seed: int,
                         stats: PairStats | None = None) -> Iterator[dict[str, Any]]:
    """Finished pairs from a stream of documents (dicts with `doc_id` and `sentences`), lazily.

    Documents are read `config.window_documents` at a time; NSP negatives come from other
    documents of the window. Every draw is seeded by (seed, doc_id, segment), so a document gives
    the same pairs whichever process or shard reads it. Yields `first`, `second`, `label`, `doc_id`.
    """
    stats = stats if stats is not None else PairStats()
    window: list[dict[str, Any]] = []
    for document in documents:
        window.append(document)
        if len(window) >= config.window_documents:
            yield from _window_pairs(window, tokenizer, max_seq_length, config, task, seed, stats)
            window = []
    if window:
        yield from _window_pairs(window, tokenizer, max_seq_length, config, task, seed, stats)


def _window_pairs(window: list[dict[str, Any]], tokenizer: PreTrainedTokenizerFast, max_seq_length: int,
                  config: PairConfig, task: Task, seed: int, stats: PairStats) -> Iterator[dict[str, Any]]:
    max_num_tokens = max_pair_tokens(max_seq_length)
    for document in window:
        if "sentences" not in document or "doc_id" not in document:
            raise ValueError(f"sentence pairs need documents with 'doc_id' and 'sentences' (as textssl.corpus."
                             f"load_corpus gives), got keys {sorted(document)}")
    segments = []
    tokenized = tokenize_sentences([d["sentences"] for d in window], tokenizer, max_num_tokens)
    for doc, (document, (sentences, empty, split)) in enumerate(zip(window, tokenized)):
        stats.count_document(sentences, empty, split)
        cut = segment_document(sentences, max_num_tokens, config.short_seq_prob, _rng_for(seed, 0, document["doc_id"]))
        segments.extend({**segment, "doc": doc, "part": part} for part, segment in enumerate(cut))
    if task == "nsp" and len({segment["doc"] for segment in segments}) < 2:
        stats.windows_without_negative += bool(segments)
        return
    stats.segments += len(segments)
    sampler = OtherDocumentSampler(segments) if task == "nsp" else None
    for segment in segments:
        doc, doc_id = segment["doc"], window[segment["doc"]]["doc_id"]
        gen = generator_for(_doc_seed(seed, doc_id, segment["part"]))
        if task == "nsp":
            first, second, label = next_sentence_pair(segment, sampler, doc, max_num_tokens, config.negative_prob, gen)
        else:
            first, second, label = sentence_order_pair(segment, max_num_tokens, config.negative_prob, gen)
        yield {"first": first, "second": second, "label": label, "doc_id": doc_id}


PAIR_FEATURES = datasets.Features({
    "first": datasets.Sequence(datasets.Value("int32")),
    "second": datasets.Sequence(datasets.Value("int32")),
    "label": datasets.Value("int8"),
    "doc_id": datasets.Value("string"),
})


class _PairsOfWindow:
    """Picklable batched map for `IterableDataset.map`: one window of documents -> its pairs."""

    def __init__(self, tokenizer, max_seq_length: int, config: PairConfig, task: Task, seed: int):
        self.tokenizer, self.max_seq_length, self.config, self.task, self.seed = (
            tokenizer, max_seq_length, config, task, seed)

    def __call__(self, batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        stats = PairStats()
        pairs = list(_window_pairs(rows, self.tokenizer, self.max_seq_length, self.config, self.task,
                                   self.seed, stats))
        if stats.documents_skipped or stats.empty_sentences or stats.long_sentences_split or \
                stats.windows_without_negative:
            stats.log("streaming pairs (one window)")
        return {key: [p[key] for p in pairs] for key in PAIR_FEATURES}


def stream_pairs(documents: datasets.IterableDataset, tokenizer: PreTrainedTokenizerFast, max_seq_length: int,
                 config: PairConfig, task: Task, seed: int) -> datasets.IterableDataset:
    """Pairs of a streaming corpus, built lazily window by window.

    The stream keeps its shards, so `split_dataset_by_node` (before or after this) gives each
    process its own documents when the shard count is a multiple of the process count (otherwise
    `datasets` has every process read everything and keep every N-th pair: still disjoint, slower).
    """
    # Only the two columns pairing reads travel on (the stream's column names may be unknown up front).
    columns = ["doc_id", "sentences"]
    return documents.select_columns(columns).map(
        _PairsOfWindow(tokenizer, max_seq_length, config, task, seed), batched=True,
        batch_size=config.window_documents, remove_columns=columns, features=PAIR_FEATURES)
