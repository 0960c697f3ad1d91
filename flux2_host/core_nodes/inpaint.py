"""Inpainting and outpainting nodes under ComfyUI's names and inputs. They put a `noise_mask` on a LATENT
(1 = regenerate); every sampler node of the host (and the pack's FLUX.2 Sampler) then keeps the rest of the latent
on the source, the rule of `flux2_core.sampling.sample(mask=...)`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flux2_core.comfy_layouts import encode_image, latent_samples
from flux2_core.sampling import PIXELS_PER_LATENT_CELL

from .conditioning import Conditioning
from .image_ops import paste
from .latent import MAX_RESOLUTION


def pixel_mask(mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """A MASK as [B, 1, H, W] at the IMAGE's size (bilinear)."""
    return F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(), size=image.shape[1:3], mode="bilinear")


def crop_to_latent_grid(samples: torch.Tensor) -> torch.Tensor:
    """[..., H, W] cut to multiples of 16 px, the odd rows / columns split between both sides (as VAE encoding
    crops the image)."""
    height, width = samples.shape[-2:]
    new_height = height // PIXELS_PER_LATENT_CELL * PIXELS_PER_LATENT_CELL
    new_width = width // PIXELS_PER_LATENT_CELL * PIXELS_PER_LATENT_CELL
    top, left = (height - new_height) // 2, (width - new_width) // 2
    return samples[..., top:top + new_height, left:left + new_width]


class SetLatentNoiseMask:
    DESCRIPTION = "Marks the region of a latent to regenerate (mask 1); samplers keep the rest."
    CATEGORY = "latent/inpaint"
    FUNCTION = "set_mask"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"samples": ("LATENT", {"tooltip": "The encoded image."}),
                             "mask": ("MASK", {"tooltip": "1 = regenerate, 0 = keep."})}}

    def set_mask(self, samples: dict, mask: torch.Tensor) -> tuple[dict]:
        return ({**samples, "noise_mask": mask.reshape(-1, 1, *mask.shape[-2:])},)


class InpaintModelConditioning:
    DESCRIPTION = ("Encodes the image and puts the mask on the latent (noise_mask on). The conditionings pass "
                   "through: FLUX.2 models take no inpaint concat input.")
    CATEGORY = "conditioning/inpaint"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "positive": ("CONDITIONING", {"tooltip": "The prompt."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt."}),
            "vae": ("VAE", {"tooltip": "The VAE."}),
            "pixels": ("IMAGE", {"tooltip": "The image to inpaint."}),
            "mask": ("MASK", {"tooltip": "1 = regenerate, 0 = keep."}),
            "noise_mask": ("BOOLEAN", {"default": True, "tooltip": "Add a noise mask to the latent so sampling "
                                       "will only happen within the mask."}),
        }}

    def encode(self, positive: Conditioning, negative: Conditioning, pixels: torch.Tensor, vae, mask: torch.Tensor,
               noise_mask: bool = True) -> tuple[Conditioning, Conditioning, dict]:
        latent = {"samples": encode_image(vae, pixels)}
        if noise_mask:
            latent["noise_mask"] = crop_to_latent_grid(pixel_mask(mask, pixels))
        return (positive, negative, latent)


class VAEEncodeForInpaint:
    DESCRIPTION = ("Encodes the image with the masked pixels set to grey, and puts the mask (grown by grow_mask_by "
                   "pixels, rounded) on the latent.")
    CATEGORY = "latent/inpaint"
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The image to inpaint."}),
            "vae": ("VAE", {"tooltip": "The VAE."}),
            "mask": ("MASK", {"tooltip": "1 = regenerate, 0 = keep."}),
            "grow_mask_by": ("INT", {"default": 6, "min": 0, "max": 64, "step": 1,
                                     "tooltip": "Pixels to grow the noise mask by, for seamless edges."}),
        }}

    def encode(self, vae, pixels: torch.Tensor, mask: torch.Tensor, grow_mask_by: int = 6) -> tuple[dict]:
        mask = crop_to_latent_grid(pixel_mask(mask, pixels))
        pixels = crop_to_latent_grid(pixels.movedim(-1, 1)).movedim(1, -1)
        rounded = mask.round()
        if grow_mask_by == 0:
            noise_mask = mask
        else:
            kernel = torch.ones(1, 1, grow_mask_by, grow_mask_by)
            padding = math.ceil((grow_mask_by - 1) / 2)
            noise_mask = F.conv2d(rounded, kernel, padding=padding).clamp(0, 1)
        keep = (1.0 - rounded).squeeze(1).unsqueeze(-1)
        greyed = (pixels[..., :3] - 0.5) * keep + 0.5
        height, width = pixels.shape[1:3]
        return ({"samples": encode_image(vae, greyed), "noise_mask": noise_mask[..., :height, :width].round()},)


