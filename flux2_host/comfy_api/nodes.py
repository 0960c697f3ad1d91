"""Stand-in for ComfyUI's `nodes` module: MAX_RESOLUTION, the node registry, and the host's core node classes
by name (so a pack can subclass `nodes.PreviewImage` or look up `nodes.NODE_CLASS_MAPPINGS["VAEDecode"]`), and
`nodes.node_helpers`, the module ComfyUI's nodes.py imports and some packs reach through it."""

from __future__ import annotations

from ..core_nodes.latent import MAX_RESOLUTION
from ..registry import NodeRegistry
from . import STAND_IN_MARK, ComfyInternalsMissing, node_helpers

globals()[STAND_IN_MARK] = True

# ComfyUI's module-level registry, bound to the host's registry by `bind` before packs are imported.
NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
EXTENSION_WEB_DIRS: dict[str, str] = {}
# The host's core node classes by id; filled by `bind`, shared with the comfy_extras stand-in.
core_classes: dict[str, type] = {}


def bind(registry: NodeRegistry) -> None:
    """Make this module's mappings the registry's own dicts, so they show every pack loaded after."""
    global NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, EXTENSION_WEB_DIRS
    NODE_CLASS_MAPPINGS = registry.classes
    NODE_DISPLAY_NAME_MAPPINGS = registry.display_names
    EXTENSION_WEB_DIRS = registry.web_directories
    core_classes.clear()
    core_classes.update({node_id: node_class for node_id, node_class in registry.classes.items()
                  if registry.python_modules.get(node_id) == "nodes"})


def __getattr__(name: str):
    if name in core_classes:  # ComfyUI's core node classes are attributes of `nodes`, named like their ids
        return core_classes[name]
    if name.startswith("__"):
        raise AttributeError(f"module 'nodes' has no attribute {name!r}")
    raise ComfyInternalsMissing(f"nodes.{name}")


__all__ = ["MAX_RESOLUTION", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "EXTENSION_WEB_DIRS", "bind",
           "node_helpers"]
