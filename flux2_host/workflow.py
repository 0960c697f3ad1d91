"""Workflow files -> the API prompt the executor runs; one converter for the CLI and the server.

Two formats exist (reference: comfyui-compat.md section 6):

- API format, `{node_id: {"class_type", "inputs", "_meta"}}`, is what `POST /prompt` takes; it passes through.
- UI format (`version` 0.4 with links as arrays, or 1 with link objects) is what the canvas saves and what
  shared workflows and the official templates are. It is flattened the way the web frontend does before it
  queues a prompt: subgraph instances are expanded into their inner nodes (API ids `instance:inner`, nested
  as `a:b:c`), bypassed nodes pass each output through a matching input, muted nodes drop out (an input
  they fed counts as unconnected), Reroutes are followed, PrimitiveNode values are copied into their
  targets, KJNodes' SetNode / GetNode pairs are followed (see `_find_setter`), each node's positional
  `widgets_values` are matched to its widget inputs using the node definitions, and a subgraph instance's
  values reach the inner widgets it shows, through its promoted inputs and its `properties.proxyWidgets`
  (see `_promoted_values`). The result equals what the 1.58 frontend queues, with one deliberate
  difference: a muted or bypassed subgraph instance leaves its content out at any depth, where the frontend
  only does so for instances in the root graph. (API ids can differ too: 1.58 renumbers an inner node whose
  id the root graph or another subgraph definition also uses, "duplicate subgraph node ID 131 remapped to
  561"; we keep the saved ids, which are unique once prefixed with the instance path.)

Both formats then get one fix the frontend does not make: a model name saved on Windows
(`flux.2\\model.safetensors`) becomes the entry the node's combo lists (`flux.2/model.safetensors`).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import folders
from .registry import NodeRegistry

log = logging.getLogger(__name__)

MODE_MUTED = 2
MODE_BYPASSED = 4
SUBGRAPH_INPUT_NODE = "-10"
NOTE_TYPES = {"Note", "MarkdownNote"}
REROUTE_TYPE = "Reroute"
PRIMITIVE_TYPE = "PrimitiveNode"
# KJNodes' frontend-only pair: a SetNode stores what feeds its input under a name (its widget value), a
# GetNode with the same name hands it on. Neither reaches the server.
SET_TYPE, GET_TYPE = "SetNode", "GetNode"
UI_ONLY_TYPES = NOTE_TYPES | {REROUTE_TYPE, PRIMITIVE_TYPE, SET_TYPE, GET_TYPE}  # never sent to the server

# Input types the frontend draws as widgets (a combo may also be declared as a list of choices).
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# INT inputs with these names get a control_after_generate value even when the definition does not ask.
SEED_INPUT_NAMES = {"seed", "noise_seed"}
# Combo options that add an upload button widget right after the combo; its value is saved too.
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload")


class WorkflowError(ValueError):
    """A workflow file that cannot be turned into an API prompt."""


# ---------------------------------------------------------------------------------------------------------------
# Public API


def is_api_prompt(data: Any) -> bool:
    """True for `{node_id: {"class_type": ..., "inputs": ...}}`."""
    return (isinstance(data, dict) and bool(data) and "nodes" not in data
            and all(isinstance(node, dict) and ("class_type" in node or "inputs" in node) for node in data.values()))


def to_api_prompt(workflow: dict, registry: NodeRegistry) -> dict:
    """An API prompt, or a UI workflow (0.4 / 1, subgraphs included) flattened into one; model names with
    Windows separators matched to the combo entries either way."""
    if is_api_prompt(workflow):
        return match_windows_model_names(workflow, registry)
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        raise WorkflowError("not a ComfyUI workflow: expected an API prompt {id: {class_type, inputs}} "
                            f"or a UI workflow with a 'nodes' list, found keys {sorted(workflow)[:8]}"
                            if isinstance(workflow, dict) else
                            f"not a ComfyUI workflow: expected a JSON object, found {type(workflow).__name__}")
    return match_windows_model_names(_Flattener(workflow, registry).flatten(), registry)


def match_windows_model_names(prompt: dict, registry: NodeRegistry) -> dict:
    """`prompt`, or a copy where each combo value holding a backslash that its combo does not list is replaced
    by the entry it names (`folders.match_listed_name`): workflows saved on Windows name model files with
    backslashes, our combos list them with '/'."""
    replaced: dict[tuple[str, str], str] = {}
    for node_id, node in prompt.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict) or not isinstance(node.get("class_type"), str):
            continue  # validation reports a malformed node
        node_class = registry.classes.get(node["class_type"])
        windows_names = {name: value for name, value in inputs.items() if isinstance(value, str) and "\\" in value}
        if node_class is None or not windows_names:
            continue
        try:
            input_types = node_class.INPUT_TYPES()
        except Exception:  # validation reports a broken node definition with its details
            continue
        for name, value in windows_names.items():
            choices = _combo_choices(input_types, name)
            match = folders.match_listed_name(value, choices) if choices and value not in choices else None
            if match is not None:
                replaced[(node_id, name)] = match
    if not replaced:
        return prompt
    result = copy.deepcopy(prompt)
    for (node_id, name), value in replaced.items():
        result[node_id]["inputs"][name] = value
    return result


def _combo_choices(input_types: dict, name: str) -> list | None:
    for category in ("required", "optional"):
        spec = (input_types.get(category) or {}).get(name)
        if spec:
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            return spec[0] if isinstance(spec[0], list) else options.get("options") if spec[0] == "COMBO" else None
    return None


def load_workflow_file(path, registry: NodeRegistry) -> dict:
    """A workflow JSON file (API or UI format), or a PNG carrying a `prompt` / `workflow` text chunk."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        from PIL import Image

        with Image.open(path) as image:
            chunks = dict(image.info)
        # The `prompt` chunk is exactly what ran; `workflow` is the canvas graph it came from.
        text = chunks.get("prompt") or chunks.get("workflow")
        if not isinstance(text, str):
            raise WorkflowError(f"{path}: expected a PNG text chunk 'prompt' or 'workflow' (as SaveImage writes), "
                                f"found chunks {sorted(chunks)}")
        source = f"{path} (PNG text chunk)"
    else:
        text = path.read_text(encoding="utf-8")
        source = str(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"{source}: not valid JSON ({exc})") from exc
    return to_api_prompt(data, registry)


