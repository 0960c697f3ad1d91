"""Training with block swap (`blocks_to_swap`, memory.streaming.enable_training_block_swap): N steps with swapping
give the same LoRA as N steps without, with and without gradient checkpointing, on an fp8 base and with
adapter dropout (the start-up self-check leaves the run's random state alone); a swap
above the DiT's maximum is refused naming it; the maxima are musubi-tuner's for the full-size variants.

Equality is bit-for-bit on the CPU: there the "device copy" of a swapped weight is the very tensor kept in CPU
memory, so the arithmetic is identical and any difference would be a streaming bug (wrong tensor, wrong time)."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from train_configs import demo_train_config

from flux2_core.demo_models import DEMO_DITS, DEMO_MARKER, demo_dit_config, random_dit
from flux2_core.errors import Flux2Error
from flux2_core.memory.streaming import max_training_blocks_to_swap, training_swap_split
from flux2_core.train.full_finetune import make_trainer
from flux2_core.variants import FULL_SIZE_DIT

DEPTH = 4  # double and single blocks of the test DiT: the maximum blocks_to_swap is 3 (2 + 2 * 1/2)


def _deeper_klein_base(directory: Path) -> Path:
    """The demo klein base with 4 double and 4 single blocks (the demo has 1 + 1, too few to swap any: two
    blocks of each kind stay on the device)."""
    spec = next(s for s in DEMO_DITS if s.file == "flux-2-klein-base-4b.safetensors")
    config = dataclasses.replace(demo_dit_config(spec.text_encoder.output_dim, spec.guidance_embed),
                                 depth_double=DEPTH, depth_single=DEPTH)
    path = directory / "klein-base-deeper.safetensors"
    weights = random_dit(config, 11, torch.bfloat16).state_dict()
    save_file({spec.key_prefix + name: t.contiguous() for name, t in weights.items()}, str(path), metadata=DEMO_MARKER)
    return path


def _trained_lora(demo_models_dir: Path, tmp_path: Path, name: str, log: io.StringIO | None = None,
                  **overrides) -> dict[str, torch.Tensor]:
    config = demo_train_config(demo_models_dir, tmp_path, dit=str(_deeper_klein_base(tmp_path)), max_train_steps=3,
                               network_dim=4, output_dir=str(tmp_path / name), **overrides)
    trainer = make_trainer(config, log_stream=log or io.StringIO())
    trainer.run()
    return trainer.trainable.state_dict()


@pytest.mark.parametrize("overrides", [dict(gradient_checkpointing=True), dict(gradient_checkpointing=False),
                                       dict(gradient_checkpointing=True, fp8_base=True, fp8_scale="row"),
                                       dict(gradient_checkpointing=True, network_dropout=0.1)],
                         ids=["checkpointing", "no-checkpointing", "fp8-base", "adapter-dropout"])
def test_training_with_block_swap_gives_the_same_lora(demo_models_dir, tmp_path, overrides) -> None:
    reference = _trained_lora(demo_models_dir, tmp_path, "plain", **overrides)
    swapped = _trained_lora(demo_models_dir, tmp_path, "swapped", blocks_to_swap=3, **overrides)
    assert reference.keys() == swapped.keys() and reference
    for key, tensor in reference.items():
        assert torch.equal(tensor, swapped[key]), key
    # the LoRA did train (the equality above is not two untouched initialisations)
    assert any(float(t.abs().max()) > 0 for k, t in reference.items() if "lora_B" in k)


def test_the_trainer_keeps_swapped_weights_off_the_device(demo_models_dir, tmp_path) -> None:
    config = demo_train_config(demo_models_dir, tmp_path, dit=str(_deeper_klein_base(tmp_path)), max_train_steps=1,
                               network_dim=4, gradient_checkpointing=True, blocks_to_swap=3)
    trainer = make_trainer(config)
    trainer.run()
    assert trainer.block_streamer is not None
    assert trainer.dit.double_blocks[-1].img_attn.qkv.base_layer.weight.is_meta
    assert not trainer.dit.double_blocks[1].img_attn.qkv.base_layer.weight.is_meta
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainer.trainable.parameters()}  # the optimizer's objects, still in use


def test_more_than_the_maximum_is_refused(demo_models_dir, tmp_path) -> None:
    config = demo_train_config(demo_models_dir, tmp_path, dit=str(_deeper_klein_base(tmp_path)), max_train_steps=1,
                               network_dim=4, blocks_to_swap=4)
    with pytest.raises(Flux2Error, match=r"blocks_to_swap 4: this DiT \(4 double, 4 single blocks\) allows 1\.\.3"):
        make_trainer(config).run()


@pytest.mark.parametrize("variant, maximum", [("dev", 29), ("klein-4b", 13), ("klein-9b", 16)])
def test_musubi_maxima_for_the_full_size_variants(variant: str, maximum: int) -> None:
    config = FULL_SIZE_DIT[variant]
    assert max_training_blocks_to_swap(config.depth_double, config.depth_single) == maximum
    double, single = training_swap_split(config.depth_double, config.depth_single, maximum)
    assert double <= config.depth_double - 2 and single <= config.depth_single - 2


def test_the_trainer_refuses_to_train_when_the_self_check_fails(demo_models_dir, tmp_path, monkeypatch) -> None:
    from flux2_core.train import trainer as trainer_module
    from flux2_core.train.swap_check import inject_wrong_block_fault

    enable = trainer_module.enable_block_swap

    def faulty_swap(dit, blocks, device):
        streamer = enable(dit, blocks, device)
        inject_wrong_block_fault(streamer)  # the checkpointing recompute loads another block's weights
        return streamer

    monkeypatch.setattr(trainer_module, "enable_block_swap", faulty_swap)
    config = demo_train_config(demo_models_dir, tmp_path, dit=str(_deeper_klein_base(tmp_path)), max_train_steps=1,
                               network_dim=4, gradient_checkpointing=True, blocks_to_swap=3)
    trainer = make_trainer(config)
    with pytest.raises(Flux2Error, match="block swap self-check: the LoRA gradients with swapping differ"):
        trainer.run()
    assert trainer.optimizer is None  # refused before training started


def test_the_loader_keeps_swapped_weights_in_cpu_memory_and_moves_only_the_rest(demo_models_dir, tmp_path) -> None:
    """With 'meta' standing in for the device (a tensor that went there keeps no values): after loading, every
    parameter and buffer of the DiT is on the device except the swapped blocks' frozen weights, which are in CPU
    memory and equal the file's. Loading the whole DiT to the device first and swapping after (the old way) would
    leave only meta tensors to swap."""
    dit_path = _deeper_klein_base(tmp_path)
    config = demo_train_config(demo_models_dir, tmp_path, dit=str(dit_path), max_train_steps=1, network_dim=4,
                               gradient_checkpointing=True, blocks_to_swap=3)
    trainer = make_trainer(config)
    trainer.device = torch.device("meta")
    trainer.load_model()
    assert all(t.is_meta for t in [*trainer.dit.parameters(), *trainer.dit.buffers()])
    assert all(p.is_meta for p in trainer.trainable.parameters())  # the adapters went to the device too
    streamer = trainer.block_streamer
    assert streamer.device == torch.device("meta")

    names = {id(module): name.replace(".base_layer", "") for name, module in trainer.dit.named_modules()}
    kept = {}
    for block in streamer._blocks:
        for stored in block.stored:
            assert all(part.device.type == "cpu" for part in stored.parts)
            kept.update({f"{names[id(block.module)]}.{name}": t for name, t in stored.finish(stored.parts).items()})
    swapped_blocks = ("double_blocks.2.", "double_blocks.3.", "single_blocks.2.", "single_blocks.3.")
    with safe_open(str(dit_path), "pt") as file:
        prefix = next(iter(file.keys())).split("double_blocks")[0].split("single_blocks")[0]
        expected = {key[len(prefix):]: key for key in file.keys() if key[len(prefix):].startswith(swapped_blocks)}
        assert kept.keys() == expected.keys()  # all the swapped blocks' weights and nothing else
        for name, key in expected.items():
            assert torch.equal(kept[name], file.get_tensor(key).float()), name


def test_the_self_check_streams_its_reference_when_the_swapped_weights_do_not_fit(demo_models_dir, tmp_path,
                                                                                    monkeypatch) -> None:
    """Where the swapped weights cannot join the rest on the device, the reference step streams them with
    synchronous copies; training is still the same as without swapping."""
    from flux2_core.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "swapped_weights_fit", lambda streamed_bytes, device: False)
    reference = _trained_lora(demo_models_dir, tmp_path, "plain", gradient_checkpointing=True)
    log = io.StringIO()
    swapped = _trained_lora(demo_models_dir, tmp_path, "swapped", log, blocks_to_swap=3, gradient_checkpointing=True)
    for key, tensor in reference.items():
        assert torch.equal(tensor, swapped[key]), key
    assert "self-check against a step with synchronous copies (the swapped weights do not fit)" in log.getvalue()
