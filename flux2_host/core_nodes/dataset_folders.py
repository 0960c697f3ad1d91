"""ComfyUI's dataset folder nodes (comfy_extras/nodes_dataset.py) under their ids, inputs, defaults and widget
order: image (+ caption) datasets loaded from a folder under input/ and saved to a folder under output/.

A dataset is an IMAGE list (one [1, H, W, 3] tensor per picture, sizes may differ) and, with captions, a
STRING list of the same length. As in ComfyUI: the pictures are the folder's .png / .jpg / .jpeg / .webp files,
a caption is the text of the same-stem .txt (empty when there is none), and LoadImageTextDataSetFromFolder
also reads kohya-style subfolders, whose `N_name` prefix repeats their pictures N times. Differences: files
are read in name order (ComfyUI: the directory's order), an unreadable picture is skipped with a warning
naming it (ComfyUI stops), and a folder outside input/ or missing is refused naming the node and field.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .. import folders

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
OVERWRITE_MODES = ["overwrite", "increment"]


def dataset_folder(node: str, folder: str) -> Path:
    """The folder a `folder` input names, below input/; refuses one that escapes input/ or is missing."""
    root = Path(folders.get_input_directory()).resolve()
    path = (root / folder).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"{node}: folder: expected a folder inside the input folder {root}, found {folder!r}")
    if not path.is_dir():
        raise ValueError(f"{node}: folder: {folder!r} is not a folder in the input folder {root}")
    return path


def _image_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir()
                  if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)


def _kohya_repeats(name: str) -> int:
    """`10_name` -> 10 (kohya's sd-scripts folder layout); any other name -> 1."""
    prefix = name.split("_")[0]
    return int(prefix) if prefix.isdigit() else 1


def read_picture(path: Path) -> torch.Tensor:
    """A picture file as IMAGE [1, H, W, 3] in 0..1 (16-bit greyscale scaled as ComfyUI does)."""
    with Image.open(path) as picture:
        if picture.mode == "I":
            picture = picture.point(lambda value: value * (1 / 255))
        array = np.array(picture.convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(array)[None]


def load_pictures(node: str, files: list[Path], folder: str) -> tuple[list[torch.Tensor], list[Path]]:
    """The readable pictures and their files; unreadable ones are skipped with a warning, none at all refused."""
    images, kept = [], []
    for path in files:
        try:
            images.append(read_picture(path))
            kept.append(path)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
            log.warning("%s: skipped %s: not a readable image (%s)", node, path, error)
    if not images:
        found = f"{len(files)} unreadable" if files else "none"
        raise ValueError(f"{node}: folder: expected {', '.join(IMAGE_EXTENSIONS)} pictures in {folder!r}, "
                         f"found {found}")
    return images, kept


def _caption(node: str, picture: Path) -> str:
    caption = picture.with_suffix(".txt")
    if not caption.is_file():
        return ""
    try:
        return caption.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as error:
        raise ValueError(f"{node}: folder: expected UTF-8 text in the caption {caption}, found {error}") from None


def _folder_input() -> tuple:
    return (folders.get_input_subfolders(), {"tooltip": "The folder to load images from."})


class FolderDataset:
    """What the folder loaders share: they re-run when a file below the folder is added, removed or changed
    (the cached lists would be stale otherwise)."""

    @classmethod
    def IS_CHANGED(cls, folder: str) -> str:
        directory = dataset_folder(cls.__name__, folder)
        digest = hashlib.sha256()
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path.relative_to(directory)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


class LoadImageDataSetFromFolder(FolderDataset):
    DESCRIPTION = "Loads every picture of a folder in input/ as a list of images."
    CATEGORY = "dataset"
    FUNCTION = "load"
    EXPERIMENTAL = True
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_IS_LIST = (True,)
    OUTPUT_TOOLTIPS = ("List of loaded images",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"folder": _folder_input()}}

    def load(self, folder: str) -> tuple[list[torch.Tensor]]:
        directory = dataset_folder("LoadImageDataSetFromFolder", folder)
        images, _ = load_pictures("LoadImageDataSetFromFolder", _image_files(directory), folder)
        return (images,)


class LoadImageTextDataSetFromFolder(FolderDataset):
    DESCRIPTION = "Loads the pictures of a folder in input/ with their same-name .txt captions."
    CATEGORY = "dataset"
    FUNCTION = "load"
    EXPERIMENTAL = True
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "texts")
    OUTPUT_IS_LIST = (True, True)
    OUTPUT_TOOLTIPS = ("List of loaded images", "List of text captions")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"folder": _folder_input()}}

    def load(self, folder: str) -> tuple[list[torch.Tensor], list[str]]:
        node = "LoadImageTextDataSetFromFolder"
        directory = dataset_folder(node, folder)
        files = _image_files(directory)
        for sub in sorted(path for path in directory.iterdir() if path.is_dir()):
            files += _image_files(sub) * _kohya_repeats(sub.name)
        images, kept = load_pictures(node, files, folder)
        return images, [_caption(node, path) for path in kept]


