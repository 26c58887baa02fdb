"""Sentence pairs (textssl.pairs): segments, NSP negatives, SOP swaps, truncation, streaming shards.

Documents here are made of tokens `t<N>` where N = 1000 x document + position, read by a
word-level tokenizer whose id for `t<N>` is N: every token of a pair says which document (and
where in it) it came from.
"""

import logging
import random

import datasets
import numpy as np
import pytest
import torch
from datasets.distributed import split_dataset_by_node
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sslcore.data import generator_for
from textssl.pairs import (
    OtherDocumentSampler,
    PairConfig,
    PairStats,
    build_segments,
    encode_pairs,
    max_pair_tokens,
    next_sentence_pair,
    pairs_from_documents,
    segment_document,
    sentence_order_pair,
    split_segment,
    stream_pairs,
    truncate_pair,
)

SEQ = 48
BUDGET = max_pair_tokens(SEQ)  # 45
N_DOCS = 40


def doc_of(token: int) -> int:
    return token // 1000


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    vocab.update({f"t{n}": n for d in range(1, N_DOCS + 3) for n in range(d * 1000, d * 1000 + 600)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def make_documents(seed=0):
    """40 documents of 2-25 sentences of 1-12 tokens, plus the bad cases the builder must survive."""
    rng = random.Random(seed)
    docs = []
    for d in range(1, N_DOCS + 1):
        position, sentences = d * 1000, []
        for _ in range(rng.randint(2, 25)):
            length = rng.randint(1, 12)
            sentences.append(" ".join(f"t{n}" for n in range(position, position + length)))
            position += length
        docs.append({"doc_id": f"synthetic#{d}", "sentences": sentences})
    # Bad input: a one-sentence document, blank "sentences", a sentence longer than a whole sequence.
    d = N_DOCS + 1
    docs.append({"doc_id": "bad#single", "sentences": [" ".join(f"t{n}" for n in range(d * 1000, d * 1000 + 5))]})
    d = N_DOCS + 2
    docs.append({"doc_id": "bad#long", "sentences": [
        "", "   ", " ".join(f"t{n}" for n in range(d * 1000, d * 1000 + 130)),
        " ".join(f"t{n}" for n in range(d * 1000 + 130, d * 1000 + 140))]})
    return docs


@pytest.fixture(scope="module")
def segments(tokenizer, tmp_path_factory):
    documents = datasets.Dataset.from_list(make_documents())
    return build_segments(documents, tokenizer, SEQ, PairConfig(dupe_factor=2), seed=0)


def test_bad_input_is_counted_and_survives(segments, caplog):
    segments, stats = segments
    assert stats.documents == N_DOCS + 2
    assert stats.documents_skipped == 1  # bad#single
    assert stats.empty_sentences == 2  # "" and "   " in bad#long
    assert stats.long_sentences_split == 1  # 130 tokens > BUDGET: cut into 45 + 45 + 40
    with caplog.at_level(logging.INFO, logger="textssl.pairs"):
        stats.log("test")
    assert "skipped 1 documents with < 2 sentences, dropped 2 empty sentences, split 1 overlong" in caplog.text
    long_doc = N_DOCS + 2
    rows = [segments[i] for i in range(len(segments)) if segments[i]["doc"] == N_DOCS + 1]
    assert rows, "the document with the long line still gives segments"
    assert all(max(r["sentence_lengths"]) <= BUDGET for r in rows)
    assert all(doc_of(t) == long_doc for r in rows for t in r["input_ids"])


def test_segments_tile_each_document_in_order(segments):
    segments, _ = segments
    documents = make_documents()
    by_doc: dict[tuple[int, int], list[dict]] = {}
    for row in segments:
        assert len(row["sentence_lengths"]) >= 2, "every segment has an A and a B"
        assert 1 <= row["a_sentences"] < len(row["sentence_lengths"])
        assert sum(row["sentence_lengths"]) == len(row["input_ids"])
        assert 2 <= row["target_length"] <= BUDGET
        by_doc.setdefault(row["doc"], []).append(row)
    assert len(by_doc) == N_DOCS + 1  # bad#single gives none
    for doc, rows in by_doc.items():
        # Two copies (dupe_factor=2), each covering the whole document once, in order, with a gap in `part`.
        parts = [r["part"] for r in rows]
        copies = np.split(np.array(parts), np.flatnonzero(np.diff(parts) != 1) + 1)
        assert len(copies) == 2
        n_sentences = len([s for s in documents[doc]["sentences"] if s.strip()])
        for copy in copies:
            tokens = [t for p in copy for t in rows[parts.index(p)]["input_ids"]]
            assert tokens == list(range(tokens[0], tokens[0] + len(tokens)))  # contiguous text, nothing lost
            assert tokens[0] % 1000 == 0
            if doc != N_DOCS + 1:
                assert sum(len(rows[parts.index(p)]["sentence_lengths"]) for p in copy) == n_sentences


def test_short_sequence_probability():
    rng = random.Random(0)
    sentences = [[1] * 5 for _ in range(20000)]
    for prob in (0.0, 0.1, 0.5):
        chunks = segment_document(sentences, 100, prob, rng)
        short = np.mean([c["target_length"] < 100 for c in chunks])
        assert abs(short - prob) < 0.03, (prob, short)


def test_lone_trailing_sentence_joins_the_previous_chunk():
    sentences = [[1] * 10, [2] * 10, [3] * 10]  # target 20: [1,2] closes, [3] alone would be unpairable
    chunks = segment_document(sentences, 20, 0.0, random.Random(0))
    assert len(chunks) == 1 and chunks[0]["sentence_lengths"] == [10, 10, 10]
    assert segment_document([[1, 2, 3]], 20, 0.0, random.Random(0)) == []


def bert_truncate_seq_pair(a, b, max_num_tokens, rng):
    """The reference, written the obvious way (as in BERT's create_pretraining_data.py)."""
    a, b = list(a), list(b)
    while len(a) + len(b) > max_num_tokens:
        trunc = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del trunc[0]
        else:
            trunc.pop()
    return a, b


def test_truncation_matches_bert():
    rng = random.Random(0)
    for i in range(3000):
        a = list(range(rng.randint(1, 80)))
        b = list(range(1000, 1000 + rng.randint(1, 80)))
        budget = rng.randint(4, 120)
        ours = truncate_pair(a, b, budget, generator_for(i))
        reference = bert_truncate_seq_pair(a, b, budget, rng)
        assert [len(x) for x in ours] == [len(x) for x in reference]
        for original, kept in zip((a, b), ours):  # a contiguous piece of the original
            assert kept == original[original.index(kept[0]):original.index(kept[0]) + len(kept)]
    # Both ends of both sides get trimmed, a fair coin per removed token: about half come off the front.
    removed = {"front": 0, "back": 0}
    for i in range(400):
        a, b = list(range(100)), list(range(1000, 1060))  # 110 too many: A keeps 25 (75 removed), B 25 (35)
        for original, kept in zip((a, b), truncate_pair(a, b, 50, generator_for(i))):
            front = kept[0] - original[0]
            back = len(original) - front - len(kept)
            assert front > 0 and back > 0, f"pair {i}: one end of a side was never trimmed ({front} front, {back} back)"
            removed["front"] += front
            removed["back"] += back
    share = removed["front"] / (removed["front"] + removed["back"])
    assert abs(share - 0.5) < 0.02, f"{share:.3f} of the removed tokens came off the front"  # sd 0.0024


def test_nsp_negatives_never_from_the_same_document_and_about_half(segments):
    segments, _ = segments
    sampler = OtherDocumentSampler(segments)
    rows, labels = list(segments), []
    for i in range(3000):
        row = rows[i % len(rows)]
        a, b, label = next_sentence_pair(row, sampler, row["doc"], BUDGET, 0.5, generator_for(i))
        labels.append(label)
        assert 1 <= len(a) and 1 <= len(b) and len(a) + len(b) <= BUDGET
        doc_a = {doc_of(t) for t in a}
        doc_b = {doc_of(t) for t in b}
        assert len(doc_a) == 1 and len(doc_b) == 1, "each side comes from one document"
        assert np.all(np.diff(b) == 1), "B is a contiguous run of text"
        if label:
            assert doc_a != doc_b, "a negative B never comes from A's document"
        else:
            assert doc_a == doc_b and min(b) > max(a), "a positive B is A's continuation"
    assert abs(np.mean(labels) - 0.5) < 0.03


def test_nsp_negatives_change_with_the_seed(segments):
    segments, _ = segments
    sampler = OtherDocumentSampler(segments)
    row = segments[0]
    negatives = {tuple(sampler.draw(row["doc"], 10, generator_for(s))) for s in range(50)}
    assert len(negatives) > 30, "each epoch (seed) draws a new negative"


def test_sampler_refuses_a_single_document():
    rows = [{"input_ids": [1, 2, 3], "sentence_lengths": [1, 2], "doc": 0, "part": p} for p in range(3)]
    with pytest.raises(ValueError, match="another document|other document"):
        OtherDocumentSampler(rows).draw(0, 5, generator_for(0))


def test_sop_swaps_about_half_and_swapped_pairs_are_the_originals_reversed(segments):
    segments, _ = segments
    rows, labels = list(segments), []
    for i in range(3000):
        row = rows[i % len(rows)]
        original = sentence_order_pair(row, BUDGET, 0.0, generator_for(i))
        first, second, label = sentence_order_pair(row, BUDGET, 0.5, generator_for(i))
        labels.append(label)
        assert original[2] == 0 and max(original[0]) < min(original[1]), "unswapped: A precedes B in the text"
        if label:
            assert (first, second) == (original[1], original[0])
        else:
            assert (first, second) == (original[0], original[1])
        assert {doc_of(t) for t in first + second} == {row["doc"] + 1}, "both segments from one document"
    assert abs(np.mean(labels) - 0.5) < 0.03


def test_split_segment_gives_a_then_the_true_continuation():
    row = {"input_ids": [5, 6, 7, 8, 9], "sentence_lengths": [2, 1, 2], "a_sentences": 2, "target_length": 5}
    assert split_segment(row) == ([5, 6, 7], [8, 9])


def test_encode_pairs_layout():
    batch = encode_pairs([([5, 6], [7], 0), ([5], [7, 8, 9], 1)], cls_id=2, sep_id=3, pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 5, 6, 3, 7, 3, 0], [2, 5, 3, 7, 8, 9, 3]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0], [1] * 7]
    assert batch["pair_labels"].tolist() == [0, 1]
    full = encode_pairs([([5], [7], 0), ([6], [8], 1)], cls_id=2, sep_id=3, pad_id=0)
    assert "attention_mask" not in full, "no padding, no mask: SDPA keeps its fast path"


