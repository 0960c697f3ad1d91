"""The loss of a training run as a picture: the chart the graph's training nodes output (ComfyUI's
LossGraphNode, the pack's Flux2Train nodes)."""

from __future__ import annotations

from PIL import Image, ImageDraw


def loss_chart(values: list[float], width: int = 800, height: int = 480) -> Image.Image:
    """A line chart of the loss per step (steps left to right, loss bottom to top), labelled with its range."""
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    margin = 40
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    if values:
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        steps = max(len(values) - 1, 1)
        points = [(margin + (width - 2 * margin) * i / steps,
                   height - margin - (height - 2 * margin) * (value - low) / span) for i, value in enumerate(values)]
        draw.line(points if len(points) > 1 else points * 2, fill="blue", width=2)
        draw.text((margin, 10), f"loss {values[0]:.4g} -> {values[-1]:.4g} over {len(values)} steps (max {high:.4g},"
                  f" min {low:.4g})", fill="black")
    else:
        draw.text((margin, 10), "no loss values", fill="black")
    return picture
