"""The parts of ComfyUI's Python API that node packs use without reaching into ComfyUI's model internals.

A ComfyUI V1 node pack imports ComfyUI's own modules by their top-level names. When ComfyUI is not installed,
`install()` answers those imports with this package's modules:

    comfy.utils             -> utils.py             (ProgressBar, common_upscale, load/save_torch_file, ...)
    comfy.model_management  -> model_management.py  (devices, memory, interrupt)
    comfy.samplers          -> samplers.py          (sampler and scheduler names)
    comfy.comfy_types       -> comfy_types.py       (IO type names, ComfyNodeABC, InputTypeDict; also .node_typing)
    comfy_extras.nodes_*    -> extras.py            (the host's core node classes, by ComfyUI's module)
    server                  -> server.py            (PromptServer.instance: routes, send_sync)
    node_helpers            -> node_helpers.py      (pillow, conditioning_set_values, ...)
    nodes                   -> nodes.py             (MAX_RESOLUTION, the registry, core node classes)
    execution               -> an empty module      (packs import it; anything asked of it is ComfyUI's executor)
    folder_paths            -> flux2_host.folders   (also installed by the host at start)

Everything else of ComfyUI (comfy.sd, comfy.samplers, comfy.model_patcher, ...) is its model and
execution machinery, which this host replaces with flux2_core: importing it fails with `ModuleNotFoundError`,
and a missing name of a provided module raises `ComfyInternalsMissing`, both naming what was asked for.
"""

from __future__ import annotations

import importlib.util
import sys
import types

# Top-level modules of a ComfyUI checkout. A pack that imports one we do not provide needs ComfyUI itself.
COMFYUI_MODULES = frozenset({
    "comfy", "comfy_extras", "comfy_execution", "comfy_api", "comfy_api_nodes", "comfy_config", "nodes",
    "execution", "latent_preview", "server", "node_helpers", "folder_paths", "comfyui_version", "app",
    "protocol",
})

# ComfyUI module name -> the module of this package that stands in for it.
STAND_INS = {"comfy.utils": "utils", "comfy.model_management": "model_management", "comfy.samplers": "samplers",
             "comfy.comfy_types": "comfy_types", "comfy.comfy_types.node_typing": "comfy_types", "server": "server",
             "node_helpers": "node_helpers", "nodes": "nodes"}

# Set on the stand-in `comfy` package and its modules, so code that behaves differently inside a real
# ComfyUI (custom_nodes_flux2.comfy_bridge) can tell the two apart.
STAND_IN_MARK = "FLUX2_HOST_STAND_IN"


class ComfyInternalsMissing(AttributeError):
    """A pack asked a stand-in module for a name that belongs to ComfyUI's internals."""

    def __init__(self, qualified_name: str) -> None:
        super().__init__(f"{qualified_name} is part of ComfyUI's internals, which the flux2 host does not "
                         "provide: run this node pack in ComfyUI (with the FLUX.2 pack, custom_nodes_flux2)")
        self.qualified_name = qualified_name


def missing_name(module_name: str):
    """A module-level `__getattr__` that names the missing ComfyUI function instead of a bare AttributeError."""

    def __getattr__(name: str):
        if name.startswith("__"):  # import machinery and introspection probe dunders; answer as usual
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        raise ComfyInternalsMissing(f"{module_name}.{name}")

    return __getattr__


def comfyui_present() -> bool:
    """Whether a real ComfyUI is importable (then its modules serve the packs, not ours)."""
    existing = sys.modules.get("comfy")
    if existing is not None:
        return not getattr(existing, STAND_IN_MARK, False)
    return importlib.util.find_spec("comfy") is not None


def install() -> bool:
    """Answer ComfyUI's module names with this package's modules, unless ComfyUI is importable; True when the
    stand-ins are (now or already) in place."""
    if comfyui_present():
        return False
    if "comfy" in sys.modules:
        return True
    from .. import folders
    from . import comfy_types, extras, model_management, nodes, samplers, server, utils

    folders.install_as_folder_paths()

    comfy = types.ModuleType("comfy", "Stand-in for ComfyUI's `comfy` package (flux2 host): only utils, "
                                      "model_management, samplers and comfy_types exist.")
    comfy.__path__ = []  # a package with nothing else in it: `import comfy.sd` fails with its own name
    setattr(comfy, STAND_IN_MARK, True)
    comfy.utils = utils
    comfy.model_management = model_management
    comfy.samplers = samplers
    comfy.comfy_types = comfy_types
    comfy_types.node_typing = comfy_types  # ComfyUI's package re-exports its node_typing module's names
    sys.modules["comfy"] = comfy
    sys.modules.update({comfy_name: importlib.import_module(f"{__name__}.{ours}")
                        for comfy_name, ours in STAND_INS.items()})
    sys.modules["execution"] = names_only_module("execution")
    extras.install(nodes.core_classes)
    server.PromptServer.instance = server.PromptServer()
    return True


def names_only_module(module_name: str) -> types.ModuleType:
    """A ComfyUI module packs import without using it at import time: every name asked of it later is missing."""
    module = types.ModuleType(module_name, f"Stand-in for ComfyUI's {module_name} (flux2 host): empty.")
    setattr(module, STAND_IN_MARK, True)
    module.__getattr__ = missing_name(module_name)
    return module


def comfyui_name(module_name: str) -> str | None:
    """The ComfyUI module name a stand-in module answers for ('flux2_host.comfy_api.utils' -> 'comfy.utils')."""
    return next((comfy_name for comfy_name, ours in STAND_INS.items() if module_name == f"{__name__}.{ours}"),
                None)
