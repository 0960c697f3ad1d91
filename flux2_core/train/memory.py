"""Memory measures for training, applied to a loaded DiT from outside (dit.py stays as it is).

- Gradient checkpointing per block: each double / single block's forward runs under
  `torch.utils.checkpoint` (non-reentrant), so only block inputs are kept and activations are recomputed in
  the backward pass.
- Activation offload: tensors autograd saves for the backward pass (with checkpointing: the block inputs)
  live in CPU memory (pinned on CUDA) until the backward pass needs them (`torch.autograd.graph.save_on_cpu`).
- Block swap (`blocks_to_swap`): the frozen weights of the DiT's last blocks stay in (pinned) CPU memory and
  are brought to the device for each forward and each checkpointing recompute, by the engine's block streaming
  (`memory.streaming.enable_training_block_swap`); this module turns its refusals into training errors.
  The trainer reads the DiT into CPU memory and sets the swap up there, so swapped weights never reach the device
  whole; `swapped_weights_fit` says whether the start-up self-check may bring them in for its reference step.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import Flux2Error
from ..memory.streaming import BlockStreamer, enable_training_block_swap


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


def enable_block_swap(dit: nn.Module, blocks: int, device: torch.device) -> BlockStreamer:
    """Stream the frozen weights of the DiT's last `blocks` blocks (musubi's count: a double block is one, a
    single block half of one) from CPU memory to `device`, forward and backward."""
    try:
        return enable_training_block_swap(dit, blocks, device)
    except ValueError as error:
        raise Flux2Error(f"train config {error}") from None


SELF_CHECK_ROOM = 0.25  # of the device's memory, kept free for the reference step's activations


def swapped_weights_fit(streamed_bytes: int, device: torch.device) -> bool:
    """Whether the swapped weights fit on `device` beside what is there, with a quarter of its memory to spare for
    one step's activations (always on the CPU, where the swapped weights are in the same memory already)."""
    if device.type != "cuda":
        return True
    free, total = torch.cuda.mem_get_info(device)
    return streamed_bytes + SELF_CHECK_ROOM * total <= free
