"""Training LoRA / LoKr / LoHa adapters for FLUX.2 DiTs (musubi-tuner's options, DiffSynth's data formats).

- `config`: `TrainConfig` (every option, TOML, musubi names), `defaults_for(variant)`.
- `datasets` / `buckets`: data sources -> items; aspect buckets and seeded batch order.
- `cache`: latent and text-embedding caches keyed by content hashes.
- `dataloader`: batches from the caches.
- `timesteps` / `objective`: noise levels, loss weights and the flow-matching loss.
- `adapters`: peft adapters on BFL-named linears and their export as a `Flux2LoRA`.
- `optimizers`, `memory`, `checkpointing`, `samples`.
- `trainer`: `Trainer` (step callback, cancel flag) and `train(config)`.

Names are resolved on first use, so building the `flux2` command line does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "flux2_core.train.config",
    "defaults_for": "flux2_core.train.config",
    "load_config": "flux2_core.train.config",
    "StepInfo": "flux2_core.train.trainer",
    "Trainer": "flux2_core.train.trainer",
    "train": "flux2_core.train.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flux2_core.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
