"""`checkpoints.writers.save_dit`: a whole DiT written in the BFL single-file layout (plain or fp8 like the
official fp8 files) reads back through `load_dit` and the host's UNETLoader node with the same tensors."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from tiny_models import dit_config

from flux2_core.checkpoints.loaders import load_dit
from flux2_core.checkpoints.quant import Fp8Linear, dequantize_tensor, quantize_weight
from flux2_core.checkpoints.writers import save_dit
from flux2_core.demo_models import random_dit
from flux2_host import folders
from flux2_host.core_nodes.loaders import UNETLoader


@pytest.fixture()
def model():
    dit = random_dit(dit_config(guidance_embed=False), 3)
    dit.variant = "klein-base-4b"
    return dit


def test_bf16_file_is_bfl_layout_and_round_trips(model, tmp_path) -> None:
    path = tmp_path / "tuned.safetensors"
    save_dit(model, path, metadata={"flux2.trained_steps": "7"})
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())  # BFL names, no prefix
        assert f.metadata() == {"variant": "klein-base-4b", "flux2.trained_steps": "7"}
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    loaded = load_dit(path, dtype=torch.float32)
    assert loaded.variant == "klein-base-4b" and loaded.config == model.config
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.bfloat16().float())


@pytest.mark.parametrize("layout", ["bfl-fp8", "comfyui-fp8-mixed"])
def test_fp8_file_loads_through_unet_loader(model, layout, tmp_path) -> None:
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    save_dit(model, folder / "tuned_fp8.safetensors", fp8=layout, key_prefix="model.diffusion_model.")
    folders.configure(models=str(tmp_path), input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"),
                      temp_dir=str(tmp_path / "tmp"))
    assert "tuned_fp8.safetensors" in UNETLoader.INPUT_TYPES()["required"]["unet_name"][0]
    patched = UNETLoader().load_unet("tuned_fp8.safetensors", "default")[0]
    dit = patched.diffusion_model
    assert patched.variant == "klein-base-4b"
    qkv = dit.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, Fp8Linear) and qkv.weight.dtype == torch.float8_e4m3fn
    # every block linear holds the per-row fp8 quantization of the bf16 weight; the rest is bf16
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "blocks." in name:
            expected = dequantize_tensor(*quantize_weight(module.weight.bfloat16()), torch.float32)
            torch.testing.assert_close(dit.get_submodule(name).dequantized_weight(torch.float32), expected)
    torch.testing.assert_close(dit.img_in.weight.float(), model.img_in.weight.bfloat16().float())


def test_fp8_model_is_saved_dequantized_or_requantized(model, tmp_path) -> None:
    save_dit(model, tmp_path / "a.safetensors", fp8="bfl-fp8", dtype=torch.float32)
    fp8_model = load_dit(tmp_path / "a.safetensors")  # Fp8Linear layers
    save_dit(fp8_model, tmp_path / "b.safetensors", dtype=torch.float32)
    again = load_dit(tmp_path / "b.safetensors", dtype=torch.float32)
    weight = fp8_model.double_blocks[0].img_attn.qkv.dequantized_weight(torch.float32)
    torch.testing.assert_close(again.double_blocks[0].img_attn.qkv.weight, weight)
    with pytest.raises(ValueError, match="fp8 layout"):
        save_dit(model, tmp_path / "c.safetensors", fp8="int4")
