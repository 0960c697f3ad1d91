"""MASK nodes under ComfyUI's names and inputs. A MASK is float [B, H, W] in 0..1 (1 = the region to change);
the formulas follow ComfyUI's mask nodes (comfy_extras/nodes_mask.py and nodes.py)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .. import folders
from .images import InputImageFile, PreviewImage, _input_images
from .latent import MAX_RESOLUTION

CATEGORY = "mask"
CHANNELS = ["red", "green", "blue", "alpha"]


def as_masks(mask: torch.Tensor) -> torch.Tensor:
    """Any MASK ([H, W], [B, H, W], [B, 1, H, W]) as [B, H, W]."""
    return mask.reshape(-1, mask.shape[-2], mask.shape[-1])


def mask_as_image(mask: torch.Tensor) -> torch.Tensor:
    """MASK -> grey IMAGE [B, H, W, 3]."""
    return as_masks(mask).unsqueeze(-1).expand(-1, -1, -1, 3)


def _int(default: int, minimum: int = 0, maximum: int = MAX_RESOLUTION, tooltip: str = "") -> tuple:
    return ("INT", {"default": default, "min": minimum, "max": maximum, "step": 1, "tooltip": tooltip})


class _MaskNode:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK",)


class LoadImageMask(InputImageFile, _MaskNode):
    DESCRIPTION = "Loads one channel of an image in the input folder as a mask (alpha is inverted: transparent = 1)."
    FUNCTION = "load_image"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": (_input_images(), {"image_upload": True, "tooltip": "An image in the input folder."}),
            "channel": (CHANNELS[3:] + CHANNELS[:3], {"tooltip": "The channel to read."}),
        }}

    def load_image(self, image: str, channel: str) -> tuple[torch.Tensor]:
        with Image.open(folders.get_annotated_filepath(image)) as picture:
            picture = ImageOps.exif_transpose(picture)
            if picture.getbands() != ("R", "G", "B", "A"):
                if picture.mode == "I":  # 16-bit greyscale
                    picture = picture.point(lambda value: value * (1 / 255))
                picture = picture.convert("RGBA")
            band = channel[0].upper()
            values = torch.from_numpy(np.asarray(picture.getchannel(band), dtype=np.float32) / 255.0)
        return ((1.0 - values if band == "A" else values).unsqueeze(0),)


class ImageToMask(_MaskNode):
    DESCRIPTION = "One channel of an image as a mask."
    FUNCTION = "image_to_mask"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": ("IMAGE", {"tooltip": "The image."}),
                             "channel": (CHANNELS, {"tooltip": "The channel that becomes the mask."})}}

    def image_to_mask(self, image: torch.Tensor, channel: str) -> tuple[torch.Tensor]:
        index = CHANNELS.index(channel)
        if index >= image.shape[-1]:
            raise ValueError(f"ImageToMask: channel: the image has {image.shape[-1]} channels, found {channel!r}")
        return (image[..., index],)


class MaskToImage:
    DESCRIPTION = "A mask as a grey image."
    CATEGORY = CATEGORY
    FUNCTION = "mask_to_image"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"mask": ("MASK", {"tooltip": "The mask."})}}

    def mask_to_image(self, mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (mask_as_image(mask),)


class InvertMask(_MaskNode):
    DESCRIPTION = "1 - mask."
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"mask": ("MASK", {"tooltip": "The mask to invert."})}}

    def invert(self, mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (1.0 - mask,)


class SolidMask(_MaskNode):
    DESCRIPTION = "A mask of one value."
    FUNCTION = "solid"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "value": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "The mask value."}),
            "width": _int(512, 1, tooltip="Width in pixels."),
            "height": _int(512, 1, tooltip="Height in pixels."),
        }}

    def solid(self, value: float, width: int, height: int) -> tuple[torch.Tensor]:
        return (torch.full((1, height, width), value, dtype=torch.float32),)


class GrowMask(_MaskNode):
    DESCRIPTION = ("Grows (expand > 0) or shrinks (expand < 0) a mask by one pixel per step: a 3 x 3 grey "
                   "dilation / erosion, a cross with tapered corners, else a square.")
    FUNCTION = "expand_mask"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "mask": ("MASK", {"tooltip": "The mask."}),
            "expand": _int(0, -MAX_RESOLUTION, tooltip="Pixels to grow (negative: shrink)."),
            "tapered_corners": ("BOOLEAN", {"default": True, "tooltip": "Grow along a cross (rounder corners)."}),
        }}

    def expand_mask(self, mask: torch.Tensor, expand: int, tapered_corners: bool) -> tuple[torch.Tensor]:
        masks = as_masks(mask).float().unsqueeze(1)
        sign = 1.0 if expand >= 0 else -1.0  # erosion is dilation of the negated mask
        grown = masks * sign
        for _ in range(abs(expand)):
            grown = _dilate(grown, tapered_corners)
        return ((grown * sign).squeeze(1),)


def _dilate(masks: torch.Tensor, cross: bool) -> torch.Tensor:
    """One 3 x 3 grey dilation of [B, 1, H, W] over in-image neighbours (outside pixels never win)."""
    padded = F.pad(masks, (1, 1, 1, 1), value=float("-inf"))
    if not cross:
        return F.max_pool2d(padded, 3, stride=1)
    height, width = masks.shape[-2:]
    shifted = [padded[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
               for dy, dx in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))]
    return torch.stack(shifted).amax(0)


class FeatherMask(_MaskNode):
    DESCRIPTION = "Fades the mask linearly towards each edge over the given number of pixels."
    FUNCTION = "feather"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"mask": ("MASK", {"tooltip": "The mask."}),
                             **{side: _int(0, tooltip=f"Feather width at the {side} edge.")
                                for side in ("left", "top", "right", "bottom")}}}

    def feather(self, mask: torch.Tensor, left: int, top: int, right: int, bottom: int) -> tuple[torch.Tensor]:
        output = as_masks(mask).clone()
        height, width = output.shape[-2:]
        left, right, top, bottom = min(left, width), min(right, width), min(top, height), min(bottom, height)
        for x in range(left):
            output[:, :, x] *= (x + 1) / left
        # ComfyUI indexes the right and bottom edges as -x, so x = 0 scales column / row 0 (not the last one).
        for x in range(right):
            output[:, :, -x] *= (x + 1) / right
        for y in range(top):
            output[:, y, :] *= (y + 1) / top
        for y in range(bottom):
            output[:, -y, :] *= (y + 1) / bottom
        return (output,)


class ThresholdMask(_MaskNode):
    DESCRIPTION = "1 where the mask is above the value, else 0."
    FUNCTION = "image_to_mask"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"mask": ("MASK", {"tooltip": "The mask."}),
                             "value": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                                 "tooltip": "The threshold."})}}

    def image_to_mask(self, mask: torch.Tensor, value: float) -> tuple[torch.Tensor]:
        return ((mask > value).float(),)


class CropMask(_MaskNode):
    DESCRIPTION = "The part of the mask at x, y of the given size (cut at the mask's edges)."
    FUNCTION = "crop"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"mask": ("MASK", {"tooltip": "The mask."}),
                             "x": _int(0, tooltip="Left edge."), "y": _int(0, tooltip="Top edge."),
                             "width": _int(512, 1, tooltip="Width."), "height": _int(512, 1, tooltip="Height.")}}

    def crop(self, mask: torch.Tensor, x: int, y: int, width: int, height: int) -> tuple[torch.Tensor]:
        return (as_masks(mask)[:, y:y + height, x:x + width],)


MASK_OPERATIONS = ["multiply", "add", "subtract", "and", "or", "xor"]


class MaskComposite(_MaskNode):
    DESCRIPTION = "Combines source into destination at x, y with the operation, clamped to 0..1."
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"destination": ("MASK", {"tooltip": "The mask to combine into."}),
                             "source": ("MASK", {"tooltip": "The mask to combine."}),
                             "x": _int(0, tooltip="Left edge of source."), "y": _int(0, tooltip="Top edge of source."),
                             "operation": (MASK_OPERATIONS, {"tooltip": "How to combine (and / or / xor on rounded "
                                                                        "values)."})}}

    def combine(self, destination: torch.Tensor, source: torch.Tensor, x: int, y: int,
                operation: str) -> tuple[torch.Tensor]:
        output = as_masks(destination).clone()
        source = as_masks(source)
        bottom, right = min(y + source.shape[-2], output.shape[-2]), min(x + source.shape[-1], output.shape[-1])
        if bottom > y and right > x:
            below = output[:, y:bottom, x:right]
            above = source[:, :bottom - y, :right - x]
            if operation in ("and", "or", "xor"):
                logical = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor}[operation]
                combined = logical(below.round().bool(), above.round().bool()).float()
            else:
                combined = {"multiply": below * above, "add": below + above, "subtract": below - above}[operation]
            output[:, y:bottom, x:right] = combined
        return (output.clamp(0.0, 1.0),)


class MaskPreview(PreviewImage):
    DESCRIPTION = "Shows a mask in the UI as a grey image."
    CATEGORY = CATEGORY
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"mask": ("MASK", {"tooltip": "The mask to preview."})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def execute(self, mask: torch.Tensor, prompt: dict | None = None, extra_pnginfo: dict | None = None) -> dict:
        return self.save_images(mask_as_image(mask), "ComfyUI", prompt, extra_pnginfo)


NODE_CLASS_MAPPINGS = {
    "LoadImageMask": LoadImageMask,
    "ImageToMask": ImageToMask,
    "MaskToImage": MaskToImage,
    "InvertMask": InvertMask,
    "SolidMask": SolidMask,
    "GrowMask": GrowMask,
    "FeatherMask": FeatherMask,
    "ThresholdMask": ThresholdMask,
    "CropMask": CropMask,
    "MaskComposite": MaskComposite,
    "MaskPreview": MaskPreview,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadImageMask": "Load Image (as Mask)",
    "ImageToMask": "Convert Image to Mask",
    "MaskToImage": "Convert Mask to Image",
    "InvertMask": "Invert Mask",
    "SolidMask": "Solid Mask",
    "GrowMask": "Grow Mask",
    "FeatherMask": "Feather Mask",
    "ThresholdMask": "Threshold Mask",
    "CropMask": "Crop Mask",
    "MaskComposite": "Mask Composite",
    "MaskPreview": "Preview Mask",
}
