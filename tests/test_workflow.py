"""UI workflow -> API prompt conversion, workflow files and command-line overrides."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable

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
# Building UI workflows by hand. Inputs are listed the way the canvas saves them: socket-only inputs first,
# then one input per widget.


def slot(name: str, type_: str, link: int | None = None, widget: bool = False) -> dict:
    item = {"name": name, "type": type_, "link": link}
    if widget:
        item["widget"] = {"name": name}
    return item


def ui_node(node_id: int, type_: str, inputs=(), outputs=(), widgets=None, mode: int = 0, **extra) -> dict:
    node = {"id": node_id, "type": type_, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": 0,
            "mode": mode, "inputs": list(inputs),
            "outputs": [{"name": name, "type": kind, "links": []} for name, kind in outputs], "properties": {}}
    if widgets is not None:
        node["widgets_values"] = widgets
    node.update(extra)
    return node


def workflow_04(nodes: list[dict], links: list[tuple], subgraphs: list[dict] = ()) -> dict:
    return {"last_node_id": 100, "last_link_id": 100, "nodes": nodes, "links": [list(link) for link in links],
            "groups": [], "config": {}, "definitions": {"subgraphs": list(subgraphs)}, "extra": {}, "version": 0.4}


def link_objects(links: list[tuple]) -> list[dict]:
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    return [dict(zip(keys, link)) for link in links]


def workflow_1(nodes: list[dict], links: list[tuple], subgraphs: list[dict] = ()) -> dict:
    return {"version": 1, "state": {"lastGroupId": 0, "lastNodeId": 100, "lastLinkId": 100, "lastRerouteId": 0},
            "nodes": nodes, "links": link_objects(links), "groups": [], "config": {},
            "definitions": {"subgraphs": list(subgraphs)}, "extra": {}}


def subgraph(subgraph_id: str, inputs: list[tuple], outputs: list[tuple], nodes: list[dict],
             links: list[tuple]) -> dict:
    """inputs/outputs: (name, type, [link ids]); links inside use -10 / -20 for the subgraph's own IO nodes."""
    return {"id": subgraph_id, "version": 1, "revision": 0, "name": f"subgraph {subgraph_id[:4]}",
            "state": {"lastGroupId": 0, "lastNodeId": 100, "lastLinkId": 100, "lastRerouteId": 0}, "config": {},
            "inputNode": {"id": -10, "bounding": [-400, 0, 120, 100]},
            "outputNode": {"id": -20, "bounding": [400, 0, 120, 100]},
            "inputs": [{"id": f"{subgraph_id[:-4]}a{i:03d}", "name": name, "type": kind, "linkIds": ids}
                       for i, (name, kind, ids) in enumerate(inputs)],
            "outputs": [{"id": f"{subgraph_id[:-4]}b{i:03d}", "name": name, "type": kind, "linkIds": ids}
                        for i, (name, kind, ids) in enumerate(outputs)],
            "widgets": [], "nodes": nodes, "groups": [], "links": link_objects(links), "extra": {}}


def api(class_type: str, title: str | None = None, **inputs) -> dict:
    return {"inputs": inputs, "class_type": class_type, "_meta": {"title": title or class_type}}


@dataclass
class Case:
    """A hand-built UI workflow and the API prompt the web frontend makes of it."""
    workflow: dict
    expected: dict
    frontend_agrees: bool = True  # False where we deliberately differ from the 1.58 frontend


CASES: dict[str, Callable[[], Case]] = {}


def case(builder: Callable[[], Case]) -> Callable[[], Case]:
    CASES[builder.__name__] = builder
    return builder


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


@case
def links_as_arrays() -> Case:
    """Version 0.4; seed-named INT widgets carry a control_after_generate value; notes drop out."""
    return Case(workflow_04(*simple_graph()), SIMPLE_API)


@case
def link_objects_and_state() -> Case:
    return Case(workflow_1(*simple_graph()), SIMPLE_API)


@case
def widget_values_follow_the_widget_inputs() -> Case:
    def concat(node_id, widgets, **extra):
        return ui_node(node_id, "TestConcatStrings",
                       inputs=[slot("b", "STRING"), slot("a", "STRING", widget=True),
                               slot("separator", "STRING", widget=True)],
                       outputs=[("STRING", "STRING")], widgets=widgets, **extra)

    nodes = [
        concat(1, ["x", "-"]),  # b is forceInput: a socket without a widget slot
        concat(2, {"a": "y", "separator": "+"}),
        concat(3, ["z", "*"], widgets_values_named={"separator": "/"}),
        ui_node(4, "TestAddInts", inputs=[slot("a", "INT", widget=True), slot("b", "INT", widget=True)],
                outputs=[("sum", "INT")], widgets=[5]),  # a value the save did not carry takes the default
    ]
    return Case(workflow_04(nodes, []), {
        "1": api("TestConcatStrings", a="x", separator="-"),
        "2": api("TestConcatStrings", a="y", separator="+"),
        "3": api("TestConcatStrings", a="z", separator="/"),
        "4": api("TestAddInts", a=5, b=0),
    }, frontend_agrees=False)  # 1.58 ignores dict-shaped and (by default) named values: all defaults


