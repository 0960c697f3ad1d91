"""GGUF DiT files: our torch dequantization against the gguf package's numpy one (bit for bit), and a tiny FLUX.2
DiT written with gguf's own writer (every quant type in one file, laid out as ComfyUI-GGUF's converter does)
loading with its linears still quantized and computing what the dequantized weights compute."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from flux2_core.checkpoints import inspect_checkpoint, load_dit
from flux2_core.checkpoints.gguf import QUANT_FORMATS, GGUFLinear, dequantize, open_gguf
from flux2_core.dit import Flux2DiT
from flux2_core.errors import CheckpointError, IncompatibleModelsError
from flux2_core.lora import attach_loras, lora_from_state_dict, merge_loras
from flux2_core.variants import DiTConfig

ALL_TYPES = [Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q4_0, Q.Q4_1, Q.Q3_K, Q.Q2_K]
# gguf's numpy code quantizes these; the K-quants it only decodes, so their test blocks are random bytes.
GGUF_CAN_QUANTIZE = {Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1}
# Byte offsets of the float16 scales in each block (from ggml's block structs): random bytes there could spell
# inf/NaN, so the tests write finite scales at those places.
F16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q2_K: (80, 82),
              Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# Rows of 256 values so that every type, K-quants included, can hold every linear.
TINY_GGUF_DIT = DiTConfig(hidden_size=256, num_heads=4, head_dim=64, axes_dim=(16, 16, 16, 16), depth_double=1,
                          depth_single=1, context_dim=256, guidance_embed=False)
# ComfyUI-GGUF's quantizer keeps these (and every 1-D tensor) unquantized for flux.
UNQUANTIZED_PREFIXES = ("img_in.", "txt_in.", "time_in.", "guidance_in.", "final_layer.")


def random_blocks(qtype: Q, rows: int, row_values: int, seed: int) -> np.ndarray:
    """uint8 [rows, bytes] of valid random blocks: random packed integers, finite random scales."""
    elements, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * row_values // elements, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        scales = (rng.standard_normal(blocks.shape[0]) * 0.02).astype(np.float16)
        blocks[:, at:at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def assert_bit_equal(ours: torch.Tensor, reference: np.ndarray) -> None:
    reference = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))
    assert ours.dtype == torch.float32 and ours.shape == reference.shape
    assert torch.isfinite(reference).all()
    assert torch.equal(ours.view(torch.int32), reference.view(torch.int32))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_dequantize_random_blocks_bit_equal_to_gguf(qtype):
    fmt = QUANT_FORMATS[int(qtype)]
    assert (fmt.name, fmt.elements, fmt.bytes) == (qtype.name, *gguf.GGML_QUANT_SIZES[qtype])
    blocks = random_blocks(qtype, rows=6, row_values=1024, seed=int(qtype))
    ours = dequantize(torch.from_numpy(blocks), qtype.name, (6, 1024))
    assert_bit_equal(ours, gguf.quants.dequantize(blocks, qtype))


@pytest.mark.parametrize("qtype", sorted(GGUF_CAN_QUANTIZE), ids=lambda q: q.name)
def test_dequantize_gguf_quantized_weights_bit_equal(qtype):
    weights = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32)
    blocks = gguf.quants.quantize(weights, qtype)
    ours = dequantize(torch.from_numpy(blocks), qtype.name, weights.shape)
    assert_bit_equal(ours, gguf.quants.dequantize(blocks, qtype))


def test_dequantize_in_chunks_and_other_dtypes(monkeypatch):
    blocks = torch.from_numpy(random_blocks(Q.Q4_K, rows=4, row_values=512, seed=3))
    whole = dequantize(blocks, "Q4_K", (4, 512))
    monkeypatch.setattr("flux2_core.checkpoints.gguf._CHUNK_VALUES", 256)  # one block per chunk
    assert torch.equal(dequantize(blocks, "Q4_K", (4, 512)), whole)
    assert torch.equal(dequantize(blocks, "Q4_K", (4, 512), torch.bfloat16), whole.bfloat16())
    with pytest.raises(ValueError, match="Q4_K"):
        dequantize(blocks[:, :-1], "Q4_K", (4, 512))


# ---------------------------------------------------------------------------------------------------------------
# A tiny FLUX.2 DiT as a GGUF file


def gguf_tensors(config: DiTConfig, seed: int) -> dict[str, tuple[np.ndarray, Q]]:
    """BFL name -> (data as gguf's writer takes it, type): linears cycle through every quant type."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    quantized = 0
    for name, tensor in Flux2DiT(config, device="meta").state_dict().items():
        values = torch.randn(tensor.shape, generator=generator)
        if tensor.ndim == 1:
            out[name] = ((1.0 + 0.2 * values).numpy(), Q.F32)
        elif name.startswith(UNQUANTIZED_PREFIXES):
            data = (values / tensor.shape[1] ** 0.5).numpy()
            qtype = Q.BF16 if name.startswith(("img_in.", "final_layer.")) else Q.F16
            out[name] = (gguf.quants.quantize(data, qtype) if qtype == Q.BF16 else data.astype(np.float16), qtype)
        else:
            qtype = ALL_TYPES[quantized % len(ALL_TYPES)]
            quantized += 1
            if qtype in GGUF_CAN_QUANTIZE:
                data = gguf.quants.quantize((values / tensor.shape[1] ** 0.5).numpy(), qtype)
            else:
                data = random_blocks(qtype, tensor.shape[0], tensor.shape[1], seed=quantized)
            out[name] = (data, qtype)
    return out


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, Q]], arch: str = "flux") -> None:
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dequantized_model(tensors: dict[str, tuple[np.ndarray, Q]], config: DiTConfig) -> Flux2DiT:
    """The reference: a plain float32 DiT holding gguf's numpy dequantization of every tensor."""
    model = Flux2DiT(config, dtype=torch.float32)
    state = {name: torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype), dtype=np.float32))
             for name, (data, qtype) in tensors.items()}
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tensors = gguf_tensors(TINY_GGUF_DIT, seed=0)
    path = tmp_path_factory.mktemp("gguf") / "flux-2-klein-4b-Q4_K_M.gguf"
    write_gguf(path, tensors)
    return path, tensors


