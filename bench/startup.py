"""Start-up time of `flux2 run`: process start to the first executed node, and to exit, for the shipped klein
text-to-image workflow at 256x256 on the tiny demo models (so the numbers are the host's own overhead, not
the model's). Every node needs torch, so the child imports it first and reports when that was done: "torch
imported" is the floor, and "first node - torch" is what the host itself adds before its first node (the
difference that stays meaningful on a busy machine).

    python bench/startup.py [--runs 3] [--size 256]

Prints a table (median and each run); no assertions.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflows" / "flux2_klein_text_to_image.json"
LATENT_NODE = "6"  # the workflow's Flux2EmptyLatent

# Runs `flux2 run` in this process, printing the wall-clock times when torch is imported and of the first
# `executing` event with a node.
CHILD = """
import sys, time
import torch
print(f"TORCH {time.time()!r}", file=sys.stderr, flush=True)
from flux2_host import run
send = run.TerminalProgress.send
def first_node_clock(self, event, data):
    if event == "executing" and data.get("node") is not None and not getattr(run, "first_node_at", None):
        run.first_node_at = time.time()
        print(f"FIRST_NODE {run.first_node_at!r}", file=sys.stderr, flush=True)
    send(self, event, data)
run.TerminalProgress.send = first_node_clock
from flux2_host.cli import main
sys.exit(main(sys.argv[1:]))
"""


def timed_run(arguments: list[str]) -> tuple[float, float, float]:
    """Seconds from the start of one child process to exit, to the first executed node, to torch imported."""
    started = time.time()
    done = subprocess.run([sys.executable, "-c", CHILD, *arguments], capture_output=True, text=True, cwd=REPO)
    ended = time.time()
    if done.returncode != 0:
        raise SystemExit(f"flux2 run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    clocks = {line.split()[0]: float(line.split()[1]) for line in done.stderr.splitlines()
              if line.startswith(("FIRST_NODE ", "TORCH "))}
    return ended - started, clocks["FIRST_NODE"] - started, clocks["TORCH"] - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()

    from flux2_core.demo_models import write_demo_models

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_demo_models(root / "models")
        arguments = ["run", str(WORKFLOW), "--models-dir", str(root / "models"), "--output-dir", str(root / "output"),
                     "--input-dir", str(root / "input"), "--set", f"{LATENT_NODE}.width={args.size}",
                     "--set", f"{LATENT_NODE}.height={args.size}"]
        timed_run(arguments)  # warm the file cache; not counted
        runs = [timed_run(arguments) for _ in range(args.runs)]

    def row(name: str, values: list[float]) -> str:
        return f"| {name:<34} | {statistics.median(values):8.2f} | {' '.join(f'{v:.2f}' for v in values):<22} |"

    print(f"flux2 run {WORKFLOW.name} at {args.size}x{args.size} on the demo models, {args.runs} runs")
    print(f"| {'from process start to':<34} | {'median s':>8} | {'runs (s)':<22} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 24}|")
    print(row("torch imported (floor)", [torch for _, _, torch in runs]))
    print(row("first executed node", [first for _, first, _ in runs]))
    print(row("first node - torch (host overhead)", [first - torch for _, first, torch in runs]))
    print(row("exit (image written)", [total for total, _, _ in runs]))


if __name__ == "__main__":
    main()
