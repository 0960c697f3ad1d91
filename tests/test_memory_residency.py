"""The residency manager's budget accounting and LRU eviction, on the CPU with a made-up device capacity.

Sizes are given in made-up bytes (`size_bytes=`), so the arithmetic is exact; weights are real tensors, so the
tests also see that evicting and dropping keep them intact.
"""

from __future__ import annotations

import gc
import logging

from pathlib import Path

import pytest
import torch
from torch import nn

from flux2_core import Flux2Pipeline
from flux2_core.memory import residency
from flux2_core.memory.residency import Location, MemoryManager, model_size_bytes
from flux2_core.memory.streaming import stream_in_memory

GB = 10 ** 9


def manager(total_gb: float = 10, reserve_gb: float = 1, mode: str = "normal", ram_gb: float = 1000) -> MemoryManager:
    return MemoryManager(device="cpu", mode=mode, total_bytes=int(total_gb * GB), reserve_bytes=int(reserve_gb * GB),
                         ram_available=lambda: int(ram_gb * GB))


def fake_models(memory: MemoryManager, **sizes_gb: float) -> dict[str, nn.Module]:
    models = {}
    for name, size in sizes_gb.items():
        models[name] = nn.Linear(4, 4)
        memory.register(models[name], name=name, size_bytes=int(size * GB))
    return models


def where(memory: MemoryManager, models: dict[str, nn.Module]) -> dict[str, str]:
    return {name: memory.record(model).location.value for name, model in models.items()}


def test_models_stay_while_they_fit_and_the_least_recently_used_goes_first() -> None:
    memory = manager(total_gb=10, reserve_gb=1)  # budget 9
    m = fake_models(memory, dit=4, text=3, vae=1)
    assert memory.budget_bytes == 9 * GB and memory.resident_bytes == 0
    for name in ("text", "dit", "vae"):
        memory.load(m[name])
    assert memory.resident_bytes == 8 * GB
    assert set(where(memory, m).values()) == {"device"}  # all fit: nothing is evicted after use

    big = fake_models(memory, other=4)["other"]
    memory.load(big)  # needs 3 more: the text encoder is the least recently used
    assert where(memory, m) == {"dit": "device", "text": "offloaded", "vae": "device"}
    assert memory.resident_bytes == 9 * GB

    memory.load(m["dit"])  # touching the DiT makes the VAE the oldest resident
    memory.load(m["text"])  # needs 3: evicts the VAE (1), then the other model (4)
    assert where(memory, m) == {"dit": "device", "text": "device", "vae": "offloaded"}
    assert memory.record(big).location is Location.OFFLOADED
    assert memory.resident_bytes == 7 * GB


def test_a_model_in_use_is_never_evicted() -> None:
    memory = manager(total_gb=10, reserve_gb=1)
    m = fake_models(memory, dit=5, text=4)
    with memory.use(m["dit"]):
        memory.load(m["text"])
        with memory.use(m["text"]):
            assert memory.free_memory(9 * GB) == 0  # both running: nothing may go
            assert memory.unload_all() == 0
        assert memory.unload_all() == 4 * GB  # the text encoder is idle again
        assert where(memory, m) == {"dit": "device", "text": "offloaded"}
    assert memory.unload_all() == 5 * GB and memory.resident_bytes == 0


def tiny_dit(seed: int = 5) -> nn.Module:
    from tiny_models import dit_config

    from flux2_core.demo_models import random_dit

    return random_dit(dit_config(False), seed=seed)