def apply_overrides(prompt: dict, assignments: list[str]) -> dict:
    """A copy of `prompt` with each "NODE_ID.INPUT=VALUE" applied; VALUE is JSON when it parses, else a string."""
    result = copy.deepcopy(prompt)
    for assignment in assignments:
        target, sep, raw_value = assignment.partition("=")
        node_id, dot, input_name = target.partition(".")
        if not sep or not dot or not node_id or not input_name:
            raise ValueError(f"override {assignment!r}: expected NODE_ID.INPUT=VALUE")
        if node_id not in result:
            raise ValueError(f"override {assignment!r}: no node {node_id!r} in the prompt "
                             f"(node ids: {', '.join(sorted(result))})")
        inputs = result[node_id].setdefault("inputs", {})
        if input_name not in inputs:
            raise ValueError(f"override {assignment!r}: node {node_id} ({result[node_id].get('class_type')}) "
                             f"has no input {input_name!r} (inputs: {', '.join(sorted(inputs))})")
        try:
            value = json.loads(raw_value)
        except json.JSONDecodeError:
            value = raw_value
        inputs[input_name] = value
    return result


# ---------------------------------------------------------------------------------------------------------------
# UI graph model


@dataclass(frozen=True)
class _Link:
    origin_id: str
    origin_slot: int
    target_id: str


@dataclass
class _Graph:
    """The root graph or one subgraph definition, with node ids as strings."""
    name: str
    nodes: dict[str, dict]
    links: dict[int, _Link]
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)

    @classmethod
    def parse(cls, data: dict, name: str) -> "_Graph":
        nodes = {str(node["id"]): node for node in data.get("nodes") or []}
        links = dict(_parse_link(raw, name) for raw in data.get("links") or [] if raw is not None)
        return cls(name, nodes, links, list(data.get("inputs") or []), list(data.get("outputs") or []))


