"""Speed and memory on one GPU, in one process and one table (issue 7): DiT forward in bf16, fp8 and compiled,
ours vs diffusers; klein-4B end to end vs diffusers' pipeline; block streaming at fixed VRAM budgets.

    python bench/gpu.py                      # CUDA: klein-4B, klein-9B, dev at 1024x1024, random full-size weights
    python bench/gpu.py --tiny               # the same code on tiny models (CPU unless --device cuda): a smoke run
    python bench/gpu.py --sections dit,e2e   # any of dit, e2e, stream
    python bench/gpu.py --minutes 8          # overall time budget (rows that would start after it are skipped)

Weights are random and built on the device (meta, then filled there), as in bench/dit_forward.py; diffusers
borrows ours (`diffusers_twin`), so both run the same numbers. Times are medians of CUDA-synchronised calls
after warm-up. Each row runs in try/except (its error goes into the table) and under a time budget: a row
times as many calls as fit in its budget, at least one. diffusers is optional: without it its columns say so.

Streaming rows move the model's blocks to pinned CPU memory, keep as many on the GPU as the budget allows
(`memory.streaming.plan_streaming`) and time one DiT step (a forward) against the resident step time. With
--tiny the budgets are fractions of the tiny model's size, so blocks do stream.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other bench scripts, when run as a file
from dit_forward import BenchSize, diffusers_twin, forward_tflop, make_inputs, random_weights  # noqa: E402

from flux2_core.checkpoints.quant import quantize_linear_weights  # noqa: E402
from flux2_core.devices import resolve_device, resolve_dtype  # noqa: E402
from flux2_core.dit import Flux2DiT  # noqa: E402
from flux2_core.memory.fp8_matmul import fp8_matmul_supported, set_fp8_matmul  # noqa: E402
from flux2_core.memory.streaming import GIB, plan_streaming, stream_loaded_blocks  # noqa: E402
from flux2_core.variants import FULL_SIZE_DIT, DiTConfig  # noqa: E402

TINY_TEXT_HIDDEN = 32
FULL_SIZES = {name: BenchSize(FULL_SIZE_DIT[name], (64, 64), 512) for name in ("klein-4b", "klein-9b", "dev")}
TINY_SIZES = {
    name: BenchSize(DiTConfig(hidden_size=64, num_heads=2, depth_double=2, depth_single=4, head_dim=32,
                              axes_dim=(8, 8, 8, 8), context_dim=3 * TINY_TEXT_HIDDEN, guidance_embed=name == "dev"),
                    (8, 8), 64)
    for name in ("klein-4b", "klein-9b", "dev")
}
BUDGETS_GB = (24.0, 12.0, 8.0)
TEXT_ENCODER_BUDGET_GB = 1.5
TINY_BUDGET_FRACTIONS = (0.75, 0.5, 0.25)
# Qwen3-4B, the klein-4B text encoder (FLUX.2 reads hidden states up to layer 27).
QWEN3_4B = {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True}


# ---------------------------------------------------------------------------------------------------------------
# The table


@dataclass
class Row:
    section: str
    model: str
    what: str
    ours: str = "-"
    reference: str = "-"
    ratio: str = "-"
    peak_gib: str = "-"
    note: str = ""


class Bench:
    def __init__(self, device: torch.device, dtype: torch.dtype, minutes: float, tiny: bool):
        self.device, self.dtype, self.tiny = device, dtype, tiny
        self.deadline = time.monotonic() + 60 * minutes
        self.rows: list[Row] = []

    @property
    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, section: str, model: str, what: str, measure: Callable[[Row], None], needs_s: float = 5.0) -> None:
        """Run one row: skipped when the overall budget cannot hold `needs_s` more, errors go into the table."""
        row = Row(section, model, what)
        if self.seconds_left < needs_s:
            row.note = f"skipped: time budget ({self.seconds_left:.0f} s left, row needs ~{needs_s:.0f} s)"
        else:
            try:
                measure(row)
            except Exception as exc:  # noqa: BLE001 - a failing row is reported, the others still run
                row.note = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:140] if str(exc) else ''}"
        self.rows.append(row)
        print(f"[{len(self.rows)}] {section} {model} {what}: {row.ours} ms | {row.reference} | {row.note}",
              file=sys.stderr, flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], object], budget_s: float, warmup: int = 2, iters: int = 10) -> float:
        """Median ms of `fn` over as many of `iters` calls as fit in `budget_s` (after `warmup` calls)."""
        for _ in range(warmup):
            fn()
        times: list[float] = []
        start = time.monotonic()
        while len(times) < iters and (not times or time.monotonic() - start < budget_s):
            self.sync()
            began = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - began) * 1000)
        return statistics.median(times)

    def reset_peak(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> str:
        return f"{torch.cuda.max_memory_allocated(self.device) / GIB:.1f}" if self.device.type == "cuda" else "-"

    def print_table(self) -> None:
        header = Row("section", "model", "what", "ours ms", "reference", "ours/ref", "peak GiB", "note")
        columns = list(vars(header))
        cells = [[str(getattr(r, c)) for c in columns] for r in [header, *self.rows]]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
        for n, row in enumerate(cells):
            print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
            if n == 0:
                print(" | ".join("-" * width for width in widths))


def ratio(ours: float, reference: float) -> str:
    return f"{ours / reference:.3f}"


def relative_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).norm() / reference.float().norm()).item()


# ---------------------------------------------------------------------------------------------------------------
# Models with random weights, built on the device


def build_dit(config: DiTConfig, bench: Bench) -> Flux2DiT:
    model = Flux2DiT(config, device="meta", dtype=bench.dtype).to_empty(device=bench.device).eval()
    random_weights(model, seed=0)
    return model.requires_grad_(False)


def dit_call(model: Flux2DiT, size: BenchSize, bench: Bench) -> Callable[[], torch.Tensor]:
    img, img_ids, txt, txt_ids, timesteps, guidance = make_inputs(size, bench.device, bench.dtype)
    return torch.inference_mode()(lambda: model(img, img_ids[None], txt, txt_ids[None], timesteps, guidance))


def diffusers_call(model: Flux2DiT, size: BenchSize, bench: Bench) -> Callable[[], torch.Tensor]:
    twin = diffusers_twin(model)
    img, img_ids, txt, txt_ids, timesteps, guidance = make_inputs(size, bench.device, bench.dtype)
    return torch.inference_mode()(lambda: twin(hidden_states=img, encoder_hidden_states=txt, timestep=timesteps,
                                               img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                                               return_dict=False)[0])


def block_sizes(model: Flux2DiT) -> tuple[list[int], int]:
    """(bytes of each block in run order, bytes of everything else)."""
    sizes = [sum(t.nbytes for t in (*block.parameters(), *block.buffers())) for _, block in model.named_blocks()]
    total = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    return sizes, total - sum(sizes)


# ---------------------------------------------------------------------------------------------------------------
# DiT forward: bf16 vs diffusers, compiled, fp8 (dequantized and scaled matmuls), streaming


def dit_section(name: str, size: BenchSize, bench: Bench, sections: set[str], compile_here: bool) -> None:
    model = build_dit(size.config, bench)
    call = dit_call(model, size, bench)
    row_s = 20.0 if name == "dev" else 10.0
    tokens = size.image_grid[0] * size.image_grid[1] + size.text_tokens
    times: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    dtype_name = str(bench.dtype).removeprefix("torch.")

    def bf16(row: Row) -> None:
        bench.reset_peak()
        times["bf16"] = bench.time_ms(call, row_s)
        outputs["bf16"] = call()
        row.ours, row.peak_gib = f"{times['bf16']:.1f}", bench.peak()
        row.note = f"{forward_tflop(size.config, tokens) / (times['bf16'] / 1000):.3g} TFLOP/s"
        try:
            theirs = diffusers_call(model, size, bench)
        except ImportError:
            row.reference = "no diffusers"
            return
        theirs_ms = bench.time_ms(theirs, row_s)
        row.reference, row.ratio = f"diffusers {theirs_ms:.1f}", ratio(times["bf16"], theirs_ms)
        del theirs

    bench.row("dit", name, f"forward {dtype_name}", bf16, needs_s=row_s * 2 + 10)

    def compiled(row: Row) -> None:
        model.compile_blocks()
        try:
            began = time.monotonic()
            call()
            bench.sync()
            compile_s = time.monotonic() - began
            ms = bench.time_ms(call, row_s)
        finally:
            model.uncompile_blocks()
        row.ours, row.note = f"{ms:.1f}", f"first call (compile) {compile_s:.0f} s"
        if "bf16" in times:
            row.reference, row.ratio = f"eager {times['bf16']:.1f}", ratio(ms, times["bf16"])

    if compile_here:
        bench.row("dit", name, "forward compiled (regional)", compiled, needs_s=120.0)
    else:
        bench.rows.append(Row("dit", name, "forward compiled (regional)",
                              note="skipped (--no-compile, or not the first model without --compile-all)"))

    if "stream" in sections and name == "klein-4b":
        stream_rows(name, dtype_name, model, call, times.get("bf16"), bench)

    quantize_linear_weights(model, "fp8_e4m3fn")
    gc.collect()
    for label, scaled in (("fp8 weights, dequantized", False), ("fp8 weights, scaled fp8 matmul", True)):
        def fp8(row: Row, scaled: bool = scaled, label: str = label) -> None:
            set_fp8_matmul(model, scaled)
            bench.reset_peak()
            times[label] = bench.time_ms(call, row_s)
            row.ours, row.peak_gib = f"{times[label]:.1f}", bench.peak()
            if "bf16" in times:
                row.reference, row.ratio = f"{dtype_name} {times['bf16']:.1f}", ratio(times[label], times["bf16"])
                row.note = f"rel L2 vs {dtype_name} {relative_l2(call(), outputs['bf16']):.1e}"
            if scaled and not fp8_matmul_supported(bench.device):
                row.note += "; no fp8 tensor cores here: dequantize fallback"

        bench.row("dit", name, f"forward {label}", fp8, needs_s=row_s + 5)

    if "stream" in sections and name == "dev":
        fp8_ms = times.get("fp8 weights, scaled fp8 matmul") if fp8_matmul_supported(bench.device) else None
        stream_rows(name, "fp8", model, call, fp8_ms or times.get("fp8 weights, dequantized"), bench)
    del model, call
    gc.collect()


def stream_rows(name: str, storage: str, model: Flux2DiT, call: Callable[[], torch.Tensor],
                resident_ms: float | None, bench: Bench) -> None:
    sizes, other = block_sizes(model)
    total_gib = (sum(sizes) + other) / GIB
    budgets = ([total_gib * f for f in TINY_BUDGET_FRACTIONS] if bench.tiny else list(BUDGETS_GB))
    for budget in budgets:
        label = f"{budget / total_gib:.2f}x the weights" if bench.tiny else f"{budget:g} GB"
        def streamed(row: Row, budget: float = budget) -> None:
            plan = plan_streaming(sizes, other, bench.device, "cpu", budget)
            streamer = stream_loaded_blocks([b for _, b in model.named_blocks()], bench.device, plan,
                                            methods=("reference_forward",))
            try:
                bench.reset_peak()
                ms = bench.time_ms(call, 15.0, warmup=1, iters=5)
                row.ours, row.peak_gib = f"{ms:.1f}", bench.peak()
            finally:
                streamer.detach()
            if resident_ms:
                row.reference, row.ratio = f"resident {resident_ms:.1f}", ratio(ms, resident_ms)
            row.note = (f"{len(sizes) - plan.resident_blocks}/{len(sizes)} blocks streamed from CPU memory "
                        f"(pinned with CUDA); weights {total_gib:.2f} GiB")

        bench.row("stream", name, f"step, {storage}, budget {label}", streamed, needs_s=25.0)


# ---------------------------------------------------------------------------------------------------------------
# klein-4B end to end: text encoder, 4 steps, VAE decode; ours vs diffusers' Flux2KleinPipeline


def build_text_encoder(bench: Bench, tokenizer_dir: Path):
    """A random Qwen3 causal LM (full Qwen3-4B size, or tiny) on the device, and our encoder over its decoder."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from flux2_core.demo_tokenizers import tiny_text_model, write_qwen3_tokenizer
    from flux2_core.text_encoder_files import FAMILY_DEFAULTS
    from flux2_core.text_encoders import Flux2TextEncoder

    write_qwen3_tokenizer(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if bench.tiny:
        causal = tiny_text_model("qwen3", seed=0, hidden=TINY_TEXT_HIDDEN).to(bench.device, bench.dtype)
    else:
        with torch.device("meta"):
            causal = Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B, **FAMILY_DEFAULTS["qwen3"])).to(bench.dtype)
        causal = causal.to_empty(device=bench.device)
        random_weights(causal, seed=1)
        causal.lm_head.weight = causal.model.embed_tokens.weight
        # The rotary table is a computed buffer, which to_empty left uninitialised.
        causal.model.rotary_emb = type(causal.model.rotary_emb)(config=causal.config).to(bench.device)
    causal.eval().requires_grad_(False)
    # Our encoder truncates the shared decoder after layer 27, which is also all diffusers reads.
    return Flux2TextEncoder("qwen3", causal.model, tokenizer, device=bench.device), causal, tokenizer


