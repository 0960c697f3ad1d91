"""What the canvas shows a new user: a FLUX.2 graph that runs on what is in models/ (never the frontend's SD
default graph), latent previews while it runs, the Logs panel, and a templates dialog with only runnable
templates. The graph and the template index are checked here on the CPU; the browser tests drive Debian's
chromium through Playwright against a real `flux2 serve`, on first and later visits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flux2_host import folders
from flux2_host.default_graph import FIRST_VISIT_SETTINGS, TEMPLATE_MODELS, DefaultModels, choose_models, default_workflow
from flux2_host.executor import PromptExecutor, validate_prompt
from flux2_host.registry import NodeRegistry
from flux2_host.template_index import workflow_node_types
from flux2_host.userdata import UserData
from flux2_host.workflow import to_api_prompt
from server_harness import FluxServer

FLUX2_GRAPH_TYPES = ["Flux2LoadModel", "Flux2LoadTextEncoder", "Flux2LoadVAE", "Flux2TextEncode", "Flux2EmptyLatent",
                     "Flux2Sampler", "Flux2VAEDecode", "SaveImage"]


def use_folders(models: Path, tmp_path: Path) -> None:
    folders.configure(models=str(models), input_dir=str(tmp_path / "input"), output_dir=str(tmp_path / "output"),
                      temp_dir=str(tmp_path / "temp"), user_dir=str(tmp_path / "user"))
    folders.install_as_folder_paths()


def use_models(models: Path, tmp_path: Path) -> NodeRegistry:
    use_folders(models, tmp_path)
    return NodeRegistry.default()


def models_with(demo_models_dir: Path, tmp_path: Path, *files: str) -> Path:
    """A models folder holding only `files` (kind/name) of the demo set."""
    models = tmp_path / "models"
    for file in files:
        (models / file).parent.mkdir(parents=True, exist_ok=True)
        (models / file).symlink_to(demo_models_dir / file)
    return models


class _Silent:
    def send(self, event: str, data: dict) -> None:
        pass

    def send_preview(self, node_id: str, prompt_id: str, image) -> None:
        pass


def test_the_default_workflow_runs_on_the_demo_models(demo_models_dir, tmp_path):
    registry = use_models(demo_models_dir, tmp_path)
    workflow = default_workflow(registry)
    assert [node["type"] for node in workflow["nodes"]] == FLUX2_GRAPH_TYPES
    assert workflow["nodes"][0]["widgets_values"][0].startswith("flux-2-klein-4b")
    prompt = to_api_prompt(workflow, registry)
    latent = next(node for node in prompt.values() if node["class_type"] == "Flux2EmptyLatent")
    latent["inputs"].update(width=64, height=64)
    validation = validate_prompt(prompt, registry)
    assert validation.ok, validation.node_errors
    result = PromptExecutor(registry).execute(prompt, "default", {}, validation.outputs, _Silent())
    assert result.status == "success", result.error
    assert len(result.outputs["8"]["images"]) == 1


@pytest.mark.parametrize("files, expected", [
    (("diffusion_models/flux2_dev_fp8mixed.safetensors", "text_encoders/qwen_3_4b.safetensors",
      "text_encoders/mistral_3_small_flux2_bf16.safetensors", "vae/full_encoder_small_decoder.safetensors"),
     DefaultModels("flux2_dev_fp8mixed.safetensors", "mistral_3_small_flux2_bf16.safetensors",
                   "full_encoder_small_decoder.safetensors")),
    (("diffusion_models/flux-2-klein-9b-fp8.safetensors", "text_encoders/qwen_3_4b.safetensors",
      "text_encoders/qwen_3_8b_fp8mixed.safetensors", "vae/flux2-vae.safetensors"),
     DefaultModels("flux-2-klein-9b-fp8.safetensors", "qwen_3_8b_fp8mixed.safetensors", "flux2-vae.safetensors")),
])
def test_the_default_models_pair_a_dit_with_an_encoder_of_its_family_and_width(demo_models_dir, tmp_path, files,
                                                                                expected):
    use_models(models_with(demo_models_dir, tmp_path, *files), tmp_path)
    assert choose_models() == expected


def test_without_fitting_models_the_graph_names_the_template_files(demo_models_dir, tmp_path):
    registry = use_models(models_with(demo_models_dir, tmp_path, "diffusion_models/flux-2-klein-9b-fp8.safetensors",
                                      "text_encoders/qwen_3_4b.safetensors", "vae/flux2-vae.safetensors"), tmp_path)
    assert choose_models() is None  # the 9B DiT reads 144-wide prompts, the 4B encoder writes 96
    loaders = [node["widgets_values"][0] for node in default_workflow(registry)["nodes"][:3]]
    assert loaders == [TEMPLATE_MODELS.dit, TEMPLATE_MODELS.text_encoder, TEMPLATE_MODELS.vae]


def test_first_visit_settings_never_overwrite_the_users_own(tmp_path):
    use_folders(tmp_path / "models", tmp_path)
    settings = Path(folders.get_public_user_directory("default")) / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": False, "Comfy.Locale": "de"}))
    UserData().add_missing_settings({**FIRST_VISIT_SETTINGS, "Comfy.Zoom": 2})
    assert json.loads(settings.read_text()) == {"Comfy.TutorialCompleted": False, "Comfy.Locale": "de", "Comfy.Zoom": 2}


# --- the server: template index, extension --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(demo_models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("canvas_defaults")
    (root / "models").symlink_to(demo_models_dir)
    running = FluxServer(root, extra_nodes="").start()
    yield running
    running.stop()


def test_the_template_index_lists_only_templates_whose_nodes_the_host_has(server):
    import comfyui_workflow_templates_json

    template_dir = Path(comfyui_workflow_templates_json.__file__).parent / "templates"
    node_types = set(server.get("/api/object_info").json())
    for index_file in ("index.json", "index.ja.json"):
        categories = server.get(f"/templates/{index_file}").json()
        listed = {template["name"] for category in categories for template in category["templates"]}
        assert all(category["templates"] for category in categories)
        assert {path.stem for path in template_dir.glob("image_flux2*.json")} <= listed
        for name in listed:
            assert workflow_node_types(json.loads((template_dir / f"{name}.json").read_text())) <= node_types, name
    everything = json.loads((template_dir / "index.json").read_text())
    assert any(t["name"].startswith("api_") for category in everything for t in category["templates"])
    assert not any(name.startswith("api_") for name in listed)


def test_the_extension_list_serves_the_default_graph_swap(server):
    [ours] = [url for url in server.get("/api/extensions").json() if "flux2" in url]
    script = server.get(ours)
    assert script.status == 200 and script.content_type == "text/javascript"
    assert b"beforeConfigureGraph" in script.body and b"/flux2/default_workflow" in script.body
    workflow = server.get("/api/flux2/default_workflow").json()
    assert [node["type"] for node in workflow["nodes"]] == FLUX2_GRAPH_TYPES
    stored = json.loads((server.dirs["user"] / "default" / "comfy.settings.json").read_text())
    assert stored["Comfy.TutorialCompleted"] is True  # a first visit opens the graph, not a blank canvas


# --- the browser ----------------------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
APP_READY = "window.app && window.app.graph && window.app.canvas && window.app.vueAppReady"
GRAPH_TYPES = "app.graph.nodes.map(n => n.type)"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def page(browser, server):
    """A new user's first visit (no settings of their own, nothing in the browser's storage)."""
    opened = browser.new_page(viewport={"width": 1400, "height": 900})
    opened.set_default_timeout(60_000)
    opened.goto(server.url + "/")
    opened.wait_for_function(APP_READY)
    opened.wait_for_function(f"{GRAPH_TYPES}.includes('Flux2Sampler')")
    yield opened
    opened.close()


@pytest.mark.browser
def test_first_and_later_visits_open_the_flux2_graph_without_a_missing_nodes_dialog(page, browser, server):
    assert page.evaluate(GRAPH_TYPES) == FLUX2_GRAPH_TYPES
    assert page.locator(".p-dialog").count() == 0  # no missing-node packs, no template browser over it
    page.evaluate("app.loadGraphData()")  # what a later visit with nothing to restore does, and "Load Default"
    page.wait_for_function(f"{GRAPH_TYPES}.length > 0")
    assert page.evaluate(GRAPH_TYPES) == FLUX2_GRAPH_TYPES

    later = browser.new_page(viewport={"width": 1400, "height": 900})  # a fresh browser storage: nothing restored
    later.goto(server.url + "/")
    later.wait_for_function(APP_READY, timeout=60_000)
    later.wait_for_function(f"{GRAPH_TYPES}.includes('Flux2Sampler')", timeout=60_000)
    assert later.evaluate(GRAPH_TYPES) == FLUX2_GRAPH_TYPES and later.locator(".p-dialog").count() == 0
    later.close()


@pytest.mark.browser
def test_running_the_graph_shows_latent_previews_by_default(page):
    page.evaluate("""() => {
        window.flux2Previews = 0;
        const api = window.comfyAPI.api.api;
        for (const event of ['b_preview', 'b_preview_with_metadata'])
            api.addEventListener(event, () => { window.flux2Previews += 1; });
        const latent = app.graph.nodes.find(n => n.type === 'Flux2EmptyLatent');
        latent.widgets[0].value = 64;
        latent.widgets[1].value = 64;
    }""")
    page.evaluate("app.queuePrompt(0)")
    page.wait_for_function("() => (app.graph.nodes.find(n => n.type === 'SaveImage').imgs || []).length > 0",
                           timeout=120_000)
    assert page.evaluate("window.flux2Previews") >= 1


@pytest.mark.browser
def test_the_logs_panel_shows_the_server_log(page):
    page.evaluate("app.extensionManager.command.execute('Workspace.ToggleBottomPanelTab.logs-terminal')")
    page.wait_for_selector(".xterm-rows")
    page.wait_for_function("document.querySelector('.xterm-rows').innerText.includes('demo stand-ins')")
    assert page.get_by_text("Unable to load logs").count() == 0


@pytest.mark.browser
def test_the_templates_dialog_offers_only_runnable_templates(page):
    page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text("FLUX.2 Dev Text to Image").first.wait_for()
    assert page.get_by_text("FLUX.2 [Klein] 4B: Text to Image").count() >= 1
    assert page.get_by_text("Nano Banana 2.1: Text to Image").count() == 0
