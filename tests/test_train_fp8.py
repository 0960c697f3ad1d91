"""Training on an fp8 frozen base (train/fp8_training.py): the fp32 LoRA's gradients on a per-tensor or per-row
fp8 base, dequantized or with scaled fp8 matmuls (`fp8_matmul`, run here on `_scaled_mm`'s CPU kernel), match
those on the fp32 base within fp8's rounding, and `flux2 train --fp8_base [--fp8_matmul]` runs with either."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from tiny_models import dit_config
from train_configs import demo_train_config

from flux2_core.checkpoints.quant import Fp8Linear, quantize_linear_weights
from flux2_core.demo_models import random_dit
from flux2_core.memory.fp8_matmul import set_fp8_matmul
from flux2_core.train.adapters import AdapterSet
from flux2_core.train import fp8_training
from flux2_core.train.config import TrainConfig, config_to_toml, load_config
from flux2_core.train.fp8_training import enable_fp8_matmul, load_training_dit
from flux2_core.train.full_finetune import make_trainer
from flux2_core.train.objective import Batch, model_inputs

# e4m3 keeps 3 mantissa bits: each weight is off by up to 2^-4 relative (~3.6 % rms after absmax scaling); the
# LoRA gradient's relative error is of the same order (measured 4.5 % per tensor, 4.2 % per row on this model).
# bf16 (8 bits) gives ~16x less; the bound sits between the two. fp8 matmuls also round the activations and the
# gradients flowing back to e4m3: measured MATMUL_ERRORS below, under the same bound.
FP8_GRADIENT_TOLERANCE = 0.08


def _lora_gradients(dit, seed: int = 0) -> dict[str, torch.Tensor]:
    config = TrainConfig(network_dim=4, network_alpha=4.0)
    adapters = AdapterSet(dit, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(dit.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    latents = torch.randn(1, 128, 2, 3, generator=generator)
    batch = Batch(latents, torch.randn(1, 5, dit.config.context_dim, generator=generator))
    out = dit(**model_inputs(latents, batch, torch.device("cpu"), torch.float32), timesteps=torch.tensor([0.6]),
              guidance=None)
    target = torch.randn(out.shape, generator=generator)
    ((out - target) ** 2).mean().backward()
    return {name: param.grad.clone() for name, param in dit.named_parameters() if param.requires_grad}


def _relative_l2(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert set(reference) == set(ours) and reference
    flat_ref = torch.cat([g.flatten() for g in reference.values()])
    flat_ours = torch.cat([ours[name].flatten() for name in reference])
    return float((flat_ours - flat_ref).norm() / flat_ref.norm())


@pytest.mark.parametrize("matmul", [False, True], ids=["dequantize", "fp8-matmul"])
@pytest.mark.parametrize("per_row", [False, True], ids=["per-tensor", "per-row"])
def test_lora_gradients_on_an_fp8_base_match_the_fp32_base(per_row: bool, matmul: bool, monkeypatch) -> None:
    """LoRA gradients on the fp8 base against the fp32 base. With fp8 matmuls (measured relative L2 against the
    fp32 base: 6.5 % per tensor, 6.0 % per row, vs 4.5 % / 4.2 % dequantizing; against the dequantizing fp8 base
    4.6 % / 3.9 %) every fp8 layer runs `_scaled_mm` in its forward and in its input gradient."""
    base = random_dit(dit_config(guidance_embed=False), 2)
    fp8 = copy.deepcopy(base)
    layers = quantize_linear_weights(fp8, per_channel=per_row)
    assert layers > 0
    layer = fp8.double_blocks[0].img_attn.qkv
    assert isinstance(layer, Fp8Linear) and layer.weight_scale.dim() == (1 if per_row else 0)
    reference, dequantized = _lora_gradients(base), _lora_gradients(copy.deepcopy(fp8))
    calls = []
    if matmul:
        scaled_mm = torch._scaled_mm
        monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or scaled_mm(*a, **k))
        assert set_fp8_matmul(fp8, True, anywhere=True) == layers
    ours = _lora_gradients(fp8)
    error = _relative_l2(ours, reference)
    print(f"{'per-row' if per_row else 'per-tensor'} {'fp8 matmul' if matmul else 'dequantize'}: LoRA gradient "
          f"relative L2 vs fp32 base {error:.4f}, vs dequantizing fp8 base {_relative_l2(ours, dequantized):.4f}")
    assert 0 < error < FP8_GRADIENT_TOLERANCE, error
    # every fp8 layer multiplies once forward and once for its input's gradient, except the first block's two qkv
    # layers, whose inputs depend on no trained parameter
    assert len(calls) == (2 * layers - 2 if matmul else 0), (len(calls), layers)


@pytest.mark.parametrize("scale", ["tensor", "row"])
def test_fp8_base_training_runs_with_either_scale(demo_models_dir, tmp_path, scale: str) -> None:
    config = demo_train_config(demo_models_dir, tmp_path, max_train_steps=2, network_dim=4, fp8_base=True,
                               fp8_scale=scale)
    trainer = make_trainer(config)
    trainer.run()
    qkv = trainer.dit.double_blocks[0].img_attn.qkv.base_layer
    assert isinstance(qkv, Fp8Linear) and qkv.weight_scale.dim() == (1 if scale == "row" else 0)
    assert all(p.dtype == torch.float32 for p in trainer.trainable.parameters())


def test_fp8_matmul_flag_round_trips_through_the_command_line_and_toml(tmp_path) -> None:
    from flux2_core.train.cli import config_from_args
    from flux2_host.cli import build_parser

    required = ["train", "--dit", "d", "--vae", "v", "--text_encoder", "t", "--dataset_config", "x", "--fp8_base"]
    assert not config_from_args(build_parser().parse_args(required)).fp8_matmul  # off by default
    config = config_from_args(build_parser().parse_args(required + ["--fp8-matmul"]))
    assert config.fp8_matmul
    assert not config_from_args(build_parser().parse_args(required + ["--fp8_matmul", "false"])).fp8_matmul
    path = tmp_path / "train.toml"
    path.write_text(config_to_toml(config))
    assert "fp8_matmul = true" in path.read_text() and load_config(path).fp8_matmul


def test_fp8_matmul_switches_the_fp8_layers_only_where_the_device_has_fp8_tensor_cores(
        demo_models_dir, tmp_path, monkeypatch) -> None:
    config = demo_train_config(demo_models_dir, tmp_path, fp8_base=True, fp8_matmul=True)
    log = io.StringIO()
    dit = load_training_dit(config, torch.device("cpu"), torch.float32, log)
    fp8_layers = [m for m in dit.modules() if isinstance(m, Fp8Linear)]
    assert fp8_layers and not any(layer.use_scaled_mm for layer in fp8_layers)
    assert "fp8_matmul: cpu has no fp8 tensor cores" in log.getvalue() and "dequantized" in log.getvalue()

    monkeypatch.setattr(fp8_training, "fp8_matmul_supported", lambda device: True)  # as on an H100 / H200
    log = io.StringIO()
    assert enable_fp8_matmul(dit, torch.device("cuda"), log) == len(fp8_layers)
    assert all(layer.use_scaled_mm for layer in fp8_layers) and f"{len(fp8_layers)} fp8 layers" in log.getvalue()
    log = io.StringIO()
    assert enable_fp8_matmul(random_dit(dit_config(guidance_embed=False), 2), torch.device("cuda"), log) == 0
    assert "no fp8 layers" in log.getvalue()
