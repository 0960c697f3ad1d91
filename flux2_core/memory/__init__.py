"""Where weights live and how they reach the GPU: residency, block streaming, fp8 matmuls, estimates."""

from .fp8_matmul import emulated_scaled_linear, fp8_matmul_supported, scaled_linear, set_fp8_matmul
from .streaming import BlockStreamer, StoredTensor, StreamPlan, plan_streaming, stream_loaded_blocks

__all__ = [
    "BlockStreamer", "StoredTensor", "StreamPlan", "emulated_scaled_linear", "fp8_matmul_supported",
    "plan_streaming", "scaled_linear", "set_fp8_matmul", "stream_loaded_blocks",
]
