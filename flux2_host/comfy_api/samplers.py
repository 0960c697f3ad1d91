"""Stand-in for `comfy.samplers`: the sampler and scheduler names, which packs read at import time to declare
their own sampler / scheduler widgets (rgthree's KSampler config, essentials). The lists are the host KSampler's,
so a pack's widget values validate there. ComfyUI's sampling machinery itself (KSampler objects, CFGGuider,
sampling functions) is the host's flux2_core sampler: asking for it raises `ComfyInternalsMissing`."""

from __future__ import annotations

from flux2_core.schedulers import SCHEDULER_NAMES as _SCHEDULER_NAMES

from ..core_nodes.sampling import COMFY_SAMPLER_NAMES, DISCARD_PENULTIMATE_SIGMA_SAMPLERS
from . import STAND_IN_MARK, ComfyInternalsMissing, missing_name

globals()[STAND_IN_MARK] = True
__getattr__ = missing_name("comfy.samplers")

# ComfyUI's KSAMPLER_NAMES are its k-diffusion samplers; SAMPLER_NAMES adds the three it runs another way.
SAMPLER_NAMES: list[str] = list(COMFY_SAMPLER_NAMES)
KSAMPLER_NAMES: list[str] = [name for name in SAMPLER_NAMES if name not in ("ddim", "uni_pc", "uni_pc_bh2")]
SCHEDULER_NAMES: list[str] = list(_SCHEDULER_NAMES)


class KSampler:
    """Only the class attributes packs read; a KSampler object samples a ComfyUI model, which the host has not."""

    SAMPLERS = SAMPLER_NAMES
    SCHEDULERS = SCHEDULER_NAMES
    DISCARD_PENULTIMATE_SIGMA_SAMPLERS = set(DISCARD_PENULTIMATE_SIGMA_SAMPLERS)

    def __init__(self, *args, **kwargs) -> None:
        raise ComfyInternalsMissing("comfy.samplers.KSampler()")
