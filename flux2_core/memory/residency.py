"""Which models sit on the compute device: one manager per process, least-recently-used eviction within a budget.

Every loaded model (DiT, text encoder, VAE) is registered with its size in bytes, counted from its tensors.
Code that is about to run a model asks for it with `use(model)`: the manager makes room on the device by moving
the least recently used idle models to pinned CPU memory (non-blocking copies, one synchronisation per model),
or, when RAM is short and the model knows how to reload itself from its file, by dropping its weights, and
then brings the model in. A model stays on the device after use while it fits, so a text encoder is no longer
sent back to the CPU after every prompt. A model in use is never evicted.

Modes, with ComfyUI's flag names and meanings:

- `normal`: as above; a model bigger than the room left after evicting every idle model is streamed.
- `highvram` / `gpu_only`: everything stays on the device, nothing is evicted to make room (only an explicit
  `free_memory` / `unload_all` moves models off); the two behave the same here.
- `lowvram`: one model on the device at a time (every idle model is evicted first); one that does not fit is
  streamed by blocks.
- `novram`: weights stay in CPU memory and every model is streamed with a zero budget (one block at a time).
- `cpu`: compute on the CPU; nothing moves.

The manager is the one place that decides budgets; `memory.streaming` does the copying. `weight_budget(device)`
is what one model may keep on a device (the budget below; 0 in novram; None, no limit, in highvram / gpu_only
and on the CPU), and `plan_streaming` uses it whenever a loader is given no `vram_budget_gb`. A model that
streams (it has a `block_streamer`) is managed like any other, by its device footprint: its resident part
plus two blocks in flight. Evicting it moves only the resident part and retargets the streamer, so its
streamed blocks stay where they are (pinned CPU memory or the file). A model is streamed when:

- `load_managed` sees a file bigger than `weight_budget` (or any file in novram): the loader gets
  `offload="cpu"` and `vram_budget_gb` = that budget, and the model is loaded into CPU memory;
- `use` finds a resident-only model bigger than the room left after eviction (other models in use, large
  activations): its blocks that do not fit the room are streamed from CPU memory (`streaming.stream_in_memory`).
  At every later load it is planned again for the room there is then: whole when it fits, more or fewer
  resident blocks when the room grew or shrank. A model without blocks to stream (the VAE) is then loaded
  whole, with a warning. A model streamed from its file at load time (`load_managed`, a loader's `offload`)
  keeps the plan it was loaded with.

Budget accounting is pure arithmetic over registered sizes, so it runs on a CPU with a made-up capacity
(`MemoryManager(device="cpu", total_bytes=...)`), which is how the tests check eviction order.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from torch import nn

from ..devices import default_device
from ..errors import Flux2Error

log = logging.getLogger(__name__)

GIB = 1024 ** 3
# Kept free of our weights by default: room for the working memory of a step plus what other programs use.
# ComfyUI keeps 0.4 GiB for the system plus 0.8 GiB of minimum inference memory; we keep the same 1.2 GiB.
DEFAULT_RESERVE_BYTES = int(1.2 * GIB)
# RAM left to the rest of the system when deciding whether an evicted model fits in CPU memory.
RAM_RESERVE_BYTES = 2 * GIB


class VramMode(str, enum.Enum):
    NORMAL = "normal"
    HIGH = "highvram"
    GPU_ONLY = "gpu_only"
    LOW = "lowvram"
    NO = "novram"
    CPU = "cpu"


class Location(str, enum.Enum):
    DEVICE = "device"      # all weights on the compute device
    OFFLOADED = "offloaded"  # weights in (pinned) CPU memory
    DROPPED = "dropped"    # weights freed; `reload` brings them back from the file
    STREAMED = "streamed"  # resident part on the device, the other blocks streamed (`model.block_streamer`)


# Asks whoever else holds models on the device (ComfyUI's model management, when the pack runs inside
# ComfyUI) to free `nbytes` on `device` before one of ours is brought in.
ExternalRoomMaker = Callable[[int, torch.device], None]


@dataclass(eq=False)
class ManagedModel:
    """The manager's record of one model (the model itself is held weakly: dropping the last reference
    elsewhere unloads it and removes the record)."""

    ref: weakref.ref
    name: str
    size_bytes: int
    reload: Callable[[torch.device], Any] | None
    location: Location
    last_used: int = 0
    in_use: int = 0
    # Left where it was loaded (a text encoder asked to stay on the CPU, a model for another device).
    fixed: bool = False
    evictions: int = 0  # times it was moved off the device or dropped to make room
    # It had to be streamed but has no blocks to stream (the VAE): it is loaded whole, and the warning said so.
    unstreamable: bool = False
    # Set when the manager itself streams the model (`use` found too little room): its size whole, so that every
    # later load plans it again for the room there is then. Streaming a loader set up is the caller's plan.
    whole_bytes: int | None = None

    @property
    def model(self) -> Any:
        return self.ref()

    @property
    def device_bytes(self) -> int:
        """What the model's weights take on the compute device now."""
        if self.fixed:
            return 0
        return self.size_bytes if self.location in (Location.DEVICE, Location.STREAMED) else 0


