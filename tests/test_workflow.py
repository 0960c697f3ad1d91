"""UI workflow -> API prompt conversion, workflow files and command-line overrides."""

from __future__ import annotations

import json
import os
import re

import comfyui_workflow_templates_json
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import host_test_nodes
from flux2_host.executor import validate_prompt
from flux2_host.registry import NodeRegistry
from flux2_host.workflow import WorkflowError, apply_overrides, load_workflow_file, to_api_prompt

TEMPLATES_DIR = os.path.join(os.path.dirname(comfyui_workflow_templates_json.__file__), "templates")
FLUX2_TEMPLATES = sorted(name for name in os.listdir(TEMPLATES_DIR) if re.fullmatch(r"image_flux2.*\.json", name))


@pytest.fixture
def registry() -> NodeRegistry:
    registry = NodeRegistry()
    registry.add_pack(host_test_nodes.NODE_CLASS_MAPPINGS, host_test_nodes.NODE_DISPLAY_NAME_MAPPINGS, "tests")
    return registry


# ---------------------------------------------------------------------------------------------------------------
# Building UI workflows by hand


def slot(name: str, type_: str, link: int | None = None, widget: bool = False) -> dict:
    item = {"name": name, "type": type_, "link": link}
    if widget:
        item["widget"] = {"name": name}
    return item


def ui_node(node_id: int, type_: str, inputs=(), outputs=(), widgets=None, mode: int = 0, **extra) -> dict:
    node = {"id": node_id, "type": type_, "mode": mode, "inputs": list(inputs),
            "outputs": [{"name": name, "type": kind, "links": []} for name, kind in outputs], "properties": {}}
    if widgets is not None:
        node["widgets_values"] = widgets
    node.update(extra)
    return node


def workflow_04(nodes: list[dict], links: list[tuple], subgraphs: list[dict] = ()) -> dict:
    return {"version": 0.4, "nodes": nodes, "links": [list(link) for link in links],
            "definitions": {"subgraphs": list(subgraphs)}, "extra": {}}


def link_objects(links: list[tuple]) -> list[dict]:
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    return [dict(zip(keys, link)) for link in links]


def workflow_1(nodes: list[dict], links: list[tuple], subgraphs: list[dict] = ()) -> dict:
    return {"version": 1, "state": {"lastNodeId": 100, "lastLinkId": 100}, "nodes": nodes,
            "links": link_objects(links), "definitions": {"subgraphs": list(subgraphs)}, "extra": {}}


def subgraph(subgraph_id: str, inputs: list[tuple], outputs: list[tuple], nodes: list[dict],
             links: list[tuple]) -> dict:
    """inputs/outputs: (name, type, [link ids]); links inside use -10 / -20 for the subgraph's own IO nodes."""
    return {"id": subgraph_id, "version": 1, "name": subgraph_id, "nodes": nodes, "links": link_objects(links),
            "inputs": [{"id": f"{subgraph_id}-in-{i}", "name": name, "type": kind, "linkIds": ids}
                       for i, (name, kind, ids) in enumerate(inputs)],
            "outputs": [{"id": f"{subgraph_id}-out-{i}", "name": name, "type": kind, "linkIds": ids}
                        for i, (name, kind, ids) in enumerate(outputs)],
            "inputNode": {"id": -10}, "outputNode": {"id": -20}}


def api(class_type: str, title: str | None = None, **inputs) -> dict:
    return {"inputs": inputs, "class_type": class_type, "_meta": {"title": title or class_type}}


def simple_graph() -> tuple[list[dict], list[tuple]]:
    nodes = [
        ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[3, "fixed"]),
        ui_node(2, "TestSeeded", outputs=[("INT", "INT")], widgets=[42, "randomize", "hello"]),
        ui_node(3, "TestAddInts", inputs=[slot("a", "INT", 1, widget=True), slot("b", "INT", 2, widget=True)],
                outputs=[("sum", "INT")], widgets=[0, 0], title="My sum"),
        ui_node(4, "TestShowAnything", inputs=[slot("value", "*", 3)]),
        ui_node(5, "MarkdownNote", widgets=["# notes"]),
        ui_node(6, "Note", widgets=["more notes"]),
    ]
    links = [(1, 1, 0, 3, 0, "INT"), (2, 2, 0, 3, 1, "INT"), (3, 3, 0, 4, 0, "INT")]
    return nodes, links


