"""Example pictures for the LoadImage nodes of the shipped workflows (workflows/*.json).

`flux2 serve --demo-models` writes them into input/ when missing, so every shipped workflow opens and runs
on a fresh machine before the user has uploaded anything. They are drawn, not downloaded: a sky gradient,
a sun and a hill, in a different palette per file.
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
               hill: tuple[int, int, int]) -> Image.Image:
    width, height = SIZE
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
