"""Third-party ComfyUI V1 node packs from `custom_nodes/` folders, loaded the way ComfyUI loads them.

Each entry of a custom-nodes folder (sorted by name) is one pack: a folder with an `__init__.py`, or a
single `.py` file. Entries ending in `.disabled`, hidden ones and `__pycache__` are skipped, as are files that
are not `.py`. A pack is imported by file location under a module name of its own (so its relative
imports work); its `NODE_CLASS_MAPPINGS` and `NODE_DISPLAY_NAME_MAPPINGS` join the registry, reported to the
canvas as python_module `custom_nodes.<pack>`; its `WEB_DIRECTORY`, when that folder exists, is served at
`/extensions/<pack>/` and its scripts are listed by `GET /extensions` (see `extension_scripts`).

Before the first pack is imported, the host's stand-ins for ComfyUI's Python API are installed
(`flux2_host.comfy_api`), unless ComfyUI itself is importable. A pack that fails to import is reported in
one log line naming it and the error, and skipped: the host keeps running. A pack that needs ComfyUI's
model internals gets a line saying so and advising to run it in ComfyUI.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import re
import sys
import urllib.parse
from dataclasses import dataclass, field

from . import comfy_api
from .registry import NodeRegistry

log = logging.getLogger("flux2.custom_nodes")


@dataclass
class PackResult:
    """What loading one pack gave: its node ids, or the one-line reason it was not loaded."""
    name: str
    path: str
    nodes: list[str] = field(default_factory=list)
    error: str | None = None


def pack_candidates(root: str) -> list[str]:
    """The entries of a custom-nodes folder that ComfyUI would try to import, in name order."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    candidates = []
    for name in names:
        path = os.path.join(root, name)
        if name == "__pycache__" or name.startswith(".") or name.endswith(".disabled"):
            continue
        if os.path.isfile(path) and not name.endswith(".py"):
            continue
        candidates.append(path)
    return candidates


def load_custom_packs(registry: NodeRegistry, roots: list[str]) -> list[PackResult]:
    """Import every pack under `roots` into `registry`; one result per pack tried."""
    candidates = [path for root in roots for path in pack_candidates(root)]
    if candidates and comfy_api.install():
        comfy_api.nodes.bind(registry)
    elif candidates:
        log.info("ComfyUI is importable: node packs use its Python API, not the host's stand-ins")
    results = [load_pack(registry, path) for path in candidates]
    for result in results:
        if result.error is None:
            log.info("node pack %s: %d node(s) from %s", result.name, len(result.nodes), result.path)
        else:
            log.error("%s", result.error)
    return results


def load_pack(registry: NodeRegistry, path: str) -> PackResult:
    """Import one pack (a folder or a .py file) and register what it exports."""
    is_file = os.path.isfile(path)
    name = os.path.splitext(os.path.basename(path))[0] if is_file else os.path.basename(path)
    result = PackResult(name, path)
    try:
        module = _import_pack(path, is_file)
    except BaseException as exc:  # a pack calling sys.exit() must not take the host down either
        if isinstance(exc, KeyboardInterrupt):
            raise
        log.debug("import of node pack %s failed", path, exc_info=True)
        result.error = describe_import_failure(name, exc)
        return result
    mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
    if not isinstance(mappings, dict):
        result.error = (f"node pack {name!r} not loaded: it has no NODE_CLASS_MAPPINGS (only ComfyUI V1 packs "
                        f"run in the host), found {type(mappings).__name__} in {path}")
        return result
    registry.add_pack(mappings, getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None), f"custom_nodes.{name}")
    result.nodes = [node_id for node_id in mappings if registry.python_modules.get(node_id) == f"custom_nodes.{name}"]
    web_directory = getattr(module, "WEB_DIRECTORY", None)
    if web_directory is not None:
        directory = os.path.abspath(os.path.join(path if not is_file else os.path.dirname(path), web_directory))
        if os.path.isdir(directory):
            registry.web_directories[name] = directory
    return result


def _import_pack(path: str, is_file: bool):
    # ComfyUI's module names: a folder's path with '.' spelled '_x_' (dots would read as submodules), a
    # file's path without '.py'. Unique per location, so two packs never share a module.
    module_name = os.path.splitext(path)[0] if is_file else path.replace(".", "_x_")
    location = path if is_file else os.path.join(path, "__init__.py")
    if not os.path.isfile(location):
        raise ImportError(f"no __init__.py in {path}")
    spec = importlib.util.spec_from_file_location(module_name, location)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def describe_import_failure(name: str, exc: BaseException) -> str:
    """One line naming the pack and why it did not load."""
    internal = _comfyui_internal_asked_for(exc)
    if internal is not None:
        return (f"node pack {name!r} not loaded: it needs ComfyUI's internals ({internal}), which the flux2 "
                "host does not provide; run it in ComfyUI, with the FLUX.2 pack (custom_nodes_flux2) installed "
                "there")
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"node pack {name!r} not loaded: {type(exc).__name__}" + (f": {message}" if message else "")


def _comfyui_internal_asked_for(exc: BaseException) -> str | None:
    """The ComfyUI module or name the failure is about, if it is one."""
    if isinstance(exc, comfy_api.ComfyInternalsMissing):
        return exc.qualified_name
    if not isinstance(exc, ImportError) or not exc.name:
        return None
    module = comfy_api.comfyui_name(exc.name) or exc.name
    if module.split(".")[0] not in comfy_api.COMFYUI_MODULES:
        return None
    missing = re.search(r"cannot import name '([^']+)'", str(exc))  # `from comfy.utils import x`: say which x
    return f"{module}.{missing.group(1)}" if missing else module


def extension_scripts(web_directories: dict[str, str]) -> list[str]:
    """The URLs of every script in the packs' web directories, as ComfyUI's `GET /extensions` lists them."""
    urls = []
    for name, directory in web_directories.items():
        for script in sorted(glob.glob(os.path.join(glob.escape(directory), "**", "*.js"), recursive=True)):
            relative = os.path.relpath(script, directory).replace(os.sep, "/")
            urls.append(f"/extensions/{urllib.parse.quote(name)}/{relative}")
    return urls
