"""FLUX.2 text encoders: Qwen3 (klein) and the text part of Mistral Small 3.x (dev), run through transformers.

A prompt becomes `[B, 512, 3 * hidden]`: the prompt is rendered in the chat template the model was trained
with, tokenized and padded to 512 tokens, run through the language model with the padding masked inside
the encoder only, and the hidden states after three fixed layers are concatenated on the feature axis.
Parity reference: diffusers' Flux2Pipeline / Flux2KleinPipeline (`_get_*_prompt_embeds`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from flux2_core.devices import resolve_device
from flux2_core.errors import CheckpointError
from flux2_core.progress import check_interrupt

if TYPE_CHECKING:  # transformers takes seconds to import; whoever builds a text encoder has imported it already
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MAX_TOKENS = 512

# FLUX.2-dev's system message, verbatim from BFL's reference (one newline, after "object").
MISTRAL_SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)


@dataclass(frozen=True)
class TextEncoderSpec:
    """What differs between the two FLUX.2 text encoders besides their weights."""

    kind: str
    # Indices into transformers' hidden_states, where 0 is the embedding output and i the output of layer i-1.
    layer_taps: tuple[int, ...]
    padding_side: str

    @property
    def layers_needed(self) -> int:
        return max(self.layer_taps)


TEXT_ENCODER_SPECS = {
    "qwen3": TextEncoderSpec(kind="qwen3", layer_taps=(9, 18, 27), padding_side="right"),
    # Left padding with the tokenizer's <pad>, as ComfyUI does (pad id 11) and transformers' Llama tokenizer
    # class (the usual class of Mistral HF tokenizers) does by default; diffusers uses whatever side the
    # tokenizer folder declares, so we fix it here. ComfyUI stops at the prompt length instead of padding to
    # 512; diffusers and we pad to 512, and the DiT does attend to those pad tokens.
    "mistral3": TextEncoderSpec(kind="mistral3", layer_taps=(10, 20, 30), padding_side="left"),
}


def user_text(kind: str, prompt: str) -> str:
    """The prompt as it goes into the template: Mistral's [IMG] would be an image placeholder token, and
    diffusers and BFL strip it from user text."""
    return prompt.replace("[IMG]", "") if kind == "mistral3" else prompt


def render_prompt(kind: str, prompt: str) -> str:
    """The prompt in the chat template the text encoder saw in training (special tokens as text)."""
    if kind == "qwen3":
        return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    if kind == "mistral3":
        prompt = user_text(kind, prompt)
        return f"<s>[SYSTEM_PROMPT]{MISTRAL_SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{prompt}[/INST]"
    raise ValueError(f"text encoder kind: expected one of {sorted(TEXT_ENCODER_SPECS)}, found {kind!r}")


def _concrete_device(device: torch.device | str | None) -> torch.device:
    """The device with its index filled in ("cuda" -> "cuda:0"), so it compares equal to a tensor's device."""
    return torch.empty(0, device=resolve_device(device)).device


def truncate_after_last_tap(model: PreTrainedModel, kind: str) -> PreTrainedModel:
    """Drop the layers after the last tapped one and the final norm, in place.

    The taps read hidden states before the final norm, so with the norm replaced by identity the last
    hidden state transformers reports is exactly the un-normed output of the last kept layer.
    """
    keep = TEXT_ENCODER_SPECS[kind].layers_needed
    if len(model.layers) < keep:
        raise CheckpointError(
            f"{kind} text encoder: expected at least {keep} layers (FLUX.2 reads hidden states "
            f"{TEXT_ENCODER_SPECS[kind].layer_taps}), found {len(model.layers)}"
        )
    model.layers = model.layers[:keep]
    model.config.num_hidden_layers = keep
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = model.config.layer_types[:keep]
    model.norm = nn.Identity()
    return model


# Markers of each template that the tokenizer must read as one token each, not spell out as text.
_TEMPLATE_MARKERS = {
    "qwen3": ("<|im_start|>", "<|im_end|>", "<think>", "</think>"),
    "mistral3": ("<s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"),
}


