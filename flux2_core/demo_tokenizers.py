"""Tiny tokenizers and tiny random text encoders, built fully offline, for tests and `flux2 demo-models`.

Both keep the real special tokens and prompt templates of the tokenizers FLUX.2 uses (Qwen3's byte-level BPE
for klein, Mistral's tekken for dev, whose control-token ids are the real ones) but have a vocabulary of a few
hundred entries, so the tiny random text encoders built on them stay tiny. The merges are learned from a short
built-in text with a deterministic byte-pair count, so every call writes the same files.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from flux2_core.checkpoints.detect import DEMO_MARKER, DEMO_MARKER_KEY, DEMO_TOKENIZER_FILE
from flux2_core.checkpoints.quant import quantize_weight
from flux2_core.text_encoder_files import FAMILY_DEFAULTS, MISTRAL_HEAD_DIM, tokenizer_from_tekken
from flux2_core.text_encoders import TEXT_ENCODER_SPECS

# Text the merges are learned from: the dev system message plus typical image prompts, so the common words
# of prompts and of the system message become single tokens.
_MERGE_CORPUS = """
You are an AI that reasons about image descriptions. You give structured responses focusing on object
relationships, object attribution and actions without speculation.
a photo of a cat sitting on a red chair in the sun, the cat is orange and white
a painting of a mountain lake at sunset with pine trees and a small wooden boat
portrait of an old man with a grey beard, soft light, high detail, studio background
a city street at night with neon signs, rain on the ground and people walking under umbrellas
a bowl of fruit on a table: apples, oranges, grapes and a banana; still life in oil paint
an astronaut riding a horse on the moon, the earth in the sky, cinematic wide shot
a robot reading a book in a library, warm light through the windows
change the color of the car to blue and keep the background the same
"""
_MERGE_COUNT = 300

# The pre-tokenizer split pattern Qwen2/Qwen3 tokenizers use (GPT-4 style, single digits).
_QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The split pattern of Mistral's tekken tokenizers (case-aware words, single digits).
_TEKKEN_SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN3_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# In Qwen3 the thinking markers are added (never split) but not special: decoding keeps them.
QWEN3_THINK_TOKENS = ("<think>", "</think>")

# Qwen3's chat template reduced to what text-to-image prompts need; with enable_thinking=False the assistant
# turn opens with an empty think block, which is what klein was trained on.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# Tekken v7 control tokens in rank order (ids 0..19 of the real Mistral Small 3.x tokenizer: <pad> is 11,
# [IMG] is 10). The real file pads this list to 1000 entries; the tiny one stops at the last named token.
TEKKEN_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)

# Mistral Small 3.x's chat template reduced to text messages (content given as a string or as a list of
# {"type": "text"} parts, the form diffusers' Flux2Pipeline passes).
MISTRAL_CHAT_TEMPLATE = (
    "{%- macro text_of(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '[SYSTEM_PROMPT]' + text_of(message['content']) + '[/SYSTEM_PROMPT]' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '[INST]' + text_of(message['content']) + '[/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- text_of(message['content']) + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@functools.lru_cache(maxsize=None)
def learn_byte_merges(text: str = _MERGE_CORPUS, count: int = _MERGE_COUNT) -> tuple[tuple[bytes, bytes], ...]:
    """Byte-pair merges learned from `text`, most frequent pair first (ties broken by the pair's bytes)."""
    words = Counter(re.findall(r" ?[A-Za-z]+| ?[^\sA-Za-z]+|\s+", text))
    pieces = {word: [bytes([b]) for b in word.encode("utf-8")] for word in words}
    merges: list[tuple[bytes, bytes]] = []
    while len(merges) < count:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, parts in pieces.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, parts in pieces.items():
            merged: list[bytes] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            pieces[word] = merged
    return tuple(merges)


_BYTE_LEVEL_ALPHABET = bytes_to_unicode()


def _byte_level(token: bytes) -> str:
    """A byte string in the printable byte-level alphabet that HF BPE vocabularies use."""
    return "".join(_BYTE_LEVEL_ALPHABET[b] for b in token)


def build_qwen3_tokenizer() -> Tokenizer:
    """The tiny Qwen3-style `tokenizers.Tokenizer`: 256 bytes, learned merges, then the special tokens."""
    merges = learn_byte_merges()
    vocab = {_byte_level(bytes([b])): b for b in range(256)}
    for left, right in merges:
        vocab.setdefault(_byte_level(left + right), len(vocab))
    tokenizer = Tokenizer(BPE(vocab, [(_byte_level(a), _byte_level(b)) for a, b in merges], fuse_unk=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN3_SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_THINK_TOKENS])
    return tokenizer


def write_qwen3_tokenizer(directory: str | Path) -> Path:
    """Write a tiny Qwen3 tokenizer as an HF tokenizer folder (AutoTokenizer, Flux2KleinPipeline)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_qwen3_tokenizer().save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "padding_side": "right",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 40960,
        "chat_template": QWEN3_CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


def tekken_json() -> str:
    """A tiny tekken tokenizer in the layout of Mistral's tekken.json (what ComfyUI embeds as `tekken_model`)."""
    merges = learn_byte_merges()
    ranked = [bytes([b]) for b in range(256)]
    for left, right in merges:
        if left + right not in ranked:
            ranked.append(left + right)
    vocab = []
    for rank, token in enumerate(ranked):
        try:
            token_str = token.decode("utf-8")
        except UnicodeDecodeError:
            token_str = None
        vocab.append({"rank": rank, "token_bytes": base64.b64encode(token).decode("ascii"), "token_str": token_str})
    special = [{"rank": rank, "token_str": token, "is_control": True}
               for rank, token in enumerate(TEKKEN_SPECIAL_TOKENS)]
    config = {
        "pattern": _TEKKEN_SPLIT_PATTERN,
        "num_vocab_tokens": len(vocab),
        "default_vocab_size": len(vocab) + len(special),
        "default_num_special_tokens": len(special),
        "version": "v7",
    }
    return json.dumps({"config": config, "vocab": vocab, "special_tokens": special}, ensure_ascii=False)


def write_mistral_tokenizer(directory: str | Path) -> Path:
    """Write the tiny tekken vocabulary as the HF tokenizer/processor folder FLUX.2-dev ships (`tokenizer/`).

    The folder holds the tekken-to-HF conversion of `tekken_json()` (so ids match the embedded ComfyUI
    tokenizer exactly), the chat template, and the Pixtral processor configs diffusers' Flux2Pipeline loads
    through AutoProcessor. No tekken.json is written: transformers would then prefer mistral-common.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_from_tekken(tekken_json().encode("utf-8"))
    tokenizer.save_pretrained(str(directory))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # Left padding as our encoder, ComfyUI and transformers' Llama tokenizer class (the usual class of Mistral HF
    # tokenizers) do; diffusers takes it from here. The generic fast class keeps the byte-level tokenizer.json
    # as is in transformers 4 and 5 alike.
    config.update(tokenizer_class="PreTrainedTokenizerFast", padding_side="left", model_max_length=131072,
                  chat_template=MISTRAL_CHAT_TEMPLATE)
    config.pop("vocab_file", None)
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    (directory / "chat_template.jinja").write_text(MISTRAL_CHAT_TEMPLATE, encoding="utf-8")
    processor = {"processor_class": "PixtralProcessor", "patch_size": 14, "spatial_merge_size": 2,
                 "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
    (directory / "processor_config.json").write_text(json.dumps(processor, indent=2), encoding="utf-8")
    image_processor = {
        "image_processor_type": "PixtralImageProcessorFast", "processor_class": "PixtralProcessor",
        "patch_size": 14, "size": {"longest_edge": 1540}, "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2), encoding="utf-8")
    return directory


def tiny_text_model(kind: str, seed: int = 0, hidden: int = 32, layers: int | None = None) -> PreTrainedModel:
    """A random full transformers model with FLUX.2's text-encoder architecture and the tiny vocabularies.

    Qwen3ForCausalLM for "qwen3", Mistral3ForConditionalGeneration (tiny Pixtral tower) for "mistral3",
    as diffusers' pipelines load them. The default depth is one layer past the last tap, so transformers'
    own hidden_states at the tap are not the final-normed ones. Mistral keeps the real head size 128, the
    only one a single file can be read back with.
    """
    layers = layers if layers is not None else TEXT_ENCODER_SPECS[kind].layers_needed + 1
    torch.manual_seed(seed)
    if kind == "qwen3":
        config = Qwen3Config(
            vocab_size=build_qwen3_tokenizer().get_vocab_size(with_added_tokens=True), hidden_size=hidden,
            intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
            head_dim=hidden // 2, tie_word_embeddings=True, initializer_range=0.1, **FAMILY_DEFAULTS["qwen3"],
        )
        return Qwen3ForCausalLM(config).eval()
    if kind == "mistral3":
        text_config = MistralConfig(
            vocab_size=len(json.loads(tekken_json())["vocab"]) + len(TEKKEN_SPECIAL_TOKENS), hidden_size=hidden,
            intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
            head_dim=MISTRAL_HEAD_DIM, initializer_range=0.1, **FAMILY_DEFAULTS["mistral3"],
        )
        vision_config = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=56, patch_size=14)
        config = Mistral3Config(text_config=text_config, vision_config=vision_config, tie_word_embeddings=False,
                                image_token_index=TEKKEN_SPECIAL_TOKENS.index("[IMG]"))
        return Mistral3ForConditionalGeneration(config).eval()
    raise ValueError(f"text encoder kind: expected one of {sorted(TEXT_ENCODER_SPECS)}, found {kind!r}")


def decoder_of(model: PreTrainedModel) -> PreTrainedModel:
    """The bare decoder (Qwen3Model / MistralModel) inside a full model from `tiny_text_model`."""
    return model.model.language_model if isinstance(model, Mistral3ForConditionalGeneration) else model.model


_BLOCK_LINEAR_WEIGHT = re.compile(r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


def _quantize_fp8(state_dict: dict[str, torch.Tensor], scale_name: str) -> dict[str, torch.Tensor]:
    """ComfyUI-style fp8 for the block linears: per-tensor scaled float8_e4m3fn, everything else unchanged.

    `scale_name` "weight_scale" gives the "mixed" layout (with comfy_quant and input_scale entries), and
    "scale_weight" the older "scaled fp8" layout (with its `scaled_fp8` marker tensor).
    """
    quantized: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if not _BLOCK_LINEAR_WEIGHT.search(key):
            quantized[key] = tensor
            continue
        layer = key.removesuffix(".weight")
        quantized[key], scale = quantize_weight(tensor)
        if scale_name == "weight_scale":
            quantized[f"{layer}.weight_scale"] = scale
            quantized[f"{layer}.input_scale"] = torch.ones(())
            format_json = json.dumps({"format": "float8_e4m3fn"}).encode("utf-8")
            quantized[f"{layer}.comfy_quant"] = torch.tensor(list(format_json), dtype=torch.uint8)
        else:
            quantized[f"{layer}.scale_weight"] = scale.reshape(1)
    if scale_name == "scale_weight":
        quantized["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return quantized


def write_tiny_text_encoder(kind: str, path: str | Path, layout: str = "comfyui", seed: int = 0,
                            hidden: int = 32, layers: int | None = None, dtype: torch.dtype = torch.bfloat16,
                            quantization: str | None = None, tokenizer_dir: str | Path | None = None,
                            demo: bool = False) -> Path:
    """Write a tiny random text encoder (same weights for the same seed) in a real on-disk layout.

    layout "hf": an HF model folder at `path` (config.json, sharded safetensors + index), tokenizer files in
    `tokenizer_dir` (default: `path` itself; give `<pipeline>/tokenizer` for a diffusers pipeline folder).
    layout "comfyui": one safetensors file at `path` with ComfyUI's `model.*` names. Mistral is pruned to the
    30 layers FLUX.2 reads (like Comfy-Org's mistral_3_small_flux2 files) and embeds its tokenizer as
    `tekken_model`; Qwen3 files carry no tokenizer, so one is written to `<stem>_tokenizer/` next to it.
    `quantization` "fp8mixed" or "fp8scaled" (comfyui only) stores the block linears as scaled fp8.
    `demo` (comfyui only) marks the file and its tokenizer folder as `flux2 demo-models` stand-ins, which
    `flux2 info`, `flux2 serve` and the tokenizer lookup recognise.
    """
    path = Path(path)
    model = tiny_text_model(kind, seed=seed, hidden=hidden, layers=layers).to(dtype)
    if layout == "hf":
        if quantization is not None:
            raise ValueError(f"quantization: expected None for the hf layout, found {quantization!r}")
        model.save_pretrained(str(path), max_shard_size="200KB")
        tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else path
        write_qwen3_tokenizer(tokenizer_dir) if kind == "qwen3" else write_mistral_tokenizer(tokenizer_dir)
        return path
    if layout != "comfyui":
        raise ValueError(f"layout: expected 'comfyui' or 'hf', found {layout!r}")
    decoder = decoder_of(model).state_dict()
    if kind == "mistral3":
        kept = TEXT_ENCODER_SPECS[kind].layers_needed
        decoder = {k: v for k, v in decoder.items()
                   if k != "norm.weight" and not (k.startswith("layers.") and int(k.split(".")[1]) >= kept)}
    state_dict = {f"model.{name}": tensor.contiguous() for name, tensor in decoder.items()}
    if quantization is not None:
        scale_names = {"fp8mixed": "weight_scale", "fp8scaled": "scale_weight"}
        if quantization not in scale_names:
            raise ValueError(f"quantization: expected one of {sorted(scale_names)} or None, found {quantization!r}")
        state_dict = _quantize_fp8(state_dict, scale_names[quantization])
    if kind == "mistral3":
        state_dict["tekken_model"] = torch.tensor(list(tekken_json().encode("utf-8")), dtype=torch.uint8)
    else:
        tokenizer_folder = write_qwen3_tokenizer(path.parent / f"{path.stem}_tokenizer")
        if demo:
            (tokenizer_folder / DEMO_TOKENIZER_FILE).write_text(DEMO_MARKER[DEMO_MARKER_KEY] + "\n", encoding="utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(path), metadata=DEMO_MARKER if demo else None)
    return path
