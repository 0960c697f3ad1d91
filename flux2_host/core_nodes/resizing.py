"""ComfyUI's common_upscale for images and latents ([B, C, H, W]): optional center crop to the target aspect
ratio, then lanczos (8-bit PIL, RGB images only) or one of torch's interpolate modes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from flux2_core.comfy_layouts import image_to_pils, pil_to_image


def center_crop_to_aspect(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B, C, H, W] cut evenly on two sides to the aspect ratio width : height (ComfyUI's crop "center")."""
    old_height, old_width = samples.shape[-2:]
    old_aspect, new_aspect = old_width / old_height, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
    return samples[..., y:old_height - y, x:old_width - x]


def resize(samples: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """[B, C, H, W] (images or latents) to width x height. lanczos goes through 8-bit RGB PIL images as in
    ComfyUI (images only); the other methods are torch's interpolate modes."""
    if crop == "center":
        samples = center_crop_to_aspect(samples, width, height)
    if method == "lanczos":
        if samples.shape[1] != 3:
            raise ValueError(f"upscale_method: lanczos works on RGB images, found {samples.shape[1]} channels")
        pictures = image_to_pils(samples.movedim(1, -1))
        scaled = [pil_to_image(p.resize((width, height), Image.Resampling.LANCZOS)) for p in pictures]
        return torch.cat(scaled).movedim(-1, 1).to(samples.dtype)
    if method == "bislerp":
        raise NotImplementedError("upscale_method: 'bislerp' is not available in this host; use 'bilinear' or "
                                  "'bicubic'")
    return F.interpolate(samples, size=(height, width), mode=method)


