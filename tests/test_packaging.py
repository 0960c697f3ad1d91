"""Packaging: what `pip install` of this project brings into an environment, and scripts/venv.sh's install stamp.

The base requirements are read from metadata built from pyproject.toml by setuptools' own PEP 517 hook (what
pip runs when it builds the wheel), not from the installed copy: installing the pack into a real ComfyUI must
leave ComfyUI's pinned frontend and templates packages alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from email.parser import Parser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def built_requirements(tmp_path: Path) -> list[str]:
    """`Requires-Dist` lines of the wheel metadata setuptools builds from this checkout."""
    hook = ("import sys; from setuptools import build_meta; "
            "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", hook, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          check=True)
    dist_info = done.stdout.strip().splitlines()[-1]
    metadata = Parser().parsestr((tmp_path / dist_info / "METADATA").read_text(encoding="utf-8"))
    return metadata.get_all("Requires-Dist") or []


def requirement_name(requirement: str) -> str:
    name = requirement.split(";")[0]
    for stop in "<>=!~[ (":
        name = name.split(stop)[0]
    return name.strip().lower().replace("_", "-")


def test_base_requirements_name_no_comfyui_package_and_the_host_extra_has_the_web_parts(tmp_path):
    requirements = built_requirements(tmp_path)
    base = [requirement_name(r) for r in requirements if "extra ==" not in r]
    host = [requirement_name(r) for r in requirements if "extra == \"host\"" in r]
    assert "torch" in base and "transformers" in base
    assert [name for name in base if name.startswith("comfyui")] == []
    assert "aiohttp" not in base
    assert {"comfyui-frontend-package", "comfyui-workflow-templates", "aiohttp"} <= set(host)


def test_the_packs_requirements_file_lists_exactly_the_base_requirements(tmp_path):
    """What ComfyUI-Manager installs from custom_nodes_flux2/requirements.txt is what `pip install` brings."""
    base = {r.split(";")[0].replace(" ", "") for r in built_requirements(tmp_path) if "extra ==" not in r}
    listed = {line.strip() for line in (REPO / "custom_nodes_flux2" / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert {requirement_name(r) for r in listed} == {requirement_name(r) for r in base}


def fake_venv_project(tmp_path: Path) -> Path:
    """A project folder with scripts/venv.sh and a .venv whose python and pip only log their calls."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "venv.sh", project / "scripts" / "venv.sh")
    (project / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    bin_dir = project / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("python", "pip"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{project}/calls.log"\n')
        script.chmod(0o755)
    return project


def pip_installs(project: Path, extras: str) -> list[str]:
    subprocess.run(["bash", str(project / "scripts" / "venv.sh"), extras], check=True, env=dict(os.environ))
    log = project / "calls.log"
    return [line for line in log.read_text().splitlines() if line.startswith("pip install -q -e")]


def test_venv_script_installs_only_when_pyproject_or_the_extras_change(tmp_path):
    project = fake_venv_project(tmp_path)
    assert pip_installs(project, "[host]") == ["pip install -q -e .[host]"]
    assert len(pip_installs(project, "[host]")) == 1  # unchanged: no second install
    assert len(pip_installs(project, "[host,test]")) == 2  # other extras
    assert len(pip_installs(project, "[host]")) == 2  # each set of extras keeps its own stamp
    with (project / "pyproject.toml").open("a") as f:
        f.write("# a new requirement\n")
    assert len(pip_installs(project, "[host]")) == 3


def test_serve_and_run_without_the_host_extra_say_what_to_install(monkeypatch, capsys):
    from flux2_host import cli

    monkeypatch.setattr(cli, "HOST_MODULES", (*cli.HOST_MODULES, "flux2_no_such_module"))
    assert cli.main(["run", "workflow.json"]) == 2
    assert capsys.readouterr().err.strip() == ('flux2 run: the host is not installed (missing flux2_no_such_module); '
                                               'install it with: pip install "flux2[host]"')
