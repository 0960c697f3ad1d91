"""Every checkpoint layout users download loads into the same model: tiny random weights are written in each
layout (diffusers folders by diffusers itself), loaded back and compared with the originals, and the loaded DiT
is compared with diffusers' Flux2Transformer2DModel on the same weights."""

import json
import struct

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from safetensors.torch import save_file

from flux2_core.checkpoints import (Fp8Linear, dequantize_tensor, inspect_checkpoint, load_dit, load_vae,
                                    open_checkpoint, quantize_linear_weights)
from flux2_core.checkpoints.dit_keys import bfl_to_diffusers
from flux2_core.checkpoints.quant import quantize_state_dict, quantize_weight
from flux2_core.checkpoints.vae_keys import bfl_vae_to_diffusers
from flux2_core.devices import default_dtype, resolve_dtype, set_compute_dtype
from flux2_core.dit import Flux2DiT
from flux2_core.variants import FULL_SIZE_DIT, DiTConfig
from flux2_core.vae import Flux2VAE, VAEConfig
from flux2_host.cli import main as flux2_main

TINY_DIT = DiTConfig(hidden_size=64, num_heads=4, head_dim=16, axes_dim=(4, 4, 4, 4), depth_double=2,
                     depth_single=2, context_dim=48, guidance_embed=True)
TINY_VAE = VAEConfig(base_channels=32, channel_multipliers=(1, 2, 2, 2), decoder_channels=(32, 64, 64, 64))
MAX_RELATIVE_ERROR = 1e-5
COMFY_PREFIX = "model.diffusion_model."


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor random at a sane scale (norm weights around 1, variances positive)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("running_var"):
            state[name] = 0.5 + noise.abs()
        elif tensor.ndim > 1:
            state[name] = noise / tensor[0].numel() ** 0.5
        else:
            state[name] = (1.0 if name.endswith(("scale", "weight")) else 0.0) + 0.2 * noise
    return state


@pytest.fixture(scope="module")
def dit_state() -> dict[str, torch.Tensor]:
    return random_state(Flux2DiT(TINY_DIT, device="meta"), seed=0)


def diffusers_dit(state: dict[str, torch.Tensor]) -> Flux2Transformer2DModel:
    c = TINY_DIT
    model = Flux2Transformer2DModel(
        in_channels=c.in_channels, num_layers=c.depth_double, num_single_layers=c.depth_single,
        attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=c.context_dim,
        mlp_ratio=c.mlp_ratio, axes_dims_rope=c.axes_dim, guidance_embeds=c.guidance_embed,
    )
    model.load_state_dict({k: v.clone() for k, v in bfl_to_diffusers(state).items()}, strict=True)
    return model.eval()


def dit_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rows, cols, text = 3, 4, 5
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(rows)), torch.arange(float(cols)), torch.zeros(1),
                                         indexing="ij"), dim=-1).reshape(1, -1, 4).float()
    txt_ids = torch.zeros(1, text, 4)
    txt_ids[..., 3] = torch.arange(text)
    return dict(img=torch.randn(1, rows * cols, 128, generator=generator), img_ids=img_ids,
                txt=torch.randn(1, text, TINY_DIT.context_dim, generator=generator), txt_ids=txt_ids,
                timesteps=torch.tensor([0.7]), guidance=torch.tensor([4.0]))


def run_ours(model: Flux2DiT, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


def run_diffusers(model: Flux2Transformer2DModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"], timestep=inputs["timesteps"],
                     img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"], guidance=inputs["guidance"],
                     return_dict=False)[0]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def assert_same_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


# --------------------------------------------------------------------------------------------------------------
# DiT: float layouts

@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX, "diffusion_model."])
def test_bfl_file_with_each_prefix_loads_exactly(tmp_path, dit_state, prefix):
    path = tmp_path / "flux-2-klein-base-4b.safetensors"
    save_file({prefix + k: v for k, v in dit_state.items()}, path)

    model = load_dit(path, device="cpu", dtype=torch.float32)

    assert_same_state(model, dit_state)
    assert model.source_path == str(path)
    assert model.variant == "flux2-dev"  # the guidance embedding decides, whatever the name says
    info = inspect_checkpoint(path)
    assert (info.kind, info.family, info.format, info.key_prefix) == ("dit", "flux2-custom",
                                                                      "comfyui" if prefix else "bfl", prefix)


