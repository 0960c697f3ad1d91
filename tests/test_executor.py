"""Registry, prompt validation and execution, on the cheap nodes of tests/host_test_nodes.py."""

from __future__ import annotations

import copy
import json
import os
import threading

import numpy
import pytest
import torch
from PIL import Image

import comfyui_workflow_templates_json
import host_test_nodes
from flux2_core.preview import latent_preview
from flux2_core.vae import patchify_latent
from flux2_host import folders
from flux2_host.executor import PromptExecutor, types_match, validate_prompt
from flux2_host.registry import NodeRegistry
from flux2_host.workflow import apply_overrides, to_api_prompt


class RecordingListener:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []
        self.previews: list[tuple[str, str, Image.Image]] = []

    def send(self, event: str, data: dict) -> None:
        self.events.append((event, data))

    def send_preview(self, node_id: str, prompt_id: str, image: Image.Image) -> None:
        self.previews.append((node_id, prompt_id, image))

    def names(self) -> list[str]:
        return [event for event, _ in self.events]

    def of(self, name: str) -> list[dict]:
        return [data for event, data in self.events if event == name]


@pytest.fixture
def registry() -> NodeRegistry:
    registry = NodeRegistry()
    registry.add_pack(host_test_nodes.NODE_CLASS_MAPPINGS, host_test_nodes.NODE_DISPLAY_NAME_MAPPINGS, "tests")
    return registry


@pytest.fixture
def executor(registry) -> PromptExecutor:
    return PromptExecutor(registry)


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def run(executor: PromptExecutor, prompt: dict, extra_data: dict | None = None, prompt_id: str = "p1"):
    """Validate like the server does, then execute the valid outputs."""
    prompt = copy.deepcopy(prompt)
    validation = validate_prompt(prompt, executor.registry)
    assert validation.ok, validation
    listener = RecordingListener()
    result = executor.execute(prompt, prompt_id, extra_data or {}, validation.outputs, listener)
    return result, listener


# ---------------------------------------------------------------------------------------------------------------
# Registry


def test_object_info_has_the_frontend_shape(registry):
    info = registry.object_info_for("TestAddInts")
    assert info == {
        "input": {"required": {"a": ["INT", {"default": 0}], "b": ["INT", {"default": 0}]}},
        "input_order": {"required": ["a", "b"]},
        "is_input_list": False,
        "output": ["INT"], "output_is_list": [False], "output_name": ["sum"], "output_tooltips": [],
        "name": "TestAddInts", "display_name": "TestAddInts", "description": "",
        "python_module": "tests", "category": "testing",
        "output_node": False, "deprecated": False, "experimental": False,
    }
    assert json.loads(json.dumps(registry.object_info())) == registry.object_info()
    assert registry.object_info()["TestConstantInt"]["display_name"] == "Constant Int (test)"
    assert registry.object_info_for("TestShowAnything")["output_node"] is True
    assert registry.object_info_for("TestMakeList")["output_is_list"] == [True]
    assert registry.object_info_for("TestSumList")["is_input_list"] is True
    bare = registry.object_info_for("TestUndecorated")
    assert (bare["category"], bare["output_name"], bare["description"]) == ("sd", ["INT"], "")


def test_combo_choices_are_read_when_asked(registry):
    class Files:
        choices = ["a.safetensors"]

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"name": (list(cls.choices),)}}

        RETURN_TYPES = ("STRING",)

    registry.add_pack({"TestFiles": Files}, None, "tests")
    assert registry.object_info_for("TestFiles")["input"]["required"]["name"] == [["a.safetensors"]]
    Files.choices = ["a.safetensors", "b.safetensors"]
    assert registry.object_info_for("TestFiles")["input"]["required"]["name"] == [["a.safetensors", "b.safetensors"]]


def test_a_later_pack_cannot_replace_a_node_id(registry, caplog):
    class Impostor:
        pass

    registry.add_pack({"TestAddInts": Impostor, "TestNew": Impostor}, {"TestAddInts": "Fake"}, "custom_nodes.other")
    assert registry.classes["TestAddInts"] is host_test_nodes.AddInts
    assert registry.display_names.get("TestAddInts") != "Fake"
    assert registry.python_modules["TestNew"] == "custom_nodes.other"
    assert "TestAddInts" in caplog.text