SIMPLE_API = {
    "1": api("TestConstantInt", "Constant Int (test)", value=3),
    "2": api("TestSeeded", seed=42, label="hello"),
    "3": api("TestAddInts", "My sum", a=["1", 0], b=["2", 0]),
    "4": api("TestShowAnything", value=["3", 0]),
}


# ---------------------------------------------------------------------------------------------------------------
# Plain graphs


def test_api_prompts_pass_through(registry):
    prompt = {"1": {"class_type": "TestShowAnything", "inputs": {"value": 1}}}
    assert to_api_prompt(prompt, registry) is prompt


def test_version_04_links_as_arrays(registry):
    assert to_api_prompt(workflow_04(*simple_graph()), registry) == SIMPLE_API


def test_version_1_link_objects(registry):
    assert to_api_prompt(workflow_1(*simple_graph()), registry) == SIMPLE_API


def test_not_a_workflow(registry):
    with pytest.raises(WorkflowError, match="nodes"):
        to_api_prompt({"hello": 1}, registry)


def test_widget_values_follow_the_widget_inputs(registry):
    nodes = [
        # b is forceInput: a socket, no widget slot; separator is the second widget.
        ui_node(1, "TestConcatStrings", outputs=[("STRING", "STRING")], widgets=["x", "-"]),
        ui_node(2, "TestConcatStrings", outputs=[("STRING", "STRING")], widgets={"a": "y", "separator": "+"}),
        ui_node(3, "TestConcatStrings", outputs=[("STRING", "STRING")], widgets=["z", "*"],
                widgets_values_named={"separator": "/"}),
        ui_node(4, "TestAddInts", outputs=[("sum", "INT")], widgets=[5]),  # a value the save did not carry
        ui_node(5, "TestConstantString", outputs=[("STRING", "STRING")], widgets=[[1, 2]]),
    ]
    prompt = to_api_prompt(workflow_04(nodes, []), registry)
    assert prompt["1"]["inputs"] == {"a": "x", "separator": "-"}
    assert prompt["2"]["inputs"] == {"a": "y", "separator": "+"}
    assert prompt["3"]["inputs"] == {"a": "z", "separator": "/"}
    assert prompt["4"]["inputs"] == {"a": 5, "b": 0}
    assert prompt["5"]["inputs"] == {"text": {"__value__": [1, 2]}}


def test_unknown_node_types_are_kept_for_validation_to_report(registry):
    nodes = [ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[1, "fixed"]),
             ui_node(2, "SomeMissingPack", inputs=[slot("x", "INT", 1)], widgets=["lost"])]
    prompt = to_api_prompt(workflow_04(nodes, [(1, 1, 0, 2, 0, "INT")]), registry)
    assert prompt["2"] == api("SomeMissingPack", x=["1", 0])
    assert validate_prompt(prompt, registry).error["type"] == "missing_node_type"


def test_bypassed_node_passes_the_matching_input_through(registry):
    nodes = [
        ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[3, "fixed"]),
        ui_node(2, "TestConstantString", outputs=[("STRING", "STRING")], widgets=["s"]),
        # Bypassed, with a STRING input first: its INT output passes through the first INT input.
        ui_node(3, "TestOddPair", inputs=[slot("s", "STRING", 2), slot("n", "INT", 1)], outputs=[("INT", "INT")],
                mode=4),
        ui_node(4, "TestShowAnything", inputs=[slot("value", "INT", 3)]),
        # Bypassed with no input of the wanted type: the consumer's input stays unconnected.
        ui_node(5, "TestConstantInt", outputs=[("INT", "INT")], widgets=[1, "fixed"], mode=4),
        ui_node(6, "TestShowAnything", inputs=[slot("value", "INT", 5)]),
    ]
    links = [(1, 1, 0, 3, 1, "INT"), (2, 2, 0, 3, 0, "STRING"), (3, 3, 0, 4, 0, "INT"), (5, 5, 0, 6, 0, "INT")]
    prompt = to_api_prompt(workflow_04(nodes, links), registry)
    assert prompt["4"]["inputs"] == {"value": ["1", 0]}
    assert prompt["6"]["inputs"] == {}
    assert "3" not in prompt and "5" not in prompt


