"""Aspect-ratio buckets: sizes of (about) the training area with sides multiples of 16, and batching by bucket.

Every image goes to the bucket whose aspect ratio is nearest (in log space); it is scaled to cover the bucket
(LANCZOS) and center-cropped. `no_upscale` keeps images smaller than the area at their own size (sides floored
to 16) instead of enlarging them. Batches only ever hold items whose latents (and control latents) have the
same shapes, and the order is a seeded shuffle of whole batches.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Hashable, Sequence

from PIL import Image

from ..errors import Flux2Error
from ..references import PIXELS_PER_LATENT_CELL

STEP = PIXELS_PER_LATENT_CELL
MAX_ASPECT = 4.0


def bucket_sizes(width: int, height: int) -> list[tuple[int, int]]:
    """All (w, h) with sides multiples of 16, area <= width*height as large as possible, aspect <= 4:1."""
    area = width * height
    if area < STEP * STEP:
        raise Flux2Error(f"resolution: expected at least {STEP}x{STEP}, found {width}x{height}")
    min_side = max(STEP, math.ceil(math.sqrt(area / MAX_ASPECT) / STEP) * STEP)
    sizes = set()
    for w in range(min_side, area // min_side + 1, STEP):
        h = area // w // STEP * STEP
        if h >= min_side and max(w / h, h / w) <= MAX_ASPECT:
            sizes.add((w, h))
    return sorted(sizes)


def assign_bucket(image_size: tuple[int, int], resolution: tuple[int, int], enable_bucket: bool = True,
                  no_upscale: bool = False) -> tuple[int, int]:
    """The (w, h) an image of `image_size` is trained at."""
    width, height = image_size
    if width < STEP or height < STEP:
        raise Flux2Error(f"image of {width}x{height} px is smaller than the smallest bucket ({STEP}x{STEP})")
    if not enable_bucket:
        return resolution
    area = resolution[0] * resolution[1]
    if no_upscale and width * height <= area:
        return width // STEP * STEP, height // STEP * STEP
    aspect = math.log(width / height)
    return min(bucket_sizes(*resolution), key=lambda size: (abs(math.log(size[0] / size[1]) - aspect), -size[0] * size[1]))


def fit_to_bucket(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover `size` (LANCZOS), then center-crop to it."""
    width, height = image.size
    scale = max(size[0] / width, size[1] / height)
    resized = image.convert("RGB")
    new_size = (max(size[0], round(width * scale)), max(size[1], round(height * scale)))
    if new_size != (width, height):
        resized = resized.resize(new_size, Image.Resampling.LANCZOS)
    left, top = (resized.width - size[0]) // 2, (resized.height - size[1]) // 2
    return resized.crop((left, top, left + size[0], top + size[1]))


def epoch_batches(keys: Sequence[Hashable], batch_sizes: Sequence[int], seed: int, epoch: int) -> list[list[int]]:
    """Indices into `keys` grouped into batches of equal key (dataset, shapes), shuffled with a seed per
    (seed, epoch); a group's batch size is `batch_sizes` of its first item (its dataset's).

    The same (seed, epoch) always gives the same order, so a resumed run only needs the position in it.
    """
    rng = random.Random(f"{seed}:{epoch}")
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for index, key in enumerate(keys):
        groups[key].append(index)
    batches = []
    for key in sorted(groups, key=repr):
        members = groups[key]
        rng.shuffle(members)
        size = batch_sizes[members[0]]
        batches += [members[i:i + size] for i in range(0, len(members), size)]
    rng.shuffle(batches)
    return batches
