"""Where weights live and how they reach the GPU: residency, block streaming, fp8 matmuls, estimates."""

from .estimate import (InsufficientMemoryError, MemoryPlan, MemoryRequest, check_fits, estimate, plan_for_files)
from .fp8_matmul import emulated_scaled_linear, fp8_matmul_supported, scaled_linear, set_fp8_matmul
from .residency import (MemoryManager, VramMode, configure, default_manager, free_memory, load_managed, manage,
                        model_size_bytes, unload_all, use)
from .streaming import BlockStreamer, StoredTensor, StreamPlan, plan_streaming, stream_loaded_blocks

__all__ = [
    "BlockStreamer", "InsufficientMemoryError", "MemoryManager", "MemoryPlan", "MemoryRequest", "StoredTensor",
    "StreamPlan", "VramMode", "check_fits", "configure", "default_manager", "emulated_scaled_linear", "estimate",
    "fp8_matmul_supported", "free_memory", "load_managed", "manage", "model_size_bytes", "plan_for_files",
    "plan_streaming", "scaled_linear", "set_fp8_matmul", "stream_loaded_blocks", "unload_all", "use",
]
