"""Constant-value nodes and the lazy Switch, under ComfyUI's names and inputs."""

from __future__ import annotations

import sys
from typing import Any

CATEGORY = "utils/primitive"


class _Primitive:
    """One widget `value`, output unchanged; subclasses give its type and widget options."""
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES: tuple[str] = ()
    VALUE_OPTIONS: dict = {}

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"value": (cls.RETURN_TYPES[0], dict(cls.VALUE_OPTIONS))}}

    def execute(self, value: Any) -> tuple[Any]:
        return (value,)


class PrimitiveInt(_Primitive):
    RETURN_TYPES = ("INT",)
    VALUE_OPTIONS = {"min": -sys.maxsize, "max": sys.maxsize, "control_after_generate": True,
                     "tooltip": "The integer."}


class PrimitiveFloat(_Primitive):
    RETURN_TYPES = ("FLOAT",)
    VALUE_OPTIONS = {"min": -sys.maxsize, "max": sys.maxsize, "step": 0.1, "tooltip": "The number."}


class PrimitiveString(_Primitive):
    RETURN_TYPES = ("STRING",)
    VALUE_OPTIONS = {"tooltip": "The text."}


class PrimitiveStringMultiline(_Primitive):
    RETURN_TYPES = ("STRING",)
    VALUE_OPTIONS = {"multiline": True, "tooltip": "The text."}


class PrimitiveBoolean(_Primitive):
    RETURN_TYPES = ("BOOLEAN",)
    VALUE_OPTIONS = {"tooltip": "The value."}


class ComfySwitchNode:
    DESCRIPTION = "Outputs on_true or on_false depending on switch; only the chosen input is computed."
    CATEGORY = "logic"
    FUNCTION = "switch"
    RETURN_TYPES = ("*",)
    RETURN_NAMES = ("output",)
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "switch": ("BOOLEAN", {"default": False, "tooltip": "Which input to pass on."}),
            "on_false": ("*", {"lazy": True, "tooltip": "Passed on when switch is off."}),
            "on_true": ("*", {"lazy": True, "tooltip": "Passed on when switch is on."}),
        }}

    def check_lazy_status(self, switch: bool, on_false: Any = None, on_true: Any = None) -> list[str]:
        """The executor asks which lazy inputs must be computed: only the chosen one (None = not yet computed)."""
        if switch and on_true is None:
            return ["on_true"]
        if not switch and on_false is None:
            return ["on_false"]
        return []

    def switch(self, switch: bool, on_false: Any = None, on_true: Any = None) -> tuple[Any]:
        return (on_true if switch else on_false,)


NODE_CLASS_MAPPINGS = {
    "PrimitiveInt": PrimitiveInt,
    "PrimitiveFloat": PrimitiveFloat,
    "PrimitiveString": PrimitiveString,
    "PrimitiveStringMultiline": PrimitiveStringMultiline,
    "PrimitiveBoolean": PrimitiveBoolean,
    "ComfySwitchNode": ComfySwitchNode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PrimitiveInt": "Int",
    "PrimitiveFloat": "Float",
    "PrimitiveString": "String",
    "PrimitiveStringMultiline": "String (Multiline)",
    "PrimitiveBoolean": "Boolean",
    "ComfySwitchNode": "Switch",
}
