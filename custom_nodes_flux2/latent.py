"""Latent nodes in ComfyUI's layouts (IMAGE [B,H,W,3] 0..1, LATENT {"samples": [B,128,H/16,W/16]}), so they mix
with core nodes such as LoadImage, SaveImage and the image scaling nodes."""

from __future__ import annotations

import torch

from flux2_core.comfy_layouts import (MAX_RESOLUTION, batch_size_input, decode_latent, encode_image, latent_samples,
                                      pixels_input)
from flux2_core.errors import Flux2Error
from flux2_core.sampling import latent_shape
from flux2_core.vae import Flux2VAE

CATEGORY = "FLUX.2/latent"


class Flux2EmptyLatent:
    DESCRIPTION = "An empty FLUX.2 latent of the given image size, the start of text-to-image generation."
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Zeros [batch_size, 128, height/16, width/16].",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "width": pixels_input(1024, "Image width in pixels, a multiple of 16.", minimum=16, step=16),
            "height": pixels_input(1024, "Image height in pixels, a multiple of 16.", minimum=16, step=16),
            "batch_size": batch_size_input("How many images to generate at once (one seed, different noise)."),
        }}

    def generate(self, width: int, height: int, batch_size: int) -> tuple[dict]:
        try:
            shape = latent_shape(batch_size, width, height)
        except Flux2Error as error:
            raise Flux2Error(f"Flux2EmptyLatent: {error}") from error
        return ({"samples": torch.zeros(shape)},)


class Flux2VAEEncode:
    DESCRIPTION = ("Encodes images into FLUX.2 latents (center-cropped to multiples of 16 px), as the start of "
                   "image-to-image or as reference latents.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The normalized packed latent [B, 128, H/16, W/16].",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images to encode."}),
            "vae": ("FLUX2_VAE", {"tooltip": "The FLUX.2 VAE."}),
        }}

    def encode(self, image: torch.Tensor, vae: Flux2VAE) -> tuple[dict]:
        return ({"samples": encode_image(vae, image)},)


class Flux2VAEDecode:
    DESCRIPTION = "Decodes FLUX.2 latents into images."
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded images, [B, H, W, 3] in 0..1.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "latent": ("LATENT", {"tooltip": "A FLUX.2 latent, e.g. from FLUX.2 Sampler."}),
            "vae": ("FLUX2_VAE", {"tooltip": "The FLUX.2 VAE."}),
        }}

    def decode(self, latent: dict, vae: Flux2VAE) -> tuple[torch.Tensor]:
        return (decode_latent(vae, latent_samples(latent, "Flux2VAEDecode: latent")),)


NODE_CLASS_MAPPINGS = {
    "Flux2EmptyLatent": Flux2EmptyLatent,
    "Flux2VAEEncode": Flux2VAEEncode,
    "Flux2VAEDecode": Flux2VAEDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "Flux2EmptyLatent": "FLUX.2 Empty Latent",
    "Flux2VAEEncode": "FLUX.2 VAE Encode",
    "Flux2VAEDecode": "FLUX.2 VAE Decode",
}