def _parse_link(raw: Any, graph_name: str) -> tuple[int, _Link]:
    """(link id, link) from `[id, origin_id, origin_slot, target_id, target_slot, type]` or a link object."""
    if isinstance(raw, dict):
        fields = (raw.get("id"), raw.get("origin_id"), raw.get("origin_slot"), raw.get("target_id"))
    elif isinstance(raw, (list, tuple)) and len(raw) >= 6:
        fields = tuple(raw[:4])
    else:
        fields = (None,)
    try:
        link_id, origin_id, origin_slot, target_id = fields
        return int(link_id), _Link(str(origin_id), int(origin_slot), str(target_id))
    except (TypeError, ValueError):
        raise WorkflowError(f"{graph_name}: malformed link {raw!r}: expected [id, origin_id, origin_slot, "
                            "target_id, target_slot, type] or an object with those keys") from None


@dataclass
class _Scope:
    """One graph as seen from one place: the root, or a subgraph inside a chain of instances."""
    graph: _Graph
    path: tuple[str, ...]
    instance: dict | None = None
    parent: "_Scope | None" = None

    def api_id(self, node_id: str) -> str:
        return ":".join(self.path + (node_id,))

    def describe(self, node: dict) -> str:
        return f"node {self.api_id(str(node['id']))} ({node.get('type')})"


@dataclass(frozen=True)
class _Output:
    """An input resolved to a real node's output."""
    api_id: str
    slot: int


@dataclass(frozen=True)
class _Value:
    """An input resolved to a literal (a PrimitiveNode or a subgraph instance's widget)."""
    value: Any


@dataclass(frozen=True)
class _WidgetSlot:
    name: str
    has_control: bool  # a control_after_generate value ("fixed", "randomize", ...) is saved after it
    has_upload: bool  # an upload button's value is saved after it
    default: Any

    @property
    def saved_values(self) -> int:
        return 1 + int(self.has_control) + int(self.has_upload)


@dataclass(frozen=True)
class _WidgetFeed:
    """An inner widget a subgraph input feeds (so the instance shows it)."""
    node_id: str
    widget: str
    value: Any  # the inner node's own value
    has_control: bool  # a control_after_generate value is saved after it


def _proxy_widget_entries(instance: dict) -> list[tuple[str, str]]:
    """`properties.proxyWidgets` as (inner node id, widget name) pairs: a list, or its JSON text, of
    [id, name] or [id, name, disambiguating id] strings. Anything else is ignored whole, as the frontend
    does."""
    raw = (instance.get("properties") or {}).get("proxyWidgets")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return []
    if not isinstance(raw, list) or not all(isinstance(entry, list) and len(entry) in (2, 3)
                                            and all(isinstance(part, str) for part in entry) for entry in raw):
        return []
    return [(entry[0], entry[1]) for entry in raw]


def _strip_legacy_prefixes(widget: str) -> tuple[str, str] | None:
    """(widget name, id of the innermost node) from a name like "12: 6: text", the form older frontends
    gave widgets promoted from nested subgraphs; None for a name without such prefixes."""
    innermost = None
    while (match := re.match(r"^\s*(\d+)\s*:\s*(.+)$", widget)) is not None:
        innermost, widget = match.group(1), match.group(2)
    return None if innermost is None else (widget, innermost)


def _types_connect(a: Any, b: Any) -> bool:
    """The canvas's rule: empty or "*" matches anything; comma lists match when they share a type."""
    if a in ("", "*", None, 0) or b in ("", "*", None, 0) or a == b:
        return True
    set_a = {t.strip() for t in str(a).lower().split(",")}
    set_b = {t.strip() for t in str(b).lower().split(",")}
    return bool(set_a & set_b)


