"""`Trainer`: prepare (read data, cache, load the DiT, add adapters), then run the optimisation loop.

    trainer = Trainer(config, on_step=lambda info: ..., cancel=threading.Event())
    lora_path = trainer.run()

Order of residency: the VAE and the text encoder are each loaded, used to fill the caches and freed before the
DiT is loaded, so they never share memory with it. The pluggable parts (part 2 builds on them):
`trainable` (default `AdapterSet`: parameters / state_dict / load_state_dict / to_lora), `objective`
(default `FlowMatchingObjective`: (dit, batch, generator) -> per-sample loss) and `data` (default
`CachedData`: epoch(e) -> batches of indices, load(indices, generator) -> Batch).

Reproducibility: `seed` seeds torch / numpy / python; the batch order is a function of (seed, epoch), and every
micro-batch draws its noise, sigmas, caption dropout and adapter dropout from generators seeded by (seed, its
index in the run) (`dataloader.micro_batch_loader`); a training state stores the micro-batches consumed plus the
optimizer and scheduler, so N steps straight and N/2 + resume + N/2 give the same weights, on one process or
several (`distributed.DistributedTrainer` shards the same micro-batch order over accelerate's processes).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..devices import resolve_device
from ..errors import Flux2Error, Interrupted
from .adapters import AdapterSet
from .cache import (
    cache_latents,
    cache_text,
    caption_variants,
    file_digest,
    model_identity,
    plan_cache,
    text_file,
)
from .checkpointing import atomic_save_lora, load_training_state, restore_rng_states, save_training_state
from .config import TrainConfig
from .dataloader import CachedData, micro_batch_loader, micro_batch_seed
from .differential import merge_preset_lora
from .fp8_training import load_training_dit
from .datasets import DataReport, read_datasets
from .memory import activation_offload, enable_block_swap, enable_gradient_checkpointing, swapped_weights_fit
from .swap_check import check_block_swap
from .objective import FlowMatchingObjective
from .optimizers import loraplus_groups, make_optimizer, make_scheduler

log = logging.getLogger(__name__)

CAPTION_SHUFFLE_VARIANTS = 8


@dataclass(frozen=True)
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    grad_norm: float
    epoch: int


class Trainer:
    def __init__(self, config: TrainConfig, on_step: Callable[[StepInfo], None] | None = None,
                 cancel: threading.Event | Callable[[], bool] | None = None, objective: Callable | None = None,
                 log_stream=sys.stderr):
        self.config = config.validate()
        self.on_step = on_step
        self.cancel = cancel
        self.objective = objective or FlowMatchingObjective(config)
        self.log_stream = log_stream
        self.output_dir = Path(config.output_dir)
        self.report = DataReport()
        self.step = 0
        self.epoch = 0  # whole epochs consumed
        self.micro_batches = 0  # micro-batches consumed by the run (over every process)
        self.stream = None  # this process's micro-batches: (index, Batch, generator)
        self.losses: list[float] = []
        self._stop_signal = False
        self.device = resolve_device(config.device or None)
        on_gpu = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if on_gpu and config.mixed_precision == "bf16" else torch.float32
        self.dit = self.trainable = self.data = self.optimizer = self.scheduler = None
        self.block_streamer = None  # set when blocks_to_swap > 0
        self.variant = config.variant

    # ---------------------------------------------------------------------------------------------------------
    # preparation

    @property
    def cache_directory(self) -> Path:
        return Path(self.config.cache_directory) if self.config.cache_directory else self.output_dir / "cache"

    def prepare_caches(self, latents: bool = True, text: bool = True) -> list:
        """Read the datasets, name and fill the caches; returns the planned items (bad ones dropped)."""
        c = self.config
        specs = read_datasets(c.dataset_config, c.resolution, c.caption_extension, self.report)
        self.specs = specs
        te_id = model_identity(c.text_encoder)

        def captions(caption: str) -> list[str]:
            return caption_variants(caption, c.shuffle_caption, c.caption_separator, c.keep_tokens,
                                    CAPTION_SHUFFLE_VARIANTS, c.seed)

        items = plan_cache(specs, self.cache_directory, model_identity(c.vae), te_id, self.report, captions)
        if latents:
            items = cache_latents(items, c.vae, self.device, self.dtype, c.skip_existing, self.report)
        self.empty_caption_file = text_file(self.cache_directory, "", te_id)
        if text:
            texts = {path: caption for cached in items
                     for path, caption in zip(cached.text_files, captions(cached.item.caption))}
            texts[self.empty_caption_file] = ""
            cache_text(texts, c.text_encoder, self.device, self.dtype, c.skip_existing)
        if not items:
            raise Flux2Error(f"{c.dataset_config}: no usable training images ({len(self.report.skipped)} skipped)")
        for what, why in self.report.skipped:
            print(f"skipped {what}: {why}", file=self.log_stream)
        return items

    def seed_everything(self) -> None:
        """torch, numpy and python RNGs from the config's seed (adapter initialisation); the training draws come
        from each micro-batch's own generators, so sampling previews cannot shift them."""
        seed = self.config.seed
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def prepare(self) -> None:
        c = self.config
        self.seed_everything()
        items = self.prepare_caches()
        self.items = items
        self.data = CachedData(items, self.specs, c.seed, c.caption_dropout_rate, self.empty_caption_file)
        if c.max_train_epochs:
            # Epochs win over steps when given (musubi's rule): whole epochs of optimizer steps.
            batches = len(self.data.epoch(0))
            c.max_train_steps = math.ceil(c.max_train_epochs * batches / (c.gradient_accumulation_steps
                                                                          * self.process_count))
        self.load_model()
        if c.gradient_checkpointing:
            enable_gradient_checkpointing(self.dit)
        self.dit.train()
        if c.blocks_to_swap:
            self.block_streamer = self._checked_block_swap()
        self.optimizer = self.make_optimizer(list(self.trainable.parameters()))
        self.scheduler = make_scheduler(c, self.optimizer)
        if c.resume:
            self._resume(c.resume)

    def load_model(self) -> None:
        """The DiT with its trainable set, on the device. With `blocks_to_swap` the DiT is read into CPU memory,
        the adapters are added there, the swapped blocks' frozen weights are handed to the block swap (pinned CPU
        memory) and only the rest moves to the device, as `load_dit(offload="cpu")` does for inference: a DiT
        larger than the device trains as long as the resident part fits."""
        c = self.config
        load_to = torch.device("cpu") if c.blocks_to_swap else self.device
        self.dit = load_training_dit(c, self.device, self.dtype, self.log_stream, load_to)  # plan, fp8 scales
        self.variant = self.dit.variant  # the given model_version, or what the file says
        merge_preset_lora(self.dit, c)  # part 2 hook: differential LoRA (no-op without preset_lora)
        self.trainable = self.make_trainable()
        if c.blocks_to_swap:
            self.block_streamer = enable_block_swap(self.dit, c.blocks_to_swap, self.device)
            self.dit.to(self.device)  # the streamed modules stay in CPU memory and only retarget their copies

    def _checked_block_swap(self):
        """Keep the block swap after one step without and one with swapping on the first batch gave the same
        adapter gradients (`swap_check.check_block_swap`); refuses to train otherwise. Both steps draw the same
        random numbers (own generators, and the global ones forked and seeded for adapter dropout), and the run's
        random state is left as it was, so a run with swapping trains like one without.

        The step without swapping needs every weight on the device for a moment. When the swapped weights do not
        fit there beside the rest (`swapped_weights_fit`), the reference step streams them too, but with
        synchronous copies and no prefetch: that still catches a copy on the side stream that races the compute or
        a prefetch into the wrong module, not a wrong mapping of the stored weights (the CPU tests check that)."""
        c = self.config
        streamer = self.block_streamer
        batch = self.data.load(self.data.epoch(0)[0], torch.Generator().manual_seed(c.seed))
        cuda_devices = [torch.cuda.current_device()] if self.device.type == "cuda" else []

        def loss() -> torch.Tensor:
            with torch.random.fork_rng(devices=cuda_devices), self._autocast(), \
                    activation_offload(c.offload_activations, self.device):
                torch.manual_seed(c.seed)
                return self.objective(self.dit, batch, torch.Generator().manual_seed(c.seed))[0].mean()

        # fp32 on the CPU is bit-reproducible; GPU attention backward may sum in a varying order, while a
        # wrong-weights bug moves them by the order of the gradients themselves (1.26 relative on the test model)
        tolerance = 1e-5 if self.device.type == "cpu" else 1e-2
        whole = swapped_weights_fit(streamer.streamed_bytes, self.device)
        if whole:
            streamer.detach()  # every weight on the device: the reference step runs without swapping

            def enable_swap():
                return enable_block_swap(self.dit, c.blocks_to_swap, self.device)
        else:
            streamer.prefetch = False

            def enable_swap():
                streamer.prefetch = True
                return streamer
        streamer, worst = check_block_swap(self.trainable.parameters(), loss, enable_swap, tolerance,
                                           detach_on_failure=whole)
        reference = "without swapping" if whole else "with synchronous copies (the swapped weights do not fit)"
        print(f"block swap: {len(streamer.blocks)} modules of the last {c.blocks_to_swap} blocks stream from CPU "
              f"memory ({streamer.streamed_bytes / 2**20:.1f} MiB); self-check against a step {reference} passed "
              f"(largest relative LoRA gradient difference {worst:.2g})", file=self.log_stream)
        return streamer

    # part 2 hooks: several processes (distributed.py) fill these in
    process_count = 1

    @property
    def model(self) -> torch.nn.Module:
        """The module the objective calls: the DiT itself (under accelerate, its DDP wrapper)."""
        return self.dit

    def micro_batch_loader(self, start: int, count: int):
        return micro_batch_loader(self.data, self.config.seed, start, count)

    def gradient_sync(self, last: bool):
        """Context of one micro-batch's forward and backward (several processes sync gradients on the last)."""
        return contextlib.nullcontext()

    def mean_over_processes(self, value: float) -> float:
        return value

    def gradients_ready(self) -> None:
        """The step's gradients are complete (and averaged over the processes): before clipping and the step."""

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state as `torch.optim.Optimizer.state_dict` gives it (parameters numbered in the
        trainable set's order): the form every process count saves and resumes."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def close(self) -> None:
        """After `run`: release what outlives the run (several processes: the process group)."""

    # part 2 hooks: full_finetune.FullFineTuner overrides these two (and save_lora / lora / metadata)
    def make_trainable(self) -> AdapterSet:
        return AdapterSet(self.dit, self.config)

    def make_optimizer(self, params: list[torch.nn.Parameter]):
        c = self.config
        if c.loraplus_lr_ratio:
            return make_optimizer(c, loraplus_groups(self.trainable.named_parameters(), c.learning_rate,
                                                     c.loraplus_lr_ratio), self.device)
        return make_optimizer(c, params, self.device)

    def _resume(self, directory: str) -> None:
        adapter, state = load_training_state(directory)
        if "micro_batches" not in state:
            raise Flux2Error(f"resume {directory}: a training state of an older version (no micro-batch count); "
                             f"its run cannot be continued exactly, start it again")
        self.trainable.load_state_dict(adapter)
        try:
            self.load_optimizer_state(state["optimizer"])
        except ValueError as error:  # torch's words for another optimizer layout (e.g. LoRA+ on or off)
            raise Flux2Error(f"resume {directory}: the saved optimizer state does not fit this run's optimizer "
                             f"({error}); resume with the settings it was saved with (optimizer_type, "
                             f"loraplus_lr_ratio)") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.micro_batches = state["step"], state["epoch"], state["micro_batches"]
        restore_rng_states(state["rng"])
        per_step = self.config.gradient_accumulation_steps * self.process_count
        if state["micro_batches_per_step"] != per_step:
            print(f"note: the state was trained with {state['micro_batches_per_step']} micro-batches per step, this "
                  f"run takes {per_step} (processes x gradient_accumulation_steps): it resumes at the next "
                  f"micro-batch with a different step size", file=self.log_stream)
        print(f"resumed from {directory} at step {self.step}", file=self.log_stream)

    # ---------------------------------------------------------------------------------------------------------
    # the loop

    def _cancelled(self) -> bool:
        if self._stop_signal:
            return True
        if self.cancel is None:
            return False
        return self.cancel.is_set() if isinstance(self.cancel, threading.Event) else bool(self.cancel())

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return torch.autocast("cpu", enabled=False)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over `gradient_accumulation_steps` batches; returns (mean loss, grad norm)."""
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        accumulation = c.gradient_accumulation_steps
        for k in range(accumulation):
            index, batch, generator = next(self.stream)
            torch.manual_seed(micro_batch_seed(c.seed, index))  # adapter dropout: the same on any process count
            with self.gradient_sync(last=k == accumulation - 1):
                with self._autocast(), activation_offload(c.offload_activations, self.device):
                    per_sample, _ = self.objective(self.model, batch, generator)
                loss = per_sample.mean() / accumulation
                loss.backward()
            total += float(loss.detach())
        self.micro_batches += accumulation * self.process_count
        total = self.mean_over_processes(total)
        self.gradients_ready()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if c.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack(
                [p.grad.norm() for p in params if p.grad is not None])))
        self.optimizer.step()
        self.scheduler.step()
        return total, grad_norm

    def run(self) -> Path:
        """Train to `max_train_steps`; returns the final LoRA file. Ctrl-C / SIGTERM / cancel save a training
        state (`<output_name>-state`) and raise `Interrupted`."""
        if self.dit is None:
            self.prepare()
        c = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        logger = _RunLog(Path(c.logging_dir) if c.logging_dir else self.output_dir / "logs", c.output_name,
                         resume=bool(c.resume))
        previous = _install_sigterm(self)
        progress = _progress(c.max_train_steps, self.step)
        self.batches_per_epoch = len(self.data.epoch(0))
        per_step = c.gradient_accumulation_steps * self.process_count
        self.stream = iter(self.micro_batch_loader(self.micro_batches, (c.max_train_steps - self.step) * per_step))
        try:
            if c.sample_at_first and self.step == 0:
                self.samples()
            while self.step < c.max_train_steps:
                if self._cancelled():
                    raise Interrupted(f"training stopped at step {self.step}")
                loss, grad_norm = self.train_step()
                self.step += 1
                lr = self.scheduler.get_last_lr()[0]
                self.losses.append(loss)
                info = StepInfo(self.step, c.max_train_steps, loss, lr, grad_norm, self.epoch)
                print(f"step {self.step}/{c.max_train_steps} loss {loss:.6f} lr {lr:.3g} grad_norm {grad_norm:.4g}",
                      file=self.log_stream, flush=True)
                logger.log(info)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss:.4f}")
                if self.on_step is not None:
                    self.on_step(info)
                self._step_finished()
            return self.save_final()
        except (KeyboardInterrupt, Interrupted):
            if self.step > 0:  # always, `save_state` or not: an interrupted run must be resumable
                path = self.save_state(self.output_dir / f"{c.output_name}-state")
                print(f"interrupted: training state saved to {path}", file=self.log_stream)
            raise Interrupted(f"training interrupted at step {self.step}") from None
        finally:
            if progress is not None:
                progress.close()
            logger.close()
            _restore_sigterm(previous)

    def _step_finished(self) -> None:
        c = self.config
        while self.epoch < self.micro_batches // self.batches_per_epoch:
            self.epoch += 1
            if self.step < c.max_train_steps:  # the last epoch's outputs are the final ones
                self._epoch_finished(self.epoch)
        if c.save_every_n_steps and self.step % c.save_every_n_steps == 0 and self.step < c.max_train_steps:
            self.save_lora(self.output_dir / f"{c.output_name}-step{self.step:08d}.safetensors")
            if c.save_state:
                self.save_state(self.output_dir / f"{c.output_name}-step{self.step:08d}-state")
        if c.sample_every_n_steps and self.step % c.sample_every_n_steps == 0:
            self.samples()

    def _epoch_finished(self, epochs_done: int) -> None:
        c = self.config
        if c.save_every_n_epochs and epochs_done % c.save_every_n_epochs == 0:
            self.save_lora(self.output_dir / f"{c.output_name}-epoch{epochs_done:06d}.safetensors")
        if c.sample_every_n_epochs and epochs_done % c.sample_every_n_epochs == 0:
            self.samples()

    # ---------------------------------------------------------------------------------------------------------
    # outputs

    def metadata(self) -> dict[str, str]:
        c = self.config
        dit_path = Path(c.dit)
        settings = {k: v for k, v in c.as_dict().items() if k not in ("resume",)}
        return {
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"flux-2-{self.variant}/lora" if c.network_type == "lora" else
                                      f"flux-2-{self.variant}/lycoris-{c.network_type}",
            "modelspec.implementation": "flux2_core.train",
            "modelspec.title": c.output_name,
            "ss_base_model_version": self.variant,
            "ss_network_module": f"flux2_core.train.{c.network_type}",
            "ss_network_dim": str(c.network_dim),
            "ss_network_alpha": str(c.network_alpha),
            "ss_steps": str(self.step),
            "ss_learning_rate": str(c.learning_rate),
            "ss_seed": str(c.seed),
            "ss_num_train_images": str(len(getattr(self, "items", []))),
            "ss_sd_model_name": dit_path.name,
            "flux2_base_model_file": dit_path.name,
            "flux2_base_model_sha256": _cached_digest(dit_path),
            "flux2_dataset": json.dumps({"source": c.dataset_config, "images": len(getattr(self, "items", [])),
                                         "skipped": len(self.report.skipped)}),
            "flux2_training_settings": json.dumps(settings),
        }

    def lora(self):
        return self.trainable.to_lora(self.config.output_name, self.metadata())

    def save_lora(self, path: Path) -> Path:
        atomic_save_lora(self.lora(), path, "comfyui")
        print(f"saved {path}", file=self.log_stream)
        return path

    def save_final(self) -> Path:
        c = self.config
        path = self.save_lora(self.output_dir / f"{c.output_name}.safetensors")
        if c.save_state:
            self.save_state(self.output_dir / f"{c.output_name}-state")
        sampled_now = bool(c.sample_every_n_steps) and self.step % c.sample_every_n_steps == 0
        if (c.sample_every_n_steps or c.sample_every_n_epochs) and not sampled_now:
            self.samples()  # the final weights get their samples too
        return path

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(trained tensors, the rest) of a training state: what `save_state` writes and `_resume` reads."""
        return self.trainable.state_dict(), {
            "optimizer": self.optimizer_state(), "scheduler": self.scheduler.state_dict(),
            "step": self.step, "epoch": self.epoch, "micro_batches": self.micro_batches,
            "micro_batches_per_step": self.config.gradient_accumulation_steps * self.process_count,
            "config": self.config.as_dict()}

    def save_state(self, directory: Path) -> Path:
        return save_training_state(directory, *self.training_state())

    def samples(self) -> list[Path]:
        if not self.config.sample_prompts:
            return []
        from .samples import generate_samples

        return generate_samples(self, self.output_dir / "sample")


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _cached_digest(path: Path) -> str:
    """sha256 of the base model file, computed once per process (it is large)."""
    if path.is_dir():
        return ""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(path)
    return _DIGESTS[key]


def _install_sigterm(trainer: Trainer):
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        trainer._stop_signal = True

    return signal.signal(signal.SIGTERM, stop)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _progress(total: int, initial: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=None)  # None: only on a terminal


class _RunLog:
    """loss.csv (step, loss, lr, grad_norm, epoch) and a TensorBoard log when `tensorboard` is installed."""

    def __init__(self, directory: Path, name: str, resume: bool):
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}-loss.csv"
        new = not (resume and path.exists())
        self.csv_file = open(path, "w" if new else "a", newline="", encoding="utf-8")
        self.csv = csv.writer(self.csv_file)
        if new:
            self.csv.writerow(["step", "loss", "lr", "grad_norm", "epoch", "time"])
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(directory / name))
        except ImportError:
            log.info("tensorboard is not installed: no TensorBoard log (pip install tensorboard)")
            self.tensorboard = None

    def log(self, info: StepInfo) -> None:
        self.csv.writerow([info.step, f"{info.loss:.8g}", f"{info.lr:.8g}", f"{info.grad_norm:.8g}", info.epoch,
                           f"{time.time():.3f}"])
        self.csv_file.flush()
        if self.tensorboard is not None:
            for key in ("loss", "lr", "grad_norm"):
                self.tensorboard.add_scalar(f"train/{key}", getattr(info, key), info.step)

    def close(self) -> None:
        self.csv_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def train(config: TrainConfig, **kwargs: Any) -> Path:
    """Train with `config`; keyword arguments are `Trainer`'s (on_step, cancel, objective)."""
    return Trainer(config, **kwargs).run()
