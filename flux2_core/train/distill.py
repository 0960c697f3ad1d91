"""Direct distillation (DiffSynth-Studio's "end-to-end direct distillation"): a student (the same DiT with a
LoRA) runs the whole few-step loop (Euler, e.g. 4 steps, no CFG) with gradients and learns to land on the final
latent a teacher (the base, many steps with CFG, optionally with a LoRA) reaches from the same noise.

Teacher targets are made once, before the adapters are added, for every (caption embedding, seed) the run can
draw: seeds 0 .. distill_seeds - 1 of each training item (its latent gives the size). Each target is a file in
`<cache>/teacher/`, named by a digest of the seed, the text embedding, the latent size and every teacher
setting (model identity, LoRA and strength, steps, CFG, guidance), so a second run, or a resumed one, reuses
them. The teacher is the loaded base itself unless `distill_teacher` names another DiT (loaded, used, freed).

Memory: the unrolled loop keeps one set of activations per step; with `gradient_checkpointing` each step's
DiT call is recomputed in backward (on top of the per-block checkpointing), so only the step inputs stay.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..checkpoints.loaders import load_dit
from ..errors import Flux2Error
from ..lora import attach_loras
from ..sampling import flux2_sigmas_for_tokens, make_noise, sample, unpack_latents
from .cache import model_identity, read_cache
from .checkpointing import atomic_save_file
from .config import TrainConfig
from .objective import Batch, model_inputs
from .trainer import Trainer


def _guidance(dit: nn.Module, size: int, value: float, device: torch.device) -> Tensor | None:
    return torch.full((size,), value, device=device) if dit.config.guidance_embed else None


def student_rollout(dit: nn.Module, batch: Batch, seeds: list[int], steps: int, guidance: float = 1.0,
                    checkpoint_steps: bool = False) -> Tensor:
    """The student's final latent [B, 128, h, w] (float32): Euler over FLUX.2's `steps`-step schedule from each
    sample's seeded noise, without CFG, differentiable (autograd follows the whole loop)."""
    device = next(dit.parameters()).device
    dtype = getattr(dit, "compute_dtype", torch.float32)
    size, channels, height, width = batch.latents.shape
    x = torch.cat([make_noise(seed, (1, channels, height, width)) for seed in seeds]).to(device)
    sigmas = flux2_sigmas_for_tokens(steps, height * width).to(device)
    guidance_vec = _guidance(dit, size, guidance, device)

    def velocity(latent: Tensor, sigma: Tensor) -> Tensor:
        out = dit(**model_inputs(latent, batch, device, dtype), timesteps=sigma.expand(size), guidance=guidance_vec)
        return unpack_latents(out[:, :height * width].float(), height, width)

    for i in range(steps):
        if checkpoint_steps and torch.is_grad_enabled():
            v = checkpoint(velocity, x, sigmas[i], use_reentrant=False)
        else:
            v = velocity(x, sigmas[i])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