def test_muted_nodes_drop_out_with_the_inputs_that_used_them(registry):
    nodes = [
        ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[3, "fixed"], mode=2),
        ui_node(2, "TestAddInts", inputs=[slot("a", "INT", 1, widget=True)], outputs=[("sum", "INT")], widgets=[0, 4]),
        ui_node(3, "TestShowAnything", inputs=[slot("value", "*", 2)], mode=2),
        ui_node(4, "TestShowAnything", inputs=[slot("value", "*", 3)]),
    ]
    links = [(1, 1, 0, 2, 0, "INT"), (2, 2, 0, 3, 0, "INT"), (3, 2, 0, 4, 0, "INT")]
    prompt = to_api_prompt(workflow_04(nodes, links), registry)
    assert prompt == {"2": api("TestAddInts", b=4), "4": api("TestShowAnything", value=["2", 0])}


def test_reroutes_are_followed(registry):
    nodes = [
        ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[3, "fixed"]),
        ui_node(2, "Reroute", inputs=[slot("", "*", 1)], outputs=[("", "INT")]),
        ui_node(3, "Reroute", inputs=[slot("", "*", 2)], outputs=[("", "INT")]),
        ui_node(4, "TestShowAnything", inputs=[slot("value", "*", 3)]),
    ]
    links = [(1, 1, 0, 2, 0, "INT"), (2, 2, 0, 3, 0, "INT"), (3, 3, 0, 4, 0, "INT")]
    assert to_api_prompt(workflow_04(nodes, links), registry) == {
        "1": api("TestConstantInt", "Constant Int (test)", value=3), "4": api("TestShowAnything", value=["1", 0])}


def test_primitive_node_values_go_into_their_targets(registry):
    nodes = [
        ui_node(1, "PrimitiveNode", outputs=[("INT", "INT")], widgets=[9, "fixed"]),
        ui_node(2, "TestConstantInt", inputs=[slot("value", "INT", 1, widget=True)], outputs=[("INT", "INT")],
                widgets=[3, "fixed"]),
        ui_node(3, "Reroute", inputs=[slot("", "*", 2)], outputs=[("", "INT")]),
        ui_node(4, "TestAddInts", inputs=[slot("a", "INT", 3, widget=True)], outputs=[("sum", "INT")], widgets=[0, 1]),
    ]
    links = [(1, 1, 0, 2, 0, "INT"), (2, 1, 0, 3, 0, "INT"), (3, 3, 0, 4, 0, "INT")]
    prompt = to_api_prompt(workflow_04(nodes, links), registry)
    assert prompt == {"2": api("TestConstantInt", "Constant Int (test)", value=9), "4": api("TestAddInts", a=9, b=1)}


def test_broken_links_are_named(registry):
    nodes = [ui_node(4, "TestShowAnything", inputs=[slot("value", "*", 77)])]
    with pytest.raises(WorkflowError, match=r"node 4 \(TestShowAnything\).*link 77"):
        to_api_prompt(workflow_04(nodes, []), registry)
    nodes = [ui_node(4, "TestShowAnything", inputs=[slot("value", "*", 1)])]
    with pytest.raises(WorkflowError, match="node 9"):
        to_api_prompt(workflow_04(nodes, [(1, 9, 0, 4, 0, "INT")]), registry)


# ---------------------------------------------------------------------------------------------------------------
# Subgraphs


