"""A tiny V1 node pack for the host tests: cheap nodes that exercise every executor feature."""

from __future__ import annotations

import threading
import time

import torch

from flux2_core.progress import check_interrupt, report_progress

CATEGORY = "testing"


class ConstantInt:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": -100, "max": 100, "control_after_generate": True})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value):
        return (value,)


class ConstantString:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "", "multiline": True})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, text):
        return (text,)


class AddInts:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"default": 0}), "b": ("INT", {"default": 0})}}

    RETURN_TYPES = ("INT",)
    RETURN_NAMES = ("sum",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, a, b):
        return (a + b,)


class ConcatStrings:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("STRING", {"default": ""})},
                "optional": {"b": ("STRING", {"default": "", "forceInput": True}),
                             "separator": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, a, b="", separator=""):
        return (a + separator + b,)


class StringLength:
    """A socket-only STRING input before an INT widget: the canvas lists it first."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True}), "offset": ("INT", {"default": 0})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, text, offset):
        return (len(text) + offset,)


class Seeded:
    """A seed-named INT input: the UI stores a control_after_generate value after it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**64 - 1}),
                             "label": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, seed, label):
        return (seed,)


class Choice:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"choice": (["red", "green", "blue"], {"default": "red"})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, choice):
        return (choice,)


SLOW_STARTED = threading.Event()


class SlowCounter:
    """Counts `steps` steps, reporting progress with a FLUX.2-shaped preview latent and checking interrupts."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0}),
                             "steps": ("INT", {"default": 3, "min": 1, "max": 10000}),
                             "delay": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value, steps, delay):
        for step in range(steps):
            check_interrupt()
            SLOW_STARTED.set()
            time.sleep(delay)
            report_progress(step + 1, steps, torch.randn(1, 128, 2, 2))
        return (value + steps,)


class LoudPreviews:
    """Reports `steps` steps, each with a large noisy preview: a lot of WebSocket traffic for its client."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": ("INT", {"default": 10, "min": 1, "max": 100000}),
                             "cells": ("INT", {"default": 32, "min": 1, "max": 256})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, steps, cells):
        for step in range(steps):
            check_interrupt()
            report_progress(step + 1, steps, torch.randn(1, 128, cells, cells))
        return (steps,)


class BusyTorch:
    """Keeps torch's thread pool busy for up to `seconds`, stopping at an interrupt."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seconds": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 600.0})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, seconds):
        matrix = torch.randn(256, 256)
        deadline = time.monotonic() + seconds
        rounds = 0
        while time.monotonic() < deadline:
            check_interrupt()
            SLOW_STARTED.set()
            matrix = torch.tanh(matrix @ matrix)
            rounds += 1
        return (rounds,)


class SolidImage:
    """A size x size IMAGE of one grey level: something cheap for SaveImage to write."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": 255}),
                             "size": ("INT", {"default": 64, "min": 1, "max": 1024})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value, size):
        return (torch.full((1, size, size, 3), value / 255.0),)


class Explode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value):
        raise RuntimeError(f"boom with value {value}")


class ReturnsBareValue:
    """A classic mistake: returning the value instead of a 1-tuple."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self):
        return 7


class ShowAnything:
    """The output node: shows whatever it receives."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",)}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value):
        return {"ui": {"text": [repr(value)]}}


class ShowInt:
    """An output node that takes an INT only, and passes it on."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}}

    RETURN_TYPES = ("INT",)
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value):
        return {"ui": {"text": [str(value)]}, "result": (value,)}


class EvenOnly:
    """VALIDATE_INPUTS rejects odd numbers; IS_CHANGED folds in a token the test controls."""

    token = "a"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": 10})}}

    @classmethod
    def VALIDATE_INPUTS(cls, value):
        if value % 2:
            return f"{value} is odd"
        return True

    @classmethod
    def IS_CHANGED(cls, value):
        return cls.token

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value):
        return (value,)


class AlwaysChanged:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}}

    @classmethod
    def IS_CHANGED(cls, value):
        return float("nan")

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value):
        return (value,)


class BrokenValidation:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}}

    @classmethod
    def VALIDATE_INPUTS(cls, value):
        raise ValueError("validator crashed")

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value):
        return (value,)


class MakeList:
    """OUTPUT_IS_LIST: one call yields `count` values that downstream nodes receive one by one."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"count": ("INT", {"default": 3, "min": 0, "max": 100})}}

    RETURN_TYPES = ("INT",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, count):
        return (list(range(count)),)


class SumList:
    """INPUT_IS_LIST: receives every value at once."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"values": ("INT", {"default": 0})}}

    RETURN_TYPES = ("INT",)
    INPUT_IS_LIST = True
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, values):
        return (sum(values),)


class LazySwitch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"switch": ("BOOLEAN", {"default": False}),
                             "on_false": ("*", {"lazy": True}),
                             "on_true": ("*", {"lazy": True})}}

    RETURN_TYPES = ("*",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def check_lazy_status(self, switch, on_false=None, on_true=None):
        return ["on_true" if switch else "on_false"]

    def run(self, switch, on_false=None, on_true=None):
        return (on_true if switch else on_false,)


class HiddenInputs:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, value, prompt, extra_pnginfo, unique_id):
        return {"ui": {"seen": [{"prompt_ids": sorted(prompt), "extra_pnginfo": extra_pnginfo,
                                 "unique_id": unique_id}]}}


class Undecorated:
    """No CATEGORY, DESCRIPTION or RETURN_NAMES: /object_info must fill ComfyUI's defaults."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    def run(self):
        return (1,)


NODE_CLASS_MAPPINGS = {
    "TestConstantInt": ConstantInt,
    "TestConstantString": ConstantString,
    "TestAddInts": AddInts,
    "TestConcatStrings": ConcatStrings,
    "TestStringLength": StringLength,
    "TestSeeded": Seeded,
    "TestChoice": Choice,
    "TestSlowCounter": SlowCounter,
    "TestLoudPreviews": LoudPreviews,
    "TestBusyTorch": BusyTorch,
    "TestSolidImage": SolidImage,
    "TestExplode": Explode,
    "TestReturnsBareValue": ReturnsBareValue,
    "TestShowAnything": ShowAnything,
    "TestShowInt": ShowInt,
    "TestEvenOnly": EvenOnly,
    "TestAlwaysChanged": AlwaysChanged,
    "TestBrokenValidation": BrokenValidation,
    "TestMakeList": MakeList,
    "TestSumList": SumList,
    "TestLazySwitch": LazySwitch,
    "TestHiddenInputs": HiddenInputs,
    "TestUndecorated": Undecorated,
}

NODE_DISPLAY_NAME_MAPPINGS = {"TestConstantInt": "Constant Int (test)"}
