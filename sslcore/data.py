"""Data order for exact resume: a seeded per-epoch permutation and per-example seeds.

Every example reaches the collator with an integer seed made from (run seed, epoch, example
index). Objectives draw their randomness (masks, negatives, crops) from it, so a batch is the
same whether it is built on 1 process or N, in a fresh run or after a resume — no RNG state
has to be carried, and skipping to a position needs no replay of earlier batches.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, Sampler

_MASK64 = (1 << 63) - 1


def example_seed(run_seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one example in one epoch (splitmix64 finaliser)."""
    z = (run_seed * 0x9E3779B97F4A7C15 + (epoch + 1) * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (
        (1 << 64) - 1
    )
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK64


def generator_for(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class EpochSampler(Sampler):
    """Yields `(epoch, index)` keys: a fresh seeded permutation each epoch (or in order)."""

    def __init__(self, length: int, seed: int, shuffle: bool = True):
        self.length, self.seed, self.shuffle, self.epoch = length, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=generator_for(example_seed(self.seed, self.epoch, -1)))
            order = order.tolist()
        else:
            order = range(self.length)
        return ((self.epoch, i) for i in order)


class SeededDataset(Dataset):
    """Wraps a map-style dataset so `ds[(epoch, i)]` returns `(row i, its example seed)`."""

    def __init__(self, dataset: Any, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[dict[str, Any], int]:
        epoch, index = key
        return self.dataset[index], example_seed(self.seed, epoch, index)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[tuple[dict[str, Any], int]]:
        # One Arrow read for the whole batch instead of one per row (datasets.Dataset supports it).
        indices = [index for _, index in keys]
        getitems = getattr(self.dataset, "__getitems__", None)
        rows = getitems(indices) if getitems else [self.dataset[i] for i in indices]
        return [(row, example_seed(self.seed, epoch, index)) for row, (epoch, index) in zip(rows, keys)]


class SeededCollator:
    """Splits `(row, seed)` pairs and calls `collate(rows, seeds)`; picklable for workers."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items: list[tuple[dict[str, Any], int]]) -> dict[str, torch.Tensor]:
        rows, seeds = zip(*items)
        return self.collate(list(rows), list(seeds))


class SeededIterable(IterableDataset):
    """Streams `(row, example seed)` from one process's shard of a `datasets.IterableDataset`.

    Keeps the exact position (examples yielded this epoch) and the dataset's own `state_dict`,
    so a resume continues at the next example without reading the skipped ones again.
    (Exact as long as the stream has no shuffle buffer: datasets does not checkpoint buffers.)
    """

    def __init__(self, dataset: Any, seed: int, rank: int):
        self.dataset, self.seed, self.rank = dataset, seed, rank
        self.epoch, self.position = 0, 0
        self._resume_from: dict | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position, self._resume_from = epoch, 0, None
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[dict[str, Any], int]]:
        source = self.dataset
        if self._resume_from is not None:
            # Resume on a copy: a loaded state would otherwise apply to every later epoch too.
            source = copy.deepcopy(self.dataset)
            source.load_state_dict(self._resume_from)
            self._resume_from = None
        self._live = source
        for row in source:
            index = (self.rank << 40) | self.position  # distinct per rank, so seeds never collide
            self.position += 1
            yield row, example_seed(self.seed, self.epoch, index)

    def state_dict(self) -> dict[str, Any]:
        live = getattr(self, "_live", self.dataset)
        return {"epoch": self.epoch, "position": self.position, "dataset": live.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self._resume_from = state["epoch"], state["position"], state["dataset"]


class BatchPlan:
    """The micro-batches of one epoch as lists of dataset indices: a pure function of (seed, epoch),
    the same on every process. The trainer deals them out (process p takes p, p+N, ...) and
    resumes at (epoch, micro-batch) with no replay. Subclass for length buckets and the like."""

    def batches(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError


class ShuffledBatches(BatchPlan):
    """A seeded permutation per epoch (or the natural order), cut into `batch_size` rows."""

    def __init__(self, length: int, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True):
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last

    def batches(self, epoch: int) -> list[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=generator_for(example_seed(self.seed, epoch, -1))).tolist()
        else:
            order = list(range(self.length))
        end = self.length - self.length % self.batch_size if self.drop_last else self.length
        return [order[i: i + self.batch_size] for i in range(0, end, self.batch_size)]


class LengthGroupedBatches(BatchPlan):
    """Batches of examples of similar length, so little of a batch is padding (audio, text).

    Each epoch: a seeded shuffle, cut into groups of `group_batches` batches' worth of examples;
    each group sorted by length and cut into batches; then the batches shuffled. With
    `max_units`, a batch holds as many examples as fit in `max_units` padded units (samples,
    tokens: fairseq's max_tokens), at most `batch_size`; otherwise exactly `batch_size`.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, max_units: int | None = None,
                 group_batches: int = 50, shuffle: bool = True):
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.batch_size, self.seed, self.max_units = batch_size, seed, max_units
        self.group_batches, self.shuffle = group_batches, shuffle
        if max_units is not None and int(self.lengths.max()) > max_units:
            raise ValueError(f"an example of length {int(self.lengths.max())} exceeds max_units={max_units}; "
                             "raise it or drop long examples")

    def _cut(self, indices: list[int]) -> list[list[int]]:
        if self.max_units is None:
            end = len(indices) - len(indices) % self.batch_size
            return [indices[i: i + self.batch_size] for i in range(0, end, self.batch_size)]
        batches, current, longest = [], [], 0
        for index in indices:
            length = int(self.lengths[index])
            if current and (max(longest, length) * (len(current) + 1) > self.max_units
                            or len(current) == self.batch_size):
                batches.append(current)
                current, longest = [], 0
            current.append(index)
            longest = max(longest, length)
        if current:
            batches.append(current)
        return batches

    def batches(self, epoch: int) -> list[list[int]]:
        generator = generator_for(example_seed(self.seed, epoch, -2))
        n = len(self.lengths)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        group = self.group_batches * self.batch_size
        batches: list[list[int]] = []
        for start in range(0, n, group):
            members = order[start: start + group]
            by_length = members[torch.argsort(self.lengths[members], descending=True, stable=True)]
            batches.extend(self._cut(by_length.tolist()))
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches


class ProcessBatches(Sampler):
    """This process's share of a `BatchPlan`, as a batch sampler of `(epoch, index)` keys.

    Process p takes micro-batches p, p+N, p+2N... of the epoch, only from whole optimizer steps
    (N processes x `accumulation` micro-batches): every process runs the same number of steps,
    collectives never hang, and 1 process accumulating N micro-batches sees the same steps as N
    processes (a short last window would differ). `start` skips this many of its own
    micro-batches (resume, without reading them). `limit` caps its micro-batches (eval_batches
    counted globally: limit = cap // N).
    """

    def __init__(self, plan: BatchPlan, rank: int, world: int, limit: int | None = None, accumulation: int = 1):
        self.plan, self.rank, self.world, self.limit = plan, rank, world, limit
        self.accumulation = accumulation
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _mine(self) -> list[list[int]]:
        batches = self.plan.batches(self.epoch)
        steps = len(batches) // (self.world * self.accumulation)
        mine = batches[self.rank: steps * self.world * self.accumulation: self.world]
        return mine[: self.limit] if self.limit is not None else mine

    def __len__(self) -> int:
        return len(self._mine())

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self._mine()[self.start:]:
            yield [(self.epoch, index) for index in batch]


class _Failed:
    """What the read-ahead thread hands over when reading raised."""

    def __init__(self, error: BaseException):
        self.error = error


def read_ahead(batches: Iterable, depth: int = 2) -> Iterator:
    """`batches` in order, read up to `depth` ahead by a thread of this process (a DataLoader with no workers
    builds a batch only when asked: here the next one is built while the caller trains on this one). An error
    while reading is raised here, at the batch it stopped; closing the iterator stops the thread."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for batch in batches:
                if not hand_over(batch):
                    return
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            hand_over(_Failed(error))
            return
        hand_over(end)

    reader = threading.Thread(target=read, name="read-ahead", daemon=True)
    reader.start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        reader.join()
