"""A neutral progress / interrupt channel.

Sampling loops report here; whoever drives the engine (a ComfyUI host, a CLI, a service) installs a
handler for the duration of a call. flux2_core knows nothing of who listens.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Callable, Iterator, Optional

import torch

from .errors import Interrupted

# handler(step, total, preview_latent_or_None)
ProgressHandler = Callable[[int, int, Optional[torch.Tensor]], None]

# handler(event, data): named messages beyond step counts (e.g. a training loss), for whoever listens.
EventHandler = Callable[[str, dict], None]

# The event of a training step: {"step", "total", "loss", "lr"}. The host sends it over the WebSocket as a
# message type of its own, which ComfyUI's frontend ignores.
TRAINING_EVENT = "flux2.training"

_handler: contextvars.ContextVar[ProgressHandler | None] = contextvars.ContextVar("flux2_progress", default=None)
_event_handler: contextvars.ContextVar[EventHandler | None] = contextvars.ContextVar("flux2_events", default=None)
_interrupt = threading.Event()


@contextlib.contextmanager
def progress_handler(handler: ProgressHandler | None) -> Iterator[None]:
    token = _handler.set(handler)
    try:
        yield
    finally:
        _handler.reset(token)


def report_progress(step: int, total: int, preview: torch.Tensor | None = None) -> None:
    handler = _handler.get()
    if handler is not None:
        handler(step, total, preview)


@contextlib.contextmanager
def event_handler(handler: EventHandler | None) -> Iterator[None]:
    token = _event_handler.set(handler)
    try:
        yield
    finally:
        _event_handler.reset(token)


def report_event(event: str, data: dict) -> None:
    handler = _event_handler.get()
    if handler is not None:
        handler(event, data)


def request_interrupt() -> None:
    _interrupt.set()


def clear_interrupt() -> None:
    _interrupt.clear()


def interrupt_requested() -> bool:
    return _interrupt.is_set()


# On a CPU one kernel call over a huge input runs for seconds, and an interrupt is only seen between calls.
# Work that can be cut (the VAE's convolutions into bands of rows, the DiT's batch into sub-batches) keeps
# each call within this many multiply-adds there: about 0.1-0.3 s on a small CPU. On CUDA the checks between
# blocks already come within milliseconds, and cutting would only cost speed.
CPU_MACS_BETWEEN_CHECKS = 1 << 31


def macs_between_checks(device: torch.device) -> int | None:
    """The most multiply-adds one call on `device` should do between two interrupt checks; None: no limit."""
    return CPU_MACS_BETWEEN_CHECKS if device.type == "cpu" else None


def check_interrupt(error: type[Interrupted] = Interrupted) -> None:
    """Raise `error` (and clear the flag) if someone asked to stop. A caller with its own `Interrupted` subclass
    (ComfyUI's InterruptProcessingException for packs) passes it."""
    if _interrupt.is_set():
        _interrupt.clear()
        raise error("processing interrupted by the user")