def _picture(image: torch.Tensor) -> Image.Image:
    """IMAGE [1, H, W, C] or [H, W, C] -> 8-bit PIL (values truncated, as ComfyUI converts)."""
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"images: expected one picture per list item [1, H, W, C], found {tuple(image.shape)}")
        image = image[0]
    return Image.fromarray(np.clip(image.float().cpu().numpy() * 255.0, 0, 255).astype(np.uint8))


def output_folder(node: str, folder_name: str) -> Path:
    """output/<folder_name>, created; refuses a name that leaves the output folder."""
    root = Path(folders.get_output_directory()).resolve()
    path = (root / folder_name).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"{node}: folder_name: expected a folder inside the output folder {root}, "
                         f"found {folder_name!r}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_pictures(node: str, images: list[torch.Tensor], folder_name: str, filename_prefix: str,
                  mode: str) -> list[Path]:
    """Each image as PNG in output/<folder_name>: `<prefix>_<index>.png` (overwrite) or, with "increment",
    `<prefix>_<counter>_<index>.png` after the files already there."""
    output = output_folder(node, folder_name)
    if mode == "overwrite":
        stem = filename_prefix
    else:
        _, _, counter, _, prefix = folders.get_save_image_path(filename_prefix, str(output))
        stem = f"{prefix}_{counter:05}"
    paths = []
    for index, image in enumerate(images):
        path = output / f"{stem}_{index:05d}.png"
        _picture(image).save(path)
        paths.append(path)
    return paths


def _save_inputs(with_texts: bool) -> dict:
    inputs = {"images": ("IMAGE", {"tooltip": "List of images to save."})}
    if with_texts:
        inputs["texts"] = ("STRING", {"tooltip": "List of text captions to save."})
    return {**inputs,
            "folder_name": ("STRING", {"default": "dataset", "tooltip": "Name of the folder to save images to "
                                                                        "(inside output directory)."}),
            "filename_prefix": ("STRING", {"default": "image", "advanced": True,
                                           "tooltip": "Prefix for saved image filenames."}),
            "mode": (OVERWRITE_MODES, {"default": "overwrite", "tooltip": "Whether to overwrite existing files or "
                                                                          "increment filenames."})}


class SaveImageDataSetToFolder:
    DESCRIPTION = "Saves a list of images as PNG files in a folder of output/."
    CATEGORY = "dataset"
    FUNCTION = "save"
    EXPERIMENTAL = True
    OUTPUT_NODE = True
    INPUT_IS_LIST = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": _save_inputs(with_texts=False)}

    def save(self, images: list, folder_name: list, filename_prefix: list, mode: list) -> dict:
        paths = save_pictures(type(self).__name__, images, folder_name[0], filename_prefix[0], mode[0])
        return {"ui": {"text": [f"saved {len(paths)} images to {paths[0].parent if paths else folder_name[0]}"]}}


class SaveImageTextDataSetToFolder(SaveImageDataSetToFolder):
    DESCRIPTION = "Saves a list of images as PNG files with their captions as same-name .txt files in output/."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": _save_inputs(with_texts=True)}

    def save(self, images: list, texts: list, folder_name: list, filename_prefix: list, mode: list) -> dict:
        if len(texts) != len(images):
            raise ValueError(f"SaveImageTextDataSetToFolder: texts: expected one caption per image "
                             f"({len(images)}), found {len(texts)}")
        paths = save_pictures(type(self).__name__, images, folder_name[0], filename_prefix[0], mode[0])
        for path, text in zip(paths, texts):
            path.with_suffix(".txt").write_text(text, encoding="utf-8")
        return {"ui": {"text": [f"saved {len(paths)} images and captions to "
                                f"{paths[0].parent if paths else folder_name[0]}"]}}


NODE_CLASS_MAPPINGS = {
    "LoadImageDataSetFromFolder": LoadImageDataSetFromFolder,
    "LoadImageTextDataSetFromFolder": LoadImageTextDataSetFromFolder,
    "SaveImageDataSetToFolder": SaveImageDataSetToFolder,
    "SaveImageTextDataSetToFolder": SaveImageTextDataSetToFolder,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadImageDataSetFromFolder": "Load Image Dataset from Folder",
    "LoadImageTextDataSetFromFolder": "Load Image and Text Dataset from Folder",
    "SaveImageDataSetToFolder": "Save Image Dataset to Folder",
    "SaveImageTextDataSetToFolder": "Save Image and Text Dataset to Folder",
}