def build_vae(bench: Bench):
    from flux2_core.demo_models import DEMO_VAE
    from flux2_core.vae import Flux2VAE, VAEConfig

    vae = Flux2VAE(DEMO_VAE if bench.tiny else VAEConfig(), device="meta", dtype=bench.dtype)
    vae = vae.to_empty(device=bench.device).eval().requires_grad_(False)
    random_weights(vae, seed=2)
    with torch.no_grad():
        for buffer_name, buffer in vae.named_buffers():
            buffer.fill_(1 if buffer_name.endswith("running_var") else 0)
    return vae


def e2e_section(size: BenchSize, bench: Bench) -> None:
    from flux2_core.comfy_layouts import decode_latent
    from flux2_core.pipeline import Flux2Pipeline

    width, height = size.image_grid[1] * 16, size.image_grid[0] * 16
    dit = build_dit(size.config, bench)
    with tempfile.TemporaryDirectory() as folder:
        encoder, causal, tokenizer = build_text_encoder(bench, Path(folder))
    vae = build_vae(bench)
    pipe = Flux2Pipeline(dit, vae, encoder, variant="klein-4b")
    counter = iter(range(10**6))
    new_prompt = lambda: f"a watercolor of lighthouse number {next(counter)} at dusk"  # noqa: E731
    same_prompt = "a watercolor of a lighthouse at dusk"
    generate = lambda prompt, **kw: pipe(prompt, width=width, height=height, seed=0, **kw)  # noqa: E731
    times: dict[str, float] = {}

    def fresh(row: Row) -> None:
        bench.reset_peak()
        times["new"] = bench.time_ms(lambda: generate(new_prompt()), 30.0, warmup=1, iters=3)
        row.ours, row.peak_gib = f"{times['new']:.0f}", bench.peak()
        loaded = sum(t.nbytes for m in (dit, vae, causal) for t in (*m.parameters(), *m.buffers())) / GIB
        row.note = f"4 steps {width}x{height}; models {loaded:.1f} GiB"

    bench.row("e2e", "klein-4b", "new prompt every call", fresh, needs_s=40.0)
    bench.row("e2e", "klein-4b", "same prompt (embeddings reused)",
              lambda row: setattr(row, "ours", f"{bench.time_ms(lambda: generate(same_prompt), 20.0):.0f}"))
    encode_new = lambda: pipe.encode_prompts([new_prompt()])  # noqa: E731
    bench.row("e2e", "klein-4b", "  text encoder (new prompt)",
              lambda row: setattr(row, "ours", f"{bench.time_ms(encode_new, 15.0):.0f}"))
    latent = {}

    def denoise(row: Row) -> None:
        ms = bench.time_ms(lambda: latent.update(x=generate(same_prompt, output_type="latent")), 15.0)
        row.ours = f"{ms:.0f}"

    bench.row("e2e", "klein-4b", "  4 denoising steps", denoise)
    bench.row("e2e", "klein-4b", "  VAE decode",
              lambda row: setattr(row, "ours", f"{bench.time_ms(lambda: decode_latent(vae, latent['x']), 10.0):.0f}"))

    def diffusers_pipeline(row: Row) -> None:
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

        from flux2_core.checkpoints.vae_keys import bfl_vae_to_diffusers

        config = vae.config
        with torch.device("meta"):
            twin_vae = AutoencoderKLFlux2(block_out_channels=config.encoder_channels,
                                          decoder_block_out_channels=config.decoder_channels,
                                          layers_per_block=config.encoder_blocks_per_level,
                                          latent_channels=config.z_channels)
        twin_vae.load_state_dict(bfl_vae_to_diffusers(vae.state_dict()), strict=True, assign=True)
        theirs = Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential"),
            vae=twin_vae.eval(), text_encoder=causal, tokenizer=tokenizer, transformer=diffusers_twin(dit),
            is_distilled=True)
        theirs.set_progress_bar_config(disable=True)
        generator = torch.Generator(bench.device)
        run = lambda: theirs(prompt=new_prompt(), height=height, width=width, num_inference_steps=4,  # noqa: E731
                             guidance_scale=1.0, generator=generator.manual_seed(0))
        ms = bench.time_ms(run, 30.0, warmup=1, iters=3)
        row.ours, row.reference = f"{times.get('new', math.nan):.0f}", f"diffusers {ms:.0f}"
        if "new" in times:
            row.ratio = ratio(times["new"], ms)

    bench.row("e2e", "klein-4b", "new prompt every call vs diffusers", diffusers_pipeline, needs_s=40.0)
    bench.row("e2e", "klein-4b", "memory estimate vs measured", lambda row: estimate_rows(pipe, latent, new_prompt,
                                                                                           bench, row))

    def low_vram(row: Row) -> None:
        """The low-VRAM set-up: fp8 DiT (scaled matmuls where the GPU has them) and a text encoder whose decoder
        layers stream from pinned CPU memory within `TEXT_ENCODER_BUDGET_GB`."""
        from flux2_core.memory.streaming import stream_in_memory

        quantize_linear_weights(dit, "fp8_e4m3fn")
        set_fp8_matmul(dit, fp8_matmul_supported(bench.device))
        budget = 0.0 if bench.tiny else TEXT_ENCODER_BUDGET_GB  # tiny: every layer streams
        streamer = stream_in_memory(encoder.model, int(budget * GIB))
        low = Flux2Pipeline(dit, vae, encoder, variant="klein-4b")
        bench.reset_peak()
        ms = bench.time_ms(lambda: low(new_prompt(), width=width, height=height, seed=0), 30.0, warmup=1, iters=3)
        row.ours, row.peak_gib = f"{ms:.0f}", bench.peak()
        streamed = len(streamer.blocks) if streamer is not None else 0
        row.note = (f"fp8 DiT + text encoder streamed ({streamed}/{len(encoder.model.layers)} layers, budget "
                    f"{budget:g} GiB)")
        if "new" in times:
            row.reference, row.ratio = f"resident bf16 {times['new']:.0f}", ratio(ms, times["new"])

    bench.row("e2e", "klein-4b", "low VRAM, new prompt every call", low_vram, needs_s=40.0)
    del pipe, dit, vae, encoder, causal
    gc.collect()


