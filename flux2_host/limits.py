"""How much one request may ask of the server, checked before anything is parsed deeply or queued.

Without bounds one request could hold the server: a 100 MB JSON body, an `extra_data` nested so deep that
every later `/history` reply fails to serialise, 50 MB of prompt text, a 16384x16384 image or a batch of
4096. Each bound has a `flux2 serve` flag; the defaults let every real FLUX.2 workflow through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

# Input names that say how many pixels / images a node makes (EmptyFlux2LatentImage, EmptyLatentImage,
# ImageScale and the like all use these).
WIDTH_INPUTS = ("width",)
HEIGHT_INPUTS = ("height",)
BATCH_INPUTS = ("batch_size", "amount")


@dataclass(frozen=True)
class ServiceLimits:
    max_json_bytes: int = 32 * 1024 * 1024  # a request body read as JSON
    max_json_depth: int = 64  # nesting of objects and lists in it (a UI workflow needs about 10)
    max_text_chars: int = 1_000_000  # one string input of a prompt (the encoders keep 512 tokens anyway)
    max_pixels: int = 4096 * 4096  # width x height of any one node's image
    max_batch: int = 64  # images per batch of any one node
    memory_budget_bytes: int | None = None  # memory a prompt may need (None: the memory manager's budget)

    @classmethod
    def from_args(cls, args) -> "ServiceLimits":
        return cls(max_json_bytes=args.max_json_bytes, max_json_depth=args.max_json_depth,
                   max_text_chars=args.max_text_chars, max_pixels=args.max_pixels, max_batch=args.max_batch,
                   memory_budget_bytes=_gb_to_bytes(getattr(args, "memory_budget_gb", None)))


def _gb_to_bytes(gb: float | None) -> int | None:
    return None if gb is None else int(gb * 1e9)  # GB as the memory estimate counts them


LIMITS = web.AppKey("flux2_limits", ServiceLimits)


def limits_of(request: web.Request) -> ServiceLimits:
    return request.config_dict.get(LIMITS) or ServiceLimits()


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion so no depth can overflow the stack."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def int_input(inputs: dict, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = inputs.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def prompt_refusal(prompt: dict, limits: ServiceLimits) -> str | None:
    """Why this API-format prompt asks for more than the limits allow (naming node and input), or None.
    Whether its models and sizes fit in memory is checked after validation, once its files are known to
    exist (memory_refusal.py)."""
    for node_id, node in prompt.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue  # validation reports malformed nodes
        where = f"node {node_id} ({node.get('class_type')})"
        for name, value in inputs.items():
            if isinstance(value, str) and len(value) > limits.max_text_chars:
                return (f"{where} input {name!r} holds {len(value)} characters, more than the server's "
                        f"--max-text-chars {limits.max_text_chars}")
        width, height = int_input(inputs, WIDTH_INPUTS), int_input(inputs, HEIGHT_INPUTS)
        if width is not None and height is not None and width * height > limits.max_pixels:
            return (f"{where} asks for {width}x{height} = {width * height} pixels, more than the server's "
                    f"--max-pixels {limits.max_pixels}")
        batch = int_input(inputs, BATCH_INPUTS)
        if batch is not None and batch > limits.max_batch:
            return f"{where} asks for a batch of {batch}, more than the server's --max-batch {limits.max_batch}"
    return None