def dit_inputs(config: DiTConfig, tokens: int = 16, text: int = 8):
    generator = torch.Generator().manual_seed(5)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                         indexing="ij"), -1).reshape(1, tokens, 4)
    return dict(img=torch.randn(1, tokens, config.in_channels, generator=generator), img_ids=img_ids,
                txt=torch.randn(1, text, config.context_dim, generator=generator), txt_ids=torch.zeros(1, text, 4),
                timesteps=torch.tensor([0.6]), guidance=None)


def test_gguf_dit_loads_quantized_and_matches_dequantized_weights(tiny_gguf):
    path, tensors = tiny_gguf
    dit = load_dit(path, device="cpu", dtype=torch.float32)
    layers = {name: m for name, m in dit.named_modules() if isinstance(m, GGUFLinear)}
    expected = {name.removesuffix(".weight") for name, (_, q) in tensors.items() if q.name in
                {t.name for t in ALL_TYPES}}
    assert set(layers) == expected
    assert {m.quant_type for m in layers.values()} == {t.name for t in ALL_TYPES}
    assert all(m.weight.dtype == torch.uint8 for m in layers.values())
    assert dit.img_in.weight.dtype == torch.float32 and not isinstance(dit.img_in, GGUFLinear)

    reference = dequantized_model(tensors, TINY_GGUF_DIT)
    inputs = dit_inputs(TINY_GGUF_DIT)
    assert torch.equal(dit(**inputs), reference(**inputs))


