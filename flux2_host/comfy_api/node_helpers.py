"""Stand-in for ComfyUI's `node_helpers`: small functions many packs share."""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
from PIL import ImageFile, UnidentifiedImageError

from . import STAND_IN_MARK, missing_name

globals()[STAND_IN_MARK] = True
__getattr__ = missing_name("node_helpers")


def conditioning_set_values(conditioning: list, values: dict | None = None, append: bool = False) -> list:
    """A copy of a CONDITIONING ([[embeddings, options], ...]) with `values` set in every entry's options;
    with `append`, a value is added to (list-concatenated with) the one already there."""
    result = []
    for embeddings, options in conditioning:
        options = options.copy()
        for key, value in (values or {}).items():
            if append and options.get(key) is not None:
                value = options[key] + value
            options[key] = value
        result.append([embeddings, options])
    return result


def pillow(fn: Callable, arg: Any) -> Any:
    """`fn(arg)` for a PIL call; a truncated or odd file is retried with PIL's LOAD_TRUNCATED_IMAGES on."""
    try:
        return fn(arg)
    except (OSError, UnidentifiedImageError, ValueError):
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return fn(arg)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def hasher():
    """The hash constructor ComfyUI uses for file contents by default."""
    return hashlib.sha256


def string_to_torch_dtype(string: str) -> torch.dtype | None:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(string)


def image_alpha_fix(destination: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make a source IMAGE batch match a destination's channels: drop its alpha, or give it an opaque one."""
    if destination.shape[-1] < source.shape[-1]:
        source = source[..., :destination.shape[-1]]
    elif destination.shape[-1] > source.shape[-1]:
        source = torch.nn.functional.pad(source, (0, 1))
        source[..., -1] = 1.0
    return destination, source

