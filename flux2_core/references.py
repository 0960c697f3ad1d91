"""Reference images (editing): preprocessing and the 4-axis position ids (t, h, w, l) of every token.

Preprocessing follows the official FLUX.2 code: RGB; reject sides under 64 px and aspect ratios over 8;
scale down with LANCZOS when over a pixel cap; center-crop to multiples of 16; map to [-1, 1].
The official cap is 2024^2 for a single reference and 1024^2 each when there are several; diffusers always
uses 1024^2 (`DIFFUSERS_REFERENCE_PIXEL_CAP`), which callers pass explicitly for parity with it.

Position ids: text token k -> (0, 0, 0, k); generated latent cell (i, j) -> (0, i, j, 0); reference r
-> (10 + 10 r, i, j, 0), each reference on its own grid starting at 0. Ids are int64 like the official code.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .errors import Flux2Error

REFERENCE_MIN_SIDE = 64
REFERENCE_MAX_ASPECT = 8.0
SINGLE_REFERENCE_PIXEL_CAP = 2024 * 2024
MULTI_REFERENCE_PIXEL_CAP = 1024 * 1024
DIFFUSERS_REFERENCE_PIXEL_CAP = 1024 * 1024
# One latent cell covers 16x16 pixels (8x VAE downsampling, then 2x2 patches packed into 128 channels).
PIXELS_PER_LATENT_CELL = 16
REFERENCE_TIME_STEP = 10


def reference_pixel_cap(count: int) -> int:
    """The official per-reference pixel cap when `count` references are given together."""
    return SINGLE_REFERENCE_PIXEL_CAP if count == 1 else MULTI_REFERENCE_PIXEL_CAP


def check_reference_size(width: int, height: int) -> None:
    if width < REFERENCE_MIN_SIDE or height < REFERENCE_MIN_SIDE:
        raise Flux2Error(
            f"reference image: expected both sides >= {REFERENCE_MIN_SIDE} px, found {width}x{height}")
    aspect = max(width / height, height / width)
    if aspect > REFERENCE_MAX_ASPECT:
        raise Flux2Error(
            f"reference image: expected an aspect ratio <= {REFERENCE_MAX_ASPECT:g}:1, "
            f"found {width}x{height} ({aspect:.2f}:1)")


def downscale_to_pixel_cap(image: Image.Image, cap: int) -> Image.Image:
    """Shrink (never enlarge) so that width*height <= cap, keeping the aspect ratio; sides are floored."""
    width, height = image.size
    if width * height <= cap:
        return image
    scale = math.sqrt(cap / (width * height))
    return image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS)


def center_crop_to_multiple(image: Image.Image, multiple: int = PIXELS_PER_LATENT_CELL) -> Image.Image:
    width, height = image.size
    new_width, new_height = width // multiple * multiple, height // multiple * multiple
    left, top = (width - new_width) // 2, (height - new_height) // 2
    return image.crop((left, top, left + new_width, top + new_height))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> [1, 3, H, W] float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def preprocess_reference(image: Image.Image, cap: int) -> torch.Tensor:
    """A reference PIL image -> [1, 3, H, W] float32 in [-1, 1], H and W multiples of 16."""
    if not isinstance(image, Image.Image):
        raise Flux2Error(f"reference image: expected a PIL.Image.Image, found {type(image).__name__}")
    rgb = image.convert("RGB")
    check_reference_size(*rgb.size)
    return pil_to_tensor(center_crop_to_multiple(downscale_to_pixel_cap(rgb, cap)))


def text_position_ids(batch: int, length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[batch, length, 4] ids (0, 0, 0, k) for every text position, padding included."""
    ids = torch.zeros(length, 4, dtype=torch.int64, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids.unsqueeze(0).expand(batch, -1, -1)


def image_position_ids(height: int, width: int, batch: int = 1, time: int = 0,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """[batch, height*width, 4] ids (time, i, j, 0) of a latent grid, row-major (height, width in cells)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    ids = torch.stack([torch.full_like(rows, time), rows, cols, torch.zeros_like(rows)], dim=-1)
    return ids.unsqueeze(0).expand(batch, -1, -1)


def reference_position_ids(grid_sizes: Sequence[tuple[int, int]], batch: int = 1,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """[batch, sum(h*w), 4] ids of references r = 0, 1, ... with grids (h, w), at time 10 + 10 r."""
    per_reference = [
        image_position_ids(h, w, batch, time=REFERENCE_TIME_STEP * (r + 1), device=device)
        for r, (h, w) in enumerate(grid_sizes)
    ]
    return torch.cat(per_reference, dim=1)
