"""FLUX.2 engine: pure PyTorch.

    from flux2_core import Flux2Pipeline
    pipe = Flux2Pipeline.from_files(dit=..., vae=..., text_encoder=...)

The names below are resolved on first use: importing any flux2_core submodule runs this file, and
`Flux2Pipeline` pulls in transformers, which takes seconds to import and which `flux2 info` never needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Flux2Pipeline": "flux2_core.pipeline",
    "load_dit": "flux2_core.checkpoints.loaders",
    "load_vae": "flux2_core.checkpoints.loaders",
    "load_text_encoder": "flux2_core.checkpoints.loaders",
    "Flux2DiT": "flux2_core.dit",
    "DiTConfig": "flux2_core.variants",
    "VARIANTS": "flux2_core.variants",
    "Flux2VAE": "flux2_core.vae",
    "VAEConfig": "flux2_core.vae",
    "Flux2TextEncoder": "flux2_core.text_encoders",
    "Flux2Error": "flux2_core.errors",
    "CheckpointError": "flux2_core.errors",
    "IncompatibleModelsError": "flux2_core.errors",
    "Interrupted": "flux2_core.errors",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .checkpoints.loaders import load_dit, load_text_encoder, load_vae
    from .dit import Flux2DiT
    from .errors import CheckpointError, Flux2Error, IncompatibleModelsError, Interrupted
    from .pipeline import Flux2Pipeline
    from .text_encoders import Flux2TextEncoder
    from .vae import Flux2VAE, VAEConfig
    from .variants import VARIANTS, DiTConfig


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flux2_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
