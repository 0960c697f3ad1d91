"""Everything a run writes that must survive a crash: LoRA files and training states, written atomically.

A file is written under a temporary name in the same folder and renamed over the target (`os.replace`), so a
reader never sees half a file. A training state is a folder (`adapter.safetensors` + `state.pt`: optimizer,
LR scheduler, the RNG states of torch / numpy / python and of the run's own generator, step, epoch and the
position in the epoch's batch order) written as `NAME.tmp` and renamed into place.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import Flux2Error
from ..lora import Flux2LoRA, save_lora

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.pt"


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    temporary = _temporary(path)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(temporary), metadata)
    os.replace(temporary, path)


def atomic_save_lora(lora: Flux2LoRA, path: str | os.PathLike, fmt: str = "comfyui") -> None:
    path = Path(path)
    temporary = _temporary(path)
    save_lora(lora, temporary, fmt)
    os.replace(temporary, path)


def rng_states() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_training_state(directory: str | os.PathLike, adapter: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write a state folder atomically (a previous one of the same name is replaced only once the new one is
    complete)."""
    directory = Path(directory)
    temporary = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(temporary / ADAPTER_FILE))
    torch.save({**state, "rng": rng_states()}, temporary / STATE_FILE)
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(temporary, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, directory)
    return directory


def load_training_state(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    directory = Path(directory)
    if not (directory / ADAPTER_FILE).is_file() or not (directory / STATE_FILE).is_file():
        raise Flux2Error(f"resume: expected a training state folder with {ADAPTER_FILE} and {STATE_FILE}, "
                         f"found {directory}")
    # Our own file: optimizer states and numpy RNG states need the full unpickler.
    return load_file(str(directory / ADAPTER_FILE)), torch.load(directory / STATE_FILE, weights_only=False)