def dit_call(model: nn.Module) -> torch.Tensor:
    config = model.config
    generator = torch.Generator().manual_seed(0)
    img_ids = torch.stack((torch.zeros(6), torch.arange(6.0) // 3, torch.arange(6.0) % 3, torch.zeros(6)), -1)[None]
    txt_ids = torch.stack((torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.arange(4.0)), -1)[None]
    with torch.no_grad():
        return model(torch.randn(1, 6, config.in_channels, generator=generator), img_ids,
                     torch.randn(1, 4, config.context_dim, generator=generator), txt_ids, torch.tensor([0.7]))


def streamed_block_count(model: nn.Module) -> int:
    streamer = getattr(model, "block_streamer", None)
    return 0 if streamer is None else len(streamer.blocks)


def test_a_model_that_cannot_fit_is_streamed_within_the_room_left() -> None:
    dit = tiny_dit()
    expected = dit_call(dit)
    size = model_size_bytes(dit)
    blocks = [sum(p.nbytes for p in block.parameters()) for _, block in dit.named_blocks()]
    room, working = size - 1, 1000  # one byte short: the tiny DiT's blocks are 2:2:1:1, two in flight = 3 of 4
    memory = MemoryManager(device="cpu", total_bytes=size + room + working, reserve_bytes=0)
    text = nn.Linear(4, 4)
    memory.register(text, name="text", size_bytes=size)  # in use while the DiT runs
    memory.register(dit, name="dit")
    with memory.use(text):
        with memory.use(dit, working_bytes=working) as running:
            assert streamed_block_count(dit) == 4
            footprint = size - sum(blocks) + 2 * max(blocks)  # the rest of the model + two blocks in flight
            assert memory.vram_budget_bytes(dit) == memory.record(dit).size_bytes == footprint < room
            assert memory.resident_bytes == size + footprint
            assert torch.equal(dit_call(running), expected)  # streamed: bit for bit the resident result
    assert memory.record(dit).location is Location.STREAMED and memory.vram_budget_bytes(text) is None
    assert all(p.is_meta for block in dit.block_streamer.blocks for p in block.parameters())


class LayerStack(nn.Module):
    """Eight equal layers to stream (a text encoder's `layers`): enough blocks for plans with some resident."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_a_model_the_manager_streams_is_planned_again_at_every_load() -> None:
    stack = LayerStack()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = stack(x)
    whole = model_size_bytes(stack)
    layer = model_size_bytes(stack.layers[0])
    memory = MemoryManager(device="cpu", total_bytes=whole, reserve_bytes=0)  # the budget: the stack, whole
    occupants = fake_models(memory, a=5 * layer / GB, b=7 * layer / GB)
    memory.register(stack, name="stack")

    def run_stack() -> torch.Tensor:
        with memory.use(stack) as running, torch.no_grad():
            return running(x)

    with memory.use(occupants["a"]):  # room: the rest + 3 layers = 1 resident + 2 in flight
        assert torch.equal(run_stack(), expected) and streamed_block_count(stack) == 7
    assert memory.record(stack).size_bytes == whole - 7 * layer + 2 * layer
    with memory.use(occupants["b"]):  # evicts the idle stack; room: the rest + 1 layer, so every layer streams
        assert memory.record(stack).location is Location.OFFLOADED
        assert torch.equal(run_stack(), expected) and streamed_block_count(stack) == 8
    with memory.use(occupants["b"]), torch.no_grad():  # the same room again: the same streamer, nothing moves
        streamer = stack.block_streamer
        memory.unload_all()
        assert torch.equal(run_stack(), expected) and stack.block_streamer is streamer
    assert torch.equal(run_stack(), expected)  # b idle: evicted, and the stack fits whole again
    record = memory.record(stack)
    assert not hasattr(stack, "block_streamer") and record.location is Location.DEVICE
    assert record.size_bytes == whole and record.whole_bytes is None
    assert memory.record(occupants["b"]).location is Location.OFFLOADED
    assert not any(p.is_meta for p in stack.parameters())


def test_a_model_without_blocks_to_stream_is_loaded_whole(caplog) -> None:
    memory = manager(total_gb=10, reserve_gb=1)
    m = fake_models(memory, vae=12)
    with caplog.at_level(logging.WARNING, logger="flux2_core.memory.residency"):
        memory.load(m["vae"])
    assert "does not fit" in caplog.text and "vae" in caplog.text
    assert memory.record(m["vae"]).location is Location.DEVICE


@pytest.mark.parametrize("mode", ["highvram", "gpu_only"])
def test_highvram_keeps_everything(mode: str) -> None:
    memory = manager(total_gb=10, reserve_gb=1, mode=mode)
    m = fake_models(memory, dit=6, text=6)
    memory.load(m["dit"])
    memory.load(m["text"])
    assert where(memory, m) == {"dit": "device", "text": "device"}
    assert memory.resident_bytes == 12 * GB  # over the budget: the user asked for it
    assert memory.unload_all() == 12 * GB  # an explicit unload still works
    assert memory.weight_budget("cpu") is None  # and loaders never stream on their own


def test_lowvram_keeps_one_model_at_a_time_and_novram_streams_everything() -> None:
    low = manager(total_gb=100, reserve_gb=1, mode="lowvram")
    m = fake_models(low, dit=4, text=3)
    low.load(m["dit"])
    low.load(m["text"])
    assert where(low, m) == {"dit": "offloaded", "text": "device"}

    no = manager(total_gb=100, reserve_gb=1, mode="novram")
    assert no.weight_budget("cpu") == 0
    dit = tiny_dit()
    expected = dit_call(dit)
    with no.use(dit) as running:
        assert streamed_block_count(dit) == 4  # zero budget: every block streams
        assert no.vram_budget_bytes(dit) == model_size_bytes(dit) < sum(p.nbytes for p in tiny_dit().parameters())
        assert torch.equal(dit_call(running), expected)
    assert no.record(dit).location is Location.STREAMED


def test_lru_eviction_with_a_streamed_model_among_resident_ones() -> None:
    dit = tiny_dit()
    expected = dit_call(dit)
    stream_in_memory(dit, budget_bytes=0)  # what load_dit(offload="cpu") gives
    memory = manager(total_gb=10, reserve_gb=1)
    assert memory.register(dit, name="dit").size_bytes == model_size_bytes(dit) < model_size_bytes(tiny_dit())
    m = fake_models(memory, text=4, vae=1)
    memory.register(dit, size_bytes=3 * GB)  # a streamed dev: its resident part + two blocks in flight
    memory.load(m["text"])
    memory.load(dit)
    memory.load(m["vae"])
    assert memory.resident_bytes == 8 * GB and memory.record(dit).location is Location.STREAMED
    big = fake_models(memory, other=3)["other"]
    memory.load(big)  # needs 2 more: the text encoder is the least recently used
    assert memory.record(m["text"]).location is Location.OFFLOADED
    assert memory.record(dit).location is Location.STREAMED
    memory.load(m["text"])  # needs 4: the streamed DiT is the oldest now (its resident part moves)
    assert where(memory, m) == {"text": "device", "vae": "device"}
    assert memory.record(dit).location is Location.OFFLOADED and memory.record(dit).evictions == 1
    assert all(p.is_meta for block in dit.block_streamer.blocks for p in block.parameters())
    with memory.use(dit) as running:  # back in, still streaming, same result
        assert memory.record(dit).location is Location.STREAMED
        assert torch.equal(dit_call(running), expected)


def test_free_memory_evicts_only_as_much_as_asked() -> None:
    memory = manager(total_gb=10, reserve_gb=1)
    m = fake_models(memory, a=2, b=2, c=2)
    for name in ("a", "b", "c"):
        memory.load(m[name])
    assert memory.free_memory(4 * GB) == 2 * GB  # 3 free already; evicting a (oldest) gives 5
    assert where(memory, m) == {"a": "offloaded", "b": "device", "c": "device"}
    assert memory.free_memory(4 * GB) == 0


def test_eviction_moves_real_weights_and_dropping_reloads_them_from_the_file() -> None:
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    reference = {k: v.clone() for k, v in original.state_dict().items()}

    def reload(device: torch.device) -> nn.Module:  # stands in for "load the same file again"
        fresh = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).to(device)
        fresh.load_state_dict(reference)
        return fresh

    ram = {"free": 1000 * GB}
    memory = MemoryManager(device="cpu", total_bytes=10 * GB, reserve_bytes=GB, ram_available=lambda: ram["free"])
    memory.register(original, name="dit", size_bytes=6 * GB, reload=reload)
    other = fake_models(memory, text=6)["text"]
    memory.load(original)
    memory.load(other)  # RAM is plentiful: the DiT goes to CPU memory with its weights
    assert memory.record(original).location is Location.OFFLOADED
    assert all(torch.equal(original.state_dict()[k], v) for k, v in reference.items())

    memory.load(original)
    ram["free"] = GB  # now RAM is short: the DiT's weights are dropped, to be read again from its file
    memory.load(other)
    assert memory.record(original).location is Location.DROPPED
    assert all(p.is_meta for p in original.parameters())
    memory.load(original)
    assert memory.record(original).location is Location.DEVICE
    assert all(torch.equal(original.state_dict()[k], v) for k, v in reference.items())
    x = torch.randn(2, 8)
    assert torch.equal(original(x), reload(torch.device("cpu"))(x))


def test_text_encoder_wrappers_move_with_their_model_and_dead_models_leave_the_books() -> None:
    class Wrapper:  # shaped like Flux2TextEncoder: weights in `.model`, compute device in `.device`
        def __init__(self) -> None:
            self.model = nn.Linear(4, 4)
            self.device = torch.device("meta")

    memory = manager()
    wrapper = Wrapper()
    memory.load(wrapper)
    assert wrapper.device == torch.device("cpu")
    assert memory.record(wrapper).size_bytes == model_size_bytes(wrapper.model) == (16 + 4) * 4
    del wrapper
    gc.collect()
    assert memory.models() == []


def test_model_size_counts_shared_tensors_once_and_fp8_as_one_byte() -> None:
    tied = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert model_size_bytes(tied) == 100 * 4
    fp8 = nn.Linear(10, 10, bias=False).to(torch.float8_e4m3fn)
    assert model_size_bytes(fp8) == 100


# --- the Python API through the manager ---------------------------------------------------------------------

@pytest.fixture
def process_manager():
    """Installs a fresh manager as the process's one for a test (with a fake capacity set by the test)."""
    previous = residency.default_manager()
    yield lambda memory: residency.set_default_manager(memory)
    residency.set_default_manager(previous)


def klein_files(models: Path) -> tuple[Path, Path, Path]:
    return (models / "diffusion_models" / "flux-2-klein-4b.safetensors", models / "vae" / "flux2-vae.safetensors",
            models / "text_encoders" / "qwen_3_4b.safetensors")


def test_the_pipeline_keeps_its_text_encoder_when_it_fits_and_evicts_it_when_not(demo_models_dir,
                                                                                  process_manager) -> None:
    dit_file, vae_file, text_file = klein_files(demo_models_dir)
    images = {}
    for room in ("everything", "one model"):
        # Room for all three (8), or for the DiT or the text encoder next to the VAE but not both (5).
        total = 8 * GB if room == "everything" else 5 * GB
        memory = process_manager(MemoryManager(device="cpu", total_bytes=total, reserve_bytes=0))
        pipe = Flux2Pipeline.from_files(dit_file, vae_file, text_file)
        for model, size in ((pipe.dit, 4), (pipe.text_encoder, 3), (pipe.vae, 1)):
            memory.register(model, size_bytes=size * GB)  # the real models are tiny: sizes of a large klein
        images[room] = [pipe(prompt, width=32, height=32, steps=1, seed=3, output_type="latent")
                        for prompt in ("a fox", "a cat", "a dog")]
        text = memory.record(pipe.text_encoder)
        assert memory.resident_bytes <= memory.budget_bytes
        if room == "everything":
            assert text.evictions == 0 and text.location is Location.DEVICE  # three prompts, never sent back
        else:
            assert text.evictions == 3  # the DiT needed its room after every encode
    for roomy, tight in zip(images["everything"], images["one model"]):
        assert torch.equal(roomy, tight)


# --- the host: flags and /free ------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, mode, reserve", [
    ([], "normal", residency.DEFAULT_RESERVE_BYTES),
    (["--lowvram", "--reserve-vram", "3"], "lowvram", 3 * residency.GIB),
    (["--novram"], "novram", residency.DEFAULT_RESERVE_BYTES),
    (["--highvram"], "highvram", residency.DEFAULT_RESERVE_BYTES),
    (["--gpu-only", "--reserve-vram", "0.5"], "gpu_only", residency.GIB // 2),
    (["--cpu", "--lowvram"], "cpu", residency.DEFAULT_RESERVE_BYTES),
])
def test_run_and_serve_flags_configure_the_process_manager(tmp_path, process_manager, monkeypatch, flags, mode,
                                                           reserve) -> None:
    from flux2_host import folders
    from flux2_host.cli import build_parser
    from flux2_host.run import set_up_host

    monkeypatch.setattr(folders, "install_as_folder_paths", lambda: None)  # leave this process's folder_paths be
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # --cpu sets it; monkeypatch restores it
    for command in (["run", "w.json"], ["serve"]):
        args = build_parser().parse_args([*command, *flags, "--models-dir", str(tmp_path / "models"),
                                          "--output-dir", str(tmp_path / "out"), "--input-dir", str(tmp_path / "in")])
        assert set_up_host(args, command[0])
        memory = residency.default_manager()
        assert memory.mode.value == mode and memory.reserve_bytes == reserve


def test_vram_flags_exclude_each_other() -> None:
    from flux2_host.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "w.json", "--lowvram", "--highvram"])