@case
def linked_widget_keeps_its_slot() -> Case:
    nodes = [ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[3, "fixed"]),
             ui_node(2, "TestAddInts", inputs=[slot("a", "INT", 1, widget=True), slot("b", "INT", widget=True)],
                     outputs=[("sum", "INT")], widgets=[0, 7])]
    return Case(workflow_04(nodes, [(1, 1, 0, 2, 0, "INT")]), {
        "1": api("TestConstantInt", "Constant Int (test)", value=3),
        "2": api("TestAddInts", a=["1", 0], b=7)})


@case
def bypassed_node_passes_a_matching_input_through() -> Case:
    nodes = [
        ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[3, "fixed"]),
        ui_node(2, "TestConstantString", inputs=[slot("text", "STRING", widget=True)],
                outputs=[("STRING", "STRING")], widgets=["s"]),
        # Bypassed; its first input is a STRING, so the INT output passes through the first INT input.
        ui_node(3, "TestStringLength", inputs=[slot("text", "STRING", 2), slot("offset", "INT", 1, widget=True)],
                outputs=[("INT", "INT")], widgets=[0], mode=4),
        ui_node(4, "TestShowInt", inputs=[slot("value", "INT", 3, widget=True)], outputs=[("INT", "INT")],
                widgets=[5]),
        # Bypassed with no input at all: the consumer's widget keeps its own value.
        ui_node(5, "TestConstantInt", inputs=[slot("value", "INT", widget=True)], outputs=[("INT", "INT")],
                widgets=[1, "fixed"], mode=4),
        ui_node(6, "TestShowInt", inputs=[slot("value", "INT", 5, widget=True)], outputs=[("INT", "INT")],
                widgets=[6]),
    ]
    links = [(1, 1, 0, 3, 1, "INT"), (2, 2, 0, 3, 0, "STRING"), (3, 3, 0, 4, 0, "INT"), (5, 5, 0, 6, 0, "INT")]
    return Case(workflow_04(nodes, links), {
        "1": api("TestConstantInt", "Constant Int (test)", value=3),
        "2": api("TestConstantString", text="s"),
        "4": api("TestShowInt", value=["1", 0]),
        "6": api("TestShowInt", value=6)})


@case
def muted_nodes_drop_out() -> Case:
    nodes = [
        ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[3, "fixed"], mode=2),
        ui_node(2, "TestAddInts", inputs=[slot("a", "INT", 1, widget=True), slot("b", "INT", widget=True)],
                outputs=[("sum", "INT")], widgets=[0, 4]),
        ui_node(3, "TestShowAnything", inputs=[slot("value", "*", 2)], mode=2),
        ui_node(4, "TestShowAnything", inputs=[slot("value", "*", 3)]),
    ]
    links = [(1, 1, 0, 2, 0, "INT"), (2, 2, 0, 3, 0, "INT"), (3, 2, 0, 4, 0, "INT")]
    # An input fed by a muted node counts as unconnected: a widget input falls back to its value.
    return Case(workflow_04(nodes, links), {"2": api("TestAddInts", a=0, b=4),
                                            "4": api("TestShowAnything", value=["2", 0])})


@case
def reroutes_are_followed() -> Case:
    nodes = [
        ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[3, "fixed"]),
        ui_node(2, "Reroute", inputs=[slot("", "*", 1)], outputs=[("", "INT")]),
        ui_node(3, "Reroute", inputs=[slot("", "*", 2)], outputs=[("", "INT")]),
        ui_node(4, "TestShowAnything", inputs=[slot("value", "*", 3)]),
    ]
    links = [(1, 1, 0, 2, 0, "INT"), (2, 2, 0, 3, 0, "INT"), (3, 3, 0, 4, 0, "INT")]
    return Case(workflow_04(nodes, links), {"1": api("TestConstantInt", "Constant Int (test)", value=3),
                                            "4": api("TestShowAnything", value=["1", 0])})


@case
def primitive_node_values_go_into_their_targets() -> Case:
    primitive = ui_node(1, "PrimitiveNode", outputs=[("INT", "INT")], widgets=[9, "fixed"])
    primitive["outputs"][0]["widget"] = {"name": "value"}
    nodes = [
        primitive,
        ui_node(2, "TestConstantInt", inputs=[slot("value", "INT", 1, widget=True)], outputs=[("INT", "INT")],
                widgets=[3, "fixed"]),
        ui_node(3, "TestAddInts", inputs=[slot("a", "INT", 2, widget=True), slot("b", "INT", widget=True)],
                outputs=[("sum", "INT")], widgets=[3, 1]),
        ui_node(4, "TestShowAnything", inputs=[slot("value", "*", 3)]),
        ui_node(5, "TestShowAnything", inputs=[slot("value", "*", 4)]),
    ]
    links = [(1, 1, 0, 2, 0, "INT"), (2, 1, 0, 3, 0, "INT"), (3, 2, 0, 4, 0, "INT"), (4, 3, 0, 5, 0, "INT")]
    return Case(workflow_04(nodes, links), {"2": api("TestConstantInt", "Constant Int (test)", value=9),
                                            "3": api("TestAddInts", a=9, b=1),
                                            "4": api("TestShowAnything", value=["2", 0]),
                                            "5": api("TestShowAnything", value=["3", 0])})


# KJNodes' SetNode / GetNode, as KJNodes saves them: the name is the one widget value, the SetNode's input and
# the GetNode's output take the type of what they carry. The 1.58 frontend alone does not know these types (their
# code is KJNodes' web extension), so the expected prompts follow KJNodes' setgetnodes.js: a GetNode resolves
# to what feeds the SetNode of its name, in its own graph first, else in the graphs around it.


