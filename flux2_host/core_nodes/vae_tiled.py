"""ComfyUI's tiled VAE nodes: the VAE runs on overlapping tiles (flux2_core.vae_tiling), for images whose whole
decode or encode would not fit in memory. The temporal inputs are ComfyUI's, for video VAEs; FLUX.2's VAE is an
image VAE, so they are accepted and unused, as ComfyUI does for image VAEs."""

from __future__ import annotations

import torch

from flux2_core.comfy_layouts import decode_latent, encode_image, latent_samples
from flux2_core.vae_tiling import VAETiling

from .latent import VAEDecode, VAEEncode

_TEMPORAL = {
    "temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4,
                              "tooltip": "Only used for video VAEs: Amount of frames to process at a time."}),
    "temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4,
                                 "tooltip": "Only used for video VAEs: Amount of frames to overlap."}),
}


def _tiling_inputs(tile_step: int) -> dict:
    """The inputs after the untiled node's (ComfyUI's tile_size step: 32 to decode, 64 to encode)."""
    return {
        "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": tile_step,
                              "tooltip": "Tile side in pixels."}),
        "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32,
                            "tooltip": "Pixels neighbouring tiles share and blend."}),
        **_TEMPORAL,
    }


def node_tiling(tile_size: int, overlap: int) -> VAETiling:
    """ComfyUI's rule: an overlap above a quarter of the tile is cut to a quarter."""
    return VAETiling(tile_size, tile_size // 4 if tile_size < overlap * 4 else overlap)


class VAEDecodeTiled:
    DESCRIPTION = "Decodes latents into images tile by tile, for images too large to decode at once."
    CATEGORY = "_for_testing"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {**VAEDecode.INPUT_TYPES()["required"], **_tiling_inputs(tile_step=32)}}

    def decode(self, vae, samples: dict, tile_size: int, overlap: int = 64, temporal_size: int = 64,
               temporal_overlap: int = 8) -> tuple[torch.Tensor]:
        latent = latent_samples(samples, "VAEDecodeTiled: samples")
        return (decode_latent(vae, latent, node_tiling(tile_size, overlap)),)


class VAEEncodeTiled:
    DESCRIPTION = "Encodes images into latents tile by tile (center-cropped to multiples of 16 px)."
    CATEGORY = "_for_testing"
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {**VAEEncode.INPUT_TYPES()["required"], **_tiling_inputs(tile_step=64)}}

    def encode(self, vae, pixels: torch.Tensor, tile_size: int, overlap: int, temporal_size: int = 64,
               temporal_overlap: int = 8) -> tuple[dict]:
        return ({"samples": encode_image(vae, pixels, node_tiling(tile_size, overlap))},)


NODE_CLASS_MAPPINGS = {"VAEDecodeTiled": VAEDecodeTiled, "VAEEncodeTiled": VAEEncodeTiled}
NODE_DISPLAY_NAME_MAPPINGS = {"VAEDecodeTiled": "VAE Decode (Tiled)", "VAEEncodeTiled": "VAE Encode (Tiled)"}
