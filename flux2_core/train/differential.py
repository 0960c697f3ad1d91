"""Differential LoRA (DiffSynth-Studio's recipe): a preset LoRA is merged into the frozen base before training,
so the new adapter learns only what the preset does not already give; the saved file holds the new adapter alone
(its `flux2_training_settings` metadata names the preset and strength it must be applied with).

The pairs recipe: train LoRA-1 to overfit image set A, then train LoRA-2 on set B with LoRA-1 as the preset;
at inference LoRA-1 + LoRA-2 together reproduce B while LoRA-2 alone carries the difference (B - A). The merge
is `flux2_core.lora.merge_loras` (fp8 base weights are re-quantized), without a kept original: the base is
never unmerged during training.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import Flux2Error
from ..lora import merge_loras
from .config import TrainConfig


def merge_preset_lora(dit: nn.Module, config: TrainConfig) -> int:
    """Merge `config.preset_lora` at `config.preset_lora_strength` into `dit`; returns the layers changed
    (0 when no preset is set)."""
    if not config.preset_lora:
        return 0
    if not Path(config.preset_lora).is_file():
        raise Flux2Error(f"train config preset_lora: expected a LoRA file, found no file at {config.preset_lora}")
    merged = merge_loras(dit, [(config.preset_lora, config.preset_lora_strength)], keep_original=False)
    return merged.layers