def set_node(node_id: int, name: str, kind: str, link: int | None, mode: int = 0) -> dict:
    return ui_node(node_id, "SetNode", inputs=[slot(kind, kind, link)], outputs=[(kind, kind)], widgets=[name],
                   mode=mode, title=f"Set_{name}", properties={"previousName": name, "aux_id": "kijai/ComfyUI-KJNodes"})


def get_node(node_id: int, name: str, kind: str, out_links: list[int], mode: int = 0) -> dict:
    node = ui_node(node_id, "GetNode", outputs=[(kind, kind)], widgets=[name], mode=mode, title=f"Get_{name}",
                   properties={"aux_id": "kijai/ComfyUI-KJNodes"})
    node["outputs"][0]["links"] = out_links
    return node


@case
def set_and_get_nodes_carry_a_value_by_name() -> Case:
    nodes = [
        ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[3, "fixed"]),
        ui_node(2, "TestConstantInt", outputs=[("INT", "INT")], widgets=[5, "fixed"]),
        set_node(3, "three", "INT", 1),
        set_node(4, "five", "INT", 2, mode=2),  # a muted SetNode still hands its value on (the frontend skips
        get_node(5, "three", "INT", [3]),        # virtual nodes by their input, whatever their mode)
        get_node(6, "five", "INT", [4]),
        get_node(7, "nobody", "INT", [5]),       # no SetNode of that name: the target is unconnected
        ui_node(8, "TestAddInts", inputs=[slot("a", "INT", 3, widget=True), slot("b", "INT", 4, widget=True)],
                outputs=[("sum", "INT")], widgets=[0, 0]),
        ui_node(9, "TestAddInts", inputs=[slot("a", "INT", 5, widget=True), slot("b", "INT", 6, widget=True)],
                outputs=[("sum", "INT")], widgets=[7, 0]),
        ui_node(10, "TestShowAnything", inputs=[slot("value", "*", 7)]),
    ]
    links = [(1, 1, 0, 3, 0, "INT"), (2, 2, 0, 4, 0, "INT"), (3, 5, 0, 8, 0, "INT"), (4, 6, 0, 8, 1, "INT"),
             (5, 7, 0, 9, 0, "INT"), (6, 3, 0, 9, 1, "INT"), (7, 8, 0, 10, 0, "INT")]
    # Link 6: the SetNode's own output passes its input through.
    return Case(workflow_04(nodes, links), {
        "1": api("TestConstantInt", "Constant Int (test)", value=3),
        "2": api("TestConstantInt", "Constant Int (test)", value=5),
        "8": api("TestAddInts", a=["1", 0], b=["2", 0]),
        "9": api("TestAddInts", a=7, b=["1", 0]),
        "10": api("TestShowAnything", value=["8", 0]),
    }, frontend_agrees=False)


@case
def bypassed_get_node_connects_nothing() -> Case:
    nodes = [ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[3, "fixed"]),
             set_node(2, "three", "INT", 1), get_node(3, "three", "INT", [2], mode=4),
             ui_node(4, "TestShowAnything", inputs=[slot("value", "*", 2)])]
    return Case(workflow_04(nodes, [(1, 1, 0, 2, 0, "INT"), (2, 3, 0, 4, 0, "INT")]), {
        "1": api("TestConstantInt", "Constant Int (test)", value=3), "4": api("TestShowAnything")},
        frontend_agrees=False)


def getter_subgraph(subgraph_id: str, name: str, inner_setter: bool = False) -> dict:
    """A subgraph whose inner node reads `name` through a GetNode (and, if asked, sets it itself)."""
    nodes = [get_node(2, name, "INT", [41]), ui_node(3, "TestShowAnything", inputs=[slot("value", "*", 41)])]
    links = [(41, 2, 0, 3, 0, "INT")]
    if inner_setter:
        nodes += [ui_node(4, "TestConstantInt", outputs=[("INT", "INT")], widgets=[9, "fixed"]),
                  set_node(5, name, "INT", 42)]
        links.append((42, 4, 0, 5, 0, "INT"))
    return subgraph(subgraph_id, [], [], nodes, links)


@case
def get_node_in_a_subgraph_reads_a_set_node_around_it() -> Case:
    reader, shadowing = "5a0d5c6e-6666-4000-8000-00000000f000", "5a0d5c6e-7777-4000-8000-00000000f100"
    nodes = [ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[3, "fixed"]),
             set_node(2, "three", "INT", 1), ui_node(10, reader, widgets=[]), ui_node(11, shadowing, widgets=[])]
    return Case(workflow_1(nodes, [(1, 1, 0, 2, 0, "INT")],
                           [getter_subgraph(reader, "three"), getter_subgraph(shadowing, "three", True)]), {
        "1": api("TestConstantInt", "Constant Int (test)", value=3),
        "10:3": api("TestShowAnything", value=["1", 0]),
        # A SetNode in the GetNode's own graph wins over the one outside.
        "11:3": api("TestShowAnything", value=["11:4", 0]),
        "11:4": api("TestConstantInt", "Constant Int (test)", value=9),
    }, frontend_agrees=False)


