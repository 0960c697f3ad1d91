"""Host overhead: what the executor and server add on top of the nodes themselves.

Starts a real `flux2 serve` on a free loopback port (the test harness in tests/server_harness.py, with the
cheap test node pack) and measures, over HTTP and the WebSocket as a client sees it:

1. POST /prompt -> execution_success for a chain of cheap integer nodes (every node re-runs: the
   constant changes each time), and for an identical re-queue (everything cached);
2. a FLUX.2 workflow (workflows/flux2_klein_text_to_image.json on the tiny demo models): the cold first
   run (model loading included), a seed-only re-run (noise -> sampler -> decode -> save) and an identical
   re-run (nothing executes).

Prints a table; no assertions. Usage: python bench/host_overhead.py [--chain 50] [--repeats 20] [--size 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from server_harness import FluxServer  # noqa: E402

from flux2_core.demo_models import write_demo_models  # noqa: E402
from flux2_host import folders  # noqa: E402
from flux2_host.registry import NodeRegistry  # noqa: E402
from flux2_host.workflow import apply_overrides, load_workflow_file  # noqa: E402

WORKFLOW = ROOT / "workflows" / "flux2_klein_text_to_image.json"


def integer_chain(length: int, start: int) -> dict:
    """TestConstantInt -> TestAddInts x length -> TestShowInt: `length + 2` nodes, all depending on `start`."""
    prompt = {"0": {"class_type": "TestConstantInt", "inputs": {"value": start}}}
    for i in range(1, length + 1):
        prompt[str(i)] = {"class_type": "TestAddInts", "inputs": {"a": [str(i - 1), 0], "b": 1}}
    prompt["out"] = {"class_type": "TestShowInt", "inputs": {"value": [str(length), 0]}}
    return prompt


def timed_run(server: FluxServer, prompt: dict) -> tuple[float, int, int]:
    """Seconds from POST to the end marker, and how many nodes ran / came from cache."""
    started = time.perf_counter()
    run = server.run_prompt(prompt, timeout=600)
    elapsed = time.perf_counter() - started
    if "execution_success" not in run.event_names:
        raise RuntimeError(f"prompt failed: {run.reply} {run.messages[-3:]}\n{server.log()[-2000:]}")
    cached = sum(len(data["nodes"]) for data in run.events("execution_cached"))
    executed = len({data["node"] for data in run.events("executing") if data.get("node") is not None})
    return elapsed, executed, cached


def row(label: str, seconds: list[float], executed: int, cached: int) -> str:
    median = statistics.median(seconds) * 1000
    return f"| {label:<44} | {median:>10.1f} | {min(seconds) * 1000:>10.1f} | {executed:>8} | {cached:>6} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain", type=int, default=50, help="cheap nodes in the integer chain")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="FLUX.2 image width and height")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = FluxServer(Path(tmp)).start()
        try:
            timed_run(server, integer_chain(args.chain, 0))  # warm-up: imports, first socket
            fresh = [timed_run(server, integer_chain(args.chain, i % 90 + 1)) for i in range(args.repeats)]
            rows.append(row(f"cheap chain of {args.chain + 2} nodes, all run",
                            [t for t, _, _ in fresh], fresh[-1][1], fresh[-1][2]))
            same = [timed_run(server, integer_chain(args.chain, 90)) for _ in range(args.repeats)]
            rows.append(row("same chain re-queued (all cached)", [t for t, _, _ in same], same[-1][1], same[-1][2]))

            write_demo_models(server.dirs["models"])
            # The converter reads widget order from object_info, whose model combos come from folder_paths.
            folders.configure(models=str(server.dirs["models"]))
            folders.install_as_folder_paths()
            prompt = load_workflow_file(WORKFLOW, NodeRegistry.default())
            size = [f"6.width={args.size}", f"6.height={args.size}"]
            cold = timed_run(server, apply_overrides(prompt, [*size, "7.seed=1"]))
            rows.append(row(f"FLUX.2 klein {args.size}px, cold (loads models)", [cold[0]], cold[1], cold[2]))
            reseeded = [timed_run(server, apply_overrides(prompt, [*size, f"7.seed={seed}"]))
                        for seed in range(2, 2 + max(3, args.repeats // 4))]
            rows.append(row("FLUX.2 seed-only re-run", [t for t, _, _ in reseeded], reseeded[-1][1], reseeded[-1][2]))
            identical = [timed_run(server, apply_overrides(prompt, [*size, "7.seed=2"])) for _ in range(3)]
            rows.append(row("FLUX.2 identical re-run", [t for t, _, _ in identical], identical[-1][1], identical[-1][2]))
        finally:
            server.stop()

    print("| case                                         | median ms  | min ms     | executed | cached |")
    print("|----------------------------------------------|-----------:|-----------:|---------:|-------:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
