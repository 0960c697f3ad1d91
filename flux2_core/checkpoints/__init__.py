"""Reading FLUX.2 checkpoints: files and folders, fp8 layouts, GGUF, detection and loaders."""

from .detect import CheckpointInfo, info_command, inspect_checkpoint
from .gguf import GGUFLinear
from .loaders import load_dit, load_text_encoder, load_vae
from .quant import Fp8Linear, dequantize_tensor, quantize_linear_weights
from .reader import CheckpointSource, open_checkpoint

__all__ = [
    "CheckpointInfo", "CheckpointSource", "Fp8Linear", "GGUFLinear", "dequantize_tensor", "info_command",
    "inspect_checkpoint", "load_dit", "load_text_encoder", "load_vae", "open_checkpoint", "quantize_linear_weights",
]