def adder_subgraph(subgraph_id: str = "sg-add") -> dict:
    """x (INT) -> AddInts.a (b = 100) -> sum; label (STRING) -> ConcatStrings.a widget -> a shown string."""
    nodes = [
        ui_node(5, "TestAddInts", inputs=[slot("a", "INT", 11, widget=True), slot("b", "INT", None, widget=True)],
                outputs=[("sum", "INT")], widgets=[0, 100]),
        ui_node(6, "TestConcatStrings", inputs=[slot("a", "STRING", 12, widget=True)],
                outputs=[("STRING", "STRING")], widgets=["inner", ""]),
        ui_node(7, "TestShowAnything", inputs=[slot("value", "*", 14)]),
    ]
    links = [(11, -10, 0, 5, 0, "INT"), (12, -10, 1, 6, 0, "STRING"), (13, 5, 0, -20, 0, "INT"),
             (14, 6, 0, 7, 0, "STRING")]
    return subgraph(subgraph_id, [("x", "INT", [11]), ("label", "STRING", [12])], [("sum", "INT", [13])], nodes, links)


def instance(node_id: int, subgraph_id: str, x_link: int | None, out_links: list[int], widgets=None,
             mode: int = 0) -> dict:
    # Both inputs end at inner widgets, so both are promoted widgets of the instance.
    node = ui_node(node_id, subgraph_id, inputs=[slot("x", "INT", x_link, widget=True),
                                                 slot("label", "STRING", None, widget=True)],
                   outputs=[("sum", "INT")], widgets=widgets, mode=mode,
                   properties={"proxyWidgets": [["-1", "x"], ["-1", "label"]]})
    node["outputs"][0]["links"] = out_links
    return node


def test_subgraph_instances_flatten_to_prefixed_ids(registry):
    nodes = [ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[4, "fixed"]),
             instance(10, "sg-add", 1, [2], widgets=[]),
             ui_node(20, "TestShowAnything", inputs=[slot("value", "*", 2)])]
    links = [(1, 1, 0, 10, 0, "INT"), (2, 10, 0, 20, 0, "INT")]
    expected = {
        "1": api("TestConstantInt", "Constant Int (test)", value=4),
        "10:5": api("TestAddInts", a=["1", 0], b=100),
        "10:6": api("TestConcatStrings", a="inner", separator=""),
        "10:7": api("TestShowAnything", value=["10:6", 0]),
        "20": api("TestShowAnything", value=["10:5", 0]),
    }
    assert to_api_prompt(workflow_1(nodes, links, [adder_subgraph()]), registry) == expected
    assert to_api_prompt(workflow_04(nodes, links, [adder_subgraph()]), registry) == expected


def test_instance_widget_values_override_the_inner_ones(registry):
    # Current saves keep the values in the inner nodes.
    prompt = to_api_prompt(workflow_1([instance(10, "sg-add", None, [], widgets=[])], [], [adder_subgraph()]),
                           registry)
    assert (prompt["10:5"]["inputs"]["a"], prompt["10:6"]["inputs"]["a"]) == (0, "inner")
    # Older saves list them on the instance, one per promoted input in input order; None keeps the inner one.
    for widgets, expected in (([7, "outer"], (7, "outer")), ([None, "outer"], (0, "outer"))):
        nodes = [instance(10, "sg-add", None, [], widgets=widgets)]
        prompt = to_api_prompt(workflow_1(nodes, [], [adder_subgraph()]), registry)
        assert (prompt["10:5"]["inputs"]["a"], prompt["10:6"]["inputs"]["a"]) == expected


def test_two_instances_of_one_subgraph_are_independent(registry):
    nodes = [ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[4, "fixed"]),
             instance(10, "sg-add", 1, [], widgets=[0, "first"]),
             instance(11, "sg-add", None, [], widgets=[5, "second"])]
    prompt = to_api_prompt(workflow_1(nodes, [(1, 1, 0, 10, 0, "INT")], [adder_subgraph()]), registry)
    assert prompt["10:5"]["inputs"]["a"] == ["1", 0] and prompt["11:5"]["inputs"]["a"] == 5
    assert (prompt["10:6"]["inputs"]["a"], prompt["11:6"]["inputs"]["a"]) == ("first", "second")


