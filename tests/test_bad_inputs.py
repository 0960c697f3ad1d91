"""Wrong or broken files give one CheckpointError naming the file, what was expected and what was found, and
`flux2 info` prints one line and exits 2 for files it cannot read."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from flux2_core.checkpoints import inspect_checkpoint, load_dit, load_text_encoder, load_vae, open_checkpoint
from flux2_core.checkpoints.quant import quantize_state_dict
from flux2_core.dit import Flux2DiT
from flux2_core.errors import CheckpointError
from flux2_core.variants import DiTConfig
from flux2_core.vae import Flux2VAE, VAEConfig
from flux2_host.cli import main as flux2_main

TINY_DIT = DiTConfig(hidden_size=32, num_heads=2, head_dim=16, axes_dim=(4, 4, 4, 4), depth_double=1,
                     depth_single=1, context_dim=24, guidance_embed=False)
TINY_VAE = VAEConfig(base_channels=32, channel_multipliers=(1, 1, 1, 1), decoder_channels=(32, 32, 32, 32))


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")
    dit = state_of(Flux2DiT(TINY_DIT, device="meta"))
    paths = {name: root / f"{name}.safetensors" for name in
             ("dit", "vae", "text_encoder", "lora", "flux1", "missing_tensor", "wrong_shape", "nvfp4", "truncated")}
    save_file(dit, paths["dit"])
    save_file(state_of(Flux2VAE(TINY_VAE, device="meta")), paths["vae"])
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         tie_word_embeddings=False))
    save_file(qwen3.state_dict(), paths["text_encoder"])
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(96, 4),
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}, paths["lora"])
    save_file({"double_blocks.0.img_mod.lin.weight": torch.zeros(192, 32), "img_in.weight": torch.zeros(32, 64)},
              paths["flux1"])
    save_file({k: v for k, v in dit.items() if k != "single_blocks.0.linear2.weight"}, paths["missing_tensor"])
    save_file(dict(dit, **{"double_blocks.0.txt_attn.proj.weight": torch.zeros(32, 31)}), paths["wrong_shape"])
    tensors, _ = quantize_state_dict(dit, "comfyui-fp8-mixed")
    tensors["double_blocks.0.img_attn.qkv.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_file(tensors, paths["nvfp4"])
    paths["truncated"].write_bytes(paths["dit"].read_bytes()[:-100])
    paths["pickle"] = root / "flux2.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, paths["pickle"])
    paths["random"] = root / "random.safetensors"
    # Binary noise that happens to open with '<' must not pass for an HTML page.
    paths["random"].write_bytes(b"<" + random.Random(0).randbytes(4095))
    paths["html"] = root / "download.safetensors"
    paths["html"].write_text("<!DOCTYPE html><html><body>Access denied</body></html>")
    paths["empty_folder"] = root / "empty"
    paths["empty_folder"].mkdir()
    paths["nowhere"] = root / "no-such-model.safetensors"
    return paths


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


UNREADABLE = {
    "truncated": "truncated safetensors file",
    "pickle": "PyTorch zip/pickle checkpoint",
    "random": "not a safetensors header",
    "html": "HTML",
    "empty_folder": "found an empty folder",
    "nowhere": "found nothing at that path",
}


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_unreadable_inputs_raise_one_clear_error_everywhere(files, name, capsys):
    path = files[name]
    for call in (load_dit, load_vae, load_text_encoder, inspect_checkpoint, open_checkpoint):
        message = error_of(call, path)
        assert str(path) in message and UNREADABLE[name] in message, (call.__name__, message)

    assert flux2_main(["info", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and UNREADABLE[name] in err


WRONG_KIND = [
    (load_dit, "vae", "expected a FLUX.2 diffusion model (DiT), found a VAE (flux2-vae, bfl); load it as a VAE"),
    (load_dit, "text_encoder", "found a text encoder (qwen3, hf); load it as a text encoder"),
    (load_dit, "lora", "found a LoRA (flux2, kohya); load it as a LoRA"),
    (load_dit, "flux1", "found a FLUX.1 one"),
    (load_vae, "dit", "expected the FLUX.2 VAE, found a DiT diffusion model (flux2-custom, bfl)"),
    (load_vae, "text_encoder", "expected the FLUX.2 VAE, found a text encoder"),
    (load_text_encoder, "dit", "expected a FLUX.2 text encoder (Qwen3 or Mistral 3), found a DiT diffusion model"),
    (load_text_encoder, "vae", "found a VAE (flux2-vae, bfl)"),
]


@pytest.mark.parametrize("loader,name,expected", WRONG_KIND, ids=[f"{n}-as-{f.__name__}" for f, n, _ in WRONG_KIND])
def test_wrong_kind_of_file_names_what_it_is(files, loader, name, expected):
    message = error_of(loader, files[name])
    assert message.startswith(str(files[name])) and expected in message


@pytest.mark.parametrize("name,kind", [("dit", "dit"), ("vae", "vae"), ("text_encoder", "text_encoder"),
                                       ("lora", "lora"), ("flux1", "dit")])
def test_info_names_the_kind_of_readable_files(files, name, kind, capsys):
    assert flux2_main(["info", str(files[name]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == kind


def test_incomplete_or_mixed_checkpoints(files):
    assert "missing ['single_blocks.0.linear2.weight']" in error_of(load_dit, files["missing_tensor"])
    message = error_of(load_dit, files["wrong_shape"])
    assert "'double_blocks.0.txt_attn.proj.weight' has shape [32, 31], expected [32, 32]" in message
    message = error_of(load_dit, files["nvfp4"])
    assert "layer 'double_blocks.0.img_attn.qkv' is quantized as 'nvfp4'" in message


def test_inconsistent_shapes_name_the_file(files, tmp_path):
    """Errors from reading the architecture off tensor shapes name the file, like every other load error."""
    dit = state_of(Flux2DiT(TINY_DIT, device="meta"))
    broken_dit = tmp_path / "broken_dit.safetensors"
    save_file(dict(dit, **{"time_in.in_layer.weight": torch.zeros(32, 100)}), broken_dit)
    broken_vae = tmp_path / "broken_vae.safetensors"
    vae = state_of(Flux2VAE(TINY_VAE, device="meta"))
    save_file({k: v for k, v in vae.items() if k != "decoder.post_quant_conv.weight"}, broken_vae)
    for call, path, expected in ((load_dit, broken_dit, "time_in.in_layer.weight: expected 256 input features, found 100"),
                                 (inspect_checkpoint, broken_dit, "expected 256 input features"),
                                 (load_vae, broken_vae, "expected tensor 'decoder.post_quant_conv.weight'")):
        message = error_of(call, path)
        assert message.startswith(f"{path}: ") and expected in message, (call.__name__, message)


def test_pipeline_folder_without_the_component(tmp_path, files):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "vae").mkdir()
    message = error_of(load_dit, tmp_path)
    assert "diffusers pipeline folder" in message and str(tmp_path / "transformer") in message


def test_flux2_info_command_line_exits_2_with_one_line(files):
    result = subprocess.run([sys.executable, "-m", "flux2_host.cli", "info", str(files["truncated"])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "truncated safetensors file" in result.stderr