def test_default_registry_loads_what_imports_and_logs_the_rest():
    registry = NodeRegistry.default()
    for class_type, module in registry.python_modules.items():
        assert module in ("nodes", "custom_nodes.flux2"), class_type
    # Every entry it has must render: the frontend refuses to start on a broken definition.
    info = registry.object_info()
    assert all(entry["python_module"] and entry["category"] for entry in info.values())


# ---------------------------------------------------------------------------------------------------------------
# Validation: one test per ComfyUI error type


def only_error(result, node_id: str) -> dict:
    errors = result.node_errors[node_id]["errors"]
    assert len(errors) == 1, errors
    return errors[0]


def test_unknown_class_is_missing_node_type(registry):
    result = validate_prompt({"1": node("NoSuchNode"), "2": node("TestShowAnything", value=1)}, registry)
    assert not result.ok
    assert result.error["type"] == "missing_node_type"
    assert result.error["extra_info"] == {"node_id": "1", "class_type": "NoSuchNode", "node_title": "NoSuchNode"}
    assert (result.outputs, result.node_errors) == ([], {})


def test_node_without_class_type_is_missing_node_type(registry):
    result = validate_prompt({"7": {"inputs": {}, "_meta": {"title": "Lost"}}}, registry)
    assert result.error["type"] == "missing_node_type"
    assert result.error["extra_info"]["class_type"] is None
    assert "Lost" in result.error["message"]


def test_prompt_without_output_node(registry):
    result = validate_prompt({"1": node("TestConstantInt", value=1)}, registry)
    assert (result.ok, result.error["type"]) == (False, "prompt_no_outputs")


def test_required_input_missing(registry):
    result = validate_prompt({"1": node("TestAddInts", a=1), "2": node("TestShowAnything", value=["1", 0])}, registry)
    assert not result.ok
    assert result.error["type"] == "prompt_outputs_failed_validation"
    assert result.node_errors == {"1": {"errors": [{
        "type": "required_input_missing", "message": "Required input is missing", "details": "b",
        "extra_info": {"input_name": "b"}}], "dependent_outputs": ["2"], "class_type": "TestAddInts"}}
    # The cause is named (node, type, input, reason) although the output node itself has no errors of its own.
    assert result.error["details"] == "node 1 (TestAddInts) input b: Required input is missing: b"
    # Optional inputs may be left out.
    assert validate_prompt({"1": node("TestConcatStrings", a="x"), "2": node("TestShowAnything", value=["1", 0])},
                           registry).ok


@pytest.mark.parametrize("value", [["1", 0, 0], ["9", 0], ["1", 3]])
def test_bad_linked_input(registry, value):
    result = validate_prompt({"1": node("TestConstantInt", value=1), "2": node("TestShowAnything", value=value)},
                             registry)
    error = only_error(result, "2")
    assert error["type"] == "bad_linked_input"
    assert error["extra_info"]["input_name"] == "value"
    assert error["extra_info"]["received_value"] == value


def test_return_type_mismatch(registry):
    prompt = {"1": node("TestConstantString", text="x"), "2": node("TestShowInt", value=["1", 0])}
    error = only_error(validate_prompt(prompt, registry), "2")
    assert error["type"] == "return_type_mismatch"
    assert error["extra_info"]["received_type"] == "STRING"
    assert error["extra_info"]["linked_node"] == ["1", 0]
    assert error["details"] == "value, received_type(STRING) mismatch input_type(INT)"


def test_invalid_input_type(registry):
    error = only_error(validate_prompt({"1": node("TestShowInt", value="seven")}, registry), "1")
    assert error["type"] == "invalid_input_type"
    assert error["message"] == "Failed to convert an input value to a INT value"
    assert error["extra_info"]["received_value"] == "seven"


