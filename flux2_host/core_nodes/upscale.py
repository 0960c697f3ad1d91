"""Model upscaling under ComfyUI's names: UpscaleModelLoader reads an ESRGAN / SwinIR / ... file from
models/upscale_models through the `spandrel` library (`pip install spandrel`, the `upscale` extra, which needs
torchvision: scripts/upscale_venv.sh builds such a venv), as ComfyUI does;
ImageUpscaleWithModel runs it over 512 px tiles overlapping by 32 px, blended with linear ramps (ComfyUI's
tiled_scale)."""

from __future__ import annotations

import itertools
from typing import Callable

import torch

from flux2_core.checkpoints.reader import open_checkpoint
from flux2_core.comfy_layouts import model_file_path
from flux2_core.devices import default_device

from .. import folders

TILE, OVERLAP = 512, 32
# SwinIR files saved from a DataParallel wrapper carry this prefix.
DATA_PARALLEL_PREFIX = "module."
# Most upscale models are published as pickles (RealESRGAN_x4plus.pth, 4x-UltraSharp.pth); the folder lists them.
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt")


def _spandrel():
    try:
        import spandrel
    except ImportError as error:
        raise ImportError("UpscaleModelLoader: upscale models load through the spandrel library, which is not "
                          "installed: pip install spandrel (or this project's `upscale` extra)") from error
    return spandrel


def _ramp(length: int, feather: int) -> torch.Tensor:
    """1 inside, rising linearly over `feather` samples at both ends: (t + 1) / feather at distance t."""
    weights = torch.ones(length)
    if feather < length:
        for t in range(feather):
            weights[t] *= (t + 1) / feather
            weights[length - 1 - t] *= (t + 1) / feather
    return weights


def tiled_upscale(image: torch.Tensor, model: Callable[[torch.Tensor], torch.Tensor], scale: float,
                  tile: int = TILE, overlap: int = OVERLAP) -> torch.Tensor:
    """[B, C, H, W] through `model` (which scales by `scale`) in overlapping tiles; overlaps are weighted by linear
    ramps of scale * overlap samples and averaged."""
    height, width = image.shape[-2:]
    out_height, out_width = round(height * scale), round(width * scale)
    results = []
    for sample in image.split(1):
        if height <= tile and width <= tile:
            results.append(model(sample).float())
            continue
        total = weight = None
        rows = range(0, height - overlap, tile - overlap) if height > tile else [0]
        cols = range(0, width - overlap, tile - overlap) if width > tile else [0]
        for row, col in itertools.product(rows, cols):
            top, left = max(0, min(height - overlap, row)), max(0, min(width - overlap, col))
            piece = model(sample[..., top:top + min(tile, height - top), left:left + min(tile, width - left)]).float()
            feather = round(scale * overlap)
            mask = _ramp(piece.shape[-2], feather)[:, None] * _ramp(piece.shape[-1], feather)[None, :]
            if total is None:
                total = torch.zeros(1, piece.shape[1], out_height, out_width)
                weight = torch.zeros_like(total)
            y, x = round(scale * top), round(scale * left)
            total[..., y:y + piece.shape[-2], x:x + piece.shape[-1]] += piece * mask
            weight[..., y:y + piece.shape[-2], x:x + piece.shape[-1]] += mask
        results.append(total / weight)
    return torch.cat(results)


class UpscaleModelLoader:
    DESCRIPTION = "Loads an image upscale model (ESRGAN, SwinIR, ... anything spandrel recognises)."
    CATEGORY = "loaders"
    FUNCTION = "load_model"
    RETURN_TYPES = ("UPSCALE_MODEL",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model_name": (folders.get_filename_list("upscale_models"),
                                            {"tooltip": "The upscale model file."})}}

    def load_model(self, model_name: str):
        spandrel = _spandrel()
        path = model_file_path(folders, "upscale_models", model_name, "UpscaleModelLoader: model_name")
        loader = spandrel.ModelLoader()
        if path.lower().endswith(PICKLE_SUFFIXES):
            # spandrel's restricted unpickler admits tensors and plain containers only (no code runs), and it
            # unwraps the {"params_ema": ...} / {"state_dict": ...} wrappers and "module." prefixes these files have.
            state_dict = loader.load_state_dict_from_file(path)
        else:
            with open_checkpoint(path) as source:
                state_dict = {key: source.get(key) for key in source.keys()}
            if "module.layers.0.residual_group.blocks.0.norm1.weight" in state_dict:
                state_dict = {key.removeprefix(DATA_PARALLEL_PREFIX): value for key, value in state_dict.items()}
        descriptor = loader.load_from_state_dict(state_dict).eval()
        if not isinstance(descriptor, spandrel.ImageModelDescriptor):
            raise ValueError(f"UpscaleModelLoader: {model_name}: expected a single-image model, found "
                             f"{type(descriptor).__name__}")
        return (descriptor,)


class ImageUpscaleWithModel:
    DESCRIPTION = "Upscales images with an upscale model, in 512 px tiles."
    CATEGORY = "image/upscaling"
    FUNCTION = "upscale"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"upscale_model": ("UPSCALE_MODEL", {"tooltip": "From UpscaleModelLoader."}),
                             "image": ("IMAGE", {"tooltip": "The images."})}}

    @torch.no_grad()
    def upscale(self, upscale_model, image: torch.Tensor) -> tuple[torch.Tensor]:
        device = default_device()
        upscale_model.to(device)
        try:
            upscaled = tiled_upscale(image.movedim(-1, 1), lambda tile: upscale_model(tile.to(device)).cpu(),
                                     upscale_model.scale)
        finally:
            upscale_model.to("cpu")
        return (upscaled.movedim(1, -1).clamp(0, 1),)


NODE_CLASS_MAPPINGS = {
    "UpscaleModelLoader": UpscaleModelLoader,
    "ImageUpscaleWithModel": ImageUpscaleWithModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "UpscaleModelLoader": "Load Upscale Model",
    "ImageUpscaleWithModel": "Upscale Image (using Model)",
}
