"""The pack's contacts with whatever runs it: model file lists, progress / interrupt while sampling and
training, and GPU memory.

Inside ComfyUI these are ComfyUI's own `folder_paths`, `comfy.utils.ProgressBar` and interrupt flag. In our
host, `folder_paths` is the host's compatible module and progress goes through `flux2_core.progress`, which
the engine's sampling loop reports to by itself.

Memory: the pack's models are kept by flux2_core's memory manager (`flux2_core.memory.residency`). Inside
ComfyUI the two managers cooperate (`share_memory_with_comfyui`): ours follows ComfyUI's VRAM flags, asks
`comfy.model_management.free_memory` for room before loading or bringing in one of our models, and ComfyUI's
`unload_all_models` ("Unload models", `/free`) and `free_memory` (room for its own models) unload ours too.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable, NoReturn

import torch

from flux2_core.comfy_layouts import model_file_path
from flux2_core.errors import Interrupted
from flux2_core.memory import residency
from flux2_core.preview import latent_preview
from flux2_core.progress import TRAINING_EVENT, clear_interrupt, interrupt_requested, report_event, report_progress

try:  # present only inside a real ComfyUI process
    import comfy.model_management as _comfy_model_management
    import comfy.utils as _comfy_utils

    if getattr(_comfy_utils, "FLUX2_HOST_STAND_IN", False):
        # The flux2 host's stand-in for other packs: there the engine reports progress to the host itself.
        raise ImportError("not ComfyUI: the flux2 host's stand-in")
except ImportError:
    _comfy_model_management = None
    _comfy_utils = None

StepCallback = Callable[[int, int, torch.Tensor], None]
# (step, total, loss, learning rate) after each optimizer step of a training run
TrainingStepCallback = Callable[[int, int, float, float], None]


def _comfy_vram_mode(args: object) -> str:
    """Our manager's mode for ComfyUI's VRAM flags (same names, same meanings)."""
    for flag, mode in (("cpu", "cpu"), ("gpu_only", "gpu_only"), ("highvram", "highvram"),
                       ("lowvram", "lowvram"), ("novram", "novram")):
        if getattr(args, flag, False):
            return mode
    return "normal"


def share_memory_with_comfyui(model_management: ModuleType) -> None:
    """Make flux2_core's memory manager and ComfyUI's `model_management` free memory for each other.

    Idempotent (the pack may be imported twice). Functions the running ComfyUI lacks are left alone.
    """
    try:
        from comfy.cli_args import args as comfy_args
    except ImportError:
        comfy_args = None
    get_device = getattr(model_management, "get_torch_device", None)
    manager = residency.configure(_comfy_vram_mode(comfy_args), getattr(comfy_args, "reserve_vram", None),
                                  device=get_device() if get_device is not None else None)
    comfy_free_memory = getattr(model_management, "free_memory", None)
    if comfy_free_memory is not None:
        # Before one of our models is loaded or brought in: ComfyUI unloads its own models to make room.
        manager.external_room_maker = lambda nbytes, device: model_management.free_memory(nbytes, device)
    if comfy_free_memory is not None and not getattr(comfy_free_memory, "flux2_wrapper", False):
        def free_memory(memory_required, device, *args, **kwargs):
            result = comfy_free_memory(memory_required, device, *args, **kwargs)
            get_free = getattr(model_management, "get_free_memory", None)
            ours = residency.default_manager()
            if get_free is not None and residency.same_device(ours.device, torch.device(device)) \
                    and get_free(device) < memory_required:
                ours.free_memory(memory_required)  # still short after ComfyUI's own: ours go too
            return result

        free_memory.flux2_wrapper = True
        model_management.free_memory = free_memory
    unload_all = getattr(model_management, "unload_all_models", None)
    if unload_all is not None and not getattr(unload_all, "flux2_wrapper", False):
        def unload_all_models(*args, **kwargs):
            result = unload_all(*args, **kwargs)
            residency.unload_all()
            return result

        unload_all_models.flux2_wrapper = True
        model_management.unload_all_models = unload_all_models


if _comfy_model_management is not None:
    share_memory_with_comfyui(_comfy_model_management)


def _folder_paths() -> ModuleType:
    # Looked up on use, not at import: a host may install its `folder_paths` after loading node packs.
    return importlib.import_module("folder_paths")


def model_files(kind: str) -> list[str]:
    """The combo list of a model folder kind ("diffusion_models", "text_encoders", "vae", "loras")."""
    return _folder_paths().get_filename_list(kind)


def input_directory() -> str:
    return _folder_paths().get_input_directory()


def output_directory() -> str:
    return _folder_paths().get_output_directory()


def model_path(kind: str, name: str, where: str) -> str:
    """The full path of a combo entry; `where` ("Node: input") names the input in the error."""
    return model_file_path(_folder_paths(), kind, name, where)


def _comfy_preview_size() -> int | None:
    """ComfyUI's preview size when it wants latent previews (its --preview-method, or the method the running
    prompt asked for, both kept in comfy.cli_args.args), else None: ComfyUI shows none by default."""
    try:
        from comfy.cli_args import LatentPreviewMethod, args
    except ImportError:
        return None
    if args.preview_method == LatentPreviewMethod.NoPreviews:
        return None
    return getattr(args, "preview_size", 512)


def sampling_hooks(total_steps: int) -> tuple[StepCallback | None, Callable[[], bool] | None]:
    """(callback, cancel) for `flux2_core.sampling.sample`: ComfyUI's progress bar (with a latent preview when
    ComfyUI wants previews) and interrupt inside ComfyUI, none elsewhere (the engine then reports to
    flux2_core.progress, and our host makes the previews)."""
    if _comfy_utils is None:
        return None, None
    bar = _comfy_utils.ProgressBar(total_steps)
    preview_size = _comfy_preview_size()

    def callback(step: int, total: int, x0: torch.Tensor) -> None:
        preview = None if preview_size is None else ("JPEG", latent_preview(x0), preview_size)
        bar.update_absolute(step, total, preview)

    def cancel() -> bool:
        # Raises ComfyUI's own exception, so ComfyUI reports an interruption rather than an error.
        _comfy_model_management.throw_exception_if_processing_interrupted()
        return False

    return callback, cancel


def _comfy_send(event: str, data: dict) -> None:
    """A message to ComfyUI's frontend (its server's send_sync; the frontend ignores unknown types)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(event, data, getattr(server, "client_id", None))


