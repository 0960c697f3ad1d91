"""Memory measures for training, applied to a loaded DiT from outside (dit.py stays as it is).

- Gradient checkpointing per block: each double / single block's forward runs under
  `torch.utils.checkpoint` (non-reentrant), so only block inputs are kept and activations are recomputed in
  the backward pass.
- Activation offload: tensors autograd saves for the backward pass (with checkpointing: the block inputs)
  live in CPU memory (pinned on CUDA) until the backward pass needs them (`torch.autograd.graph.save_on_cpu`).
- Block swap (`blocks_to_swap`): the frozen base's blocks stream between CPU and GPU with backward support.
  That machinery belongs to `flux2_core.memory.streaming` (the speed-and-memory work); this module only calls
  its hook and says clearly when it is not available, rather than keeping a second implementation.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import Flux2Error


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def enable_gradient_checkpointing(dit: nn.Module) -> int:
    """Wrap every double and single block's forward; returns how many."""
    blocks = [*dit.double_blocks, *dit.single_blocks]
    for block in blocks:
        if not getattr(block, "_flux2_checkpointed", False):
            block.forward = _checkpointed(block.forward)
            block._flux2_checkpointed = True
    return len(blocks)


def activation_offload(enabled: bool, device: torch.device):
    """The context the forward pass runs in: saved activations on the CPU when `enabled`."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def enable_block_swap(dit: nn.Module, blocks: int, device: torch.device) -> object:
    """Stream `blocks` of the frozen base from CPU memory (forward and backward) through
    `flux2_core.memory.streaming.enable_training_block_swap(dit, blocks, device)`."""
    try:
        streaming = importlib.import_module("flux2_core.memory.streaming")
        hook = streaming.enable_training_block_swap
    except (ImportError, AttributeError):
        raise Flux2Error(f"blocks_to_swap {blocks}: block streaming with backward comes from "
                         "flux2_core.memory.streaming.enable_training_block_swap, which this build does not have; "
                         "use blocks_to_swap = 0 (with fp8_base and gradient_checkpointing to save memory)") from None
    if device.type != "cuda":
        raise Flux2Error(f"blocks_to_swap {blocks}: block swapping moves blocks to a GPU; the device is {device}")
    return hook(dit, blocks, device)