class ImagePadForOutpaint:
    DESCRIPTION = ("Pads the image with grey on the chosen sides and returns the mask of the new area (1), faded "
                   "quadratically into the image over `feathering` pixels.")
    CATEGORY = "image"
    FUNCTION = "expand_image"
    RETURN_TYPES = ("IMAGE", "MASK")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        side = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image to extend."}),
            **{name: ("INT", {**side, "tooltip": f"Pixels to add on the {name}."})
               for name in ("left", "top", "right", "bottom")},
            "feathering": ("INT", {"default": 40, "min": 0, "max": MAX_RESOLUTION, "step": 1,
                                   "tooltip": "Width of the fade from the new area into the image."}),
        }}

    def expand_image(self, image: torch.Tensor, left: int, top: int, right: int, bottom: int,
                     feathering: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, height, width, channels = image.shape
        padded = torch.full((batch, height + top + bottom, width + left + right, channels), 0.5)
        padded[:, top:top + height, left:left + width, :] = image
        mask = torch.ones(height + top + bottom, width + left + right)
        inner = torch.zeros(height, width)
        if feathering > 0 and feathering * 2 < height and feathering * 2 < width:
            rows = torch.arange(height, dtype=torch.float32).unsqueeze(1).expand(height, width)
            cols = torch.arange(width, dtype=torch.float32).unsqueeze(0).expand(height, width)
            # Distance to each padded side; a side without padding never counts (the full size stands in).
            distances = [rows if top else torch.full_like(rows, height),
                         height - rows if bottom else torch.full_like(rows, height),
                         cols if left else torch.full_like(cols, width),
                         width - cols if right else torch.full_like(cols, width)]
            distance = torch.stack(distances).amin(0)
            fade = ((feathering - distance) / feathering) ** 2
            inner = torch.where(distance < feathering, fade, inner)
        mask[top:top + height, left:left + width] = inner
        return (padded, mask.unsqueeze(0))


class LatentCompositeMasked:
    DESCRIPTION = ("Pastes the source latent into the destination at x, y (pixels; FLUX.2 latents move in 16 px "
                   "cells), through the mask if given.")
    CATEGORY = "latent"
    FUNCTION = "composite"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        position = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}
        return {"required": {
            "destination": ("LATENT", {"tooltip": "The latent pasted into."}),
            "source": ("LATENT", {"tooltip": "The latent pasted."}),
            "x": ("INT", {**position, "tooltip": "Left edge in pixels."}),
            "y": ("INT", {**position, "tooltip": "Top edge in pixels."}),
            "resize_source": ("BOOLEAN", {"default": False, "tooltip": "Scale source to destination's size first."}),
        }, "optional": {"mask": ("MASK", {"tooltip": "Where source shows (1)."})}}

    def composite(self, destination: dict, source: dict, x: int, y: int, resize_source: bool,
                  mask: torch.Tensor | None = None) -> tuple[dict]:
        target = latent_samples(destination, "LatentCompositeMasked: destination").clone()
        pasted = latent_samples(source, "LatentCompositeMasked: source")
        cell = PIXELS_PER_LATENT_CELL
        return ({**destination, "samples": paste(target, pasted, x // cell, y // cell, mask, resize_source)},)


NODE_CLASS_MAPPINGS = {
    "LatentCompositeMasked": LatentCompositeMasked,
    "SetLatentNoiseMask": SetLatentNoiseMask,
    "InpaintModelConditioning": InpaintModelConditioning,
    "VAEEncodeForInpaint": VAEEncodeForInpaint,
    "ImagePadForOutpaint": ImagePadForOutpaint,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SetLatentNoiseMask": "Set Latent Noise Mask",
    "InpaintModelConditioning": "InpaintModelConditioning",
    "VAEEncodeForInpaint": "VAE Encode (for Inpainting)",
    "ImagePadForOutpaint": "Pad Image for Outpainting",
}
