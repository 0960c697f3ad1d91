"""Which node classes the host knows, and their `/object_info` entries.

`NodeRegistry.default()` holds the host's own packs; `flux2_host.custom_packs` adds third-party packs from
`custom_nodes/` folders, with their web directories.

Node packs are ComfyUI V1 packs: a mapping `{node_id: class}` plus optional display names. Ids are
first come, first served: like ComfyUI, a later pack cannot replace a node id an earlier one registered,
so custom nodes never shadow the core set.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

log = logging.getLogger(__name__)

# The packs `NodeRegistry.default()` loads, in order: (importable module, python_module reported to the UI).
# "nodes" and "custom_nodes.<name>" are what ComfyUI reports for its core and for a custom pack; the
# frontend groups its node library by them.
DEFAULT_PACKS = (
    ("flux2_host.core_nodes", "nodes"),
    ("custom_nodes_flux2", "custom_nodes.flux2"),
)


class NodeRegistry:
    """Node classes by node id, plus what the frontend needs to draw them."""

    def __init__(self) -> None:
        self.classes: dict[str, type] = {}
        self.display_names: dict[str, str] = {}
        self.python_modules: dict[str, str] = {}
        self.web_directories: dict[str, str] = {}  # pack name -> its WEB_DIRECTORY (custom_packs.py)

    def add_pack(self, mappings: dict, display_names: dict | None, python_module: str) -> None:
        """Register every class of a pack; ids already taken keep their first owner (logged as a warning)."""
        for node_id, node_class in mappings.items():
            if node_id in self.classes:
                log.warning("node %r from %s ignored: already provided by %s",
                            node_id, python_module, self.python_modules[node_id])
                continue
            self.classes[node_id] = node_class
            self.python_modules[node_id] = python_module
            if display_names and node_id in display_names:
                self.display_names[node_id] = display_names[node_id]

    @classmethod
    def default(cls) -> "NodeRegistry":
        """The host's core nodes, then our FLUX.2 pack. A pack that fails to import is logged and skipped."""
        registry = cls()
        for module_name, python_module in DEFAULT_PACKS:
            try:
                module = importlib.import_module(module_name)
            except Exception:
                log.exception("could not import node pack %s; its nodes are unavailable", module_name)
                continue
            registry.add_pack(getattr(module, "NODE_CLASS_MAPPINGS", {}),
                              getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None), python_module)
        return registry

    def is_output_node(self, class_type: str) -> bool:
        return getattr(self.classes.get(class_type), "OUTPUT_NODE", False) is True

    def object_info(self) -> dict:
        """`GET /object_info`: every node's entry. A node whose INPUT_TYPES fails is logged and left out."""
        info = {}
        for class_type in self.classes:
            try:
                info[class_type] = self.object_info_for(class_type)
            except Exception:
                log.exception("object_info for node %r failed; node hidden from the UI", class_type)
        return info

    def object_info_for(self, class_type: str) -> dict:
        """`GET /object_info/{node}`. INPUT_TYPES is called now, so combo lists of files are current."""
        node_class = self.classes.get(class_type)
        if node_class is None:
            raise KeyError(f"unknown node type {class_type!r}")
        input_types = node_class.INPUT_TYPES()
        return_types = tuple(node_class.RETURN_TYPES)
        return {
            "input": _json_safe(input_types),
            "input_order": {category: list(inputs) for category, inputs in input_types.items()},
            "is_input_list": getattr(node_class, "INPUT_IS_LIST", False),
            "output": _json_safe(list(return_types)),
            "output_is_list": list(getattr(node_class, "OUTPUT_IS_LIST", [False] * len(return_types))),
            "output_name": list(getattr(node_class, "RETURN_NAMES", return_types)),
            "output_tooltips": list(getattr(node_class, "OUTPUT_TOOLTIPS", [])),
            "name": class_type,
            "display_name": self.display_names.get(class_type, class_type),
            "description": getattr(node_class, "DESCRIPTION", ""),
            "python_module": self.python_modules.get(class_type, "nodes"),
            # ComfyUI's fallback category; an empty one would hide the node from the library.
            "category": getattr(node_class, "CATEGORY", "sd") or "sd",
            "output_node": getattr(node_class, "OUTPUT_NODE", False) is True,
            "deprecated": bool(getattr(node_class, "DEPRECATED", False)),
            "experimental": bool(getattr(node_class, "EXPERIMENTAL", False)),
        }


def _json_safe(value: Any) -> Any:
    """Tuples become lists so the entry compares equal to what a JSON round trip gives."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value
