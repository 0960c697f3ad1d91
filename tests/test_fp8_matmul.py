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
    x, weight = layer_and_input()
    w8, scale = quantize_weight(weight, per_channel=per_channel)
    out = scaled_linear(x.cuda().bfloat16(), w8.cuda(), scale.cuda())
    emulated = emulated_scaled_linear(x.bfloat16().float(), w8, scale)
    assert relative_l2(out.cpu(), emulated) < 1e-2
