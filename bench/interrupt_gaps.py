"""The longest stretches without an interrupt check while the klein workflow runs (the worst-case /interrupt
latency, which bench/interrupt_latency.py only samples).

    python bench/interrupt_gaps.py --case 1024x1024x1 --case 64x64x256     # tiny demo models, in-process, CPU

Every `check_interrupt` call of the sampler, the DiT, the VAE, the text encoder, the model loaders and the
executor is timed; the table lists the five longest gaps between two calls and where each began (file:line
of the check), in wall seconds and in the process's CPU seconds. On a shared machine the wall time grows with
the load; the CPU time divided by torch's thread count is what the gap would take on an idle one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import flux2_core.progress as progress  # noqa: E402

from interrupt_latency import klein_prompt  # noqa: E402

CHECKING_MODULES = ("flux2_core.sampling", "flux2_core.attention", "flux2_core.vae", "flux2_core.dit",
                    "flux2_core.comfy_layouts", "flux2_core.text_encoders", "flux2_core.text_encoder_files",
                    "flux2_core.checkpoints.loaders", "flux2_host.executor", "flux2_host.core_nodes.images")


class NoListener:
    def send(self, event: str, data: dict) -> None:
        pass

    def send_preview(self, node_id: str, prompt_id: str, image) -> None:
        pass


def record_checks(marks: list[tuple[float, float, str]]) -> None:
    """Wrap `check_interrupt` where each module imported it, noting the wall and CPU times and the caller."""
    original = progress.check_interrupt

    def timed_check() -> None:
        caller = traceback.extract_stack(limit=2)[0]
        marks.append((time.perf_counter(), time.process_time(), f"{Path(caller.filename).name}:{caller.lineno}"))
        original()

    for name in CHECKING_MODULES:
        __import__(name)
        sys.modules[name].check_interrupt = timed_check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", default=[], metavar="WIDTHxHEIGHTxBATCH")
    args = parser.parse_args()
    marks: list[tuple[float, float, str]] = []
    record_checks(marks)
    from flux2_core.demo_models import write_demo_models
    from flux2_host import folders
    from flux2_host.executor import PromptExecutor
    from flux2_host.run import build_registry

    with tempfile.TemporaryDirectory() as directory:
        models = Path(directory) / "models"
        write_demo_models(models)
        for case in args.case or ["1024x1024x1"]:
            width, height, batch = (int(v) for v in case.split("x"))
            prompt = klein_prompt(models, width, height, batch)
            folders.configure(models=str(models), input_dir=f"{directory}/in", output_dir=f"{directory}/out",
                              temp_dir=f"{directory}/tmp")
            outputs = [key for key, node in prompt.items() if node["class_type"] in ("SaveImage", "PreviewImage")]
            marks.clear()
            marks.append((time.perf_counter(), time.process_time(), "start"))
            result = PromptExecutor(build_registry(), preview_method="auto").execute(
                prompt, case, {}, outputs, NoListener())
            marks.append((time.perf_counter(), time.process_time(), "end"))
            gaps = sorted(((b[0] - a[0], b[1] - a[1], a[2]) for a, b in zip(marks, marks[1:])), reverse=True)[:5]
            print(f"{case}: {result.status}, {marks[-1][0] - marks[0][0]:.1f} s, "
                  f"{marks[-1][1] - marks[0][1]:.1f} CPU s, {len(marks) - 2} checks, {torch.get_num_threads()} threads")
            for wall, cpu, where in gaps:
                print(f"  {wall:6.2f} s ({cpu:5.2f} CPU s) after {where}")


if __name__ == "__main__":
    main()