def _api_literal(value: Any) -> Any:
    # A bare 2-list means a link in API prompts, so list literals travel wrapped.
    return {"__value__": value} if isinstance(value, list) else value


# ---------------------------------------------------------------------------------------------------------------
# Flattening


class _Flattener:
    def __init__(self, workflow: dict, registry: NodeRegistry) -> None:
        self.registry = registry
        self.root = _Graph.parse(workflow, "workflow")
        self.subgraphs: dict[str, _Graph] = {}
        self._collect_subgraphs(workflow)
        self.prompt: dict[str, dict] = {}
        self._layouts: dict[str, list[_WidgetSlot] | None] = {}
        self._scopes: dict[tuple[str, ...], _Scope] = {}
        self._feeds: dict[tuple[str, ...], dict[str, _WidgetFeed]] = {}
        self._promoted: dict[tuple[str, ...], dict[str, Any]] = {}
        self._proxied: dict[tuple[str, ...], dict[tuple[str, str], Any]] = {}

    def _collect_subgraphs(self, container: dict) -> None:
        for definition in (container.get("definitions") or {}).get("subgraphs") or []:
            subgraph_id = str(definition["id"])
            name = f"subgraph {definition.get('name', subgraph_id)!r}"
            self.subgraphs[subgraph_id] = _Graph.parse(definition, name)
            self._collect_subgraphs(definition)

    def flatten(self) -> dict:
        self._emit_graph(_Scope(self.root, ()))
        return self.prompt

    # -- emitting nodes ------------------------------------------------------------------------------------

    def _emit_graph(self, scope: _Scope) -> None:
        for node in scope.graph.nodes.values():
            if node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
                continue  # a muted or bypassed subgraph instance takes its whole content with it
            if node.get("type") in self.subgraphs:
                self._emit_graph(self._child_scope(scope, node))
            elif node.get("type") not in UI_ONLY_TYPES:
                self._emit_node(scope, node)

    def _emit_node(self, scope: _Scope, node: dict) -> None:
        node_type = node.get("type")
        inputs = {name: _api_literal(value) for name, value in self._widget_values(scope, node).items()}
        for index, node_input in enumerate(node.get("inputs") or []):
            if node_input.get("link") is None:
                continue
            resolved = self._resolve_input(scope, node, index, set())
            if isinstance(resolved, _Output):
                inputs[node_input["name"]] = [resolved.api_id, resolved.slot]
            elif isinstance(resolved, _Value):
                inputs[node_input["name"]] = _api_literal(resolved.value)
        # An instance's proxy widget on this node: the frontend links it to a new subgraph input, which
        # replaces whatever fed the widget before.
        node_id = str(node["id"])
        inputs.update({name: _api_literal(value) for (target_id, name), value in self._proxied_values(scope).items()
                       if target_id == node_id})
        meta = {"title": node.get("title") or self.registry.display_names.get(node_type, node_type)}
        # The frontend also copies the node pack's registry ids and version; the executor ignores _meta.
        properties = node.get("properties") or {}
        meta.update({key: properties[key] for key in ("cnr_id", "aux_id", "ver")
                     if isinstance(properties.get(key), str) and properties[key]})
        self.prompt[scope.api_id(str(node["id"]))] = {"inputs": inputs, "class_type": node_type, "_meta": meta}

    # -- following links -----------------------------------------------------------------------------------

    def _resolve_input(self, scope: _Scope, node: dict, index: int, visited: set) -> _Output | _Value | None:
        key = (scope.path, str(node["id"]), "in", index)
        if key in visited:
            raise WorkflowError(f"{scope.describe(node)}: links loop back through input {index}")
        visited.add(key)
        node_input = (node.get("inputs") or [])[index]
        link_id = node_input.get("link")
        if link_id is None:
            return None
        link = scope.graph.links.get(int(link_id))
        if link is None:
            raise WorkflowError(f"{scope.describe(node)}: input {node_input.get('name')!r} uses link {link_id}, "
                                f"which {scope.graph.name} does not define")
        if link.origin_id == SUBGRAPH_INPUT_NODE:
            return self._resolve_subgraph_input(scope, link.origin_slot, visited)
        origin = scope.graph.nodes.get(link.origin_id)
        if origin is None:
            raise WorkflowError(f"{scope.describe(node)}: input {node_input.get('name')!r} is linked to node "
                                f"{link.origin_id}, which {scope.graph.name} does not contain")
        return self._resolve_output(scope, origin, link.origin_slot, node_input.get("type"), visited)

    def _resolve_output(self, scope: _Scope, node: dict, slot: int, wanted_type: Any,
                        visited: set) -> _Output | _Value | None:
        key = (scope.path, str(node["id"]), "out", slot)
        if key in visited:
            raise WorkflowError(f"{scope.describe(node)}: links loop back through output {slot}")
        visited.add(key)
        mode = node.get("mode", 0)
        node_type = node.get("type")
        if node_type in (SET_TYPE, GET_TYPE):
            return self._resolve_set_get(scope, node, slot, visited)
        if mode == MODE_MUTED:
            return None  # like an unconnected input: a widget input keeps its own value
        if mode == MODE_BYPASSED:
            index = _bypass_input_index(node, slot, wanted_type)
            return None if index is None else self._resolve_input(scope, node, index, visited)
        if node_type in self.subgraphs:
            return self._resolve_instance_output(self._child_scope(scope, node), slot, wanted_type, visited)
        if node_type == REROUTE_TYPE:
            return self._resolve_input(scope, node, 0, visited) if node.get("inputs") else None
        if node_type == PRIMITIVE_TYPE:
            proxied = [value for (target_id, _), value in self._proxied_values(scope).items()
                       if target_id == str(node["id"])]
            values = proxied or node.get("widgets_values") or []
            return _Value(values[0]) if values else None
        if node_type in NOTE_TYPES:
            return None
        return _Output(scope.api_id(str(node["id"])), slot)

    def _resolve_set_get(self, scope: _Scope, node: dict, slot: int, visited: set) -> _Output | _Value | None:
        """What a SetNode's pass-through output or a GetNode's output carries, as KJNodes' frontend code
        resolves it: the frontend skips virtual nodes by their input, whatever their mode; a GetNode has no
        input, so it borrows its setter's, except when bypassed with its setter in the same graph (the
        frontend's bypass then finds no input and leaves the target unconnected)."""
        if node.get("type") == SET_TYPE:
            return self._resolve_input(scope, node, slot, visited) if slot < len(node.get("inputs") or []) else None
        found = self._find_setter(scope, node)
        if found is None:
            return None
        setter_scope, setter = found
        if setter_scope is scope and node.get("mode", 0) == MODE_BYPASSED:
            return None
        return self._resolve_input(setter_scope, setter, 0, visited) if setter.get("inputs") else None

    def _find_setter(self, scope: _Scope, getter: dict) -> tuple[_Scope, dict] | None:
        """The SetNode a GetNode reads: the first one with its name in the GetNode's own graph, else the only
        one with that name in the graphs around it (the enclosing subgraphs up to the root). None when there
        is none, or several outside its graph (KJNodes then warns and connects nothing)."""
        name = _set_get_name(getter)
        if not name:
            return None
        found = []
        ancestor: _Scope | None = scope
        while ancestor is not None:
            found += [(ancestor, node) for node in ancestor.graph.nodes.values()
                      if node.get("type") == SET_TYPE and _set_get_name(node) == name]
            if found and found[0][0] is scope:
                return found[0]
            ancestor = ancestor.parent
        if len(found) > 1:
            log.warning("%s: %d SetNodes named %r around it; connecting nothing (rename the duplicates)",
                        scope.describe(getter), len(found), name)
            return None
        if not found:
            log.warning("%s: no SetNode named %r in its graph or the graphs around it; its targets stay "
                        "unconnected", scope.describe(getter), name)
        return found[0] if found else None

    def _resolve_instance_output(self, inner: _Scope, slot: int, wanted_type: Any,
                                 visited: set) -> _Output | _Value | None:
        outputs = inner.graph.outputs
        if slot >= len(outputs):
            raise WorkflowError(f"{inner.parent.describe(inner.instance)}: output {slot} does not exist; "
                                f"{inner.graph.name} has {len(outputs)} outputs")
        for link_id in outputs[slot].get("linkIds") or []:
            link = inner.graph.links.get(int(link_id))
            if link is None:
                continue
            if link.origin_id == SUBGRAPH_INPUT_NODE:
                return self._resolve_subgraph_input(inner, link.origin_slot, visited)
            origin = inner.graph.nodes.get(link.origin_id)
            if origin is not None:
                return self._resolve_output(inner, origin, link.origin_slot, wanted_type, visited)
        return None

    def _resolve_subgraph_input(self, scope: _Scope, index: int, visited: set) -> _Output | _Value | None:
        """What feeds input `index` of the subgraph `scope` is inside: the instance's link, else its widget."""
        if scope.instance is None or index >= len(scope.graph.inputs):
            return None
        name = scope.graph.inputs[index].get("name")
        proxied = self._proxied_values(scope.parent)
        if (str(scope.instance["id"]), name) in proxied:  # the enclosing instance shows this input itself
            return _Value(proxied[(str(scope.instance["id"]), name)])
        outer = _instance_input(scope.instance, name)
        if outer is not None and outer[1].get("link") is not None:
            return self._resolve_input(scope.parent, scope.instance, outer[0], visited)
        promoted = self._promoted_values(scope)
        return _Value(promoted[name]) if name in promoted else None

    # -- subgraph instances --------------------------------------------------------------------------------

    def _child_scope(self, scope: _Scope, instance: dict) -> _Scope:
        path = scope.path + (str(instance["id"]),)
        if path not in self._scopes:
            subgraph_id = instance["type"]
            chain, ancestor = [], scope
            while ancestor is not None and ancestor.instance is not None:
                chain.append(ancestor.instance["type"])
                ancestor = ancestor.parent
            if subgraph_id in chain:
                raise WorkflowError(f"{scope.describe(instance)}: subgraph {subgraph_id} contains itself")
            self._scopes[path] = _Scope(self.subgraphs[subgraph_id], path, instance, scope)
        return self._scopes[path]

    def _promoted_values(self, inner: _Scope) -> dict[str, Any]:
        """Widget values of a subgraph instance, by subgraph input name.

        A subgraph input that feeds an inner widget shows that widget on the instance. Its value is the
        inner widget's own value unless the instance saved one. The 1.58 frontend reads an instance's
        `widgets_values` twice when it loads: first one per promoted input in input order (older saves;
        we skip control_after_generate values when the list is longer, where 1.58 does not), then again
        one per `properties.proxyWidgets` entry (`_apply_proxy_widgets`), which wins.
        """
        if inner.path in self._promoted:
            return self._promoted[inner.path]
        feeds = self._widget_feeds(inner)
        promoted = {name: feed.value for name, feed in feeds.items()}
        saved = inner.instance.get("widgets_values")
        if isinstance(saved, list) and saved:
            position = 0
            skip_controls = len(saved) > len(feeds)
            for name, feed in feeds.items():
                if position < len(saved) and saved[position] is not None:
                    promoted[name] = saved[position]
                position += 1 + (1 if skip_controls and feed.has_control else 0)
        elif isinstance(saved, dict):
            promoted.update({name: value for name, value in saved.items() if name in feeds})
        named = inner.instance.get("widgets_values_named")
        if isinstance(named, dict):
            promoted.update({name: value for name, value in named.items() if name in feeds})
        self._proxied[inner.path] = self._apply_proxy_widgets(inner, feeds, promoted)
        self._promoted[inner.path] = promoted
        return promoted

    def _proxied_values(self, scope: _Scope) -> dict[tuple[str, str], Any]:
        """The values an instance's proxy widgets give inner widgets no subgraph input feeds, by
        (inner node id, widget or input name); empty for the root graph."""
        if scope.instance is None:
            return {}
        self._promoted_values(scope)
        return self._proxied[scope.path]

    def _apply_proxy_widgets(self, inner: _Scope, feeds: dict[str, _WidgetFeed],
                             promoted: dict[str, Any]) -> dict[tuple[str, str], Any]:
        """Read the instance's `widgets_values` one per `proxyWidgets` entry, as the 1.58 frontend migrates
        them on load: an entry naming a widget a subgraph input feeds sets that input's value (in
        `promoted`); one naming an unfed inner widget (or a PrimitiveNode, or a nested instance's promoted
        input) gets it through a new subgraph input (returned, by inner node id and name); `["-1", name]`
        sets the instance's own input `name`, after the others. An entry past the end of the list keeps
        the current value; one that names no node or no widget (a control_after_generate value has no
        input) is dropped with its value."""
        entries = _proxy_widget_entries(inner.instance)
        saved = inner.instance.get("widgets_values")
        if not entries or not isinstance(saved, list):
            return {}
        fed_by = {(feed.node_id, feed.widget): name for name, feed in feeds.items()}
        proxied: dict[tuple[str, str], Any] = {}
        own_inputs: dict[str, Any] = {}
        for (node_id, widget), value in zip(entries, saved):
            if node_id == "-1":
                if widget in feeds:
                    own_inputs[widget] = value
                continue
            if (node_id, widget) in fed_by:
                promoted[fed_by[(node_id, widget)]] = value
                continue
            target = self._proxy_target(inner, node_id, widget)
            if target is None and (legacy := _strip_legacy_prefixes(widget)) is not None:
                target = self._proxy_target(inner, node_id, *legacy)
            if target is not None:
                proxied[(node_id, target)] = value
        promoted.update(own_inputs)
        return proxied

    def _proxy_target(self, inner: _Scope, node_id: str, widget: str, via: str | None = None) -> str | None:
        """The input a proxy widget `widget` of inner node `node_id` sets, or None if there is none. For a
        nested instance, `via` names the node inside it whose widget is meant."""
        node = inner.graph.nodes.get(node_id)
        if node is None:
            return None
        node_type = node.get("type")
        if node_type == PRIMITIVE_TYPE:  # the frontend moves a linked PrimitiveNode's value to a subgraph input
            return widget if any((output.get("links") or []) for output in node.get("outputs") or []) else None
        if node_type in self.subgraphs:  # a nested instance's promoted input, by its name or its widget's
            nested_feeds = self._widget_feeds(self._child_scope(inner, node))
            if via is None and widget in nested_feeds:
                return widget
            return next((name for name, feed in nested_feeds.items()
                         if feed.widget == widget and via in (None, feed.node_id)), None)
        layout = self._layout(node_type) or []
        return widget if any(slot.name == widget for slot in layout) else None

    def _widget_feeds(self, inner: _Scope) -> dict[str, _WidgetFeed]:
        """The subgraph inputs that end at an inner widget, in input order, with the widget each feeds."""
        if inner.path not in self._feeds:
            feeds: dict[str, _WidgetFeed] = {}
            for subgraph_input in inner.graph.inputs:
                for link_id in subgraph_input.get("linkIds") or []:
                    found = self._inner_widget(inner, int(link_id))
                    if found is not None:
                        feeds[subgraph_input.get("name")] = found
                        break
            self._feeds[inner.path] = feeds
        return self._feeds[inner.path]

    def _inner_widget(self, inner: _Scope, link_id: int) -> _WidgetFeed | None:
        """The widget input a subgraph-input link ends at, if any."""
        link = inner.graph.links.get(link_id)
        target = inner.graph.nodes.get(link.target_id) if link is not None else None
        if target is None:
            return None
        target_input = next((item for item in target.get("inputs") or [] if item.get("link") == link_id), None)
        if target_input is None or not target_input.get("widget"):
            return None
        widget_name = target_input["widget"].get("name", target_input.get("name"))
        values = self._widget_values(inner, target)
        if widget_name not in values:
            return None
        layout = self._layout(target.get("type")) or []
        return _WidgetFeed(str(target["id"]), widget_name, values[widget_name],
                           any(slot.name == widget_name and slot.has_control for slot in layout))

    # -- widget values -------------------------------------------------------------------------------------

    def _widget_values(self, scope: _Scope, node: dict) -> dict[str, Any]:
        """A node's widget values by input name (for an instance: its promoted values)."""
        if node.get("type") in self.subgraphs:
            return self._promoted_values(self._child_scope(scope, node))
        layout = self._layout(node.get("type"))
        if layout is None:
            return {}
        names = [slot.name for slot in layout]
        saved = node.get("widgets_values")
        values: dict[str, Any] = {}
        if isinstance(saved, dict):
            values = {name: saved[name] for name in names if name in saved}
        elif isinstance(saved, list):
            position = 0
            for slot in layout:
                if position < len(saved):
                    values[slot.name] = saved[position]
                position += slot.saved_values
        named = node.get("widgets_values_named")
        if isinstance(named, dict):
            values.update({name: value for name, value in named.items() if name in names})
        # Values a save did not carry take the widget's default, as a freshly drawn widget would.
        for slot in layout:
            if slot.name not in values and slot.default is not None:
                values[slot.name] = slot.default
        return values

    def _layout(self, class_type: str) -> list[_WidgetSlot] | None:
        """The widgets a node type draws, in the UI's order; None for a type the registry does not know."""
        if class_type not in self._layouts:
            self._layouts[class_type] = (_widget_layout(self.registry.object_info_for(class_type))
                                         if class_type in self.registry.classes else None)
        return self._layouts[class_type]


