"""ComfyUI's dataset image nodes (comfy_extras/nodes_dataset.py, category dataset/image) under their ids,
inputs, defaults and widget order.

Per-picture nodes take one IMAGE and the host maps them over an IMAGE list (each list item may hold a batch:
every picture of it is processed). Whole-list nodes (INPUT_IS_LIST) shuffle, deduplicate, merge or grid the
list. Resizing and hashing go through 8-bit PIL images with values truncated, as ComfyUI converts, and seeded
draws use numpy's legacy generator seeded with `seed % (2**32 - 1)`, so results match ComfyUI's.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .resizing import lanczos

SEED_INPUT = ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Random seed."})


def _edge_input(default: int, tooltip: str) -> tuple:
    return ("INT", {"default": default, "min": 1, "max": 8192, "tooltip": tooltip})


def seeded(seed: int) -> np.random.RandomState:
    return np.random.RandomState(seed % (2**32 - 1))


def _to_pil(picture: torch.Tensor) -> Image.Image:
    """One picture [H, W, 3] in 0..1 -> 8-bit PIL, values truncated."""
    return Image.fromarray(np.clip(picture.float().cpu().numpy() * 255.0, 0, 255).astype(np.uint8))


def _from_pil(picture: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(picture).astype(np.float32) / 255.0)


def shorter_edge_size(width: int, height: int, shorter_edge: int) -> tuple[int, int]:
    """(width, height) with the shorter side `shorter_edge`, the other scaled and truncated (ComfyUI's rule:
    a square counts as wider)."""
    if width < height:
        return shorter_edge, int(height * (shorter_edge / width))
    return int(width * (shorter_edge / height)), shorter_edge


def longer_edge_size(width: int, height: int, longer_edge: int) -> tuple[int, int]:
    """(width, height) with the longer side `longer_edge`, the other scaled and truncated (a square counts as
    taller)."""
    if width > height:
        return longer_edge, int(height * (longer_edge / width))
    return int(width * (longer_edge / height)), longer_edge


def crop_box(width: int, height: int, crop_width: int, crop_height: int, left: int, top: int) -> tuple[int, ...]:
    return left, top, min(width, left + crop_width), min(height, top + crop_height)


class PictureTransform:
    """A node applying `transform` to each picture [H, W, 3] of the IMAGE it is given."""

    CATEGORY = "dataset/image"
    FUNCTION = "process"
    EXPERIMENTAL = True
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("Processed images",)
    EXTRA_INPUTS: dict = {}

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE", {"tooltip": "Image to process."}), **cls.EXTRA_INPUTS}}

    def process(self, images: torch.Tensor, **options) -> tuple[torch.Tensor]:
        pictures = [self.transform(picture, **options) for picture in images]
        sizes = {tuple(picture.shape) for picture in pictures}
        if len(sizes) > 1:  # a batch of several sizes cannot be one tensor: ComfyUI works on one picture each
            raise ValueError(f"{type(self).__name__}: images: a batch became pictures of different sizes {sizes}; "
                             "give one picture per list item")
        return (torch.stack(pictures),)

    def transform(self, picture: torch.Tensor, **options) -> torch.Tensor:
        raise NotImplementedError


def _resized(picture: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return lanczos(picture.movedim(-1, 0)[None], *size)[0].movedim(0, -1)


class ResizeImagesByShorterEdge(PictureTransform):
    DESCRIPTION = "Resize images so that the shorter edge matches the specified length while preserving aspect ratio."
    EXTRA_INPUTS = {"shorter_edge": _edge_input(512, "Target length for the shorter edge.")}

    def transform(self, picture: torch.Tensor, shorter_edge: int) -> torch.Tensor:
        height, width = picture.shape[:2]
        return _resized(picture, shorter_edge_size(width, height, shorter_edge))


class ResizeImagesByLongerEdge(PictureTransform):
    DESCRIPTION = "Resize images so that the longer edge matches the specified length while preserving aspect ratio."
    EXTRA_INPUTS = {"longer_edge": _edge_input(1024, "Target length for the longer edge.")}

    def transform(self, picture: torch.Tensor, longer_edge: int) -> torch.Tensor:
        height, width = picture.shape[:2]
        return _resized(picture, longer_edge_size(width, height, longer_edge))


def _crop_inputs() -> dict:
    return {"width": ("INT", {"default": 512, "min": 1, "max": 8192, "tooltip": "Crop width."}),
            "height": ("INT", {"default": 512, "min": 1, "max": 8192, "tooltip": "Crop height."})}


class CenterCropImages(PictureTransform):
    DESCRIPTION = "Center crop all images to the specified dimensions."
    EXTRA_INPUTS = _crop_inputs()

    def transform(self, picture: torch.Tensor, width: int, height: int) -> torch.Tensor:
        full_height, full_width = picture.shape[:2]
        left, top = max(0, (full_width - width) // 2), max(0, (full_height - height) // 2)
        left, top, right, bottom = crop_box(full_width, full_height, width, height, left, top)
        return picture[top:bottom, left:right]


class RandomCropImages(PictureTransform):
    DESCRIPTION = "Randomly crop all images to the specified dimensions (for data augmentation)."
    EXTRA_INPUTS = {**_crop_inputs(), "seed": SEED_INPUT}

    def process(self, images: torch.Tensor, width: int, height: int, seed: int) -> tuple[torch.Tensor]:
        self.generator = seeded(seed)  # reseeded per call: ComfyUI seeds numpy once per image it is given
        return super().process(images, width=width, height=height)

    def transform(self, picture: torch.Tensor, width: int, height: int) -> torch.Tensor:
        full_height, full_width = picture.shape[:2]
        max_left, max_top = max(0, full_width - width), max(0, full_height - height)
        left = self.generator.randint(0, max_left + 1) if max_left > 0 else 0
        top = self.generator.randint(0, max_top + 1) if max_top > 0 else 0
        left, top, right, bottom = crop_box(full_width, full_height, width, height, left, top)
        return picture[top:bottom, left:right]


class NormalizeImages(PictureTransform):
    DESCRIPTION = "Normalize images using mean and standard deviation."
    EXTRA_INPUTS = {
        "mean": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "advanced": True,
                           "tooltip": "Mean value for normalization."}),
        "std": ("FLOAT", {"default": 0.5, "min": 0.001, "max": 1.0, "advanced": True,
                          "tooltip": "Standard deviation for normalization."}),
    }

    def transform(self, picture: torch.Tensor, mean: float, std: float) -> torch.Tensor:
        return (picture - mean) / std


def _factor_input(tooltip: str) -> dict:
    return {"factor": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "tooltip": tooltip})}


class AdjustBrightness(PictureTransform):
    DESCRIPTION = "Adjust brightness of all images."
    EXTRA_INPUTS = _factor_input("Brightness factor. 1.0 = no change, <1.0 = darker, >1.0 = brighter.")

    def transform(self, picture: torch.Tensor, factor: float) -> torch.Tensor:
        return (picture * factor).clamp(0.0, 1.0)


class AdjustContrast(PictureTransform):
    DESCRIPTION = "Adjust contrast of all images."
    EXTRA_INPUTS = _factor_input("Contrast factor. 1.0 = no change, <1.0 = less contrast, >1.0 = more contrast.")

    def transform(self, picture: torch.Tensor, factor: float) -> torch.Tensor:
        return ((picture - 0.5) * factor + 0.5).clamp(0.0, 1.0)


class ImageListNode:
    """A node given the whole IMAGE list (INPUT_IS_LIST); widgets arrive as one-item lists."""

    CATEGORY = "dataset/image"
    FUNCTION = "process"
    EXPERIMENTAL = True
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_IS_LIST = (True,)
    OUTPUT_TOOLTIPS = ("Processed images",)
    EXTRA_INPUTS: dict = {}

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE", {"tooltip": "List of images to process."}), **cls.EXTRA_INPUTS}}

    def process(self, images: list[torch.Tensor], **options: list) -> tuple:
        return (self.transform_list(images, **{name: value[0] for name, value in options.items()}),)

    def transform_list(self, images: list[torch.Tensor], **options):
        raise NotImplementedError


class ShuffleDataset(ImageListNode):
    DESCRIPTION = "Randomly shuffle the order of images in the dataset."
    EXTRA_INPUTS = {"seed": SEED_INPUT}

    def transform_list(self, images: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
        return [images[i] for i in seeded(seed).permutation(len(images))]


def average_hash(image: torch.Tensor) -> np.ndarray:
    """64 bits: the 8x8 lanczos greyscale thumbnail of the first picture, each pixel above the mean or not."""
    thumbnail = _to_pil(image.reshape(-1, *image.shape[-3:])[0]).resize((8, 8), Image.Resampling.LANCZOS)
    pixels = np.asarray(thumbnail.convert("L"), dtype=np.float64).reshape(-1)
    return pixels > pixels.mean()


class ImageDeduplication(ImageListNode):
    DESCRIPTION = "Remove duplicate or very similar images from the dataset."
    EXTRA_INPUTS = {"similarity_threshold": ("FLOAT", {
        "default": 0.95, "min": 0.0, "max": 1.0, "advanced": True,
        "tooltip": "Similarity threshold (0-1). Images at or above it are considered duplicates."})}

    def transform_list(self, images: list[torch.Tensor], similarity_threshold: float) -> list[torch.Tensor]:
        """Keeps an image unless its hash agrees with a kept one's on at least `similarity_threshold` of 64 bits."""
        kept: list[int] = []
        hashes = [average_hash(image) for image in images]
        for index, bits in enumerate(hashes):
            if all(1.0 - np.count_nonzero(bits != hashes[other]) / 64.0 < similarity_threshold for other in kept):
                kept.append(index)
        return [images[i] for i in kept]


