"""Training on an fp8 frozen base (musubi-tuner's `--fp8_base`, and `--fp8_scaled` as per-row scales): the DiT's
block linears are stored as `Fp8Linear` (fp8 weight + fp32 scale, dequantized per call to the compute dtype)
while the adapters stay fp32 (`adapters.AdapterSet`). Gradients flow through the dequantized weight, so the
adapters' gradients differ from a bf16/fp32 base's only by the base's rounding (tests/test_train_fp8.py bounds it).

fp8_scale "tensor": one absmax scale per weight (what `load_dit(weight_dtype="fp8_e4m3fn")` does);
"row": one per output row, which keeps rows of small weights precise. A file that is already fp8 keeps its own
layout and scales.

fp8_matmul (no musubi-tuner name): the fp8 layers multiply on fp8 tensor cores (`memory.fp8_matmul`) in the
forward and in the input-gradient matmul of the backward, with activations and gradients quantized per call;
where the device has none (CPU, GPUs below compute capability 8.9) the run says so and dequantizes as before.
It is off by default because the activations' and gradients' own e4m3 rounding adds to the base's (the LoRA
gradient's error against an fp32 base grows from ~4.5 % to ~6.5 % on the test model, tests/test_train_fp8.py);
the adapters stay fp32 either way.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..checkpoints.loaders import load_dit
from ..checkpoints.quant import quantize_linear_weights
from ..errors import Flux2Error
from ..memory.fp8_matmul import fp8_matmul_supported, set_fp8_matmul
from .config import TrainConfig
from .memory_plan import check_memory_plan

FP8_SCALES = ("tensor", "row")


def load_training_dit(config: TrainConfig, device: torch.device, dtype: torch.dtype,
                      log_stream=sys.stderr, load_to: torch.device | None = None, shards: int = 1) -> nn.Module:
    """The DiT a run trains on: as stored, or with an fp8 base scaled per tensor or per row; the memory plan for
    `device` is printed (and checked on CUDA) first. `load_to`: where the weights go (default `device`; the
    trainer loads to the CPU when blocks swap and then moves all but the swapped weights). `shards`: processes
    the run will shard the DiT over (FSDP; the plan is per process)."""
    if config.fp8_scale not in FP8_SCALES:
        raise Flux2Error(f"train config fp8_scale: expected one of {FP8_SCALES}, found {config.fp8_scale!r}")
    check_memory_plan(config, device, log_stream, shards=shards)  # before anything large is loaded
    dit = _load(config, device if load_to is None else load_to, dtype)
    if config.fp8_matmul:
        enable_fp8_matmul(dit, device, log_stream)
    return dit


def _load(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    if not config.fp8_base:
        return load_dit(config.dit, device=device, dtype=dtype, variant=config.variant)
    if config.fp8_scale == "tensor":
        return load_dit(config.dit, device=device, dtype=dtype, weight_dtype="fp8_e4m3fn", variant=config.variant)
    dit = load_dit(config.dit, device=device, dtype=dtype, variant=config.variant)  # an fp8 file stays fp8
    quantize_linear_weights(dit, "fp8_e4m3fn", per_channel=True)
    return dit


def enable_fp8_matmul(dit: nn.Module, device: torch.device, log_stream=sys.stderr) -> int:
    """`fp8_matmul = true`: switch the DiT's fp8 layers to scaled fp8 matmuls when `device` (the compute device)
    has fp8 tensor cores; otherwise say why the fp8 base is dequantized instead. Returns the layers switched."""
    if not fp8_matmul_supported(device):
        print(f"fp8_matmul: {device} has no fp8 tensor cores (CUDA compute capability >= 8.9 needed); the fp8 "
              f"layers are dequantized per call instead", file=log_stream)
        return 0
    count = set_fp8_matmul(dit, True)
    if count:
        print(f"fp8_matmul: {count} fp8 layers multiply in fp8 on {device} (forward and input gradient, "
              f"activations and gradients quantized per call)", file=log_stream)
    else:
        print("fp8_matmul: the DiT has no fp8 layers (set fp8_base = true); nothing to switch", file=log_stream)
    return count
