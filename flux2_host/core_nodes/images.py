"""IMAGE nodes: loading from input/, saving to output/ (PNG with the workflow embedded), previews, scaling."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import string

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from flux2_core.comfy_layouts import image_to_pils, pil_to_image
from flux2_core.progress import check_interrupt

from .. import folders, saved_outputs
from .image_ops import resize_image


def _input_images() -> list[str]:
    directory = folders.get_input_directory()
    if not os.path.isdir(directory):  # created when the host configures its folders
        return []
    files = [f for f in os.listdir(directory) if os.path.isfile(os.path.join(directory, f))]
    return sorted(folders.filter_files_content_types(files, ["image"]))


def _alpha_mask(frame: Image.Image) -> torch.Tensor:
    """ComfyUI's MASK from a frame: 1 where transparent; a 64x64 zero mask when there is no alpha."""
    if "A" in frame.getbands():
        alpha = frame.getchannel("A")
    elif frame.mode == "P" and "transparency" in frame.info:
        alpha = frame.convert("RGBA").getchannel("A")
    else:
        return torch.zeros((1, 64, 64), dtype=torch.float32)
    return 1.0 - torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0).unsqueeze(0)


class InputImageFile:
    """What nodes reading an `image` file from input/ share: re-run when its bytes change; refuse a missing file."""

    @classmethod
    def IS_CHANGED(cls, image: str, **other_inputs: object) -> str:
        with open(folders.get_annotated_filepath(image), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, image: str) -> bool | str:
        if not folders.exists_annotated_filepath(image):
            return f"Invalid image file: {image}"
        return True


class LoadImage(InputImageFile):
    CATEGORY = "image"
    FUNCTION = "load_image"
    RETURN_TYPES = ("IMAGE", "MASK")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": (_input_images(), {"image_upload": True,
                                                         "tooltip": "An image in the input folder, or upload one."})}}

    def load_image(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every frame of the first frame's size (animated files give a batch), RGB in 0..1, plus alpha masks."""
        with Image.open(folders.get_annotated_filepath(image)) as picture:
            images, masks = [], []
            for frame in ImageSequence.Iterator(picture):
                frame = ImageOps.exif_transpose(frame)
                if frame.mode == "I":  # 16-bit greyscale PNGs
                    frame = frame.point(lambda value: value * (1 / 255))
                rgb = pil_to_image(frame)
                if images and rgb.shape != images[0].shape:
                    continue
                images.append(rgb)
                masks.append(_alpha_mask(frame))
            is_multi_picture_object = picture.format == "MPO"  # extra frames are previews, not animation
        if is_multi_picture_object:
            images, masks = images[:1], masks[:1]
        return torch.cat(images), torch.cat(masks)


class _InterruptibleBuffer(io.BytesIO):
    """Pillow writes a PNG as it compresses it, one buffer at a time; a check per write lets /interrupt stop a
    long encode (3.5 s at 4096x4096 on a CPU) before anything reaches the output folder."""

    def write(self, data) -> int:
        check_interrupt()
        return super().write(data)


class SaveImage:
    DESCRIPTION = "Saves images as PNG in the output folder, with the prompt and workflow embedded."
    CATEGORY = "image"
    FUNCTION = "save_images"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    folder_type = "output"
    file_suffix = ""
    compress_level = 4

    def output_directory(self) -> str:
        return folders.get_output_directory()

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "File name prefix; may contain "
                                               "subfolders and %date%-style variables such as %width%."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"},
        }

    def save_images(self, images: torch.Tensor, filename_prefix: str = "ComfyUI", prompt: dict | None = None,
                    extra_pnginfo: dict | None = None, unique_id: str | None = None) -> dict:
        """`{prefix}_{counter:05}_.png` per image; PNG text chunks `prompt` and one per extra_pnginfo key
        (`workflow`), so dropping the file on the canvas restores the graph. Under a server's record
        (`saved_outputs`), a prompt run again writes the names it chose the first time."""
        folder, filename, counter, subfolder, _ = folders.get_save_image_path(
            filename_prefix + self.file_suffix, self.output_directory(), images.shape[2], images.shape[1])
        saved = saved_outputs.current() if self.folder_type == "output" and unique_id is not None else None
        chosen = saved.recorded(unique_id) if saved is not None else {}
        metadata = PngInfo()
        if prompt is not None:
            metadata.add_text("prompt", json.dumps(prompt))
        for key, value in (extra_pnginfo or {}).items():
            metadata.add_text(key, json.dumps(value))
        results = []
        for batch_number, picture in enumerate(image_to_pils(images, truncate=True)):
            if batch_number in chosen and chosen[batch_number][0] == subfolder:
                file = chosen[batch_number][1]
            else:
                file = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
                counter += 1
                if saved is not None:  # before the write: a kill right after it finds the name recorded
                    saved.record(unique_id, batch_number, subfolder, file)
            encoded = _InterruptibleBuffer()
            picture.save(encoded, format="PNG", pnginfo=metadata, compress_level=self.compress_level)
            # Through a temp file and a rename: a crash mid-write never leaves a half PNG that /view serves.
            folders.write_atomically(os.path.join(folder, file), encoded.getvalue())
            results.append({"filename": file, "subfolder": subfolder, "type": self.folder_type})
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    DESCRIPTION = "Shows images in the UI (kept in the temp folder)."
    folder_type = "temp"
    compress_level = 1

    def __init__(self) -> None:
        # A random tail keeps previews of concurrent graphs from overwriting each other.
        self.file_suffix = "_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))

    def output_directory(self) -> str:
        return folders.get_temp_directory()

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE", {"tooltip": "The images to preview."})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}