class ImageGrid(ImageListNode):
    DESCRIPTION = "Arrange multiple images into a grid layout."
    OUTPUT_IS_LIST = (False,)
    EXTRA_INPUTS = {
        "columns": ("INT", {"default": 4, "min": 1, "max": 20, "tooltip": "Number of columns in the grid."}),
        "cell_width": ("INT", {"default": 256, "min": 32, "max": 2048, "advanced": True,
                               "tooltip": "Width of each cell in the grid."}),
        "cell_height": ("INT", {"default": 256, "min": 32, "max": 2048, "advanced": True,
                                "tooltip": "Height of each cell in the grid."}),
        "padding": ("INT", {"default": 4, "min": 0, "max": 50, "advanced": True,
                            "tooltip": "Padding between images."}),
    }

    def transform_list(self, images: list[torch.Tensor], columns: int, cell_width: int, cell_height: int,
                       padding: int) -> torch.Tensor:
        """Cells of cell_width x cell_height (each image's first picture, lanczos), row by row on black."""
        if not images:
            raise ValueError("ImageGrid: images: expected at least one image, found none")
        rows = -(-len(images) // columns)
        grid = Image.new("RGB", (columns * cell_width + (columns - 1) * padding,
                                 rows * cell_height + (rows - 1) * padding))
        for index, image in enumerate(images):
            cell = _to_pil(image.reshape(-1, *image.shape[-3:])[0]).resize((cell_width, cell_height),
                                                                            Image.Resampling.LANCZOS)
            grid.paste(cell, ((index % columns) * (cell_width + padding), (index // columns) * (cell_height + padding)))
        return _from_pil(grid)[None]


class MergeImageLists(ImageListNode):
    DESCRIPTION = "Concatenate multiple image lists into one."

    def transform_list(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(images)


class ShuffleImageTextDataset:
    DESCRIPTION = "Shuffles images and their captions together."
    CATEGORY = "dataset/image"
    FUNCTION = "shuffle"
    EXPERIMENTAL = True
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "texts")
    OUTPUT_IS_LIST = (True, True)
    OUTPUT_TOOLTIPS = ("Shuffled images", "Shuffled texts")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE", {"tooltip": "List of images to shuffle."}),
                             "texts": ("STRING", {"tooltip": "List of texts to shuffle."}),
                             "seed": SEED_INPUT}}

    def shuffle(self, images: list, texts: list, seed: list) -> tuple[list, list]:
        if len(texts) != len(images):
            raise ValueError(f"ShuffleImageTextDataset: texts: expected one text per image ({len(images)}), "
                             f"found {len(texts)}")
        order = seeded(seed[0]).permutation(len(images))
        return [images[i] for i in order], [texts[i] for i in order]


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    ResizeImagesByShorterEdge, ResizeImagesByLongerEdge, CenterCropImages, RandomCropImages, NormalizeImages,
    AdjustBrightness, AdjustContrast, ShuffleDataset, ShuffleImageTextDataset, ImageDeduplication, ImageGrid,
    MergeImageLists)}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ResizeImagesByShorterEdge": "Resize Images by Shorter Edge",
    "ResizeImagesByLongerEdge": "Resize Images by Longer Edge",
    "CenterCropImages": "Center Crop Images",
    "RandomCropImages": "Random Crop Images",
    "NormalizeImages": "Normalize Images",
    "AdjustBrightness": "Adjust Brightness",
    "AdjustContrast": "Adjust Contrast",
    "ShuffleDataset": "Shuffle Image Dataset",
    "ShuffleImageTextDataset": "Shuffle Image-Text Dataset",
    "ImageDeduplication": "Image Deduplication",
    "ImageGrid": "Image Grid",
    "MergeImageLists": "Merge Image Lists",
}