def _widget_layout(info: dict) -> list[_WidgetSlot]:
    layout = []
    for category in ("required", "optional"):
        specs = info["input"].get(category) or {}
        for name in info["input_order"].get(category, list(specs)):
            spec = specs[name]
            input_type = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            is_combo = isinstance(input_type, list)
            if not (is_combo or input_type in WIDGET_TYPES) or options.get("forceInput"):
                continue
            control = options.get("control_after_generate", input_type == "INT" and name in SEED_INPUT_NAMES)
            upload = is_combo and any(options.get(key) for key in UPLOAD_OPTIONS)
            layout.append(_WidgetSlot(name, bool(control), upload, _widget_default(input_type, options)))
    return layout


def _widget_default(input_type: Any, options: dict) -> Any:
    if "default" in options:
        return options["default"]
    if isinstance(input_type, list):
        return input_type[0] if input_type else None
    if input_type == "COMBO":
        choices = options.get("options") or []
        return choices[0] if choices else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(input_type)


def _set_get_name(node: dict) -> str:
    """The name a SetNode stores under or a GetNode reads: its one widget value."""
    values = node.get("widgets_values")
    return values[0] if isinstance(values, list) and values and isinstance(values[0], str) else ""


def _instance_input(instance: dict, name: str) -> tuple[int, dict] | None:
    for index, item in enumerate(instance.get("inputs") or []):
        if item.get("name") == name:
            return index, item
    return None


def _bypass_input_index(node: dict, slot: int, wanted_type: Any) -> int | None:
    """Which input a bypassed node passes to output `slot`: the same index if its type fits, else the
    first input of exactly the wanted type, else the first input whose type connects."""
    inputs = node.get("inputs") or []
    if not inputs:
        return None
    if wanted_type in ("*", "", None):
        return slot if slot < len(inputs) else 0
    outputs = node.get("outputs") or []
    output_type = outputs[slot].get("type") if slot < len(outputs) else wanted_type
    if slot < len(inputs):
        same = inputs[slot].get("type")
        if _types_connect(same, output_type) and _types_connect(same, wanted_type):
            return slot
    for index, item in enumerate(inputs):
        if item.get("type") == wanted_type:
            return index
    for index, item in enumerate(inputs):
        if _types_connect(item.get("type"), output_type) and _types_connect(item.get("type"), wanted_type):
            return index
    return None