def tensor_module(model: Any) -> nn.Module:
    """The module holding a model's weights: the model itself, or a wrapper's `.model` (`Flux2TextEncoder`)."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"memory manager: expected an nn.Module or an object with an nn.Module `.model`, "
                    f"found {type(model).__name__}")


def block_streamer(model: Any) -> Any:
    """The model's `memory.streaming.BlockStreamer`, or None when all its weights are resident."""
    return getattr(tensor_module(model), "block_streamer", None)


def model_size_bytes(model: Any) -> int:
    """What the model takes on the device: bytes of every distinct parameter and buffer (fp8 weights count one
    byte per value, scales included), plus, for a streamed model, its blocks in flight instead of the meta
    placeholders of its streamed blocks."""
    seen: set[int] = set()
    total = 0
    module = tensor_module(model)
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if id(tensor) not in seen and not tensor.is_meta:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    streamer = block_streamer(model)
    return total + (streamer.in_flight_bytes if streamer is not None else 0)


def weights_device(model: Any) -> torch.device | None:
    """Where the model's resident weights are (streamed blocks' meta placeholders do not count)."""
    first = next((p for p in tensor_module(model).parameters() if not p.is_meta), None)
    return None if first is None else first.device


def available_ram_bytes() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def replace_tensors(module: nn.Module, convert: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Replace every parameter and buffer by `convert(qualified name, tensor)`; a tensor shared by several
    modules (tied weights) is converted once and stays shared."""
    done: dict[int, torch.Tensor] = {}
    for module_name, sub in module.named_modules(remove_duplicate=True):
        for store in (sub._parameters, sub._buffers):
            for name, tensor in list(store.items()):
                if tensor is None:
                    continue
                new = done.get(id(tensor))
                if new is None:
                    with torch.no_grad():
                        new = convert(f"{module_name}.{name}" if module_name else name, tensor)
                    if new is not tensor and isinstance(tensor, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=tensor.requires_grad)
                    done[id(tensor)] = new
                store[name] = new


def _offload_module(module: nn.Module) -> None:
    """Every resident tensor to CPU memory: from CUDA into pinned memory through non-blocking copies (about
    50 GiB/s against 1 GiB/s for a plain `.to("cpu")`), with one synchronisation at the end so the copies are
    complete before anything reads them. A streamed model's streamed blocks stay where they are stored; its
    streamer copies them to the CPU from then on."""
    copied_from_cuda = False

    def to_cpu(_name: str, tensor: torch.Tensor) -> torch.Tensor:
        nonlocal copied_from_cuda
        if tensor.device.type in ("cpu", "meta"):
            return tensor
        if tensor.device.type != "cuda":
            return tensor.to("cpu")
        copied_from_cuda = True
        host = torch.empty_like(tensor, device="cpu", pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host

    replace_tensors(module, to_cpu)
    _retarget(module, torch.device("cpu"))
    if copied_from_cuda:
        torch.cuda.synchronize()


def _move_module(module: nn.Module, device: torch.device) -> None:
    """Every resident tensor to `device`; a streamed model's streamer copies its blocks there from then on."""
    replace_tensors(module, lambda _name, t: t if t.is_meta else t.to(device, non_blocking=True))
    _retarget(module, device)


def _retarget(module: nn.Module, device: torch.device) -> None:
    streamer = getattr(module, "block_streamer", None)
    if streamer is not None:
        streamer.retarget(device)


class MemoryManager:
    """Keeps registered models on `device` within `budget_bytes`, evicting the least recently used idle ones.

    `total_bytes`: the device's capacity; None reads it from the device (CUDA), or means unlimited on the CPU.
    Giving it makes the accounting purely arithmetic (the tests' fake capacity). `reserve_bytes` stays free of
    weights (default `DEFAULT_RESERVE_BYTES`). `ram_available`: how much RAM is free (the tests fake it).
    """

    def __init__(self, device: torch.device | str | None = None, mode: VramMode | str = VramMode.NORMAL,
                 reserve_bytes: int | None = None, total_bytes: int | None = None,
                 ram_available: Callable[[], int] = available_ram_bytes):
        self.mode = VramMode(mode)
        self.device = torch.device("cpu") if self.mode is VramMode.CPU else torch.device(device or default_device())
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.reserve_bytes = DEFAULT_RESERVE_BYTES if reserve_bytes is None else int(reserve_bytes)
        self._measured_capacity = total_bytes is None and self.device.type == "cuda"
        if total_bytes is None and self.device.type == "cuda":
            total_bytes = torch.cuda.get_device_properties(self.device).total_memory
        self.total_bytes = total_bytes  # None: no limit (CPU compute)
        self.ram_available = ram_available
        self.external_room_maker: ExternalRoomMaker | None = None
        self._records: dict[int, ManagedModel] = {}
        self._clock = itertools.count(1)
        self._lock = threading.RLock()

    # --- accounting ---------------------------------------------------------------------------------------

    @property
    def budget_bytes(self) -> int | None:
        """Weight bytes allowed on the device; None when unlimited."""
        if self.total_bytes is None:
            return None
        return max(0, self.total_bytes - self.reserve_bytes)

    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(record.device_bytes for record in self._records.values())

    def models(self) -> list[ManagedModel]:
        """Live records, most recently used last."""
        with self._lock:
            return sorted(self._records.values(), key=lambda record: record.last_used)

    def record(self, model: Any) -> ManagedModel | None:
        with self._lock:
            return self._records.get(id(model))

    def vram_budget_bytes(self, model: Any) -> int | None:
        """The device bytes a streamed `model` takes while it runs (resident part plus blocks in flight), or
        None when it is not streamed (wholly resident, or unmanaged)."""
        record = self.record(model)
        return None if record is None or record.location is not Location.STREAMED else record.size_bytes

    def working_room(self, device: torch.device | str) -> int:
        """Bytes a call on `device` can use for its activations now, beside the weights there: the capacity
        minus the resident models on the manager's device (with CUDA, no more than is really free), free
        memory on another CUDA device, available RAM on the CPU. What "memory is tight" means for the VAE's
        automatic tiling (`vae_tiling.decode_auto`)."""
        device = torch.device(device)
        if same_device(device, self.device) and self.total_bytes is not None:
            return max(0, self._room(0) + self.reserve_bytes)
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        return self.ram_available()

    def weight_budget(self, device: torch.device | str) -> int | None:
        """The weight bytes one model may keep on `device`, the budget every streaming decision uses: the
        manager's budget on its own device (another CUDA device: its capacity minus the same reserve), 0 in
        novram, None (no limit) in highvram / gpu_only and on the CPU without a made-up capacity."""
        device = torch.device(device)
        if self.mode in (VramMode.HIGH, VramMode.GPU_ONLY):
            return None
        if same_device(device, self.device):
            budget = self.budget_bytes
        elif device.type == "cuda":
            budget = max(0, torch.cuda.get_device_properties(device).total_memory - self.reserve_bytes)
        else:
            budget = None
        return 0 if budget is not None and self.mode is VramMode.NO else budget

    # --- registration -------------------------------------------------------------------------------------

    def register(self, model: Any, name: str | None = None, size_bytes: int | None = None,
                 reload: Callable[[torch.device], Any] | None = None, fixed: bool | None = None) -> ManagedModel:
        """Track `model` (idempotent: registering again updates name / size / reload). `size_bytes` defaults
        to its tensors' bytes; `reload(device)` must return a freshly loaded model of the same structure on
        `device` (it lets the manager drop the weights when RAM is short). `fixed`: never move it (None: fixed
        when its weights are on another device than the manager's compute device, e.g. a text encoder loaded
        for the CPU while the manager places models on the GPU)."""
        with self._lock:
            record = self._records.get(id(model))
            if record is None:
                key = id(model)
                record = ManagedModel(
                    ref=weakref.ref(model, lambda _ref, key=key: self._forget(key)),
                    name=name or type(model).__name__,
                    size_bytes=model_size_bytes(model) if size_bytes is None else int(size_bytes),
                    reload=reload, location=self._current_location(model),
                    last_used=next(self._clock))
                record.fixed = self._on_other_device(model) if fixed is None else fixed
                self._records[key] = record
            else:
                record.name = name or record.name
                record.size_bytes = record.size_bytes if size_bytes is None else int(size_bytes)
                record.reload = reload or record.reload
                record.fixed = record.fixed if fixed is None else fixed
            return record

    def unregister(self, model: Any) -> None:
        self._forget(id(model))

    def _forget(self, key: int) -> None:
        with self._lock:
            self._records.pop(key, None)

    def _on_other_device(self, model: Any) -> bool:
        device = weights_device(model)
        return not (device is None or device == self.device)

    def _current_location(self, model: Any) -> Location:
        if self.total_bytes is not None and not self._measured_capacity:
            return Location.OFFLOADED  # fake capacity: nothing counts as resident until `use` loads it
        device = weights_device(model)
        if device is not None and device != self.device:
            return Location.OFFLOADED
        return Location.STREAMED if block_streamer(model) is not None else Location.DEVICE

    # --- using a model ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, model: Any, working_bytes: int = 0) -> Iterator[Any]:
        """Run `model` inside this block: it is on the device (or set up for streaming) and cannot be evicted
        until the block ends. Unregistered models are registered first. `working_bytes`: the activations the
        call will need beside the weights (from `memory.estimate`), kept free too."""
        record = self.register(model)
        with self._lock:
            record.in_use += 1
            record.last_used = next(self._clock)
        try:
            self._bring_in(record, working_bytes)
            yield model
        finally:
            with self._lock:
                record.in_use -= 1
                record.last_used = next(self._clock)

    def load(self, model: Any, working_bytes: int = 0) -> Any:
        """Bring `model` onto the device now (without pinning it there)."""
        with self.use(model, working_bytes):
            return model

    def _bring_in(self, record: ManagedModel, working_bytes: int) -> None:
        with self._lock:
            if record.fixed:
                return
            if self.budget_bytes is None:  # compute on the CPU: no device budget to keep
                if not record.device_bytes:
                    self._move_in(record)
                return
            if self.mode is VramMode.NO:
                if block_streamer(record.model) is None:
                    self._stream(record, 0)
                if not record.device_bytes:
                    self._move_in(record)
                return
            # A resident model still needs room for the call's activations. One the manager streams asks for
            # room for all of it, like a model seen for the first time.
            needed = (record.whole_bytes - record.device_bytes if record.whole_bytes is not None
                      else 0 if record.device_bytes else record.size_bytes)
            if self.mode is VramMode.LOW:
                for other in self._idle_resident(exclude=record):
                    self._evict(other)
            elif self.mode not in (VramMode.HIGH, VramMode.GPU_ONLY):
                self._make_room(needed, working_bytes, exclude=record)
            if self.external_room_maker is not None and needed + working_bytes > 0:
                self.external_room_maker(needed + working_bytes, self.device)
            if record.whole_bytes is not None:  # its own resident part is room it can be planned into
                self._plan_again(record, self._room(working_bytes) + record.device_bytes)
            if record.device_bytes:
                return
            room = self._room(working_bytes)
            if (room is not None and record.size_bytes > room and self.mode not in (VramMode.HIGH, VramMode.GPU_ONLY)
                    and block_streamer(record.model) is None):
                self._stream(record, max(0, room))
            self._move_in(record)

    def _room(self, working_bytes: int) -> int | None:
        """Weight bytes that fit on the device now, next to the resident models and `working_bytes` (None when
        unlimited)."""
        budget = self.budget_bytes
        if budget is None:
            return None
        room = budget - self.resident_bytes - working_bytes
        if self._measured_capacity:
            free, _total = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            room = min(room, free + cached - self.reserve_bytes - working_bytes)
        return room  # negative: even the activations do not fit yet

    def _idle_resident(self, exclude: ManagedModel | None = None) -> list[ManagedModel]:
        """Models on the device that nothing is running, least recently used first."""
        return [r for r in self.models() if r is not exclude and not r.in_use and r.device_bytes > 0]

    def _make_room(self, size_bytes: int, working_bytes: int, exclude: ManagedModel | None = None) -> int:
        """Evict idle models, least recently used first, until `size_bytes` fit; returns the bytes freed."""
        freed = 0
        for victim in self._idle_resident(exclude):
            room = self._room(working_bytes)
            if room is None or room >= size_bytes:
                break
            freed += victim.device_bytes
            self._evict(victim)
        return freed

    # --- moving weights -----------------------------------------------------------------------------------

    def _move_in(self, record: ManagedModel) -> None:
        """The model's resident weights onto the device (a streamed model's blocks keep streaming, now to it)."""
        model = record.model
        if record.location is Location.DROPPED:
            self._reload(record)
        else:
            _move_module(tensor_module(model), self.device)
        if hasattr(model, "device") and not isinstance(model, nn.Module):
            model.device = self.device  # a text encoder computes where its weights are
        record.location = Location.STREAMED if block_streamer(model) is not None else Location.DEVICE

    def _stream(self, record: ManagedModel, budget: int) -> None:
        """From now on, stream the blocks of `record`'s model that do not fit `budget` beside the rest of it,
        from CPU memory; its size becomes its footprint on the device. The model is left off the device."""
        from .streaming import stream_in_memory  # the streaming mechanism asks this module for budgets

        if record.unstreamable:
            return
        if record.location is Location.DROPPED:
            self._reload(record, device=torch.device("cpu"))
        if stream_in_memory(tensor_module(record.model), budget) is None:
            record.unstreamable = True
            log.warning("%s (%.2f GiB) does not fit in the %.2f GiB left on %s and has no blocks to stream: "
                        "loading it whole", record.name, record.size_bytes / GIB, budget / GIB, self.device)
            return
        record.whole_bytes = record.size_bytes
        record.size_bytes = model_size_bytes(record.model)
        record.location = Location.OFFLOADED
        log.info("%s streams: %.2f GiB on %s while it runs", record.name, record.size_bytes / GIB, self.device)

    def _plan_again(self, record: ManagedModel, room: int) -> None:
        """Plan a model the manager streams for the `room` there is now: whole again when it fits, more blocks
        resident when the room grew, fewer when it shrank (ComfyUI too decides its partial loads at every load).
        A changed plan takes the model off the device first; an unchanged one moves nothing."""
        from .streaming import new_stream_plan, restream_in_memory

        module = tensor_module(record.model)
        plan = new_stream_plan(module, None if record.whole_bytes <= room else max(0, room))
        if plan is None:
            return
        if record.device_bytes:
            _offload_module(module)
            record.location = Location.OFFLOADED
        if restream_in_memory(module, plan) is None:
            record.size_bytes, record.whole_bytes = record.whole_bytes, None
            log.info("%s fits again: no longer streamed", record.name)
        else:
            record.size_bytes = model_size_bytes(record.model)

    def _evict(self, record: ManagedModel) -> None:
        """Off the device: to pinned CPU memory, or dropped when RAM is short and the model can reload."""
        model = record.model
        if model is None or record.in_use:
            return
        record.evictions += 1
        # A streamed model keeps its streamed blocks in RAM or in its file anyway: only its small resident part
        # moves, so it is never dropped.
        ram_short = self.ram_available() - RAM_RESERVE_BYTES < record.size_bytes
        if record.reload is not None and ram_short and block_streamer(model) is None:
            self._drop(record)
            return
        _offload_module(tensor_module(model))
        record.location = Location.OFFLOADED
        log.debug("evicted %s (%.2f GiB) to CPU memory", record.name, record.size_bytes / GIB)

    def _drop(self, record: ManagedModel) -> None:
        replace_tensors(tensor_module(record.model), lambda _name, t: torch.empty_like(t, device="meta"))
        record.location = Location.DROPPED
        log.debug("dropped %s (%.2f GiB); it reloads from its file when next used", record.name,
                  record.size_bytes / GIB)

    def _reload(self, record: ManagedModel, device: torch.device | None = None) -> None:
        target = device or self.device
        fresh_tensors = dict(_named_tensors(tensor_module(record.reload(target))))

        def adopt(name: str, _meta: torch.Tensor) -> torch.Tensor:
            if name not in fresh_tensors:
                raise Flux2Error(f"memory manager: reloading {record.name} gave a model without {name!r}; the "
                                 f"reload callable must load the same file the same way")
            return fresh_tensors[name].to(target)

        replace_tensors(tensor_module(record.model), adopt)
        record.location = Location.DEVICE if target == self.device else Location.OFFLOADED

    # --- freeing ------------------------------------------------------------------------------------------

    def free_memory(self, nbytes: int) -> int:
        """Evict idle models, least recently used first, until `nbytes` of the budget are free (or nothing
        idle is left); returns the bytes moved off the device. Works in every mode."""
        with self._lock:
            freed = self._make_room(nbytes, 0)
        _release_cached_memory(self.device)
        return freed

    def make_room_for_load(self, nbytes: int) -> None:
        """Before loading a model of about `nbytes` onto the device: evict idle models of ours, then ask the
        external memory manager (ComfyUI's, inside ComfyUI) for room too."""
        if self.budget_bytes is None or self.mode in (VramMode.HIGH, VramMode.GPU_ONLY):
            return
        with self._lock:
            self._make_room(nbytes, 0)
            if self.external_room_maker is not None:
                self.external_room_maker(nbytes, self.device)

    def offload(self, model: Any) -> None:
        """Move one model off the device now, unless it is running (what `Flux2TextEncoder.offload` does)."""
        record = self.register(model)
        with self._lock:
            if record.device_bytes > 0:
                self._evict(record)
            elif record.fixed:
                _offload_module(tensor_module(model))
        _release_cached_memory(self.device)

    def unload_all(self) -> int:
        """Move every idle model off the device (ComfyUI's "unload models"); returns the bytes moved."""
        with self._lock:
            freed = 0
            for victim in self._idle_resident():
                freed += victim.device_bytes
                self._evict(victim)
        _release_cached_memory(self.device)
        return freed


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for module_name, sub in module.named_modules():
        for store in (sub._parameters, sub._buffers):
            for name, tensor in store.items():
                if tensor is not None:
                    yield (f"{module_name}.{name}" if module_name else name), tensor.detach()


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the process's manager ------------------------------------------------------------------------------------

_default: MemoryManager | None = None
_default_lock = threading.Lock()


def default_manager() -> MemoryManager:
    """The process's manager, created on first use for the default device (see `configure`)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MemoryManager()
        return _default


def configure(mode: VramMode | str = VramMode.NORMAL, reserve_gb: float | None = None,
              device: torch.device | str | None = None) -> MemoryManager:
    """Replace the process's manager (what the `--lowvram` / `--reserve-vram` flags do)."""
    return set_default_manager(MemoryManager(device=device, mode=mode,
                                             reserve_bytes=None if reserve_gb is None else int(reserve_gb * GIB)))


def set_default_manager(manager: MemoryManager) -> MemoryManager:
    """Make `manager` the process's manager. It inherits the external room hook set on the old one; models registered with the old one stay where they are and are registered again on their next use."""
    global _default
    with _default_lock:
        if _default is not None:
            manager.external_room_maker = manager.external_room_maker or _default.external_room_maker
        _default = manager
    return manager


def manage(model: Any, name: str | None = None, reload: Callable[[torch.device], Any] | None = None) -> Any:
    """Register a freshly loaded model with the process's manager; returns it (loaders wrap their result)."""
    default_manager().register(model, name=name, reload=reload)
    return model


def compute_device(model: Any) -> torch.device:
    """Where `model` computes: the manager's device for a model it places, else where its weights are."""
    manager = default_manager()
    record = manager.record(model)
    if record is not None and not record.fixed:
        return manager.device
    return weights_device(model) or manager.device


def load_managed(loader: Callable[..., Any], path: Any, *, name: str, device: torch.device | str | None = None,
                 **options: Any) -> Any:
    """`loader(path, device=..., **options)` (one of `checkpoints.loaders`) with the process's manager:
    room is made for the file's bytes first (evicting idle models), the model is registered with a reload
    callable (the same call), so it can be dropped and read again when RAM is short. `device` None places
    it on the manager's compute device; an explicit other device leaves it there and the manager never
    moves it. A file bigger than `weight_budget` (any file in novram) is loaded into CPU memory to be
    streamed: a loader that takes `offload` gets `offload="cpu"` (unless the caller chose one) and
    `vram_budget_gb` = that budget (unless the caller gave one); the manager brings its resident part in on
    first use."""
    manager = default_manager()
    fixed = device is not None and not same_device(torch.device(device), manager.device)
    if not fixed:
        nbytes, budget = _file_bytes(path), manager.weight_budget(manager.device)
        if budget is not None and nbytes > budget:
            device = "cpu"
            if "offload" in inspect.signature(loader).parameters:
                options = {**options, "offload": options.get("offload") or "cpu",
                           "vram_budget_gb": (budget / GIB if options.get("vram_budget_gb") is None
                                              else options["vram_budget_gb"])}
        else:
            device = manager.device
            manager.make_room_for_load(nbytes)
    model = loader(path, device=device, **options)
    manager.register(model, name=name, fixed=fixed,
                     reload=lambda target: loader(path, device=target, **options))
    return model


def same_device(a: torch.device, b: torch.device) -> bool:
    """"cuda" and "cuda:0" are the same device when the index is left open."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _file_bytes(path: Any) -> int:
    """Bytes of a checkpoint file, or of the weight files in a model folder (an upper bound on its tensors)."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, f)) for root, _dirs, files in os.walk(path)
                   for f in files if f.endswith((".safetensors", ".bin", ".gguf")))
    return os.path.getsize(path) if os.path.exists(path) else 0


def use(model: Any, working_bytes: int = 0) -> ContextManager[Any]:
    """`MemoryManager.use` on the process's manager."""
    return default_manager().use(model, working_bytes)


def free_memory(nbytes: int) -> int:
    return default_manager().free_memory(nbytes)


def unload_all() -> int:
    return default_manager().unload_all()