def nested_subgraph() -> dict:
    """y (INT) and name (STRING) feed an inner instance 8 of sg-add; its sum is the output."""
    inner = instance(8, "sg-add", 21, [23])
    inner["inputs"][1]["link"] = 22
    return subgraph("sg-outer", [("y", "INT", [21]), ("name", "STRING", [22])], [("total", "INT", [23])], [inner],
                    [(21, -10, 0, 8, 0, "INT"), (22, -10, 1, 8, 1, "STRING"), (23, 8, 0, -20, 0, "INT")])


def outer_instance(widgets, y_link: int | None = 1) -> dict:
    node = ui_node(30, "sg-outer", inputs=[slot("y", "INT", y_link, widget=True),
                                           slot("name", "STRING", None, widget=True)],
                   outputs=[("total", "INT")], widgets=widgets)
    node["outputs"][0]["links"] = [2]
    return node


def test_nested_subgraphs(registry):
    nodes = [ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[4, "fixed"]), outer_instance([]),
             ui_node(40, "TestShowAnything", inputs=[slot("value", "*", 2)])]
    links = [(1, 1, 0, 30, 0, "INT"), (2, 30, 0, 40, 0, "INT")]
    definitions = [nested_subgraph(), adder_subgraph()]
    prompt = to_api_prompt(workflow_1(nodes, links, definitions), registry)
    assert set(prompt) == {"1", "30:8:5", "30:8:6", "30:8:7", "40"}
    assert prompt["30:8:5"]["inputs"] == {"a": ["1", 0], "b": 100}
    assert prompt["30:8:6"]["inputs"]["a"] == "inner"  # promoted twice, still the innermost widget's value
    assert prompt["30:8:7"]["inputs"] == {"value": ["30:8:6", 0]}
    assert prompt["40"]["inputs"] == {"value": ["30:8:5", 0]}

    nodes[1] = outer_instance([3, "deep"])
    assert to_api_prompt(workflow_1(nodes, links, definitions), registry)["30:8:6"]["inputs"]["a"] == "deep"


def test_subgraph_definitions_may_be_nested_in_definitions(registry):
    outer = nested_subgraph()
    outer["definitions"] = {"subgraphs": [adder_subgraph()]}
    prompt = to_api_prompt(workflow_1([outer_instance([3, "x"], y_link=None)], [], [outer]), registry)
    assert prompt["30:8:5"]["inputs"]["a"] == 3


def test_subgraph_input_wired_straight_to_an_output(registry):
    passthrough = subgraph("sg-pass", [("x", "INT", [31])], [("x", "INT", [31])], [], [(31, -10, 0, -20, 0, "INT")])
    node = ui_node(10, "sg-pass", inputs=[slot("x", "INT", 1)], outputs=[("x", "INT")])
    nodes = [ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[4, "fixed"]), node,
             ui_node(20, "TestShowAnything", inputs=[slot("value", "*", 2)])]
    prompt = to_api_prompt(workflow_1(nodes, [(1, 1, 0, 10, 0, "INT"), (2, 10, 0, 20, 0, "INT")], [passthrough]),
                           registry)
    assert prompt["20"]["inputs"] == {"value": ["1", 0]}


@pytest.mark.parametrize("mode, shown", [(4, {"value": ["1", 0]}), (2, {})])
def test_bypassed_or_muted_instance_takes_its_content_along(registry, mode, shown):
    nodes = [ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[4, "fixed"]),
             instance(10, "sg-add", 1, [2], mode=mode),
             ui_node(20, "TestShowAnything", inputs=[slot("value", "*", 2)])]
    links = [(1, 1, 0, 10, 0, "INT"), (2, 10, 0, 20, 0, "INT")]
    prompt = to_api_prompt(workflow_1(nodes, links, [adder_subgraph()]), registry)
    assert sorted(prompt) == ["1", "20"]  # the inner output node 7 does not run either
    assert prompt["20"]["inputs"] == shown


def test_muted_node_inside_a_subgraph(registry):
    definition = adder_subgraph()
    definition["nodes"][0]["mode"] = 2
    nodes = [instance(10, "sg-add", None, [2]), ui_node(20, "TestShowAnything", inputs=[slot("value", "*", 2)])]
    prompt = to_api_prompt(workflow_1(nodes, [(2, 10, 0, 20, 0, "INT")], [definition]), registry)
    assert "10:5" not in prompt and prompt["20"]["inputs"] == {}