def test_pair_config_rejects_bad_values():
    with pytest.raises(ValueError, match="negative_prob"):
        PairConfig(negative_prob=1.5)
    with pytest.raises(ValueError, match="dupe_factor"):
        PairConfig(dupe_factor=0)
    with pytest.raises(ValueError, match="max_seq_length"):
        max_pair_tokens(5)


@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_streaming_generator_pairs(tokenizer, task):
    stats = PairStats()
    config = PairConfig(window_documents=8)
    pairs = list(pairs_from_documents(iter(make_documents()), tokenizer, SEQ, config, task, seed=0, stats=stats))
    assert stats.documents == N_DOCS + 2 and stats.documents_skipped == 1 and stats.long_sentences_split == 1
    assert len(pairs) == stats.segments > 0
    labels = [p["label"] for p in pairs]
    assert 0.4 < np.mean(labels) < 0.6
    for pair in pairs:
        docs = {doc_of(t) for t in pair["first"]}, {doc_of(t) for t in pair["second"]}
        if task == "nsp" and pair["label"]:
            assert docs[0] != docs[1]
        else:
            assert docs[0] == docs[1]
    again = list(pairs_from_documents(iter(make_documents()), tokenizer, SEQ, config, task, seed=0))
    assert again == pairs, "seeded by document: the same stream gives the same pairs"


