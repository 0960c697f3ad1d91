"""Example pictures for the LoadImage nodes of the shipped workflows (workflows/*.json).

`flux2 serve --demo-models` writes them into input/ when missing, so every shipped workflow opens and runs
on a fresh machine before the user has uploaded anything. They are drawn, not downloaded: a sky gradient,
a sun and a hill, in a different palette per file. `write_demo_dataset` draws the captioned pictures of
input/flux2_demo_dataset/, which the folder-dataset training workflow loads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# file name -> (sky top, sky bottom, sun, hill) colours
DEMO_INPUT_IMAGES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "flux2_reference_1.png": ((40, 90, 200), (200, 220, 255), (255, 210, 60), (40, 140, 60)),
    "flux2_reference_2.png": ((120, 30, 90), (250, 160, 90), (255, 240, 200), (70, 60, 110)),
    "flux2_img2img_input.png": ((10, 20, 60), (90, 120, 200), (240, 240, 255), (30, 70, 50)),
}
SIZE = (768, 512)


def draw_scene(top: tuple[int, int, int], bottom: tuple[int, int, int], sun: tuple[int, int, int],
               hill: tuple[int, int, int], size: tuple[int, int] = SIZE) -> Image.Image:
    width, height = size
    blend = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = (1 - blend) * np.array(top) + blend * np.array(bottom)
    image = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.62, height * 0.12, width * 0.82, height * 0.42), fill=sun)
    draw.ellipse((-width * 0.3, height * 0.6, width * 1.3, height * 1.6), fill=hill)
    return image


def write_demo_inputs(input_dir: str | Path) -> list[Path]:
    """Write the example pictures that are missing; existing files (the user's) are never replaced."""
    input_dir = Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, colours in DEMO_INPUT_IMAGES.items():
        path = input_dir / name
        if not path.exists():
            draw_scene(*colours).save(path)
            written.append(path)
    return written


# The training workflow's dataset (workflows/training/*_from_folder.json): input/<DEMO_DATASET>/ with pictures of
# several sizes and same-name .txt captions. file stem -> (size, colours, caption)
DEMO_DATASET = "flux2_demo_dataset"
DEMO_DATASET_PICTURES: dict[str, tuple[tuple[int, int], tuple[tuple[int, int, int], ...], str]] = {
    "dawn": ((96, 80), ((250, 140, 90), (255, 220, 180), (255, 250, 220), (90, 70, 60)),
             "a hill under a pale sun at dawn, orange sky"),
    "noon": ((80, 96), ((40, 90, 200), (200, 220, 255), (255, 210, 60), (40, 140, 60)),
             "a green hill under a yellow sun, blue sky"),
    "dusk": ((112, 80), ((120, 30, 90), (250, 160, 90), (255, 240, 200), (70, 60, 110)),
             "a purple hill under a white sun at dusk"),
    "night": ((96, 96), ((10, 20, 60), (90, 120, 200), (240, 240, 255), (30, 70, 50)),
              "a dark hill under a bright moon, night sky"),
}


def write_demo_dataset(input_dir: str | Path) -> list[Path]:
    """Write input/<DEMO_DATASET>/ (pictures + captions) when that folder does not exist yet; a user's folder of
    that name is left alone."""
    folder = Path(input_dir) / DEMO_DATASET
    if folder.exists():
        return []
    folder.mkdir(parents=True)
    written = []
    for stem, (size, colours, caption) in DEMO_DATASET_PICTURES.items():
        draw_scene(*colours, size=size).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
        written.append(folder / f"{stem}.png")
    return written
