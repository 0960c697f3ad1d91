"""Tiny generated training data for the training tests and the README example: coloured shapes + captions."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = (("red", (220, 30, 30), "circle"), ("blue", (30, 60, 220), "square"),
          ("green", (30, 200, 60), "triangle"), ("yellow", (230, 210, 40), "circle"))


def shape_image(colour: tuple[int, int, int], shape: str, size: tuple[int, int] = (64, 64)) -> Image.Image:
    image = Image.new("RGB", size, (245, 245, 240))
    draw = ImageDraw.Draw(image)
    w, h = size
    box = (w // 5, h // 5, w - w // 5, h - h // 5)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(w // 2, h // 6), (w - w // 6, h - h // 6), (w // 6, h - h // 6)], fill=colour)
    return image


def write_shapes_dataset(directory: Path, count: int = 2, size: tuple[int, int] = (64, 64),
                         resolution: int = 64, batch_size: int = 1, controls: bool = False) -> Path:
    """images/ (+ control/) and a musubi dataset TOML; returns the TOML's path."""
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name, colour, shape in SHAPES[:count]:
        shape_image(colour, shape, size).save(images / f"{name}_{shape}.png")
        (images / f"{name}_{shape}.txt").write_text(f"a {name} {shape} on a white background")
        if controls:
            (directory / "control").mkdir(exist_ok=True)
            shape_image(colour, "square" if shape != "square" else "circle", (64, 64)).save(
                directory / "control" / f"{name}_{shape}_0.png")
    toml = directory / "dataset.toml"
    control_line = 'control_directory = "control"\n' if controls else ""
    toml.write_text(f'[general]\nresolution = {resolution}\ncaption_extension = ".txt"\nbatch_size = {batch_size}\n'
                    f'enable_bucket = true\n\n[[datasets]]\nimage_directory = "images"\n{control_line}'
                    f'num_repeats = 1\n')
    return toml
