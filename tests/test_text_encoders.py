"""Text encoders: numerical parity with transformers and diffusers, every file layout, fp8, and bad inputs.

Tiny random Qwen3 / Mistral 3 models with the real architecture and tiny real-format tokenizers stand in
for the published weights.
"""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Mistral3ForConditionalGeneration, Qwen3ForCausalLM

from flux2_core.demo_tokenizers import decoder_of, tekken_json, tiny_text_model, write_tiny_text_encoder
from flux2_core.dit import Flux2DiT
from flux2_core.errors import CheckpointError
from flux2_core.text_encoder_files import load_text_encoder, text_encoder_output_dim, tokenizer_from_tekken
from flux2_core.text_encoders import MAX_TOKENS, TEXT_ENCODER_SPECS, Flux2TextEncoder, render_prompt
from flux2_core.vae import Flux2VAE, VAEConfig
from flux2_core.variants import DiTConfig

KINDS = ("qwen3", "mistral3")
HIDDEN = 32
# A prompt with an image placeholder to strip, and one far over 512 tokens (the empty prompt, what CFG
# encodes as negative, is checked at the token level).
PROMPTS = ["a photo of a cat [IMG] sitting on a red chair", "a painting of a mountain lake " * 120]
PARITY_TOLERANCE = 1e-6
# The config entries that change what the decoder computes.
COMPUTE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "hidden_act", "rms_norm_eps", "rope_parameters", "attention_bias",
                  "sliding_window", "layer_types", "max_position_embeddings")
FULL_MODEL_CLASSES = {"qwen3": Qwen3ForCausalLM, "mistral3": Mistral3ForConditionalGeneration}
DIFFUSERS_PIPELINES = {"qwen3": Flux2KleinPipeline, "mistral3": Flux2Pipeline}


