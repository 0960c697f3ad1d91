"""The templates dialog offers only what this host can run.

The frontend reads its template list from `/templates/index.json` (or `index.<locale>.json`): categories, each
with `templates` named after their workflow files. The templates package holds hundreds (video, audio, 3D, API
models); this host runs a template when it provides every node type the workflow uses, subgraphs included.
The index is served with the others left out, and categories left empty are dropped.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

from .workflow import NOTE_TYPES, PRIMITIVE_TYPE, REROUTE_TYPE

log = logging.getLogger(__name__)

# Node types the frontend resolves itself: they never reach the server.
FRONTEND_ONLY_TYPES = NOTE_TYPES | {REROUTE_TYPE, PRIMITIVE_TYPE}
INDEX_FILE = re.compile(r"index(\.[A-Za-z-]+)?\.json")


def workflow_node_types(workflow: dict) -> set[str]:
    """The node types a UI workflow needs from the server: its nodes and its subgraphs' nodes, less subgraph
    instances (typed by their subgraph's id) and frontend-only nodes."""
    subgraphs = workflow.get("definitions", {}).get("subgraphs", []) or []
    nodes = [*workflow.get("nodes", []), *(node for subgraph in subgraphs for node in subgraph.get("nodes", []))]
    subgraph_ids = {subgraph.get("id") for subgraph in subgraphs}
    return {node.get("type") for node in nodes} - subgraph_ids - FRONTEND_ONLY_TYPES


def runnable_templates(template_dirs: Iterable[Path], node_types: Iterable[str]) -> set[str]:
    """Names (file stems) of the template workflows whose node types are all in `node_types`."""
    available = set(node_types)
    runnable = set()
    for directory in template_dirs:
        for path in directory.glob("*.json"):
            if path.name.startswith("index"):
                continue
            try:
                workflow = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.debug("template %s unreadable: %s", path, exc)
                continue
            if isinstance(workflow, dict) and workflow_node_types(workflow) <= available:
                runnable.add(path.stem)
    return runnable


def filter_index(index: object, runnable: set[str]) -> object:
    """A template index with only the runnable templates; anything that is not a list of categories with a
    `templates` list is returned unchanged."""
    if not isinstance(index, list) or not all(isinstance(c, dict) and isinstance(c.get("templates"), list)
                                              for c in index):
        return index
    kept = []
    for category in index:
        templates = [t for t in category["templates"] if isinstance(t, dict) and t.get("name") in runnable]
        if templates:
            kept.append({**category, "templates": templates})
    return kept
