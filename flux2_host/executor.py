"""Validation and execution of API prompts with ComfyUI's semantics (comfyui-compat.md sections 3 and 5).

`validate_prompt` reports the same error types and JSON shapes as ComfyUI's `POST /prompt`.
`PromptExecutor.execute` runs only what the requested output nodes need, in dependency order, and keeps a
cache between prompts: a node's key is its class, its IS_CHANGED value, its literal inputs and,
recursively, its ancestors' keys, so re-running an identical prompt executes nothing and a seed change
re-runs only the seed's descendants. Loaded models live in that cache as loader outputs, which is how
they are reused. Events go to an `ExecutionListener` with ComfyUI's websocket names and data shapes.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import logging
import math
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from PIL import Image

from flux2_core.errors import Interrupted
from flux2_core.memory import residency
from flux2_core.preview import latent_preview
from flux2_core.progress import check_interrupt, clear_interrupt, event_handler, progress_handler, request_interrupt

from .errors import error_body  # not json_api: `flux2 run` needs no aiohttp
from .registry import NodeRegistry

log = logging.getLogger(__name__)

ANY_TYPE = "*"
COMBO_TYPE = "COMBO"


def is_link(value: Any) -> bool:
    """A `[source_node_id, output_index]` reference, as opposed to a literal."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def types_match(received: Any, expected: Any) -> bool:
    """ComfyUI's link type rule: equal, either side "*", a combo-list output into a COMBO input, or comma
    lists ("INT,FLOAT") sharing a type. Lists of choices only match an identical list."""
    if received == expected or received == ANY_TYPE or expected == ANY_TYPE:
        return True
    if isinstance(received, list) and expected == COMBO_TYPE:
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    received_set = {part.strip() for part in received.split(",")}
    expected_set = {part.strip() for part in expected.split(",")}
    if ANY_TYPE in received_set or ANY_TYPE in expected_set:
        return True
    return bool(received_set & expected_set)


def input_spec(class_inputs: dict, name: str) -> tuple[Any, str | None, dict]:
    """(type, category, options) of an input; (None, None, {}) when the node does not declare it."""
    for category in ("required", "optional", "hidden"):
        inputs = class_inputs.get(category) or {}
        if name in inputs:
            spec = inputs[name]
            if isinstance(spec, str):  # hidden inputs are declared as bare strings ("PROMPT")
                return spec, category, {}
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            return spec[0], category, options
    return None, None, {}