def training_hooks(total_steps: int) -> tuple[TrainingStepCallback, Callable[[], bool]]:
    """(on_step, cancel) for a training run. Inside ComfyUI: its ProgressBar, the loss as a `flux2.training`
    message, and its interrupt flag (read, not cleared: `raise_interruption` does that once the trainer has saved
    its state). Elsewhere: `flux2_core.progress`, which our host turns into progress / loss messages, and its
    interrupt flag (the host's /interrupt)."""
    if _comfy_utils is None:
        def report(step: int, total: int, loss: float, lr: float) -> None:
            report_event(TRAINING_EVENT, {"step": step, "total": total, "loss": loss, "lr": lr})
            report_progress(step, total)

        return report, interrupt_requested
    bar = _comfy_utils.ProgressBar(total_steps)

    def update(step: int, total: int, loss: float, lr: float) -> None:
        bar.update_absolute(step, total)
        _comfy_send(TRAINING_EVENT, {"step": step, "total": total, "loss": loss, "lr": lr})

    return update, _comfy_model_management.processing_interrupted


def raise_interruption(error: Interrupted) -> NoReturn:
    """End a node whose run stopped for an interrupt: with ComfyUI's own exception inside ComfyUI (it then reports
    an interruption, not an error), else with the engine's `Interrupted`, the interrupt flag cleared so that it
    does not stop the next prompt as well."""
    if _comfy_model_management is not None:
        _comfy_model_management.throw_exception_if_processing_interrupted()  # raises when the user interrupted
    clear_interrupt()
    raise error


def make_room_for_training() -> None:
    """The trainer loads its own models: loaded ones leave the GPU first (inside ComfyUI, its own as well)."""
    if _comfy_model_management is not None:
        _comfy_model_management.unload_all_models()  # ours too (share_memory_with_comfyui)
        _comfy_model_management.soft_empty_cache()
    else:
        residency.unload_all()