def test_the_hosts_free_with_unload_models_empties_the_device(process_manager) -> None:
    from flux2_host.executor import PromptExecutor

    memory = process_manager(manager())
    held_elsewhere = fake_models(memory, dit=4)["dit"]  # e.g. a Python pipeline in the same process
    memory.load(held_elsewhere)
    PromptExecutor(registry=None).free_memory(unload_models=False)  # {"free_memory": true}: caches only
    assert memory.record(held_elsewhere).location is Location.DEVICE
    PromptExecutor(registry=None).free_memory(unload_models=True)  # {"unload_models": true}
    assert memory.record(held_elsewhere).location is Location.OFFLOADED and memory.resident_bytes == 0


def test_a_resident_model_makes_room_for_its_activations() -> None:
    memory = manager(total_gb=10, reserve_gb=1)
    m = fake_models(memory, text=3, dit=4)
    memory.load(m["text"])
    memory.load(m["dit"])
    with memory.use(m["dit"], working_bytes=2 * GB):  # 9 - 7 = 2: fits beside both
        assert where(memory, m) == {"text": "device", "dit": "device"}
    with memory.use(m["dit"], working_bytes=4 * GB):  # needs the text encoder's room
        assert where(memory, m) == {"text": "offloaded", "dit": "device"}


def test_load_managed_places_registers_and_can_reload(tmp_path, process_manager) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.randn(4, 4)}, str(path))
    calls = []

    def loader(file, device=None, scale=1.0):  # shaped like checkpoints.loaders: path, device=, options
        calls.append((str(file), str(device), scale))
        layer = nn.Linear(4, 4, bias=False).to(device)
        from safetensors.torch import load_file
        layer.weight.data.copy_(load_file(str(file))["weight"] * scale)
        return layer

    memory = process_manager(manager(total_gb=10, reserve_gb=1))
    other = fake_models(memory, other=9)["other"]  # fills the budget
    memory.load(other)
    model = residency.load_managed(loader, path, name="layer", scale=2.0)
    assert calls == [(str(path), "cpu", 2.0)]
    assert memory.record(other).location is Location.OFFLOADED  # room was made for the file's bytes
    record = memory.record(model)
    assert record.name == "layer" and record.size_bytes == 64 and not record.fixed
    memory._drop(record)  # what eviction does when RAM is short
    memory.load(model)
    assert calls[-1] == (str(path), "cpu", 2.0)  # read again from the file, with the same options
    assert torch.equal(model.weight, loader(path, "cpu", 2.0).weight)

    tiny_budget = process_manager(MemoryManager(device="cpu", total_bytes=10, reserve_bytes=0))
    residency.load_managed(loader, path, name="too big")
    assert tiny_budget.record(model) is None and calls[-1][1] == "cpu"  # loaded into CPU memory, to be streamed