def full_type_name(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _literal_value(value: Any) -> Any:
    # List literals arrive wrapped because a bare 2-list means a link.
    if isinstance(value, dict) and "__value__" in value:
        return value["__value__"]
    return value


def _input_data(node_id: str, node: dict, class_inputs: dict, prompt: dict, extra_data: dict,
                source_outputs: Callable[[str], list | None]) -> tuple[dict[str, list], set[str]]:
    """Each input as the list of values the node is mapped over, plus the names of links with no value yet.

    `source_outputs(node_id)` gives a node's outputs (one list per output slot) or None when it has not
    run; validation and IS_CHANGED pass a function that always returns None, so they only see literals.
    """
    data: dict[str, list] = {}
    missing: set[str] = set()
    for name, value in node.get("inputs", {}).items():
        _, category, _ = input_spec(class_inputs, name)
        if is_link(value):
            outputs = source_outputs(value[0])
            if outputs is None or value[1] >= len(outputs):
                data[name] = [None]
                missing.add(name)
            else:
                data[name] = outputs[value[1]]
        elif category is not None:
            data[name] = [_literal_value(value)]
    for name, kind in (class_inputs.get("hidden") or {}).items():
        if kind == "PROMPT":
            data[name] = [prompt]
        elif kind == "EXTRA_PNGINFO":
            data[name] = [extra_data.get("extra_pnginfo")]
        elif kind == "UNIQUE_ID":
            data[name] = [node_id]
    return data, missing


def _map_over_list(target: Any, data: dict[str, list], function_name: str,
                   before_call: Callable[[], None] | None = None) -> list:
    """Call `function_name` once per list item (shorter lists repeat their last item), or once with the
    whole lists when the node sets INPUT_IS_LIST."""
    function = getattr(target, function_name)
    if getattr(target, "INPUT_IS_LIST", False):
        calls = [data]
    elif not data:
        calls = [{}]
    else:
        length = max(len(values) for values in data.values())
        calls = [{name: values[i if i < len(values) else -1] for name, values in data.items()}
                 for i in range(length)]
    results = []
    for kwargs in calls:
        if before_call is not None:
            before_call()
        results.append(function(**kwargs))
    return results


# ---------------------------------------------------------------------------------------------------------------
# Validation


@dataclass
class ValidationResult:
    ok: bool
    error: dict | None
    outputs: list[str]
    node_errors: dict


def validate_prompt(prompt: dict, registry: NodeRegistry, partial_targets: list[str] | None = None) -> ValidationResult:
    """ComfyUI's prompt validation. Like ComfyUI it normalizes literal inputs in place (INT/FLOAT/STRING/
    BOOLEAN coercion, `__value__` unwrapping), so the prompt that is queued is the one that validated."""
    outputs = []
    for node_id, node in prompt.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        meta = node.get("_meta") if isinstance(node, dict) else None
        title = meta.get("title") if isinstance(meta, dict) else None
        if not isinstance(class_type, str):
            return ValidationResult(False, error_body(
                "missing_node_type",
                f"Node '{title or f'ID #{node_id}'}' has no class_type. The workflow may be corrupted or a "
                "custom node is missing.",
                f"Node ID '#{node_id}'", {"node_id": node_id, "class_type": None, "node_title": title}), [], {})
        node_class = registry.classes.get(class_type)
        if node_class is None:
            title = title or class_type
            return ValidationResult(False, error_body(
                "missing_node_type", f"Node '{title}' not found. The custom node may not be installed.",
                f"Node ID '#{node_id}'", {"node_id": node_id, "class_type": class_type, "node_title": title}), [], {})
        is_target = partial_targets is None or node_id in partial_targets
        if getattr(node_class, "OUTPUT_NODE", False) is True and is_target:
            outputs.append(node_id)

    if not outputs:
        return ValidationResult(False, error_body("prompt_no_outputs", "Prompt has no outputs", "", {}), [], {})

    validator = _Validator(prompt, registry)
    good_outputs: list[str] = []
    node_errors: dict[str, dict] = {}
    for output_id in outputs:
        try:
            valid, reasons = validator.validate(output_id, [])
        except Exception as exc:
            valid = False
            reasons = [error_body("exception_during_validation", "Exception when validating node", str(exc),
                              {"exception_type": full_type_name(type(exc)),
                               "traceback": traceback.format_tb(exc.__traceback__)})]
            validator.results[output_id] = (False, reasons)
        if valid:
            good_outputs.append(output_id)
            continue
        # A node downstream of a broken one is invalid without errors of its own; only report the causes.
        causes = []
        for node_id, (node_valid, node_reasons) in validator.results.items():
            if node_valid or not node_reasons:
                continue
            entry = node_errors.setdefault(node_id, {"errors": node_reasons, "dependent_outputs": [],
                                                     "class_type": prompt[node_id]["class_type"]})
            if output_id not in entry["dependent_outputs"]:
                entry["dependent_outputs"].append(output_id)
            causes += describe_node_errors({node_id: entry})
        log.error("Failed to validate prompt for output %s:\n%s", output_id,
                  "\n".join(f"  {cause}" for cause in causes) or "  (no cause reported)")

    if not good_outputs:
        details = "\n".join(describe_node_errors(node_errors))
        error = error_body("prompt_outputs_failed_validation", "Prompt outputs failed validation", details, {})
        return ValidationResult(False, error, [], node_errors)
    return ValidationResult(True, None, good_outputs, node_errors)


def describe_node_errors(node_errors: dict) -> list[str]:
    """One line per validation error, naming the node, its type, the input and the reason:
    `node 2 (Flux2LoadModel) input model_name: Value not in list: model_name: 'x' not in [...]`."""
    lines = []
    for node_id, entry in node_errors.items():
        for reason in entry["errors"]:
            input_name = reason.get("extra_info", {}).get("input_name")
            where = f"node {node_id} ({entry['class_type']})" + (f" input {input_name}" if input_name else "")
            has_details = reason.get("details") and reason["details"] != reason["message"]
            details = f": {reason['details']}" if has_details else ""
            lines.append(f"{where}: {reason['message']}{details}")
    return lines


class _Validator:
    """Validates nodes depth-first from an output, each node once; a node reached again while its own
    validation is in progress closes a cycle."""

    def __init__(self, prompt: dict, registry: NodeRegistry) -> None:
        self.prompt = prompt
        self.registry = registry
        self.results: dict[str, tuple[bool, list[dict]]] = {}

    def validate(self, node_id: str, visiting: list[str]) -> tuple[bool, list[dict]]:
        if node_id in self.results:
            return self.results[node_id]
        if node_id in visiting:
            return self._report_cycle(visiting[visiting.index(node_id):] + [node_id])

        node = self.prompt[node_id]
        node_class = self.registry.classes[node["class_type"]]
        class_inputs = node_class.INPUT_TYPES()
        inputs = node.setdefault("inputs", {})
        if not isinstance(inputs, dict):
            self.results[node_id] = (False, [error_body("invalid_input_type", "Node inputs must be an object",
                                                    f"inputs of node {node_id} is {type(inputs).__name__}",
                                                    {"received_value": inputs})])
            return self.results[node_id]
        validate_function = getattr(node_class, "VALIDATE_INPUTS", None)
        validate_args: list[str] = []
        validate_kwargs = False
        if validate_function is not None:
            argspec = inspect.getfullargspec(validate_function)
            validate_args, validate_kwargs = argspec.args, argspec.varkw is not None

        errors: list[dict] = []
        valid = True
        received_types: dict[str, Any] = {}
        declared = list(class_inputs.get("required") or {}) + list(class_inputs.get("optional") or {})
        for name in declared:
            input_type, category, options = input_spec(class_inputs, name)
            config = [input_type, options]
            if name not in inputs:
                if category == "required":
                    errors.append(error_body("required_input_missing", "Required input is missing", name,
                                         {"input_name": name}))
                continue
            value = inputs[name]
            if isinstance(value, list):
                source_ok, link_error = self._check_link(node_id, name, value, input_type, config,
                                                         validate_args, received_types, visiting)
                if link_error is not None:
                    errors.append(link_error)
                valid = valid and source_ok
                continue
            value, conversion_error = self._coerce(name, value, input_type, config)
            if conversion_error is not None:
                errors.append(conversion_error)
                continue
            inputs[name] = value
            # A node that validates an input itself takes over the built-in range and choice checks.
            if name not in validate_args and not validate_kwargs:
                range_error = self._check_value(name, value, input_type, options, config)
                if range_error is not None:
                    errors.append(range_error)

        if validate_function is not None and (validate_args or validate_kwargs):
            errors.extend(self._custom_validation(node_id, node_class, class_inputs, validate_args, validate_kwargs,
                                                  received_types))

        # A cycle found deeper down may already have put an error on this node; keep it.
        previous_ok, previous_errors = self.results.get(node_id, (True, []))
        result = (previous_ok and valid and not errors,
                  previous_errors + [error for error in errors if error not in previous_errors])
        self.results[node_id] = result
        return result

    def _report_cycle(self, cycle_path: list[str]) -> tuple[bool, list[dict]]:
        cycle_nodes = list(dict.fromkeys(cycle_path))
        details = " -> ".join(f"{node_id} ({self.prompt[node_id]['class_type']})" for node_id in cycle_path)
        for node_id in cycle_nodes:
            self.results[node_id] = (False, [error_body("dependency_cycle", "Dependency cycle detected", details,
                                                    {"node_id": node_id, "cycle_nodes": cycle_nodes})])
        return self.results[cycle_path[0]]

    def _check_link(self, node_id: str, name: str, value: list, input_type: Any, config: list,
                    validate_args: list[str], received_types: dict, visiting: list[str]) -> tuple[bool, dict | None]:
        """(source validated, error on this input) for a linked input."""
        bad_link = error_body("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                          name, {"input_name": name, "input_config": config, "received_value": value})
        if len(value) != 2:
            return True, bad_link
        source_id, slot = value
        source = self.prompt.get(source_id) if isinstance(source_id, str) else None
        source_class = self.registry.classes.get(source["class_type"]) if source else None
        return_types = tuple(getattr(source_class, "RETURN_TYPES", ()))
        if source_class is None or not isinstance(slot, int) or not 0 <= slot < len(return_types):
            bad_link["details"] = (f"{name}: node {source_id!r} output {slot!r} does not exist" if source_class is None
                                   else f"{name}: node {source_id} ({source['class_type']}) has "
                                        f"{len(return_types)} outputs, not output {slot!r}")
            return True, bad_link
        received = return_types[slot]
        received_types[name] = received
        if "input_types" not in validate_args and not types_match(received, input_type):
            return True, error_body("return_type_mismatch", "Return type mismatch between linked nodes",
                                f"{name}, received_type({received}) mismatch input_type({input_type})",
                                {"input_name": name, "input_config": config, "received_type": received,
                                 "linked_node": value})
        try:
            visiting.append(node_id)
            try:
                source_ok, _ = self.validate(source_id, visiting)
            finally:
                visiting.pop()
        except Exception as exc:
            self.results[source_id] = (False, [error_body(
                "exception_during_inner_validation", "Exception when validating inner node", str(exc),
                {"input_name": name, "input_config": config, "exception_message": str(exc),
                 "exception_type": full_type_name(type(exc)), "traceback": traceback.format_tb(exc.__traceback__),
                 "linked_node": value})])
            return False, None
        return source_ok, None

    @staticmethod
    def _coerce(name: str, value: Any, input_type: Any, config: list) -> tuple[Any, dict | None]:
        value = _literal_value(value)
        converter = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}.get(input_type) \
            if isinstance(input_type, str) else None
        if converter is None:
            return value, None
        try:
            return converter(value), None
        except Exception as exc:
            return value, error_body("invalid_input_type", f"Failed to convert an input value to a {input_type} value",
                                 f"{name}, {value}, {exc}",
                                 {"input_name": name, "input_config": config, "received_value": value,
                                  "exception_message": str(exc)})

    @staticmethod
    def _check_value(name: str, value: Any, input_type: Any, options: dict, config: list) -> dict | None:
        if "min" in options and value < options["min"]:
            return error_body("value_smaller_than_min", f"Value {value} smaller than min of {options['min']}", name,
                          {"input_name": name, "input_config": config, "received_value": value})
        if "max" in options and value > options["max"]:
            return error_body("value_bigger_than_max", f"Value {value} bigger than max of {options['max']}", name,
                          {"input_name": name, "input_config": config, "received_value": value})
        if isinstance(input_type, list) or input_type == COMBO_TYPE:
            choices = input_type if isinstance(input_type, list) else options.get("options", [])
            if options.get("remote_combo"):
                return None  # choices are fetched by the browser; the server cannot know them
            invalid = [item for item in value if item not in choices] \
                if options.get("multiselect") and isinstance(value, list) else ([] if value in choices else [value])
            if invalid:
                # Long lists (scanned model files) are summarized, as ComfyUI does.
                listed = f"(list of length {len(choices)})" if len(choices) > 20 else str(choices)
                return error_body("value_not_in_list", "Value not in list",
                              f"{name}: {', '.join(repr(item) for item in invalid)} not in {listed}",
                              {"input_name": name, "input_config": None if len(choices) > 20 else config,
                               "received_value": value})
        return None

    def _custom_validation(self, node_id: str, node_class: type, class_inputs: dict, validate_args: list[str],
                           validate_kwargs: bool, received_types: dict) -> list[dict]:
        data, _ = _input_data(node_id, self.prompt[node_id], class_inputs, {}, {}, lambda _source: None)
        arguments = {name: values for name, values in data.items() if validate_kwargs or name in validate_args}
        if "input_types" in validate_args:
            arguments["input_types"] = [received_types]
        results = _map_over_list(node_class, arguments, "VALIDATE_INPUTS")
        errors = []
        for name in list(arguments) or [None]:
            for result in results:
                if result is True:
                    continue
                details = name if name is not None else ""
                if result is not False:
                    details = f"{name} - {result}" if name is not None else str(result)
                errors.append(error_body("custom_validation_failed", "Custom validation failed for node", details,
                                     {"input_name": name} if name is not None else {}))
        return errors


# ---------------------------------------------------------------------------------------------------------------
# Execution


class ExecutionListener(Protocol):
    def send(self, event: str, data: dict) -> None:
        """One websocket event (ComfyUI's names and data shapes)."""

    def send_preview(self, node_id: str, prompt_id: str, image: Image.Image) -> None:
        """A step preview of a running node."""


@dataclass
class ExecutionResult:
    status: str  # "success" | "error" | "interrupted"
    outputs: dict[str, dict] = field(default_factory=dict)  # node id -> ui output, what history stores
    messages: list[tuple[str, dict]] = field(default_factory=list)  # status events, as history stores them
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    error: dict | None = None  # the execution_error / execution_interrupted data


@dataclass
class _CacheEntry:
    outputs: list[list]  # per output slot, the values of each list item
    ui: dict | None


class _NodeFailure(Exception):
    """Stops a prompt: carries the event to send (execution_error or execution_interrupted)."""

    def __init__(self, event: str, data: dict) -> None:
        super().__init__(data.get("exception_message", event))
        self.event = event
        self.data = data


class PromptExecutor:
    """Runs prompts one at a time and keeps node outputs (loaded models included) between them."""

    def __init__(self, registry: NodeRegistry, preview_method: str = "none") -> None:
        self.registry = registry
        # ComfyUI's --preview-method: the default for prompts whose extra_data names none. Every method but
        # "none" sends flux2_core.preview's latent colours (there is no TAESD here).
        self.preview_method = preview_method
        self._outputs_cache: dict[str, _CacheEntry] = {}  # signature -> entry
        self._node_objects: dict[tuple[str, str], Any] = {}  # (node id, class type) -> instance
        self._lock = threading.Lock()
        self._running = False
        self._free_after_run: bool | None = None  # unload_models of a free_memory call made mid-prompt

    def execute(self, prompt: dict, prompt_id: str, extra_data: dict, output_node_ids: list[str],
                listener: ExecutionListener, end_marker: bool = True) -> ExecutionResult:
        """Run what `output_node_ids` need. Synchronous; node failures end up in the result, never raised.

        The run ends with `executing {node: None}` unless `end_marker` is False: then the caller sends it,
        when its own work on the result (the server's history) is done."""
        with self._lock:
            self._running = True
        started = time.perf_counter()
        try:
            run = _PromptRun(self, prompt, prompt_id, extra_data or {}, listener, end_marker)
            # Nodes run under inference mode, as in ComfyUI: a node that works here then works there too
            # (training nodes leave it themselves), and no autograd bookkeeping is kept.
            with torch.inference_mode():
                result = run.run([node_id for node_id in output_node_ids if node_id in prompt])
            # One line per prompt, like ComfyUI's "Prompt executed in ...".
            log.info("prompt %s: %s in %.2f s, outputs: %s", prompt_id, result.status, time.perf_counter() - started,
                     outputs_summary(result.outputs))
            return result
        finally:
            with self._lock:
                self._running = False
                free_request, self._free_after_run = self._free_after_run, None
            if free_request is not None:
                self._drop_everything(free_request)

    def interrupt(self) -> None:
        """Stop the running prompt at its next check (between nodes, steps and progress reports)."""
        request_interrupt()

    def free_memory(self, unload_models: bool) -> None:
        """Drop every cached output and node object, which unloads the models they hold; `unload_models`
        also hands cached GPU memory back to the driver. Deferred to the end of a running prompt."""
        with self._lock:
            if self._running:
                self._free_after_run = bool(self._free_after_run) or unload_models
                return
        self._drop_everything(unload_models)

    def _drop_everything(self, unload_models: bool) -> None:
        self._outputs_cache.clear()
        self._node_objects.clear()
        gc.collect()
        if unload_models:
            # Models still referenced elsewhere (a Python pipeline in the same process) leave the GPU too.
            residency.unload_all()


class _PromptRun:
    """One `execute` call: the schedule, the events and the outcome of a single prompt."""

    def __init__(self, executor: PromptExecutor, prompt: dict, prompt_id: str, extra_data: dict,
                 listener: ExecutionListener, end_marker: bool) -> None:
        self.executor = executor
        self.registry = executor.registry
        self.cache = executor._outputs_cache
        self.prompt = prompt
        self.prompt_id = prompt_id
        self.extra_data = extra_data
        self.listener = listener
        self.end_marker = end_marker
        preview_method = extra_data.get("preview_method")
        if preview_method in (None, "default"):  # the server's --preview-method, as in ComfyUI
            preview_method = executor.preview_method
        self.previews = preview_method != "none"
        self.signatures: dict[str, str] = {}
        self.results: dict[str, list[list]] = {}  # node id -> outputs produced or loaded in this run
        self.ui_outputs: dict[str, dict] = {}
        self.executed: list[str] = []
        self.messages: list[tuple[str, dict]] = []
        self.progress: dict[str, dict] = {}
        self.pending: dict[str, set[str]] = {}  # node id -> nodes it still waits for
        self._input_types: dict[type, dict] = {}

    # -- the whole prompt ----------------------------------------------------------------------------------

    def run(self, output_node_ids: list[str]) -> ExecutionResult:
        clear_interrupt()
        self._status_message("execution_start", {"prompt_id": self.prompt_id})
        try:
            self._prepare_cache()
        except Exception as exc:  # a broken INPUT_TYPES or IS_CHANGED must not escape either
            log.exception("preparing the cache for prompt %s failed", self.prompt_id)
            return self._finish("error", "execution_error", self._error_data(None, exc, {}))
        cached = [node_id for node_id in self.prompt if self.signatures[node_id] in self.cache]
        self._status_message("execution_cached", {"nodes": cached, "prompt_id": self.prompt_id})

        try:
            for node_id in output_node_ids:
                self._add_node(node_id)
            while self.pending:
                node_id = self._pick_ready_node()
                if self._run_node(node_id):
                    del self.pending[node_id]
        except _NodeFailure as failure:
            status = "interrupted" if failure.event == "execution_interrupted" else "error"
            return self._finish(status, failure.event, failure.data, cached)
        except Exception as exc:  # scheduling trouble outside any node call (e.g. a broken INPUT_TYPES)
            log.exception("prompt %s failed outside any node", self.prompt_id)
            return self._finish("error", "execution_error", self._error_data(None, exc, {}), cached)
        return self._finish("success", "execution_success", {"prompt_id": self.prompt_id}, cached)

    def _finish(self, status: str, event: str, data: dict, cached: list[str] | None = None) -> ExecutionResult:
        self._status_message(event, data)
        if self.end_marker:
            self.listener.send("executing", {"node": None, "prompt_id": self.prompt_id})
        return ExecutionResult(status=status, outputs=self.ui_outputs, messages=self.messages,
                               executed=self.executed, cached=cached or [],
                               error=None if status == "success" else self.messages[-1][1])

    def _status_message(self, event: str, data: dict) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        self.messages.append((event, data))
        self.listener.send(event, data)

    def _class_inputs(self, node_class: type) -> dict:
        """INPUT_TYPES once per class and prompt: loaders list model folders in it."""
        if node_class not in self._input_types:
            self._input_types[node_class] = node_class.INPUT_TYPES()
        return self._input_types[node_class]

    # -- cache keys ----------------------------------------------------------------------------------------

    def _prepare_cache(self) -> None:
        for node_id in self.prompt:
            self._signature(node_id, set())
        used = set(self.signatures.values())
        for signature in [key for key in self.cache if key not in used]:
            del self.cache[signature]
        objects = self.executor._node_objects
        for key in [key for key in objects if self.prompt.get(key[0], {}).get("class_type") != key[1]]:
            del objects[key]

    def _signature(self, node_id: str, visiting: set[str]) -> str:
        """Class, IS_CHANGED, literal inputs and ancestors' signatures, hashed. Anything that cannot be
        keyed (unknown class, missing node, a cycle, IS_CHANGED NaN or failing) gets a one-off key."""
        if node_id in self.signatures:
            return self.signatures[node_id]
        node = self.prompt.get(node_id)
        node_class = self.registry.classes.get(node.get("class_type")) if isinstance(node, dict) else None
        if node_id in visiting:
            return f"unkeyed-{uuid.uuid4()}"
        if node_class is None:
            self.signatures[node_id] = f"unkeyed-{uuid.uuid4()}"
            return self.signatures[node_id]
        visiting.add(node_id)
        is_changed = self._is_changed(node_id, node, node_class)
        parts: list[Any] = [node["class_type"], is_changed]
        hidden = (self._class_inputs(node_class).get("hidden") or {}).values()
        if getattr(node_class, "NOT_IDEMPOTENT", False) or "UNIQUE_ID" in hidden:
            parts.append(["node", node_id])
        for name in sorted(node.get("inputs", {})):
            value = node["inputs"][name]
            if is_link(value):
                parts.append([name, "link", self._signature(value[0], visiting), value[1]])
            else:
                parts.append([name, "value", value])
        visiting.discard(node_id)
        encoded = json.dumps(parts, sort_keys=True, default=repr)
        self.signatures[node_id] = hashlib.sha256(encoded.encode()).hexdigest()
        return self.signatures[node_id]

    def _is_changed(self, node_id: str, node: dict, node_class: type) -> Any:
        if not hasattr(node_class, "IS_CHANGED"):
            return False
        data, _ = _input_data(node_id, node, self._class_inputs(node_class), self.prompt, self.extra_data,
                              lambda _source: None)
        try:
            values = _map_over_list(node_class, data, "IS_CHANGED")
        except Exception as exc:
            log.warning("IS_CHANGED of node %s (%s) failed, node will re-run: %s", node_id, node["class_type"], exc)
            return f"changed-{uuid.uuid4()}"
        # NaN never equals itself: ComfyUI's way of saying "always re-run".
        if any(isinstance(value, float) and math.isnan(value) for value in values):
            return f"changed-{uuid.uuid4()}"
        return values

    # -- scheduling ----------------------------------------------------------------------------------------

    def _has_outputs(self, node_id: str) -> bool:
        return node_id in self.results or self.signatures.get(node_id) in self.cache

    def _outputs_of(self, node_id: str) -> list[list] | None:
        if node_id in self.results:
            return self.results[node_id]
        entry = self.cache.get(self.signatures.get(node_id))
        return entry.outputs if entry is not None else None

    def _add_node(self, node_id: str) -> None:
        """Schedule a node and, unless its outputs are cached, the non-lazy sources it is missing."""
        stack = [node_id]
        while stack:
            current = stack.pop()
            if current in self.pending:
                continue
            self.pending[current] = set()
            if self._has_outputs(current) or current not in self.prompt:
                continue
            node_class = self.registry.classes.get(self.prompt[current].get("class_type"))
            class_inputs = self._class_inputs(node_class) if node_class is not None else {}
            for name, value in self.prompt[current].get("inputs", {}).items():
                if not is_link(value) or input_spec(class_inputs, name)[2].get("lazy"):
                    continue
                if not self._has_outputs(value[0]):
                    self.pending[current].add(value[0])
                    stack.append(value[0])

    def _add_dependency(self, node_id: str, source_id: str) -> None:
        if not self._has_outputs(source_id):
            self._add_node(source_id)
            self.pending[node_id].add(source_id)

    def _pick_ready_node(self) -> str:
        ready = [node_id for node_id, waits in self.pending.items()
                 if not any(source in self.pending for source in waits)]
        if not ready:
            blamed = next(iter(self.pending))
            raise _NodeFailure("execution_error", {
                "prompt_id": self.prompt_id, "node_id": blamed, "node_type": self._class_type(blamed),
                "executed": list(self.executed), "exception_message": "Dependency cycle detected",
                "exception_type": "graph.DependencyCycleError", "traceback": [], "current_inputs": {},
                "current_outputs": sorted(self.results)})
        # Output nodes first, then what an output node waits for: results show up as early as they can.
        for node_id in ready:
            if self.registry.is_output_node(self._class_type(node_id)):
                return node_id
        for node_id in ready:
            if any(node_id in self.pending[waiting] and self.registry.is_output_node(self._class_type(waiting))
                   for waiting in self.pending):
                return node_id
        return ready[0]

    def _class_type(self, node_id: str) -> str | None:
        return self.prompt.get(node_id, {}).get("class_type")

    # -- one node ------------------------------------------------------------------------------------------

    def _run_node(self, node_id: str) -> bool:
        """Execute (or take from cache) one node; False when it asked for lazy inputs and must wait."""
        entry = self.cache.get(self.signatures.get(node_id))
        if entry is not None:
            self.results[node_id] = entry.outputs
            if entry.ui:
                self._record_ui(node_id, entry.ui)
            return True

        node = self.prompt.get(node_id, {})
        class_type = node.get("class_type")
        data: dict[str, list] = {}
        try:
            node_class = self.registry.classes.get(class_type)
            if node_class is None:
                raise KeyError(f"node {node_id}: unknown node type {class_type!r}" if node_id in self.prompt
                               else f"node {node_id} is linked to but not in the prompt")
            data, missing = _input_data(node_id, node, self._class_inputs(node_class), self.prompt, self.extra_data,
                                        self._outputs_of)
            self._set_progress(node_id, "running", 0, 1)
            self.listener.send("executing", {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id})
            node_object = self._node_object(node_id, class_type, node_class)
            if hasattr(node_object, "check_lazy_status") and self._needs_lazy_inputs(node_id, node_object, data,
                                                                                      missing):
                return False
            with progress_handler(lambda step, total, preview: self._on_progress(node_id, step, total, preview)), \
                    event_handler(lambda event, event_data: self.listener.send(
                        event, {**event_data, "prompt_id": self.prompt_id, "node": node_id})):
                returned = _map_over_list(node_object, data, node_class.FUNCTION, before_call=check_interrupt)
            outputs, ui = _merge_results(node_id, node_class, returned)
        except Interrupted:
            log.info("prompt %s interrupted at node %s", self.prompt_id, node_id)
            raise _NodeFailure("execution_interrupted", {"prompt_id": self.prompt_id, "node_id": node_id,
                                                         "node_type": class_type, "executed": list(self.executed)})
        except Exception as exc:
            log.exception("node %s (%s) failed", node_id, class_type)
            raise _NodeFailure("execution_error", self._error_data(node_id, exc, data))

        self.results[node_id] = outputs
        self.cache[self.signatures[node_id]] = _CacheEntry(outputs, ui or None)
        self.executed.append(node_id)
        if ui:
            self._record_ui(node_id, ui)
        self._set_progress(node_id, "finished", self.progress[node_id]["max"], self.progress[node_id]["max"])
        return True

    def _node_object(self, node_id: str, class_type: str, node_class: type) -> Any:
        objects = self.executor._node_objects
        key = (node_id, class_type)
        if key not in objects:
            objects[key] = node_class()
        return objects[key]

    def _needs_lazy_inputs(self, node_id: str, node_object: Any, data: dict, missing: set[str]) -> bool:
        """Ask the node which lazy inputs it needs; schedule those not evaluated yet."""
        requested = _map_over_list(node_object, data, "check_lazy_status")
        names = {name for result in requested if isinstance(result, list) for name in result if isinstance(name, str)}
        needed = sorted(name for name in names if name not in data or name in missing)
        inputs = self.prompt[node_id].get("inputs", {})
        for name in needed:
            if not is_link(inputs.get(name)):
                raise ValueError(f"node {node_id} ({self.prompt[node_id]['class_type']}) asked for lazy input "
                                 f"{name!r}, but that input is not connected")
            self._add_dependency(node_id, inputs[name][0])
        return bool(needed)

    def _record_ui(self, node_id: str, ui: dict) -> None:
        self.ui_outputs[node_id] = ui
        self.listener.send("executed", {"node": node_id, "display_node": node_id, "output": ui,
                                        "prompt_id": self.prompt_id})

    def _on_progress(self, node_id: str, step: int, total: int, preview: torch.Tensor | None) -> None:
        self.listener.send("progress", {"value": step, "max": total, "prompt_id": self.prompt_id, "node": node_id})
        self._set_progress(node_id, "running", step, total)
        if self.previews and preview is not None:
            try:
                image = latent_preview(preview)
            except ValueError as exc:
                log.debug("no preview for node %s: %s", node_id, exc)
            else:
                self.listener.send_preview(node_id, self.prompt_id, image)
        check_interrupt()

    def _set_progress(self, node_id: str, state: str, value: float, maximum: float) -> None:
        self.progress[node_id] = {"value": value, "max": maximum, "state": state, "node_id": node_id,
                                  "prompt_id": self.prompt_id, "display_node_id": node_id,
                                  "parent_node_id": None, "real_node_id": node_id}
        self.listener.send("progress_state", {"prompt_id": self.prompt_id,
                                              "nodes": {key: dict(value) for key, value in self.progress.items()}})

    def _error_data(self, node_id: str | None, exc: BaseException, data: dict) -> dict:
        return {
            "prompt_id": self.prompt_id,
            "node_id": node_id,
            "node_type": self._class_type(node_id) if node_id is not None else None,
            "executed": list(self.executed),
            "exception_message": str(exc),
            "exception_type": full_type_name(type(exc)),
            "traceback": traceback.format_tb(exc.__traceback__),
            "current_inputs": {name: [_format_value(item) for item in values] for name, values in data.items()},
            "current_outputs": sorted(self.results),
        }


def outputs_summary(outputs: dict[str, dict]) -> str:
    """`9 (1 images), 12 (2 text)`: per output node, how many items of each kind its UI output holds."""
    parts = []
    for node_id, ui in outputs.items():
        counts = ", ".join(f"{len(items)} {kind}" for kind, items in ui.items() if isinstance(items, list))
        parts.append(f"{node_id} ({counts})" if counts else node_id)
    return ", ".join(parts) or "none"


def _merge_results(node_id: str, node_class: type, returned: list) -> tuple[list[list], dict]:
    """One list per output slot over all calls (OUTPUT_IS_LIST slots are concatenated), and the UI dicts
    of all calls merged key by key."""
    results, uis = [], []
    for value in returned:
        if isinstance(value, dict):
            if "expand" in value:
                raise NotImplementedError(f"node {node_id} ({node_class.__name__}) returned a graph expansion, "
                                          "which this host does not support")
            if "ui" in value:
                uis.append(value["ui"])
            if "result" in value:
                results.append(value["result"])
        elif isinstance(value, (tuple, list)):
            results.append(value)
        else:
            raise TypeError(f"node {node_id} ({node_class.__name__}): {node_class.FUNCTION}() returned "
                            f"{type(value).__name__}; expected a tuple of {len(node_class.RETURN_TYPES)} outputs "
                            f"{tuple(node_class.RETURN_TYPES)} or a dict with 'ui' and/or 'result'")
    outputs: list[list] = []
    if results:
        output_is_list = getattr(node_class, "OUTPUT_IS_LIST", [False] * len(results[0]))
        for index, is_list in zip(range(len(results[0])), output_is_list):
            outputs.append([item for result in results for item in result[index]] if is_list
                           else [result[index] for result in results])
    ui = {key: [item for part in uis for item in part[key]] for key in uis[0]} if uis else {}
    return outputs, ui


def _format_value(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return str(value)