class TeacherTargets:
    """The teacher's final latents on disk, one file per (seed, text embedding, size, settings)."""

    def __init__(self, config: TrainConfig, directory: Path):
        self.config = config
        self.directory = directory / "teacher"
        teacher = config.distill_teacher or config.dit
        self.settings = {
            "teacher": model_identity(teacher),
            "lora": model_identity(config.distill_teacher_lora) if config.distill_teacher_lora else "",
            "lora_strength": config.distill_teacher_lora_strength if config.distill_teacher_lora else 0.0,
            "steps": config.distill_teacher_steps, "cfg": config.distill_teacher_cfg,
            "guidance": config.guidance_scale,
        }

    def path(self, context: Tensor, shape: tuple[int, ...], seed: int) -> Path:
        digest = hashlib.sha256(json.dumps({**self.settings, "seed": seed, "shape": list(shape)}).encode())
        digest.update(context.detach().float().cpu().contiguous().numpy().tobytes())
        return self.directory / f"{digest.hexdigest()[:32]}.safetensors"

    def load(self, batch: Batch, seeds: list[int]) -> Tensor:
        shape = tuple(batch.latents.shape[1:])
        latents = []
        for context, seed in zip(batch.context, seeds):
            path = self.path(context, shape, seed)
            if not path.is_file():
                raise Flux2Error(f"distillation: no teacher target for seed {seed} at {path}; the targets are made "
                                 f"before training (delete {self.directory} to make them again)")
            latents.append(load_file(str(path))["latent"])
        return torch.stack(latents)

    @torch.no_grad()
    def make(self, teacher: nn.Module, jobs: list[tuple[Tensor, tuple[int, ...]]], negative: Tensor,
             seeds: range, log_stream) -> int:
        """Run the teacher for every (context [T, C], latent shape) x seed whose file is missing; returns how many."""
        c = self.config
        self.directory.mkdir(parents=True, exist_ok=True)
        made = 0
        with attach_loras(teacher, [(c.distill_teacher_lora, c.distill_teacher_lora_strength)]
                          if c.distill_teacher_lora else []):
            for context, shape in jobs:
                for seed in seeds:
                    path = self.path(context, shape, seed)
                    if path.is_file():
                        continue
                    channels, height, width = shape
                    latent = sample(
                        teacher, make_noise(seed, (1, channels, height, width)),
                        flux2_sigmas_for_tokens(c.distill_teacher_steps, height * width), context[None],
                        negative_context=negative[None] if c.distill_teacher_cfg != 1.0 else None,
                        cfg=c.distill_teacher_cfg,
                        guidance=c.guidance_scale if teacher.config.guidance_embed else None)
                    atomic_save_file({"latent": latent[0].cpu()}, path, {"seed": str(seed)})
                    made += 1
        print(f"distillation: {made} teacher targets made, {len(jobs) * len(seeds) - made} reused from "
              f"{self.directory}", file=log_stream)
        return made


class DistillObjective:
    """(student dit, batch, generator) -> (per-sample MSE to the teacher's final latent, the seeds drawn)."""

    def __init__(self, config: TrainConfig, targets: TeacherTargets):
        self.config = config
        self.targets = targets

    def __call__(self, dit: nn.Module, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        c = self.config
        seeds = torch.randint(0, c.distill_seeds, (batch.latents.shape[0],), generator=generator)
        target = self.targets.load(batch, seeds.tolist())
        final = student_rollout(dit, batch, seeds.tolist(), c.distill_student_steps, c.guidance_scale,
                                checkpoint_steps=c.gradient_checkpointing)
        per_sample = ((final - target.to(final.device)) ** 2).mean(dim=(1, 2, 3))
        return per_sample, seeds


class DistillTrainer(Trainer):
    """LoRA training with `DistillObjective`; the teacher targets are made right after the base is loaded."""

    def __init__(self, config: TrainConfig, **kwargs: Any):
        if config.caption_dropout_rate or config.shuffle_caption:
            raise Flux2Error("distillation: caption_dropout_rate and shuffle_caption must be off (the teacher's "
                             "targets are made for the dataset's captions as written)")
        if config.distill_seeds < 1 or config.distill_student_steps < 1 or config.distill_teacher_steps < 1:
            raise Flux2Error("distillation: distill_seeds, distill_student_steps and distill_teacher_steps must "
                             "be >= 1")
        super().__init__(config, **kwargs)
        self.targets = TeacherTargets(config, self.cache_directory)
        self.objective = DistillObjective(config, self.targets)

    def _teacher_jobs(self) -> list[tuple[Tensor, tuple[int, ...]]]:
        jobs = {}
        for entry in self.data.entries:
            shape = tuple(read_cache(entry.latent_file)["latent"].shape[1:])
            for text in entry.text_files:
                jobs[(text, shape)] = (read_cache(text)["context"][0], shape)
        return list(jobs.values())

    def make_trainable(self):
        c = self.config
        teacher = self.dit if not c.distill_teacher else load_dit(
            c.distill_teacher, device=self.device, dtype=self.dtype, variant=c.variant)
        negative = read_cache(self.empty_caption_file)["context"][0]
        self.targets.make(teacher, self._teacher_jobs(), negative, range(c.distill_seeds), self.log_stream)
        del teacher
        return super().make_trainable()
