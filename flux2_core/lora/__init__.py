"""LoRA for the FLUX.2 DiT: read every tool's dialect, apply (merged or on the fly), convert, inspect.

- `dialects`: reading files into `Flux2LoRA` (per BFL layer: row band, delta factors, alpha).
- `apply`: `merge_loras` / `attach_loras` onto a `Flux2DiT`.
- `convert`: writing ComfyUI, diffusers or kohya files.
- `extract`: a LoRA from a fine-tune (SVD of the weight difference).
- `cli`: `flux2 lora info | convert | extract`.
"""

from .apply import AttachedLoRAs, MergedLoRAs, attach_loras, merge_loras, prepare_loras
from .convert import FORMATS, convert_lora, lora_to_state_dict, save_lora
from .deltas import Hadamard, Kronecker, LowRank
from .dialects import DIALECT_DESCRIPTIONS, Flux2LoRA, LoRAPatch, load_lora, lora_from_state_dict

__all__ = [
    "AttachedLoRAs", "DIALECT_DESCRIPTIONS", "FORMATS", "Flux2LoRA", "Hadamard", "Kronecker", "LoRAPatch",
    "LowRank", "MergedLoRAs", "attach_loras", "convert_lora", "load_lora", "lora_from_state_dict",
    "lora_to_state_dict", "merge_loras", "prepare_loras", "save_lora",
]
