"""FLUX.2 nodes for ComfyUI, on the flux2_core engine.

ComfyUI imports this folder by file location (custom_nodes/<folder>/__init__.py), so everything inside uses
relative imports; the engine itself is the installed `flux2_core` package.
"""

import importlib.util
import os
import sys


def _make_engine_importable() -> None:
    if importlib.util.find_spec("flux2_core") is not None:
        return
    # Linked or copied straight out of a checkout of this project: the engine sits next to this folder.
    checkout = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    if os.path.isfile(os.path.join(checkout, "flux2_core", "__init__.py")):
        sys.path.append(checkout)
        return
    raise ImportError(
        "FLUX.2 nodes: the engine package 'flux2_core' is not installed in the Python that runs ComfyUI "
        f"({sys.executable}). Install this project into it, e.g. `{sys.executable} -m pip install "
        "/path/to/flux2` (the folder with pyproject.toml), then restart ComfyUI.")


_make_engine_importable()

# Only now is the engine importable, hence the late import.
from . import conditioning, latent, loaders, sampling, speed, training  # noqa: E402

_MODULES = (loaders, conditioning, latent, sampling, speed, training)

NODE_CLASS_MAPPINGS = {name: cls for module in _MODULES for name, cls in module.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {
    name: title for module in _MODULES for name, title in module.NODE_DISPLAY_NAME_MAPPINGS.items()}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