def check_tokenizer(kind: str, tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Refuse a tokenizer that cannot produce this encoder's input: no pad token, or template markers that
    it spells out as text (another model's tokenizer). `where` names the tokenizer's origin in the message."""
    if tokenizer.pad_token_id is None:
        raise CheckpointError(f"{where}: expected a {kind} tokenizer with a pad token, found none (pad_token unset)")
    for marker in _TEMPLATE_MARKERS[kind]:
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise CheckpointError(
                f"{where}: expected a {kind} tokenizer that reads the template marker {marker!r} as one token, "
                f"found {len(ids)} tokens {ids} (another model's tokenizer?)"
            )


def _check_interrupt_before(layer: nn.Module, args: tuple) -> None:
    check_interrupt()


class Flux2TextEncoder:
    """A transformers language model plus its tokenizer, producing FLUX.2 prompt embeddings.

    `model` is the bare decoder (`Qwen3Model` / `MistralModel`, not the *ForCausalLM head); it is truncated
    after the last tapped layer in place. Weights may live on the CPU between uses: `encode` moves them to
    `device` when needed and `offload()` sends them back.
    """

    def __init__(self, kind: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 device: torch.device | str | None = None):
        if kind not in TEXT_ENCODER_SPECS:
            raise ValueError(f"text encoder kind: expected one of {sorted(TEXT_ENCODER_SPECS)}, found {kind!r}")
        check_tokenizer(kind, tokenizer, f"tokenizer {type(tokenizer).__name__}")
        self.kind = kind
        self.spec = TEXT_ENCODER_SPECS[kind]
        self.model = truncate_after_last_tap(model, kind).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = _concrete_device(device) if device is not None else self.weights_device
        # Encoding a batch of prompts on a CPU takes seconds: /interrupt is honoured before every decoder layer.
        for layer in self.model.layers:
            layer.register_forward_pre_hook(_check_interrupt_before)

    @property
    def output_dim(self) -> int:
        return len(self.spec.layer_taps) * self.model.config.hidden_size

    @property
    def weights_device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def to(self, device: torch.device | str) -> Flux2TextEncoder:
        """Make `device` the compute device and move the weights there now."""
        self.device = _concrete_device(device)
        self.model.to(self.device)
        return self

    def offload(self) -> Flux2TextEncoder:
        """Move the weights to (pinned) CPU memory now, through the process's memory manager; the next
        `encode` brings them back to the compute device. Rarely needed: the manager evicts models by itself
        when another needs the room."""
        from flux2_core.memory import residency

        residency.default_manager().offload(self)
        return self

    @functools.cached_property
    def prompt_char_budget(self) -> int:
        """Characters of prompt that hold at least MAX_TOKENS tokens whatever they are: no token spans more
        characters than the vocabulary's longest token string (byte-level vocabularies spell one byte per
        character, and a character is at least one byte), plus one token of slack for the cut."""
        longest = max(len(token) for token in self.tokenizer.get_vocab())
        return (MAX_TOKENS + 1) * longest

    def tokenize(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both `[B, 512]`, for the templated prompts.

        A prompt is cut to `prompt_char_budget` characters first: the tokenizer would read all of a 50 MB
        prompt (gigabytes of memory, minutes) only to keep its first 512 tokens, which the cut keeps."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        budget = self.prompt_char_budget
        batch = self.tokenizer(
            [render_prompt(self.kind, user_text(self.kind, prompt)[:budget]) for prompt in prompts],
            # The template already holds every special token (Mistral's <s> included).
            add_special_tokens=False,
            padding="max_length",
            truncation=True,
            max_length=MAX_TOKENS,
            padding_side=self.spec.padding_side,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompt embeddings `[B, 512, output_dim]` in the model's dtype, on the compute device."""
        input_ids, attention_mask = self.tokenize(prompts)
        if self.weights_device != self.device:
            self.model.to(self.device)
        output = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            output_hidden_states=True,
            use_cache=False,
        )
        return torch.cat([output.hidden_states[tap] for tap in self.spec.layer_taps], dim=-1)
