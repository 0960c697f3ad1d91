"""Stand-in for `comfy.comfy_types` (and its `node_typing`): the socket type names and typing helpers packs use
to declare V1 nodes (`IO.IMAGE`, `IO.ANY`, `ComfyNodeABC`, `InputTypeDict`, `CheckLazyMixin`). Pure typing:
nothing of ComfyUI's models."""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from typing import Literal, TypedDict

from . import STAND_IN_MARK, missing_name

globals()[STAND_IN_MARK] = True
__getattr__ = missing_name("comfy.comfy_types")


class IO(str, Enum):
    """Socket types, as strings. "*" matches every type; a comma-separated value is a set of types, and two
    values match when one set contains the other (ComfyUI's `!=` rule, used when it checks links)."""

    STRING = "STRING"
    IMAGE = "IMAGE"
    MASK = "MASK"
    LATENT = "LATENT"
    BOOLEAN = "BOOLEAN"
    INT = "INT"
    FLOAT = "FLOAT"
    COMBO = "COMBO"
    CONDITIONING = "CONDITIONING"
    SAMPLER = "SAMPLER"
    SIGMAS = "SIGMAS"
    GUIDER = "GUIDER"
    NOISE = "NOISE"
    CLIP = "CLIP"
    CONTROL_NET = "CONTROL_NET"
    VAE = "VAE"
    MODEL = "MODEL"
    LORA_MODEL = "LORA_MODEL"
    LOSS_MAP = "LOSS_MAP"
    CLIP_VISION = "CLIP_VISION"
    CLIP_VISION_OUTPUT = "CLIP_VISION_OUTPUT"
    STYLE_MODEL = "STYLE_MODEL"
    GLIGEN = "GLIGEN"
    UPSCALE_MODEL = "UPSCALE_MODEL"
    AUDIO = "AUDIO"
    WEBCAM = "WEBCAM"
    POINT = "POINT"
    FACE_ANALYSIS = "FACE_ANALYSIS"
    BBOX = "BBOX"
    SEGS = "SEGS"
    VIDEO = "VIDEO"
    ANY = "*"
    NUMBER = "FLOAT,INT"
    PRIMITIVE = "STRING,FLOAT,INT,BOOLEAN"

    def __str__(self) -> str:
        return self.value

    def __ne__(self, other: object) -> bool:
        if self.value == "*" or other == "*":
            return False
        if not isinstance(other, str):
            return True
        mine, theirs = set(self.value.split(",")), set(other.split(","))
        return not (mine <= theirs or theirs <= mine)


class HiddenInputTypeDict(TypedDict, total=False):
    node_id: Literal["UNIQUE_ID"]
    unique_id: Literal["UNIQUE_ID"]
    prompt: Literal["PROMPT"]
    extra_pnginfo: Literal["EXTRA_PNGINFO"]
    dynprompt: Literal["DYNPROMPT"]


class InputTypeDict(TypedDict, total=False):
    """What INPUT_TYPES returns: required / optional inputs by name -> (type, options), and hidden ones."""
    required: dict
    optional: dict
    hidden: HiddenInputTypeDict


class ComfyNodeABC(ABC):
    """The shape of a V1 node class; subclasses declare INPUT_TYPES, RETURN_TYPES, FUNCTION, CATEGORY."""

    @classmethod
    @abstractmethod
    def INPUT_TYPES(cls) -> InputTypeDict:
        return {"required": {}}


class CheckLazyMixin:
    """Lazy inputs: ask for every input still unevaluated (None)."""

    def check_lazy_status(self, **kwargs) -> list[str]:
        return [name for name, value in kwargs.items() if value is None]


class FileLocator(TypedDict):
    filename: str
    subfolder: str
    type: Literal["input", "output", "temp"]
