"""CONDITIONING nodes. A CONDITIONING is ComfyUI's list of [embeddings [B, T, D], options]; FLUX.2 reads the
options `guidance` (dev's embedded guidance) and `reference_latents` (edit references, in order)."""

from __future__ import annotations

import torch

from flux2_core.comfy_layouts import encode_prompt, latent_samples

Conditioning = list[list]


def with_options(conditioning: Conditioning, **options: object) -> Conditioning:
    """A copy with `options` set on every entry; the input is shared with other nodes and stays untouched."""
    return [[embeddings, {**entry_options, **options}] for embeddings, entry_options in conditioning]


class CLIPTextEncode:
    DESCRIPTION = "Encodes a text prompt with a text encoder into conditioning for the diffusion model."
    CATEGORY = "conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The prompt's embeddings.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The prompt to encode."}),
            "clip": ("CLIP", {"tooltip": "The text encoder (from CLIPLoader)."}),
        }}

    def encode(self, clip, text: str) -> tuple[Conditioning]:
        return ([[encode_prompt(clip, text), {}]],)


class FluxGuidance:
    DESCRIPTION = "Sets the embedded guidance strength (FLUX.2-dev; klein models ignore it)."
    CATEGORY = "advanced/conditioning/flux"
    FUNCTION = "append"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "The conditioning to set the guidance on."}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                   "tooltip": "Embedded guidance strength (the FLUX.2-dev templates use 4)."}),
        }}

    def append(self, conditioning: Conditioning, guidance: float) -> tuple[Conditioning]:
        return (with_options(conditioning, guidance=guidance),)


class ConditioningZeroOut:
    DESCRIPTION = "Zeroes the embeddings, keeping the options (the negative of distilled klein workflows)."
    CATEGORY = "advanced/conditioning"
    FUNCTION = "zero_out"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"conditioning": ("CONDITIONING", {"tooltip": "The conditioning to zero out."})}}

    def zero_out(self, conditioning: Conditioning) -> tuple[Conditioning]:
        return ([[torch.zeros_like(embeddings), dict(options)] for embeddings, options in conditioning],)


class ReferenceLatent:
    DESCRIPTION = ("Adds a latent as a reference for edit models (FLUX.2 references); chain several nodes for "
                   "several references.")
    CATEGORY = "advanced/conditioning/edit_models"
    FUNCTION = "append"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {"conditioning": ("CONDITIONING", {"tooltip": "The conditioning to add the reference to."})},
            "optional": {"latent": ("LATENT", {"tooltip": "The encoded reference image; when absent the "
                                                          "conditioning passes through unchanged."})},
        }

    def append(self, conditioning: Conditioning, latent: dict | None = None) -> tuple[Conditioning]:
        if latent is None:
            return (conditioning,)
        samples = latent_samples(latent, "ReferenceLatent: latent")
        return ([[embeddings, {**options, "reference_latents": [*options.get("reference_latents", []), samples]}]
                 for embeddings, options in conditioning],)


class ConditioningCombine:
    DESCRIPTION = "Both conditionings' entries in one list (ComfyUI samples each entry and averages the predictions)."
    CATEGORY = "conditioning"
    FUNCTION = "combine"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"conditioning_1": ("CONDITIONING", {"tooltip": "The first conditioning."}),
                             "conditioning_2": ("CONDITIONING", {"tooltip": "The second conditioning."})}}

    def combine(self, conditioning_1: Conditioning, conditioning_2: Conditioning) -> tuple[Conditioning]:
        return (conditioning_1 + conditioning_2,)


class ConditioningAverage:
    DESCRIPTION = ("Blends the embeddings: to * strength + from * (1 - strength), the first entry of `from` cut or "
                   "zero-padded to each entry's length; the options stay those of `to`.")
    CATEGORY = "conditioning"
    FUNCTION = "addWeighted"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "conditioning_to": ("CONDITIONING", {"tooltip": "The conditioning kept at strength 1."}),
            "conditioning_from": ("CONDITIONING", {"tooltip": "The conditioning blended in (its first entry)."}),
            "conditioning_to_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                                   "tooltip": "The share of conditioning_to."}),
        }}

    def addWeighted(self, conditioning_to: Conditioning, conditioning_from: Conditioning,
                    conditioning_to_strength: float) -> tuple[Conditioning]:
        source = conditioning_from[0][0]
        blended = []
        for embeddings, options in conditioning_to:
            length = embeddings.shape[1]
            matched = torch.nn.functional.pad(source[:, :length], (0, 0, 0, max(0, length - source.shape[1])))
            mixed = embeddings * conditioning_to_strength + matched * (1.0 - conditioning_to_strength)
            blended.append([mixed, dict(options)])
        return (blended,)


class ConditioningSetTimestepRange:
    DESCRIPTION = "Limits the conditioning to a part of the sampling run (0 = start, 1 = end)."
    CATEGORY = "advanced/conditioning"
    FUNCTION = "set_range"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "The conditioning."}),
            "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Where it starts."}),
            "end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Where it ends."}),
        }}

    def set_range(self, conditioning: Conditioning, start: float, end: float) -> tuple[Conditioning]:
        return (with_options(conditioning, start_percent=start, end_percent=end),)


NODE_CLASS_MAPPINGS = {
    "ConditioningCombine": ConditioningCombine,
    "ConditioningAverage": ConditioningAverage,
    "ConditioningSetTimestepRange": ConditioningSetTimestepRange,
    "CLIPTextEncode": CLIPTextEncode,
    "FluxGuidance": FluxGuidance,
    "ConditioningZeroOut": ConditioningZeroOut,
    "ReferenceLatent": ReferenceLatent,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CLIPTextEncode": "CLIP Text Encode (Prompt)",
}
