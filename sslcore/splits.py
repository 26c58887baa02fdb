"""Reproducible, order-free dataset splits shared by every modality's task registry.

A split is a pure function of the examples' keys, their strata and a seed (a hash per key, not a
library's RNG), so it is the same on any machine, and adding examples does not move the others.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import datasets


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


def split_digest(dataset: datasets.Dataset, column: str = "id") -> str:
    """Short hash of a split's example ids (order-free): equal digests = the same split."""
    return hashlib.sha256("\n".join(sorted(map(str, dataset[column]))).encode()).hexdigest()[:16]


__all__ = ["split_digest", "stratified_split"]
