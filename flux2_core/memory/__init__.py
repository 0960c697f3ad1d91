"""Where weights live and how they reach the GPU: residency, block streaming, fp8 matmuls, estimates."""

from .estimate import (InsufficientMemoryError, MemoryPlan, MemoryRequest, check_fits, estimate, plan_for_files)
from .residency import (MemoryManager, VramMode, configure, default_manager, free_memory, load_managed, manage,
                        model_size_bytes, unload_all, use)

__all__ = ["InsufficientMemoryError", "MemoryManager", "MemoryPlan", "MemoryRequest", "VramMode", "check_fits",
           "configure", "default_manager", "estimate", "free_memory", "load_managed", "manage", "model_size_bytes",
           "plan_for_files", "unload_all", "use"]
