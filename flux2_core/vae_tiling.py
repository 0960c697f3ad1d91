"""Tiled VAE encode and decode: the image is cut into overlapping square tiles, each tile goes through the VAE
alone, and the results are blended with linear ramps across every overlap, so peak memory follows the tile size
instead of the image size.

Tiles are laid out on the latent grid (16 px per cell for FLUX.2), so encode and decode cut at the same places
and every pixel tile starts on a cell boundary. Along each axis the tiles are spread evenly from edge to edge,
neighbours sharing at least `overlap`. Inside a shared band each tile drops the quarter nearest its own edge
(zero padding at a tile's border disturbs what lies near it) and its weight falls linearly across the middle
half; the output is the weighted sum divided by the summed weights (1 away from seams and at the image border).

Tiled results are not bit-identical to whole-image results: the VAE's group norms take statistics over what
they see and the middle attention block looks at the whole (tile), so a larger overlap gives smaller seams.
`choose_vae_tiling` is the one place that decides whether to tile and with which tiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .memory.estimate import MemoryRequest, VAEShape, vae_decode_working_bytes
from .memory.residency import default_manager
from .vae import Flux2VAE, VAEConfig

# ComfyUI's VAEDecodeTiled / VAEEncodeTiled defaults (pixels).
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64
# Images above this many pixels (4 MP, 2048x2048) always decode and encode in tiles.
AUTO_TILE_PIXELS = 2048 * 2048


@dataclass(frozen=True)
class VAETiling:
    """Square tiles of `tile` pixels whose neighbours share at least `overlap` pixels."""

    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP

    def cells(self, cell: int) -> tuple[int, int]:
        """(tile, overlap) in latent cells of `cell` pixels; the tile is at least one cell, the overlap less
        than the tile."""
        tile = max(1, self.tile // cell)
        return tile, min(self.overlap // cell, tile - 1)


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) of tiles covering 0..length, evenly spread, neighbours sharing >= `overlap`."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap: expected 0 <= overlap < tile ({tile}), found {overlap}")
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    last = length - tile
    starts = [round(i * last / (count - 1)) for i in range(count)]
    return [(start, start + tile) for start in starts]


def _ramp(spans: list[tuple[int, int]], index: int, scale: int | float, device: torch.device) -> Tensor:
    """Blend weights along one axis for tile `index`, in output units (`scale` output units per input unit).

    Inside a band of `shared` units two tiles share, each tile ignores the quarter nearest its own edge (where
    the zero padding at the tile's border reaches in) and ramps linearly across the middle half; the two
    weights add up to 1 everywhere in the band."""
    start, stop = spans[index]
    size = round((stop - start) * scale)
    position = torch.arange(size, dtype=torch.float32, device=device) + 0.5
    weight = torch.ones(size, dtype=torch.float32, device=device)
    for shared, distance in ((round((spans[index - 1][1] - start) * scale) if index > 0 else 0, position),
                             (round((stop - spans[index + 1][0]) * scale) if index + 1 < len(spans) else 0,
                              size - position)):
        if shared > 0:
            margin = shared // 4
            weight = torch.minimum(weight, ((distance - margin) / (shared - 2 * margin)).clamp(0.0, 1.0))
    return weight


def tiled_map(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, scale: int | float,
              step: int = 1) -> Tensor:
    """Apply `fn` ([B,C,h,w] -> [B,C',h*scale,w*scale]) to overlapping tiles of `x` and blend the results.

    `tile` and `overlap` are in input units; tiles start on multiples of `step` input units (the sides of `x`
    must be multiples of it too), and tile edges times `scale` must be whole output units."""
    height, width = x.shape[-2:]
    rows, cols = ([(start * step, stop * step) for start, stop in tile_spans(length // step, tile // step, overlap // step)]
                  for length in (height, width))
    out = weights = None
    for i, (top, bottom) in enumerate(rows):
        for j, (left, right) in enumerate(cols):
            piece = fn(x[..., top:bottom, left:right])
            if out is None:
                # Blended in float32 whatever the VAE computes in; returned in the tiles' dtype.
                dtype = piece.dtype
                out = torch.zeros((*piece.shape[:2], round(height * scale), round(width * scale)),
                                  dtype=torch.float32, device=piece.device)
                weights = torch.zeros(out.shape[-2:], dtype=torch.float32, device=piece.device)
            weight = _ramp(rows, i, scale, piece.device)[:, None] * _ramp(cols, j, scale, piece.device)[None, :]
            y, x0 = round(top * scale), round(left * scale)
            window = (..., slice(y, y + piece.shape[-2]), slice(x0, x0 + piece.shape[-1]))
            out[window] += piece.float() * weight
            weights[window] += weight
            del piece
    return out.div_(weights).to(dtype)


def decode_tiled(vae: Flux2VAE, latent: Tensor, tiling: VAETiling = VAETiling()) -> Tensor:
    """`vae.decode` tile by tile: normalized packed latent [B,128,h,w] -> pixels [B,3,16h,16w]."""
    cell = vae.config.downsample_factor
    tile, overlap = tiling.cells(cell)
    return tiled_map(vae.decode, latent, tile, overlap, cell)


def encode_tiled(vae: Flux2VAE, pixels: Tensor, tiling: VAETiling = VAETiling()) -> Tensor:
    """`vae.encode` tile by tile: pixels [B,3,H,W] (H, W multiples of 16) -> latent [B,128,H/16,W/16]."""
    cell = vae.config.downsample_factor
    if pixels.ndim != 4 or pixels.shape[-2] % cell or pixels.shape[-1] % cell:
        raise ValueError(f"expected pixels [B,C,H,W] with H and W multiples of {cell}, got {tuple(pixels.shape)}")
    tile, overlap = tiling.cells(cell)
    return tiled_map(vae.encode, pixels, tile * cell, overlap * cell, 1 / cell, step=cell)


def decode_working_bytes(width: int, height: int, batch: int = 1, config: VAEConfig = VAEConfig(),
                         dtype: torch.dtype = torch.float32) -> int:
    """Estimated peak working memory of decoding a width x height image whole (weights not included): the
    memory estimate's (`memory.estimate.vae_decode_working_bytes`); encoding needs less (bench/vae_tiling.py)."""
    return vae_decode_working_bytes(VAEShape(config, 0), MemoryRequest(width, height, batch), dtype)


def choose_vae_tiling(width: int, height: int, batch: int = 1, budget_bytes: int | None = None,
                      config: VAEConfig = VAEConfig(), dtype: torch.dtype = torch.float32) -> VAETiling | None:
    """Whether to run the VAE in tiles for a width x height image: None for whole, else the tiling to use.

    Tiles above AUTO_TILE_PIXELS, and when the whole-image estimate exceeds `budget_bytes` (the memory the
    caller can spare for VAE work); the tile is then the largest 16 px multiple up to 512 px whose estimate fits
    (at least 64 px), with an eighth of it as overlap."""
    over_budget = budget_bytes is not None and decode_working_bytes(width, height, batch, config, dtype) > budget_bytes
    if width * height <= AUTO_TILE_PIXELS and not over_budget:
        return None
    if budget_bytes is None:
        return VAETiling()
    cell = config.downsample_factor
    tile = DEFAULT_TILE
    while tile > 4 * cell and decode_working_bytes(tile, tile, batch, config, dtype) > budget_bytes:
        tile -= cell
    return VAETiling(tile=tile, overlap=max(cell, tile // 8 // cell * cell))


def decode_auto(vae: Flux2VAE, latent: Tensor, budget_bytes: int | None = None) -> Tensor:
    """`vae.decode`, in tiles when `choose_vae_tiling` says so for this latent's image size and the budget
    (default: what the memory manager says is free for work on the VAE's device, `working_room`)."""
    cell = vae.config.downsample_factor
    weight = vae.decoder.conv_in.weight
    budget = default_manager().working_room(weight.device) if budget_bytes is None else budget_bytes
    tiling = choose_vae_tiling(latent.shape[-1] * cell, latent.shape[-2] * cell, latent.shape[0], budget,
                               vae.config, weight.dtype)
    return vae.decode(latent) if tiling is None else decode_tiled(vae, latent, tiling)


def encode_auto(vae: Flux2VAE, pixels: Tensor, budget_bytes: int | None = None) -> Tensor:
    """`vae.encode`, in tiles when `choose_vae_tiling` says so (as `decode_auto`)."""
    weight = vae.encoder.conv_in.weight
    budget = default_manager().working_room(weight.device) if budget_bytes is None else budget_bytes
    tiling = choose_vae_tiling(pixels.shape[-1], pixels.shape[-2], pixels.shape[0], budget, vae.config,
                               weight.dtype)
    return vae.encode(pixels) if tiling is None else encode_tiled(vae, pixels, tiling)