@case
def bypassed_node_inside_a_subgraph_passes_its_input_through() -> Case:
    definition = adder_subgraph()
    definition["nodes"][0]["mode"] = 4  # AddInts(x, 100) bypassed: the subgraph's output is x itself
    return Case(constant_into_instance(instance(10, 1, [2], widgets=[]), definition), {
        "1": CONSTANT_API,
        "10:6": api("TestConcatStrings", a="inner", separator=""),
        "10:7": api("TestShowAnything", value=["10:6", 0]),
        "20": api("TestShowAnything", value=["1", 0]),
    })


def test_get_node_with_several_set_nodes_around_it_connects_nothing(registry, caplog):
    reader = "5a0d5c6e-8888-4000-8000-00000000f200"
    outer = "5a0d5c6e-9999-4000-8000-00000000f300"
    middle = subgraph(outer, [], [], [ui_node(20, reader, widgets=[]),
                                      ui_node(21, "TestConstantInt", outputs=[("INT", "INT")], widgets=[8, "fixed"]),
                                      set_node(22, "n", "INT", 51)], [(51, 21, 0, 22, 0, "INT")])
    nodes = [ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[3, "fixed"]), set_node(2, "n", "INT", 1),
             ui_node(10, outer, widgets=[])]
    prompt = to_api_prompt(workflow_1(nodes, [(1, 1, 0, 2, 0, "INT")], [middle, getter_subgraph(reader, "n")]),
                           registry)
    assert prompt["10:20:3"] == api("TestShowAnything")
    assert "2 SetNodes named 'n'" in caplog.text


def test_set_get_loop_is_refused(registry):
    nodes = [get_node(1, "x", "INT", [1]), set_node(2, "x", "INT", 1),
             ui_node(3, "TestShowAnything", inputs=[slot("value", "*", 2)])]
    workflow = workflow_04(nodes, [(1, 1, 0, 2, 0, "INT"), (2, 1, 0, 3, 0, "INT")])
    with pytest.raises(WorkflowError, match="loop"):
        to_api_prompt(workflow, registry)


def test_windows_model_names_match_the_listed_file(tmp_path, host_dirs_for_windows_names):
    registry = NodeRegistry.default()
    nodes = [ui_node(1, "VAELoader", outputs=[("VAE", "VAE")], widgets=["flux.2\\Tiny-VAE.safetensors"])]
    api_prompt = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": "flux.2\\tiny-vae.safetensors"}},
                  "2": {"class_type": "VAELoader", "inputs": {"vae_name": "flux.2\\missing.safetensors"}}}
    assert to_api_prompt(workflow_04(nodes, []), registry)["1"]["inputs"] == {"vae_name": "flux.2/Tiny-VAE.safetensors"}
    matched = to_api_prompt(api_prompt, registry)
    assert matched["1"]["inputs"]["vae_name"] == "flux.2/Tiny-VAE.safetensors"  # Windows ignores case too
    assert matched["2"]["inputs"]["vae_name"] == "flux.2\\missing.safetensors"  # left for validation to report
    assert api_prompt["1"]["inputs"]["vae_name"] == "flux.2\\tiny-vae.safetensors"  # the caller's prompt is untouched
    from flux2_host import folders
    assert folders.get_full_path("vae", "flux.2\\Tiny-VAE.safetensors") == str(host_dirs_for_windows_names)


@pytest.fixture
def host_dirs_for_windows_names(tmp_path):
    """A models folder with one file in a subfolder (what `flux.2\\...` names), configured as the host's."""
    from flux2_host import folders
    path = tmp_path / "models" / "vae" / "flux.2" / "Tiny-VAE.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not read")
    folders.configure(models=str(tmp_path / "models"), input_dir=str(tmp_path / "in"),
                      output_dir=str(tmp_path / "out"), temp_dir=str(tmp_path / "tmp"))
    return path


@pytest.mark.parametrize("name", CASES)
def test_hand_built_workflow(registry, name):
    built = CASES[name]()
    assert to_api_prompt(built.workflow, registry) == built.expected


def test_api_prompts_pass_through(registry):
    prompt = {"1": {"class_type": "TestShowAnything", "inputs": {"value": 1}}}
    assert to_api_prompt(prompt, registry) is prompt


def test_not_a_workflow(registry):
    with pytest.raises(WorkflowError, match="nodes"):
        to_api_prompt({"hello": 1}, registry)


def test_list_values_are_wrapped(registry):
    nodes = [ui_node(5, "TestConstantString", outputs=[("STRING", "STRING")], widgets=[[1, 2]])]
    assert to_api_prompt(workflow_04(nodes, []), registry)["5"]["inputs"] == {"text": {"__value__": [1, 2]}}


def test_unknown_node_types_are_kept_for_validation_to_report(registry):
    nodes = [ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[1, "fixed"]),
             ui_node(2, "SomeMissingPack", inputs=[slot("x", "INT", 1)], widgets=["lost"])]
    prompt = to_api_prompt(workflow_04(nodes, [(1, 1, 0, 2, 0, "INT")]), registry)
    assert prompt["2"] == api("SomeMissingPack", x=["1", 0])
    assert validate_prompt(prompt, registry).error["type"] == "missing_node_type"


