"""LATENT nodes: empty FLUX.2 latents and the VAE between IMAGE and LATENT."""

from __future__ import annotations

import torch

from flux2_core.comfy_layouts import (MAX_RESOLUTION, batch_size_input, decode_latent, encode_image, latent_samples,
                                   pixels_input)
from flux2_core.sampling import LATENT_CHANNELS, PIXELS_PER_LATENT_CELL

from .resizing import resize

CROP_METHODS = ["disabled", "center"]


class EmptyFlux2LatentImage:
    DESCRIPTION = "An empty FLUX.2 latent for text-to-image; sizes that are not multiples of 16 round down."
    CATEGORY = "latent"
    FUNCTION = "generate"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "width": pixels_input(1024, "Image width in pixels.", minimum=16, step=16),
            "height": pixels_input(1024, "Image height in pixels.", minimum=16, step=16),
            "batch_size": batch_size_input("Images per batch."),
        }}

    def generate(self, width: int, height: int, batch_size: int = 1) -> tuple[dict]:
        shape = (batch_size, LATENT_CHANNELS, height // PIXELS_PER_LATENT_CELL, width // PIXELS_PER_LATENT_CELL)
        return ({"samples": torch.zeros(shape)},)


class VAEEncode:
    DESCRIPTION = "Encodes images into latents (center-cropped to multiples of 16 px)."
    CATEGORY = "latent"
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The images to encode."}),
            "vae": ("VAE", {"tooltip": "The VAE."}),
        }}

    def encode(self, vae, pixels: torch.Tensor) -> tuple[dict]:
        return ({"samples": encode_image(vae, pixels)},)


class VAEDecode:
    DESCRIPTION = "Decodes latents into images."
    CATEGORY = "latent"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded images.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latent to decode."}),
            "vae": ("VAE", {"tooltip": "The VAE."}),
        }}

    def decode(self, vae, samples: dict) -> tuple[torch.Tensor]:
        return (decode_latent(vae, latent_samples(samples, "VAEDecode: samples")),)


class EmptyLatentImage:
    DESCRIPTION = ("ComfyUI's generic empty latent: 4 channels at 1/8 of the size. FLUX.2 samplers widen it to 128 "
                   "channels as ComfyUI does, which makes an image twice the width and height; use "
                   "EmptyFlux2LatentImage for FLUX.2.")
    CATEGORY = "latent"
    FUNCTION = "generate"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The empty latent image batch.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "width": pixels_input(512, "The width of the latent images in pixels.", minimum=16, step=8),
            "height": pixels_input(512, "The height of the latent images in pixels.", minimum=16, step=8),
            "batch_size": batch_size_input("The number of latent images in the batch."),
        }}

    def generate(self, width: int, height: int, batch_size: int = 1) -> tuple[dict]:
        return ({"samples": torch.zeros(batch_size, 4, height // 8, width // 8)},)


class EmptySD3LatentImage(EmptyLatentImage):
    DESCRIPTION = ("ComfyUI's SD3 empty latent: 16 channels at 1/8 of the size; FLUX.2 samplers widen it to 128 "
                   "channels as ComfyUI does (twice the width and height). Use EmptyFlux2LatentImage for FLUX.2.")
    CATEGORY = "latent/sd3"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        required = EmptyLatentImage.INPUT_TYPES()["required"]
        size = {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16}
        return {"required": {"width": ("INT", {**required["width"][1], **size}),
                             "height": ("INT", {**required["height"][1], **size}),
                             "batch_size": required["batch_size"]}}

    def generate(self, width: int, height: int, batch_size: int = 1) -> tuple[dict]:
        return ({"samples": torch.zeros(batch_size, 16, height // 8, width // 8)},)


LATENT_SCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]


class _LatentScaleNode:
    """A node that resizes a LATENT: its inputs are the latent, the resampling filter, then the subclass's INPUTS."""
    CATEGORY = "latent"
    FUNCTION = "upscale"
    RETURN_TYPES = ("LATENT",)
    INPUTS: dict = {}

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latent."}),
            "upscale_method": (LATENT_SCALE_METHODS, {"tooltip": "The resampling filter."}),
            **cls.INPUTS,
        }}


class LatentUpscale(_LatentScaleNode):
    DESCRIPTION = ("Resizes a latent to width x height pixels (FLUX.2: 16 px per latent cell); 0 keeps the aspect "
                   "ratio, other sizes are at least 64.")
    INPUTS = {
        "width": pixels_input(512, "Target width in pixels (0: from the height).", step=8),
        "height": pixels_input(512, "Target height in pixels (0: from the width).", step=8),
        "crop": (CROP_METHODS, {"tooltip": "center: cut to the target aspect ratio first."}),
    }

    def upscale(self, samples: dict, upscale_method: str, width: int, height: int, crop: str) -> tuple[dict]:
        if width == 0 and height == 0:
            return (samples,)
        latent = latent_samples(samples, "LatentUpscale: samples")
        if width == 0:
            height = max(64, height)
            width = max(64, round(latent.shape[-1] * height / latent.shape[-2]))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(latent.shape[-2] * width / latent.shape[-1]))
        else:
            width, height = max(64, width), max(64, height)
        cells = (width // PIXELS_PER_LATENT_CELL, height // PIXELS_PER_LATENT_CELL)
        return ({**samples, "samples": resize(latent, *cells, upscale_method, crop)},)


class LatentUpscaleBy(_LatentScaleNode):
    DESCRIPTION = "Resizes a latent by a factor (latent sizes rounded)."
    INPUTS = {"scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01, "tooltip": "The factor."})}

    def upscale(self, samples: dict, upscale_method: str, scale_by: float) -> tuple[dict]:
        latent = latent_samples(samples, "LatentUpscaleBy: samples")
        width, height = round(latent.shape[-1] * scale_by), round(latent.shape[-2] * scale_by)
        return ({**samples, "samples": resize(latent, width, height, upscale_method)},)


NODE_CLASS_MAPPINGS = {
    "EmptyLatentImage": EmptyLatentImage,
    "EmptySD3LatentImage": EmptySD3LatentImage,
    "LatentUpscale": LatentUpscale,
    "LatentUpscaleBy": LatentUpscaleBy,
    "EmptyFlux2LatentImage": EmptyFlux2LatentImage,
    "VAEEncode": VAEEncode,
    "VAEDecode": VAEDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "EmptyLatentImage": "Empty Latent Image",
    "LatentUpscale": "Upscale Latent",
    "LatentUpscaleBy": "Upscale Latent By",
    "EmptyFlux2LatentImage": "Empty Flux 2 Latent",
    "VAEEncode": "VAE Encode",
    "VAEDecode": "VAE Decode",
}