def max_errors(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error relative to the reference's largest magnitude)."""
    abs_error = (ours.float() - reference.float()).abs().max().item()
    return abs_error, abs_error / reference.float().abs().max().item()


def reference_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' own hidden states (index 0 = embeddings) of the full model."""
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    return output.hidden_states


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the shared test machine is oversubscribed otherwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per kind: the same seeded tiny encoder (fp32) in every layout we read, plus fp8 variants."""
    root = tmp_path_factory.mktemp("text_encoders")
    layouts: dict[str, dict[str, Path]] = {}
    for kind in KINDS:
        folder = root / kind
        pipeline = folder / "pipeline"
        layouts[kind] = {
            "hf": write_tiny_text_encoder(kind, folder / "hf", layout="hf", dtype=torch.float32),
            "pipeline": write_tiny_text_encoder(kind, pipeline / "text_encoder", layout="hf", dtype=torch.float32,
                                                tokenizer_dir=pipeline / "tokenizer").parent,
            "comfyui": write_tiny_text_encoder(kind, folder / "comfy" / f"{kind}.safetensors", dtype=torch.float32),
            "fp8mixed": write_tiny_text_encoder(kind, folder / "fp8mixed" / f"{kind}_fp8mixed.safetensors",
                                                dtype=torch.float32, quantization="fp8mixed"),
            "fp8scaled": write_tiny_text_encoder(kind, folder / "fp8scaled" / f"{kind}_fp8scaled.safetensors",
                                                 dtype=torch.float32, quantization="fp8scaled"),
        }
        (pipeline / "model_index.json").write_text(json.dumps({"_class_name": DIFFUSERS_PIPELINES[kind].__name__}))
    return layouts


@pytest.fixture(scope="module")
def hf_encoders(files) -> dict[str, Flux2TextEncoder]:
    return {kind: load_text_encoder(files[kind]["hf"], device="cpu") for kind in KINDS}


@pytest.fixture(scope="module")
def hf_embeddings(hf_encoders) -> dict[str, torch.Tensor]:
    return {kind: encoder.encode(PROMPTS) for kind, encoder in hf_encoders.items()}


def test_templates_are_exact():
    assert render_prompt("qwen3", "a cat") == (
        "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # diffusers carries BFL's system message verbatim.
    assert render_prompt("mistral3", "a [IMG]cat") == (
        f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]a cat[/INST]")


@pytest.mark.parametrize("kind", KINDS)
def test_encode_equals_transformers_hidden_states(kind, files):
    """Our truncated model gives exactly the full transformers model's hidden states at the taps."""
    reference = tiny_text_model(kind)
    tokenizer = (AutoTokenizer.from_pretrained(files[kind]["hf"]) if kind == "qwen3"
                 else tokenizer_from_tekken(tekken_json()))
    encoder = Flux2TextEncoder(kind, copy.deepcopy(decoder_of(reference)), tokenizer)
    taps = TEXT_ENCODER_SPECS[kind].layer_taps

    ours = encoder.encode(PROMPTS)
    input_ids, attention_mask = encoder.tokenize(PROMPTS)
    hidden_states = reference_hidden_states(reference, input_ids, attention_mask)
    expected = torch.cat([hidden_states[tap] for tap in taps], dim=-1)

    assert ours.shape == (len(PROMPTS), MAX_TOKENS, 3 * HIDDEN) == (len(PROMPTS), MAX_TOKENS, encoder.output_dim)
    assert len(encoder.model.layers) == max(taps) < reference.config.get_text_config().num_hidden_layers
    abs_error, rel_error = max_errors(ours, expected)
    assert abs_error <= PARITY_TOLERANCE and rel_error <= PARITY_TOLERANCE, (abs_error, rel_error)
    # The comparison can tell neighbouring layers apart, so a wrong tap could not pass it.
    shifted = torch.cat([hidden_states[tap + 1] for tap in taps], dim=-1)
    assert max_errors(ours, shifted)[0] > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_tokens_template_padding_and_truncation(kind, hf_encoders):
    encoder = hf_encoders[kind]
    tokenizer = encoder.tokenizer
    short_prompts = [PROMPTS[0], ""]
    input_ids, attention_mask = encoder.tokenize(short_prompts + PROMPTS[1:])
    assert input_ids.shape == attention_mask.shape == (3, MAX_TOKENS)

    for prompt, ids, mask in zip(short_prompts, input_ids, attention_mask):
        real = int(mask.sum())
        if kind == "qwen3":  # right padding
            assert mask[:real].all() and not mask[real:].any()
        else:  # left padding
            assert mask[-real:].all() and not mask[:-real].any()
            assert ids[-real] == tokenizer.bos_token_id
        assert (ids[mask == 0] == tokenizer.pad_token_id).all()
        assert tokenizer.decode(ids[mask == 1]) == render_prompt(kind, prompt)
    if kind == "mistral3":
        assert (input_ids != tokenizer.convert_tokens_to_ids("[IMG]")).all()
    assert attention_mask[2].all()  # the long prompt fills all 512 positions


@pytest.mark.parametrize("kind", KINDS)
def test_matches_diffusers_pipeline(kind, files, hf_encoders, hf_embeddings):
    """Same token ids, mask and prompt_embeds as diffusers' own prompt encoding, on the same HF folder."""
    text_encoder = FULL_MODEL_CLASSES[kind].from_pretrained(files[kind]["hf"]).eval()
    # Flux2Pipeline declares a PixtralProcessor; it needs torchvision, and for text it only renders the chat
    # template and calls this very tokenizer, so the tokenizer is passed directly.
    tokenizer = AutoTokenizer.from_pretrained(files[kind]["hf"])
    pipeline = DIFFUSERS_PIPELINES[kind](scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                         text_encoder=text_encoder, tokenizer=tokenizer, transformer=None)
    seen: dict[str, torch.Tensor] = {}
    hook = text_encoder.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        prompt_embeds, _ = pipeline.encode_prompt(PROMPTS, device="cpu")
    hook.remove()

    input_ids, attention_mask = hf_encoders[kind].tokenize(PROMPTS)
    assert torch.equal(seen["input_ids"], input_ids)
    assert torch.equal(seen["attention_mask"], attention_mask)
    abs_error, rel_error = max_errors(hf_embeddings[kind], prompt_embeds)
    assert abs_error <= PARITY_TOLERANCE and rel_error <= PARITY_TOLERANCE, (abs_error, rel_error)


@pytest.mark.parametrize("kind", KINDS)
def test_every_layout_gives_the_same_embeddings(kind, files, hf_encoders, hf_embeddings):
    """Same config, weights and token ids from every layout; the ComfyUI file's embeddings are computed."""
    reference = hf_encoders[kind]
    reference_ids = reference.tokenize(PROMPTS)
    for layout in ("pipeline", "comfyui"):
        encoder = load_text_encoder(files[kind][layout], device="cpu")
        assert encoder.kind == kind
        assert text_encoder_output_dim(files[kind][layout]) == encoder.output_dim == 3 * HIDDEN
        assert {f: getattr(encoder.model.config, f, None) for f in COMPUTE_FIELDS} == (
            {f: getattr(reference.model.config, f, None) for f in COMPUTE_FIELDS})
        theirs = dict(encoder.model.named_parameters())
        assert all(torch.equal(theirs[name], param) for name, param in reference.model.named_parameters())
        assert all(torch.equal(a, b) for a, b in zip(encoder.tokenize(PROMPTS), reference_ids))
    abs_error, _ = max_errors(encoder.encode(PROMPTS), hf_embeddings[kind])
    assert abs_error <= PARITY_TOLERANCE, abs_error
    assert text_encoder_output_dim(files[kind]["hf"]) == reference.output_dim


@pytest.mark.parametrize("layout", ["fp8mixed", "fp8scaled"])
@pytest.mark.parametrize("kind", KINDS)
def test_fp8_files_are_dequantized_on_load(kind, layout, files, hf_encoders, hf_embeddings):
    stored = load_file(files[kind][layout])
    scale_name = {"fp8mixed": "weight_scale", "fp8scaled": "scale_weight"}[layout]
    encoder = load_text_encoder(files[kind][layout], device="cpu")
    full_precision = dict(hf_encoders[kind].model.named_parameters())
    quantized = 0
    for name, param in encoder.model.named_parameters():
        weight = stored[f"model.{name}"]
        if weight.dtype == torch.float8_e4m3fn:
            expected = weight.float() * stored[f"model.{name.removesuffix('.weight')}.{scale_name}"].float()
            quantized += 1
        else:
            expected = full_precision[name]
        assert param.dtype == torch.float32 and torch.equal(param, expected), name
    assert quantized == 7 * TEXT_ENCODER_SPECS[kind].layers_needed
    if layout == "fp8mixed":
        embeddings = encoder.encode(PROMPTS)
        # Exactly what transformers computes with the dequantized weights...
        reference_model = tiny_text_model(kind)
        decoder_of(reference_model).load_state_dict(dict(encoder.model.named_parameters()), strict=False)
        hidden_states = reference_hidden_states(reference_model, *encoder.tokenize(PROMPTS))
        expected = torch.cat([hidden_states[tap] for tap in TEXT_ENCODER_SPECS[kind].layer_taps], dim=-1)
        assert max_errors(embeddings, expected)[1] <= PARITY_TOLERANCE
        # ...and within fp8 rounding of the full-precision embeddings (measured 0.12 qwen3, 0.07 mistral3 on
        # these random 28/31-layer models, whose errors compound more than trained ones').
        full = hf_embeddings[kind]
        relative = ((embeddings - full).norm() / full.norm()).item()
        assert relative < 0.15, relative


def test_compute_dtype_and_offload(files, hf_embeddings):
    encoder = load_text_encoder(files["qwen3"]["comfyui"], device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in encoder.model.parameters())
    embeddings = encoder.encode(PROMPTS[:1])
    assert embeddings.dtype == torch.bfloat16
    relative = ((embeddings.float() - hf_embeddings["qwen3"][:1]).norm() / hf_embeddings["qwen3"][:1].norm()).item()
    assert relative < 0.05, relative
    encoder.offload()
    assert encoder.weights_device.type == "cpu"
    assert torch.equal(encoder.to("cpu").encode(PROMPTS[:1]), embeddings)


@pytest.mark.parametrize("quantization", [None, "fp8mixed"])
def test_bf16_and_fp8_files_compute_in_fp32_on_the_cpu(quantization, tmp_path):
    """The file's storage dtype is not the compute dtype: without `dtype`, the CPU computes in fp32."""
    path = write_tiny_text_encoder("qwen3", tmp_path / "qwen3_bf16.safetensors", dtype=torch.bfloat16,
                                   quantization=quantization)
    assert torch.bfloat16 in {tensor.dtype for tensor in load_file(path).values()}
    encoder = load_text_encoder(path, device="cpu")
    assert {p.dtype for p in encoder.model.parameters()} == {torch.float32}
    assert encoder.encode("a cat").dtype == torch.float32


def test_single_file_qwen3_tokenizer_lookup(files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    lonely = tmp_path / "qwen_3_4b.safetensors"
    shutil.copy(files["qwen3"]["comfyui"], lonely)
    with pytest.raises(CheckpointError, match="carries no tokenizer") as error:
        load_text_encoder(lonely, device="cpu")
    assert str(tmp_path / "qwen_3_4b_tokenizer") in str(error.value)
    assert str(tmp_path / "qwen3_tokenizer") in str(error.value)

    tokenizer_dir = files["qwen3"]["comfyui"].parent / "qwen3_tokenizer"
    assert load_text_encoder(lonely, tokenizer=tokenizer_dir, device="cpu").kind == "qwen3"
    shutil.copytree(tokenizer_dir, tmp_path / "tokenizer")
    assert load_text_encoder(lonely, device="cpu").kind == "qwen3"
    with pytest.raises(CheckpointError, match="expected a tokenizer folder"):
        load_text_encoder(lonely, tokenizer=tmp_path / "nowhere", device="cpu")
    # Qwen3's tokenizer spells Mistral's template markers out as text: refused rather than silently wrong.
    with pytest.raises(CheckpointError, match=f"{tokenizer_dir}: expected a mistral3 tokenizer .* marker '<s>'"):
        load_text_encoder(files["mistral3"]["comfyui"], tokenizer=tokenizer_dir, device="cpu")


def test_single_file_qwen3_finds_installed_tokenizers(files, hf_embeddings, tmp_path, monkeypatch):
    """ComfyUI's own qwen_3_4b.safetensors carries no tokenizer: the one a ComfyUI install bundles, or one in
    the Hugging Face cache, is used without the user copying anything; unsuitable ones are skipped, named."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    qwen_tokenizer = files["qwen3"]["comfyui"].parent / "qwen3_tokenizer"
    mistral_tokenizer = files["mistral3"]["hf"]

    comfyui = tmp_path / "ComfyUI"
    weights = comfyui / "models" / "text_encoders" / "qwen_3_4b.safetensors"
    weights.parent.mkdir(parents=True)
    shutil.copy(files["qwen3"]["comfyui"], weights)
    bundled = comfyui / "comfy" / "text_encoders" / "qwen25_tokenizer"
    shutil.copytree(mistral_tokenizer, bundled, ignore=shutil.ignore_patterns("*.safetensors*", "config.json"))
    with pytest.raises(CheckpointError, match=f"carries no tokenizer.*skipped {bundled}: expected a qwen3 tokenizer"):
        load_text_encoder(weights, device="cpu")

    shutil.rmtree(bundled)
    shutil.copytree(qwen_tokenizer, bundled)
    encoder = load_text_encoder(weights, device="cpu")
    torch.testing.assert_close(encoder.encode(PROMPTS), hf_embeddings["qwen3"], rtol=0, atol=0)

    shutil.rmtree(comfyui / "comfy")
    snapshot = tmp_path / "hub" / "models--black-forest-labs--FLUX.2-klein-4B" / "snapshots" / "0123abc"
    shutil.copytree(qwen_tokenizer, snapshot / "tokenizer")
    torch.testing.assert_close(load_text_encoder(weights, device="cpu").encode(PROMPTS), hf_embeddings["qwen3"],
                               rtol=0, atol=0)


def test_wrong_files_are_named(files, tmp_path):
    dit = Flux2DiT(DiTConfig(hidden_size=32, num_heads=2, head_dim=16, axes_dim=(4, 4, 4, 4), depth_double=1,
                             depth_single=1, context_dim=96, guidance_embed=False), device="meta")
    save_file({k: torch.zeros(v.shape) for k, v in dit.state_dict().items()}, tmp_path / "flux-2-klein-4b.safetensors")
    vae = Flux2VAE(VAEConfig(base_channels=32, channel_multipliers=(1, 1, 1, 1), decoder_channels=(32, 32, 32, 32)),
                   device="meta")
    save_file({k: torch.zeros(v.shape) for k, v in vae.state_dict().items()}, tmp_path / "flux2-vae.safetensors")
    for name, found in (("flux-2-klein-4b.safetensors", "a DiT"), ("flux2-vae.safetensors", "a VAE")):
        with pytest.raises(CheckpointError, match=f"{name}: expected a Qwen3 or Mistral 3 text encoder.*found {found}"):
            load_text_encoder(tmp_path / name, device="cpu")
        with pytest.raises(CheckpointError, match=found):
            text_encoder_output_dim(tmp_path / name)

    truncated = tmp_path / "mistral_3_small_flux2_bf16.safetensors"
    truncated.write_bytes(files["mistral3"]["comfyui"].read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="mistral_3_small_flux2_bf16.safetensors: truncated"):
        load_text_encoder(truncated, device="cpu")
    text_file = tmp_path / "qwen_3_4b.safetensors"
    text_file.write_text("not a model")
    with pytest.raises(CheckpointError, match="qwen_3_4b.safetensors: expected a safetensors file"):
        load_text_encoder(text_file, device="cpu")
    with pytest.raises(CheckpointError, match="found nothing at that path"):
        load_text_encoder(tmp_path / "missing.safetensors", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="expected .safetensors weights"):
        load_text_encoder(tmp_path / "empty", device="cpu")

    shallow = write_tiny_text_encoder("qwen3", tmp_path / "shallow.safetensors", layers=20)
    with pytest.raises(CheckpointError, match="expected at least 27 layers.*found 20"):
        load_text_encoder(shallow, device="cpu")


@pytest.mark.parametrize("kind", KINDS)
def test_huge_prompts_are_cut_before_tokenizing_to_the_same_512_tokens(kind, hf_encoders, monkeypatch):
    """A 50 MB prompt must not be read whole by the tokenizer (gigabytes, minutes) to keep 512 tokens: the
    encoder cuts it first, and its tokens equal the tokenizer's own truncation of the whole prompt."""
    encoder = hf_encoders[kind]
    budget = encoder.prompt_char_budget
    prompts = ["a red fox jumps over the lazy dog. " * (budget // 10),
               "x" * (3 * budget), "Grüße 漢字 🦊 " * budget, "word" + " " * (2 * budget) + "tail"]
    expected = encoder.tokenizer([render_prompt(kind, p) for p in prompts], add_special_tokens=False,
                                 padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                 padding_side=encoder.spec.padding_side, return_tensors="pt")
    seen_lengths = []
    real_call = type(encoder.tokenizer).__call__
    monkeypatch.setattr(type(encoder.tokenizer), "__call__",
                        lambda self, texts, **kw: seen_lengths.extend(map(len, texts)) or real_call(self, texts, **kw))
    input_ids, attention_mask = encoder.tokenize(prompts + ["y" * 50_000_000])
    assert torch.equal(input_ids[:-1], expected["input_ids"])
    assert torch.equal(attention_mask[:-1], expected["attention_mask"])
    assert max(seen_lengths) <= budget + len(render_prompt(kind, ""))