def test_broken_links_are_named(registry):
    nodes = [ui_node(4, "TestShowAnything", inputs=[slot("value", "*", 77)])]
    with pytest.raises(WorkflowError, match=r"node 4 \(TestShowAnything\).*link 77"):
        to_api_prompt(workflow_04(nodes, []), registry)
    nodes = [ui_node(4, "TestShowAnything", inputs=[slot("value", "*", 1)])]
    with pytest.raises(WorkflowError, match="node 9"):
        to_api_prompt(workflow_04(nodes, [(1, 9, 0, 4, 0, "INT")]), registry)
    with pytest.raises(WorkflowError, match="malformed link"):
        to_api_prompt(workflow_04(nodes, [(1, 9)]), registry)


# ---------------------------------------------------------------------------------------------------------------
# Subgraphs

ADDER = "5a0d5c6e-1111-4000-8000-00000000a000"
OUTER = "5a0d5c6e-2222-4000-8000-00000000b000"


def adder_subgraph() -> dict:
    """x (INT) -> AddInts.a (b = 100) -> sum; label (STRING) -> ConcatStrings.a widget -> a shown string."""
    nodes = [
        ui_node(5, "TestAddInts", inputs=[slot("a", "INT", 11, widget=True), slot("b", "INT", None, widget=True)],
                outputs=[("sum", "INT")], widgets=[0, 100]),
        ui_node(6, "TestConcatStrings", inputs=[slot("b", "STRING"), slot("a", "STRING", 12, widget=True),
                                                slot("separator", "STRING", widget=True)],
                outputs=[("STRING", "STRING")], widgets=["inner", ""]),
        ui_node(7, "TestShowAnything", inputs=[slot("value", "*", 14)]),
    ]
    links = [(11, -10, 0, 5, 0, "INT"), (12, -10, 1, 6, 1, "STRING"), (13, 5, 0, -20, 0, "INT"),
             (14, 6, 0, 7, 0, "STRING")]
    return subgraph(ADDER, [("x", "INT", [11]), ("label", "STRING", [12])], [("sum", "INT", [13])], nodes, links)


def instance(node_id: int, x_link: int | None, out_links: list[int], widgets=None, mode: int = 0) -> dict:
    # Both inputs end at inner widgets, so both are promoted widgets of the instance.
    node = ui_node(node_id, ADDER, inputs=[slot("x", "INT", x_link, widget=True),
                                           slot("label", "STRING", None, widget=True)],
                   outputs=[("sum", "INT")], widgets=widgets, mode=mode,
                   properties={"proxyWidgets": [["-1", "x"], ["-1", "label"]]})
    node["outputs"][0]["links"] = out_links
    return node


def constant_into_instance(instance_node: dict, *definitions: dict) -> dict:
    nodes = [ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[4, "fixed"]), instance_node,
             ui_node(20, "TestShowAnything", inputs=[slot("value", "*", 2)])]
    links = [(1, 1, 0, instance_node["id"], 0, "INT"), (2, instance_node["id"], 0, 20, 0, "INT")]
    return workflow_1(nodes, links, definitions or [adder_subgraph()])


CONSTANT_API = api("TestConstantInt", "Constant Int (test)", value=4)


@case
def subgraph_instance_flattens_to_prefixed_ids() -> Case:
    return Case(constant_into_instance(instance(10, 1, [2], widgets=[])), {
        "1": CONSTANT_API,
        "10:5": api("TestAddInts", a=["1", 0], b=100),
        "10:6": api("TestConcatStrings", a="inner", separator=""),
        "10:7": api("TestShowAnything", value=["10:6", 0]),
        "20": api("TestShowAnything", value=["10:5", 0]),
    })


@case
def subgraph_in_a_version_04_file() -> Case:
    built = subgraph_instance_flattens_to_prefixed_ids()
    built.workflow = workflow_04(built.workflow["nodes"], [(1, 1, 0, 10, 0, "INT"), (2, 10, 0, 20, 0, "INT")],
                                 [adder_subgraph()])
    return built


@case
def instance_widget_values_override_the_inner_ones() -> Case:
    # Older saves list promoted values on the instance, one per promoted input in input order.
    nodes = [instance(10, None, [2], widgets=[7, "outer"]),
             ui_node(20, "TestShowAnything", inputs=[slot("value", "*", 2)])]
    return Case(workflow_1(nodes, [(2, 10, 0, 20, 0, "INT")], [adder_subgraph()]), {
        "10:5": api("TestAddInts", a=7, b=100),
        "10:6": api("TestConcatStrings", a="outer", separator=""),
        "10:7": api("TestShowAnything", value=["10:6", 0]),
        "20": api("TestShowAnything", value=["10:5", 0]),
    })


@case
def two_instances_of_one_subgraph_are_independent() -> Case:
    nodes = [ui_node(1, "TestConstantInt", outputs=[("INT", "INT")], widgets=[4, "fixed"]),
             instance(10, 1, [], widgets=[0, "first"]), instance(11, None, [], widgets=[5, "second"])]
    expected = {"1": CONSTANT_API}
    for prefix, a, label in (("10", ["1", 0], "first"), ("11", 5, "second")):
        expected.update({f"{prefix}:5": api("TestAddInts", a=a, b=100),
                         f"{prefix}:6": api("TestConcatStrings", a=label, separator=""),
                         f"{prefix}:7": api("TestShowAnything", value=[f"{prefix}:6", 0])})
    return Case(workflow_1(nodes, [(1, 1, 0, 10, 0, "INT")], [adder_subgraph()]), expected)