def test_legacy_instance_values_skip_control_after_generate_slots(registry):
    nodes = [ui_node(2, "TestSeeded", inputs=[slot("seed", "INT", 41, widget=True),
                                              slot("label", "STRING", 42, widget=True)],
                     outputs=[("INT", "INT")], widgets=[1, "fixed", "in"]),
             ui_node(3, "TestShowAnything", inputs=[slot("value", "*", 43)])]
    seeded = subgraph("sg-seed", [("seed", "INT", [41]), ("label", "STRING", [42])], [], nodes,
                      [(41, -10, 0, 2, 0, "INT"), (42, -10, 1, 2, 1, "STRING"), (43, 2, 0, 3, 0, "INT")])
    host = ui_node(10, "sg-seed", inputs=[slot("seed", "INT", None, widget=True),
                                          slot("label", "STRING", None, widget=True)],
                   widgets=[77, "randomize", "out"])
    prompt = to_api_prompt(workflow_1([host], [], [seeded]), registry)
    assert prompt["10:2"]["inputs"] == {"seed": 77, "label": "out"}


def test_a_subgraph_containing_itself_is_refused(registry):
    loop = subgraph("sg-loop", [], [], [ui_node(1, "sg-loop")], [])
    with pytest.raises(WorkflowError, match="contains itself"):
        to_api_prompt(workflow_1([ui_node(5, "sg-loop")], [], [loop]), registry)


# ---------------------------------------------------------------------------------------------------------------
# The official FLUX.2 templates


@pytest.fixture(scope="module")
def template_registry() -> NodeRegistry:
    return NodeRegistry.default()


def load_template(name: str) -> dict:
    with open(os.path.join(TEMPLATES_DIR, name), encoding="utf-8") as file:
        return json.load(file)


def test_the_flux2_templates_are_there():
    assert len(FLUX2_TEMPLATES) >= 8
    assert "image_flux2_text_to_image.json" in FLUX2_TEMPLATES