def test_value_smaller_than_min_and_bigger_than_max(registry):
    prompt = {"1": node("TestConstantInt", value=-101), "2": node("TestConstantInt", value=101),
              "3": node("TestAddInts", a=["1", 0], b=["2", 0]), "4": node("TestShowAnything", value=["3", 0])}
    result = validate_prompt(prompt, registry)
    assert only_error(result, "1")["type"] == "value_smaller_than_min"
    assert only_error(result, "1")["message"] == "Value -101 smaller than min of -100"
    assert only_error(result, "2")["type"] == "value_bigger_than_max"
    assert result.node_errors["2"]["dependent_outputs"] == ["4"]


def test_value_not_in_list(registry):
    prompt = {"1": node("TestChoice", choice="purple"), "2": node("TestShowAnything", value=["1", 0])}
    error = only_error(validate_prompt(prompt, registry), "1")
    assert error["type"] == "value_not_in_list"
    assert error["details"] == "choice: 'purple' not in ['red', 'green', 'blue']"


def test_custom_validation_failed(registry):
    prompt = {"1": node("TestEvenOnly", value=3), "2": node("TestShowAnything", value=["1", 0])}
    error = only_error(validate_prompt(prompt, registry), "1")
    assert error == {"type": "custom_validation_failed", "message": "Custom validation failed for node",
                     "details": "value - 3 is odd", "extra_info": {"input_name": "value"}}
    # VALIDATE_INPUTS owns its inputs: the declared max of 10 is not checked by the host.
    prompt["1"]["inputs"]["value"] = 12
    assert validate_prompt(prompt, registry).ok


def test_exception_during_inner_validation(registry):
    prompt = {"1": node("TestBrokenValidation", value=1), "2": node("TestShowAnything", value=["1", 0])}
    error = only_error(validate_prompt(prompt, registry), "1")
    assert error["type"] == "exception_during_inner_validation"
    assert error["extra_info"]["exception_message"] == "validator crashed"
    assert error["extra_info"]["exception_type"] == "ValueError"
    assert error["extra_info"]["linked_node"] == ["1", 0]


def test_static_cycle_is_rejected(registry):
    prompt = {"1": node("TestAddInts", a=["2", 0], b=1), "2": node("TestAddInts", a=["1", 0], b=1),
              "3": node("TestShowAnything", value=["1", 0])}
    result = validate_prompt(prompt, registry)
    assert not result.ok
    assert result.error["type"] == "prompt_outputs_failed_validation"
    for node_id in ("1", "2"):
        error = only_error(result, node_id)
        assert error["type"] == "dependency_cycle"
        assert sorted(error["extra_info"]["cycle_nodes"]) == ["1", "2"]


def test_partial_success_keeps_the_valid_outputs(registry):
    prompt = {"1": node("TestConstantInt", value=1), "2": node("TestShowAnything", value=["1", 0]),
              "3": node("TestChoice", choice="purple"), "4": node("TestShowAnything", value=["3", 0])}
    result = validate_prompt(prompt, registry)
    assert (result.ok, result.error, result.outputs) == (True, None, ["2"])
    assert list(result.node_errors) == ["3"]
    assert result.node_errors["3"]["dependent_outputs"] == ["4"]


def test_partial_targets_limit_the_outputs(registry):
    prompt = {"1": node("TestShowAnything", value=1), "2": node("TestShowAnything", value=2)}
    assert validate_prompt(prompt, registry, partial_targets=["2"]).outputs == ["2"]
    assert validate_prompt(prompt, registry, partial_targets=["9"]).error["type"] == "prompt_no_outputs"


def test_literals_are_normalized_in_place(registry):
    prompt = {"1": node("TestAddInts", a="2", b=3.9), "2": node("TestShowInt", value=["1", 0]),
              "3": node("TestShowAnything", value={"__value__": [1, 2]})}
    assert validate_prompt(prompt, registry).ok
    assert prompt["1"]["inputs"] == {"a": 2, "b": 3}
    assert prompt["3"]["inputs"]["value"] == [1, 2]