def test_klein_variant_comes_from_name_and_argument(tmp_path, dit_state):
    klein = {k: v for k, v in dit_state.items() if not k.startswith("guidance_in.")}
    base, distilled = tmp_path / "flux-2-klein-base-4b.safetensors", tmp_path / "flux-2-klein-4b.safetensors"
    save_file(klein, base)
    save_file(klein, distilled)
    assert load_dit(base, device="cpu").variant == "klein-base-4b"
    assert load_dit(distilled, device="cpu").variant == "klein-4b"
    assert load_dit(distilled, device="cpu", variant="klein-base-4b").variant == "klein-base-4b"


def test_diffusers_sharded_folder_written_by_diffusers(tmp_path, dit_state):
    reference = diffusers_dit(dit_state)
    reference.save_pretrained(tmp_path / "transformer", max_shard_size="200KB")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline"}))
    shards = sorted(p.name for p in (tmp_path / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()

    from_folder = load_dit(tmp_path / "transformer", device="cpu", dtype=torch.float32)
    from_pipeline_root = load_dit(tmp_path, device="cpu", dtype=torch.float32)

    assert_same_state(from_folder, dit_state)
    assert_same_state(from_pipeline_root, dit_state)
    info = inspect_checkpoint(tmp_path)
    assert (info.kind, info.format, info.tensors) == ("dit", "diffusers", len(reference.state_dict()))
    assert "pipeline folder" in info.notes[0]


def test_single_diffusers_named_file(tmp_path, dit_state):
    path = tmp_path / "flux2_diffusers_named.safetensors"
    save_file({k: v.clone() for k, v in bfl_to_diffusers(dit_state).items()}, path)
    assert_same_state(load_dit(path, device="cpu", dtype=torch.float32), dit_state)


@pytest.mark.parametrize("source", ["bfl-file", "diffusers-folder"])
def test_dit_forward_matches_diffusers(tmp_path, dit_state, source):
    reference = diffusers_dit(dit_state)
    if source == "bfl-file":
        path = tmp_path / "flux2.safetensors"
        save_file(dit_state, path)
    else:
        path = tmp_path / "transformer"
        reference.save_pretrained(path, max_shard_size="200KB")
    inputs = dit_inputs()

    ours = run_ours(load_dit(path, device="cpu", dtype=torch.float32), inputs)

    assert relative_error(ours, run_diffusers(reference, inputs)) <= MAX_RELATIVE_ERROR


# --------------------------------------------------------------------------------------------------------------
# DiT: fp8 layouts

FP8_CASES = [
    ("comfyui-fp8-mixed", "tensor", torch.float8_e4m3fn),
    ("comfyui-fp8-mixed", "metadata", torch.float8_e4m3fn),
    ("scaled-fp8", "tensor", torch.float8_e4m3fn),
    ("bfl-fp8", "tensor", torch.float8_e4m3fn),
    ("bfl-fp8", "tensor", torch.float8_e5m2),
    ("fp8", "tensor", torch.float8_e4m3fn),
]


@pytest.mark.parametrize("layout,marker,fp8_dtype", FP8_CASES,
                         ids=[f"{layout}-{marker}-{str(d)[-5:]}" for layout, marker, d in FP8_CASES])
def test_fp8_layouts_stay_fp8_and_match_their_dequantized_reference(tmp_path, dit_state, layout, marker, fp8_dtype):
    tensors, metadata = quantize_state_dict({COMFY_PREFIX + k: v for k, v in dit_state.items()}, layout, fp8_dtype,
                                            comfy_marker=marker)
    path = tmp_path / "flux2_fp8.safetensors"
    save_file(tensors, path, metadata=metadata)

    fp8_model = load_dit(path, device="cpu", dtype=torch.float32)
    dequantized_model = load_dit(path, device="cpu", dtype=torch.float32, weight_dtype="fp32")

    qkv = fp8_model.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, Fp8Linear) and qkv.weight.dtype == fp8_dtype
    assert type(fp8_model.img_in) is torch.nn.Linear and fp8_model.img_in.weight.dtype == torch.float32
    assert not any(isinstance(m, Fp8Linear) for m in dequantized_model.modules())
    for name, original in dit_state.items():
        key = COMFY_PREFIX + name
        if tensors[key].dtype != fp8_dtype:
            assert torch.equal(dequantized_model.state_dict()[name], original), name
            continue
        layer = name.removesuffix(".weight")
        scale = next((tensors[COMFY_PREFIX + layer + s] for s in (".weight_scale", ".scale_weight")
                      if COMFY_PREFIX + layer + s in tensors), None)
        expected = dequantize_tensor(tensors[key], scale, torch.float32)
        assert torch.equal(dequantized_model.state_dict()[name], expected), name
        assert torch.equal(fp8_model.get_submodule(layer).dequantized_weight(torch.float32), expected), name
        # within fp8 rounding of the float original (3 mantissa bits for e4m3, 2 for e5m2; plain fp8 has no scale)
        mantissa_bits = 3 if fp8_dtype == torch.float8_e4m3fn else 2
        assert (expected - original).abs().max() <= original.abs().max() * 2.0 ** -mantissa_bits, name

    inputs = dit_inputs()
    assert relative_error(run_ours(fp8_model, inputs), run_ours(dequantized_model, inputs)) <= MAX_RELATIVE_ERROR
    info = inspect_checkpoint(path)
    assert (info.kind, info.format, info.key_prefix) == ("dit", layout, COMFY_PREFIX)
    assert info.parameters == sum(t.numel() for t in dit_state.values())


def test_per_row_scales_and_uint8_containers_are_read(tmp_path, dit_state):
    tensors, metadata = quantize_state_dict(dit_state, "comfyui-fp8-mixed", comfy_marker="metadata")
    per_row_layer, container_layer = "single_blocks.0.linear1", "double_blocks.1.txt_mlp.0"
    weight, scale = quantize_weight(dit_state[per_row_layer + ".weight"], per_channel=True)
    tensors[per_row_layer + ".weight"], tensors[per_row_layer + ".weight_scale"] = weight, scale.reshape(-1, 1)
    tensors[container_layer + ".weight"] = tensors[container_layer + ".weight"].view(torch.uint8)
    path = tmp_path / "flux2_fp8mixed.safetensors"
    save_file(tensors, path, metadata=metadata)

    model = load_dit(path, device="cpu", dtype=torch.float32)

    per_row = model.get_submodule(per_row_layer)
    assert per_row.weight_scale.shape == (weight.shape[0],)
    assert torch.equal(per_row.dequantized_weight(torch.float32), weight.float() * scale[:, None])
    container = model.get_submodule(container_layer)
    assert container.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(container.weight.view(torch.uint8), tensors[container_layer + ".weight"])


def test_weight_dtype_fp8_quantizes_block_linears_while_streaming(tmp_path, dit_state):
    path = tmp_path / "flux2.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in dit_state.items()}, path)

    streamed = load_dit(path, device="cpu", dtype=torch.float32, weight_dtype="fp8_e4m3fn")
    converted = load_dit(path, device="cpu", dtype=torch.float32)
    count = quantize_linear_weights(converted, "fp8_e4m3fn")

    fp8_layers = [name for name, m in streamed.named_modules() if isinstance(m, Fp8Linear)]
    assert count == len(fp8_layers) == TINY_DIT.depth_double * 2 * 4 + TINY_DIT.depth_single * 2
    assert all(name.startswith(("double_blocks.", "single_blocks.")) for name in fp8_layers)
    for name, tensor in streamed.state_dict().items():
        assert torch.equal(tensor.view(torch.uint8) if tensor.dtype.itemsize == 1 else tensor,
                           converted.state_dict()[name].view(torch.uint8) if tensor.dtype.itemsize == 1
                           else converted.state_dict()[name]), name
    inputs = dit_inputs()
    assert relative_error(run_ours(streamed, inputs), run_ours(load_dit(path, device="cpu"), inputs)) < 0.1


# --------------------------------------------------------------------------------------------------------------
# VAE

@pytest.fixture(scope="module")
def vae_state() -> dict[str, torch.Tensor]:
    return random_state(Flux2VAE(TINY_VAE, device="meta"), seed=2)


def test_vae_from_bfl_file_and_diffusers_folder_are_equal(tmp_path, vae_state):
    bfl_path = tmp_path / "flux2-vae.safetensors"
    save_file(vae_state, bfl_path)
    c = TINY_VAE
    reference = AutoencoderKLFlux2(block_out_channels=c.encoder_channels, decoder_block_out_channels=c.decoder_channels,
                                   layers_per_block=c.encoder_blocks_per_level, latent_channels=c.z_channels)
    reference.load_state_dict({k: v.clone() for k, v in bfl_vae_to_diffusers(vae_state).items()}, strict=False)
    reference.save_pretrained(tmp_path / "pipeline" / "vae")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")

    from_file = load_vae(bfl_path, device="cpu", dtype=torch.float32)
    from_folder = load_vae(tmp_path / "pipeline", device="cpu", dtype=torch.float32)

    expected = dict(vae_state, **{"bn.num_batches_tracked": torch.tensor(0)})
    assert_same_state(from_file, expected)
    assert_same_state(from_folder, expected)
    assert (inspect_checkpoint(bfl_path).family, inspect_checkpoint(bfl_path).format) == ("flux2-vae", "bfl")
    assert inspect_checkpoint(tmp_path / "pipeline" / "vae").format == "diffusers"
    half = load_vae(bfl_path, device="cpu", dtype=torch.bfloat16)
    assert half.decoder.conv_in.weight.dtype == torch.bfloat16 and half.bn.running_var.dtype == torch.float32


# --------------------------------------------------------------------------------------------------------------
# Compute dtype: chosen by the device (or the caller), never by how the file stores its tensors


def test_device_default_dtypes(monkeypatch):
    assert default_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert default_dtype("cuda") == default_dtype("cuda:1") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert default_dtype("cuda") == torch.float16
    assert resolve_dtype(None, "cpu") == resolve_dtype("default", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert resolve_dtype("FP16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype: expected one of .* found 'half'"):
        resolve_dtype("half", "cpu")


def test_compute_dtype_override_replaces_the_device_default(tmp_path, dit_state, vae_state):
    """The host's --dtype: every model loaded without an explicit dtype computes in it; explicit dtypes win."""
    dit_file, vae_file = tmp_path / "dit.safetensors", tmp_path / "vae.safetensors"
    save_file(dit_state, dit_file)
    save_file(vae_state, vae_file)
    try:
        set_compute_dtype("bf16")
        assert default_dtype("cpu") == default_dtype("cuda") == torch.bfloat16
        assert load_dit(dit_file, device="cpu").compute_dtype == torch.bfloat16
        assert load_dit(dit_file, device="cpu", dtype="fp32").compute_dtype == torch.float32
        vae = load_vae(vae_file, device="cpu")
        assert vae.encoder.conv_in.weight.dtype == torch.bfloat16 and vae.bn.running_var.dtype == torch.float32
        with pytest.raises(ValueError, match="dtype: expected one of .* found 'half'"):
            set_compute_dtype("half")
    finally:
        set_compute_dtype(None)
    assert default_dtype("cpu") == torch.float32


def test_bf16_and_fp8_files_compute_in_the_device_dtype_unless_told(tmp_path, dit_state, vae_state):
    """A bf16 or fp8 file on the CPU computes in fp32; fp8 stays fp8 storage; `dtype` overrides; VAE stats stay fp32."""
    bf16_dit = tmp_path / "dit_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in dit_state.items()}, bf16_dit)
    model = load_dit(bf16_dit, device="cpu")
    assert model.compute_dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in load_dit(bf16_dit, device="cpu", dtype="bf16").parameters()} == {torch.bfloat16}

    fp8_dit = tmp_path / "dit_fp8mixed.safetensors"
    tensors, metadata = quantize_state_dict({COMFY_PREFIX + k: v for k, v in dit_state.items()}, "comfyui-fp8-mixed")
    save_file(tensors, fp8_dit, metadata=metadata)
    for dtype, compute in ((None, torch.float32), (torch.float16, torch.float16)):
        model = load_dit(fp8_dit, device="cpu", dtype=dtype)
        qkv = model.double_blocks[0].img_attn.qkv
        assert isinstance(qkv, Fp8Linear) and qkv.weight.dtype == torch.float8_e4m3fn
        assert model.compute_dtype == compute and model.img_in.weight.dtype == compute
        inputs = dit_inputs()
        assert run_ours(model, inputs).dtype == compute

    bf16_vae = tmp_path / "vae_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in vae_state.items()}, bf16_vae)
    for dtype, compute in ((None, torch.float32), ("bf16", torch.bfloat16)):
        vae = load_vae(bf16_vae, device="cpu", dtype=dtype)
        assert vae.decoder.conv_in.weight.dtype == vae.encoder.conv_in.weight.dtype == compute
        assert vae.bn.running_mean.dtype == vae.bn.running_var.dtype == torch.float32
        assert torch.equal(vae.bn.running_var, vae_state["bn.running_var"].to(torch.bfloat16).float())


# --------------------------------------------------------------------------------------------------------------
# Reading and detection without reading the data

def write_header_only(path, shapes: dict[str, tuple[int, ...]], dtype_code: str = "BF16") -> None:
    """A full-size safetensors file whose data region is a hole: real header, no bytes written (sparse)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": dtype_code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


@pytest.mark.parametrize("name,family,parameters,tensors", [
    ("flux-2-klein-4b.safetensors", "klein-4b", 3_875_544_576, 149),
    ("flux-2-klein-base-9b.safetensors", "klein-9b", 9_078_581_248, 201),
    ("flux2-dev.safetensors", "flux2-dev", 32_223_281_152, 299),
])
def test_full_size_files_are_recognized_from_their_header(tmp_path, name, family, parameters, tensors, capsys):
    variant_name = {"klein-4b": "klein-4b", "klein-9b": "klein-9b", "flux2-dev": "dev"}[family]
    shapes = {k: tuple(v.shape) for k, v in Flux2DiT(FULL_SIZE_DIT[variant_name], device="meta").state_dict().items()}
    path = tmp_path / name
    write_header_only(path, shapes)

    info = inspect_checkpoint(path)

    assert (info.kind, info.family, info.parameters, info.tensors) == ("dit", family, parameters, tensors)
    assert info.variant == {"klein-4b": "klein-4b", "klein-9b": "klein-base-9b", "flux2-dev": "flux2-dev"}[family]
    assert info.dtypes == {"bfloat16": tensors} and info.file_size > 2 * parameters
    assert flux2_main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == family
    assert flux2_main(["info", str(path)]) == 0
    table = capsys.readouterr().out
    assert f"{parameters:,}" in table and family in table


def test_reader_streams_single_tensors_and_merges_shard_metadata(tmp_path):
    first = {"a": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)}
    second = {"b": torch.tensor([1.5, -2.0]).to(torch.float8_e5m2)}
    save_file(first, tmp_path / "model-00001-of-00002.safetensors", metadata={"title": "x"})
    save_file(second, tmp_path / "model-00002-of-00002.safetensors", metadata={"other": "y"})

    with open_checkpoint(tmp_path) as source:
        assert sorted(source.keys()) == ["a", "b"] and source.metadata == {"title": "x", "other": "y"}
        assert source.shape("a") == (2, 3) and source.dtype("b") == torch.float8_e5m2
        assert torch.equal(source.get("a", dtype=torch.float32), first["a"].float())
        assert torch.equal(source.get("b").float(), torch.tensor([1.5, -2.0]))