@pytest.mark.parametrize("name", FLUX2_TEMPLATES)
def test_official_template_flattens_to_a_valid_prompt(template_registry, name):
    workflow = load_template(name)
    prompt = to_api_prompt(workflow, template_registry)
    subgraph_ids = {definition["id"] for definition in workflow.get("definitions", {}).get("subgraphs", [])}
    assert prompt
    for node_id, node in prompt.items():
        assert re.fullmatch(r"\d+(:\d+)*", node_id), node_id
        assert node["class_type"] in template_registry.classes, (node_id, node["class_type"])
        assert node["class_type"] not in subgraph_ids | {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
        for name_, value in node["inputs"].items():
            if isinstance(value, list):
                source, index = value
                assert source in prompt, (node_id, name_, value)
                assert index < len(template_registry.classes[prompt[source]["class_type"]].RETURN_TYPES)
    if subgraph_ids:
        assert any(":" in node_id for node_id in prompt)
    # Widget values landed on the right inputs: types, ranges and choices all check out. The only errors
    # allowed are model and image files this machine does not have; they must at least be file names.
    validation = validate_prompt(prompt, template_registry)
    for node_id, entry in validation.node_errors.items():
        for error in entry["errors"]:
            input_name = error["extra_info"]["input_name"]
            if error["type"] == "custom_validation_failed":  # LoadImage checks its file itself
                assert (entry["class_type"], input_name) == ("LoadImage", "image"), (node_id, error)
                file_name = prompt[node_id]["inputs"]["image"]
            else:
                assert error["type"] == "value_not_in_list" and input_name.endswith("_name"), (node_id, error)
                file_name = error["extra_info"]["received_value"]
            assert re.search(r"\.(safetensors|png|jpe?g|webp)$", file_name), (node_id, error)


def test_text_to_image_template_values(template_registry):
    prompt = to_api_prompt(load_template("image_flux2_text_to_image.json"), template_registry)
    assert prompt["9"]["inputs"] == {"filename_prefix": "Flux2_dev", "images": ["98:8", 0]}
    assert prompt["98:25"]["inputs"] == {"noise_seed": 1027111520328378}
    assert prompt["98:12"]["inputs"] == {"unet_name": "flux2_dev_fp8mixed.safetensors", "weight_dtype": "default"}
    assert prompt["98:38"]["inputs"] == {"clip_name": "mistral_3_small_flux2_bf16.safetensors", "type": "flux2",
                                         "device": "default"}
    assert prompt["98:26"]["inputs"] == {"guidance": 4, "conditioning": ["98:6", 0]}
    assert prompt["98:13"]["inputs"]["latent_image"] == ["98:47", 0]


def test_klein_template_bypassed_branch_is_left_out(template_registry):
    prompt = to_api_prompt(load_template("image_flux2_klein_text_to_image.json"), template_registry)
    # Instance 77 (distilled) and its SaveImage 78 are bypassed; instance 75 gets its prompt from node 76.
    assert not any(node_id.startswith("77") or node_id == "78" for node_id in prompt)
    assert prompt["75:74"]["inputs"]["text"] == ["76", 0]
    assert prompt["75:62"]["inputs"] == {"steps": 20, "width": ["75:68", 0], "height": ["75:69", 0]}


def test_image_edit_template_keeps_load_image_values(template_registry):
    prompt = to_api_prompt(load_template("image_flux2.json"), template_registry)
    assert prompt["46"]["inputs"] == {"image": "image_flux2_input_image.png"}
    assert prompt["45"]["inputs"] == {"upscale_method": "lanczos", "megapixels": 1, "resolution_steps": 1,
                                      "image": ["46", 0]}


# ---------------------------------------------------------------------------------------------------------------
# Files and overrides


def test_load_json_files(tmp_path, registry):
    ui_file = tmp_path / "ui.json"
    ui_file.write_text(json.dumps(workflow_04(*simple_graph())))
    assert load_workflow_file(ui_file, registry) == SIMPLE_API
    api_file = tmp_path / "api.json"
    api_file.write_text(json.dumps(SIMPLE_API))
    assert load_workflow_file(str(api_file), registry) == SIMPLE_API
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(WorkflowError, match="bad.json"):
        load_workflow_file(bad, registry)


def save_png(path, **chunks) -> None:
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)


def test_load_png_text_chunks(tmp_path, registry):
    both = tmp_path / "both.png"
    save_png(both, prompt=json.dumps(SIMPLE_API), workflow=json.dumps({"nodes": []}))
    assert load_workflow_file(both, registry) == SIMPLE_API  # the prompt that actually ran wins
    ui_only = tmp_path / "ui.png"
    save_png(ui_only, workflow=json.dumps(workflow_1(*simple_graph())))
    assert load_workflow_file(ui_only, registry) == SIMPLE_API
    plain = tmp_path / "plain.png"
    save_png(plain)
    with pytest.raises(WorkflowError, match="text chunk"):
        load_workflow_file(plain, registry)


def test_overrides():
    prompt = {"98:25": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
              "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["4", 0]}}}
    changed = apply_overrides(prompt, ["98:25.noise_seed=123", "6.text=a cat, 3.5", "6.clip=[\"5\", 1]"])
    assert changed["98:25"]["inputs"]["noise_seed"] == 123
    assert changed["6"]["inputs"] == {"text": "a cat, 3.5", "clip": ["5", 1]}
    assert prompt["98:25"]["inputs"]["noise_seed"] == 1  # the original is untouched
    assert apply_overrides(prompt, ["6.text=\"42\""])["6"]["inputs"]["text"] == "42"
    assert apply_overrides(prompt, ["6.text=x=y"])["6"]["inputs"]["text"] == "x=y"
    with pytest.raises(ValueError, match="no node '7'"):
        apply_overrides(prompt, ["7.text=x"])
    with pytest.raises(ValueError, match="no input 'txt'"):
        apply_overrides(prompt, ["6.txt=x"])
    with pytest.raises(ValueError, match="NODE_ID.INPUT=VALUE"):
        apply_overrides(prompt, ["6text"])