def test_text_encoder_offload_goes_through_the_manager(demo_models_dir, process_manager) -> None:
    from flux2_core.checkpoints.loaders import load_text_encoder

    memory = process_manager(manager())
    encoder = load_text_encoder(demo_models_dir / "text_encoders" / "qwen_3_4b.safetensors", device="cpu")
    memory.load(encoder)
    before = encoder.encode("a fox")
    encoder.offload()
    record = memory.record(encoder)
    assert record.location is Location.OFFLOADED and record.evictions == 1 and memory.resident_bytes == 0
    with memory.use(encoder):
        assert torch.equal(encoder.encode("a fox"), before)
    assert record.location is Location.DEVICE


# --- the manager deciding streaming at load time ------------------------------------------------------------

def test_load_managed_streams_a_file_bigger_than_the_budget(demo_models_dir, process_manager) -> None:
    from flux2_core.checkpoints.loaders import load_dit, load_text_encoder

    dit_file, _, text_file = klein_files(demo_models_dir)
    # bf16 as stored, so that the plan's sizes (stored bytes) are the sizes in memory.
    resident = load_dit(dit_file, device="cpu", dtype=torch.bfloat16)
    budget = dit_file.stat().st_size - 1
    memory = process_manager(MemoryManager(device="cpu", total_bytes=budget, reserve_bytes=0))
    assert memory.weight_budget("cpu") == budget
    dit = residency.load_managed(load_dit, dit_file, name="DiT", dtype=torch.bfloat16)
    assert dit.block_streamer.offload == "cpu" and streamed_block_count(dit) > 0
    record = memory.record(dit)
    # Its footprint: the rest of the model plus two blocks in flight (on this tiny model no less than the whole).
    assert record.size_bytes == model_size_bytes(dit) and record.location is Location.OFFLOADED
    with memory.use(dit) as running:
        assert record.location is Location.STREAMED
        assert torch.equal(dit_call(running), dit_call(resident))

    # A streamed text encoder offloaded by hand: only its resident part moves, it encodes the same after.
    encoder = residency.load_managed(load_text_encoder, text_file, name="text encoder")
    expected = load_text_encoder(text_file, device="cpu").encode("a fox")
    assert encoder.model.block_streamer is not None
    with memory.use(encoder):
        assert torch.equal(encoder.encode("a fox"), expected)
    encoder.offload()
    text = memory.record(encoder)
    assert text.location is Location.OFFLOADED and text.evictions == 1
    assert all(p.is_meta for layer in encoder.model.block_streamer.blocks for p in layer.parameters())
    with memory.use(encoder):
        assert torch.equal(encoder.encode("a fox"), expected)


