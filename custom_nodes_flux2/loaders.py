"""Loader nodes: a DiT, a text encoder or a VAE from the ComfyUI model folders (a file, or a whole model folder
in Hugging Face / diffusers layout), on the default device and compute dtype."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flux2_core.checkpoints.loaders import load_text_encoder, load_vae
from flux2_core.memory.residency import load_managed
from flux2_core.patched_model import PatchedModel
from flux2_core.vae import Flux2VAE

from .comfy_bridge import model_files, model_path

if TYPE_CHECKING:  # importing it pulls in transformers, which only loading a text encoder should pay for
    from flux2_core.text_encoders import Flux2TextEncoder

CATEGORY = "FLUX.2/loaders"

# Storage dtypes; "default" keeps the file's own (fp8 files stay fp8, bf16 files compute in the default dtype).
WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "bf16", "fp16", "fp32"]


class Flux2LoadModel:
    DESCRIPTION = ("Loads a FLUX.2 diffusion model (dev, klein 4B/9B, base or distilled) from models/diffusion_models. "
                   "The architecture is read from the tensors; base vs distilled klein from the file name or metadata.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FLUX2_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The diffusion model, with its variant's default steps, guidance and CFG.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model_name": (model_files("diffusion_models"), {
                "tooltip": "A FLUX.2 DiT file (BFL, ComfyUI or diffusers naming; bf16 or fp8) or a diffusers folder."}),
            "weight_dtype": (WEIGHT_DTYPES, {
                "default": "default",
                "tooltip": "How weights are stored in memory: 'default' keeps the file's format; fp8_e4m3fn "
                           "quantizes the block linears to halve memory (fp8_e4m3fn_fast also multiplies in fp8 on "
                           "GPUs with fp8 tensor cores); bf16/fp16/fp32 store plain weights."}),
        }}

    def load(self, model_name: str, weight_dtype: str) -> tuple[PatchedModel]:
        return (PatchedModel.load(model_path("diffusion_models", model_name, "Flux2LoadModel: model_name"),
                                  weight_dtype),)


class Flux2LoadTextEncoder:
    DESCRIPTION = ("Loads the text encoder that belongs to a FLUX.2 model from models/text_encoders: Qwen3-4B for "
                   "klein 4B, Qwen3-8B for klein 9B, Mistral Small 3 for dev.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FLUX2_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The text encoder; connect it to FLUX.2 Text Encode.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "text_encoder_name": (model_files("text_encoders"), {
                "tooltip": "A Qwen3 or Mistral 3 text encoder file (ComfyUI single file) or a Hugging Face folder."}),
        }}

    def load(self, text_encoder_name: str) -> tuple[Flux2TextEncoder]:
        path = model_path("text_encoders", text_encoder_name, "Flux2LoadTextEncoder: text_encoder_name")
        return (load_managed(load_text_encoder, path, name=f"text encoder {text_encoder_name}"),)


class Flux2LoadVAE:
    DESCRIPTION = "Loads the FLUX.2 autoencoder (full, or the small-decoder variant) from models/vae."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FLUX2_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The autoencoder, for encoding reference / start images and decoding results.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "vae_name": (model_files("vae"), {
                "tooltip": "The FLUX.2 VAE file (flux2-vae.safetensors, ae.safetensors, ...) or a diffusers folder."}),
        }}

    def load(self, vae_name: str) -> tuple[Flux2VAE]:
        return (load_managed(load_vae, model_path("vae", vae_name, "Flux2LoadVAE: vae_name"), name=f"VAE {vae_name}"),)


class Flux2LoadLoRA:
    DESCRIPTION = ("Applies a LoRA from models/loras to a FLUX.2 model. Reads every dialect: kohya / musubi-tuner, "
                   "diffusers / PEFT, BFL / ai-toolkit, DiffSynth-Studio, LyCORIS LoHa and LoKr. Chain several "
                   "nodes to stack LoRAs; the same LoRA twice is applied once.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FLUX2_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied on the fly while sampling (the loaded weights stay untouched).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("FLUX2_MODEL", {"tooltip": "The FLUX.2 model to apply the LoRA to."}),
            "lora_name": (model_files("loras"), {"tooltip": "A LoRA file trained for this FLUX.2 variant."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                   "tooltip": "Multiplier of the LoRA's change; 0 leaves the model as it is, "
                                              "negative values push the other way."}),
        }}

    def load(self, model: PatchedModel, lora_name: str, strength: float) -> tuple[PatchedModel]:
        if strength == 0:
            return (model,)
        return (model.with_lora(model_path("loras", lora_name, "Flux2LoadLoRA: lora_name"), strength),)


NODE_CLASS_MAPPINGS = {
    "Flux2LoadModel": Flux2LoadModel,
    "Flux2LoadTextEncoder": Flux2LoadTextEncoder,
    "Flux2LoadVAE": Flux2LoadVAE,
    "Flux2LoadLoRA": Flux2LoadLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "Flux2LoadModel": "Load FLUX.2 Model",
    "Flux2LoadTextEncoder": "Load FLUX.2 Text Encoder",
    "Flux2LoadVAE": "Load FLUX.2 VAE",
    "Flux2LoadLoRA": "Load FLUX.2 LoRA",
}