def test_type_matching_rules():
    assert types_match("INT", "INT")
    assert types_match("INT", "*") and types_match("*", "MODEL")
    assert types_match("INT,FLOAT", "FLOAT") and types_match("STRING", "INT,STRING")
    assert not types_match("STRING", "INT")
    assert types_match(["a", "b"], "COMBO")  # a node returning its choices feeds a COMBO input
    assert types_match(["a", "b"], ["a", "b"]) and not types_match(["a"], ["a", "b"])
    assert not types_match("STRING", ["a", "b"])


def test_any_typed_output_feeds_typed_inputs(registry):
    prompt = {"1": node("TestLazySwitch", switch=True, on_false=1, on_true=2), "2": node("TestShowInt", value=["1", 0])}
    assert validate_prompt(prompt, registry).ok


# ---------------------------------------------------------------------------------------------------------------
# Execution


def chain_prompt(seed: int = 5, loader: int = 1) -> dict:
    """A FLUX-like shape: a 'loader' and an 'encoder' that do not depend on the seed, a 'sampler' that does."""
    return {
        "loader": node("TestConstantInt", value=loader),
        "encode": node("TestAddInts", a=["loader", 0], b=10),
        "seed": node("TestConstantInt", value=seed),
        "sample": node("TestAddInts", a=["encode", 0], b=["seed", 0]),
        "save": node("TestShowInt", value=["sample", 0]),
        "unused": node("TestConstantInt", value=99),
    }


def test_runs_only_what_outputs_need_in_dependency_order(executor):
    result, listener = run(executor, chain_prompt())
    assert result.status == "success"
    assert set(result.executed) == {"loader", "encode", "seed", "sample", "save"}
    order = result.executed
    assert order.index("loader") < order.index("encode") < order.index("sample") < order.index("save")
    assert order.index("seed") < order.index("sample")
    assert result.outputs == {"save": {"text": ["16"]}}


def test_events_follow_comfyui(executor):
    result, listener = run(executor, chain_prompt(), prompt_id="abc")
    names = listener.names()
    assert names[:2] == ["execution_start", "execution_cached"]
    assert names[-2:] == ["execution_success", "executing"]
    assert listener.events[-1][1] == {"node": None, "prompt_id": "abc"}
    assert listener.of("execution_cached")[0]["nodes"] == []
    executing = [data for data in listener.of("executing") if data["node"] is not None]
    assert [data["node"] for data in executing] == result.executed
    assert all(data["display_node"] == data["node"] and data["prompt_id"] == "abc" for data in executing)
    assert listener.of("executed") == [{"node": "save", "display_node": "save", "output": {"text": ["16"]},
                                        "prompt_id": "abc"}]
    assert [event for event, _ in result.messages] == ["execution_start", "execution_cached", "execution_success"]
    assert all("timestamp" in data for _, data in result.messages)
    states = listener.of("progress_state")[-1]["nodes"]
    assert states["save"]["state"] == "finished" and states["save"]["node_id"] == "save"


def test_cache_across_prompts(executor):
    first, _ = run(executor, chain_prompt(seed=5))
    assert len(first.executed) == 5

    # Identical prompt: nothing runs, everything is reported cached, the output still reports its UI.
    again, listener = run(executor, chain_prompt(seed=5))
    assert again.executed == []
    assert set(again.cached) == set(chain_prompt())  - {"unused"}
    assert listener.of("execution_cached")[0]["nodes"] == again.cached
    assert listener.of("executed")[0]["output"] == {"text": ["16"]}
    assert again.outputs == {"save": {"text": ["16"]}}
    assert [data["node"] for data in listener.of("executing")] == [None]

    # Seed only: the seed's descendants re-run, the loader branch comes from cache.
    reseeded, _ = run(executor, chain_prompt(seed=6))
    assert set(reseeded.executed) == {"seed", "sample", "save"}
    assert {"loader", "encode"} <= set(reseeded.cached)
    assert reseeded.outputs == {"save": {"text": ["17"]}}

    # A change upstream re-runs everything below it.
    reloaded, _ = run(executor, chain_prompt(seed=6, loader=2))
    assert set(reloaded.executed) == {"loader", "encode", "sample", "save"}


