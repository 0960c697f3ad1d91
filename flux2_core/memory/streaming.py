"""Block streaming: run a model whose blocks do not all fit the compute device by bringing them in one at a time.

A streamed block's tensors live elsewhere between uses: in (pinned) CPU memory (`offload="cpu"`) or only in the
checkpoint file (`offload="disk"`, for machines short of RAM: read per use, freed after). On the device they
are meta tensors (shape and dtype only) until the block runs:

- a forward pre-hook copies the block's tensors in (waiting for a prefetch when one is in flight) and starts
  copying the next streamed block on a side CUDA stream, so the copy overlaps the current block's compute;
- a forward hook puts the meta tensors back, so the device copy is freed as soon as autograd no longer needs it.

Because loading hangs on the block's own forward hooks, it also happens when activation checkpointing recomputes
the block in backward (the recompute calls the block again), which is what training needs. A recompute that
stops early (non-reentrant checkpointing stops once it has what backward needs) skips the forward hook; that
block is released when the next one loads, or by `release_all()`.

Each tensor is stored as "parts" (e.g. an fp8 weight and its scale) plus a `finish` step run on the device
after the copy (cast, dequantize), so fp8 storage crosses the bus at one byte per weight. The finish steps are
the loaders' own, so a streamed model computes bit for bit what the resident one does on the same device.

Disk reads go through `checkpoints.reader` (positioned reads of one tensor's bytes) rather than a memory map:
mapped pages count towards the process's resident memory, which is what `offload="disk"` is meant to avoid.

On the CPU the same code runs with synchronous copies and no prefetch. Moving a streamed model (`model.to(d)`)
moves its resident part and makes `d` the device streamed blocks are copied to.

Budgets are not decided here: without an explicit `vram_budget_gb`, `plan_streaming` asks the process's memory
manager (`memory.residency`, `MemoryManager.weight_budget`), which also streams a model it cannot fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from .residency import default_manager, model_size_bytes

Offload = Literal["cpu", "disk"]
OFFLOAD_MODES: tuple[str, ...] = ("cpu", "disk")
GIB = 1024**3


@dataclass
class StoredTensor:
    """Where the tensors of one checkpoint entry live between uses, and how they become the block's tensors.

    read(): the raw parts from their file (CPU tensors). parts: those parts kept in (pinned) CPU memory, or
    None to read them at every use. finish(parts on the device) -> {name inside the block: tensor}.
    """

    read: Callable[[], tuple[Tensor, ...]]
    finish: Callable[[tuple[Tensor, ...]], dict[str, Tensor]]
    parts: tuple[Tensor, ...] | None = None
    nbytes: int = 0

    def keep_in_memory(self, pin: bool) -> None:
        parts = self.read()
        self.parts = tuple(part.pin_memory() if pin else part for part in parts)

    def to_device(self, device: torch.device) -> dict[str, Tensor]:
        parts = self.parts if self.parts is not None else self.read()
        return self.finish(tuple(part.to(device, non_blocking=True) for part in parts))


def resident_tensor(name: str, tensor: Tensor) -> StoredTensor:
    """A tensor already in CPU memory, kept as it is (pinned when CUDA is present) and streamed unchanged."""
    kept = tensor.detach()
    # Already pinned (a model streamed again with a new plan): kept as is, not copied once more.
    parts = (kept.pin_memory() if torch.cuda.is_available() and not kept.is_pinned() else kept,)
    return StoredTensor(read=lambda: parts, finish=lambda moved: {name: moved[0]}, parts=parts, nbytes=tensor.nbytes)


@dataclass
class _Block:
    module: nn.Module
    stored: list[StoredTensor]
    meta: dict[str, Tensor] = field(default_factory=dict)  # name -> meta placeholder put back after use
    loaded: bool = False


class BlockStreamer:
    """Streams the tensors of `blocks` (in the order the model runs them) to `device` around each block's calls.

    `methods`: other methods of the blocks that run them without `forward` (e.g. the DiT's `reference_forward`),
    wrapped so they load and release the same way.
    """

    def __init__(self, blocks: Sequence[nn.Module], stored: Sequence[list[StoredTensor]], device: torch.device | str,
                 offload: Offload, methods: Sequence[str] = ()):
        self.offload = offload
        self.device = torch.device(device)
        self._blocks = [_Block(module, list(tensors)) for module, tensors in zip(blocks, stored, strict=True)]
        self._inflight: dict[int, tuple[dict[str, Tensor], torch.cuda.Event]] = {}
        self._side_stream: torch.cuda.Stream | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._methods = tuple(methods)
        self.prefetch = True  # False: copy each block when it runs, on the compute stream (a reference for checks)
        if offload == "cpu":
            pin = torch.cuda.is_available()
            for block in self._blocks:
                for tensor in block.stored:
                    if tensor.parts is None:
                        tensor.keep_in_memory(pin)
        for index, block in enumerate(self._blocks):
            self._install(index, block, methods)

    @property
    def blocks(self) -> list[nn.Module]:
        return [block.module for block in self._blocks]

    @property
    def streamed_bytes(self) -> int:
        return sum(t.nbytes for block in self._blocks for t in block.stored)

    @property
    def in_flight_bytes(self) -> int:
        """Device bytes streamed blocks take while the model runs: the running block and the one being
        prefetched, counted as two of the largest (what `plan_streaming` keeps room for)."""
        return 2 * max((sum(t.nbytes for t in block.stored) for block in self._blocks), default=0)

    def retarget(self, device: torch.device | str) -> None:
        """Copy streamed blocks to `device` from now on (the model's resident part was moved there)."""
        self.device = torch.device(device)
        self._inflight.clear()

    def _install(self, index: int, block: _Block, methods: Sequence[str]) -> None:
        module = block.module
        self._hooks.append(module.register_forward_pre_hook(lambda *_: self.load(index)))
        self._hooks.append(module.register_forward_hook(lambda *_: self.release(index)))
        for name in methods:
            method = getattr(module, name)

            def wrapped(*args, _method=method, **kwargs):
                self.load(index)
                try:
                    return _method(*args, **kwargs)
                finally:
                    self.release(index)

            setattr(module, name, wrapped)

        def follow_moves(fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
            # model.to(d) reaches here instead of touching the meta tensors: d becomes the streaming target.
            probe = fn(torch.empty(0, device=self.device))
            if probe.dtype != torch.float32:
                raise ValueError(f"a streamed block keeps the dtypes it was loaded with; found a move to "
                                 f"{probe.dtype} (load the model in that dtype instead)")
            self.retarget(probe.device)
            return module

        module._apply = follow_moves

    def load(self, index: int) -> None:
        """Put block `index`'s tensors on the device (no-op when they are there), then prefetch the next block."""
        block = self._blocks[index]
        if block.loaded:
            return
        # A block whose forward hook never ran (checkpointing stops a recompute early) goes now: one at a time.
        for other, loaded in enumerate(self._blocks):
            if loaded.loaded:
                self.release(other)
        if index in self._inflight:
            tensors, ready = self._inflight.pop(index)
            torch.cuda.current_stream(self.device).wait_event(ready)
        else:
            tensors = self._fetch(index)
        for name, tensor in tensors.items():
            block.meta.setdefault(name, _assign(block.module, name, tensor))
        block.loaded = True
        self._prefetch((index + 1) % len(self._blocks))

    def detach(self) -> None:
        """Stop streaming: every block's tensors go to the device for good, hooks and wrappers are removed."""
        for index, block in enumerate(self._blocks):
            for name, tensor in self._fetch(index).items():
                _assign(block.module, name, tensor)
            block.loaded = False
            for name in ("_apply", *self._methods):
                block.module.__dict__.pop(name, None)
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._inflight.clear()

    def release_all(self) -> None:
        for index in range(len(self._blocks)):
            self.release(index)

    def release(self, index: int) -> None:
        """Put the meta placeholders back; the device copies are freed once nothing else holds them."""
        block = self._blocks[index]
        for name, placeholder in block.meta.items():
            _assign(block.module, name, placeholder)
        block.loaded = False

    def _fetch(self, index: int) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        for stored in self._blocks[index].stored:
            tensors.update(stored.to_device(self.device))
        return tensors

    def _prefetch(self, index: int) -> None:
        """On CUDA, start copying block `index` on a side stream; elsewhere blocks are copied when they run."""
        if (not self.prefetch or self.device.type != "cuda" or index in self._inflight or self._blocks[index].loaded
                or len(self._blocks) < 2):
            return
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._side_stream):
            tensors = self._fetch(index)
            ready = torch.cuda.Event()
            ready.record(self._side_stream)
        for tensor in tensors.values():
            # Allocated on the side stream, used on the compute stream: keep the memory until that use is done.
            tensor.record_stream(compute)
        self._inflight[index] = (tensors, ready)


def _to_host(tensor: Tensor) -> Tensor:
    """A CPU copy, pinned when CUDA is present (pinned copies back from the GPU are ~50x faster than pageable)."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=torch.cuda.is_available())
    return host.copy_(tensor)


def _assign(block: nn.Module, name: str, tensor: Tensor) -> Tensor:
    """Set parameter or buffer `name` of `block` to `tensor`; returns a meta placeholder of the old one."""
    owner_name, _, attr = name.rpartition(".")
    owner = block.get_submodule(owner_name)
    old = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
    if old is None:
        raise KeyError(f"streamed block: no parameter or buffer named {name!r}")
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor
    return old if old.is_meta else torch.empty_like(old, device="meta")


# ---------------------------------------------------------------------------------------------------------------
# How many blocks stay on the device


@dataclass(frozen=True)
class StreamPlan:
    """`offload` None: everything resident. Otherwise the first `resident_blocks` blocks stay on the device and
    the rest stream from `offload`."""

    offload: Offload | None
    resident_blocks: int


def device_budget_bytes(device: torch.device) -> int | None:
    """The weight bytes a model may keep on `device` when the caller gives no budget: the process's memory
    manager decides (`MemoryManager.weight_budget`); None means no limit."""
    return default_manager().weight_budget(device)


def plan_streaming(block_bytes: Sequence[int], other_bytes: int, device: torch.device | str,
                   offload: Offload | None = None, vram_budget_gb: float | None = None) -> StreamPlan:
    """Which blocks stream, from the blocks' sizes (in run order), the size of everything else and the budget.

    No offload and no budget: resident, unless the model exceeds `device_budget_bytes` (then "cpu"). A budget
    without offload: "cpu" streaming when the model exceeds it. An offload without a budget: the budget is
    `device_budget_bytes`; with no limit there, every block streams. Two streamed blocks (the running one and
    the next) are counted against the budget.
    """
    if offload is not None and offload not in OFFLOAD_MODES:
        raise ValueError(f"offload: expected None, 'cpu' or 'disk', found {offload!r}")
    if vram_budget_gb is not None and not (vram_budget_gb >= 0 and math.isfinite(vram_budget_gb)):
        raise ValueError(f"vram_budget_gb: expected a number of GiB >= 0, found {vram_budget_gb!r}")
    budget = int(vram_budget_gb * GIB) if vram_budget_gb is not None else device_budget_bytes(torch.device(device))
    return plan_within(block_bytes, other_bytes, offload, budget)


def plan_within(block_bytes: Sequence[int], other_bytes: int, offload: Offload | None,
                budget_bytes: int | None) -> StreamPlan:
    """`plan_streaming` with the budget in bytes (None: no limit)."""
    total = other_bytes + sum(block_bytes)
    if offload is None:
        if budget_bytes is None or total <= budget_bytes:
            return StreamPlan(None, len(block_bytes))
        offload = "cpu"
    if budget_bytes is None:
        return StreamPlan(offload, 0)
    in_flight = 2 * max(block_bytes, default=0)
    used, resident = other_bytes + in_flight, 0
    for size in block_bytes:
        if used + size > budget_bytes:
            break
        used, resident = used + size, resident + 1
    return StreamPlan(offload, resident)


def streamable_blocks(module: nn.Module) -> tuple[list[nn.Module], tuple[str, ...]] | None:
    """The blocks of a model the runtime knows how to stream, in run order, and the block methods that run
    them without `forward`: the DiT's double and single blocks, a text encoder's decoder layers. None for
    other models (the VAE)."""
    named_blocks = getattr(module, "named_blocks", None)
    if callable(named_blocks):
        return [block for _, block in named_blocks()], ("reference_forward",)
    layers = getattr(module, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return list(layers), ()
    return None


def stream_in_memory(module: nn.Module, budget_bytes: int) -> BlockStreamer | None:
    """Stream the blocks of a model already in memory that do not fit `budget_bytes` beside the rest of it
    (the memory manager's way to run a model it cannot fit); sets and returns `module.block_streamer`, or
    None when the model has no blocks it can stream."""
    found = streamable_blocks(module)
    if found is None:
        return None
    blocks, methods = found
    block_bytes = [model_size_bytes(block) for block in blocks]
    plan = plan_within(block_bytes, model_size_bytes(module) - sum(block_bytes), "cpu", budget_bytes)
    device = next(iter(module.parameters())).device
    module.block_streamer = stream_loaded_blocks(blocks, device, plan, methods)
    return module.block_streamer


def new_stream_plan(module: nn.Module, budget_bytes: int | None) -> StreamPlan | None:
    """The plan for `budget_bytes` (None: no limit) of a model that `stream_in_memory` streams, or None when it
    is the plan the model has. `StreamPlan(None, ...)`: the model fits whole."""
    streamer: BlockStreamer = module.block_streamer
    blocks, _methods = streamable_blocks(module)
    streamed_bytes = {id(block.module): sum(t.nbytes for t in block.stored) for block in streamer._blocks}
    block_bytes = [streamed_bytes.get(id(block)) or model_size_bytes(block) for block in blocks]
    resident_block_bytes = sum(size for block, size in zip(blocks, block_bytes) if id(block) not in streamed_bytes)
    other_bytes = model_size_bytes(module) - streamer.in_flight_bytes - resident_block_bytes
    if budget_bytes is None or other_bytes + sum(block_bytes) <= budget_bytes:
        return StreamPlan(None, len(blocks))
    plan = plan_within(block_bytes, other_bytes, "cpu", budget_bytes)
    return None if plan.resident_blocks == len(blocks) - len(streamed_bytes) else plan


def restream_in_memory(module: nn.Module, plan: StreamPlan) -> BlockStreamer | None:
    """Stream a model that `stream_in_memory` streams by `plan` (from `new_stream_plan`) from now on. It must be
    off the device (its resident part in CPU memory): its blocks return to the model, then the ones the plan
    leaves out stream anew. Returns the streamer, or None when the model is whole again (then it has no
    `block_streamer`)."""
    streamer: BlockStreamer = module.block_streamer
    if streamer.device.type != "cpu":
        raise RuntimeError("restream_in_memory: the model must be off the device (its resident part in CPU memory)")
    blocks, methods = streamable_blocks(module)
    streamer.detach()
    del module.block_streamer
    if plan.offload is None:
        return None
    module.block_streamer = stream_loaded_blocks(blocks, streamer.device, plan, methods)
    return module.block_streamer


def stream_loaded_blocks(blocks: Sequence[nn.Module], device: torch.device | str, plan: StreamPlan,
                         methods: Sequence[str] = ()) -> BlockStreamer | None:
    """Stream the blocks after `plan.resident_blocks` of a model already in memory (CPU offload only: a model
    built in memory has no file to stream from). The streamed blocks' tensors move to (pinned) CPU memory."""
    if plan.offload is None:
        return None
    if plan.offload != "cpu":
        raise ValueError(f"offload={plan.offload!r}: a model already in memory can only stream from the CPU")
    streamed = list(blocks[plan.resident_blocks:])
    stored = []
    for block in streamed:
        named = [*block.named_parameters(), *block.named_buffers()]
        stored.append([resident_tensor(name, _to_host(tensor)) for name, tensor in named])
        for name, tensor in named:
            _assign(block, name, torch.empty_like(tensor, device="meta"))
    return BlockStreamer(streamed, stored, device, "cpu", methods)


# ---------------------------------------------------------------------------------------------------------------
# Training: block swap with backward (musubi-tuner's --blocks_to_swap)


def training_swap_split(double_blocks: int, single_blocks: int, blocks_to_swap: int) -> tuple[int, int]:
    """How many of the last double and single blocks `blocks_to_swap` means, musubi-tuner's rule: a double block
    counts as one unit and a single block as half of one (a single block holds about half the weights), split in
    proportion to the two lists and moved between them when one side would run out."""
    if blocks_to_swap <= 0:
        return 0, 0
    if double_blocks == 0 or single_blocks == 0:
        return (0, blocks_to_swap) if double_blocks == 0 else (blocks_to_swap, 0)
    ratio = single_blocks / double_blocks
    double = int(round(blocks_to_swap / (1.0 + ratio / 2.0)))
    single = int(round(double * ratio))
    if double_blocks * 2 < single_blocks:
        while double >= 1 and double > double_blocks - 2:
            double, single = double - 1, single + 2
    else:
        while single >= 2 and single > single_blocks - 2:
            double, single = double + 1, single - 2
    if double == 0 and single == 0:
        return (0, 1) if single_blocks >= double_blocks else (1, 0)
    return double, single


def _split_fits(double_blocks: int, single_blocks: int, split: tuple[int, int]) -> bool:
    # Two blocks of each list stay on the device (musubi's limit): the one running and the one arriving.
    return split[0] <= max(double_blocks - 2, 0) and split[1] <= max(single_blocks - 2, 0)


def max_training_blocks_to_swap(double_blocks: int, single_blocks: int) -> int:
    """The largest `blocks_to_swap` whose split fits (dev 29, klein-4B 13, klein-9B 16)."""
    best = 0
    for count in range(1, double_blocks + single_blocks + 1):
        if _split_fits(double_blocks, single_blocks, training_swap_split(double_blocks, single_blocks, count)):
            best = count
    return best


def _frozen_owners(block: nn.Module) -> list[tuple[nn.Module, list[tuple[str, Tensor]]]]:
    """The modules inside `block` that hold frozen tensors directly, with those tensors (trainable parameters,
    the adapters, are left out: they stay resident)."""
    owners = []
    for module in block.modules():
        frozen = [(name, p) for name, p in module._parameters.items() if p is not None and not p.requires_grad]
        frozen += [(name, b) for name, b in module._buffers.items() if b is not None]
        if frozen:
            owners.append((module, frozen))
    return owners


def enable_training_block_swap(dit: nn.Module, blocks_to_swap: int, device: torch.device | str) -> BlockStreamer:
    """Keep the frozen weights of the DiT's last `blocks_to_swap` blocks (musubi's units, `training_swap_split`)
    in (pinned) CPU memory and bring them to `device` for each forward and each checkpointing recompute.

    Streaming is per module that owns frozen tensors (a base linear, an fp8 linear with its scale, a norm), not
    per block: a checkpointed block's recompute calls the block's inner forward, not the block, but still calls
    its submodules, so their hooks load the weights again whichever order checkpointing and swapping were
    enabled in. Trainable parameters (the LoRA adapters) stay resident and are never replaced, so the
    optimizer's parameter objects stay the ones that receive gradients. Returns the streamer (also set as
    `dit.block_streamer`); `streamer.detach()` puts every weight back on the device."""
    doubles, singles = list(dit.double_blocks), list(dit.single_blocks)
    limit = max_training_blocks_to_swap(len(doubles), len(singles))
    if not 0 < blocks_to_swap <= limit:
        allowed = f"1..{limit}" if limit else "none"
        raise ValueError(f"blocks_to_swap {blocks_to_swap}: this DiT ({len(doubles)} double, {len(singles)} single "
                         f"blocks) allows {allowed} (two blocks of each kind stay on the device; a double block "
                         f"counts 1, a single block 1/2)")
    double, single = training_swap_split(len(doubles), len(singles), blocks_to_swap)
    swapped = doubles[len(doubles) - double:] + singles[len(singles) - single:]
    owners, stored = [], []
    for block in swapped:
        found = _frozen_owners(block)
        ids = {id(owner) for owner, _ in found}
        for owner, _ in found:
            if any(id(inner) in ids for inner in owner.modules() if inner is not owner):
                raise ValueError(f"blocks_to_swap: {type(owner).__name__} holds weights and runs a submodule that "
                                 "also does; it cannot be streamed per module")
        owners += found
    if not owners:
        raise ValueError(f"blocks_to_swap {blocks_to_swap}: the swapped blocks hold no frozen weights (every "
                         "weight is trainable), so there is nothing to keep in CPU memory")
    for owner, frozen in owners:
        stored.append([resident_tensor(name, _to_host(tensor)) for name, tensor in frozen])
        for name, tensor in frozen:
            _assign(owner, name, torch.empty_like(tensor, device="meta"))
    dit.block_streamer = TrainingBlockStreamer([owner for owner, _ in owners], stored, device, "cpu")
    return dit.block_streamer


class TrainingBlockStreamer(BlockStreamer):
    """A `BlockStreamer` that also runs backward: checkpointing recomputes blocks in reverse order, so the
    prefetch (always the next module in forward order) is wrong at the end of each recompute. A prefetch that
    is not the module now loading is dropped here rather than kept until the next forward, so the device holds
    at most the running module and one prefetch (the cost: one wasted copy per recomputed block)."""

    def load(self, index: int) -> None:
        if not self._blocks[index].loaded:
            for stale in [other for other in self._inflight if other != index]:
                del self._inflight[stale]
        super().load(index)
