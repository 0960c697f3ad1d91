"""The FLUX.2 node pack and the host's core nodes, node by node, against the engine's Python API on the tiny
demo models: same loaders, same embeddings, same latents for the same seed, PNGs with the workflow inside."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import custom_nodes_flux2
from safetensors.torch import save_file

from flux2_core.checkpoints.loaders import load_dit, load_text_encoder, load_vae
from flux2_core.errors import Flux2Error
from flux2_core.lora import load_lora, merge_loras
from flux2_core.patched_model import REFERENCE_KV_CACHE, PatchedModel
from flux2_core.pipeline import Flux2Pipeline
from flux2_core.references import MULTI_REFERENCE_PIXEL_CAP, SINGLE_REFERENCE_PIXEL_CAP
from flux2_core.sampling import flux2_sigmas, make_noise, sample, sigmas_for_denoise
from flux2_host import core_nodes, folders

PACK = custom_nodes_flux2.NODE_CLASS_MAPPINGS
CORE = core_nodes.NODE_CLASS_MAPPINGS
KLEIN, KLEIN_BASE = "flux-2-klein-4b.safetensors", "flux-2-klein-base-4b.safetensors"
DEV = "flux2_dev_fp8mixed.safetensors"
QWEN, MISTRAL, VAE = "qwen_3_4b.safetensors", "mistral_3_small_flux2_bf16.safetensors", "flux2-vae.safetensors"
PROMPT = "a red fox in the snow"
LORA = "tiny_kohya_lora.safetensors"


def write_kohya_lora(path: Path, hidden: int, rank: int = 4) -> None:
    """A small kohya-dialect LoRA on two fused layers of a DiT `hidden` wide."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, out_features in (("double_blocks_0_img_attn_qkv", 3 * hidden), ("single_blocks_0_linear2", hidden)):
        in_features = hidden if module.endswith("qkv") else 4 * hidden
        tensors[f"lora_unet_{module}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.3
        tensors[f"lora_unet_{module}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.3
        tensors[f"lora_unet_{module}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def host_dirs(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The host's folders pointed at the demo models, with `folder_paths` answering for the pack."""
    root = tmp_path_factory.mktemp("node_dirs")
    dirs = {name: root / name for name in ("input", "output", "temp")}
    folders.configure(models=str(demo_models_dir), input_dir=str(dirs["input"]), output_dir=str(dirs["output"]),
                      temp_dir=str(dirs["temp"]))
    folders.install_as_folder_paths()
    loras = root / "loras"
    loras.mkdir()
    write_kohya_lora(loras / LORA, hidden=64)
    folders.add_model_folder_path("loras", str(loras))
    return {"models": demo_models_dir, "lora_dir": loras, **dirs}


@pytest.fixture(scope="module")
def engine(host_dirs: dict[str, Path]) -> dict:
    """The demo models loaded straight through flux2_core, for reference results."""
    models = host_dirs["models"]
    return {
        "klein": load_dit(models / "diffusion_models" / KLEIN),
        "klein_base": load_dit(models / "diffusion_models" / KLEIN_BASE),
        "dev": load_dit(models / "diffusion_models" / DEV),
        "qwen": load_text_encoder(models / "text_encoders" / QWEN),
        "mistral": load_text_encoder(models / "text_encoders" / MISTRAL),
        "vae": load_vae(models / "vae" / VAE),
    }


@pytest.fixture(scope="module")
def nodes(engine: dict) -> dict:
    """The same models loaded through the loader nodes (pack and core)."""
    return {
        "klein": PACK["Flux2LoadModel"]().load(KLEIN, "default")[0],
        "klein_base": CORE["UNETLoader"]().load_unet(KLEIN_BASE, "default")[0],
        "dev": CORE["UNETLoader"]().load_unet(DEV, "default")[0],
        "qwen": PACK["Flux2LoadTextEncoder"]().load(QWEN)[0],
        "mistral": CORE["CLIPLoader"]().load_clip(MISTRAL, "flux2", "default")[0],
        "vae": PACK["Flux2LoadVAE"]().load(VAE)[0],
    }


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def as_image(picture: Image.Image) -> torch.Tensor:
    """A PIL image in ComfyUI's IMAGE layout, [1, H, W, 3] in 0..1."""
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).unsqueeze(0)


def pack_encode(text_encoder, prompt: str):
    return PACK["Flux2TextEncode"]().encode(text_encoder, prompt)[0]


def pack_sample(model, positive, latent, seed=5, steps=0, guidance=0.0, cfg=0.0, denoise=1.0, negative=None):
    return PACK["Flux2Sampler"]().sample(model, positive, latent, seed, steps, guidance, cfg, denoise, "euler",
                                         negative=negative)[0]["samples"]


def empty_latent(width: int = 64, height: int = 64) -> dict:
    return PACK["Flux2EmptyLatent"]().generate(width, height, 1)[0]


# --- packaging ------------------------------------------------------------------------------------------------

def test_pack_loads_by_file_location_without_the_host_and_registers_no_core_names(tmp_path: Path) -> None:
    """What ComfyUI does: import custom_nodes/<folder>/__init__.py under a name of its own choosing."""
    pack_dir = Path(custom_nodes_flux2.__file__).parent
    script = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("comfy_custom_pack_xyz", {str(pack_dir / "__init__.py")!r},
                                              submodule_search_locations=[{str(pack_dir)!r}])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
host_imported = any(name == "flux2_host" or name.startswith("flux2_host.") for name in sys.modules)
by_name = "custom_nodes_flux2" in sys.modules
print(json.dumps({{"nodes": sorted(module.NODE_CLASS_MAPPINGS), "display": sorted(module.NODE_DISPLAY_NAME_MAPPINGS),
                  "host_imported": host_imported, "imported_by_package_name": by_name}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["host_imported"] is False
    assert report["imported_by_package_name"] is False
    assert report["nodes"] == sorted(PACK)
    assert report["display"] == sorted(PACK)
    assert not set(report["nodes"]) & set(CORE)
    assert all(name.startswith("Flux2") for name in report["nodes"])


def test_pack_folder_ships_requirements_for_comfyui_manager() -> None:
    requirements = (Path(custom_nodes_flux2.__file__).parent / "requirements.txt").read_text()
    assert "torch" in requirements and "safetensors" in requirements and "pip install" in requirements


@pytest.mark.parametrize("node_id", sorted(PACK))
def test_every_pack_node_is_documented(host_dirs, node_id: str) -> None:
    node_class = PACK[node_id]
    assert node_class.CATEGORY.startswith("FLUX.2/")
    assert node_class.DESCRIPTION.strip()
    assert len(node_class.OUTPUT_TOOLTIPS) == len(node_class.RETURN_TYPES)
    assert callable(getattr(node_class, node_class.FUNCTION))
    for section in ("required", "optional"):
        for name, spec in node_class.INPUT_TYPES().get(section, {}).items():
            assert len(spec) == 2 and spec[1].get("tooltip", "").strip(), f"{node_id}.{name} has no tooltip"


@pytest.mark.parametrize("node_id", sorted(CORE))
def test_every_core_node_has_a_category_and_input_tooltips(host_dirs, node_id: str) -> None:
    node_class = CORE[node_id]
    assert node_class.CATEGORY
    assert callable(getattr(node_class, node_class.FUNCTION))
    for section in ("required", "optional"):
        for name, spec in node_class.INPUT_TYPES().get(section, {}).items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_model_combos_list_the_demo_models(host_dirs) -> None:
    assert KLEIN in PACK["Flux2LoadModel"].INPUT_TYPES()["required"]["model_name"][0]
    assert QWEN in PACK["Flux2LoadTextEncoder"].INPUT_TYPES()["required"]["text_encoder_name"][0]
    assert VAE in CORE["VAELoader"].INPUT_TYPES()["required"]["vae_name"][0]
    assert DEV in CORE["UNETLoader"].INPUT_TYPES()["required"]["unet_name"][0]


# --- loaders and encoders ---------------------------------------------------------------------------------------

def test_model_loaders_carry_the_engine_dit_and_its_variant(engine, nodes) -> None:
    for key, variant in (("klein", "klein-4b"), ("klein_base", "klein-base-4b"), ("dev", "flux2-dev")):
        model = nodes[key]
        assert isinstance(model, PatchedModel) and model.variant == variant
        assert model.options == {} and model.lora_patches == ()
        ours, reference = model.diffusion_model.state_dict(), engine[key].state_dict()
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[name], reference[name]) for name in ours)


def test_missing_model_file_names_the_node_and_input(host_dirs) -> None:
    with pytest.raises(FileNotFoundError, match="Flux2LoadModel: model_name"):
        PACK["Flux2LoadModel"]().load("nope.safetensors", "default")
    with pytest.raises(FileNotFoundError, match="VAELoader: vae_name"):
        CORE["VAELoader"]().load_vae("nope.safetensors")


def test_clip_loader_refuses_other_model_families(host_dirs) -> None:
    with pytest.raises(ValueError, match="CLIPLoader: type: expected 'flux2'"):
        CORE["CLIPLoader"]().load_clip(QWEN, "sd3", "default")


def test_text_encode_nodes_equal_the_encoder(engine, nodes) -> None:
    expected = engine["qwen"].encode(PROMPT)
    conditioning = pack_encode(nodes["qwen"], PROMPT)
    assert torch.equal(conditioning.embeddings, expected)
    assert conditioning.references == ()
    [[embeddings, options]] = CORE["CLIPTextEncode"]().encode(nodes["qwen"], PROMPT)[0]
    assert torch.equal(embeddings, expected) and options == {}
    assert embeddings.shape == (1, 512, engine["klein"].config.context_dim)


def test_conditioning_nodes_copy_instead_of_mutating(nodes) -> None:
    conditioning = CORE["CLIPTextEncode"]().encode(nodes["qwen"], PROMPT)[0]
    guided = CORE["FluxGuidance"]().append(conditioning, 4.0)[0]
    zeroed = CORE["ConditioningZeroOut"]().zero_out(guided)[0]
    latent = {"samples": torch.randn(1, 128, 3, 2)}
    referenced = CORE["ReferenceLatent"]().append(zeroed, latent)[0]
    twice = CORE["ReferenceLatent"]().append(referenced, latent)[0]
    assert conditioning[0][1] == {} and guided[0][1] == {"guidance": 4.0}
    assert not zeroed[0][0].any() and zeroed[0][1] == {"guidance": 4.0}
    assert referenced[0][1]["reference_latents"] == [latent["samples"]]
    assert len(twice[0][1]["reference_latents"]) == 2 and len(referenced[0][1]["reference_latents"]) == 1
    assert CORE["ReferenceLatent"]().append(zeroed, None)[0] is zeroed


# --- latents and the VAE -----------------------------------------------------------------------------------------

def test_empty_latents_have_the_flux2_layout() -> None:
    assert PACK["Flux2EmptyLatent"]().generate(96, 64, 2)[0]["samples"].shape == (2, 128, 4, 6)
    core = CORE["EmptyFlux2LatentImage"]().generate(100, 70, 1)[0]["samples"]
    assert core.shape == (1, 128, 4, 6) and not core.any()  # ComfyUI rounds sizes down to the latent grid
    with pytest.raises(Flux2Error, match="Flux2EmptyLatent: width: expected a positive multiple of 16 px, found 100"):
        PACK["Flux2EmptyLatent"]().generate(100, 64, 1)


def test_vae_nodes_equal_the_vae_in_comfyui_layouts(engine, nodes) -> None:
    picture = random_image(72, 50)  # cropped to 64 x 48, centered
    image = as_image(picture)
    pixels = image[:, 1:49, 4:68].movedim(-1, 1) * 2 - 1
    expected = engine["vae"].encode(pixels)
    pack_latent = PACK["Flux2VAEEncode"]().encode(image, nodes["vae"])[0]
    core_latent = CORE["VAEEncode"]().encode(nodes["vae"], image)[0]
    assert pack_latent["samples"].shape == (1, 128, 3, 4)
    torch.testing.assert_close(pack_latent["samples"], expected)
    torch.testing.assert_close(core_latent["samples"], expected)

    decoded = PACK["Flux2VAEDecode"]().decode(pack_latent, nodes["vae"])[0]
    reference = ((engine["vae"].decode(expected) + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert decoded.shape == (1, 48, 64, 3) and 0 <= decoded.min() and decoded.max() <= 1
    torch.testing.assert_close(decoded, reference)
    torch.testing.assert_close(CORE["VAEDecode"]().decode(nodes["vae"], pack_latent)[0], reference)


def test_latent_inputs_reject_other_model_families_by_node_and_input(nodes) -> None:
    with pytest.raises(ValueError, match=r"Flux2VAEDecode: latent: expected a FLUX.2 latent \[B, 128"):
        PACK["Flux2VAEDecode"]().decode({"samples": torch.zeros(1, 16, 8, 8)}, nodes["vae"])


# --- sampling -----------------------------------------------------------------------------------------------------

def test_flux2_sampler_equals_engine_sample_with_distilled_defaults(engine, nodes) -> None:
    """Distilled klein: 4 steps, no CFG; the seed's noise is ComfyUI's CPU noise."""
    ours = pack_sample(nodes["klein"], pack_encode(nodes["qwen"], PROMPT), empty_latent(64, 48), seed=11)
    expected = sample(engine["klein"], make_noise(11, (1, 128, 3, 4)), flux2_sigmas(4, 64, 48),
                      engine["qwen"].encode(PROMPT))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_flux2_sampler_equals_the_pipeline(engine, nodes) -> None:
    ours = pack_sample(nodes["klein"], pack_encode(nodes["qwen"], PROMPT), empty_latent(), seed=3)
    pipeline = Flux2Pipeline(engine["klein"], engine["vae"], engine["qwen"])
    expected = pipeline(PROMPT, width=64, height=64, seed=3, output_type="latent")
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_flux2_sampler_base_klein_defaults_to_cfg_against_the_empty_prompt(engine, nodes) -> None:
    ours = pack_sample(nodes["klein_base"], pack_encode(nodes["qwen"], PROMPT), empty_latent(), seed=1, steps=3)
    expected = sample(engine["klein_base"], make_noise(1, (1, 128, 4, 4)), flux2_sigmas(3, 64, 64),
                      engine["qwen"].encode(PROMPT), negative_context=engine["qwen"].encode(""), cfg=4.0)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    explicit = pack_sample(nodes["klein_base"], pack_encode(nodes["qwen"], PROMPT), empty_latent(), seed=1, steps=3,
                           cfg=4.0, negative=pack_encode(nodes["qwen"], ""))
    torch.testing.assert_close(explicit, expected, rtol=1e-5, atol=1e-5)


def test_flux2_sampler_dev_uses_embedded_guidance(engine, nodes) -> None:
    positive = pack_encode(nodes["mistral"], PROMPT)
    context = engine["mistral"].encode(PROMPT)
    noise, sigmas = make_noise(2, (1, 128, 4, 4)), flux2_sigmas(2, 64, 64)
    default = pack_sample(nodes["dev"], positive, empty_latent(), seed=2, steps=2)
    expected = sample(engine["dev"], noise, sigmas, context, guidance=4.0)
    torch.testing.assert_close(default, expected, rtol=1e-5, atol=1e-5)
    strong = pack_sample(nodes["dev"], positive, empty_latent(), seed=2, steps=2, guidance=9.0)
    expected = sample(engine["dev"], noise, sigmas, context, guidance=9.0)
    torch.testing.assert_close(strong, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(default, strong)


def core_graph(model, positive, negative, cfg: float, seed: int, steps: int, width: int, height: int,
               latent: dict | None = None) -> tuple[dict, dict]:
    """RandomNoise + CFGGuider + KSamplerSelect + Flux2Scheduler + SamplerCustomAdvanced, as the templates wire it."""
    noise = CORE["RandomNoise"]().get_noise(seed)[0]
    guider = CORE["CFGGuider"]().get_guider(model, positive, negative, cfg)[0]
    sampler = CORE["KSamplerSelect"]().get_sampler("euler")[0]
    sigmas = CORE["Flux2Scheduler"]().get_sigmas(steps, width, height)[0]
    latent = latent or CORE["EmptyFlux2LatentImage"]().generate(width, height, 1)[0]
    return CORE["SamplerCustomAdvanced"]().sample(noise, guider, sampler, sigmas, latent)


def test_core_sampling_graph_equals_the_pack_sampler(nodes) -> None:
    encode = CORE["CLIPTextEncode"]().encode
    output, denoised = core_graph(nodes["klein_base"], encode(nodes["qwen"], PROMPT)[0], encode(nodes["qwen"], "")[0],
                                  cfg=5.0, seed=9, steps=3, width=64, height=48)
    pack = pack_sample(nodes["klein_base"], pack_encode(nodes["qwen"], PROMPT), empty_latent(64, 48), seed=9, steps=3,
                       cfg=5.0)
    assert torch.equal(output["samples"], pack)
    # The last Euler step lands on sigma 0, where the model's clean-image prediction is the result.
    torch.testing.assert_close(denoised["samples"], output["samples"], rtol=1e-4, atol=1e-4)


def test_distilled_template_wiring_equals_the_pack_sampler(nodes) -> None:
    """CFGGuider(cfg=1) with a ConditioningZeroOut negative runs one pass: the negative is never used."""
    positive = CORE["CLIPTextEncode"]().encode(nodes["qwen"], PROMPT)[0]
    negative = CORE["ConditioningZeroOut"]().zero_out(positive)[0]
    output, _ = core_graph(nodes["klein"], positive, negative, cfg=1.0, seed=4, steps=4, width=64, height=64)
    assert torch.equal(output["samples"], pack_sample(nodes["klein"], pack_encode(nodes["qwen"], PROMPT),
                                                      empty_latent(), seed=4))


def test_flux2_scheduler_counts_tokens_like_comfyui() -> None:
    sigmas = CORE["Flux2Scheduler"]().get_sigmas(4, 1024, 1024)[0]
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.967384, 0.908144, 0.767200, 0.0]), atol=1e-5, rtol=0)
    # Not a multiple of 16 (sizes from GetImageSize): ComfyUI rounds w*h/256 rather than failing.
    assert CORE["Flux2Scheduler"]().get_sigmas(4, 1000, 700)[0].shape == (5,)


def test_reference_images_equal_the_pipeline_with_two_references(engine, nodes) -> None:
    first, second = random_image(96, 80, seed=1), random_image(64, 112, seed=2)
    conditioning = pack_encode(nodes["qwen"], PROMPT)
    reference = PACK["Flux2ReferenceImage"]()
    one = reference.add_reference(conditioning, as_image(first), nodes["vae"])[0]
    two = reference.add_reference(one, as_image(second), nodes["vae"])[0]
    assert [r.pixel_cap for r in one.references] == [SINGLE_REFERENCE_PIXEL_CAP]
    assert [r.pixel_cap for r in two.references] == [MULTI_REFERENCE_PIXEL_CAP] * 2  # re-encoded under the new cap
    assert conditioning.references == ()

    ours = pack_sample(nodes["klein"], two, empty_latent(), seed=6)
    pipeline = Flux2Pipeline(engine["klein"], engine["vae"], engine["qwen"])
    expected = pipeline(PROMPT, width=64, height=64, seed=6, reference_images=[first, second], output_type="latent")
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, pack_sample(nodes["klein"], conditioning, empty_latent(), seed=6))


def test_reference_images_below_the_official_minimum_are_refused_by_node_and_input(nodes) -> None:
    with pytest.raises(Flux2Error, match="Flux2ReferenceImage: image: .*at least|Flux2ReferenceImage: image: .*>= 64"):
        PACK["Flux2ReferenceImage"]().add_reference(pack_encode(nodes["qwen"], PROMPT), torch.rand(1, 48, 96, 3),
                                                    nodes["vae"])


def test_reference_latent_nodes_equal_engine_sample_with_references(engine, nodes) -> None:
    image = as_image(random_image(64, 48, seed=3))
    latent = CORE["VAEEncode"]().encode(nodes["vae"], image)[0]
    positive = CORE["ReferenceLatent"]().append(CORE["CLIPTextEncode"]().encode(nodes["qwen"], PROMPT)[0], latent)[0]
    negative = CORE["ConditioningZeroOut"]().zero_out(positive)[0]
    core, _ = core_graph(nodes["klein"], positive, negative, cfg=1.0, seed=8, steps=4, width=64, height=64)
    pack_conditioning = PACK["Flux2ReferenceLatent"]().add_reference(pack_encode(nodes["qwen"], PROMPT), latent)[0]
    pack = pack_sample(nodes["klein"], pack_conditioning, empty_latent(), seed=8)
    expected = sample(engine["klein"], make_noise(8, (1, 128, 4, 4)), flux2_sigmas(4, 64, 64),
                      engine["qwen"].encode(PROMPT), reference_latents=[latent["samples"]])
    torch.testing.assert_close(core["samples"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pack, expected, rtol=1e-5, atol=1e-5)


def test_img2img_equals_the_pipeline(engine, nodes, host_dirs) -> None:
    picture = random_image(64, 64, seed=4)
    picture.save(host_dirs["input"] / "img2img_source.png")
    image, _ = CORE["LoadImage"]().load_image("img2img_source.png")
    start = PACK["Flux2VAEEncode"]().encode(image, nodes["vae"])[0]
    ours = pack_sample(nodes["klein"], pack_encode(nodes["qwen"], PROMPT), start, seed=12, denoise=0.5)
    pipeline = Flux2Pipeline(engine["klein"], engine["vae"], engine["qwen"])
    expected = pipeline(PROMPT, width=64, height=64, seed=12, image=picture, denoise=0.5, output_type="latent")
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert len(sigmas_for_denoise(flux2_sigmas(4, 64, 64), 0.5)) == 3  # two of the four steps ran


def test_negative_without_the_references_runs_its_own_pass(nodes) -> None:
    """As in ComfyUI, the negative prompt's pass runs with the negative's references (none here), so the result
    differs from the graph whose negative carries the positive's reference (test_model_patches checks the step)."""
    reference = {"samples": torch.randn(1, 128, 2, 2)}
    positive = CORE["ReferenceLatent"]().append(CORE["CLIPTextEncode"]().encode(nodes["qwen"], PROMPT)[0], reference)[0]
    negative = CORE["CLIPTextEncode"]().encode(nodes["qwen"], "")[0]
    negative_with_reference = CORE["ReferenceLatent"]().append(negative, reference)[0]
    own, _ = core_graph(nodes["klein_base"], positive, negative, cfg=4.0, seed=1, steps=1, width=32, height=32)
    shared, _ = core_graph(nodes["klein_base"], positive, negative_with_reference, cfg=4.0, seed=1, steps=1,
                           width=32, height=32)
    assert torch.isfinite(own["samples"]).all() and not torch.allclose(own["samples"], shared["samples"])


def test_flux_kv_cache_sets_the_option_on_a_copy_and_samples_with_the_cache(engine, nodes) -> None:
    patched = CORE["FluxKVCache"]().patch(nodes["klein"])[0]
    assert patched.options == {REFERENCE_KV_CACHE: True} and nodes["klein"].options == {}
    assert patched.diffusion_model is nodes["klein"].diffusion_model
    reference = torch.randn(1, 128, 2, 2)
    text = CORE["CLIPTextEncode"]().encode(nodes["qwen"], PROMPT)[0]
    positive = CORE["ReferenceLatent"]().append(text, {"samples": reference})[0]
    output, _ = core_graph(patched, positive, positive, cfg=1.0, seed=1, steps=2, width=32, height=32)
    expected = sample(engine["klein"], make_noise(1, (1, 128, 2, 2)), flux2_sigmas(2, 32, 32), text[0][0],
                      reference_latents=[reference], reference_kv_cache=True)
    torch.testing.assert_close(output["samples"], expected, rtol=1e-5, atol=1e-5)


def test_lora_loader_equals_sampling_with_the_lora_merged(engine, nodes, host_dirs) -> None:
    loader = CORE["LoraLoaderModelOnly"]()
    assert loader.load_lora_model_only(nodes["klein"], LORA, 0.0)[0] is nodes["klein"]
    patched = loader.load_lora_model_only(nodes["klein"], LORA, 0.7)[0]
    assert nodes["klein"].lora_patches == () and [s for _, s in patched.lora_patches] == [0.7]

    positive = CORE["CLIPTextEncode"]().encode(nodes["qwen"], PROMPT)[0]
    output, _ = core_graph(patched, positive, positive, cfg=1.0, seed=5, steps=2, width=32, height=32)
    noise, sigmas, context = make_noise(5, (1, 128, 2, 2)), flux2_sigmas(2, 32, 32), engine["qwen"].encode(PROMPT)
    with merge_loras(engine["klein"], [(load_lora(host_dirs["lora_dir"] / LORA), 0.7)]):
        merged = sample(engine["klein"], noise, sigmas, context)
    torch.testing.assert_close(output["samples"], merged, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged, sample(engine["klein"], noise, sigmas, context))
    # The shared DiT is untouched after sampling: the unpatched model gives the plain result again.
    plain, _ = core_graph(nodes["klein"], positive, positive, cfg=1.0, seed=5, steps=2, width=32, height=32)
    torch.testing.assert_close(plain["samples"], sample(engine["klein"], noise, sigmas, context))


def test_pack_lora_loader_equals_the_core_lora_loader(nodes) -> None:
    pack_loader, core_loader = PACK["Flux2LoadLoRA"](), CORE["LoraLoaderModelOnly"]()
    assert pack_loader.load(nodes["klein"], LORA, 0.0)[0] is nodes["klein"]
    stacked = pack_loader.load(pack_loader.load(nodes["klein"], LORA, 0.7)[0], LORA, -0.3)[0]
    assert [s for _, s in stacked.lora_patches] == [0.7, -0.3] and nodes["klein"].lora_patches == ()
    positive = CORE["CLIPTextEncode"]().encode(nodes["qwen"], PROMPT)[0]
    ours, _ = core_graph(pack_loader.load(nodes["klein"], LORA, 0.7)[0], positive, positive, cfg=1.0, seed=5,
                         steps=2, width=32, height=32)
    core, _ = core_graph(core_loader.load_lora_model_only(nodes["klein"], LORA, 0.7)[0], positive, positive,
                         cfg=1.0, seed=5, steps=2, width=32, height=32)
    torch.testing.assert_close(ours["samples"], core["samples"], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="Flux2LoadLoRA: lora_name"):
        pack_loader.load(nodes["klein"], "missing.safetensors", 1.0)


def test_sampler_refuses_unknown_sampler_names(nodes) -> None:
    with pytest.raises(ValueError, match="Flux2Sampler: sampler_name: expected one of"):
        PACK["Flux2Sampler"]().sample(nodes["klein"], pack_encode(nodes["qwen"], PROMPT), empty_latent(), 0, 1, 0.0,
                                      0.0, 1.0, "dpmpp_3m_sde")


# --- images -------------------------------------------------------------------------------------------------------

def test_save_image_writes_numbered_pngs_with_prompt_and_workflow(host_dirs) -> None:
    images = torch.rand(2, 32, 48, 3)
    prompt = {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "nodes/test"}}}
    workflow = {"nodes": [], "links": [], "version": 0.4}
    result = CORE["SaveImage"]().save_images(images, "nodes/test", prompt=prompt, extra_pnginfo={"workflow": workflow})
    assert result == {"ui": {"images": [
        {"filename": "test_00001_.png", "subfolder": "nodes", "type": "output"},
        {"filename": "test_00002_.png", "subfolder": "nodes", "type": "output"}]}}
    with Image.open(host_dirs["output"] / "nodes" / "test_00002_.png") as png:
        assert png.size == (48, 32)
        assert json.loads(png.text["prompt"]) == prompt and json.loads(png.text["workflow"]) == workflow
        saved = np.asarray(png.convert("RGB"))
    assert np.array_equal(saved, np.clip(255. * images[1].numpy(), 0, 255).astype(np.uint8))  # as ComfyUI's
    again = CORE["SaveImage"]().save_images(images[:1], "nodes/test")
    assert again["ui"]["images"][0]["filename"] == "test_00003_.png"


def test_preview_image_goes_to_the_temp_folder(host_dirs) -> None:
    [entry] = CORE["PreviewImage"]().save_images(torch.rand(1, 16, 16, 3))["ui"]["images"]
    assert entry["type"] == "temp" and (host_dirs["temp"] / entry["subfolder"] / entry["filename"]).is_file()


def test_load_image_gives_rgb_and_the_inverted_alpha_mask(host_dirs) -> None:
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[:10, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(host_dirs["input"] / "rgba.png")
    assert "rgba.png" in CORE["LoadImage"].INPUT_TYPES()["required"]["image"][0]
    image, mask = CORE["LoadImage"]().load_image("rgba.png")
    assert image.shape == (1, 20, 30, 3) and mask.shape == (1, 20, 30)
    torch.testing.assert_close(image[0, 0, 0], torch.tensor([200 / 255, 0.0, 0.0]))
    assert mask[0, :10].eq(1).all() and mask[0, 10:].eq(0).all()
    assert CORE["LoadImage"].VALIDATE_INPUTS("missing.png") == "Invalid image file: missing.png"
    assert CORE["LoadImage"].IS_CHANGED("rgba.png") == CORE["LoadImage"].IS_CHANGED("rgba.png")


def test_image_scale_to_total_pixels_and_get_image_size() -> None:
    image = torch.rand(1, 50, 100, 3)
    scaled = CORE["ImageScaleToTotalPixels"]().upscale(image, "bilinear", 0.01, 1)[0]
    assert scaled.shape == (1, 72, 145, 3)  # sqrt(0.01 * 2^20 / 5000) = 1.448
    stepped = CORE["ImageScaleToTotalPixels"]().upscale(image, "lanczos", 0.01, 16)[0]
    assert stepped.shape == (1, 80, 144, 3)
    assert CORE["GetImageSize"]().get_size(stepped) == (144, 80, 1)


def test_switch_asks_only_for_the_chosen_input() -> None:
    switch = CORE["ComfySwitchNode"]()
    assert switch.check_lazy_status(False, None, None) == ["on_false"]
    assert switch.check_lazy_status(True, None, None) == ["on_true"]
    assert switch.check_lazy_status(True, None, "b") == []
    assert switch.switch(True, "a", "b") == ("b",) and switch.switch(False, "a", "b") == ("a",)
    assert CORE["ComfySwitchNode"].INPUT_TYPES()["required"]["on_true"][1]["lazy"] is True


COMFY_STAND_IN = {
    # Only what the pack uses inside ComfyUI, recording what it is given.
    "comfy/__init__.py": "",
    "comfy/utils.py": """
updates = []
previews = []
class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
    def update_absolute(self, value, total=None, preview=None):
        updates.append((value, total))
        previews.append(None if preview is None else [preview[0], list(preview[1].size), preview[2]])
""",
    "comfy/cli_args.py": """
import enum, types
class LatentPreviewMethod(enum.Enum):
    NoPreviews = "none"
    Auto = "auto"
args = types.SimpleNamespace(preview_method=LatentPreviewMethod.NoPreviews, preview_size=512)
""",
    "comfy/model_management.py": """
class InterruptProcessingException(Exception):
    pass
interrupt_after = None
checks = 0
def throw_exception_if_processing_interrupted():
    global checks
    checks += 1
    if interrupt_after is not None and checks > interrupt_after:
        raise InterruptProcessingException()
""",
}


def test_inside_comfyui_the_sampler_reports_to_comfys_progress_bar_and_interrupt(tmp_path: Path, host_dirs) -> None:
    """ComfyUI itself is not installable here, so a stand-in `comfy` package records what the pack calls."""
    for relative, source in COMFY_STAND_IN.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(source)
    pack_dir = Path(custom_nodes_flux2.__file__).parent
    script = f"""
import importlib.util, json, sys
sys.path.insert(0, {str(tmp_path)!r})
spec = importlib.util.spec_from_file_location("pack", {str(pack_dir / "__init__.py")!r},
                                              submodule_search_locations=[{str(pack_dir)!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["pack"] = pack
spec.loader.exec_module(pack)
from flux2_host import folders  # stands in for ComfyUI's folder_paths
folders.configure(models={str(host_dirs["models"])!r}, input_dir={str(tmp_path / "in")!r},
                  output_dir={str(tmp_path / "out")!r}, temp_dir={str(tmp_path / "tmp")!r})
folders.install_as_folder_paths()
import comfy.utils, comfy.model_management as mm
nodes = pack.NODE_CLASS_MAPPINGS
model = nodes["Flux2LoadModel"]().load({KLEIN!r}, "default")[0]
positive = nodes["Flux2TextEncode"]().encode(nodes["Flux2LoadTextEncoder"]().load({QWEN!r})[0], "x")[0]
latent = nodes["Flux2EmptyLatent"]().generate(32, 32, 1)[0]
nodes["Flux2Sampler"]().sample(model, positive, latent, 0, 4, 0.0, 0.0, 1.0, "euler")
updates, quiet = list(comfy.utils.updates), list(comfy.utils.previews)
import comfy.cli_args  # a prompt that asks for previews sets ComfyUI's preview method
comfy.cli_args.args.preview_method = comfy.cli_args.LatentPreviewMethod.Auto
nodes["Flux2Sampler"]().sample(model, positive, latent, 0, 1, 0.0, 0.0, 1.0, "euler")
previews = comfy.utils.previews[len(quiet):]
del comfy.utils.updates[len(updates):]
mm.interrupt_after, mm.checks = 2, 0
try:
    nodes["Flux2Sampler"]().sample(model, positive, latent, 0, 4, 0.0, 0.0, 1.0, "euler")
    stopped = None
except Exception as error:
    stopped = type(error).__name__
print(json.dumps({{"updates": updates, "quiet": quiet, "previews": previews, "stopped": stopped,
                  "steps_run": len(comfy.utils.updates) - len(updates)}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["updates"] == [[1, 4], [2, 4], [3, 4], [4, 4]]
    assert report["quiet"] == [None] * 4  # ComfyUI's default: no previews
    assert report["previews"] == [["JPEG", [4, 4], 512]]  # latent 2x2 cells -> the preview's 2x upscale
    assert report["stopped"] == "InterruptProcessingException" and report["steps_run"] == 2