def test_entries_unused_by_a_prompt_are_dropped(executor):
    run(executor, chain_prompt(seed=5))
    run(executor, {"other": node("TestShowInt", value=1)})
    back, _ = run(executor, chain_prompt(seed=5))
    assert len(back.executed) == 5


def test_cache_keys_do_not_depend_on_node_ids(executor):
    run(executor, {"1": node("TestConstantInt", value=3), "2": node("TestShowInt", value=["1", 0])})
    renamed, _ = run(executor, {"a": node("TestConstantInt", value=3), "b": node("TestShowInt", value=["a", 0])})
    assert renamed.executed == []


def test_is_changed_controls_reruns(executor):
    prompt = {"1": node("TestEvenOnly", value=2), "2": node("TestAlwaysChanged", value=["1", 0]),
              "3": node("TestShowInt", value=["2", 0])}
    host_test_nodes.EvenOnly.token = "a"
    first, _ = run(executor, prompt)
    assert first.executed == ["1", "2", "3"]
    second, _ = run(executor, prompt)
    assert second.executed == ["2", "3"]  # NaN from IS_CHANGED: always re-run, and its descendants with it
    host_test_nodes.EvenOnly.token = "b"
    third, _ = run(executor, prompt)
    assert third.executed == ["1", "2", "3"]


def test_free_memory_drops_cached_outputs(executor):
    run(executor, chain_prompt())
    executor.free_memory(unload_models=True)
    again, _ = run(executor, chain_prompt())
    assert len(again.executed) == 5


def test_node_objects_are_reused_between_prompts(executor, registry):
    class Loader:
        instances = 0

        def __init__(self):
            Loader.instances += 1

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"name": ("STRING", {"default": ""})}}

        RETURN_TYPES = ("INT",)
        FUNCTION = "run"

        def run(self, name):
            return (len(name),)

    registry.add_pack({"TestLoader": Loader}, None, "tests")
    for name in ("a", "bb"):
        result, _ = run(executor, {"1": node("TestLoader", name=name), "2": node("TestShowInt", value=["1", 0])})
        assert result.executed == ["1", "2"]
    assert Loader.instances == 1


def test_list_outputs_map_downstream_nodes(executor):
    prompt = {"1": node("TestMakeList", count=3), "2": node("TestAddInts", a=["1", 0], b=10),
              "3": node("TestShowAnything", value=["2", 0]), "4": node("TestSumList", values=["1", 0]),
              "5": node("TestShowAnything", value=["4", 0])}
    result, _ = run(executor, prompt)
    assert result.outputs["3"] == {"text": ["10", "11", "12"]}
    assert result.outputs["5"] == {"text": ["3"]}


def test_lazy_inputs_only_evaluate_what_is_asked_for(executor):
    prompt = {"boom": node("TestExplode", value=1), "one": node("TestConstantInt", value=1),
              "switch": node("TestLazySwitch", switch=False, on_false=["one", 0], on_true=["boom", 0]),
              "show": node("TestShowAnything", value=["switch", 0])}
    result, _ = run(executor, prompt)
    assert result.status == "success"
    assert "boom" not in result.executed
    assert result.executed.index("one") < result.executed.index("switch")
    assert result.outputs["show"] == {"text": ["1"]}


def test_hidden_inputs_are_filled(executor):
    prompt = {"h": node("TestHiddenInputs", value=1)}
    result, _ = run(executor, prompt, extra_data={"extra_pnginfo": {"workflow": {"nodes": []}}})
    assert result.outputs["h"] == {"seen": [{"prompt_ids": ["h"], "extra_pnginfo": {"workflow": {"nodes": []}},
                                             "unique_id": "h"}]}


