"""Stand-in for `comfy.model_management`: devices, memory and the interrupt flag.

Interrupts share the host's flag (`flux2_core.progress`): POST /interrupt (or Ctrl-C in `flux2 run`) stops a
pack's loop at its next `throw_exception_if_processing_interrupted()`, and the exception it raises is the
executor's `Interrupted`, so the run ends as interrupted, not as an error.
"""

from __future__ import annotations

import torch

from flux2_core import progress
from flux2_core.devices import default_device
from flux2_core.errors import Interrupted

from . import STAND_IN_MARK, missing_name

globals()[STAND_IN_MARK] = True
__getattr__ = missing_name("comfy.model_management")


class InterruptProcessingException(Interrupted):
    """Raised where a pack checks for an interrupt the user asked for."""


def get_torch_device() -> torch.device:
    """The compute device (CUDA unless absent or `--cpu`)."""
    return default_device()


def intermediate_device() -> torch.device:
    """Where node outputs (IMAGE, MASK, ...) live between nodes: the CPU, as in ComfyUI by default."""
    return torch.device("cpu")


def unet_offload_device() -> torch.device:
    return torch.device("cpu")


def text_encoder_device() -> torch.device:
    return default_device()


def text_encoder_offload_device() -> torch.device:
    return torch.device("cpu")


def vae_device() -> torch.device:
    return default_device()


def vae_offload_device() -> torch.device:
    return torch.device("cpu")


def is_device_cpu(device) -> bool:
    return torch.device(device).type == "cpu"


def is_device_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def is_device_mps(device) -> bool:
    return torch.device(device).type == "mps"


def get_total_memory(dev=None, torch_total_too: bool = False):
    """Bytes of memory of a device (the compute device by default): GPU memory for CUDA, RAM otherwise."""
    device = torch.device(dev) if dev is not None else default_device()
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        reserved = torch.cuda.memory_reserved(device)
        return (total, reserved) if torch_total_too else total
    total, _ = _ram_total_and_free()
    return (total, total) if torch_total_too else total


def get_free_memory(dev=None, torch_free_too: bool = False):
    """Free bytes of a device: the driver's free memory plus what torch holds unused, for CUDA; RAM otherwise."""
    device = torch.device(dev) if dev is not None else default_device()
    if device.type == "cuda":
        free_driver, _ = torch.cuda.mem_get_info(device)
        free_torch = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return (free_driver + free_torch, free_torch) if torch_free_too else free_driver + free_torch
    _, free = _ram_total_and_free()
    return (free, free) if torch_free_too else free


def _ram_total_and_free() -> tuple[int, int]:
    from ..server import _ram_total_and_free as ram_total_and_free  # the numbers /system_stats reports

    return ram_total_and_free()


def soft_empty_cache(force: bool = False) -> None:
    """Hand cached, unused GPU memory back to the driver."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unload_all_models() -> None:
    """Models the host's nodes loaded stay in its cache (POST /free drops them); what a pack holds is its own."""
    soft_empty_cache()


def interrupt_current_processing(value: bool = True) -> None:
    if value:
        progress.request_interrupt()
    else:
        progress.clear_interrupt()


def processing_interrupted() -> bool:
    return progress.interrupt_requested()


def throw_exception_if_processing_interrupted() -> None:
    progress.check_interrupt(InterruptProcessingException)
