"""Dynamic masking for masked-LM objectives (BERT, ALBERT), as a pure function of its inputs.

As in BERT's `create_pretraining_data`: a fixed budget of round(p x maskable tokens) per
sequence (not a coin flip per token, so the rate is exact, not just right on average); of the
chosen positions 80% become [MASK], 10% a random token, 10% stay. With `whole_word`, words are
picked in random order until the budget is reached (a word that would overflow it is skipped, and
filling goes on) and all pieces of a picked word are masked together. Special tokens ([CLS], [SEP], [PAD]) are never chosen. Labels are -100 elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslcore.config import ConfigError

IGNORE_INDEX = -100


@dataclass
class MaskingConfig:
    """Which tokens the masked-LM objective hides and how."""

    mlm_probability: float = 0.15
    """Fraction of maskable tokens chosen for prediction in each sequence."""
    mask_replace_prob: float = 0.8
    """Of the chosen tokens, the fraction replaced by [MASK]."""
    random_replace_prob: float = 0.1
    """Of the chosen tokens, the fraction replaced by a random token (the rest stay unchanged)."""
    whole_word: bool = False
    """Mask all pieces of a word together (WordPiece "##", SentencePiece "▁" and byte-level "Ġ")."""

    def __post_init__(self) -> None:
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"masking.mlm_probability must be in (0, 1), got {self.mlm_probability} "
                              "(0.15 as in BERT; 0.3-0.4 for small models)")
        for name in ("mask_replace_prob", "random_replace_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"masking.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mask_replace_prob + self.random_replace_prob > 1.0:
            raise ConfigError(f"masking.mask_replace_prob + masking.random_replace_prob must be <= 1, got "
                              f"{self.mask_replace_prob} + {self.random_replace_prob} (BERT: 0.8 + 0.1)")


def take_words(order: list[int], sizes: list[int], budget: int) -> list[int]:
    """Words taken in `order` as BERT's create_masked_lm_predictions does: a word that would overflow
    the budget is skipped and filling goes on with the next; the first word is always taken."""
    taken, used = [], 0
    for word in order:
        if used >= budget:
            break
        if taken and used + sizes[word] > budget:
            continue
        taken.append(word)
        used += sizes[word]
    return taken


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    generators: list[torch.Generator],
    *,
    mask_token_id: int,
    random_token_ids: torch.Tensor,
    config: MaskingConfig,
    word_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(masked_input_ids, labels)` for a `[batch, length]` batch.

    maskable: bool `[batch, length]`, False at special tokens and padding.
    generators: one per row, so each row's mask depends only on its own seed.
    random_token_ids: ids the 10% random replacements are drawn from (no specials).
    word_starts: bool `[batch, length]`, True where a token begins a word; needed for whole_word.
    """
    if config.whole_word and word_starts is None:
        raise ValueError("whole-word masking needs word_starts (see textssl.tokenizer.word_start_table)")
    chosen = torch.zeros_like(maskable)
    for row, gen in enumerate(generators):
        positions = maskable[row].nonzero().squeeze(1)
        if positions.numel() == 0:
            continue
        budget = max(1, round(config.mlm_probability * positions.numel()))
        if not config.whole_word:
            pick = positions[torch.randperm(positions.numel(), generator=gen)[:budget]]
            chosen[row, pick] = True
            continue
        # Word id of every maskable position: a new word begins at each word start.
        starts = word_starts[row, positions].clone()
        starts[0] = True
        word_of = torch.cumsum(starts.long(), 0) - 1
        sizes = torch.bincount(word_of)
        order = torch.randperm(sizes.numel(), generator=gen).tolist()
        chosen_words = torch.zeros(sizes.numel(), dtype=torch.bool)
        chosen_words[take_words(order, sizes.tolist(), budget)] = True
        chosen[row, positions[chosen_words[word_of]]] = True

    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    # One uniform draw per position decides [MASK] / random / keep; rows use their own streams.
    u = torch.stack([torch.rand(input_ids.shape[1], generator=g) for g in generators])
    random_pick = torch.stack([torch.randint(len(random_token_ids), (input_ids.shape[1],), generator=g)
                               for g in generators])
    to_mask = chosen & (u < config.mask_replace_prob)
    to_random = chosen & (u >= config.mask_replace_prob) & (u < config.mask_replace_prob + config.random_replace_prob)
    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = random_token_ids[random_pick[to_random]]
    return masked, labels
