"""Block streaming: a DiT and a text encoder streamed from the CPU or from their file compute exactly what the
resident model computes (same device, same dtype), and the budget decides which blocks stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import dit_config

from flux2_core.checkpoints.loaders import load_dit, load_text_encoder
from flux2_core.checkpoints.quant import Fp8Linear, quantize_state_dict
from flux2_core.demo_models import random_dit
from flux2_core.demo_tokenizers import write_tiny_text_encoder
from flux2_core.memory.streaming import GIB, plan_streaming
from flux2_core.pipeline import Flux2Pipeline

REF_TOKENS = 5


def dit_inputs(config, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    img = torch.randn(1, 6, config.in_channels, generator=generator)
    txt = torch.randn(1, 4, config.context_dim, generator=generator)
    img_ids = torch.stack((torch.zeros(6), torch.arange(6.0) // 3, torch.arange(6.0) % 3, torch.zeros(6)), -1)[None]
    txt_ids = torch.stack((torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.arange(4.0)), -1)[None]
    ref = torch.randn(1, REF_TOKENS, config.in_channels, generator=generator)
    ref_ids = torch.stack((torch.full((REF_TOKENS,), 10.0), torch.zeros(REF_TOKENS), torch.arange(REF_TOKENS * 1.0),
                           torch.zeros(REF_TOKENS)), -1)[None]
    return img, img_ids, txt, txt_ids, ref, ref_ids


def run(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Two steps with a reference K/V cache: forward twice (the second reuses the prefetch cycle)."""
    img, img_ids, txt, txt_ids, ref, ref_ids = inputs
    guidance = torch.tensor([4.0]) if model.config.guidance_embed else None
    with torch.no_grad():
        cache = model.cache_reference_kv(ref, ref_ids, guidance)
        first = model(img, img_ids, txt, txt_ids, torch.tensor([0.9]), guidance, reference_kv=cache)
        second = model(first, img_ids, txt, txt_ids, torch.tensor([0.4]), guidance, reference_kv=cache)
    return first, second


@pytest.fixture(scope="module")
def dit_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("streaming")
    state = random_dit(dit_config(True), seed=5).to(torch.bfloat16).state_dict()
    files = {"bf16": folder / "dit_bf16.safetensors", "fp8": folder / "dit_fp8.safetensors"}
    save_file(state, str(files["bf16"]))
    tensors, metadata = quantize_state_dict(state, "comfyui-fp8-mixed")
    save_file(tensors, str(files["fp8"]), metadata=metadata)
    return files


@pytest.mark.parametrize("offload", ["cpu", "disk"])
@pytest.mark.parametrize("stored", ["bf16", "fp8"])
@pytest.mark.parametrize("budget", [0.0, None], ids=["budget-0", "no-budget"])
def test_streamed_dit_equals_resident_dit(dit_files, offload, stored, budget):
    resident = load_dit(dit_files[stored], device="cpu", dtype=torch.float32)
    streamed = load_dit(dit_files[stored], device="cpu", dtype=torch.float32, offload=offload, vram_budget_gb=budget)
    streamer = streamed.block_streamer
    assert streamer.offload == offload and len(streamer.blocks) == 4  # every block streams on a CPU-only machine
    assert all(p.is_meta for block in streamer.blocks for p in block.parameters())
    if stored == "fp8":
        assert isinstance(streamed.single_blocks[0].linear1, Fp8Linear)
    inputs = dit_inputs(resident.config)
    for ours, reference in zip(run(streamed, inputs), run(resident, inputs)):
        assert torch.equal(ours, reference)
    # Released after use: nothing of a streamed block stays materialized.
    assert all(p.is_meta for block in streamer.blocks for p in block.parameters())


def test_disk_streaming_reads_blocks_from_the_file_per_use(dit_files, monkeypatch):
    streamed = load_dit(dit_files["fp8"], device="cpu", dtype=torch.float32, offload="disk", vram_budget_gb=0)
    from flux2_core.checkpoints.reader import CheckpointSource

    reads: list[str] = []
    original = CheckpointSource.get
    def counting_get(self, name, *args, **kwargs):
        reads.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(CheckpointSource, "get", counting_get)
    img, img_ids, txt, txt_ids, _, _ = dit_inputs(streamed.config)
    with torch.no_grad():
        for _ in range(2):
            streamed(img, img_ids, txt, txt_ids, torch.tensor([0.5]), torch.tensor([4.0]))
    qkv = "double_blocks.0.img_attn.qkv.weight"
    assert reads.count(qkv) == 2 and reads.count(qkv + "_scale") == 2  # fp8 weight + scale, each call


