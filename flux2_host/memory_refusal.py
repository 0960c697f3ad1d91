"""Refusing a prompt whose models and image size cannot fit in memory, before it is queued.

The memory estimate (flux2_core/memory/estimate.py) predicts each phase's peak from the model files' headers
and the request's size; `check_fits` compares the largest with what is available. Here that request is read
from an API prompt: the files its loader nodes name, the largest image x batch its latent nodes make, and
whether any sampler runs a negative pass (cfg != 1).

Available memory: the server's `--memory-budget-gb` when given, else the memory manager's weight budget on
its device (the GPU's capacity less --reserve-vram). Computing on the CPU has no budget, so nothing is
refused there unless `--memory-budget-gb` sets one (which is also how the tests exercise this on the CPU).

Only file headers are read, once per file and modification time, so a POST /prompt stays cheap. A prompt
this cannot read (a missing file, a file of another kind) is left to validation and execution to report.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from . import folders
from .limits import BATCH_INPUTS, HEIGHT_INPUTS, WIDTH_INPUTS, int_input

log = logging.getLogger("flux2.server")

# class_type -> (model folder kind, input naming the file); the host's ComfyUI loaders and the FLUX.2 pack's.
DIT_LOADERS = {"UNETLoader": "unet_name", "Flux2LoadModel": "model_name"}
TEXT_ENCODER_LOADERS = {"CLIPLoader": "clip_name", "Flux2LoadTextEncoder": "text_encoder_name"}
VAE_LOADERS = {"VAELoader": "vae_name", "Flux2LoadVAE": "vae_name"}


def memory_refusal(prompt: dict, budget_bytes: int | None = None) -> str | None:
    """The estimate's "needs X GB, Y GB available" message when `prompt` cannot fit, else None.
    `budget_bytes`: the server's --memory-budget-gb; None uses the memory manager's budget."""
    from flux2_core.devices import resolve_dtype
    from flux2_core.errors import Flux2Error
    from flux2_core.memory.estimate import InsufficientMemoryError, check_fits, estimate
    from flux2_core.memory.residency import default_manager

    manager = default_manager()
    available = budget_bytes if budget_bytes is not None else manager.budget_bytes
    if available is None:
        return None  # computing on the CPU without a configured budget
    dits = _loaded_files(prompt, DIT_LOADERS, "diffusion_models")
    if not dits:
        return None
    compute_dtype = resolve_dtype(None, manager.device)
    request = _memory_request(prompt)
    try:
        encoders = [_shape("text_encoder", path, compute_dtype) for path, _ in
                    _loaded_files(prompt, TEXT_ENCODER_LOADERS, "text_encoders")]
        vaes = [_shape("vae", path, compute_dtype) for path, _ in _loaded_files(prompt, VAE_LOADERS, "vae")]
        for path, node in dits:
            weight_dtype = node["inputs"].get("weight_dtype")
            dit = _shape("dit", path, compute_dtype, weight_dtype if isinstance(weight_dtype, str) else None)
            plan = estimate(request, dit, max(encoders, key=_weights, default=None),
                            max(vaes, key=_weights, default=None), compute_dtype)
            check_fits(plan, available, what=f"this prompt ({os.path.basename(path)})")
    except InsufficientMemoryError as exc:
        return str(exc)
    except (Flux2Error, OSError, ValueError) as exc:  # validation or the loader reports it with its node
        log.debug("memory estimate skipped: %s", exc)
    return None


def _loaded_files(prompt: dict, loaders: dict[str, str], kind: str) -> list[tuple[str, dict]]:
    """(full path, node) of every existing file the prompt's `loaders` name."""
    found = []
    for node in prompt.values():
        input_name = loaders.get(node.get("class_type")) if isinstance(node, dict) else None
        name = node.get("inputs", {}).get(input_name) if input_name else None
        path = folders.get_full_path(kind, name) if isinstance(name, str) else None
        if path is not None and os.path.isfile(path):
            found.append((path, node))
    return found


def _memory_request(prompt: dict):
    """The largest image x batch any latent node makes (the smallest image when none does: an edit of an
    input image is still refused when the weights alone cannot fit), and cfg != 1 when any sampler says so."""
    from flux2_core.memory.estimate import MemoryRequest
    from flux2_core.sampling import PIXELS_PER_LATENT_CELL as CELL

    width = height = CELL
    batch, cfg = 1, 1.0
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        value = inputs.get("cfg")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1:
            cfg = float(value)
        w, h, b = int_input(inputs, WIDTH_INPUTS), int_input(inputs, HEIGHT_INPUTS), int_input(inputs, BATCH_INPUTS)
        if "Latent" not in str(node.get("class_type")) or w is None or h is None:
            continue
        w, h, b = max(CELL, w - w % CELL), max(CELL, h - h % CELL), max(1, b or 1)
        if w * h * b > width * height * batch:
            width, height, batch = w, h, b
    return MemoryRequest(width, height, batch, cfg)


def _shape(kind: str, path: str, compute_dtype, weight_dtype: Any = None):
    return _cached_shape(kind, path, os.stat(path).st_mtime_ns, compute_dtype, weight_dtype)


@functools.lru_cache(maxsize=256)
def _cached_shape(kind: str, path: str, _mtime_ns: int, compute_dtype, weight_dtype: Any):
    """The estimate's view of one file (its header only), kept until the file changes."""
    from flux2_core.memory.estimate import dit_shape_from_file, text_encoder_shape_from_file, vae_shape_from_file

    if kind == "dit":
        return dit_shape_from_file(path, compute_dtype, weight_dtype)
    if kind == "text_encoder":
        return text_encoder_shape_from_file(path, compute_dtype)
    return vae_shape_from_file(path, compute_dtype)


def _weights(shape) -> int:
    return shape.weight_bytes
