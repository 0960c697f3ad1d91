"""A tiny V1 node pack for the host tests: cheap nodes that exercise every executor feature.

`NODE_CLASS_MAPPINGS` are the test nodes. `TEMPLATE_NODE_CLASS_MAPPINGS` declares the INPUT_TYPES and
RETURN_TYPES of the ComfyUI core nodes the official FLUX.2 templates use, with the same widget order as
ComfyUI, so UI -> API conversion of those templates can be checked; their functions are never called.
"""

from __future__ import annotations

import threading
import time

import torch

from flux2_core.progress import check_interrupt, report_progress

CATEGORY = "testing"


class ConstantInt:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": -100, "max": 100, "control_after_generate": True})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value):
        return (value,)


class ConstantString:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "", "multiline": True})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, text):
        return (text,)


class AddInts:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"default": 0}), "b": ("INT", {"default": 0})}}

    RETURN_TYPES = ("INT",)
    RETURN_NAMES = ("sum",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, a, b):
        return (a + b,)


class ConcatStrings:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("STRING", {"default": ""})},
                "optional": {"b": ("STRING", {"default": "", "forceInput": True}),
                             "separator": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, a, b="", separator=""):
        return (a + separator + b,)


class Seeded:
    """A seed-named INT input: the UI stores a control_after_generate value after it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**64 - 1}),
                             "label": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, seed, label):
        return (seed,)


class Choice:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"choice": (["red", "green", "blue"], {"default": "red"})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, choice):
        return (choice,)


SLOW_STARTED = threading.Event()


class SlowCounter:
    """Counts `steps` steps, reporting progress with a FLUX.2-shaped preview latent and checking interrupts."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0}),
                             "steps": ("INT", {"default": 3, "min": 1, "max": 10000}),
                             "delay": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value, steps, delay):
        for step in range(steps):
            check_interrupt()
            SLOW_STARTED.set()
            time.sleep(delay)
            report_progress(step + 1, steps, torch.randn(1, 128, 2, 2))
        return (value + steps,)


class Explode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value):
        raise RuntimeError(f"boom with value {value}")


class ShowAnything:
    """The output node: shows whatever it receives."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",)}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value):
        return {"ui": {"text": [repr(value)]}}


class ShowInt:
    """An output node that takes an INT only, and passes it on."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}}

    RETURN_TYPES = ("INT",)
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value):
        return {"ui": {"text": [str(value)]}, "result": (value,)}


class EvenOnly:
    """VALIDATE_INPUTS rejects odd numbers; IS_CHANGED folds in a token the test controls."""

    token = "a"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": 10})}}

    @classmethod
    def VALIDATE_INPUTS(cls, value):
        if value % 2:
            return f"{value} is odd"
        return True

    @classmethod
    def IS_CHANGED(cls, value):
        return cls.token

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value):
        return (value,)


class AlwaysChanged:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}}

    @classmethod
    def IS_CHANGED(cls, value):
        return float("nan")

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value):
        return (value,)


class BrokenValidation:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}}

    @classmethod
    def VALIDATE_INPUTS(cls, value):
        raise ValueError("validator crashed")

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value):
        return (value,)


class MakeList:
    """OUTPUT_IS_LIST: one call yields `count` values that downstream nodes receive one by one."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"count": ("INT", {"default": 3, "min": 0, "max": 100})}}

    RETURN_TYPES = ("INT",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, count):
        return (list(range(count)),)


class SumList:
    """INPUT_IS_LIST: receives every value at once."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"values": ("INT", {"default": 0})}}

    RETURN_TYPES = ("INT",)
    INPUT_IS_LIST = True
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, values):
        return (sum(values),)


class LazySwitch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"switch": ("BOOLEAN", {"default": False}),
                             "on_false": ("*", {"lazy": True}),
                             "on_true": ("*", {"lazy": True})}}

    RETURN_TYPES = ("*",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def check_lazy_status(self, switch, on_false=None, on_true=None):
        return ["on_true" if switch else "on_false"]

    def run(self, switch, on_false=None, on_true=None):
        return (on_true if switch else on_false,)


class HiddenInputs:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value, prompt, extra_pnginfo, unique_id):
        return {"ui": {"seen": [{"prompt_ids": sorted(prompt), "extra_pnginfo": extra_pnginfo,
                                 "unique_id": unique_id}]}}