def nested_subgraph() -> dict:
    """y (INT) and name (STRING) feed an inner instance 8 of the adder; its sum is the output."""
    inner = instance(8, 21, [23])
    inner["inputs"][1]["link"] = 22
    return subgraph(OUTER, [("y", "INT", [21]), ("name", "STRING", [22])], [("total", "INT", [23])], [inner],
                    [(21, -10, 0, 8, 0, "INT"), (22, -10, 1, 8, 1, "STRING"), (23, 8, 0, -20, 0, "INT")])


def outer_instance(widgets) -> dict:
    node = ui_node(30, OUTER, inputs=[slot("y", "INT", 1, widget=True), slot("name", "STRING", None, widget=True)],
                   outputs=[("total", "INT")], widgets=widgets,
                   properties={"proxyWidgets": [["-1", "y"], ["-1", "name"]]})
    node["outputs"][0]["links"] = [2]
    return node


def nested_expected(label: str) -> dict:
    return {"1": CONSTANT_API,
            "30:8:5": api("TestAddInts", a=["1", 0], b=100),
            "30:8:6": api("TestConcatStrings", a=label, separator=""),
            "30:8:7": api("TestShowAnything", value=["30:8:6", 0]),
            "20": api("TestShowAnything", value=["30:8:5", 0])}


@case
def nested_subgraphs() -> Case:
    # Promoted twice and never overridden: still the innermost widget's value.
    return Case(constant_into_instance(outer_instance([]), nested_subgraph(), adder_subgraph()),
                nested_expected("inner"))


@case
def nested_subgraph_with_saved_values() -> Case:
    return Case(constant_into_instance(outer_instance([3, "deep"]), nested_subgraph(), adder_subgraph()),
                nested_expected("deep"))


@case
def subgraph_definitions_nested_in_definitions() -> Case:
    outer = nested_subgraph()
    outer["definitions"] = {"subgraphs": [adder_subgraph()]}
    return Case(constant_into_instance(outer_instance([]), outer), nested_expected("inner"),
                frontend_agrees=False)  # the canvas itself saves every definition at the top level


@case
def subgraph_input_wired_straight_to_an_output() -> Case:
    passthrough_id = "5a0d5c6e-3333-4000-8000-00000000c000"
    passthrough = subgraph(passthrough_id, [("x", "INT", [31])], [("x", "INT", [31])], [],
                           [(31, -10, 0, -20, 0, "INT")])
    node = ui_node(10, passthrough_id, inputs=[slot("x", "INT", 1)], outputs=[("x", "INT")])
    node["outputs"][0]["links"] = [2]
    return Case(constant_into_instance(node, passthrough), {"1": CONSTANT_API,
                                                             "20": api("TestShowAnything", value=["1", 0])},
                frontend_agrees=False)  # 1.58 fails to queue it ("No output node found")


@case
def bypassed_instance_passes_its_input_through() -> Case:
    return Case(constant_into_instance(instance(10, 1, [2], mode=4)),
                {"1": CONSTANT_API, "20": api("TestShowAnything", value=["1", 0])})


@case
def muted_instance_takes_its_content_along() -> Case:
    return Case(constant_into_instance(instance(10, 1, [2], mode=2)),
                {"1": CONSTANT_API, "20": api("TestShowAnything")})


@case
def muted_instance_inside_a_subgraph_takes_its_content_along() -> Case:
    outer = nested_subgraph()
    outer["nodes"][0]["mode"] = 2
    return Case(constant_into_instance(outer_instance([]), outer, adder_subgraph()),
                {"1": CONSTANT_API, "20": api("TestShowAnything")},
                frontend_agrees=False)  # 1.58 still queues the content of nested muted instances


@case
def muted_node_inside_a_subgraph() -> Case:
    definition = adder_subgraph()
    definition["nodes"][0]["mode"] = 2
    nodes = [instance(10, None, [2], widgets=[]), ui_node(20, "TestShowAnything", inputs=[slot("value", "*", 2)])]
    return Case(workflow_1(nodes, [(2, 10, 0, 20, 0, "INT")], [definition]), {
        "10:6": api("TestConcatStrings", a="inner", separator=""),
        "10:7": api("TestShowAnything", value=["10:6", 0]),
        "20": api("TestShowAnything"),
    })


@case
def unlinked_subgraph_input_leaves_the_inner_input_unconnected() -> Case:
    shower_id = "5a0d5c6e-9999-4000-8000-00000000f300"
    shower = subgraph(shower_id, [("value", "*", [44]), ("also", "*", [])], [],
                      [ui_node(3, "TestShowAnything", inputs=[slot("value", "*", 44)])], [(44, -10, 0, 3, 0, "*")])
    host = ui_node(10, shower_id, inputs=[slot("value", "*"), slot("also", "*")], widgets=[])
    return Case(workflow_1([host], [], [shower]), {"10:3": api("TestShowAnything")})


