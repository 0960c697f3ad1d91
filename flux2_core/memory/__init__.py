"""Where weights live and how they reach the GPU: residency, block streaming, fp8 matmuls, estimates."""

from .residency import (MemoryManager, VramMode, configure, default_manager, free_memory, load_managed, manage,
                        model_size_bytes, unload_all, use)

__all__ = ["MemoryManager", "VramMode", "configure", "default_manager", "free_memory", "load_managed", "manage",
           "model_size_bytes", "unload_all", "use"]
