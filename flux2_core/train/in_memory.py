"""Training on latents and text embeddings already in memory (what a node graph hands over), on a DiT that
other graphs share.

`InMemoryData` is the trainer's data source over given tensors: each latent [128, h, w] is one sample, the
text embeddings are one for all samples or one per sample; batches group equal latent sizes in the same
seeded order as the cached data (`buckets.epoch_batches`), so a saved state resumes at the same batch. With
`buckets`, each given latents tensor is a bucket of its own (ComfyUI's ResolutionBucket output): a batch never
mixes samples of two tensors.

`InMemoryTrainer` is `Trainer` with that data source and a DiT that is passed in instead of loaded. The DiT
is borrowed: the peft adapters are injected for the run and taken out again afterwards (each wrapped layer is
put back as its own `base_layer` object, with the frozen flags and train/eval mode it had), so a model that
other graphs hold is unchanged once training ends, fails or is interrupted. The result is the trained adapters
as a `Flux2LoRA`; writing a file is the caller's choice (`save_lora`). With `initial_lora`, training continues
that LoRA (`AdapterSet.start_from`) instead of starting from zero. With `save_state`, an interrupted run
leaves `<output_dir>/<output_name>-state`, and a run whose `resume` names that folder continues from it.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn

from ..errors import Flux2Error
from ..lora import Flux2LoRA
from ..memory.residency import replace_tensors
from .buckets import epoch_batches
from .config import TrainConfig
from .memory import enable_gradient_checkpointing
from .objective import Batch
from .optimizers import make_scheduler
from .trainer import Trainer

# TrainConfig asks for file paths of the parts a file-based run loads; here they arrive from the graph.
GIVEN = "(given in memory)"


class InMemoryData:
    """Batches from latents [N, 128, h, w] (any number of tensors, sizes may differ) and contexts."""

    def __init__(self, latents: list[torch.Tensor], contexts: list[torch.Tensor], batch_size: int, seed: int,
                 buckets: bool = False):
        self.samples = [sample for tensor in latents for sample in _samples(tensor, "latents")]
        groups = [index if buckets else 0 for index, tensor in enumerate(latents) for _ in range(len(tensor))]
        contexts = [sample for tensor in contexts for sample in _samples(tensor, "conditioning")]
        if not self.samples:
            raise Flux2Error("training latents: expected at least one latent, found none")
        if len(contexts) == 1:
            contexts = contexts * len(self.samples)
        if len(contexts) != len(self.samples):
            raise Flux2Error(f"training conditioning: expected 1 text embedding or one per latent "
                             f"({len(self.samples)}), found {len(contexts)}")
        self.contexts = contexts
        self.seed = seed
        self.keys = [(group, tuple(sample.shape), tuple(context.shape))
                     for group, sample, context in zip(groups, self.samples, contexts)]
        self.batch_sizes = [batch_size] * len(self.samples)

    def epoch(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.keys, self.batch_sizes, self.seed, epoch)

    def load(self, indices: list[int], generator: torch.Generator) -> Batch:
        return Batch(torch.stack([self.samples[i] for i in indices]).float(),
                     torch.stack([self.contexts[i] for i in indices]).float())


def _samples(tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
    expected = 4 if what == "latents" else 3
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != expected:
        found = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise Flux2Error(f"training {what}: expected tensors with {expected} dimensions, found {found}")
    return [sample.detach().cpu() for sample in tensor]


class InMemoryTrainer(Trainer):
    def __init__(self, config: TrainConfig, dit: nn.Module, latents: list[torch.Tensor],
                 contexts: list[torch.Tensor], batch_size: int = 1, buckets: bool = False,
                 initial_lora: Flux2LoRA | None = None, **kwargs):
        for name in ("dit", "vae", "text_encoder", "dataset_config"):
            if not getattr(config, name):
                setattr(config, name, GIVEN)
        super().__init__(config, **kwargs)
        self.given_dit = dit
        # The DiT stays where the graph put it; CUDA computes in bf16 under autocast unless fp32 is asked for.
        self.device = next(dit.parameters()).device
        on_gpu = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if on_gpu and config.mixed_precision == "bf16" else torch.float32
        self.items = self.data = InMemoryData(latents, contexts, batch_size, config.seed, buckets)
        self.initial_lora = initial_lora

    def prepare(self) -> None:
        c = self.config
        self.seed_everything()
        self.dit = self.given_dit
        self._modes = {name: module.training for name, module in self.dit.named_modules()}
        self._frozen = {name: param.requires_grad for name, param in self.dit.named_parameters()}
        self.trainable = self.make_trainable()
        if self.initial_lora is not None:
            self.trainable.start_from(self.initial_lora)
        if c.gradient_checkpointing:
            enable_gradient_checkpointing(self.dit)  # a no-op outside autograd, so sampling is unaffected
        self.dit.train()
        self.optimizer = self.make_optimizer(list(self.trainable.parameters()))
        self.scheduler = make_scheduler(c, self.optimizer)
        if c.resume:
            self._resume(c.resume)

    def train_lora(self) -> Flux2LoRA:
        """Run to `max_train_steps` and return the adapters; the DiT is given back as it came in any case."""
        try:
            self.run()
            return self.lora()
        finally:
            if self.trainable is not None:
                self._give_back_dit()

    def save_final(self) -> None:
        """No file at the end (the graph saves the LoRA when it wants to); a finished run needs no state."""

    def metadata(self) -> dict[str, str]:
        c = self.config
        kind = "lora" if c.network_type == "lora" else f"lycoris-{c.network_type}"
        return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"flux-2-{c.variant}/{kind}",
                "modelspec.implementation": "flux2_core.train", "modelspec.title": c.output_name,
                "ss_network_dim": str(c.network_dim), "ss_network_alpha": str(c.network_alpha),
                "ss_steps": str(self.step), "ss_learning_rate": str(c.learning_rate), "ss_seed": str(c.seed),
                "ss_num_train_images": str(len(self.data.samples))}

    def _give_back_dit(self) -> None:
        for name, layer in self.trainable.layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.dit.get_submodule(parent_name) if parent_name else self.dit, child, layer.base_layer)
        if "peft_config" in vars(self.dit):
            del self.dit.peft_config
        for name, param in self.dit.named_parameters():
            param.requires_grad_(self._frozen[name])
        for name, module in self.dit.named_modules():
            module.training = self._modes[name]


def train_in_memory(config: TrainConfig, dit: nn.Module, latents: list[torch.Tensor], contexts: list[torch.Tensor],
                    batch_size: int = 1, on_step: Callable | None = None, cancel: Callable[[], bool] | None = None,
                    log_stream=sys.stderr, buckets: bool = False,
                    initial_lora: Flux2LoRA | None = None) -> tuple[Flux2LoRA, list[float], int]:
    """Train adapters on `dit` (left unchanged afterwards); returns (LoRA, loss per step, steps done).

    Callable under `torch.inference_mode()` (ComfyUI runs every node so, and so does our host): the run leaves
    it, and tensors made under it (the DiT's weights, the latents and embeddings) are swapped for ordinary
    copies, since autograd cannot save inference tensors for backward.
    """
    with torch.inference_mode(False), torch.enable_grad():
        replace_tensors(dit, lambda _name, tensor: _ordinary(tensor))
        trainer = InMemoryTrainer(config, dit, [_ordinary(t) for t in latents], [_ordinary(t) for t in contexts],
                                  batch_size, buckets, initial_lora, on_step=on_step, cancel=cancel,
                                  log_stream=log_stream)
        lora = trainer.train_lora()
    return lora, trainer.losses, trainer.step


def _ordinary(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone() if tensor.is_inference() else tensor

