"""Batches from the caches, in a seeded order that a resumed run can re-enter at any position.

The run's order is global: micro-batch g (counted from the run's start over every process) is batch
g mod E of epoch g div E (E batches per epoch) and draws its caption choice, caption dropout, noise and
sigmas from its own generator, seeded by (seed, g). `micro_batch_loader` yields micro-batches g = start,
start + 1, ... as a torch DataLoader; several processes shard that one loader (accelerate gives process r the
micro-batches g with g mod N = r), so N processes with accumulation A draw exactly what one process with
accumulation N * A draws, and a state saved after any number of micro-batches resumes on any process count.

Each dataset's items appear `num_repeats` times per epoch; items are grouped by (dataset, latent shape,
control latent shapes), so a batch only ever holds same-size tensors, and the epoch's order comes from
`buckets.epoch_batches(seed, epoch)`. Caption dropout (the empty caption's embedding) and the choice among
shuffled-caption variants draw from the run's generator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

from .buckets import epoch_batches
from .cache import CachedItem, read_cache
from .datasets import DatasetSpec
from .objective import Batch


def _latent_shapes(path: Path) -> tuple[tuple[int, ...], ...]:
    with safe_open(str(path), "pt") as handle:
        keys = ["latent"] + sorted((k for k in handle.keys() if k.startswith("control_")), key=lambda k: int(k[8:]))
        return tuple(tuple(handle.get_slice(k).get_shape()) for k in keys)


class CachedData:
    def __init__(self, items: list[CachedItem], specs: list[DatasetSpec], seed: int, caption_dropout_rate: float,
                 empty_caption_file: Path):
        self.seed = seed
        self.caption_dropout_rate = caption_dropout_rate
        self.empty_caption_file = empty_caption_file
        self.entries = [item for item in items for _ in range(specs[item.dataset].num_repeats)]
        self.keys = [(item.dataset, _latent_shapes(item.latent_file)) for item in self.entries]
        self.batch_sizes = [specs[item.dataset].batch_size for item in self.entries]

    def epoch(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.keys, self.batch_sizes, self.seed, epoch)

    def load(self, indices: list[int], generator: torch.Generator) -> Batch:
        latents, contexts, controls = [], [], []
        for index in indices:
            entry = self.entries[index]
            cached = read_cache(entry.latent_file)
            latents.append(cached["latent"])
            controls.append([cached[f"control_{i}"] for i in range(len(entry.item.controls))])
            choice = int(torch.randint(0, len(entry.text_files), (1,), generator=generator))
            text = entry.text_files[choice]
            if self.caption_dropout_rate and float(torch.rand(1, generator=generator)) < self.caption_dropout_rate:
                text = self.empty_caption_file
            contexts.append(read_cache(text)["context"])
        return Batch(torch.cat(latents), torch.cat(contexts), [torch.cat(parts) for parts in zip(*controls)])


def micro_batch_seed(seed: int, index: int) -> int:
    """The seed of global micro-batch `index` (its generator, and the global RNG adapter dropout draws from)."""
    return (seed * 1_000_003 + index) % 2**63


class RunOrder:
    """Micro-batches start .. start + count - 1 of the run, each as a list of (micro-batch index, item) keys
    (a batch sampler: accelerate shards it per process)."""

    def __init__(self, data, start: int, count: int):
        self.data, self.start, self.count = data, start, count
        self.per_epoch = len(data.epoch(0))  # every epoch has as many batches (the buckets are fixed)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batches = -1, []
        for index in range(self.start, self.start + self.count):
            if index // self.per_epoch != epoch:
                epoch = index // self.per_epoch
                batches = self.data.epoch(epoch)
            yield [(index, item) for item in batches[index % self.per_epoch]]


class _Keys(Dataset):
    """The DataLoader's dataset: a key is its own item; loading happens per micro-batch in `_load`."""

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
        return key


class _Load:
    def __init__(self, data, seed: int):
        self.data, self.seed = data, seed

    def __call__(self, keys: list[tuple[int, int]]) -> tuple[int, Batch, torch.Generator]:
        index = keys[0][0]
        generator = torch.Generator().manual_seed(micro_batch_seed(self.seed, index))
        return index, self.data.load([item for _, item in keys], generator), generator


def micro_batch_loader(data, seed: int, start: int, count: int) -> DataLoader:
    """Yields (micro-batch index, Batch, its generator) for micro-batches start .. start + count - 1; `data` is
    a `CachedData` or anything with its `epoch` / `load`."""
    return DataLoader(_Keys(), batch_sampler=RunOrder(data, start, count), collate_fn=_Load(data, seed))
