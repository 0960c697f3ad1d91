"""Fixtures shared across test files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flux2_core.demo_models import write_demo_models

# Test models are tiny: torch's intra-op thread pool only adds synchronisation, and on a busy machine with
# few cores a second spinning thread makes small matmuls over 10x slower. One thread for the whole session.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ComfyUI models folder holding the tiny demo models (`flux2 demo-models`), written once per session."""
    directory = tmp_path_factory.mktemp("demo_models")
    write_demo_models(directory)
    return directory
