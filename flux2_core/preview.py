"""Cheap step previews: a FLUX.2 latent -> a small false-colour RGB image, without running the VAE.

The latent a sampler reports is the normalized packed latent [B, 128, h, w]: 32 VAE channels times a
2x2 patch, each packed channel standardized. Unpacking gives [32, 2h, 2w], one value per 8x8 pixel
block, which is the resolution of the preview.

The projection to RGB is fixed, not fitted: we ship no decoder-fitted colour factors. It is built as a
YCbCr image: luma is the mean of the 32 channels (row 0 of the 32x32 Sylvester-Hadamard matrix), the two
chroma axes are rows 1 and 2 (balanced +1/-1 patterns, so they ignore the channel mean), all scaled by
1/sqrt(32), then the BT.601 YCbCr -> RGB matrix. The luma and chroma rows are orthonormal and weigh every
channel equally, so no channel dominates and standardized latent noise gives luma and chroma of equal
strength; what the sampler is forming shows as brightness with false-colour tints. The preview shows layout
and shapes, not true colours. Each image is contrast-stretched between its 1st and 99th percentiles so it
reads at every step.
"""

from __future__ import annotations

import torch
from PIL import Image

from .sampling import LATENT_CHANNELS as PACKED_CHANNELS
from .vae import unpatchify_latent

VAE_CHANNELS = PACKED_CHANNELS // 4  # the VAE's latent channels, before packing 2x2 patches


def _hadamard(order: int) -> torch.Tensor:
    """The Sylvester-Hadamard matrix of a power-of-two order (entries +1 / -1, orthogonal rows)."""
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < order:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


LUMA_CHROMA = _hadamard(VAE_CHANNELS)[:3] / VAE_CHANNELS ** 0.5  # [3, 32]: Y, Cb, Cr
YCBCR_TO_RGB = torch.tensor([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])
RGB_PROJECTION = YCBCR_TO_RGB @ LUMA_CHROMA  # [3, 32]


def latent_preview(latent: torch.Tensor) -> Image.Image:
    """First image of a normalized packed FLUX.2 latent ([B,128,h,w] or [128,h,w]) as an RGB image of 2h x 2w."""
    if latent.ndim == 3:
        latent = latent.unsqueeze(0)
    if latent.ndim != 4 or latent.shape[1] != PACKED_CHANNELS:
        raise ValueError(f"latent preview: expected a FLUX.2 latent [B, {PACKED_CHANNELS}, h, w], "
                         f"found shape {tuple(latent.shape)}")
    channels = unpatchify_latent(latent[:1].detach().float().cpu())[0]  # [32, 2h, 2w]
    rgb = torch.einsum("rc,chw->rhw", RGB_PROJECTION, channels)
    low, high = torch.quantile(rgb.flatten(), torch.tensor([0.01, 0.99]))
    rgb = ((rgb - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)
    pixels = (rgb * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(pixels)
