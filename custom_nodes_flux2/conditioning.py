"""FLUX2_CONDITIONING: a prompt's text embeddings plus the reference latents an edit is conditioned on.

Reference images follow the official preprocessing (`flux2_core.references`), whose pixel cap depends on how
many references there are in all (2024^2 for one, 1024^2 each for several). A reference node only sees the
references chained before it, so image references keep their source image and VAE and are re-encoded when a
later node changes the count's cap; the final conditioning then equals the official pipeline's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import torch
from PIL import Image

from flux2_core.comfy_layouts import encode_prompt, image_to_pils, latent_samples
from flux2_core.errors import Flux2Error
from flux2_core.memory import residency
from flux2_core.references import preprocess_reference, reference_pixel_cap
from flux2_core.vae import Flux2VAE

if TYPE_CHECKING:  # importing it pulls in transformers, which only loading a text encoder should pay for
    from flux2_core.text_encoders import Flux2TextEncoder

CATEGORY = "FLUX.2/conditioning"


@dataclasses.dataclass(frozen=True, eq=False)
class Reference:
    latent: torch.Tensor  # [1, 128, h, w]
    # Set for references made from an image: what to re-encode from, and the pixel cap `latent` was made under.
    picture: Image.Image | None = None
    vae: Flux2VAE | None = None
    pixel_cap: int | None = None


def encode_reference(picture: Image.Image, vae: Flux2VAE, pixel_cap: int) -> Reference:
    with residency.use(vae):
        latent = vae.encode(preprocess_reference(picture, pixel_cap)).float().cpu()
    return Reference(latent, picture, vae, pixel_cap)


@dataclasses.dataclass(frozen=True, eq=False)
class Flux2Conditioning:
    embeddings: torch.Tensor  # [1, 512, context_dim]
    # The encoder that made `embeddings`; the sampler encodes its default negative (the empty prompt) with it.
    text_encoder: Flux2TextEncoder
    references: tuple[Reference, ...] = ()

    @property
    def reference_latents(self) -> list[torch.Tensor]:
        return [reference.latent for reference in self.references]

    def with_references(self, added: list[Reference]) -> Flux2Conditioning:
        """These references appended, every image reference encoded under the cap of the new total count."""
        references = (*self.references, *added)
        cap = reference_pixel_cap(len(references))
        references = tuple(
            encode_reference(r.picture, r.vae, cap) if r.picture is not None and r.pixel_cap != cap else r
            for r in references)
        return dataclasses.replace(self, references=references)

    def empty_prompt(self) -> Flux2Conditioning:
        """The official default negative: the empty prompt, with the same references."""
        return dataclasses.replace(self, embeddings=self._empty_prompt_embeddings)

    @functools.cached_property
    def _empty_prompt_embeddings(self) -> torch.Tensor:
        # Encoded once per conditioning: the executor keeps this conditioning between runs, so sampling it
        # again (another seed, more steps) does not run the text encoder again.
        return encode_prompt(self.text_encoder, "")


class Flux2TextEncode:
    DESCRIPTION = "Encodes a prompt with a FLUX.2 text encoder into conditioning for FLUX.2 Sampler."
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("FLUX2_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The prompt's embeddings; add reference images to it for editing.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "text_encoder": ("FLUX2_TEXT_ENCODER", {"tooltip": "From Load FLUX.2 Text Encoder."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                  "tooltip": "What to generate, or for edits what to change."}),
        }}

    def encode(self, text_encoder: Flux2TextEncoder, prompt: str) -> tuple[Flux2Conditioning]:
        return (Flux2Conditioning(encode_prompt(text_encoder, prompt), text_encoder),)


class Flux2ReferenceImage:
    DESCRIPTION = ("Adds reference images to the conditioning, for editing and multi-reference generation. Each "
                   "image is preprocessed as in the official FLUX.2 code (downscaled to the pixel cap for the "
                   "number of references, center-cropped to multiples of 16) and encoded with the VAE. Chain "
                   "several to use several references.")
    CATEGORY = CATEGORY
    FUNCTION = "add_reference"
    RETURN_TYPES = ("FLUX2_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The conditioning with the images appended as references.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "conditioning": ("FLUX2_CONDITIONING", {"tooltip": "The prompt conditioning to add the references to."}),
            "image": ("IMAGE", {"tooltip": "One reference per image in the batch; at least 64 px a side, aspect "
                                           "ratio up to 8:1."}),
            "vae": ("FLUX2_VAE", {"tooltip": "The FLUX.2 VAE that encodes the references."}),
        }}

    def add_reference(self, conditioning: Flux2Conditioning, image: torch.Tensor,
                      vae: Flux2VAE) -> tuple[Flux2Conditioning]:
        pictures = image_to_pils(image)
        cap = reference_pixel_cap(len(conditioning.references) + len(pictures))
        try:
            added = [encode_reference(picture, vae, cap) for picture in pictures]
        except Flux2Error as error:
            raise Flux2Error(f"Flux2ReferenceImage: image: {error}") from error
        return (conditioning.with_references(added),)


class Flux2ReferenceLatent:
    DESCRIPTION = ("Adds already-encoded latents as references (no preprocessing), e.g. from FLUX.2 VAE Encode or "
                   "ComfyUI's VAEEncode.")
    CATEGORY = CATEGORY
    FUNCTION = "add_reference"
    RETURN_TYPES = ("FLUX2_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The conditioning with the latents appended as references.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "conditioning": ("FLUX2_CONDITIONING", {"tooltip": "The prompt conditioning to add the references to."}),
            "latent": ("LATENT", {"tooltip": "A FLUX.2 latent; each batch entry becomes one reference."}),
        }}

    def add_reference(self, conditioning: Flux2Conditioning, latent: dict) -> tuple[Flux2Conditioning]:
        samples = latent_samples(latent, "Flux2ReferenceLatent: latent")
        return (conditioning.with_references([Reference(entry.unsqueeze(0)) for entry in samples]),)


NODE_CLASS_MAPPINGS = {
    "Flux2TextEncode": Flux2TextEncode,
    "Flux2ReferenceImage": Flux2ReferenceImage,
    "Flux2ReferenceLatent": Flux2ReferenceLatent,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "Flux2TextEncode": "FLUX.2 Text Encode",
    "Flux2ReferenceImage": "FLUX.2 Reference Image",
    "Flux2ReferenceLatent": "FLUX.2 Reference Latent",
}
