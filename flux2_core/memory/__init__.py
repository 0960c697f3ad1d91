"""Where weights live and how they reach the GPU: residency, block streaming, fp8 matmuls, estimates."""
