"""Device and compute-dtype defaults, following ComfyUI: fp32 on CPU, bf16 on CUDA (fp16 where bf16 is
unsupported). A checkpoint's stored dtype is storage only; the compute dtype comes from here unless the
user overrides it."""

from __future__ import annotations

import torch

_DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# Set by `set_compute_dtype` (the host's --dtype flag): replaces the per-device default for every model.
_compute_dtype_override: torch.dtype | None = None


def set_compute_dtype(dtype: torch.dtype | str | None) -> None:
    """Make every model loaded without an explicit dtype compute in `dtype`; None or "default" restores the
    per-device defaults (fp32 on CPU, bf16 on CUDA)."""
    global _compute_dtype_override
    _compute_dtype_override = None if dtype in (None, "default") else resolve_dtype(dtype, "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    if _compute_dtype_override is not None:
        return _compute_dtype_override
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def resolve_device(device: torch.device | str | None) -> torch.device:
    return default_device() if device in (None, "", "default", "auto") else torch.device(device)


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """`None`/"default" -> the device default; a name like "bf16" or a torch dtype -> that dtype."""
    if dtype is None or dtype == "default":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype: expected one of {sorted(set(_DTYPE_NAMES))} or 'default', found {dtype!r}") from None
