"""The graph the canvas opens with: FLUX.2 text to image on model files that are in models/.

The web frontend opens its built-in default graph (an SD checkpoint, KSampler, EmptySD3LatentImage, ...) when it
has nothing else to show: on every visit of a user whose tutorial is done and who has no open workflow, and on
"Load Default". This host cannot run that graph. Two parts replace it:
- `serve` marks the tutorial done for a new user (`FIRST_VISIT_SETTINGS`), so a first visit does not open a
  blank canvas under the template browser but the default graph, like every later visit;
- the canvas extension `web/default_graph.js` (listed by `/extensions`) swaps the built-in default graph,
  before the frontend configures it, for `default_workflow()` from `GET /flux2/default_workflow`.

The workflow uses the FLUX.2 pack's nodes with the variant defaults (Flux2Sampler's 0 = the variant's steps,
guidance and cfg), so one graph fits every variant. Its loaders name a DiT, a text encoder of the DiT's family
whose prompt width is the DiT's context width, and a VAE, all read from headers only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flux2_core.checkpoints.detect import inspect_checkpoint
from flux2_core.errors import CheckpointError

from . import folders

log = logging.getLogger(__name__)

WEB_DIRECTORY = Path(__file__).parent / "web"
EXTENSION_URL = "/extensions/flux2/default_graph.js"
FIRST_VISIT_SETTINGS = {"Comfy.TutorialCompleted": True}

# Which variant the graph prefers when several are there: the fastest first.
PREFERRED_VARIANTS = ("klein-4b", "klein-9b", "klein-9b-kv", "klein-base-4b", "klein-base-9b", "flux2-dev")
PREFERRED_VAES = ("flux2-vae.safetensors", "ae.safetensors")
PROMPT = ("A red fox curled up asleep in fresh snow at dawn, soft golden light, shallow depth of field, "
          "wildlife photography")


@dataclass(frozen=True)
class DefaultModels:
    """Combo entries of the three loaders."""
    dit: str
    text_encoder: str
    vae: str


# What the graph names when models/ has nothing that fits: the klein 4B files of the official templates, so the
# frontend's missing-model check names what to download.
TEMPLATE_MODELS = DefaultModels("flux-2-klein-4b.safetensors", "qwen_3_4b.safetensors", "flux2-vae.safetensors")


def _described(kind: str, name: str):
    try:
        return inspect_checkpoint(folders.get_full_path(kind, name))
    except (CheckpointError, OSError) as exc:
        log.debug("default graph: %s/%s skipped: %s", kind, name, exc)
        return None


def choose_models() -> DefaultModels | None:
    """A DiT, a text encoder and a VAE from the model folders that run together, or None."""
    from flux2_core.text_encoder_files import text_encoder_output_dim
    from flux2_core.variants import VARIANTS

    dits = []
    for name in folders.get_filename_list("diffusion_models"):
        info = _described("diffusion_models", name)
        if info is not None and info.kind == "dit" and info.variant in PREFERRED_VARIANTS:
            dits.append((PREFERRED_VARIANTS.index(info.variant), name, info))
    encoders = []
    for name in folders.get_filename_list("text_encoders"):
        info = _described("text_encoders", name)
        if info is not None and info.kind == "text_encoder":
            encoders.append((name, info.family, text_encoder_output_dim(folders.get_full_path("text_encoders", name))))
    vaes = [name for name in folders.get_filename_list("vae")
            if (info := _described("vae", name)) is not None and info.kind == "vae"]
    vaes.sort(key=lambda name: (name not in PREFERRED_VAES, name))
    if not vaes:
        return None
    for _, dit, info in sorted(dits):
        family = "mistral3" if VARIANTS[info.variant].family == "dev" else "qwen3"
        fitting = [name for name, encoder_family, width in encoders
                   if encoder_family.startswith(family) and width == info.details["context_dim"]]
        if fitting:
            return DefaultModels(dit, fitting[0], vaes[0])
    return None


# (node type, widget values, position); then links (from node index, output slot, to node index, input name).
_NODES = (
    ("Flux2LoadModel", lambda m: [m.dit, "default"], (0, 0)),
    ("Flux2LoadTextEncoder", lambda m: [m.text_encoder], (0, 180)),
    ("Flux2LoadVAE", lambda m: [m.vae], (0, 320)),
    ("Flux2TextEncode", lambda m: [PROMPT], (380, 0)),
    ("Flux2EmptyLatent", lambda m: [1024, 1024, 1], (380, 260)),
    ("Flux2Sampler", lambda m: [0, "randomize", 0, 0.0, 0.0, 1.0, "euler"], (820, 0)),
    ("Flux2VAEDecode", lambda m: [], (1180, 0)),
    ("SaveImage", lambda m: ["flux2"], (1180, 120)),
)
_LINKS = ((1, 0, 3, "text_encoder"), (0, 0, 5, "model"), (3, 0, 5, "positive"), (4, 0, 5, "latent"),
          (5, 0, 6, "latent"), (2, 0, 6, "vae"), (6, 0, 7, "images"))
_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def default_workflow(registry, models: DefaultModels | None = None) -> dict:
    """The UI workflow (format 0.4) the canvas opens with; sockets come from the nodes' own definitions."""
    models = models or choose_models() or TEMPLATE_MODELS
    nodes = []
    for index, (class_type, widgets, position) in enumerate(_NODES):
        info = registry.object_info_for(class_type)
        sockets = [(name, spec[0]) for section in ("required", "optional")
                   for name, spec in info["input"].get(section, {}).items()
                   if isinstance(spec[0], str) and spec[0] not in _WIDGET_TYPES]
        nodes.append({
            "id": index + 1, "type": class_type, "pos": list(position), "flags": {}, "order": index, "mode": 0,
            "inputs": [{"name": name, "type": socket_type, "link": None} for name, socket_type in sockets],
            "outputs": [{"name": name, "type": output_type, "links": [], "slot_index": slot}
                        for slot, (name, output_type) in enumerate(zip(info["output_name"], info["output"]))],
            "properties": {"Node name for S&R": class_type}, "widgets_values": widgets(models),
        })
    links = []
    for link_id, (source, slot, target, input_name) in enumerate(_LINKS, start=1):
        [target_slot] = [i for i, item in enumerate(nodes[target]["inputs"]) if item["name"] == input_name]
        link_type = nodes[source]["outputs"][slot]["type"]
        nodes[source]["outputs"][slot]["links"].append(link_id)
        nodes[target]["inputs"][target_slot]["link"] = link_id
        links.append([link_id, source + 1, slot, target + 1, target_slot, link_type])
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [80, 120]}}, "version": 0.4}
