"""Samples during training, drawn with the engine's own pipeline and the variant's defaults.

Prompt file (musubi-tuner's line format): one prompt per line, `#` comments, options after the text:
`--w` width, `--h` height, `--s` steps, `--g` guidance (embedded guidance on dev, CFG on klein base),
`--l` CFG, `--d` seed, `--n` negative prompt, `--ci` control (reference) image, repeatable. Missing options use
the variant's defaults (base: 50 steps + CFG 4; distilled: 4 steps). Images are written as
`<output_name>_<step:08d>_<line:02d>.png`. With `preview_dit` set, the trained LoRA is applied on the fly to
that second DiT (e.g. train on klein base, look at the result on distilled klein) instead of the trained one.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..checkpoints.loaders import load_dit, load_vae
from ..errors import Flux2Error
from ..lora import attach_loras
from ..pipeline import Flux2Pipeline
from ..variants import VARIANTS, guess_variant

if TYPE_CHECKING:
    from .trainer import Trainer

_NUMBER_OPTIONS = {"w": ("width", int), "h": ("height", int), "s": ("steps", int), "g": ("guidance", float),
                   "l": ("cfg", float), "d": ("seed", int)}


@dataclass
class SamplePrompt:
    prompt: str
    width: int = 1024
    height: int = 1024
    steps: int | None = None
    guidance: float | None = None
    cfg: float | None = None
    seed: int = 42
    negative_prompt: str = ""
    control_images: list[str] = field(default_factory=list)


def parse_prompt_line(line: str, where: str = "") -> SamplePrompt | None:
    """One line of a sample-prompts file (None for blank lines and comments)."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    text, *options = re.split(r"\s--(?=[a-z]+\s)", " " + line)
    sample = SamplePrompt(text.strip())
    for option in options:
        key, _, value = option.partition(" ")
        value = value.strip()
        if key in _NUMBER_OPTIONS:
            name, kind = _NUMBER_OPTIONS[key]
            try:
                setattr(sample, name, kind(value))
            except ValueError:
                raise Flux2Error(f"{where}: --{key}: expected a {kind.__name__}, found {value!r}") from None
        elif key == "n":
            sample.negative_prompt = value
        elif key == "ci":
            sample.control_images += shlex.split(value)
        else:
            raise Flux2Error(f"{where}: unknown option --{key} (expected --w --h --s --g --l --d --n --ci)")
    return sample


def read_prompts(path: str | Path) -> list[SamplePrompt]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise Flux2Error(f"sample_prompts: cannot read {path}: {error}") from None
    prompts = [parse_prompt_line(line, f"{path}:{number}") for number, line in enumerate(lines, start=1)]
    return [p for p in prompts if p is not None]


def _call_options(sample: SamplePrompt, variant: str) -> dict:
    options = {"width": sample.width, "height": sample.height, "steps": sample.steps, "seed": sample.seed,
               "negative_prompt": sample.negative_prompt, "cfg": sample.cfg}
    if sample.guidance is not None:
        if VARIANTS[variant].guidance is not None:
            options["guidance"] = sample.guidance
        elif sample.cfg is None:
            options["cfg"] = sample.guidance
    return options


def generate_samples(trainer: Trainer, directory: Path) -> list[Path]:
    """Draw every prompt of the trainer's sample file with the current adapters; returns the PNGs written."""
    config = trainer.config
    prompts = read_prompts(config.sample_prompts)
    directory.mkdir(parents=True, exist_ok=True)
    vae = load_vae(config.vae, device=trainer.device, dtype=trainer.dtype)
    if config.preview_dit:
        dit = load_dit(config.preview_dit, device=trainer.device, dtype=trainer.dtype)
        variant = getattr(dit, "variant", None) or guess_variant(dit.config)
        attached = attach_loras(dit, [(trainer.lora(), 1.0)])
    else:
        dit, variant, attached = trainer.dit, trainer.variant, None
    was_training = dit.training
    dit.eval()
    written = []
    try:
        pipeline = Flux2Pipeline(dit, vae, config.text_encoder, variant=variant, text_encoder_dtype=trainer.dtype)
        for index, sample in enumerate(prompts):
            references = [Image.open(path).convert("RGB") for path in sample.control_images]
            with torch.no_grad():
                image = pipeline(sample.prompt, reference_images=references, **_call_options(sample, variant))[0]
            path = directory / f"{config.output_name}_{trainer.step:08d}_{index:02d}.png"
            image.save(path)
            written.append(path)
    finally:
        if attached is not None:
            attached.detach()
        dit.train(was_training)
        del vae
    return written
