"""Stand-in for `comfy.utils`: the progress bar, image/latent resizing, batch-size matching and checkpoint
reading and writing packs use."""

from __future__ import annotations

import math

import safetensors
import safetensors.torch
import torch

from flux2_core.progress import report_progress

from ..core_nodes.resizing import lanczos, resize

from . import STAND_IN_MARK, missing_name

globals()[STAND_IN_MARK] = True
__getattr__ = missing_name("comfy.utils")

PROGRESS_BAR_ENABLED = True


class ProgressBar:
    """ComfyUI's per-node progress bar. Updates reach the host's progress events for the running node (the
    canvas's bar, `flux2 run`'s terminal bar), and each one is also where an interrupt request stops the node.
    Preview images a pack passes along are not shown."""

    def __init__(self, total: int, node_id: str | None = None) -> None:
        self.total = total
        self.current = 0
        self.node_id = node_id

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        report_progress(self.current, self.total)

    def update(self, value: int) -> None:
        self.update_absolute(self.current + value)


UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")

__all__ = ["PROGRESS_BAR_ENABLED", "ProgressBar", "UPSCALE_METHODS", "common_upscale", "lanczos", "load_torch_file",
           "save_torch_file", "repeat_to_batch_size", "state_dict_prefix_replace"]


def common_upscale(samples: torch.Tensor, width: int, height: int, upscale_method: str,
                   crop: str) -> torch.Tensor:
    """Resize `samples` [B, C, H, W] (images or latents) to height x width, as ComfyUI does (the core nodes'
    `resizing.resize`): with crop="center", first cut the largest centred part with the target's aspect ratio;
    "lanczos" goes through 8-bit PIL images (so only 1, 3 or 4 channels in 0..1)."""
    if upscale_method not in UPSCALE_METHODS:
        raise ValueError(f"common_upscale: upscale_method must be one of {', '.join(UPSCALE_METHODS)}, "
                         f"found {upscale_method!r}")
    return resize(samples, width, height, upscale_method, crop)


def load_torch_file(ckpt: str, safe_load: bool = False, device: torch.device | None = None,
                    return_metadata: bool = False):
    """A checkpoint's tensors (safetensors, or a torch pickle read with weights_only), and with
    `return_metadata` also the safetensors metadata (None for pickles)."""
    device = device or torch.device("cpu")
    metadata = None
    if str(ckpt).lower().endswith((".safetensors", ".sft")):
        with safetensors.safe_open(ckpt, framework="pt", device=str(device)) as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = f.metadata()
    else:
        loaded = torch.load(ckpt, map_location=device, weights_only=True)
        tensors = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    return (tensors, metadata) if return_metadata else tensors


def save_torch_file(sd: dict[str, torch.Tensor], ckpt: str, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as a safetensors file (with string metadata when given)."""
    safetensors.torch.save_file(sd, ckpt, metadata=metadata)


def repeat_to_batch_size(tensor: torch.Tensor, batch_size: int, dim: int = 0) -> torch.Tensor:
    """`tensor` with exactly `batch_size` entries along `dim`: the first ones when it has more, itself repeated
    (then cut) when it has fewer."""
    count = tensor.shape[dim]
    if count > batch_size:
        return tensor.narrow(dim, 0, batch_size)
    if count < batch_size:
        repeats = [1] * tensor.dim()
        repeats[dim] = math.ceil(batch_size / count)
        return tensor.repeat(repeats).narrow(dim, 0, batch_size)
    return tensor


def state_dict_prefix_replace(state_dict: dict, replace_prefix: dict[str, str], filter_keys: bool = False) -> dict:
    """Rename keys starting with each prefix of `replace_prefix` to start with its replacement; the renamed
    entries leave `state_dict`. The result is `state_dict` itself, or with `filter_keys` a new dict of only the
    renamed entries."""
    result = {} if filter_keys else state_dict
    for old, new in replace_prefix.items():
        for key in [key for key in state_dict if key.startswith(old)]:
            result[new + key[len(old):]] = state_dict.pop(key)
    return result
