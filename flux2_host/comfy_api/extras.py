"""Stand-in for ComfyUI's `comfy_extras` package: its node modules, each answering with the host's core node
classes of the same names (so `from comfy_extras.nodes_mask import GrowMask` gives the host's GrowMask, as
`nodes.PreviewImage` gives the host's PreviewImage).

Which module defines which node is ComfyUI's layout. A few core nodes the host does not have are still
importable, because packs import them at module level for one node among many (rgthree's SDXL prompt node,
its batch helper): using one raises `ComfyInternalsMissing` naming it. Any other name, or a module not listed,
fails the import with the name asked for.
"""

from __future__ import annotations

import sys
import types

from . import STAND_IN_MARK, ComfyInternalsMissing

# comfy_extras module -> the node ids ComfyUI defines there that the host has (its core node classes).
HOST_NODES: dict[str, tuple[str, ...]] = {
    "nodes_custom_sampler": ("BasicGuider", "BasicScheduler", "BetaSamplingScheduler", "CFGGuider", "DisableNoise",
                             "KSamplerSelect", "KarrasScheduler", "RandomNoise", "SamplerCustom",
                             "SamplerCustomAdvanced", "SplitSigmas", "SplitSigmasDenoise"),
    "nodes_differential_diffusion": ("DifferentialDiffusion",),
    "nodes_edit_model": ("ReferenceLatent",),
    "nodes_flux": ("FluxGuidance",),
    "nodes_images": ("GetImageSize", "ImageCrop", "ImageScaleToMaxDimension", "ImageStitch"),
    "nodes_mask": ("CropMask", "FeatherMask", "GrowMask", "ImageCompositeMasked", "ImageToMask", "InvertMask",
                   "LatentCompositeMasked", "MaskComposite", "MaskPreview", "MaskToImage", "SolidMask",
                   "ThresholdMask"),
    "nodes_model_advanced": ("ModelSamplingFlux",),
    "nodes_post_processing": ("ImageBlend", "ImageBlur", "ImageScaleToTotalPixels", "ImageSharpen"),
    "nodes_preview_any": ("PreviewAny",),
    "nodes_primitive": ("PrimitiveBoolean", "PrimitiveFloat", "PrimitiveInt", "PrimitiveString",
                        "PrimitiveStringMultiline"),
    "nodes_sd3": ("EmptySD3LatentImage",),
    "nodes_string": ("RegexReplace", "StringConcatenate", "StringReplace"),
    "nodes_upscale_model": ("ImageUpscaleWithModel", "UpscaleModelLoader"),
}

# ComfyUI core nodes the host has not, that packs import at module level: importable, unusable.
ABSENT_NODES: dict[str, tuple[str, ...]] = {
    "nodes_clip_sdxl": ("CLIPTextEncodeSDXL", "CLIPTextEncodeSDXLRefiner"),
    "nodes_latent": ("LatentBatch",),
}


def absent_node(qualified_name: str) -> type:
    """A class under a ComfyUI core node's name whose use says that the host lacks it."""

    def __init__(self, *args, **kwargs) -> None:
        raise ComfyInternalsMissing(qualified_name)

    def INPUT_TYPES(cls):
        raise ComfyInternalsMissing(qualified_name)

    name = qualified_name.rsplit(".", 1)[1]
    return type(name, (), {"__init__": __init__, "INPUT_TYPES": classmethod(INPUT_TYPES),
                           "__module__": qualified_name.rsplit(".", 1)[0],
                           "__doc__": f"ComfyUI's {name}, which the flux2 host does not have."})


def node_module(module_name: str, host_nodes: tuple[str, ...], absent: tuple[str, ...], core: dict[str, type]):
    qualified = f"comfy_extras.{module_name}"
    module = types.ModuleType(qualified, f"Stand-in for ComfyUI's {qualified} (flux2 host).")
    setattr(module, STAND_IN_MARK, True)
    for name in absent:
        setattr(module, name, absent_node(f"{qualified}.{name}"))

    def __getattr__(name: str):
        if name in host_nodes and name in core:  # looked up late: `core` is filled when the registry is bound
            return core[name]
        if name.startswith("__"):
            raise AttributeError(f"module {qualified!r} has no attribute {name!r}")
        raise ComfyInternalsMissing(f"{qualified}.{name}")

    module.__getattr__ = __getattr__
    return module


def install(core: dict[str, type]) -> None:
    """Put `comfy_extras` and its listed node modules into sys.modules; `core` maps node ids to the host's core
    node classes (the `nodes` stand-in's table, filled by `nodes.bind`)."""
    package = types.ModuleType("comfy_extras", "Stand-in for ComfyUI's comfy_extras (flux2 host): node modules only.")
    package.__path__ = []  # a module not listed fails to import with its own name
    setattr(package, STAND_IN_MARK, True)
    sys.modules["comfy_extras"] = package
    for module_name in sorted(set(HOST_NODES) | set(ABSENT_NODES)):
        module = node_module(module_name, HOST_NODES.get(module_name, ()), ABSENT_NODES.get(module_name, ()), core)
        setattr(package, module_name, module)
        sys.modules[module.__name__] = module
