"""IMAGE transform nodes under ComfyUI's names and inputs: scaling, cropping, batching, blur / sharpen, invert,
masked compositing. The formulas follow ComfyUI (nodes.py, comfy_extras/nodes_images.py, nodes_post_processing.py,
nodes_mask.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flux2_core.comfy_layouts import batch_size_input, pixels_input

from .latent import CROP_METHODS
from .resizing import resize

IMAGE_SCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]


def resize_image(image: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """IMAGE [B, H, W, C] through `resize`."""
    return resize(image.movedim(-1, 1), width, height, method, crop).movedim(1, -1)


class _ImageScaleNode:
    """A node that resizes IMAGEs: its inputs are the images, the resampling filter, then the subclass's INPUTS."""
    CATEGORY = "image/upscaling"
    FUNCTION = "upscale"
    RETURN_TYPES = ("IMAGE",)
    upscale_methods = IMAGE_SCALE_METHODS
    INPUTS: dict = {}

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images."}),
            "upscale_method": (cls.upscale_methods, {"tooltip": "The resampling filter."}),
            **cls.INPUTS,
        }}


class ImageScale(_ImageScaleNode):
    DESCRIPTION = "Resizes images; a width or height of 0 keeps the aspect ratio."
    INPUTS = {
        "width": pixels_input(512, "Target width (0: from the height and the aspect ratio)."),
        "height": pixels_input(512, "Target height (0: from the width and the aspect ratio)."),
        "crop": (CROP_METHODS, {"tooltip": "center: cut to the target aspect ratio first."}),
    }

    def upscale(self, image: torch.Tensor, upscale_method: str, width: int, height: int,
                crop: str) -> tuple[torch.Tensor]:
        if width == 0 and height == 0:
            return (image,)
        if width == 0:
            width = max(1, round(image.shape[2] * height / image.shape[1]))
        elif height == 0:
            height = max(1, round(image.shape[1] * width / image.shape[2]))
        return (resize_image(image, width, height, upscale_method, crop),)


class ImageScaleBy(_ImageScaleNode):
    DESCRIPTION = "Resizes images by a factor (sizes rounded)."
    INPUTS = {"scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01, "tooltip": "The factor."})}

    def upscale(self, image: torch.Tensor, upscale_method: str, scale_by: float) -> tuple[torch.Tensor]:
        width, height = round(image.shape[2] * scale_by), round(image.shape[1] * scale_by)
        return (resize_image(image, width, height, upscale_method),)


class ImageScaleToMaxDimension(_ImageScaleNode):
    DESCRIPTION = "Resizes images so that the longer side is largest_size (the aspect ratio kept, sizes rounded)."
    upscale_methods = ["area", "lanczos", "bilinear", "nearest-exact", "bilinear", "bicubic"]  # ComfyUI's list
    INPUTS = {"largest_size": pixels_input(512, "The longer side in pixels.")}

    def upscale(self, image: torch.Tensor, upscale_method: str, largest_size: int) -> tuple[torch.Tensor]:
        height, width = image.shape[1:3]
        if height > width:
            width, height = round(width / height * largest_size), largest_size
        elif width > height:
            width, height = largest_size, round(height / width * largest_size)
        else:
            width = height = largest_size
        return (resize_image(image, width, height, upscale_method),)


class EmptyImage:
    DESCRIPTION = "Images of one colour (0xRRGGBB)."
    CATEGORY = "image"
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "width": pixels_input(512, "Width in pixels.", minimum=1),
            "height": pixels_input(512, "Height in pixels.", minimum=1),
            "batch_size": batch_size_input("Images in the batch."),
            "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color",
                              "tooltip": "The colour as 0xRRGGBB."}),
        }}

    def generate(self, width: int, height: int, batch_size: int = 1, color: int = 0) -> tuple[torch.Tensor]:
        rgb = torch.tensor([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], dtype=torch.float32) / 0xFF
        return (rgb.expand(batch_size, height, width, 3).clone(),)