def test_loaders_without_a_budget_use_the_managers(process_manager) -> None:
    from flux2_core.memory.streaming import plan_streaming

    sizes, other = [50, 100, 50, 50, 50], 30  # 330 in all
    assert plan_streaming(sizes, other, "cpu").offload is None  # no limit on the CPU
    process_manager(MemoryManager(device="cpu", total_bytes=330, reserve_bytes=10))  # budget 320
    assert plan_streaming(sizes, other, "cpu") == plan_streaming(sizes, other, "cpu", "cpu", 320 / (1024 ** 3))
    assert plan_streaming(sizes, other, "cpu").resident_blocks == 1  # 30 + 2 x 100 in flight + block 0
    process_manager(MemoryManager(device="cpu", total_bytes=280, reserve_bytes=10))
    assert plan_streaming(sizes, other, "cpu").resident_blocks == 0
    process_manager(MemoryManager(device="cpu", mode="novram", total_bytes=10 ** 6, reserve_bytes=0))
    assert plan_streaming(sizes, other, "cpu").resident_blocks == 0  # fits, but novram streams everything
    process_manager(MemoryManager(device="cpu", mode="highvram", total_bytes=10, reserve_bytes=0))
    assert plan_streaming(sizes, other, "cpu").offload is None  # does not fit, but highvram keeps it whole


def test_novram_streams_every_block_of_the_pipeline(demo_models_dir, process_manager) -> None:
    files = klein_files(demo_models_dir)
    options = {"prompt": "a red kite", "width": 32, "height": 32, "steps": 1, "seed": 4, "output_type": "latent"}
    expected = Flux2Pipeline.from_files(*files, device="cpu")(**options)
    process_manager(MemoryManager(device="cpu", mode="novram", total_bytes=10 * GB, reserve_bytes=0))
    pipe = Flux2Pipeline.from_files(*files)
    assert torch.equal(pipe(**options), expected)
    assert streamed_block_count(pipe.dit) == len(pipe.dit.named_blocks())
    assert streamed_block_count(pipe.text_encoder.model) == len(pipe.text_encoder.model.layers)
