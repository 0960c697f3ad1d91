"""Training on an fp8 frozen base (musubi-tuner's `--fp8_base`, and `--fp8_scaled` as per-row scales): the DiT's
block linears are stored as `Fp8Linear` (fp8 weight + fp32 scale, dequantized per call to the compute dtype)
while the adapters stay fp32 (`adapters.AdapterSet`). Gradients flow through the dequantized weight, so the
adapters' gradients differ from a bf16/fp32 base's only by the base's rounding (tests/test_train_fp8.py bounds it).

fp8_scale "tensor": one absmax scale per weight (what `load_dit(weight_dtype="fp8_e4m3fn")` does);
"row": one per output row, which keeps rows of small weights precise. A file that is already fp8 keeps its own
layout and scales.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..checkpoints.loaders import load_dit
from ..checkpoints.quant import quantize_linear_weights
from ..errors import Flux2Error
from .config import TrainConfig
from .memory_plan import check_memory_plan

FP8_SCALES = ("tensor", "row")


def load_training_dit(config: TrainConfig, device: torch.device, dtype: torch.dtype,
                      log_stream=sys.stderr, load_to: torch.device | None = None) -> nn.Module:
    """The DiT a run trains on: as stored, or with an fp8 base scaled per tensor or per row; the memory plan for
    `device` is printed (and checked on CUDA) first. `load_to`: where the weights go (default `device`; the
    trainer loads to the CPU when blocks swap and then moves all but the swapped weights)."""
    if config.fp8_scale not in FP8_SCALES:
        raise Flux2Error(f"train config fp8_scale: expected one of {FP8_SCALES}, found {config.fp8_scale!r}")
    check_memory_plan(config, device, log_stream)  # before anything large is loaded
    device = device if load_to is None else load_to
    if not config.fp8_base:
        return load_dit(config.dit, device=device, dtype=dtype, variant=config.variant)
    if config.fp8_scale == "tensor":
        return load_dit(config.dit, device=device, dtype=dtype, weight_dtype="fp8_e4m3fn", variant=config.variant)
    dit = load_dit(config.dit, device=device, dtype=dtype, variant=config.variant)  # an fp8 file stays fp8
    quantize_linear_weights(dit, "fp8_e4m3fn", per_channel=True)
    return dit