class ImageCrop:
    DESCRIPTION = "The part of the images at x, y of the given size (cut at the image edges)."
    CATEGORY = "image/transform"
    FUNCTION = "crop"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images."}),
            "width": pixels_input(512, "Crop width.", minimum=1),
            "height": pixels_input(512, "Crop height.", minimum=1),
            "x": pixels_input(0, "Left edge."), "y": pixels_input(0, "Top edge."),
        }}

    def crop(self, image: torch.Tensor, width: int, height: int, x: int, y: int) -> tuple[torch.Tensor]:
        x, y = min(x, image.shape[2] - 1), min(y, image.shape[1] - 1)
        return (image[:, y:y + height, x:x + width, :],)


class ImageBatch:
    DESCRIPTION = "Two image batches as one; image2 is scaled (bilinear, center crop) to image1's size if needed."
    CATEGORY = "image"
    FUNCTION = "batch"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image1": ("IMAGE", {"tooltip": "The first images."}),
                             "image2": ("IMAGE", {"tooltip": "The images appended."})}}

    def batch(self, image1: torch.Tensor, image2: torch.Tensor) -> tuple[torch.Tensor]:
        if image1.shape[1:] != image2.shape[1:]:
            image2 = resize_image(image2, image1.shape[2], image1.shape[1], "bilinear", "center")
        return (torch.cat((image1, image2)),)


class ImageInvert:
    DESCRIPTION = "1 - image."
    CATEGORY = "image"
    FUNCTION = "invert"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": ("IMAGE", {"tooltip": "The images."})}}

    def invert(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (1.0 - image,)


def _soft_light(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W3C soft light of layer b over a, with its helper D(a)."""
    d = torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, torch.sqrt(a))
    return torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a), a + (2 * b - 1) * (d - a))


BLEND_MODES = {
    "normal": lambda a, b: b,
    "multiply": lambda a, b: a * b,
    "screen": lambda a, b: 1 - (1 - a) * (1 - b),
    "overlay": lambda a, b: torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b)),
    "soft_light": _soft_light,
    "difference": lambda a, b: a - b,
}


class ImageBlend:
    DESCRIPTION = "image1 mixed with the blend of image1 and image2 (image2 scaled to image1's size if needed)."
    CATEGORY = "image/postprocessing"
    FUNCTION = "blend"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image1": ("IMAGE", {"tooltip": "The base images."}),
            "image2": ("IMAGE", {"tooltip": "The blend layer."}),
            "blend_factor": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": "0: image1, 1: the full blend."}),
            "blend_mode": (list(BLEND_MODES), {"tooltip": "How the layers combine (difference is image1 - image2)."}),
        }}

    def blend(self, image1: torch.Tensor, image2: torch.Tensor, blend_factor: float,
              blend_mode: str) -> tuple[torch.Tensor]:
        channels = max(image1.shape[-1], image2.shape[-1])
        image1, image2 = _with_channels(image1, channels), _with_channels(image2, channels)
        if image1.shape != image2.shape:
            image2 = resize_image(image2, image1.shape[2], image1.shape[1], "bicubic", "center")
        blended = BLEND_MODES[blend_mode](image1, image2)
        return ((image1 * (1 - blend_factor) + blended * blend_factor).clamp(0, 1),)


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """ComfyUI's blur kernel: a Gaussian over a size x size grid spanning -1..1 on both axes, summing to 1."""
    axis = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    kernel = torch.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    return kernel / kernel.sum()


def _filter(image: torch.Tensor, kernel: torch.Tensor, radius: int) -> torch.Tensor:
    """Each channel convolved with `kernel` over the image reflected `radius` pixels at the edges."""
    channels = image.shape[-1]
    pixels = F.pad(image.movedim(-1, 1), (radius,) * 4, mode="reflect")
    weights = kernel.to(image.dtype).expand(channels, 1, *kernel.shape)
    return F.conv2d(pixels, weights, groups=channels).movedim(1, -1)


class ImageBlur:
    DESCRIPTION = "Gaussian blur."
    CATEGORY = "image/postprocessing"
    FUNCTION = "blur"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images."}),
            "blur_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1, "tooltip": "Kernel radius."}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1,
                                "tooltip": "Spread, relative to the radius."}),
        }}

    def blur(self, image: torch.Tensor, blur_radius: int, sigma: float) -> tuple[torch.Tensor]:
        return (_filter(image, gaussian_kernel(2 * blur_radius + 1, sigma), blur_radius),)