def test_budget_keeps_leading_blocks_resident(dit_files):
    sizes = [100, 100, 50, 50, 50]
    plan = plan_streaming(sizes, 30, "cpu", "disk", vram_budget_gb=(30 + 200 + 100 + 50) / GIB)
    assert plan.offload == "disk" and plan.resident_blocks == 1  # 30 fixed + 2 x 100 in flight + block 0
    assert plan_streaming(sizes, 30, "cpu", None, vram_budget_gb=1.0).offload is None  # fits: resident
    assert plan_streaming(sizes, 30, "cpu", None, vram_budget_gb=100 / GIB).offload == "cpu"
    assert plan_streaming(sizes, 30, "cpu").offload is None  # CPU, nothing asked: resident
    with pytest.raises(ValueError, match="offload"):
        plan_streaming(sizes, 30, "cpu", "gpu")

    # The file's own sizes: room for everything outside the blocks, two blocks in flight, and block 0.
    state = load_file(dit_files["bf16"])
    block_bytes = {prefix: sum(t.nbytes for k, t in state.items() if k.startswith(prefix))
                   for prefix in ("double_blocks.0.", "double_blocks.1.", "single_blocks.0.", "single_blocks.1.")}
    other = sum(t.nbytes for t in state.values()) - sum(block_bytes.values())
    budget = other + 2 * max(block_bytes.values()) + block_bytes["double_blocks.0."]
    model = load_dit(dit_files["bf16"], device="cpu", offload="disk", vram_budget_gb=budget / GIB)
    assert len(model.block_streamer.blocks) == 3
    assert not any(p.is_meta for p in model.double_blocks[0].parameters())


def test_moving_a_streamed_model_retargets_the_streamer(dit_files):
    model = load_dit(dit_files["bf16"], device="cpu", dtype=torch.float32, offload="cpu", vram_budget_gb=0)
    model.to("meta")
    assert model.block_streamer.device == torch.device("meta") and model.img_in.weight.is_meta


@pytest.fixture(scope="module")
def text_encoder_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("streaming_te")
    return {
        "qwen3-fp8": write_tiny_text_encoder("qwen3", folder / "qwen_fp8.safetensors", quantization="fp8mixed", seed=2),
        "mistral3-hf": write_tiny_text_encoder("mistral3", folder / "mistral", layout="hf", seed=3,
                                               dtype=torch.float32),
    }


@pytest.mark.parametrize("offload", ["cpu", "disk"])
@pytest.mark.parametrize("file", ["qwen3-fp8", "mistral3-hf"])
def test_streamed_text_encoder_equals_resident(text_encoder_files, file, offload):
    prompts = ["a lighthouse at dusk", "two cats"]
    resident = load_text_encoder(text_encoder_files[file], device="cpu")
    streamed = load_text_encoder(text_encoder_files[file], device="cpu", offload=offload, vram_budget_gb=0)
    streamer = streamed.model.block_streamer
    assert len(streamer.blocks) == len(streamed.model.layers) and streamer.offload == offload
    assert torch.equal(streamed.encode(prompts), resident.encode(prompts))
    # offload() / to() move the resident part and retarget the streamed layers without touching them.
    streamed.offload()
    assert torch.equal(streamed.to("cpu").encode(prompts[:1]), resident.encode(prompts[:1]))
    assert all(p.is_meta for layer in streamer.blocks for p in layer.parameters())
    if file == "qwen3-fp8":  # fp8 layers are kept and copied as fp8 + scale, dequantized after the copy
        assert any(part.dtype == torch.float8_e4m3fn for layer in streamer._blocks for t in layer.stored
                   for part in (t.parts or t.read()))


def test_text_encoder_budget_counts_layers_as_they_sit_on_the_device(text_encoder_files):
    """An fp8 file's layers are dequantized after the copy: the budget must hold their compute-dtype size."""
    path = text_encoder_files["qwen3-fp8"]
    state = load_file(path)
    resident = load_text_encoder(path, device="cpu", dtype=torch.bfloat16)
    layer_bytes = [sum(t.nbytes for t in layer.parameters()) for layer in resident.model.layers]
    other = sum(t.nbytes for t in resident.model.parameters()) - sum(layer_bytes)
    assert sum(layer_bytes) > sum(t.nbytes for k, t in state.items() if ".layers." in k)  # bf16 > fp8 + scales
    # Room for the rest, two layers in flight and exactly two resident layers, counted in bf16.
    budget = other + 4 * max(layer_bytes) + 4096  # the file's scale tensors
    streamed = load_text_encoder(path, device="cpu", dtype=torch.bfloat16, offload="cpu", vram_budget_gb=budget / GIB)
    assert len(streamed.model.layers) - len(streamed.model.block_streamer.blocks) == 2
    on_device = sum(t.nbytes for t in streamed.model.parameters() if not t.is_meta)
    assert on_device + 2 * max(layer_bytes) <= budget


