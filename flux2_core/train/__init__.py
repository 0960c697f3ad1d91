"""Training LoRA / LoKr / LoHa adapters for FLUX.2 DiTs (musubi-tuner's options, DiffSynth's data formats).

- `config`: `TrainConfig` (every option, TOML, musubi names), `defaults_for(variant)`.
- `datasets` / `buckets`: data sources -> items; aspect buckets and seeded batch order.
- `cache`: latent and text-embedding caches keyed by content hashes.
- `dataloader`: batches from the caches.
- `timesteps` / `objective`: noise levels, loss weights and the flow-matching loss.
- `adapters`: peft adapters on BFL-named linears and their export as a `Flux2LoRA`.
- `optimizers`, `memory`, `checkpointing`, `samples`.
- `trainer`: `Trainer` (step callback, cancel flag) and `train(config)`.
"""

from .config import TrainConfig, defaults_for, load_config
from .trainer import StepInfo, Trainer, train

__all__ = ["StepInfo", "TrainConfig", "Trainer", "defaults_for", "load_config", "train"]
