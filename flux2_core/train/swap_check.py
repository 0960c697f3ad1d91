"""The start-up self-check that block swap does not change the LoRA's gradients.

Peers have shipped silent gradient corruption where offloading meets gradient checkpointing: the backward
recompute of a block runs with weights that are not the ones its forward used (a reused buffer, a prefetch
into the wrong slot, a tensor released in place while autograd still holds it). `check_block_swap` runs one
forward + backward without swapping and one with the engine's streaming
(`memory.streaming.enable_training_block_swap`) on the same inputs and refuses to train when the adapter
gradients differ.

`inject_wrong_block_fault` exists for the self-check's own test: it makes every reload of a streamed module
(the checkpointing recompute) take the weights of the same module in another swapped block, the wrong-slot bug
described above.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ..errors import Flux2Error
from ..memory.streaming import BlockStreamer


def _gradients(params: list[nn.Parameter], loss_fn: Callable[[], Tensor]) -> list[Tensor]:
    for param in params:
        param.grad = None
    loss_fn().backward()
    gradients = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
    for param in params:
        param.grad = None
    return gradients


def check_block_swap(params: Iterable[nn.Parameter], loss_fn: Callable[[], Tensor],
                     enable_swap: Callable[[], BlockStreamer], tolerance: float = 1e-5,
                     detach_on_failure: bool = True) -> tuple[BlockStreamer, float]:
    """One step as the model is now (the reference: normally without swapping), then `enable_swap()` and the same
    step with it; returns the streamer (swapping stays on) and the largest relative gradient difference. Raises
    when the difference exceeds `tolerance` or the swapped step fails, with swapping taken out again when
    `detach_on_failure` (False where the whole model does not fit the device).

    `loss_fn` must be deterministic (fixed inputs, no dropout): both steps must compute the same thing."""
    params = list(params)
    reference = _gradients(params, loss_fn)
    streamer = enable_swap()
    try:
        swapped = _gradients(params, loss_fn)
    except RuntimeError as error:
        if detach_on_failure:
            streamer.detach()
        raise Flux2Error(f"block swap self-check: the step with swapping failed ({error}); train without "
                         f"blocks_to_swap") from None
    streamer.release_all()  # a recompute that stopped early leaves one module loaded
    scale = max(float(torch.cat([g.flatten() for g in reference]).abs().max()), 1e-12)
    worst = max(float((a - b).abs().max()) for a, b in zip(reference, swapped)) / scale
    if worst > tolerance:
        if detach_on_failure:
            streamer.detach()
        raise Flux2Error(f"block swap self-check: the LoRA gradients with swapping differ from those without by "
                         f"{worst:.3g} (relative, allowed {tolerance:g}); swapping would corrupt training, so it "
                         f"stops here: train without blocks_to_swap")
    return streamer, worst


def inject_wrong_block_fault(streamer: BlockStreamer) -> None:
    """Make `streamer` load, on every second and later load of a module, the tensors of the next streamed module
    with the same names and shapes (the same layer of another block). For tests: the streamer stays faulty, so
    the model's weights are wrong from then on."""
    fetch = streamer._fetch
    loads: dict[int, int] = {}
    count = len(streamer.blocks)

    def signature(tensors: dict[str, Tensor]) -> list[tuple[str, tuple[int, ...]]]:
        return sorted((name, tuple(t.shape)) for name, t in tensors.items())

    def faulty(index: int) -> dict[str, Tensor]:
        loads[index] = loads.get(index, 0) + 1
        right = fetch(index)
        if loads[index] == 1:
            return right
        for step in range(1, count):
            other = fetch((index + step) % count)
            if signature(other) == signature(right):
                return other
        return right

    streamer._fetch = faulty