def test_lora_hooks_on_gguf_layers(tiny_gguf):
    path, tensors = tiny_gguf
    dit = load_dit(path, device="cpu", dtype=torch.float32)
    reference = dequantized_model(tensors, TINY_GGUF_DIT)
    generator = torch.Generator().manual_seed(9)
    lora_tensors = {}
    for module in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"):
        layer = dit.get_submodule(module)
        assert isinstance(layer, GGUFLinear)
        lora_tensors[f"diffusion_model.{module}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=generator) * 0.1
        lora_tensors[f"diffusion_model.{module}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=generator) * 0.1
    lora = lora_from_state_dict(lora_tensors)
    inputs = dit_inputs(TINY_GGUF_DIT)
    plain = dit(**inputs)
    with attach_loras(dit, [(lora, 0.8)]), attach_loras(reference, [(lora, 0.8)]):
        patched = dit(**inputs)
        assert torch.equal(patched, reference(**inputs))
    assert not torch.equal(patched, plain)
    with pytest.raises(IncompatibleModelsError, match="GGUF-quantized.*attach_loras"):
        merge_loras(dit, [(lora, 0.8)])
    assert torch.equal(dit(**inputs), plain)


def test_plain_weight_dtype_dequantizes_everything(tiny_gguf):
    path, tensors = tiny_gguf
    dit = load_dit(path, device="cpu", weight_dtype="float32")
    assert not any(isinstance(m, GGUFLinear) for m in dit.modules())
    inputs = dit_inputs(TINY_GGUF_DIT)
    assert torch.equal(dit(**inputs), dequantized_model(tensors, TINY_GGUF_DIT)(**inputs))


def test_info_reports_dit_and_quant_types(tiny_gguf):
    path, tensors = tiny_gguf
    info = inspect_checkpoint(path)
    assert (info.kind, info.format, info.family, info.variant) == ("dit", "gguf", "flux2-custom", "klein-4b")
    counts = info.details["quant_types"]
    assert set(counts) == {t.name for t in ALL_TYPES} | {"F32", "F16", "BF16"}
    assert sum(counts.values()) == len(tensors) == info.tensors
    assert info.parameters == sum(p.numel() for p in Flux2DiT(TINY_GGUF_DIT, device="meta").parameters())

    run = subprocess.run([sys.executable, "-m", "flux2_host.cli", "info", str(path), "--json"],
                         capture_output=True, text=True, check=True)
    reported = json.loads(run.stdout)
    assert reported["kind"] == "dit" and reported["format"] == "gguf"
    assert reported["details"]["quant_types"] == counts and reported["details"]["gguf_architecture"] == "flux"


def test_bad_gguf_files_name_the_file(tmp_path, tiny_gguf):
    path, _ = tiny_gguf
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.gguf.*truncated"):
        open_gguf(truncated)

    unsupported = tmp_path / "iq.gguf"
    write_gguf(unsupported, {"x.weight": (np.zeros((2, 66), dtype=np.uint8), Q.IQ2_XXS)})
    with pytest.raises(CheckpointError, match="iq.gguf.*IQ2_XXS"):
        inspect_checkpoint(unsupported)

    text_model = tmp_path / "llama.gguf"
    write_gguf(text_model, {"blk.0.attn_q.weight": (np.zeros((4, 32), dtype=np.float32), Q.F32)}, arch="llama")
    with pytest.raises(CheckpointError, match="llama.gguf: expected a FLUX.2 diffusion model"):
        load_dit(text_model)


def test_loader_nodes_read_gguf(tiny_gguf, tmp_path):
    from flux2_host import folders
    from flux2_host.core_nodes import NODE_CLASS_MAPPINGS as CORE

    path, _ = tiny_gguf
    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    (models / "diffusion_models" / path.name).symlink_to(path)
    (models / "diffusion_models" / "other.safetensors").write_bytes(b"")
    folders.configure(models=str(models), input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"),
                      temp_dir=str(tmp_path / "tmp"))
    gguf_names = CORE["UnetLoaderGGUF"].INPUT_TYPES()["required"]["unet_name"][0]
    assert gguf_names == [path.name]
    assert path.name in CORE["UNETLoader"].INPUT_TYPES()["required"]["unet_name"][0]
    advanced = CORE["UnetLoaderGGUFAdvanced"].INPUT_TYPES()["required"]
    assert list(advanced) == ["unet_name", "dequant_dtype", "patch_dtype", "patch_on_device"]
    assert advanced["unet_name"][0] == gguf_names and advanced["dequant_dtype"][1]["default"] == "default"
    for model in (CORE["UnetLoaderGGUF"]().load_unet(path.name)[0],
                  CORE["UnetLoaderGGUFAdvanced"]().load_unet(path.name, "bfloat16", "default", False)[0],
                  CORE["UNETLoader"]().load_unet(path.name, "default")[0]):
        assert model.variant == "klein-4b"
        assert any(isinstance(m, GGUFLinear) for m in model.diffusion_model.modules())


def test_gguf_dit_is_managed_by_its_quantized_size_and_streams_under_a_small_budget(tiny_gguf):
    from flux2_core.memory import residency
    from flux2_core.memory.residency import MemoryManager, model_size_bytes

    path, tensors = tiny_gguf
    resident = load_dit(path, device="cpu", dtype=torch.float32)
    quantized = sum(m.weight.nbytes for m in resident.modules() if isinstance(m, GGUFLinear))
    dequantized = dequantized_model(tensors, TINY_GGUF_DIT)
    inputs = dit_inputs(TINY_GGUF_DIT)
    previous = residency.default_manager()
    try:
        roomy = residency.set_default_manager(MemoryManager(device="cpu", total_bytes=1 << 40, reserve_bytes=0))
        dit = residency.load_managed(load_dit, path, name="GGUF DiT", dtype=torch.float32)
        size = roomy.record(dit).size_bytes
        # Quantized linears count their stored blocks' bytes (uint8), not their dequantized size.
        assert size == model_size_bytes(resident) < model_size_bytes(dequantized) and quantized < size

        tight = residency.set_default_manager(MemoryManager(device="cpu", total_bytes=path.stat().st_size // 2,
                                                            reserve_bytes=0))
        streamed = residency.load_managed(load_dit, path, name="GGUF DiT", dtype=torch.float32)
        assert streamed.block_streamer is not None and tight.record(streamed) is not None
        with tight.use(streamed):
            assert torch.equal(streamed(**inputs), resident(**inputs))
    finally:
        residency.set_default_manager(previous)