class Undecorated:
    """No CATEGORY, DESCRIPTION or RETURN_NAMES: /object_info must fill ComfyUI's defaults."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    def run(self):
        return (1,)


NODE_CLASS_MAPPINGS = {
    "TestConstantInt": ConstantInt,
    "TestConstantString": ConstantString,
    "TestAddInts": AddInts,
    "TestConcatStrings": ConcatStrings,
    "TestSeeded": Seeded,
    "TestChoice": Choice,
    "TestSlowCounter": SlowCounter,
    "TestExplode": Explode,
    "TestShowAnything": ShowAnything,
    "TestShowInt": ShowInt,
    "TestEvenOnly": EvenOnly,
    "TestAlwaysChanged": AlwaysChanged,
    "TestBrokenValidation": BrokenValidation,
    "TestMakeList": MakeList,
    "TestSumList": SumList,
    "TestLazySwitch": LazySwitch,
    "TestHiddenInputs": HiddenInputs,
    "TestUndecorated": Undecorated,
}

NODE_DISPLAY_NAME_MAPPINGS = {"TestConstantInt": "Constant Int (test)"}


# ---------------------------------------------------------------------------------------------------------------
# Declarations of the ComfyUI core nodes the official FLUX.2 templates use (widget order only).


def _declared(name, required, outputs, optional=None, output_node=False, hidden=None):
    inputs = {"required": required}
    if optional:
        inputs["optional"] = optional
    if hidden:
        inputs["hidden"] = hidden

    def not_run(self, **kwargs):
        raise NotImplementedError(f"{name} is a declaration for widget-order tests only")

    return type(name, (), {"INPUT_TYPES": classmethod(lambda cls: inputs), "RETURN_TYPES": outputs,
                           "OUTPUT_NODE": output_node, "FUNCTION": "run", "CATEGORY": "declared",
                           "run": not_run})


_FILES = {
    "unet": ["flux2_dev_fp8mixed.safetensors", "flux-2-klein-4b.safetensors", "flux-2-klein-9b.safetensors",
             "flux-2-klein-base-4b.safetensors", "flux-2-klein-base-9b.safetensors",
             "flux-2-klein-4b-fp8.safetensors", "flux-2-klein-9b-fp8.safetensors",
             "flux-2-klein-base-4b-fp8.safetensors", "flux-2-klein-base-9b-fp8.safetensors",
             "flux-2-klein-9b-kv-fp8.safetensors"],
    "clip": ["mistral_3_small_flux2_bf16.safetensors", "mistral_3_small_flux2_fp8.safetensors",
             "qwen_3_4b.safetensors", "qwen_3_8b_fp8mixed.safetensors"],
    "vae": ["flux2-vae.safetensors", "full_encoder_small_decoder.safetensors"],
    "lora": ["Flux_2-Turbo-LoRA_comfyui.safetensors", "Flux2TurboComfyv2.safetensors"],
}
_SIZE = ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16})
_IMAGE_FILES = ["image_flux2_input_image.png", "image_flux2_input_Illustration.png", "image_flux2_input_ref_image.png",
                "safari_outfit.png", "man_in_street.png", "robed_women.png", "bag.png"]

TEMPLATE_NODE_CLASS_MAPPINGS = {
    "UNETLoader": _declared("UNETLoader", {
        "unet_name": (_FILES["unet"],),
        "weight_dtype": (["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"],)}, ("MODEL",)),
    "CLIPLoader": _declared("CLIPLoader", {
        "clip_name": (_FILES["clip"],), "type": (["stable_diffusion", "flux", "flux2"],)}, ("CLIP",),
        optional={"device": (["default", "cpu"], {"advanced": True})}),
    "VAELoader": _declared("VAELoader", {"vae_name": (_FILES["vae"],)}, ("VAE",)),
    "CLIPTextEncode": _declared("CLIPTextEncode", {
        "text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)}, ("CONDITIONING",)),
    "FluxGuidance": _declared("FluxGuidance", {
        "conditioning": ("CONDITIONING",),
        "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1})}, ("CONDITIONING",)),
    "ConditioningZeroOut": _declared("ConditioningZeroOut", {"conditioning": ("CONDITIONING",)}, ("CONDITIONING",)),
    "ReferenceLatent": _declared("ReferenceLatent", {"conditioning": ("CONDITIONING",)}, ("CONDITIONING",),
                                 optional={"latent": ("LATENT",)}),
    "EmptyFlux2LatentImage": _declared("EmptyFlux2LatentImage", {
        "width": _SIZE, "height": _SIZE, "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}, ("LATENT",)),
    "Flux2Scheduler": _declared("Flux2Scheduler", {
        "steps": ("INT", {"default": 20, "min": 1, "max": 4096}), "width": _SIZE, "height": _SIZE}, ("SIGMAS",)),
    "RandomNoise": _declared("RandomNoise", {
        "noise_seed": ("INT", {"default": 0, "min": 0, "max": 2**64 - 1, "control_after_generate": True})},
        ("NOISE",)),
    "KSamplerSelect": _declared("KSamplerSelect", {"sampler_name": (["euler", "heun"],)}, ("SAMPLER",)),
    "BasicGuider": _declared("BasicGuider", {"model": ("MODEL",), "conditioning": ("CONDITIONING",)}, ("GUIDER",)),
    "CFGGuider": _declared("CFGGuider", {
        "model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
        "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0})}, ("GUIDER",)),
    "SamplerCustomAdvanced": _declared("SamplerCustomAdvanced", {
        "noise": ("NOISE",), "guider": ("GUIDER",), "sampler": ("SAMPLER",), "sigmas": ("SIGMAS",),
        "latent_image": ("LATENT",)}, ("LATENT", "LATENT")),
    "VAEEncode": _declared("VAEEncode", {"pixels": ("IMAGE",), "vae": ("VAE",)}, ("LATENT",)),
    "VAEDecode": _declared("VAEDecode", {"samples": ("LATENT",), "vae": ("VAE",)}, ("IMAGE",)),
    "ImageScaleToTotalPixels": _declared("ImageScaleToTotalPixels", {
        "image": ("IMAGE",), "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],),
        "megapixels": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 16.0}),
        "resolution_steps": ("INT", {"default": 1, "min": 1, "max": 256})}, ("IMAGE",)),
    "GetImageSize": _declared("GetImageSize", {"image": ("IMAGE",)}, ("INT", "INT", "INT"),
                              hidden={"unique_id": "UNIQUE_ID"}),
    "LoraLoaderModelOnly": _declared("LoraLoaderModelOnly", {
        "model": ("MODEL",), "lora_name": (_FILES["lora"],),
        "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0})}, ("MODEL",)),
    "LoadImage": _declared("LoadImage", {"image": (_IMAGE_FILES, {"image_upload": True})}, ("IMAGE", "MASK")),
    "SaveImage": _declared("SaveImage", {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                           (), output_node=True, hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}),
    "PreviewImage": _declared("PreviewImage", {"images": ("IMAGE",)}, (), output_node=True),
    "PrimitiveInt": _declared("PrimitiveInt", {
        "value": ("INT", {"default": 0, "min": -2**63, "max": 2**63 - 1, "control_after_generate": True})}, ("INT",)),
    "PrimitiveBoolean": _declared("PrimitiveBoolean", {"value": ("BOOLEAN",)}, ("BOOLEAN",)),
    "PrimitiveStringMultiline": _declared("PrimitiveStringMultiline", {"value": ("STRING", {"multiline": True})},
                                          ("STRING",)),
    "ComfySwitchNode": _declared("ComfySwitchNode", {
        "switch": ("BOOLEAN",), "on_false": ("*", {"lazy": True}), "on_true": ("*", {"lazy": True})}, ("*",)),
    "FluxKVCache": _declared("FluxKVCache", {"model": ("MODEL",)}, ("MODEL",)),
}
