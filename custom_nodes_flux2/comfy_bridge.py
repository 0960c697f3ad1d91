"""The pack's two contacts with whatever runs it: model file lists, and progress / interrupt while sampling.

Inside ComfyUI these are ComfyUI's own `folder_paths`, `comfy.utils.ProgressBar` and interrupt flag. In our
host, `folder_paths` is the host's compatible module and progress goes through `flux2_core.progress`, which
the engine's sampling loop reports to by itself.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable

import torch

from flux2_core.comfy_layouts import model_file_path
from flux2_core.preview import latent_preview

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


def _folder_paths() -> ModuleType:
    # Looked up on use, not at import: a host may install its `folder_paths` after loading node packs.
    return importlib.import_module("folder_paths")


def model_files(kind: str) -> list[str]:
    """The combo list of a model folder kind ("diffusion_models", "text_encoders", "vae", "loras")."""
    return _folder_paths().get_filename_list(kind)


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
