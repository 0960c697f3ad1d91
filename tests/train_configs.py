"""A training config on the tiny demo klein base and a one-image shapes dataset: the part-2 training tests'
common starting point (each overrides what it tests)."""

from __future__ import annotations

from pathlib import Path

from train_data import write_shapes_dataset

from flux2_core.train.config import TrainConfig


def demo_train_config(models: Path, tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(
        dit=str(models / "diffusion_models" / "flux-2-klein-base-4b.safetensors"),
        vae=str(models / "vae" / "flux2-vae.safetensors"),
        text_encoder=str(models / "text_encoders" / "qwen_3_4b.safetensors"),
        model_version="klein-base-4b", dataset_config=str(write_shapes_dataset(tmp_path / "data", count=1)),
        output_dir=str(tmp_path / "out"), device="cpu", cache_directory=str(tmp_path / "cache"))
    values.update(overrides)
    return TrainConfig(**values)
