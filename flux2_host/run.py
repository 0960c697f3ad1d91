"""`flux2 run WORKFLOW`: run one workflow file (API or UI format, or a PNG SaveImage wrote) headless.

Exit status: 0 success, 1 the run failed (message on stderr), 2 the workflow is unreadable or invalid
(validation errors as one JSON line on stderr, also with `--json`). With `--json`, stdout carries exactly one JSON object:
`{"prompt_id", "outputs": {node_id: ui}, "files": [absolute paths of written images]}` on success,
`{"error", "node_errors"}` when validation fails and `{"prompt_id", "error"}` when the run fails.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import uuid
from pathlib import Path

from . import folders
from .logs import configure_logging

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130

# Developer feature: comma-separated import paths of extra V1 node packs to load (tests add their cheap
# test nodes to a real server this way).
EXTRA_NODES_ENV = "FLUX2_EXTRA_NODES"


def set_up_host(args, command: str) -> bool:
    """What `flux2 run` and `flux2 serve` both do first. `--cpu` makes CUDA invisible (before torch is first
    imported, so every node and the engine pick the CPU through their ordinary device defaults); `--dtype`
    sets the compute dtype of every model; then the folders, installed as `folder_paths`. False, with the
    reason on stderr, when a folder or an extra_model_paths.yaml is unusable."""
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from flux2_core.devices import set_compute_dtype
    from flux2_core.memory import residency

    set_compute_dtype(args.dtype)
    from flux2_core.dit import set_compile_by_default

    set_compile_by_default(getattr(args, "compile", False))
    # The memory manager every loader and node goes through: --lowvram / --novram / --highvram / --gpu-only,
    # --reserve-vram GB; --cpu wins over them.
    residency.configure("cpu" if args.cpu else getattr(args, "vram_mode", "normal"),
                        reserve_gb=getattr(args, "reserve_vram", None))
    try:
        folders.configure(models=args.models_dir, input_dir=args.input_dir, output_dir=args.output_dir,
                          temp_dir=getattr(args, "temp_dir", None), user_dir=getattr(args, "user_dir", None),
                          extra_model_paths=args.extra_model_paths_config,
                          custom_nodes=getattr(args, "custom_nodes_dir", None) or ())
    except (OSError, ValueError) as exc:  # an unreadable extra_model_paths.yaml, an unwritable folder
        print(f"flux2 {command}: {exc}", file=sys.stderr)
        return False
    folders.install_as_folder_paths()
    return True


def build_registry():
    """The default node packs, then those named in $FLUX2_EXTRA_NODES, then the third-party packs in the
    custom-nodes folders. Call after folders are set up: packs read `folder_paths` when they import."""
    from .custom_packs import load_custom_packs
    from .registry import NodeRegistry

    registry = NodeRegistry.default()
    for module_name in (name.strip() for name in os.environ.get(EXTRA_NODES_ENV, "").split(",")):
        if module_name:
            module = importlib.import_module(module_name)
            registry.add_pack(module.NODE_CLASS_MAPPINGS, getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None),
                              f"custom_nodes.{module_name}")
    load_custom_packs(registry, folders.get_folder_paths("custom_nodes"))
    return registry


class TerminalProgress:
    """What the executor reports to, in a terminal: one tqdm bar on stderr per node that reports steps."""

    def __init__(self, prompt: dict) -> None:
        self.prompt = prompt
        self.bar = None
        self.bar_node: str | None = None

    def send(self, event: str, data: dict) -> None:
        if event == "progress":
            self._show_progress(str(data.get("node")), int(data.get("value", 0)), int(data.get("max", 1)))
        elif event in ("executing", "execution_success", "execution_error", "execution_interrupted"):
            self.close()

    def send_preview(self, node_id: str, prompt_id: str, image) -> None:
        pass  # a terminal has nowhere to show latent previews

    def _show_progress(self, node_id: str, value: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None or self.bar_node != node_id:
            self.close()
            class_type = self.prompt.get(node_id, {}).get("class_type", "")
            self.bar = tqdm(total=total, desc=f"{node_id} {class_type}".strip(), unit="step", file=sys.stderr)
            self.bar_node = node_id
        self.bar.total = total
        self.bar.update(value - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.bar_node = None


def canvas_workflow(path: str) -> dict | None:
    """The UI graph a workflow file holds, if any, so images saved by this run carry it (as ComfyUI's do)."""
    try:
        if path.lower().endswith(".png"):
            from PIL import Image

            with Image.open(path) as image:
                data = json.loads(image.info.get("workflow", "null"))
        else:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("nodes"), list) else None


