"""Training data: every dataset format parses its documented example, buckets, seeded batch order, bad data
reported and skipped, caption variants, timestep samplers and loss weights against their formulas."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from flux2_core.errors import Flux2Error
from flux2_core.train.buckets import assign_bucket, bucket_sizes, epoch_batches, fit_to_bucket
from flux2_core.train.cache import caption_variants, plan_cache
from flux2_core.train.config import TrainConfig, config_to_toml, defaults_for, load_config
from flux2_core.train.datasets import DataReport, read_datasets
from flux2_core.train.timesteps import diffsynth_grid, flux2_shift_mu, loss_weights, sample_sigmas, shift_sigmas
from train_data import shape_image, write_shapes_dataset


def _image(path, size=(64, 48), colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# --------------------------------------------------------------------------------------------------------------
# formats

def test_musubi_toml_with_control_directory_and_general_defaults(tmp_path):
    toml = write_shapes_dataset(tmp_path, count=2, controls=True)
    specs = read_datasets(toml)
    assert len(specs) == 1 and specs[0].resolution == (64, 64) and specs[0].batch_size == 1
    items = sorted(specs[0].items, key=lambda i: i.image.name)
    assert [i.image.name for i in items] == ["blue_square.png", "red_circle.png"]
    assert items[0].caption == "a blue square on a white background"
    assert [c.name for c in items[0].controls] == ["blue_square_0.png"]


def test_musubi_toml_several_datasets_and_jsonl(tmp_path):
    _image(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "x.caption").write_text("first")
    _image(tmp_path / "j" / "y.png")
    _image(tmp_path / "j" / "y_ref0.png")
    _image(tmp_path / "j" / "y_ref1.png")
    (tmp_path / "j" / "list.jsonl").write_text(json.dumps(
        {"image_path": "y.png", "caption": "second", "control_path_0": "y_ref0.png", "control_path_1": "y_ref1.png"})
        + "\nnot json\n")
    (tmp_path / "d.toml").write_text(
        '[general]\nresolution = [96, 64]\ncaption_extension = ".caption"\nbatch_size = 2\n'
        'enable_bucket = false\nbucket_no_upscale = true\n\n'
        '[[datasets]]\nimage_directory = "a"\nnum_repeats = 3\ncache_directory = "c1"\n\n'
        '[[datasets]]\nimage_jsonl_file = "j/list.jsonl"\nresolution = 64\nbatch_size = 1\n')
    report = DataReport()
    first, second = read_datasets(tmp_path / "d.toml", report=report)
    assert (first.resolution, first.batch_size, first.num_repeats, first.enable_bucket, first.bucket_no_upscale) == \
        ((96, 64), 2, 3, False, True)
    assert first.cache_directory == str(tmp_path / "c1") and first.items[0].caption == "first"
    assert second.resolution == (64, 64) and second.batch_size == 1
    assert second.items[0].caption == "second"
    assert [c.name for c in second.items[0].controls] == ["y_ref0.png", "y_ref1.png"]
    assert len(report.skipped) == 1 and "not JSON" in report.skipped[0][1]


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_diffsynth_metadata(tmp_path, suffix):
    _image(tmp_path / "img" / "a.png")
    _image(tmp_path / "img" / "b.png")
    _image(tmp_path / "img" / "e1.png")
    _image(tmp_path / "img" / "e2.png")
    records = [{"image": "img/a.png", "prompt": "plain"},
               {"image": "img/b.png", "prompt": "edited", "edit_image": ["img/e1.png", "img/e2.png"]}]
    path = tmp_path / f"metadata{suffix}"
    if suffix == ".csv":
        path.write_text('image,prompt,edit_image\nimg/a.png,plain,\nimg/b.png,edited,"[""img/e1.png"", ""img/e2.png""]"\n')
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        path.write_text("\n".join(json.dumps(r) for r in records))
    (spec,) = read_datasets(path, resolution=64)
    assert [(i.image.name, i.caption, [c.name for c in i.controls]) for i in spec.items] == \
        [("a.png", "plain", []), ("b.png", "edited", ["e1.png", "e2.png"])]


def test_image_folder_and_bad_data_reported_not_fatal(tmp_path):
    _image(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("good")
    _image(tmp_path / "nocaption.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "broken.txt").write_text("broken")
    _image(tmp_path / "tiny.png", size=(8, 40))
    (tmp_path / "tiny.txt").write_text("tiny")
    report = DataReport()
    specs = read_datasets(tmp_path, resolution=64, report=report)
    assert sorted(i.image.name for i in specs[0].items) == ["broken.png", "good.png", "tiny.png"]
    planned = plan_cache(specs, tmp_path / "cache", "vae", "te", report)
    assert [p.item.image.name for p in planned] == ["good.png"]
    reasons = dict((path.rsplit("/", 1)[-1], why) for path, why in report.skipped)
    assert set(reasons) == {"nocaption.png", "broken.png", "tiny.png"}
    assert "caption" in reasons["nocaption.png"] and "smallest bucket" in reasons["tiny.png"]


def test_no_usable_image_is_a_clear_error(tmp_path):
    (tmp_path / "only.txt").write_text("x")
    with pytest.raises(Flux2Error, match="no usable training images"):
        read_datasets(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# buckets and order

def test_bucket_sizes_are_multiples_of_16_within_the_area():
    for resolution in ((1024, 1024), (512, 768), (64, 64)):
        sizes = bucket_sizes(*resolution)
        area = resolution[0] * resolution[1]
        assert sizes and all(w % 16 == 0 and h % 16 == 0 and w * h <= area for w, h in sizes)
        assert all(max(w / h, h / w) <= 4 for w, h in sizes)
        assert (1024, 1024) in bucket_sizes(1024, 1024)
        # Area-preserving: every bucket keeps most of the area.
        assert min(w * h for w, h in sizes) >= 0.75 * area


def test_bucket_assignment_aspect_no_upscale_and_crop():
    w, h = assign_bucket((2000, 1000), (1024, 1024))
    assert abs(math.log(w / h) - math.log(2)) < 0.05 and w * h <= 1024 * 1024
    assert assign_bucket((500, 300), (1024, 1024), no_upscale=True) == (496, 288)
    assert assign_bucket((500, 300), (1024, 1024), enable_bucket=False) == (1024, 1024)
    image = fit_to_bucket(shape_image((1, 2, 3), "circle", (100, 60)), (64, 48))
    assert image.size == (64, 48)


def test_epoch_batches_group_equal_shapes_and_are_seeded():
    keys = ["a", "b", "a", "a", "b", "c"]
    sizes = [2] * len(keys)
    batches = epoch_batches(keys, sizes, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len({keys[i] for i in batch}) == 1 for batch in batches)
    assert batches == epoch_batches(keys, sizes, seed=1, epoch=0)
    orders = {str(epoch_batches(keys, sizes, seed=1, epoch=e)) for e in range(6)}
    assert len(orders) > 1


def test_shuffled_caption_variants_keep_leading_parts():
    variants = caption_variants("style, a, b, c, d", True, ",", 1, 8, seed=3)
    assert len(variants) == 8 and all(v.startswith("style, ") for v in variants)
    assert all(sorted(v.split(", ")) == sorted("style, a, b, c, d".split(", ")) for v in variants)
    assert len(set(variants)) > 1
    assert caption_variants("x, y", False, ",", 0, 8, 0) == ["x, y"]


# --------------------------------------------------------------------------------------------------------------
# timesteps: each sampler against its formula

N = 200_000


def _draw(mode, **kw):
    return sample_sigmas(mode, N, torch.Generator().manual_seed(0), **kw)


def _normal_quantiles(qs):
    return torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(qs, dtype=torch.float64))


QS = [0.05, 0.25, 0.5, 0.75, 0.95]


def _assert_quantiles(samples, expected, tol=0.01):
    got = torch.quantile(samples.double(), torch.tensor(QS, dtype=torch.float64))
    assert torch.allclose(got, expected, atol=tol), (got, expected)


def test_uniform_moments():
    s, w = _draw("uniform")
    assert w is None and abs(float(s.mean()) - 0.5) < 0.005 and abs(float(s.var()) - 1 / 12) < 0.002


def test_sigmoid_logit_normal_shift_and_flux2_shift_quantiles():
    z = _normal_quantiles(QS)
    _assert_quantiles(_draw("sigmoid", sigmoid_scale=1.5)[0], torch.sigmoid(1.5 * z))
    _assert_quantiles(_draw("logit_normal", logit_mean=0.3, logit_std=0.8)[0], torch.sigmoid(0.3 + 0.8 * z))
    _assert_quantiles(_draw("shift", shift=3.0)[0], shift_sigmas(torch.sigmoid(z), 3.0))
    # musubi's table: the shift is 3.16 at 1024^2 (4096 cells), 1.88 at 512^2 (1024 cells).
    assert math.exp(flux2_shift_mu(4096)) == pytest.approx(3.158, abs=0.01)
    assert math.exp(flux2_shift_mu(1024)) == pytest.approx(1.878, abs=0.01)
    _assert_quantiles(_draw("flux2_shift", latent_cells=1024)[0],
                      shift_sigmas(torch.sigmoid(z), math.exp(flux2_shift_mu(1024))))


def test_diffsynth_fixed_mu_grid_and_weighting():
    sigmas, weights = diffsynth_grid()
    assert len(sigmas) == 1000 and float(weights.mean()) == pytest.approx(1.0, abs=1e-5)
    t = torch.linspace(1.0, 0.001, 1000, dtype=torch.float64)
    assert torch.allclose(sigmas.double(), math.exp(0.8) * t / (1 + (math.exp(0.8) - 1) * t), atol=1e-6)
    # The bell peaks at sigma 0.5 and is 0 at the grid point farthest from it.
    assert abs(float(sigmas[weights.argmax()]) - 0.5) < 0.01 and float(weights.min()) == 0.0
    s, w = _draw("diffsynth")
    index = torch.searchsorted(-sigmas, -s)  # sigmas descend
    assert torch.equal(sigmas[index], s) and torch.equal(weights[index], w)
    counts = torch.bincount(index, minlength=1000).double()
    assert float(counts.std() / counts.mean()) < 0.1  # uniform over the grid


def test_loss_weights_formulas():
    s = torch.tensor([0.1, 0.5, 0.9])
    assert loss_weights("none", s) is None
    assert torch.allclose(loss_weights("sigma_sqrt", s), s ** -2)
    assert torch.allclose(loss_weights("cosmap", s), 2 / (math.pi * (1 - 2 * s + 2 * s * s)))


# --------------------------------------------------------------------------------------------------------------
# config

def test_config_toml_round_trip_and_per_variant_defaults(tmp_path):
    dev = defaults_for("dev")
    assert dev.fp8_base and dev.gradient_checkpointing and dev.variant == "flux2-dev"
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(dev))
    assert load_config(path).as_dict() == dev.as_dict()
    path.write_text('[network]\nnetwork_dim = 8\nuse_rslora = true\n[optimizer]\nlearning_rate = "2e-4"\n')
    config = load_config(path)
    assert (config.network_dim, config.use_rslora, config.learning_rate) == (8, True, 2e-4)
    with pytest.raises(Flux2Error, match="network_type"):
        TrainConfig(dit="a", vae="b", text_encoder="c", dataset_config="d", network_type="dora").validate()


def test_example_configs_parse_and_name_existing_variants():
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples" / "train"
    configs = sorted(p for p in examples.glob("*.toml") if not p.name.startswith("dataset"))
    assert len(configs) == 4
    for path in configs:
        config = load_config(path).validate()
        assert not config.extra, (path, config.extra)
    assert load_config(examples / "dev-lora-fp8-blockswap.toml").fp8_base


def test_command_line_overrides_the_config_file_and_print_config_round_trips(tmp_path, capsys):
    from flux2_core.train.cli import config_from_args
    from flux2_host.cli import build_parser, main

    assert main(["train", "--print-config", "klein-base-9b"]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "train.toml"
    path.write_text(printed.replace('dit = ""', 'dit = "d.safetensors"').replace('vae = ""', 'vae = "v"')
                    .replace('text_encoder = ""', 'text_encoder = "t"').replace('dataset_config = ""', 'dataset_config = "x"'))
    args = build_parser().parse_args(["train", str(path), "--network_dim", "8", "--fp8-base", "--use_rslora", "false",
                                      "--learning_rate", "3e-5", "--timestep_sampling", "logit_normal"])
    config = config_from_args(args)
    assert (config.model_version, config.dit, config.network_dim, config.fp8_base, config.use_rslora,
            config.learning_rate, config.timestep_sampling, config.gradient_checkpointing) == \
        ("klein-base-9b", "d.safetensors", 8, True, False, 3e-5, "logit_normal", True)
    with pytest.raises(Flux2Error, match="network_dim: expected a value of type int"):
        config_from_args(build_parser().parse_args(["train", str(path), "--network_dim", "big"]))
    # musubi's spelling of LoRA+; the dedicated option wins when both are given
    assert config_from_args(build_parser().parse_args(
        ["train", str(path), "--network_args", "loraplus_lr_ratio=16"])).loraplus_lr_ratio == 16.0
    assert config_from_args(build_parser().parse_args(
        ["train", str(path), "--network_args", "loraplus_lr_ratio=16", "--loraplus_lr_ratio", "4"])).loraplus_lr_ratio == 4.0
    with pytest.raises(Flux2Error, match=r"--network_args 'dropout=0.1': expected KEY=VALUE with KEY one of"):
        config_from_args(build_parser().parse_args(["train", str(path), "--network_args", "dropout=0.1"]))