def test_checkpointed_backward_reloads_a_released_block(dit_files):
    """Training with activation checkpointing: the recompute in backward loads the block again."""
    model = load_dit(dit_files["bf16"], device="cpu", dtype=torch.float32, offload="cpu", vram_budget_gb=0)
    block = model.single_blocks[1]
    loads = []
    block.register_forward_pre_hook(lambda *_: loads.append(1))
    x = torch.randn(1, 4, model.config.hidden_size, requires_grad=True)
    rotations = torch.zeros(1, 4, 1, model.config.head_dim // 2, 2)
    rotations[..., 0] = 1
    (mod,) = model.single_stream_modulation(torch.randn(1, model.config.hidden_size))
    out = torch.utils.checkpoint.checkpoint(block, x, rotations, mod, use_reentrant=False)
    out.sum().backward()
    assert len(loads) == 2 and x.grad is not None and x.grad.abs().sum() > 0
    model.block_streamer.release_all()  # the early-stopped recompute skipped the forward hook
    assert all(p.is_meta for p in block.parameters())


def test_pipeline_streams_dit_and_text_encoder_from_disk(demo_models_dir):
    files = {"dit": demo_models_dir / "diffusion_models" / "flux-2-klein-4b.safetensors",
             "vae": demo_models_dir / "vae" / "flux2-vae.safetensors",
             "text_encoder": demo_models_dir / "text_encoders" / "qwen_3_4b.safetensors"}
    options = {"prompt": "a red kite", "width": 64, "height": 64, "steps": 2, "seed": 4, "output_type": "latent"}
    resident = Flux2Pipeline.from_files(**files, device="cpu")
    streamed = Flux2Pipeline.from_files(**files, device="cpu", offload="disk", vram_budget_gb=0)
    assert torch.equal(streamed(**options), resident(**options))
    assert streamed.dit.block_streamer.offload == "disk"
    assert streamed.text_encoder.model.block_streamer.offload == "disk"


def test_streaming_a_model_in_memory_and_detaching():
    from flux2_core.memory.streaming import StreamPlan, stream_loaded_blocks

    model = random_dit(dit_config(True), seed=6)
    inputs = dit_inputs(model.config)
    expected = run(model, inputs)
    blocks = [block for _, block in model.named_blocks()]
    streamer = stream_loaded_blocks(blocks, "cpu", StreamPlan("cpu", resident_blocks=1), methods=("reference_forward",))
    assert len(streamer.blocks) == 3 and all(p.is_meta for p in blocks[3].parameters())
    for ours, reference in zip(run(model, inputs), expected):
        assert torch.equal(ours, reference)
    streamer.detach()
    assert not any(p.is_meta for p in model.parameters())
    assert "reference_forward" not in vars(blocks[3]) and not blocks[3]._forward_pre_hooks
    for ours, reference in zip(run(model, inputs), expected):
        assert torch.equal(ours, reference)


def test_compiled_blocks_stream_without_recompiling():
    from torch._dynamo.utils import counters

    from flux2_core.memory.streaming import StreamPlan, stream_loaded_blocks

    model = random_dit(dit_config(False), seed=7)
    img, img_ids, txt, txt_ids, _, _ = dit_inputs(model.config)
    with torch.no_grad():
        expected = model(img, img_ids, txt, txt_ids, torch.tensor([0.5]))
        stream_loaded_blocks([block for _, block in model.named_blocks()], "cpu", StreamPlan("cpu", 0))
        torch._dynamo.reset()
        counters.clear()
        model.compile_blocks(backend="eager", fullgraph=True)
        outputs = [model(img, img_ids, txt, txt_ids, torch.tensor([0.5])) for _ in range(3)]
    # New tensors at every block load are graph inputs: still one graph per block class, no recompiles.
    assert counters["stats"]["unique_graphs"] == 2 and not counters["recompiles"]
    assert all(torch.equal(out, expected) for out in outputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: prefetch on a side CUDA stream")
@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_cuda_streaming_with_prefetch_equals_resident(dit_files, offload):
    resident = load_dit(dit_files["fp8"], device="cuda", dtype=torch.bfloat16)
    streamed = load_dit(dit_files["fp8"], device="cuda", dtype=torch.bfloat16, offload=offload, vram_budget_gb=0)
    inputs = tuple(t.cuda() for t in dit_inputs(resident.config))
    guidance = torch.tensor([4.0], device="cuda")
    with torch.no_grad():
        for step in range(3):  # the prefetch wraps around from the last block to the first between calls
            timestep = torch.tensor([0.9 - 0.3 * step], device="cuda")
            ours = streamed(*inputs[:4], timestep, guidance)
            assert torch.equal(ours, resident(*inputs[:4], timestep, guidance))
