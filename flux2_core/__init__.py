"""FLUX.2 engine: pure PyTorch."""
