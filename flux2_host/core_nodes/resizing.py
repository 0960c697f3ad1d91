"""ComfyUI's common_upscale for images and latents ([B, C, H, W]): optional center crop to the target aspect
ratio, then lanczos (8-bit PIL, RGB images only), bislerp (latents) or one of torch's interpolate modes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


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
    """[B, C, H, W] (images or latents) to width x height. lanczos goes through 8-bit PIL images as in
    ComfyUI (images in 0..1 with 1, 3 or 4 channels); the other methods are torch's interpolate modes."""
    if crop == "center":
        samples = center_crop_to_aspect(samples, width, height)
    if method == "lanczos":
        return lanczos(samples, width, height)
    if method == "bislerp":
        return bislerp(samples, width, height)
    return F.interpolate(samples, size=(height, width), mode=method)




def _slerp(first: torch.Tensor, second: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Rows of [N, C] blended along the great circle between their directions, the norm interpolated linearly;
    nearly equal directions keep `first`, nearly opposite ones are lerped (ComfyUI's slerp)."""
    first_norm, second_norm = first.norm(dim=-1, keepdim=True), second.norm(dim=-1, keepdim=True)
    first_unit = torch.where(first_norm == 0, 0.0, first / first_norm)
    second_unit = torch.where(second_norm == 0, 0.0, second / second_norm)
    dot = (first_unit * second_unit).sum(-1, keepdim=True)
    omega = torch.acos(dot)
    blended = (torch.sin((1.0 - ratio) * omega) * first_unit + torch.sin(ratio * omega) * second_unit) / torch.sin(omega)
    blended = blended * (first_norm * (1.0 - ratio) + second_norm * ratio)
    blended = torch.where(dot > 1 - 1e-5, first, blended)
    return torch.where(dot < 1e-5 - 1, first * (1.0 - ratio) + second * ratio, blended)


def _source_positions(old: int, new: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of `new` output positions: the two neighbouring source indices and the weight of the second, from
    a bilinear (half-pixel) resize of the index ramp, the upper index ramp stopping at the last index."""
    def resized(ramp: torch.Tensor) -> torch.Tensor:
        return F.interpolate(ramp.reshape(1, 1, 1, -1), size=(1, new), mode="bilinear").reshape(-1)

    lower = resized(torch.arange(old, dtype=torch.float32))
    upper_ramp = torch.arange(old, dtype=torch.float32) + 1
    upper_ramp[-1] -= 1
    return lower.long(), resized(upper_ramp).long(), lower - lower.floor()


def _bislerp_last_axis(samples: torch.Tensor, new: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, H, new], slerping channel vectors between horizontal neighbours."""
    n, c, h, _ = samples.shape
    lower, upper, ratio = _source_positions(samples.shape[-1], new)
    first = samples[..., lower].movedim(1, -1).reshape(-1, c)
    second = samples[..., upper].movedim(1, -1).reshape(-1, c)
    ratios = ratio.expand(n, h, new).reshape(-1, 1)
    return _slerp(first, second, ratios).reshape(n, h, new, c).movedim(-1, 1)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI's bislerp latent resize: bilinear, with each lerp of channel vectors replaced by a slerp; width first,
    then height."""
    widened = _bislerp_last_axis(samples.float(), width)
    return _bislerp_last_axis(widened.transpose(-1, -2), height).transpose(-1, -2).to(samples.dtype)


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Each [C, H, W] image in 0..1 through an 8-bit PIL image (values truncated, as ComfyUI converts) and
    PIL's lanczos filter."""
    if samples.shape[1] not in (1, 3, 4):
        raise ValueError(f"upscale_method: lanczos works on images with 1, 3 or 4 channels, found "
                         f"{samples.shape[1]}")
    resized = []
    for sample in samples:
        array = np.clip(255.0 * sample.movedim(0, -1).float().cpu().numpy(), 0, 255).astype(np.uint8)
        picture = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.array(picture).astype(np.float32) / 255.0)
        resized.append(pixels.unsqueeze(-1) if pixels.ndim == 2 else pixels)
    return torch.stack(resized).movedim(-1, 1).to(samples.device, samples.dtype)