def test_node_error_is_reported_not_raised(executor):
    prompt = {"1": node("TestConstantInt", value=4), "2": node("TestExplode", value=["1", 0]),
              "3": node("TestShowAnything", value=["2", 0])}
    result, listener = run(executor, prompt, prompt_id="err")
    assert result.status == "error"
    error = listener.of("execution_error")[0]
    assert error == result.error
    assert set(error) >= {"prompt_id", "node_id", "node_type", "executed", "exception_message", "exception_type",
                          "traceback", "current_inputs", "current_outputs"}
    assert (error["prompt_id"], error["node_id"], error["node_type"]) == ("err", "2", "TestExplode")
    assert error["exception_message"] == "boom with value 4"
    assert error["exception_type"] == "RuntimeError"
    assert error["executed"] == ["1"]
    assert error["current_inputs"] == {"value": [4]}
    assert isinstance(error["traceback"], list) and error["traceback"]
    assert listener.names()[-2:] == ["execution_error", "executing"]
    assert "execution_success" not in listener.names()

    # The executor keeps working, and what succeeded before the error is cached.
    prompt["2"] = node("TestAddInts", a=["1", 0], b=1)
    after, _ = run(executor, prompt)
    assert after.status == "success" and after.executed == ["2", "3"]


def test_a_function_returning_a_bare_value_is_a_clear_error(executor):
    result, _ = run(executor, {"1": node("TestReturnsBareValue"), "2": node("TestShowInt", value=["1", 0])})
    assert result.status == "error"
    assert result.error["exception_type"] == "TypeError"
    assert result.error["exception_message"] == ("node 1 (ReturnsBareValue): run() returned int; expected a tuple "
                                                 "of 1 outputs ('INT',) or a dict with 'ui' and/or 'result'")


def test_unvalidated_problems_are_reported_not_raised(executor):
    listener = RecordingListener()
    cycle = {"1": node("TestAddInts", a=["2", 0], b=1), "2": node("TestAddInts", a=["1", 0], b=1),
             "3": node("TestShowAnything", value=["1", 0])}
    result = executor.execute(cycle, "c", {}, ["3"], listener)
    assert result.status == "error"
    assert result.error["exception_type"] == "graph.DependencyCycleError"

    unknown = {"1": node("NoSuchNode"), "2": node("TestShowAnything", value=["1", 0])}
    result = executor.execute(unknown, "u", {}, ["2"], RecordingListener())
    assert (result.status, result.error["node_id"]) == ("error", "1")
    assert "NoSuchNode" in result.error["exception_message"]

    class BrokenDefinition:
        @classmethod
        def INPUT_TYPES(cls):
            raise OSError("models folder unreadable")

        RETURN_TYPES = ("INT",)

    executor.registry.add_pack({"TestBrokenDefinition": BrokenDefinition}, None, "tests")
    broken = {"1": node("TestBrokenDefinition"), "2": node("TestShowAnything", value=["1", 0])}
    result = executor.execute(broken, "b", {}, ["2"], RecordingListener())
    assert (result.status, result.error["exception_message"]) == ("error", "models folder unreadable")


def test_progress_events_and_previews(executor):
    prompt = {"1": node("TestSlowCounter", value=0, steps=3, delay=0.0), "2": node("TestShowInt", value=["1", 0])}
    result, listener = run(executor, prompt, prompt_id="prog")
    assert [(data["value"], data["max"], data["node"], data["prompt_id"]) for data in listener.of("progress")] == \
        [(1, 3, "1", "prog"), (2, 3, "1", "prog"), (3, 3, "1", "prog")]
    running = [data["nodes"]["1"] for data in listener.of("progress_state") if data["nodes"]["1"]["state"] == "running"]
    assert running[-1]["value"] == 3
    assert listener.previews == []  # previews are off by default, as in ComfyUI

    executor.free_memory(unload_models=False)
    result, listener = run(executor, prompt, extra_data={"preview_method": "auto"})
    assert [(node_id, prompt_id) for node_id, prompt_id, _ in listener.previews] == [("1", "p1")] * 3
    assert all(image.mode == "RGB" and image.size == (4, 4) for _, _, image in listener.previews)


