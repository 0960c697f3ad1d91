"""Reading FLUX.2 checkpoints: files and folders, fp8 layouts, detection and loaders."""

from .quant import Fp8Linear, dequantize_tensor, quantize_linear_weights
from .reader import CheckpointSource, open_checkpoint

__all__ = ["CheckpointSource", "Fp8Linear", "dequantize_tensor", "open_checkpoint", "quantize_linear_weights"]
