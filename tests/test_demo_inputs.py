"""The example pictures `flux2 serve --demo-models` puts in input/ cover every LoadImage of the shipped
workflows, are real images, and never replace a user's file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from flux2_host.demo_inputs import DEMO_INPUT_IMAGES, SIZE, write_demo_inputs

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def test_every_load_image_of_the_shipped_workflows_has_a_demo_picture() -> None:
    named = {node["widgets_values"][0]
             for path in WORKFLOWS.glob("*.json")
             for node in json.loads(path.read_text())["nodes"] if node["type"] == "LoadImage"}
    assert named and named <= set(DEMO_INPUT_IMAGES)


def test_pictures_are_written_once_and_user_files_are_kept(tmp_path: Path) -> None:
    user_file = tmp_path / "flux2_reference_2.png"
    Image.new("RGB", (64, 64), "red").save(user_file)
    written = write_demo_inputs(tmp_path)
    assert sorted(p.name for p in written) == ["flux2_img2img_input.png", "flux2_reference_1.png"]
    with Image.open(user_file) as kept:
        assert kept.size == (64, 64)
    with Image.open(tmp_path / "flux2_reference_1.png") as picture:
        assert picture.size == SIZE and picture.mode == "RGB"
        assert len(np.unique(np.asarray(picture).reshape(-1, 3), axis=0)) > 100  # a drawn scene, not a flat colour
    assert write_demo_inputs(tmp_path) == []
