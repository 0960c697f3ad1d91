"""How long `/interrupt` takes to stop a running prompt, at sizes up to the largest the nodes accept.

    python bench/interrupt_latency.py                                 # tiny demo klein on CPU, default cases
    python bench/interrupt_latency.py --case 4096x4096x1 --case 64x64x1024 --after 3   # needs ~10 GB RAM

A real `flux2 serve` (demo models, limits raised so the case is accepted) runs the klein text-to-image
workflow at WIDTHxHEIGHTxBATCH; `--after` seconds into the run the bench POSTs /interrupt and times until
the prompt's history record appears. It prints one row per case: the node that was running when the
interrupt arrived and the seconds it took to stop.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from server_harness import FluxServer  # noqa: E402  (the tests' real-subprocess harness)

from flux2_host import folders  # noqa: E402
from flux2_host.run import build_registry  # noqa: E402
from flux2_host.workflow import load_workflow_file  # noqa: E402

WORKFLOW = ROOT / "workflows" / "flux2_klein_text_to_image.json"
DEFAULT_CASES = ["256x256x1", "1024x1024x1", "2048x2048x1", "64x64x256"]


def klein_prompt(models: Path, width: int, height: int, batch: int) -> dict:
    folders.configure(models=str(models), input_dir=None, output_dir=None, temp_dir=None, user_dir=None,
                      extra_model_paths=[])
    folders.install_as_folder_paths()
    prompt = load_workflow_file(WORKFLOW, build_registry())
    for node in prompt.values():
        inputs = node["inputs"]
        if "width" in inputs and "height" in inputs:
            inputs.update(width=width, height=height)
        if "batch_size" in inputs:
            inputs["batch_size"] = batch
    return prompt


def measure(server: FluxServer, prompt: dict, after: float) -> tuple[str, float]:
    prompt_id = server.post("/api/prompt", {"prompt": prompt}).json()["prompt_id"]
    while not server.get("/api/queue").json()["queue_running"]:
        time.sleep(0.02)
    time.sleep(after)
    jobs_before = server.get("/api/history").json()
    if prompt_id in jobs_before:
        return "finished before the interrupt", 0.0
    started = time.monotonic()
    server.post("/api/interrupt", {"prompt_id": prompt_id})
    while not server.get(f"/api/history/{prompt_id}").json():
        time.sleep(0.02)
    stopped = time.monotonic() - started
    messages = server.get(f"/api/history/{prompt_id}").json()[prompt_id]["status"]["messages"]
    where = next((data.get("node_type", "?") for event, data in messages if event == "execution_interrupted"),
                 "not interrupted")
    return where, stopped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", default=[], metavar="WIDTHxHEIGHTxBATCH")
    parser.add_argument("--after", type=float, default=2.0, help="seconds into the run to interrupt")
    args = parser.parse_args()
    cases = [tuple(int(v) for v in case.split("x")) for case in (args.case or DEFAULT_CASES)]

    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        server = FluxServer(root, extra_args=("--demo-models", "--cpu", "--max-pixels", str(16384 * 16384),
                                              "--max-batch", "4096")).start()
        try:
            print(f"{'case':>16} | {'running node':>28} | interrupt -> stopped (s)")
            for width, height, batch in cases:
                where, seconds = measure(server, klein_prompt(server.dirs["models"], width, height, batch), args.after)
                print(f"{f'{width}x{height}x{batch}':>16} | {where:>28} | {seconds:.2f}", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