def test_interrupt_stops_the_running_prompt(executor):
    prompt = {"1": node("TestSlowCounter", value=0, steps=10000, delay=0.001), "2": node("TestShowInt", value=["1", 0])}
    host_test_nodes.SLOW_STARTED.clear()
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(zip(("result", "listener"), run(executor, prompt))))
    worker.start()
    assert host_test_nodes.SLOW_STARTED.wait(10)
    executor.interrupt()
    worker.join(10)
    assert not worker.is_alive()
    result, listener = outcome["result"], outcome["listener"]
    assert result.status == "interrupted"
    interrupted = listener.of("execution_interrupted")[0]
    assert (interrupted["node_id"], interrupted["node_type"]) == ("1", "TestSlowCounter")
    assert "execution_error" not in listener.names() and listener.names()[-1] == "executing"
    assert len(listener.of("progress")) < 10000

    # The next prompt is not affected by the old request.
    again, _ = run(executor, {"1": node("TestSlowCounter", value=0, steps=2, delay=0.0),
                              "2": node("TestShowInt", value=["1", 0])})
    assert again.status == "success"


def test_latent_preview_shows_the_latent_layout():
    # A bright left half in the 32 VAE channels comes out as a bright left half in the preview.
    channels = torch.randn(1, 32, 16, 24) * 0.1
    channels[..., :12] += 2.0
    channels[..., 12:] -= 2.0
    image = latent_preview(patchify_latent(channels))  # packed [1, 128, 8, 12]
    assert (image.mode, image.size) == ("RGB", (24, 16))
    gray = torch.from_numpy(numpy.asarray(image.convert("L"), dtype=numpy.float32))
    assert gray[:, :12].mean() > gray[:, 12:].mean() + 100
    with pytest.raises(ValueError, match="128"):
        latent_preview(torch.zeros(1, 16, 8, 8))


# ---------------------------------------------------------------------------------------------------------------
# The real thing: an official FLUX.2 template on the tiny demo models


@pytest.fixture(scope="module")
def flux_registry(demo_models_dir, tmp_path_factory) -> NodeRegistry:
    root = tmp_path_factory.mktemp("executor_flux")
    folders.configure(models=str(demo_models_dir), input_dir=str(root / "input"), output_dir=str(root / "output"),
                      temp_dir=str(root / "temp"))
    folders.install_as_folder_paths()
    return NodeRegistry.default()


def test_flux2_template_reuses_loaded_models_when_only_the_seed_changes(flux_registry):
    path = os.path.join(os.path.dirname(comfyui_workflow_templates_json.__file__), "templates",
                        "image_flux2_klein_text_to_image.json")
    with open(path, encoding="utf-8") as file:
        prompt = to_api_prompt(json.load(file), flux_registry)
    # 64 x 64 pixels and 2 steps keep it quick; 75:73 is the template's RandomNoise.
    prompt = apply_overrides(prompt, ["75:62.steps=2", "75:68.value=64", "75:69.value=64"])
    executor = PromptExecutor(flux_registry)

    first, listener = run(executor, prompt, extra_data={"preview_method": "auto"})
    assert first.status == "success", first.error
    # Width and height are now the same PrimitiveInt(64): identical nodes share one cache entry, as in ComfyUI.
    assert len(first.executed) == len(prompt) - 1 and len({"75:68", "75:69"} & set(first.executed)) == 1
    assert [node_id for node_id, _, _ in listener.previews] == ["75:64", "75:64"]  # one per sampling step
    assert listener.previews[0][2].size == (8, 8)

    reseeded, _ = run(executor, apply_overrides(prompt, ["75:73.noise_seed=5"]))
    assert reseeded.status == "success", reseeded.error
    # Noise -> sampler -> decode -> save; the loaders and the text encoding come from the cache.
    assert reseeded.executed == ["75:73", "75:64", "75:65", "9"]
    assert {"75:70", "75:71", "75:72", "75:74", "75:67"} <= set(reseeded.cached)

    again, _ = run(executor, apply_overrides(prompt, ["75:73.noise_seed=5"]))
    assert again.executed == []
    assert again.outputs == reseeded.outputs