def _document_stream(shards):
    for shard in shards:
        yield from (doc for i, doc in enumerate(make_documents()) if i % 4 == shard)


@pytest.mark.parametrize("n_shards", [4, 3])
def test_streamed_pairs_are_sharded_disjointly_per_process(tokenizer, n_shards):
    """4 shards on 2 processes: each reads its own documents. 3 shards: datasets falls back to every
    process reading the stream and keeping every other example; the pairs are still disjoint."""
    stream = datasets.IterableDataset.from_generator(_document_stream, gen_kwargs={"shards": list(range(n_shards))})
    config = PairConfig(window_documents=4)

    def key(pair):
        return pair["doc_id"], tuple(pair["first"]), tuple(pair["second"])

    everything = sorted(key(p) for p in stream_pairs(stream, tokenizer, SEQ, config, "sop", seed=0))
    per_rank = [[key(p) for p in stream_pairs(split_dataset_by_node(stream, rank=rank, world_size=2),
                                              tokenizer, SEQ, config, "sop", seed=0)] for rank in range(2)]
    assert per_rank[0] and per_rank[1]
    assert not set(per_rank[0]) & set(per_rank[1]), "no pair is made on both processes"
    assert sorted(per_rank[0] + per_rank[1]) == everything, "together the processes see the whole stream"
    if n_shards % 2 == 0:
        docs = [{doc_id for doc_id, _, _ in pairs} for pairs in per_rank]
        assert not docs[0] & docs[1], "no document is read by both processes"
    # NSP on a shard: negatives come from the shard's own windows, never from A's document.
    shard = split_dataset_by_node(stream, rank=1, world_size=2)
    for pair in stream_pairs(shard, tokenizer, SEQ, config, "nsp", seed=0):
        if pair["label"]:
            assert {doc_of(t) for t in pair["first"]} != {doc_of(t) for t in pair["second"]}


def test_masking_can_run_on_encoded_pairs(segments):
    """The batch layout the objectives mask: specials and padding are never masked."""
    from textssl.masking import MaskingConfig, mask_tokens

    segments, _ = segments
    sampler = OtherDocumentSampler(segments)
    gens = [generator_for(i) for i in range(16)]
    pairs = [next_sentence_pair(segments[i], sampler, segments[i]["doc"], BUDGET, 0.5, g) for i, g in enumerate(gens)]
    batch = encode_pairs(pairs, cls_id=2, sep_id=3, pad_id=0)
    maskable = batch["input_ids"] > 4
    masked, labels = mask_tokens(batch["input_ids"], maskable, gens, mask_token_id=4,
                                 random_token_ids=torch.arange(1000, 2000), config=MaskingConfig())
    assert (labels[~maskable] == -100).all()
    assert (labels[maskable] != -100).float().mean() == pytest.approx(0.15, abs=0.03)
