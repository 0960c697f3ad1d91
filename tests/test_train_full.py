"""Full fine-tuning (train/full_finetune.py) with part 1's loop on the tiny demo models: fp32 masters for bf16
weights, a regex subset, overfitting one image, resume, and the saved DiT read back by the host's UNETLoader."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from tiny_models import dit_config
from train_configs import demo_train_config

from flux2_core.checkpoints.loaders import load_dit
from flux2_core.checkpoints.quant import Fp8Linear
from flux2_core.demo_models import random_dit
from flux2_core.errors import Flux2Error
from flux2_core.train.config import TrainConfig
from flux2_core.train.full_finetune import FullFineTuner, FullTrainable, make_trainer
from flux2_host import folders
from flux2_host.core_nodes.loaders import UNETLoader


def _config(models, tmp_path, **overrides) -> TrainConfig:
    return demo_train_config(models, tmp_path, **{
        "output_name": "full", "training_mode": "full", "max_train_steps": 80, "learning_rate": 3e-3,
        "optimizer_type": "adamw", "weight_decay": 0.0, "max_grad_norm": 0.0, "timestep_sampling": "uniform",
        "seed": 3, **overrides})


def _fixed_loss(trainer) -> float:
    """The objective on the training image at 16 fixed (noise, sigma) draws: comparable before and after."""
    generator = torch.Generator().manual_seed(123)
    batch = trainer.data.load(trainer.data.epoch(0)[0], torch.Generator().manual_seed(0))
    with torch.no_grad():
        return sum(float(trainer.objective(trainer.dit, batch, generator)[0].mean()) for _ in range(16)) / 16


def test_bf16_weights_train_through_fp32_masters() -> None:
    dit = random_dit(dit_config(guidance_embed=False), 0, torch.bfloat16)
    trainable = FullTrainable(dit, r"single_blocks\.0\.linear2")
    weight = dit.single_blocks[0].linear2.weight
    master = trainable.masters["single_blocks.0.linear2.weight"]
    assert list(trainable.weights) == ["single_blocks.0.linear2.weight"] and master.dtype == torch.float32
    optimizer = torch.optim.SGD(list(trainable.parameters()), lr=1.0)
    trainable.bind(optimizer)
    start = weight.detach().clone()
    tiny = 2.0 ** -14  # far below bf16's resolution near the weights' magnitude (~2^-9 .. 2^-5)
    for _ in range(64):
        optimizer.zero_grad(set_to_none=True)
        (weight.float().sum() * tiny).backward()  # d/dw = tiny everywhere
        assert weight.grad is None and torch.equal(master.grad, torch.full_like(master, tiny))
        optimizer.step()
    # the master holds the exact sum of the 64 small updates; the bf16 weight is its rounding
    torch.testing.assert_close(master.detach(), start.float() - 64 * tiny, atol=1e-7, rtol=0)
    assert torch.equal(weight, master.detach().bfloat16())
    # without masters each single update would have rounded away on many weights
    assert not torch.equal(weight, start)


def test_full_fine_tune_overfits_saves_a_dit_and_loads_in_unet_loader(demo_models_dir, tmp_path) -> None:
    config = _config(demo_models_dir, tmp_path, full_train_params=r"single_blocks|final_layer")
    trainer = make_trainer(config)
    assert isinstance(trainer, FullFineTuner)
    trainer.prepare()
    base = {name: p.detach().clone() for name, p in trainer.dit.named_parameters()}
    before = _fixed_loss(trainer)
    path = trainer.run()
    after = _fixed_loss(trainer)
    assert after < 0.5 * before, (before, after)
    trained = dict(trainer.dit.named_parameters())
    for name, value in base.items():
        changed = not torch.equal(trained[name], value)
        assert changed == ("single_blocks" in name or "final_layer" in name), name

    folders.configure(models=str(tmp_path / "out"), input_dir=str(tmp_path / "in"),
                      output_dir=str(tmp_path / "o"), temp_dir=str(tmp_path / "t"))
    folders.add_model_folder_path("diffusion_models", str(tmp_path / "out"))
    loaded = UNETLoader().load_unet(path.name, "default")[0]
    assert loaded.variant == "klein-base-4b"
    state = loaded.diffusion_model.state_dict()
    for name, value in trained.items():
        torch.testing.assert_close(state[name].float(), value.detach().bfloat16().float())
    metadata = safe_open(str(path), "pt").metadata()
    assert metadata["modelspec.architecture"] == "flux-2-klein-base-4b" and "ss_network_dim" not in metadata
    assert '"mode": "full"' in metadata["flux2_training_mode"]


def test_resume_continues_to_the_same_weights(demo_models_dir, tmp_path) -> None:
    common = dict(max_train_steps=4, full_train_params=r"single_blocks\.0\.linear2", save_state=True,
                  optimizer_on_cpu=True)
    straight = make_trainer(_config(demo_models_dir, tmp_path / "a", **common, save_fp8="bfl-fp8"))
    straight.run()
    first = make_trainer(_config(demo_models_dir, tmp_path / "b", **{**common, "max_train_steps": 2}))
    first.run()
    resumed = make_trainer(_config(demo_models_dir, tmp_path / "b",
                                   **{**common, "resume": str(tmp_path / "b" / "out" / "full-state")}))
    resumed.run()
    torch.testing.assert_close(resumed.dit.single_blocks[0].linear2.weight,
                               straight.dit.single_blocks[0].linear2.weight, atol=0, rtol=0)
    fp8 = load_dit(tmp_path / "a" / "out" / "full.safetensors")  # saved like the official fp8 files
    assert isinstance(fp8.single_blocks[0].linear2, Fp8Linear)
    torch.testing.assert_close(fp8.single_blocks[0].linear2.dequantized_weight(torch.float32),
                               straight.dit.single_blocks[0].linear2.weight, atol=0.07, rtol=0.07)


def test_bad_full_settings_are_refused(demo_models_dir, tmp_path) -> None:
    with pytest.raises(Flux2Error, match="fp8_base"):
        make_trainer(_config(demo_models_dir, tmp_path, fp8_base=True))
    with pytest.raises(Flux2Error, match="training_mode"):
        make_trainer(_config(demo_models_dir, tmp_path, training_mode="half"))
    trainer = make_trainer(_config(demo_models_dir, tmp_path, full_train_params="no_such_layer"))
    with pytest.raises(Flux2Error, match="matches no parameter"):
        trainer.prepare()
