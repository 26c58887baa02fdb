"""Masking invariants: exact rate, specials untouched, labels, 80/10/10, whole words, determinism."""

import pytest
import torch

from textssl.masking import IGNORE_INDEX, MaskingConfig, mask_tokens
from textssl.tokenizer import TokenizerConfig, train_tokenizer, word_start_table

TEXT = [
    "the unbelievably longwinded philosopher reconsidered everything",
    "internationalization and localization are notoriously underestimated",
    "a quick brown fox jumps over the lazy dog near the riverbank",
    "tokenizers split uncommon words into several subword pieces",
] * 50

MASK, CLS, SEP = 4, 2, 3


def _batch(batch=64, length=128, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[:, 60] = SEP  # a document boundary inside the block
    return ids, (ids != CLS) & (ids != SEP)


def _mask(ids, maskable, config, seeds=None, word_starts=None):
    seeds = seeds if seeds is not None else range(len(ids))
    return mask_tokens(ids, maskable, [torch.Generator().manual_seed(s) for s in seeds], mask_token_id=MASK,
                       random_token_ids=torch.arange(5, 1000), config=config, word_starts=word_starts)


def test_rate_is_exact_per_sequence_and_specials_are_never_chosen():
    ids, maskable = _batch()
    masked, labels = _mask(ids, maskable, MaskingConfig(mlm_probability=0.15))
    chosen = labels != IGNORE_INDEX
    assert (chosen.sum(1) == round(0.15 * 125)).all()  # 128 - [CLS] - 2x[SEP] = 125 maskable
    assert not chosen[~maskable].any()
    assert (masked[~maskable] == ids[~maskable]).all()  # specials are kept as they are


def test_labels_hold_the_original_tokens_only_where_chosen():
    ids, maskable = _batch()
    masked, labels = _mask(ids, maskable, MaskingConfig())
    chosen = labels != IGNORE_INDEX
    assert (labels[chosen] == ids[chosen]).all()
    assert (labels[~chosen] == IGNORE_INDEX).all()
    assert (masked[~chosen] == ids[~chosen]).all()  # unchosen tokens are never corrupted


def test_80_10_10_split_of_the_chosen_tokens():
    ids, maskable = _batch(batch=512)
    masked, labels = _mask(ids, maskable, MaskingConfig())
    chosen = labels != IGNORE_INDEX
    n = chosen.sum().item()
    as_mask = (masked[chosen] == MASK).sum().item() / n
    kept = (masked[chosen] == ids[chosen]).sum().item() / n
    randomised = 1 - as_mask - kept
    assert as_mask == pytest.approx(0.8, abs=0.02)
    # a random replacement can draw the original token (1 in 995): counted as kept here
    assert kept == pytest.approx(0.1, abs=0.02) and randomised == pytest.approx(0.1, abs=0.02)
    assert (masked[chosen & (masked != MASK) & (masked != ids)] >= 5).all()  # random ids are never specials


def test_same_seeds_same_masks_and_rows_are_independent_of_their_batch():
    ids, maskable = _batch(batch=8)
    config = MaskingConfig()
    first = _mask(ids, maskable, config, seeds=range(100, 108))
    again = _mask(ids, maskable, config, seeds=range(100, 108))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # Row 3 masked alone (as on another process) equals row 3 masked within the batch.
    alone = _mask(ids[3:4], maskable[3:4], config, seeds=[103])
    assert torch.equal(alone[0][0], first[0][3]) and torch.equal(alone[1][0], first[1][3])
    other = _mask(ids, maskable, config, seeds=range(200, 208))
    assert not torch.equal(other[1], first[1])  # a new epoch (new seeds) masks anew


@pytest.mark.parametrize("kind, vocab_size", [("wordpiece", 300), ("unigram", 300), ("bpe", 400)])
def test_whole_word_masking_masks_all_pieces_of_a_word(tmp_path, kind, vocab_size):
    tokenizer = train_tokenizer(TEXT, TokenizerConfig(kind=kind, vocab_size=vocab_size, min_frequency=1),
                                tmp_path / kind)
    starts_table = word_start_table(tokenizer)
    unseen = ["the philosophers reconsidering internationalized riverbanks", "foxes underestimated tokenization",
              "a lazy longwinded localizer jumps", "subwords split everything uncommonly"]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in unseen]
    length = max(map(len, encoded))
    ids = torch.tensor([e + [tokenizer.convert_tokens_to_ids(tokenizer.all_special_tokens[0])] * (length - len(e))
                        for e in encoded])
    maskable = torch.tensor([[i < len(e) for i in range(length)] for e in encoded])
    word_starts = starts_table[ids]
    # The tokenizer really splits some words, or this test would prove nothing.
    assert (~word_starts & maskable).any(), f"{kind}: no multi-piece word in the sample"
    config = MaskingConfig(mlm_probability=0.3, whole_word=True)
    for seed in range(20):
        _, labels = mask_tokens(ids, maskable, [torch.Generator().manual_seed(seed + r) for r in range(4)],
                                mask_token_id=tokenizer.mask_token_id if tokenizer.mask_token_id is not None else 0,
                                random_token_ids=torch.arange(10, len(tokenizer)), config=config,
                                word_starts=word_starts)
        chosen = labels != IGNORE_INDEX
        for row in range(len(ids)):
            n = int(maskable[row].sum())
            word_of = torch.cumsum(word_starts[row, :n].long(), 0)
            for word in word_of.unique():
                pieces = chosen[row, :n][word_of == word]
                assert pieces.all() or not pieces.any(), f"{kind}: word split by the mask"
            # within budget, except that one word is always taken even if longer than the budget
            assert chosen[row].sum() <= max(round(0.3 * n), int(torch.bincount(word_of).max()))


