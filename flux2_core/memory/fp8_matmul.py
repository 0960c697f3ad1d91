"""fp8 matmuls: an fp8-stored linear multiplied on fp8 tensor cores instead of being dequantized first.

On GPUs with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell) `torch._scaled_mm` multiplies
an fp8 activation by the fp8 weight and applies both scales in the epilogue. Activations are quantized per call
(dynamic scaling, absmax into the e4m3 range):
- a per-tensor weight scale goes with one activation scale for the whole input;
- a per-row weight scale (one per output feature) goes with one activation scale per token, the "rowwise"
  form of `_scaled_mm` (it requires both sides rowwise).
Everywhere else (CPU, older GPUs, e5m2 weights, shapes the kernel refuses) the layer dequantizes its weight and
runs a plain matmul, as before. The scaled path adds the activation's quantization error (e4m3 keeps 3 mantissa
bits), which is why it is opt-in: ComfyUI's `fp8_e4m3fn_fast` weight dtype, `fp8_matmul=True`, or training's
`fp8_matmul = true`.

`scaled_linear` has a backward for a frozen weight (training adapters on an fp8 base): the input's gradient is
a scaled fp8 matmul too (`scaled_grad_input`), the weight gets none. torch's CPU build runs `_scaled_mm` as well
(a reference kernel: exact products, slow), which is how the tests run this path without a GPU
(`set_fp8_matmul(..., anywhere=True)`).

`emulated_scaled_linear` does the same arithmetic in fp32 (quantize exactly as the GPU path does, dequantize,
matmul) so the error of the scaled path can be measured on a CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

ACTIVATION_FP8 = torch.float8_e4m3fn
# Gradients are quantized to e4m3 as well, not to the e5m2 that per-tensor delayed scaling uses for them: here
# each token's gradient gets a scale from its own absmax at the moment it is quantized, so e5m2's wider exponent
# range buys nothing, while e4m3's extra mantissa bit halves the rounding error (input-gradient relative L2 2.7 %
# with e4m3 vs 5.3 % with e5m2 on tokens whose gradient magnitudes spread over e^±4, per-token scales).
GRADIENT_FP8 = ACTIVATION_FP8
_FP8_MAX = torch.finfo(ACTIVATION_FP8).max
# _scaled_mm wants both inner and output dimensions to be multiples of 16.
_ALIGNMENT = 16


def fp8_matmul_supported(device: torch.device | str) -> bool:
    """True where `torch._scaled_mm` runs on fp8 tensor cores: CUDA with compute capability >= 8.9."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _to_fp8(x32: Tensor, amax: Tensor) -> tuple[Tensor, Tensor]:
    """An fp32 tensor the caller owns, divided in place by amax / e4m3 max -> (e4m3 tensor, fp32 scale)."""
    scale = (amax.float() / _FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return x32.div_(scale).clamp_(-_FP8_MAX, _FP8_MAX).to(ACTIVATION_FP8), scale


def quantize_activation(x: Tensor, rowwise: bool) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (e4m3 x, float32 scale) with x ~= x8 * scale; scale is 0-dim, or [M, 1] when `rowwise`."""
    # Activation quantization runs at every call and is memory-bound, so each pass over x counts: the inf-norm
    # reads x once without writing |x|, and the fp32 copy is divided and clamped in place (same values as
    # out-of-place ops; the H200 run spent what the fp8 GEMMs saved on these passes).
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True) if rowwise else \
        torch.linalg.vector_norm(x, float("inf"))
    return _to_fp8(x.to(torch.float32, copy=True), amax)


def quantize_gradient(grad: Tensor, weight_scale: Tensor) -> tuple[Tensor, Tensor]:
    """grad [M, N] times the weight's scale (0-dim, or [N]: one per output feature, i.e. per column of grad)
    -> (e4m3, float32 [M, 1] scale): one scale per token, since gradients differ between tokens by orders of
    magnitude (loss weighting, attention)."""
    scaled = grad.float() * weight_scale.float()  # a new fp32 tensor, quantized in place
    return _to_fp8(scaled, torch.linalg.vector_norm(scaled, float("inf"), dim=-1, keepdim=True))


def scaled_mm_applies(x: Tensor, weight: Tensor, anywhere: bool = False) -> bool:
    """Whether `scaled_linear` can take this input and weight (else the caller dequantizes). `anywhere`: also
    where no fp8 tensor cores exist but `_scaled_mm` still runs (torch's CPU reference kernel, for tests)."""
    out_features, in_features = weight.shape
    return (weight.dtype == ACTIVATION_FP8 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and in_features % _ALIGNMENT == 0 and out_features % _ALIGNMENT == 0
            and (anywhere or fp8_matmul_supported(x.device)))


def _scaled_forward(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
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


def scaled_grad_input(grad_out: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    """The input's gradient of `scaled_linear`: grad_out [..., N] times the dequantized weight W8 * scale
    [N, K] -> [..., K] (bf16), on fp8 tensor cores."""
    flat = grad_out.reshape(-1, grad_out.shape[-1])
    # grad_x = grad_out @ (scale ⊙ W8). _scaled_mm applies scales only along the outer dimensions (rows of the
    # first operand, columns of the second); a per-row weight scale lies along the contracted dimension N here,
    # so it multiplies grad_out's columns before quantization and W8 enters with scale 1. (Folding the scale into
    # a per-tensor scale_b would be exact only for a per-tensor weight scale; one rule serves both.)
    g8, g_scale = quantize_gradient(flat, weight_scale)
    # The kernels take the second operand column-major only (cuBLASLt's "TN" fp8 layout, and torch's rowwise
    # kernel): W8 [N, K] column-major is a transposed copy of the stored row-major weight, 1 byte per weight per
    # backward (the dequantize path writes 2 bytes per weight per call instead).
    weight_cm = weight.t().contiguous().t()
    ones = torch.ones(1, weight.shape[1], dtype=torch.float32, device=weight.device)
    out = torch._scaled_mm(g8, weight_cm, scale_a=g_scale, scale_b=ones, out_dtype=torch.bfloat16)
    return out.reshape(*grad_out.shape[:-1], weight.shape[1])


class _ScaledLinear(torch.autograd.Function):
    """`_scaled_mm` has no derivative; this gives the scaled linear one for its input and bias. The fp8 weight
    is frozen (it gets no gradient), and nothing but the weight is kept for the backward (no activation)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight, weight_scale)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _scaled_forward(x, weight, weight_scale, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, weight_scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = scaled_grad_input(grad_out, weight, weight_scale).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias


def scaled_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., K] times an e4m3 weight [N, K] with its scale (0-dim or [N]) on fp8 tensor cores -> [..., N].
    Differentiable in x and bias (the input's gradient is a scaled fp8 matmul too); the weight must be frozen."""
    if weight.requires_grad:
        raise ValueError("scaled_linear: the fp8 weight must be frozen (requires_grad=False); "
                         "fp8 weights cannot be trained")
    return _ScaledLinear.apply(x, weight, weight_scale, bias)


def emulated_scaled_linear(x: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    """`scaled_linear`'s arithmetic in fp32 on any device: the same activation quantization, exact products."""
    rowwise = weight_scale.dim() == 1
    flat = x.reshape(-1, x.shape[-1])
    x8, x_scale = quantize_activation(flat, rowwise)
    w = weight.float() * (weight_scale.float().reshape(-1, 1) if rowwise else weight_scale.float())
    out = (x8.float() * x_scale) @ w.t()
    return out.reshape(*x.shape[:-1], weight.shape[0])


def set_fp8_matmul(model: torch.nn.Module, enabled: bool, anywhere: bool = False) -> int:
    """Switch every fp8-stored linear of `model` (`checkpoints.quant.Fp8Linear`) to scaled fp8 matmuls, or back
    to dequantize-then-matmul. Layers fall back by themselves where the GPU cannot, unless `anywhere` (tests:
    `_scaled_mm`'s CPU kernel). Returns how many layers."""
    layers = [module for module in model.modules() if hasattr(module, "use_scaled_mm")]
    for layer in layers:
        layer.use_scaled_mm = enabled
        layer.scaled_mm_anywhere = anywhere
    return len(layers)