class ImageSharpen:
    DESCRIPTION = "Unsharp-style sharpening, clamped to 0..1."
    CATEGORY = "image/postprocessing"
    FUNCTION = "sharpen"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images."}),
            "sharpen_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1, "tooltip": "Kernel radius."}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.01,
                                "tooltip": "Spread, relative to the radius."}),
            "alpha": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.01, "tooltip": "Strength."}),
        }}

    def sharpen(self, image: torch.Tensor, sharpen_radius: int, sigma: float, alpha: float) -> tuple[torch.Tensor]:
        # A negative Gaussian scaled by 10 alpha, with the centre raised so that the kernel sums to 1.
        kernel = gaussian_kernel(2 * sharpen_radius + 1, sigma) * -(alpha * 10)
        kernel[sharpen_radius, sharpen_radius] += 1.0 - kernel.sum()
        return (_filter(image, kernel, sharpen_radius).clamp(0, 1),)


class ImageCompositeMasked:
    DESCRIPTION = "Pastes source onto destination at x, y, through the mask if given."
    CATEGORY = "image"
    FUNCTION = "composite"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "destination": ("IMAGE", {"tooltip": "The background."}),
            "source": ("IMAGE", {"tooltip": "The image pasted on it."}),
            "x": pixels_input(0, "Left edge of source."), "y": pixels_input(0, "Top edge of source."),
            "resize_source": ("BOOLEAN", {"default": False, "tooltip": "Scale source to destination's size first."}),
        }, "optional": {"mask": ("MASK", {"tooltip": "Where source shows (1) and destination stays (0)."})}}

    def composite(self, destination: torch.Tensor, source: torch.Tensor, x: int, y: int, resize_source: bool,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        channels = max(destination.shape[-1], source.shape[-1])  # RGB meets RGBA: opaque alpha added
        destination, source = (_with_channels(i, channels).movedim(-1, 1) for i in (destination, source))
        return (paste(destination.clone(), source, x, y, mask, resize_source).movedim(1, -1),)


def _with_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    if image.shape[-1] >= channels:
        return image
    return F.pad(image, (0, channels - image.shape[-1]), value=1.0)


def _to_batch(samples: torch.Tensor, batch: int) -> torch.Tensor:
    repeats = -(-batch // samples.shape[0])
    return samples.repeat(repeats, *([1] * (samples.ndim - 1)))[:batch]


def paste(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None,
          resize_source: bool = False) -> torch.Tensor:
    """[B, C, H, W] source blended into destination (in place) at x, y: mask * source + (1 - mask) * destination,
    the mask resized (bilinear) to the source's size, everything cut at destination's edges."""
    if resize_source:
        source = F.interpolate(source, size=destination.shape[-2:], mode="bilinear")
    source = _to_batch(source, destination.shape[0])
    x = max(-source.shape[-1], min(x, destination.shape[-1]))
    y = max(-source.shape[-2], min(y, destination.shape[-2]))
    if mask is None:
        mask = torch.ones_like(source)
    else:
        mask = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(), size=source.shape[-2:], mode="bilinear")
        mask = _to_batch(mask, source.shape[0])
    visible_width = destination.shape[-1] - x + min(0, x)
    visible_height = destination.shape[-2] - y + min(0, y)
    mask = mask[..., :visible_height, :visible_width]
    region = destination[..., y:y + source.shape[-2], x:x + source.shape[-1]]
    region[...] = mask * source[..., :visible_height, :visible_width] + (1 - mask) * region
    return destination


SPACING_COLORS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (1.0, 0.0, 0.0),
                  "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


def _pad_centered(image: torch.Tensor, size: int, dim: int, value: float) -> torch.Tensor:
    """IMAGE padded along height (dim 1) or width (dim 2) to `size`, half before (rounded down), half after."""
    missing = size - image.shape[dim]
    if missing <= 0:
        return image
    before = missing // 2
    padding = (0, 0, before, missing - before) if dim == 2 else (0, 0, 0, 0, before, missing - before)
    return F.pad(image, padding, value=value)


def _repeat_last(image: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([image, image[-1:].expand(batch - image.shape[0], *image.shape[1:])])


class ImageStitch:
    DESCRIPTION = "Stitches image2 to image1 in the given direction, with optional spacing between them."
    CATEGORY = "image/transform"
    FUNCTION = "stitch"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image1": ("IMAGE", {"tooltip": "The first image."}),
            "direction": (["right", "down", "left", "up"], {"default": "right", "tooltip": "Where image2 goes."}),
            "match_image_size": ("BOOLEAN", {"default": True, "tooltip": "Scale image2 (lanczos) to image1's height "
                                                                         "(right / left) or width (up / down)."}),
            "spacing_width": ("INT", {"default": 0, "min": 0, "max": 1024, "step": 2, "tooltip": "Gap in pixels."}),
            "spacing_color": (list(SPACING_COLORS), {"default": "white", "tooltip": "Colour of the gap."}),
        }, "optional": {"image2": ("IMAGE", {"tooltip": "The image to add; without it image1 passes through."})}}

    def stitch(self, image1: torch.Tensor, direction: str, match_image_size: bool, spacing_width: int,
               spacing_color: str, image2: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        if image2 is None:
            return (image1,)
        batch = max(image1.shape[0], image2.shape[0])
        image1, image2 = _repeat_last(image1, batch), _repeat_last(image2, batch)
        sideways = direction in ("left", "right")
        if match_image_size:
            height, width = image2.shape[1:3]
            if sideways:
                size = (int(image1.shape[1] * (width / height)), image1.shape[1])
            else:
                size = (image1.shape[2], int(image1.shape[2] / (width / height)))
            image2 = resize_image(image2, *size, "lanczos")
        else:
            # Pad the other dimension to match, centred, in the spacing grey level (black for a colour).
            color = SPACING_COLORS[spacing_color]
            value = color[0] if len(set(color)) == 1 else 0.0
            dim = 1 if sideways else 2
            size = max(image1.shape[dim], image2.shape[dim])
            image1, image2 = (_pad_centered(image, size, dim, value) for image in (image1, image2))
        channels = max(image1.shape[-1], image2.shape[-1])  # RGB meets RGBA: opaque alpha added
        image1, image2 = _with_channels(image1, channels), _with_channels(image2, channels)
        images = [image2, image1] if direction in ("left", "up") else [image1, image2]
        if spacing_width > 0:
            spacing_width += spacing_width % 2
            shape = ((batch, max(image1.shape[1], image2.shape[1]), spacing_width, channels) if sideways
                     else (batch, spacing_width, max(image1.shape[2], image2.shape[2]), channels))
            spacing = torch.zeros(shape)
            spacing[..., :min(3, channels)] = torch.tensor(SPACING_COLORS[spacing_color][:min(3, channels)])
            if channels == 4:
                spacing[..., 3] = 1.0
            images.insert(1, spacing)
        return (torch.cat(images, dim=2 if sideways else 1),)


NODE_CLASS_MAPPINGS = {
    "ImageStitch": ImageStitch,
    "ImageScale": ImageScale,
    "ImageScaleBy": ImageScaleBy,
    "ImageScaleToMaxDimension": ImageScaleToMaxDimension,
    "EmptyImage": EmptyImage,
    "ImageCrop": ImageCrop,
    "ImageBatch": ImageBatch,
    "ImageInvert": ImageInvert,
    "ImageBlend": ImageBlend,
    "ImageBlur": ImageBlur,
    "ImageSharpen": ImageSharpen,
    "ImageCompositeMasked": ImageCompositeMasked,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ImageStitch": "Image Stitch",
    "ImageScale": "Upscale Image",
    "ImageScaleBy": "Upscale Image By",
    "ImageCrop": "Image Crop",
    "ImageBatch": "Batch Images",
    "ImageInvert": "Invert Image",
    "ImageBlend": "Image Blend",
    "ImageBlur": "Image Blur",
    "ImageSharpen": "Image Sharpen",
    "ImageCompositeMasked": "ImageCompositeMasked",
}
