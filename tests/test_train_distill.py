"""Direct distillation (train/distill.py) on the tiny demo klein base: the student (base + LoRA, 4 Euler steps,
no CFG) trained through the unrolled loop gets closer to the teacher's 16-step CFG output on held-out seeds;
teacher targets are made once and reused."""

from __future__ import annotations

import pytest
import torch
from train_configs import demo_train_config

from flux2_core.sampling import flux2_sigmas_for_tokens, make_noise, sample
from flux2_core.train.cache import read_cache
from flux2_core.train.config import TrainConfig
from flux2_core.train.distill import DistillTrainer, student_rollout
from flux2_core.train.full_finetune import make_trainer

HELD_OUT_SEEDS = (100, 101, 102)


def _config(models, tmp_path, **overrides) -> TrainConfig:
    return demo_train_config(models, tmp_path, **{
        "output_name": "distilled", "training_mode": "distill", "max_train_steps": 40, "learning_rate": 5e-3,
        "network_dim": 8, "network_alpha": 8.0, "seed": 0, "max_grad_norm": 1.0, "distill_teacher_steps": 16,
        "distill_teacher_cfg": 3.0, "distill_student_steps": 4, "distill_seeds": 6, "gradient_checkpointing": True,
        **overrides})


def _held_out_error(trainer: DistillTrainer, teacher_outputs: dict[int, torch.Tensor]) -> float:
    batch = trainer.data.load(trainer.data.epoch(0)[0], torch.Generator().manual_seed(0))
    errors = []
    with torch.no_grad():
        for seed, teacher in teacher_outputs.items():
            student = student_rollout(trainer.dit, batch, [seed], steps=4)
            errors.append(float(((student - teacher) ** 2).mean()))
    return sum(errors) / len(errors)


def _teacher_outputs(trainer: DistillTrainer) -> dict[int, torch.Tensor]:
    """The teacher run independently here: `sample` with 16 steps and CFG 3 against the empty-caption negative."""
    batch = trainer.data.load(trainer.data.epoch(0)[0], torch.Generator().manual_seed(0))
    empty = read_cache(trainer.empty_caption_file)["context"]
    _, channels, height, width = batch.latents.shape
    with _adapters_off(trainer):
        return {seed: sample(trainer.dit, make_noise(seed, (1, channels, height, width)),
                             flux2_sigmas_for_tokens(16, height * width), batch.context, negative_context=empty,
                             cfg=3.0) for seed in HELD_OUT_SEEDS}


class _adapters_off:
    """The student's peft adapters switched off: the base, i.e. the teacher."""

    def __init__(self, trainer):
        self.layers = list(trainer.trainable.layers.values())

    def __enter__(self):
        for layer in self.layers:
            layer.enable_adapters(False)

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.enable_adapters(True)


@pytest.mark.slow
def test_distilled_student_gets_closer_to_the_teacher_on_held_out_seeds(demo_models_dir, tmp_path) -> None:
    trainer = make_trainer(_config(demo_models_dir, tmp_path))
    assert isinstance(trainer, DistillTrainer)
    trainer.prepare()
    teacher = _teacher_outputs(trainer)
    before = _held_out_error(trainer, teacher)
    trainer.run()
    after = _held_out_error(trainer, teacher)
    print(f"held-out MSE to the teacher: before {before:.4f}, after {after:.4f}")
    assert after < 0.8 * before, (before, after)
    assert len(list((tmp_path / "cache" / "teacher").iterdir())) == 6  # one caption x 6 seeds

    # a second run finds every target on disk and makes none
    again = make_trainer(_config(demo_models_dir, tmp_path, max_train_steps=1, output_name="again"))
    log = []
    again.log_stream = type("L", (), {"write": lambda self, s: log.append(s), "flush": lambda self: None})()
    again.prepare()
    assert any("0 teacher targets made, 6 reused" in line for line in log)
