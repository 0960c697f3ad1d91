"""Batches from the caches, in a seeded order that a resumed run can re-enter at any position.

Each dataset's items appear `num_repeats` times per epoch; items are grouped by (dataset, latent shape,
control latent shapes), so a batch only ever holds same-size tensors, and the epoch's order comes from
`buckets.epoch_batches(seed, epoch)`. Caption dropout (the empty caption's embedding) and the choice among
shuffled-caption variants draw from the run's generator.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

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
