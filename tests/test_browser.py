"""The official ComfyUI web canvas against `flux2 serve`, in Debian's chromium driven by Playwright.

A user's path: the canvas starts (with the demo models the server writes itself), a FLUX.2 node is added
through the node search box, a shared workflow from workflows/ is loaded and run with the Run button, and
its image appears on the SaveImage node. The browser never reaches beyond the local server: the only
failed requests allowed are the ones ComfyUI itself answers 404 to on a fresh user folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from server_harness import FluxServer

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "flux2_klein_text_to_image.json"
SAVE_IMAGE_NODE = "9"


def small_workflow() -> dict:
    """The shared klein text-to-image workflow at 64x64, so a CPU run takes seconds."""
    workflow = json.loads(WORKFLOW.read_text())
    latents = [node for node in workflow["nodes"] if node["type"] == "Flux2EmptyLatent"]
    assert latents, f"{WORKFLOW.name} has no Flux2EmptyLatent node to shrink"
    for node in latents:
        node["widgets_values"][:2] = [64, 64]
    return workflow


def is_expected_miss(url: str, server_url: str) -> bool:
    """404s ComfyUI gives too on a fresh user folder: no user.css, no saved workflows or subgraphs yet."""
    parts = urlsplit(url)
    if f"{parts.scheme}://{parts.netloc}" != server_url:
        return True  # the frontend's release check to api.comfy.org, unreachable here by design
    return parts.path in ("/user.css", "/api/userdata/user.css") or parts.path.startswith("/api/userdata")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("canvas")
    # A returning user: the first-run template browser would cover the canvas.
    settings = root / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    running = FluxServer(root, extra_args=("--demo-models",), extra_nodes="").start()
    yield running
    running.stop()


@dataclass
class Canvas:
    page: object
    failed_requests: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def canvas(server):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is missing: apt-get install -y chromium (scripts/test.sh does)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(30_000)
        opened = Canvas(page)
        page.on("response", lambda r: opened.failed_requests.append(r.url) if r.status >= 400 else None)
        page.on("requestfailed", lambda r: opened.failed_requests.append(r.url))
        page.goto(server.url + "/")
        page.wait_for_function("window.app && window.app.graph && window.app.canvas && window.app.vueAppReady")
        # The start-up graph (the FLUX.2 default graph) is loaded once before the tests change the canvas.
        page.wait_for_function("app.graph.nodes.some(n => n.type === 'Flux2Sampler')")
        yield opened
        browser.close()


def test_canvas_adds_a_flux2_node_from_the_search_box(canvas):
    page = canvas.page
    page.evaluate("app.graph.clear()")
    page.mouse.dblclick(700, 450)  # on the empty canvas: opens the node search box
    # The box opens asynchronously: keys typed before its input has focus are lost (a CI run saw this).
    search = page.get_by_role("combobox", name="Add a node...")
    search.wait_for(state="visible")
    search.fill("FLUX.2 Empty Latent")
    chosen = page.locator("#results-list [role=option][aria-selected=true]")
    chosen.filter(has_text="FLUX.2 Empty Latent").wait_for(state="visible")
    search.press("Enter")
    page.wait_for_function("app.graph.nodes.some(n => n.type === 'Flux2EmptyLatent')")
    assert page.evaluate("app.graph.nodes.map(n => n.type)") == ["Flux2EmptyLatent"]


def test_shared_workflow_runs_and_its_image_shows_on_save_image(canvas, server):
    page = canvas.page
    page.evaluate("workflow => app.loadGraphData(workflow)", small_workflow())
    page.wait_for_function(f"app.graph.getNodeById({SAVE_IMAGE_NODE})?.type === 'SaveImage'")
    page.get_by_role("button", name="Run").first.click()

    page.wait_for_function(f"""() => {{
        const images = app.graph.getNodeById({SAVE_IMAGE_NODE}).imgs || [];
        return images.length > 0 && images[0].complete && images[0].naturalWidth > 0;
    }}""", timeout=45_000)
    shown = page.evaluate(f"app.graph.getNodeById({SAVE_IMAGE_NODE}).imgs[0].src")
    saved = sorted(p.name for p in server.dirs["output"].glob("*.png"))
    assert len(saved) == 1 and f"filename={saved[0]}" in shown
    job = server.get("/api/jobs", status="completed").json()["jobs"][0]
    assert job["preview_output"]["filename"] == saved[0] and job["preview_output"]["nodeId"] == SAVE_IMAGE_NODE

    unexpected = [url for url in canvas.failed_requests if not is_expected_miss(url, server.url)]
    assert unexpected == []