@case
def legacy_instance_values_skip_control_after_generate_slots() -> Case:
    seeded_id = "5a0d5c6e-4444-4000-8000-00000000d000"
    nodes = [ui_node(2, "TestSeeded", inputs=[slot("seed", "INT", 41, widget=True),
                                              slot("label", "STRING", 42, widget=True)],
                     outputs=[("INT", "INT")], widgets=[1, "fixed", "in"]),
             ui_node(3, "TestShowAnything", inputs=[slot("value", "*", 43)])]
    seeded = subgraph(seeded_id, [("seed", "INT", [41]), ("label", "STRING", [42])], [], nodes,
                      [(41, -10, 0, 2, 0, "INT"), (42, -10, 1, 2, 1, "STRING"), (43, 2, 0, 3, 0, "INT")])
    host = ui_node(10, seeded_id, inputs=[slot("seed", "INT", None, widget=True),
                                          slot("label", "STRING", None, widget=True)],
                   widgets=[77, "randomize", "out"])
    # 1.58 reads the values one per promoted input and gets label="randomize"; later frontends skip the
    # control value as we do.
    return Case(workflow_1([host], [], [seeded]), {"10:2": api("TestSeeded", seed=77, label="out"),
                                                   "10:3": api("TestShowAnything", value=["10:2", 0])},
                frontend_agrees=False)


# proxyWidgets: which inner widgets an instance shows, as [inner node id, widget name] pairs ("-1" for one of
# its own promoted inputs). The 1.58 frontend migrates them when it loads a file: the instance's
# `widgets_values` are read one per entry, in the entries' order; an entry whose widget a subgraph input
# already feeds sets that input's value, an entry naming an unlinked inner widget gets a new subgraph input
# with that value, and an entry it cannot resolve (no such node, no such widget, a control_after_generate
# value, which has no input) is dropped with its value. A value the list does not have keeps the inner one.


def proxy_instance(proxy_widgets: list, widgets: list, node_id: int = 10) -> dict:
    node = instance(node_id, None, [2], widgets=widgets)
    node["properties"]["proxyWidgets"] = proxy_widgets
    return node


def shown_instance(node: dict, definition: dict | None = None) -> dict:
    return workflow_1([node, ui_node(20, "TestShowAnything", inputs=[slot("value", "*", 2)])],
                      [(2, node["id"], 0, 20, 0, "INT")], [definition or adder_subgraph()])


def adder_api(a, b=100, label="inner", separator="") -> dict:
    return {"10:5": api("TestAddInts", a=a, b=b), "10:6": api("TestConcatStrings", a=label, separator=separator),
            "10:7": api("TestShowAnything", value=["10:6", 0]), "20": api("TestShowAnything", value=["10:5", 0])}


@case
def proxy_widgets_name_inner_nodes_in_their_own_order() -> Case:
    # Both widgets are fed by subgraph inputs (x, label) but listed label first: the values follow the list.
    return Case(shown_instance(proxy_instance([["6", "a"], ["5", "a"]], ["listed first", 9])),
                adder_api(9, label="listed first"))


@case
def proxy_widgets_promote_widgets_no_subgraph_input_feeds() -> Case:
    return Case(shown_instance(proxy_instance([["-1", "x"], ["5", "b"], ["-1", "label"], ["6", "separator"]],
                                              [7, 55, "outer", " / "])),
                adder_api(7, b=55, label="outer", separator=" / "))


@case
def proxy_widget_entries_naming_the_instance_input_win() -> Case:
    # ["-1", "x"] and ["5", "a"] both set input x; the frontend applies "-1" entries last.
    return Case(shown_instance(proxy_instance([["-1", "x"], ["5", "a"]], [1, 2])), adder_api(1, label=2))


@case
def proxy_widget_values_missing_from_the_list_keep_the_inner_ones() -> Case:
    return Case(shown_instance(proxy_instance([["-1", "x"], ["-1", "label"], ["5", "b"]], [7])), adder_api(7))


@case
def instance_values_are_read_per_promoted_input_before_proxy_widgets() -> Case:
    # The first pass gives the promoted inputs x and label the first values, 55 and " / "; the proxy pass
    # then sets b and separator and leaves x alone (the list has no value for its entry).
    return Case(shown_instance(proxy_instance([["5", "b"], ["6", "separator"], ["-1", "x"]], [55, " / "])),
                adder_api(55, b=55, label=" / ", separator=" / "))


@case
def proxy_widgets_that_resolve_to_nothing_drop_their_value() -> Case:
    # Dropped from the proxy pass, the two "gone" values still reach x and label through the first pass.
    return Case(shown_instance(proxy_instance([["99", "a"], ["5", "nothing"], ["5", "b"]], ["gone", "gone", 55])),
                adder_api("gone", b=55, label="gone"))


@case
def proxy_widget_control_after_generate_entry_is_dropped() -> Case:
    # As in shared klein workflows: [sampler, "noise_seed"], [sampler, "control_after_generate"].
    seeded_id = "5a0d5c6e-8888-4000-8000-00000000f200"
    nodes = [ui_node(2, "TestSeeded", inputs=[slot("seed", "INT", None, widget=True),
                                              slot("label", "STRING", None, widget=True)],
                     outputs=[("INT", "INT")], widgets=[1, "fixed", "in"]),
             ui_node(3, "TestShowAnything", inputs=[slot("value", "*", 43)])]
    seeded = subgraph(seeded_id, [], [], nodes, [(43, 2, 0, 3, 0, "INT")])
    host = ui_node(10, seeded_id, widgets=[77, "randomize", "out"], properties={
        "proxyWidgets": [["2", "seed"], ["2", "control_after_generate"], ["2", "label"]]})
    return Case(workflow_1([host], [], [seeded]), {"10:2": api("TestSeeded", seed=77, label="out"),
                                                   "10:3": api("TestShowAnything", value=["10:2", 0])})


