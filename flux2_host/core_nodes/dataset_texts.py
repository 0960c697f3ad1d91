"""ComfyUI's dataset text nodes (comfy_extras/nodes_dataset.py, category dataset/text) under their ids, inputs,
defaults and widget order: caption edits applied to each text of a STRING list (the host maps them over the
list), and MergeTextLists, which is given the whole list."""

from __future__ import annotations


class TextTransform:
    """A node applying `transform` to one text; over a STRING list the host calls it once per text."""

    CATEGORY = "dataset/text"
    FUNCTION = "process"
    EXPERIMENTAL = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("texts",)
    OUTPUT_TOOLTIPS = ("Processed texts",)
    EXTRA_INPUTS: dict = {}

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"texts": ("STRING", {"tooltip": "Text to process."}), **cls.EXTRA_INPUTS}}

    def process(self, texts: str, **options) -> tuple[str]:
        return (self.transform(texts, **options),)

    def transform(self, text: str, **options) -> str:
        raise NotImplementedError


def _string_input(tooltip: str) -> tuple:
    return ("STRING", {"default": "", "tooltip": tooltip})


class TextToLowercase(TextTransform):
    DESCRIPTION = "Convert all texts to lowercase."

    def transform(self, text: str) -> str:
        return text.lower()


class TextToUppercase(TextTransform):
    DESCRIPTION = "Convert all texts to uppercase."

    def transform(self, text: str) -> str:
        return text.upper()


class TruncateText(TextTransform):
    DESCRIPTION = "Truncate all texts to a maximum length."
    EXTRA_INPUTS = {"max_length": ("INT", {"default": 77, "min": 1, "max": 10000, "tooltip": "Maximum text length."})}

    def transform(self, text: str, max_length: int) -> str:
        return text[:max_length]


class AddTextPrefix(TextTransform):
    DESCRIPTION = "Add a prefix to all texts."
    EXTRA_INPUTS = {"prefix": _string_input("Prefix to add.")}

    def transform(self, text: str, prefix: str) -> str:
        return prefix + text


class AddTextSuffix(TextTransform):
    DESCRIPTION = "Add a suffix to all texts."
    EXTRA_INPUTS = {"suffix": _string_input("Suffix to add.")}

    def transform(self, text: str, suffix: str) -> str:
        return text + suffix


class ReplaceText(TextTransform):
    DESCRIPTION = "Replace text in all texts."
    EXTRA_INPUTS = {"find": _string_input("Text to find."), "replace": _string_input("Text to replace with.")}

    def transform(self, text: str, find: str, replace: str) -> str:
        return text.replace(find, replace)


class StripWhitespace(TextTransform):
    DESCRIPTION = "Strip leading and trailing whitespace from all texts."

    def transform(self, text: str) -> str:
        return text.strip()


class MergeTextLists:
    DESCRIPTION = "Concatenate multiple text lists into one."
    CATEGORY = "dataset/text"
    FUNCTION = "merge"
    EXPERIMENTAL = True
    INPUT_IS_LIST = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("texts",)
    OUTPUT_IS_LIST = (True,)
    OUTPUT_TOOLTIPS = ("Processed texts",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"texts": ("STRING", {"tooltip": "List of texts to process."})}}

    def merge(self, texts: list[str]) -> tuple[list[str]]:
        return (list(texts),)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    TextToLowercase, TextToUppercase, TruncateText, AddTextPrefix, AddTextSuffix, ReplaceText, StripWhitespace,
    MergeTextLists)}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TextToLowercase": "Text to Lowercase",
    "TextToUppercase": "Text to Uppercase",
    "TruncateText": "Truncate Text",
    "AddTextPrefix": "Add Text Prefix",
    "AddTextSuffix": "Add Text Suffix",
    "ReplaceText": "Replace Text",
    "StripWhitespace": "Strip Whitespace",
    "MergeTextLists": "Merge Text Lists",
}
