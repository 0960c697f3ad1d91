"""Loader nodes under ComfyUI's names and widgets. MODEL carries a `PatchedModel`, CLIP a `Flux2TextEncoder`,
VAE a `Flux2VAE`; every size is read from the file's tensors."""

from __future__ import annotations

from flux2_core.checkpoints.loaders import load_text_encoder, load_vae
from flux2_core.checkpoints.reader import open_checkpoint
from flux2_core.lora.text_encoder import LoRATextEncoder, text_encoder_keys
from flux2_core.comfy_layouts import model_file_path
from flux2_core.memory.residency import load_managed
from flux2_core.patched_model import PatchedModel

from .. import folders

# ComfyUI's list, so workflows made for ComfyUI validate unchanged; only "flux2" loads here.
CLIP_TYPES = [
    "stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos", "lumina2",
    "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image", "flux2", "ovis", "longcat_image",
]
UNET_WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]


def _model_path(kind: str, name: str, where: str) -> str:
    return model_file_path(folders, kind, name, where)


class UNETLoader:
    DESCRIPTION = "Loads a FLUX.2 diffusion model (DiT) from models/diffusion_models."
    CATEGORY = "advanced/loaders"
    FUNCTION = "load_unet"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "unet_name": (folders.get_filename_list("diffusion_models"), {"tooltip": "The diffusion model file."}),
            "weight_dtype": (UNET_WEIGHT_DTYPES, {"advanced": True, "tooltip": "'default' keeps the file's storage; "
                                                  "an fp8 type stores the block linears in fp8."}),
        }}

    def load_unet(self, unet_name: str, weight_dtype: str) -> tuple[PatchedModel]:
        return (PatchedModel.load(_model_path("diffusion_models", unet_name, "UNETLoader: unet_name"), weight_dtype),)


class UnetLoaderGGUF:
    """ComfyUI-GGUF's loader under its name and input, so workflows made with that pack run here."""

    DESCRIPTION = "Loads a GGUF-quantized FLUX.2 diffusion model; weights stay quantized and are dequantized per layer."
    CATEGORY = "bootleg"
    FUNCTION = "load_unet"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"unet_name": (folders.get_filename_list("unet_gguf"),
                                           {"tooltip": "The .gguf diffusion model file."})}}

    def load_unet(self, unet_name: str) -> tuple[PatchedModel]:
        return (PatchedModel.load(_model_path("unet_gguf", unet_name, "UnetLoaderGGUF: unet_name")),)


class UnetLoaderGGUFAdvanced(UnetLoaderGGUF):
    """ComfyUI-GGUF's advanced loader. Weights are always dequantized exactly (float32) and rounded once to the
    compute dtype, and LoRAs run on the fly, so its dtype and placement options change nothing here."""

    DESCRIPTION = UnetLoaderGGUF.DESCRIPTION + " The dtype options are accepted for compatibility and unused."
    _DTYPES = ["default", "target", "float32", "float16", "bfloat16"]

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        unused = "Accepted for ComfyUI-GGUF workflows; unused here."
        inputs = UnetLoaderGGUF.INPUT_TYPES()
        inputs["required"].update({
            "dequant_dtype": (cls._DTYPES, {"default": "default", "tooltip": unused}),
            "patch_dtype": (cls._DTYPES, {"default": "default", "tooltip": unused}),
            "patch_on_device": ("BOOLEAN", {"default": False, "tooltip": unused}),
        })
        return inputs

    def load_unet(self, unet_name: str, dequant_dtype: str = "default", patch_dtype: str = "default",
                  patch_on_device: bool = False) -> tuple[PatchedModel]:
        return super().load_unet(unet_name)


