"""LATENT nodes: empty FLUX.2 latents and the VAE between IMAGE and LATENT."""

from __future__ import annotations

import torch

from flux2_core.comfy_layouts import decode_latent, encode_image, latent_samples
from flux2_core.sampling import LATENT_CHANNELS, PIXELS_PER_LATENT_CELL

MAX_RESOLUTION = 16384


class EmptyFlux2LatentImage:
    DESCRIPTION = "An empty FLUX.2 latent for text-to-image; sizes that are not multiples of 16 round down."
    CATEGORY = "latent"
    FUNCTION = "generate"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "width": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16,
                              "tooltip": "Image width in pixels."}),
            "height": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16,
                               "tooltip": "Image height in pixels."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "Images per batch."}),
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


NODE_CLASS_MAPPINGS = {
    "EmptyFlux2LatentImage": EmptyFlux2LatentImage,
    "VAEEncode": VAEEncode,
    "VAEDecode": VAEDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "EmptyFlux2LatentImage": "Empty Flux 2 Latent",
    "VAEEncode": "VAE Encode",
    "VAEDecode": "VAE Decode",
}