@case
def proxy_widget_of_a_nested_instance() -> Case:
    # The outer instance shows inner instance 8's promoted "label" (fed by the outer subgraph's input
    # "name") and its unfed "b" (no input of the outer subgraph reaches it).
    node = outer_instance([])
    node["properties"]["proxyWidgets"] = [["8", "label"], ["-1", "y"]]
    node["widgets_values"] = ["deep", 3]
    return Case(constant_into_instance(node, nested_subgraph(), adder_subgraph()), nested_expected("deep"))


@case
def proxy_widget_of_a_nested_instance_no_outer_input_feeds() -> Case:
    # Inner instance 8's label is not fed by the outer subgraph: the outer instance's proxy widget sets it.
    inner = instance(8, 21, [23])
    outer = subgraph(OUTER, [("y", "INT", [21])], [("total", "INT", [23])], [inner],
                     [(21, -10, 0, 8, 0, "INT"), (23, 8, 0, -20, 0, "INT")])
    node = ui_node(30, OUTER, inputs=[slot("y", "INT", 1, widget=True)], outputs=[("total", "INT")],
                   widgets=["via proxy"], properties={"proxyWidgets": [["8", "label"]]})
    node["outputs"][0]["links"] = [2]
    return Case(constant_into_instance(node, outer, adder_subgraph()), nested_expected("via proxy"))


@case
def proxy_widget_with_a_legacy_prefixed_name() -> Case:
    # Older frontends named a widget promoted from inside a nested instance "6: a" (inner node 6's widget
    # a, behind instance 8's input label); the prefix picks it among the instance's two "a" widgets.
    built = proxy_widget_of_a_nested_instance_no_outer_input_feeds()
    built.workflow["nodes"][1]["properties"]["proxyWidgets"] = [["8", "6: a"]]
    return built


@case
def proxy_widget_on_a_primitive_node() -> Case:
    definition = adder_subgraph()
    definition["nodes"][0]["inputs"][1]["link"] = 15
    primitive = ui_node(9, "PrimitiveNode", outputs=[("INT", "INT")], widgets=[5, "fixed"])
    primitive["outputs"][0].update(links=[15], widget={"name": "b"})
    definition["nodes"].append(primitive)
    definition["links"] += link_objects([(15, 9, 0, 5, 1, "INT")])
    return Case(shown_instance(proxy_instance([["9", "value"]], [42]), definition), adder_api(42, b=42))


@case
def proxy_widget_replaces_the_link_into_its_widget() -> Case:
    definition = adder_subgraph()
    definition["nodes"][0]["inputs"][1]["link"] = 16
    definition["nodes"].append(ui_node(9, "TestConstantInt", outputs=[("INT", "INT")], widgets=[5, "fixed"]))
    definition["nodes"][-1]["outputs"][0]["links"] = [16]
    definition["links"] += link_objects([(16, 9, 0, 5, 1, "INT")])
    expected = adder_api(55, b=55)
    expected["10:9"] = api("TestConstantInt", "Constant Int (test)", value=5)
    return Case(shown_instance(proxy_instance([["5", "b"]], [55]), definition), expected)


@case
def proxy_widgets_saved_as_json_text() -> Case:
    return Case(shown_instance(proxy_instance(json.dumps([["5", "b"]]), [55])), adder_api(55, b=55))


@case
def proxy_widgets_with_a_malformed_entry_are_ignored() -> Case:
    # Node ids are strings in proxyWidgets; one number makes the frontend ignore the whole list.
    return Case(shown_instance(proxy_instance([["5", "b"], [6, "separator"]], [55, " / "])),
                adder_api(55, label=" / "))


def test_a_subgraph_containing_itself_is_refused(registry):
    loop_id = "5a0d5c6e-5555-4000-8000-00000000e000"
    loop = subgraph(loop_id, [], [], [ui_node(1, loop_id)], [])
    with pytest.raises(WorkflowError, match="contains itself"):
        to_api_prompt(workflow_1([ui_node(5, loop_id)], [], [loop]), registry)


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


# ---------------------------------------------------------------------------------------------------------------
# The reference: the web frontend's own graphToPrompt, in a browser, on our server


@pytest.mark.browser
def test_the_web_frontend_queues_the_same_prompts(tmp_path, registry, template_registry):
    from playwright.sync_api import sync_playwright

    from server_harness import FluxServer

    server = FluxServer(tmp_path).start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
            page = browser.new_page()
            page.goto(server.url)
            page.wait_for_function("window.app?.graph && window.app.canvas", timeout=60_000)

            def frontend_prompt(workflow: dict) -> dict:
                return page.evaluate("""async (workflow) => {
                    await window.app.loadGraphData(workflow, true, false, null);
                    return (await window.app.graphToPrompt()).output;
                }""", workflow)

            for name, builder in CASES.items():
                built = builder()
                if built.frontend_agrees:
                    assert frontend_prompt(built.workflow) == built.expected, name
            for name in FLUX2_TEMPLATES:
                workflow = load_template(name)
                assert frontend_prompt(workflow) == to_api_prompt(workflow, template_registry), name
            browser.close()
    finally:
        server.stop()
