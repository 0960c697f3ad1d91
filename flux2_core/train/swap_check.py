"""Block swap for training, and the start-up self-check that swapping does not change the LoRA's gradients.

Peers have shipped silent gradient corruption where offloading meets gradient checkpointing: the backward
recompute of a block runs with weights that are not the ones its forward used (a reused buffer, a prefetch
into the wrong slot, a tensor released in place while autograd still holds it). `check_block_swap` runs one
forward + backward without swapping and one with it on the same inputs and refuses to train when the adapter
gradients differ.

`BlockOffload` is this module's own minimal swap (the engine's `memory.streaming` has no backward-aware hook in
this build): the frozen tensors of the first `count` blocks live on `storage` (the CPU; pinned when the compute
device is a GPU); a forward pre-hook on each module owning them puts fresh copies on the compute device and a
forward hook drops them again (no prefetch: this swap is for correctness, not speed). Each load installs new
Parameter / buffer objects instead of writing into the old ones, so tensors
autograd saved in the forward stay valid, and a checkpointed block's recompute simply loads again.
`fault` exists for the self-check's own test: it makes every reload within a step take the next block's
weights, the wrong-slot bug described above.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ..errors import Flux2Error


class BlockOffload:
    def __init__(self, blocks: Iterable[nn.Module], count: int, device: torch.device | str,
                 storage: torch.device | str = "cpu", fault: bool = False):
        self.blocks = list(blocks)[:count]
        if count < 1 or count > len(self.blocks) or (fault and count < 2):
            raise Flux2Error(f"blocks_to_swap {count}: expected 1..{len(self.blocks)} (2 or more with a fault)")
        self.device = torch.device(device)
        self.fault = fault
        pin = self.device.type == "cuda"
        # (block index, module name inside the block) -> that module's frozen tensors, on `storage`
        self.stored: dict[tuple[int, str], dict[str, Tensor]] = {}
        for index, block in enumerate(self.blocks):
            for module_name, module in block.named_modules():
                frozen = {}
                for kind in ("_parameters", "_buffers"):
                    for name, tensor in getattr(module, kind).items():
                        if tensor is not None and not tensor.requires_grad:
                            copy = tensor.detach().to(storage, copy=True)
                            frozen[name] = copy.pin_memory() if pin else copy
                if frozen:
                    self.stored[(index, module_name)] = frozen
        self.loads: dict[tuple[int, str], int] = {}
        self.handles = []
        # Hooks on the modules that own the tensors, not on the block: a checkpointed block's recompute calls
        # the block's inner forward directly, but its submodules still through __call__.
        for key in self.stored:
            module = self.blocks[key[0]].get_submodule(key[1])
            self._release(key)
            self.handles.append(module.register_forward_pre_hook(lambda _m, _a, k=key: self._load(k)))
            self.handles.append(module.register_forward_hook(lambda _m, _a, _o, k=key: self._release(k)))

    def new_step(self) -> None:
        self.loads = {}

    def _set(self, key: tuple[int, str], name: str, tensor: Tensor) -> None:
        module = self.blocks[key[0]].get_submodule(key[1])
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[name] = tensor

    def _load(self, key: tuple[int, str]) -> None:
        self.loads[key] = self.loads.get(key, 0) + 1
        source = key
        if self.fault and self.loads[key] > 1:
            source = ((key[0] + 1) % len(self.blocks), key[1])
        for name, tensor in self.stored[source].items():
            self._set(key, name, tensor.to(self.device, non_blocking=True))

    def _release(self, key: tuple[int, str]) -> None:
        for name, tensor in self.stored[key].items():
            self._set(key, name, torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"))

    def remove(self) -> None:
        """Put every block's weights back on the compute device for good and drop the hooks."""
        for handle in self.handles:
            handle.remove()
        for key, tensors in self.stored.items():
            for name, tensor in tensors.items():
                self._set(key, name, tensor.to(self.device))


def _gradients(params: list[nn.Parameter], loss_fn: Callable[[], Tensor]) -> list[Tensor]:
    for param in params:
        param.grad = None
    loss_fn().backward()
    gradients = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
    for param in params:
        param.grad = None
    return gradients


def check_block_swap(params: Iterable[nn.Parameter], loss_fn: Callable[[], Tensor],
                     enable_swap: Callable[[], BlockOffload], tolerance: float = 1e-5) -> float:
    """One step without and one with swapping (`enable_swap()` installs it, `.remove()` takes it out); returns
    the largest relative gradient difference, or raises when it exceeds `tolerance` or the swapped step fails.

    `loss_fn` must be deterministic (fixed inputs, no dropout): both steps must compute the same thing."""
    params = list(params)
    reference = _gradients(params, loss_fn)
    swap = enable_swap()
    try:
        swap.new_step()
        swapped = _gradients(params, loss_fn)
    except RuntimeError as error:
        raise Flux2Error(f"block swap self-check: the step with swapping failed ({error}); train without "
                         f"blocks_to_swap") from None
    finally:
        swap.remove()
    scale = max(float(torch.cat([g.flatten() for g in reference]).abs().max()), 1e-12)
    worst = max(float((a - b).abs().max()) for a, b in zip(reference, swapped)) / scale
    if worst > tolerance:
        raise Flux2Error(f"block swap self-check: the LoRA gradients with swapping differ from those without by "
                         f"{worst:.3g} (relative, allowed {tolerance:g}); swapping would corrupt training, so it "
                         f"stops here: train without blocks_to_swap")
    return worst
