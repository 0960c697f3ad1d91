"""fp8 matmuls: an fp8-stored linear multiplied on fp8 tensor cores instead of being dequantized first.

On GPUs with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell) `torch._scaled_mm` multiplies
an fp8 activation by the fp8 weight and applies both scales in the epilogue. Activations are quantized per call
(dynamic scaling, absmax into the e4m3 range):
- a per-tensor weight scale goes with one activation scale for the whole input;
- a per-row weight scale (one per output feature) goes with one activation scale per token, the "rowwise"
  form of `_scaled_mm` (it requires both sides rowwise).
Everywhere else (CPU, older GPUs, e5m2 weights, shapes the kernel refuses) the layer dequantizes its weight and
runs a plain matmul, as before. The scaled path adds the activation's quantization error (e4m3 keeps 3 mantissa
bits), which is why it is opt-in: ComfyUI's `fp8_e4m3fn_fast` weight dtype or `fp8_matmul=True`.

`emulated_scaled_linear` does the same arithmetic in fp32 (quantize exactly as the GPU path does, dequantize,
matmul) so the error of the scaled path can be measured on a CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

ACTIVATION_FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(ACTIVATION_FP8).max
# _scaled_mm wants both inner and output dimensions to be multiples of 16.
_ALIGNMENT = 16


def fp8_matmul_supported(device: torch.device | str) -> bool:
    """True where `torch._scaled_mm` runs on fp8 tensor cores: CUDA with compute capability >= 8.9."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_activation(x: Tensor, rowwise: bool) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (e4m3 x, float32 scale) with x ~= x8 * scale; scale is 0-dim, or [M, 1] when `rowwise`."""
    # Activation quantization runs at every call and is memory-bound, so each pass over x counts: the inf-norm
    # reads x once without writing |x|, and the fp32 copy is divided and clamped in place (same values as
    # out-of-place ops; the H200 run spent what the fp8 GEMMs saved on these passes).
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True) if rowwise else \
        torch.linalg.vector_norm(x, float("inf"))
    scale = (amax.float() / _FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    scaled = x.to(torch.float32, copy=True).div_(scale).clamp_(-_FP8_MAX, _FP8_MAX)
    return scaled.to(ACTIVATION_FP8), scale


def scaled_mm_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether `scaled_linear` can take this input and weight (else the caller dequantizes)."""
    out_features, in_features = weight.shape
    return (weight.dtype == ACTIVATION_FP8 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and in_features % _ALIGNMENT == 0 and out_features % _ALIGNMENT == 0 and fp8_matmul_supported(x.device))


def scaled_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., K] times an e4m3 weight [N, K] with its scale (0-dim or [N]) on fp8 tensor cores -> [..., N]."""
    rowwise = weight_scale.dim() == 1
    flat = x.reshape(-1, x.shape[-1])
    x8, x_scale = quantize_activation(flat, rowwise)
    # Rowwise scaling needs bf16 output; the result is cast back to the activation dtype.
    out_dtype = torch.bfloat16 if rowwise else x.dtype
    w_scale = weight_scale.float().reshape(1, -1) if rowwise else weight_scale.float().reshape(())
    # weight.t() of a row-major [N, K] tensor is the column-major [K, N] operand _scaled_mm expects.
    out = torch._scaled_mm(x8, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def emulated_scaled_linear(x: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    """`scaled_linear`'s arithmetic in fp32 on any device: the same activation quantization, exact products."""
    rowwise = weight_scale.dim() == 1
    flat = x.reshape(-1, x.shape[-1])
    x8, x_scale = quantize_activation(flat, rowwise)
    w = weight.float() * (weight_scale.float().reshape(-1, 1) if rowwise else weight_scale.float())
    out = (x8.float() * x_scale) @ w.t()
    return out.reshape(*x.shape[:-1], weight.shape[0])


def set_fp8_matmul(model: torch.nn.Module, enabled: bool) -> int:
    """Switch every fp8-stored linear of `model` (`checkpoints.quant.Fp8Linear`) to scaled fp8 matmuls, or back
    to dequantize-then-matmul. Layers fall back by themselves where the GPU cannot. Returns how many layers."""
    layers = [module for module in model.modules() if hasattr(module, "use_scaled_mm")]
    for layer in layers:
        layer.use_scaled_mm = enabled
    return len(layers)