def written_files(outputs: dict) -> list[str]:
    """Absolute paths of the files the output nodes report (`{"images": [{filename, subfolder, type}]}`)."""
    files = []
    for ui in outputs.values():
        for entry in ui.get("images", []) if isinstance(ui, dict) else []:
            if not isinstance(entry, dict) or not entry.get("filename"):
                continue
            directory = folders.get_directory_by_type(entry.get("type", "output"))
            if directory:
                files.append(os.path.abspath(os.path.join(directory, entry.get("subfolder", ""), entry["filename"])))
    return files


def _describe_failure(error: dict | None) -> str:
    if not error:
        return "the run failed without an error report"
    where = f"node {error.get('node_id')} ({error.get('node_type')})" if error.get("node_id") else "the run"
    # The executor has already logged the traceback; this is the one line to read.
    return f"error in {where}: {error.get('exception_type', 'Error')}: {error.get('exception_message', '')}"


def run_command(args) -> int:
    configure_logging()  # on stderr, so --json keeps stdout for its one object
    if not set_up_host(args, "run"):
        return EXIT_INVALID
    # With --json, stdout is the one result object: anything nodes print goes to stderr instead.
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        status, report = _run(args)
    if report is not None:
        print(json.dumps(report, default=str), file=real_stdout)
    return status


def _run(args) -> tuple[int, dict | None]:
    from .executor import PromptExecutor, validate_prompt  # torch comes with it: after --cpu took effect
    from .workflow import apply_overrides, load_workflow_file

    registry = build_registry()
    try:
        prompt = apply_overrides(load_workflow_file(args.workflow, registry), args.set)
    except (OSError, ValueError) as exc:  # unreadable file, not a workflow, or a bad --set
        print(f"flux2 run: {exc}", file=sys.stderr)
        return EXIT_INVALID, None
    validation = validate_prompt(prompt, registry)
    if not validation.ok:
        errors = {"error": validation.error, "node_errors": validation.node_errors}
        # One line on stderr, and the last one, with or without --json (scripts written against either form
        # read it there): log lines may come before it, and a script reads it with one split.
        print(json.dumps(errors, default=str), file=sys.stderr)
        return EXIT_INVALID, errors if args.json else None  # with --json, also the one object on stdout

    prompt_id = str(uuid.uuid4())
    workflow = canvas_workflow(args.workflow)
    extra_data = {"extra_pnginfo": {"workflow": workflow}} if workflow else {}
    executor = PromptExecutor(registry)
    progress = TerminalProgress(prompt)
    try:
        result = executor.execute(prompt, prompt_id, extra_data, list(validation.outputs), progress)
    except KeyboardInterrupt:
        print("flux2 run: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED, None
    finally:
        progress.close()
    if result.status != "success":
        message = "interrupted" if result.status == "interrupted" else _describe_failure(result.error)
        print(f"flux2 run: {message}", file=sys.stderr)
        return EXIT_FAILED, {"prompt_id": prompt_id, "error": result.error} if args.json else None
    files = written_files(result.outputs)
    if not args.json:
        for path in files:
            print(path)
        return EXIT_OK, None
    return EXIT_OK, {"prompt_id": prompt_id, "outputs": result.outputs, "files": files}