def test_word_start_tables_follow_each_scheme(tmp_path):
    wordpiece = train_tokenizer(TEXT, TokenizerConfig(kind="wordpiece", vocab_size=300, min_frequency=1), tmp_path / "w")
    table = word_start_table(wordpiece)
    vocab = wordpiece.get_vocab()
    assert all(table[i] == (not t.startswith("##")) for t, i in vocab.items())
    unigram = train_tokenizer(TEXT, TokenizerConfig(kind="unigram", vocab_size=300), tmp_path / "u")
    table = word_start_table(unigram)
    assert all(table[i] == (t.startswith("▁") or t in unigram.all_special_tokens) for t, i in unigram.get_vocab().items())


def test_bad_masking_config_is_refused():
    with pytest.raises(ValueError, match="mlm_probability"):
        MaskingConfig(mlm_probability=1.5)
    with pytest.raises(ValueError, match="must be <= 1"):
        MaskingConfig(mask_replace_prob=0.9, random_replace_prob=0.2)
    ids, maskable = _batch(batch=2)
    with pytest.raises(ValueError, match="word_starts"):
        _mask(ids, maskable, MaskingConfig(whole_word=True))


def test_whole_word_budget_skips_a_word_that_overflows_and_keeps_filling():
    from textssl.masking import take_words

    # Budget 4: word 0 (2 pieces) fits, word 1 (3 pieces) would overflow and is skipped, word 2 (2) fills it.
    assert take_words([0, 1, 2, 3], [2, 3, 2, 1], budget=4) == [0, 2]
    # The first word is taken even when it alone exceeds the budget (at least one prediction).
    assert take_words([1, 0], [2, 5], budget=3) == [1]


def test_whole_word_masking_fills_the_budget_with_long_words_around():
    # Rows of alternating 3-piece and 1-piece words: stopping at the first overflow would leave the
    # budget short whenever a 3-piece word comes up early; skipping it keeps filling to the exact budget.
    length = 40
    starts = torch.zeros(1, length, dtype=torch.bool)
    position = 0
    while position < length:
        starts[0, position] = True
        position += 3 if (position // 4) % 2 == 0 else 1
    ids = torch.arange(5, 5 + length).unsqueeze(0)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    budget = round(0.15 * length)
    exact = 0
    for seed in range(30):
        _, labels = mask_tokens(ids, maskable, [torch.Generator().manual_seed(seed)], mask_token_id=1,
                                random_token_ids=torch.arange(5, 50), config=MaskingConfig(whole_word=True),
                                word_starts=starts)
        masked = int((labels != IGNORE_INDEX).sum())
        assert masked <= budget
        exact += masked == budget
    assert exact == 30