def estimate_rows(pipe, latent: dict, new_prompt: Callable[[], str], bench: Bench, row: Row) -> None:
    """Working memory of each phase, predicted by `memory.estimate` and measured (peak allocated minus what was
    allocated before the phase)."""
    from flux2_core.comfy_layouts import decode_latent
    from flux2_core.memory.estimate import GB, MemoryRequest, dit_shape, estimate, text_encoder_shape, vae_shape

    if bench.device.type != "cuda":
        row.note = "CUDA only (peak allocated memory)"
        return
    size = latent["x"].shape
    request = MemoryRequest(size[-1] * 16, size[-2] * 16, size[0])
    plan = estimate(request, dit_shape(pipe.dit), text_encoder_shape(pipe.text_encoder), vae_shape(pipe.vae),
                    bench.dtype)
    phases = {"text encode": lambda: pipe.encode_prompts([new_prompt()]),
              "denoise": lambda: pipe(pipe._last_prompts[0][0], width=request.width, height=request.height, seed=0,
                                      output_type="latent"),
              "VAE decode": lambda: decode_latent(pipe.vae, latent["x"])}
    cells = []
    for name, run in phases.items():
        bench.reset_peak()
        before = torch.cuda.memory_allocated(bench.device)
        run()
        bench.sync()
        measured = torch.cuda.max_memory_allocated(bench.device) - before
        predicted = plan.phase(name).working_bytes
        cells.append(f"{name} {predicted / GB:.2f}/{measured / GB:.2f} GB")
    row.note = "working memory predicted/measured: " + "; ".join(cells)


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny models (default on a machine without CUDA)")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--dtype", default=None, help="bf16 (CUDA default), fp16 or fp32 (CPU default)")
    parser.add_argument("--models", default="klein-4b,dev,klein-9b", help="DiT forward rows for these models")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    parser.add_argument("--compile-all", action="store_true",
                        help="a compiled row for every model (default: the first model only)")
    parser.add_argument("--sections", default="dit,e2e,stream", help="any of dit, e2e, stream")
    parser.add_argument("--minutes", type=float, default=7.5, help="overall time budget")
    args = parser.parse_args()

    device = resolve_device(args.device)
    tiny = args.tiny or device.type != "cuda"
    bench = Bench(device, resolve_dtype(args.dtype, device), args.minutes, tiny)
    sizes = TINY_SIZES if tiny else FULL_SIZES
    sections = set(args.sections.split(","))
    models = [name for name in args.models.split(",") if name]
    unknown = [name for name in models if name not in sizes] + sorted(sections - {"dit", "e2e", "stream"})
    if unknown:
        parser.error(f"unknown model or section {unknown}; models: {sorted(sizes)}, sections: dit, e2e, stream")
    if device.type == "cpu":
        # Tiny models on a shared CPU: a second spinning intra-op thread only adds waiting (see tests/conftest.py).
        torch.set_num_threads(1)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"dtype {bench.dtype}, {'tiny' if tiny else 'full-size'} models, torch {torch.__version__}", flush=True)

    if "e2e" in sections:
        e2e_section(sizes["klein-4b"], bench)
    for index, name in enumerate(models):
        if "dit" in sections or ("stream" in sections and name in ("klein-4b", "dev")):
            if bench.seconds_left < 30:
                bench.rows.append(Row("dit", name, "all rows", note="skipped: time budget spent before building it"))
                continue
            compile_here = not args.no_compile and (index == 0 or args.compile_all)
            dit_section(name, sizes[name], bench, sections, compile_here)
    bench.print_table()


if __name__ == "__main__":
    main()
