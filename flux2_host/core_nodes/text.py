"""STRING utility nodes and PreviewAny under ComfyUI's names and inputs (comfy_extras/nodes_string.py,
nodes_preview_any.py)."""

from __future__ import annotations

import json
import re
from typing import Any

CATEGORY = "utils/string"


def _text(multiline: bool, tooltip: str, default: str = "") -> tuple:
    return ("STRING", {"multiline": multiline, "default": default, "tooltip": tooltip})


class _StringNode:
    """A node that makes one STRING from its text inputs."""
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = ("STRING",)


class StringConcatenate(_StringNode):
    DESCRIPTION = "string_a + delimiter + string_b."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"string_a": _text(True, "The first text."), "string_b": _text(True, "The second text."),
                             "delimiter": _text(False, "Put between them.")}}

    def execute(self, string_a: str, string_b: str, delimiter: str) -> tuple[str]:
        return (delimiter.join((string_a, string_b)),)


class StringReplace(_StringNode):
    DESCRIPTION = "Replaces every occurrence of `find` with `replace` (plain text, no patterns)."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"string": _text(True, "The text."), "find": _text(True, "The text to find."),
                             "replace": _text(True, "The replacement.")}}

    def execute(self, string: str, find: str, replace: str) -> tuple[str]:
        return (string.replace(find, replace),)


class RegexReplace(_StringNode):
    DESCRIPTION = "Find and replace text using regex patterns (Python's re.sub)."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"string": _text(True, "The text."), "regex_pattern": _text(True, "The pattern."),
                             "replace": _text(True, "The replacement (\\1 refers to a group).")},
                "optional": {
                    "case_insensitive": ("BOOLEAN", {"default": True, "tooltip": "Ignore case."}),
                    "multiline": ("BOOLEAN", {"default": False, "tooltip": "^ and $ match at every line."}),
                    "dotall": ("BOOLEAN", {"default": False, "tooltip": "The dot also matches newlines."}),
                    "count": ("INT", {"default": 0, "min": 0, "max": 100,
                                      "tooltip": "Most replacements to make; 0 replaces all."}),
                }}

    def execute(self, string: str, regex_pattern: str, replace: str, case_insensitive: bool = True,
                multiline: bool = False, dotall: bool = False, count: int = 0) -> tuple[str]:
        flags = (re.IGNORECASE if case_insensitive else 0) | (re.MULTILINE if multiline else 0) | (
            re.DOTALL if dotall else 0)
        try:
            return (re.sub(regex_pattern, replace, string, count=count, flags=flags),)
        except re.error as error:
            raise ValueError(f"RegexReplace: regex_pattern: {error} in {regex_pattern!r}") from error


class JsonExtractString(_StringNode):
    DESCRIPTION = ("The value at `key` of a JSON object, as text (strings as they are, other values as JSON); "
                   "empty when the text is not a JSON object or has no such key.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"json_string": _text(True, "A JSON object."), "key": _text(False, "The key to read.")}}

    def execute(self, json_string: str, key: str) -> tuple[str]:
        try:
            document = json.loads(json_string)
        except json.JSONDecodeError:
            return ("",)
        if not isinstance(document, dict) or key not in document:
            return ("",)
        value = document[key]
        return (value if isinstance(value, str) else json.dumps(value),)


class PreviewAny:
    DESCRIPTION = "Shows any value as text in the UI."
    CATEGORY = "utils"
    FUNCTION = "main"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"source": ("*", {"tooltip": "The value to show."})}}

    def main(self, source: Any = None) -> dict:
        if isinstance(source, str):
            text = source
        elif isinstance(source, (bool, int, float)):
            text = str(source)
        elif source is None:
            text = "None"
        else:
            try:
                text = json.dumps(source)
            except (TypeError, ValueError):
                text = str(source)
        return {"ui": {"text": (text,)}}


NODE_CLASS_MAPPINGS = {
    "StringConcatenate": StringConcatenate,
    "StringReplace": StringReplace,
    "RegexReplace": RegexReplace,
    "JsonExtractString": JsonExtractString,
    "PreviewAny": PreviewAny,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StringConcatenate": "Concatenate",
    "StringReplace": "Replace",
    "RegexReplace": "Regex Replace",
    "JsonExtractString": "Extract String from JSON",
    "PreviewAny": "Preview Any",
}
