"""Data-parallel training (train/distributed.py): `flux2 train --num-processes 2` (accelerate launch, two gloo
processes on the CPU) writes the same adapter as one process with twice the gradient accumulation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_data import write_shapes_dataset

from flux2_core.train.config import load_config
from flux2_core.train.distributed import DistributedTrainer


@pytest.mark.slow
def test_two_processes_equal_one_process_with_double_accumulation(demo_models_dir, tmp_path) -> None:
    dataset = write_shapes_dataset(tmp_path / "data", count=4)
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'dit = "{demo_models_dir / "diffusion_models" / "flux-2-klein-base-4b.safetensors"}"\n'
        f'vae = "{demo_models_dir / "vae" / "flux2-vae.safetensors"}"\n'
        f'text_encoder = "{demo_models_dir / "text_encoders" / "qwen_3_4b.safetensors"}"\n'
        f'model_version = "klein-base-4b"\ndataset_config = "{dataset}"\ndevice = "cpu"\n'
        f'max_train_steps = 3\nnetwork_dim = 4\nnetwork_alpha = 4.0\nlearning_rate = 1e-2\nseed = 5\n'
        f'output_name = "ddp"\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "flux2_host.cli", "train", str(toml), "--num-processes", "2",
                             f"--output_dir={tmp_path / 'two'}", f"--cache_directory={tmp_path / 'cache2'}"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "two" / "logs" / "rank-1").is_dir()  # rank 1 logs apart; files come from rank 0

    config = load_config(toml)
    config.output_dir, config.cache_directory = str(tmp_path / "one"), str(tmp_path / "cache1")
    config.gradient_accumulation_steps = 2
    trainer = DistributedTrainer(config)
    assert trainer.world == 1
    trainer.run()

    two, one = load_file(str(tmp_path / "two" / "ddp.safetensors")), load_file(str(tmp_path / "one" / "ddp.safetensors"))
    assert set(two) == set(one) and one
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
    start = {k: v for k, v in one.items() if "lora_B" in k}
    assert any(float(v.abs().max()) > 0 for v in start.values())  # the adapters did train
