"""ComfyUI's data layouts <-> the engine's tensors, shared by the node pack and the host's core nodes.

ComfyUI passes images as IMAGE: float [B, H, W, 3] in 0..1 on the CPU, and latents as LATENT:
{"samples": [B, 128, H/16, W/16]} (the normalized packed latent `Flux2VAE.encode` returns). The VAE wants
pixels [B, 3, H, W] in -1..1 with H and W multiples of 16. Model files are found through a `folder_paths`
module (ComfyUI's own, or the host's compatible one).
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image

from .memory import residency
from .memory.estimate import decode_working_bytes
from .progress import check_interrupt
from .sampling import LATENT_CHANNELS, PIXELS_PER_LATENT_CELL
from .vae import Flux2VAE
from .vae_tiling import VAETiling, decode_auto, decode_tiled, encode_auto, encode_tiled

if TYPE_CHECKING:  # importing it pulls in transformers, which only loading a text encoder should pay for
    from .text_encoders import Flux2TextEncoder

# ComfyUI's largest image side (nodes.MAX_RESOLUTION), the bound of its width / height widgets.
MAX_RESOLUTION = 16384


def pixels_input(default: int, tooltip: str, minimum: int = 0, step: int = 1) -> tuple:
    """A node input counted in pixels (a width, height or position) as ComfyUI declares it, up to MAX_RESOLUTION."""
    return ("INT", {"default": default, "min": minimum, "max": MAX_RESOLUTION, "step": step, "tooltip": tooltip})


def batch_size_input(tooltip: str) -> tuple:
    """A batch size input as ComfyUI's empty-latent and empty-image nodes declare it (1 to 4096)."""
    return ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": tooltip})


def model_file_path(folder_paths: ModuleType, kind: str, name: str, where: str) -> str:
    """The full path of a model combo entry of folder kind `kind` ("diffusion_models", "loras", ...);
    `where` ("Node: input") names the input in the error."""
    path = folder_paths.get_full_path(kind, name)
    if path is None:
        roots = ", ".join(folder_paths.get_folder_paths(kind)) or "none configured"
        raise FileNotFoundError(f"{where}: expected a file or model folder in the {kind} folders ({roots}), "
                                f"found no {name!r}")
    return path


def encode_prompt(text_encoder: Flux2TextEncoder, prompt: str) -> torch.Tensor:
    """A prompt's embeddings [1, 512, D] (CONDITIONING / FLUX2_CONDITIONING). The encoder stays on the GPU
    while the memory manager has room for it; it makes room for the DiT by evicting it when needed."""
    with residency.use(text_encoder) as encoder:
        return encoder.encode(prompt)


def crop_to_latent_grid(image: torch.Tensor) -> torch.Tensor:
    """Center-crop an IMAGE to multiples of 16 px (what ComfyUI's VAEEncode does for FLUX.2)."""
    height, width = image.shape[1], image.shape[2]
    new_height = height // PIXELS_PER_LATENT_CELL * PIXELS_PER_LATENT_CELL
    new_width = width // PIXELS_PER_LATENT_CELL * PIXELS_PER_LATENT_CELL
    if new_height == 0 or new_width == 0:
        raise ValueError(f"image: expected at least {PIXELS_PER_LATENT_CELL}x{PIXELS_PER_LATENT_CELL} px, "
                         f"found {width}x{height}")
    top, left = (height - new_height) // 2, (width - new_width) // 2
    return image[:, top:top + new_height, left:left + new_width, :]


def encode_image(vae: Flux2VAE, image: torch.Tensor, tiling: VAETiling | Literal["auto"] = "auto") -> torch.Tensor:
    """IMAGE [B, H, W, C] -> LATENT samples [B, 128, H/16, W/16] (float32, CPU); extra channels (alpha) are
    dropped and the image is center-cropped to the latent grid first. `tiling`: "auto" tiles large images
    (`vae_tiling.choose_vae_tiling`), a `VAETiling` always tiles."""
    # Contiguous NCHW whatever the IMAGE's strides: a [B, H, W, C]-contiguous IMAGE (our nodes) would reach the
    # convolutions channels-last and a moved-dim view of [B, C, H, W] (ComfyUI's image nodes) not, and the two
    # kernels round differently (up to 1.85 in a demo-VAE latent of a picture with flat areas, same pixels).
    pixels = (crop_to_latent_grid(image)[..., :3].movedim(-1, 1) * 2.0 - 1.0).contiguous()
    with residency.use(vae):
        latent = encode_auto(vae, pixels) if tiling == "auto" else encode_tiled(vae, pixels, tiling)
    return latent.float().cpu()


def decode_latent(vae: Flux2VAE, samples: torch.Tensor, tiling: VAETiling | Literal["auto"] = "auto") -> torch.Tensor:
    """LATENT samples [B, 128, h, w] -> IMAGE [B, 16h, 16w, 3] in 0..1 (float32, CPU); `tiling` as in
    `encode_image`."""
    with residency.use(vae, decode_working_bytes(vae, samples.shape)):
        pixels = decode_auto(vae, samples) if tiling == "auto" else decode_tiled(vae, samples, tiling)
    return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).cpu()


# Pixels converted to 8 bits between two interrupt checks: a 16-megapixel image took 1.3 s in one piece on a
# CPU core; 2^22 pixels are tens of milliseconds.
PIXELS_BETWEEN_CHECKS = 1 << 22


def image_to_pils(image: torch.Tensor, truncate: bool = False) -> list[Image.Image]:
    """IMAGE [B, H, W, 3] -> one 8-bit RGB PIL image per batch entry. Converted on the image's device in bands of
    rows, with an interrupt check before each band, and only the 8-bit bands cross to the CPU.

    Values are rounded half to even (numpy's round: the exact inverse of `pil_to_image`), or with `truncate`
    cut as ComfyUI's SaveImage does (`np.clip(255. * x, 0, 255).astype(np.uint8)`, float32 products), so that a
    saved file has the pixels ComfyUI saves for the same IMAGE; rounding would raise about half of them by one.
    """
    batch, height, width = image.shape[:3]
    rows = max(1, PIXELS_BETWEEN_CHECKS // max(1, width))
    pictures = []
    for frame in image[..., :3]:
        pixels = torch.empty((height, width, 3), dtype=torch.uint8)
        for top in range(0, height, rows):
            check_interrupt()
            band = frame[top:top + rows].to(torch.float32).mul(255.0)
            band = (band if truncate else band.round_()).clamp_(0, 255)  # uint8 conversion truncates
            pixels[top:top + rows] = band.to(torch.uint8).cpu()
        pictures.append(Image.fromarray(pixels.numpy()))
    return pictures


def pil_to_image(picture: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> IMAGE [1, H, W, 3] in 0..1."""
    array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)


def latent_samples(latent: object, what: str) -> torch.Tensor:
    """The `samples` tensor of a LATENT, checked to be a FLUX.2 latent; `what` names the node input."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"{what}: expected a LATENT dict with a 'samples' tensor, found {type(latent).__name__}")
    if samples.ndim != 4 or samples.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"{what}: expected a FLUX.2 latent [B, {LATENT_CHANNELS}, H/16, W/16], found "
                         f"{list(samples.shape)} (a latent made for another model family?)")
    return samples