class CLIPLoader:
    DESCRIPTION = "Loads a text encoder from models/text_encoders (for FLUX.2: Qwen3 for klein, Mistral 3 for dev)."
    CATEGORY = "advanced/loaders"
    FUNCTION = "load_clip"
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip_name": (folders.get_filename_list("text_encoders"), {"tooltip": "The text encoder file."}),
                "type": (CLIP_TYPES, {"tooltip": "The model family the encoder is for; this host runs flux2."}),
            },
            "optional": {
                "device": (["default", "cpu"], {"advanced": True,
                                                "tooltip": "'cpu' keeps the encoder off the GPU."}),
            },
        }

    def load_clip(self, clip_name: str, type: str = "flux2", device: str = "default"):
        if type != "flux2":
            raise ValueError(f"CLIPLoader: type: expected 'flux2' (this host runs FLUX.2 only), found {type!r}")
        path = _model_path("text_encoders", clip_name, "CLIPLoader: clip_name")
        return (load_managed(load_text_encoder, path, name=f"text encoder {clip_name}",
                             device=None if device == "default" else device),)


class VAELoader:
    DESCRIPTION = "Loads the FLUX.2 VAE from models/vae."
    CATEGORY = "loaders"
    FUNCTION = "load_vae"
    RETURN_TYPES = ("VAE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"vae_name": (folders.get_filename_list("vae"), {"tooltip": "The VAE file."})}}

    def load_vae(self, vae_name: str):
        return (load_managed(load_vae, _model_path("vae", vae_name, "VAELoader: vae_name"), name=f"VAE {vae_name}"),)


class LoraLoaderModelOnly:
    DESCRIPTION = "Applies a LoRA (kohya, diffusers/PEFT, BFL/ai-toolkit, LyCORIS, ...) to the diffusion model."
    CATEGORY = "loaders"
    FUNCTION = "load_lora_model_only"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
            "lora_name": (folders.get_filename_list("loras"), {"tooltip": "The LoRA file."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "How strongly to apply it; 0 leaves the model unchanged."}),
        }}

    def load_lora_model_only(self, model: PatchedModel, lora_name: str, strength_model: float):
        if strength_model == 0:
            return (model,)
        # Applied on the fly while sampling; the cached DiT other graphs share is never written.
        return (model.with_lora(_model_path("loras", lora_name, "LoraLoaderModelOnly: lora_name"), strength_model),)


class LoraLoader:
    DESCRIPTION = ("Applies a LoRA to the diffusion model and, when the file has text-encoder weights, to the text "
                   "encoder (CLIP); a LoRA for the diffusion model only leaves the CLIP unchanged, as in ComfyUI.")
    CATEGORY = "loaders"
    FUNCTION = "load_lora"
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The modified diffusion model.", "The modified CLIP model.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}),
            "lora_name": (folders.get_filename_list("loras"), {"tooltip": "The name of the LoRA."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "How strongly to modify the diffusion model (may be negative)."}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                        "tooltip": "How strongly to modify the CLIP model (may be negative)."}),
        }}

    def load_lora(self, model: PatchedModel, clip, lora_name: str, strength_model: float, strength_clip: float):
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        path = _model_path("loras", lora_name, "LoraLoader: lora_name")
        if strength_clip != 0 and text_encoder_keys(list(open_checkpoint(path).keys())):
            clip = LoRATextEncoder(clip).with_lora_file(path, strength_clip)
        if strength_model != 0:
            model = model.with_lora(path, strength_model)
        return (model, clip)


NODE_CLASS_MAPPINGS = {
    "LoraLoader": LoraLoader,
    "UNETLoader": UNETLoader,
    "UnetLoaderGGUF": UnetLoaderGGUF,
    "UnetLoaderGGUFAdvanced": UnetLoaderGGUFAdvanced,
    "CLIPLoader": CLIPLoader,
    "VAELoader": VAELoader,
    "LoraLoaderModelOnly": LoraLoaderModelOnly,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoraLoader": "Load LoRA",
    "UNETLoader": "Load Diffusion Model",
    "UnetLoaderGGUF": "Unet Loader (GGUF)",
    "UnetLoaderGGUFAdvanced": "Unet Loader (GGUF/Advanced)",
    "CLIPLoader": "Load CLIP",
    "VAELoader": "Load VAE",
    "LoraLoaderModelOnly": "LoraLoaderModelOnly",
}
