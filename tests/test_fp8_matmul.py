"""The scaled fp8 matmul path: its arithmetic emulated in fp32 on the CPU against fp32 / bf16 references, the
switch, and the fallback to dequantize-then-matmul where no fp8 tensor cores exist."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flux2_core.checkpoints.quant import Fp8Linear, quantize_weight
from flux2_core.memory.fp8_matmul import (
    emulated_scaled_linear,
    fp8_matmul_supported,
    quantize_activation,
    scaled_linear,
    set_fp8_matmul,
)


def relative_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).norm() / reference.float().norm()).item()


def layer_and_input(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Activations with a few large channels, as transformer activations have.
    x = torch.randn(96, 512, generator=generator) * (1 + 4 * (torch.rand(512, generator=generator) > 0.97))
    weight = torch.randn(384, 512, generator=generator) / 512 ** 0.5
    return x, weight


def test_activation_quantization_uses_the_whole_e4m3_range():
    x, _ = layer_and_input()
    for rowwise, scale_shape in ((False, ()), (True, (96, 1))):
        x8, scale = quantize_activation(x, rowwise)
        assert x8.dtype == torch.float8_e4m3fn and scale.shape == scale_shape and scale.dtype == torch.float32
        peak = x8.float().abs().amax(dim=-1) if rowwise else x8.float().abs().amax()
        assert torch.all(peak == torch.finfo(torch.float8_e4m3fn).max)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-row"])
def test_emulated_scaled_path_error_against_fp32_and_bf16_weights(per_channel):
    x, weight = layer_and_input()
    reference = x @ weight.t()
    w8, scale = quantize_weight(weight, per_channel=per_channel)
    dequantized_path = F.linear(x, w8.float() * (scale[:, None] if per_channel else scale))
    scaled_path = emulated_scaled_linear(x, w8, scale)
    bf16_path = (x.bfloat16() @ weight.bfloat16().t()).float()
    errors = {"bf16": relative_l2(bf16_path, reference), "fp8 weights": relative_l2(dequantized_path, reference),
              "fp8 weights + activations": relative_l2(scaled_path, reference)}
    print(f"relative L2 vs fp32 ({'per-row' if per_channel else 'per-tensor'} weight scale):", errors)
    # e4m3 keeps 3 mantissa bits: ~2-3% per quantized operand; quantizing activations too adds its own share.
    assert errors["fp8 weights"] < 0.04
    assert errors["fp8 weights"] < errors["fp8 weights + activations"] < 0.06
    assert relative_l2(scaled_path, bf16_path) < 0.06


def test_switch_falls_back_to_dequantize_without_fp8_tensor_cores():
    x, weight = layer_and_input()
    layer = torch.nn.Sequential(Fp8Linear.from_linear(torch.nn.Linear(512, 384, bias=False)))
    with torch.no_grad():
        layer[0].weight.copy_(quantize_weight(weight)[0])
    before = layer(x)
    assert set_fp8_matmul(layer, True) == 1 and layer[0].use_scaled_mm
    assert not fp8_matmul_supported("cpu")
    assert torch.equal(layer(x), before)


@pytest.mark.skipif(not fp8_matmul_supported("cuda"), reason="GPU-only: needs fp8 tensor cores (capability >= 8.9)")
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-row"])
def test_scaled_mm_on_the_gpu_matches_its_emulation(per_channel):
    """Forward and input gradient on the GPU's kernels (which accept fewer layouts than the CPU's: the transposed
    weight copy of the backward is what cuBLASLt / the rowwise kernel need) against the fp32 emulation."""
    x, weight = layer_and_input()
    w8, scale = quantize_weight(weight, per_channel=per_channel)
    grad_out = torch.randn(96, 384, generator=torch.Generator().manual_seed(1))
    x_gpu = x.cuda().bfloat16().requires_grad_()
    out = scaled_linear(x_gpu, w8.cuda(), scale.cuda())
    out.backward(grad_out.cuda().bfloat16())
    emulated = emulated_scaled_linear(x.bfloat16().float(), w8, scale)
    assert relative_l2(out.cpu(), emulated) < 1e-2
    g = grad_out.bfloat16().float() * (scale if per_channel else scale.reshape(()))
    emulated_grad = quantize_rows_like_the_kernel_input(g) @ w8.float()
    assert relative_l2(x_gpu.grad.cpu(), emulated_grad) < 1e-2

def quantize_rows_like_the_kernel_input(values: torch.Tensor) -> torch.Tensor:
    """An independent re-statement of the gradient quantization: per-row absmax into e4m3, dequantized."""
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    scale = (values.abs().amax(dim=-1, keepdim=True) / fp8_max).clamp(min=torch.finfo(torch.float32).tiny)
    return (values / scale).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn).float() * scale


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-row"])
def test_scaled_linear_forward_and_input_gradient_on_the_cpu_kernel(per_channel):
    """`scaled_linear`'s autograd (forward and input gradient through `torch._scaled_mm`, which torch's CPU build
    runs exactly) against (1) an fp32 emulation of the same quantization, tightly, and (2) the bf16
    dequantize-then-matmul path that training used before, within fp8 tolerance. Measured relative L2 against the
    bf16 path on this layer: forward 2.1 % / 2.0 %, input gradient 2.6 % / 2.6 % (per-tensor / per-row weight
    scale); against the emulation 3e-7 / 0 forward and 0 / 0 input gradient (the same fp8 values and products)."""
    x, weight = layer_and_input()
    w8, scale = quantize_weight(weight, per_channel=per_channel)
    bias = torch.randn(384, generator=torch.Generator().manual_seed(2)).requires_grad_()
    grad_out = torch.randn(96, 384, generator=torch.Generator().manual_seed(1))
    x_ours = x.clone().requires_grad_()
    out = scaled_linear(x_ours, w8, scale, bias)
    out.backward(grad_out)

    # (1) the same arithmetic in fp32: the forward's emulation is the module's; the gradient's is restated here
    # (the weight's scale multiplies grad_out's columns, one e4m3 scale per token, exact products)
    dequantized = w8.float() * (scale[:, None] if per_channel else scale)
    # (the kernel writes bf16 for rowwise scales, so the emulation is rounded the same way where it does)
    emulated_out = emulated_scaled_linear(x, w8, scale)
    emulated_out = (emulated_out.bfloat16().float() if per_channel else emulated_out) + bias.detach()
    g = grad_out * (scale if per_channel else scale.reshape(()))
    emulated_grad = (quantize_rows_like_the_kernel_input(g) @ w8.float()).bfloat16().float()
    errors_emulation = {"forward": relative_l2(out, emulated_out),
                        "grad_input": relative_l2(x_ours.grad, emulated_grad)}
    # (2) the dequantize-then-matmul path in bf16 (fp8 weight dequantized, activations and gradients bf16)
    x_bf16 = x.bfloat16().requires_grad_()
    out_bf16 = F.linear(x_bf16, dequantized.bfloat16(), bias.detach().bfloat16())
    out_bf16.backward(grad_out.bfloat16())
    errors_bf16 = {"forward": relative_l2(out, out_bf16), "grad_input": relative_l2(x_ours.grad, x_bf16.grad)}
    print(f"relative L2 ({'per-row' if per_channel else 'per-tensor'}): vs emulation {errors_emulation}, "
          f"vs bf16 dequantize path {errors_bf16}")
    assert max(errors_emulation.values()) < 1e-5, errors_emulation  # fp32 summation order only
    assert 0 < max(errors_bf16.values()) < 0.05, errors_bf16  # e4m3: 3 mantissa bits on activations / gradients
    assert x_ours.grad.dtype == x.dtype
    assert torch.allclose(bias.grad, grad_out.sum(0), rtol=1e-5, atol=1e-4)


def test_scaled_linear_keeps_only_the_frozen_weight_for_the_backward():
    """The dequantize path's F.linear keeps its dequantized (bf16) weight for the backward; the scaled path keeps
    only references to the stored fp8 weight and its scale, no activation and no copy."""
    x, weight = layer_and_input()
    w8, scale = quantize_weight(weight, per_channel=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        scaled_linear(x.requires_grad_(), w8, scale)
    assert saved and all(t.data_ptr() in (w8.data_ptr(), scale.data_ptr()) for t in saved)
    with pytest.raises(ValueError, match="frozen"):
        scaled_linear(x, torch.nn.Parameter(w8.float()).to(torch.float8_e4m3fn), scale)


def test_fp8_linear_trains_through_the_scaled_path_when_forced_on_the_cpu(monkeypatch):
    """`set_fp8_matmul(anywhere=True)` routes an Fp8Linear through `_scaled_mm` on the CPU, forward and backward."""
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    x, weight = layer_and_input()
    layer = torch.nn.Sequential(Fp8Linear.from_linear(torch.nn.Linear(512, 384, bias=False)))
    assert set_fp8_matmul(layer, True, anywhere=True) == 1
    layer(x.requires_grad_()).square().mean().backward()
    assert len(calls) == 2 and x.grad is not None and x.grad.abs().sum() > 0