class ImageScaleToTotalPixels:
    CATEGORY = "image/upscaling"
    FUNCTION = "upscale"
    RETURN_TYPES = ("IMAGE",)
    upscale_methods = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images to scale."}),
            "upscale_method": (cls.upscale_methods, {"tooltip": "The resampling filter."}),
            "megapixels": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 16.0, "step": 0.01,
                                     "tooltip": "Target size in megapixels (1 MP = 1024 x 1024)."}),
            "resolution_steps": ("INT", {"default": 1, "min": 1, "max": 256, "advanced": True,
                                         "tooltip": "Round width and height to multiples of this."}),
        }}

    def upscale(self, image: torch.Tensor, upscale_method: str, megapixels: float,
                resolution_steps: int = 1) -> tuple[torch.Tensor]:
        height, width = image.shape[1], image.shape[2]
        scale = math.sqrt(megapixels * 1024 * 1024 / (width * height))
        new_width = round(width * scale / resolution_steps) * resolution_steps
        new_height = round(height * scale / resolution_steps) * resolution_steps
        return (resize_image(image, new_width, new_height, upscale_method),)


class GetImageSize:
    DESCRIPTION = "Returns the width, height and batch size of an image."
    CATEGORY = "image"
    FUNCTION = "get_size"
    RETURN_TYPES = ("INT", "INT", "INT")
    RETURN_NAMES = ("width", "height", "batch_size")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": ("IMAGE", {"tooltip": "The image to measure."})}}

    def get_size(self, image: torch.Tensor) -> tuple[int, int, int]:
        return (image.shape[2], image.shape[1], image.shape[0])


NODE_CLASS_MAPPINGS = {
    "LoadImage": LoadImage,
    "SaveImage": SaveImage,
    "PreviewImage": PreviewImage,
    "ImageScaleToTotalPixels": ImageScaleToTotalPixels,
    "GetImageSize": GetImageSize,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadImage": "Load Image",
    "SaveImage": "Save Image",
    "PreviewImage": "Preview Image",
    "ImageScaleToTotalPixels": "Scale Image to Total Pixels",
    "GetImageSize": "Get Image Size",
}
