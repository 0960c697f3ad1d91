"""Data-parallel training (train/distributed.py) on accelerate: `flux2 train --num-processes 2` (accelerate
launch, two gloo processes on the CPU) writes the same adapter as one process with twice the gradient
accumulation, and a state saved with one process count resumes with the other."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from safetensors.torch import load_file
from train_data import write_shapes_dataset

from flux2_core.errors import Flux2Error
from flux2_core.train.config import load_config
from flux2_core.train.dataloader import RunOrder
from flux2_core.train.distributed import DistributedTrainer
from flux2_core.train.full_finetune import FullTrainable, make_trainer


class _Epochs:
    """Stand-in data with 3 batches per epoch whose order depends on the epoch (only `epoch` is used)."""

    def epoch(self, epoch: int) -> list[list[int]]:
        return [[epoch * 10 + i] for i in (2, 0, 1)]


def test_process_r_takes_every_nth_micro_batch_of_the_global_order() -> None:
    order = RunOrder(_Epochs(), start=4, count=6)
    everything = list(order)
    assert [batch[0][0] for batch in everything] == [4, 5, 6, 7, 8, 9]
    assert [batch[0][1] for batch in everything] == [10, 11, 22, 20, 21, 32]  # epoch 1 from position 1 on
    for rank in range(2):
        shard = list(BatchSamplerShard(order, num_processes=2, process_index=rank))
        assert shard == everything[rank::2]


def test_fsdp_and_deepspeed_launches_are_refused_by_name(monkeypatch, tmp_path) -> None:
    from train_configs import demo_train_config

    config = demo_train_config(Path("/nonexistent"), tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(Flux2Error, match="--use_fsdp"):
        DistributedTrainer(config)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(Flux2Error, match="deepspeed"):
        DistributedTrainer(config)


def _master_gradient_on_rank(rank: int, port: int, move_in_backward: bool, out: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    layer = torch.nn.Linear(8, 4).to(torch.bfloat16)
    trainable = FullTrainable(layer, "weight", move_in_backward=move_in_backward)
    model = DistributedDataParallel(layer)
    model(torch.full((2, 8), float(rank + 1), dtype=torch.bfloat16)).float().sum().backward()
    if not move_in_backward:
        trainable.move_gradients()
    torch.save(trainable.masters["weight"].grad, out / f"{rank}.pt")
    # A clean teardown, both processes together: DDP holds the process group, so it goes first, and the barrier
    # keeps rank 0 (the rendezvous store's host) from closing its connections while rank 1 is still using them
    # (one CI run aborted rank 1 at exit: "terminate called without an active exception").
    del model, trainable
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("move_in_backward", [False, True])
def test_bf16_masters_get_the_gradient_ddp_averaged(move_in_backward, tmp_path) -> None:
    """Full fine-tunes of bf16 weights under DDP: the fp32 masters must receive the gradient averaged over the
    processes. d(sum(W x))/dW is 2 (rank 0's inputs) and 4 (rank 1's): both masters must hold 3. Moving the
    gradient in backward (one process's way) hands the master the process's own gradient, before DDP's average."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_master_gradient_on_rank, args=(port, move_in_backward, tmp_path), nprocs=2)
    grads = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    expected = [torch.full((4, 8), 2.0), torch.full((4, 8), 4.0)] if move_in_backward else [torch.full((4, 8), 3.0)] * 2
    for grad, value in zip(grads, expected):
        assert grad.dtype == torch.float32 and torch.equal(grad, value)


_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _toml(demo_models_dir: Path, tmp_path: Path, extra: str = "", learning_rate: float = 1e-2) -> Path:
    dataset = write_shapes_dataset(tmp_path / "data", count=4)
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'dit = "{demo_models_dir / "diffusion_models" / "flux-2-klein-base-4b.safetensors"}"\n'
        f'vae = "{demo_models_dir / "vae" / "flux2-vae.safetensors"}"\n'
        f'text_encoder = "{demo_models_dir / "text_encoders" / "qwen_3_4b.safetensors"}"\n'
        f'model_version = "klein-base-4b"\ndataset_config = "{dataset}"\ndevice = "cpu"\n'
        f'max_train_steps = 3\nnetwork_dim = 4\nnetwork_alpha = 4.0\nlearning_rate = {learning_rate}\nseed = 5\n'
        f'network_dropout = 0.1\ncaption_dropout_rate = 0.3\nlr_scheduler = "linear"\n'
        f'save_every_n_steps = 1\nsave_state = true\noutput_name = "ddp"\n{extra}')
    return toml


def _two_processes_command(toml: Path, output: Path, cache: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "flux2_host.cli", "train", str(toml), "--num-processes", "2",
            f"--output_dir={output}", f"--cache_directory={cache}", *options]


def _two_processes(toml: Path, output: Path, cache: Path, *options: str) -> str:
    """Run the launch; returns its stderr (rank 0's log)."""
    result = subprocess.run(_two_processes_command(toml, output, cache, *options), env=_ENV, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def _one_process(toml: Path, output: Path, cache: Path, resume: str = "", kind: str = "Trainer", **overrides):
    config = load_config(toml)
    config.output_dir, config.cache_directory, config.resume = str(output), str(cache), resume
    config.gradient_accumulation_steps = 2
    for name, value in overrides.items():
        setattr(config, name, value)
    trainer = make_trainer(config, log_stream=open(os.devnull, "w"))  # noqa: SIM115
    assert type(trainer).__name__ == kind  # the plain trainer: one process needs no accelerate
    trainer.run()
    return trainer


def _assert_same_adapter(a: Path, b: Path, keys: str = "") -> None:
    first, second = load_file(str(a)), load_file(str(b))
    assert set(first) == set(second) and first
    first = {k: v for k, v in first.items() if keys in k}
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=1e-5, rtol=1e-4)


def _losses(path: Path) -> list[float]:
    with open(path, newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_double_accumulation_and_resume_across_counts(
        demo_models_dir, tmp_path) -> None:
    toml = _toml(demo_models_dir, tmp_path)
    two, one = tmp_path / "two", tmp_path / "one"
    _two_processes(toml, two, tmp_path / "cache2")
    assert (two / "logs" / "rank-1" / "ddp-loss.csv").is_file()  # rank 1 logs apart; files come from rank 0
    assert not list((two / "logs" / "rank-1").glob("*.safetensors"))
    assert len(list((tmp_path / "cache2" / "latents").iterdir())) == 4  # one cache, built by rank 0

    straight = _one_process(toml, one, tmp_path / "cache1")
    _assert_same_adapter(two / "ddp.safetensors", one / "ddp.safetensors")
    # the logged loss is the mean over the processes: the same numbers as one process
    torch.testing.assert_close(torch.tensor(_losses(two / "logs" / "ddp-loss.csv"), dtype=torch.float64),
                               torch.tensor(straight.losses, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    assert any(float(v.abs().max()) > 0 for k, v in load_file(str(one / "ddp.safetensors")).items() if "lora_B" in k)

    # a 2-process state resumed on 1 process (accumulation 2), and a 1-process state on 2 processes
    _one_process(toml, tmp_path / "two-then-one", tmp_path / "cache1", resume=str(two / "ddp-step00000002-state"))
    _assert_same_adapter(tmp_path / "two-then-one" / "ddp.safetensors", one / "ddp.safetensors")
    _two_processes(toml, tmp_path / "one-then-two", tmp_path / "cache1", f"--resume={one / 'ddp-step00000001-state'}")
    _assert_same_adapter(tmp_path / "one-then-two" / "ddp.safetensors", one / "ddp.safetensors")


@pytest.mark.slow
def test_full_fine_tune_on_two_processes_equals_one_with_double_accumulation(demo_models_dir, tmp_path) -> None:
    """DDP over the DiT's own (fp32 on the CPU) weights: the saved DiT's trained tensor matches."""
    toml = _toml(demo_models_dir, tmp_path, 'training_mode = "full"\nfull_train_params = "single_blocks\\\\.0\\\\."\n'
                                            'save_dtype = "fp32"\n', learning_rate=1e-3)
    _two_processes(toml, tmp_path / "two", tmp_path / "cache")
    _one_process(toml, tmp_path / "one", tmp_path / "cache", kind="FullFineTuner")
    _assert_same_adapter(tmp_path / "two" / "ddp.safetensors", tmp_path / "one" / "ddp.safetensors", "single_blocks.0.")
    before = load_file(str(demo_models_dir / "diffusion_models" / "flux-2-klein-base-4b.safetensors"))
    after = load_file(str(tmp_path / "one" / "ddp.safetensors"))
    assert not torch.equal(before["single_blocks.0.linear2.weight"].float(), after["single_blocks.0.linear2.weight"])


# Full fine-tune of the double block and of the single block's linear1 only (the tiny DiT has one of each): FSDP
# units that train fully, partly (the single block: linear2 and the norms stay frozen) and not at all (the root).
_FSDP_TOML = ('training_mode = "full"\ndistributed_strategy = "fsdp"\nsave_dtype = "fp32"\n'
              'gradient_checkpointing = true\nfull_train_params = "double_blocks|single_blocks\\\\.0\\\\.linear1"\n')


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_stop_signal_stops_both_processes_at_one_step_with_a_state_that_resumes(strategy, demo_models_dir,
                                                                                  tmp_path) -> None:
    """SIGTERM to `flux2 train --num-processes 2` (DDP, LoRA), or Ctrl-C's SIGINT to its whole process group (FSDP
    full fine-tune, whose state every process gathers), reaches both processes; they agree on the step to stop at,
    rank 0 saves the state, and one process resumes it like a run that was never stopped."""
    fsdp = strategy == "fsdp"
    toml = _toml(demo_models_dir, tmp_path, _FSDP_TOML if fsdp else "", learning_rate=1e-3 if fsdp else 1e-2)
    two, options = tmp_path / "two", ("--max_train_steps=500", "--lr_scheduler=constant", "--save_every_n_steps=0")
    launch = subprocess.Popen(_two_processes_command(toml, two, tmp_path / "cache", *options), env=_ENV,
                              stderr=subprocess.PIPE, text=True, start_new_session=fsdp)
    for line in launch.stderr:  # rank 0's log
        if line.startswith("step 2/"):
            break
    if fsdp:
        os.killpg(launch.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    else:
        launch.send_signal(signal.SIGTERM)
    _, rest = launch.communicate(timeout=600)
    assert launch.returncode != 0 and "interrupted: training state saved" in rest, rest[-3000:]
    steps = torch.load(two / "ddp-state" / "state.pt", weights_only=False)["step"]
    assert 2 <= steps < 500

    common = dict(lr_scheduler="constant", save_every_n_steps=0, max_train_steps=steps + 1,
                  kind="FullFineTuner" if fsdp else "Trainer")
    _one_process(toml, tmp_path / "resumed", tmp_path / "cache", resume=str(two / "ddp-state"), **common)
    _one_process(toml, tmp_path / "straight", tmp_path / "cache", **common)
    _assert_same_adapter(tmp_path / "resumed" / "ddp.safetensors", tmp_path / "straight" / "ddp.safetensors")


def test_fsdp_is_refused_where_it_does_not_apply(tmp_path) -> None:
    from train_configs import demo_train_config

    from flux2_core.train.fsdp import FsdpFullFineTuner

    config = demo_train_config(Path("/nonexistent"), tmp_path)
    config.distributed_strategy = "fsdp"
    with pytest.raises(Flux2Error, match="training_mode = \"full\""):
        FsdpFullFineTuner(config)
    config.training_mode = "full"
    config.optimizer_type = "adamw8bit"
    with pytest.raises(Flux2Error, match="only 'adamw'"):
        FsdpFullFineTuner(config)
    config.distributed_strategy = "zero3"
    with pytest.raises(Flux2Error, match="distributed_strategy: expected one of"):
        config.validate()


def _dit_gradients(dit: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The gradient of one bf16-autocast forward of `dit` on seeded inputs, per weight (whole tensors, fp32)."""
    generator = torch.Generator().manual_seed(seed)
    img = torch.randn(1, 16, dit.config.in_channels, generator=generator)
    txt = torch.randn(1, 8, dit.txt_in.in_features, generator=generator)
    ids = torch.zeros(1, 16, 4, dtype=torch.long), torch.zeros(1, 8, 4, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dit(img=img, img_ids=ids[0], txt=txt, txt_ids=ids[1], timesteps=torch.tensor([0.5]))
    out.float().pow(2).mean().backward()
    return {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float()
            for name, p in dit.named_parameters()}


def _bf16_sharded_gradients_on_rank(rank: int, port: int, path: Path, out: Path) -> None:
    import torch.distributed as dist

    from flux2_core.checkpoints.loaders import load_dit
    from flux2_core.train.fsdp import shard_dit
    from flux2_core.train.memory import enable_gradient_checkpointing

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dit = load_dit(path, device="cpu", dtype=torch.bfloat16).requires_grad_(True)
    shard_dit(dit, torch.device("cpu"), torch.bfloat16)
    enable_gradient_checkpointing(dit)
    dtypes = {(type(p).__name__, p.dtype) for p in dit.parameters()}
    gradients = _dit_gradients(dit, seed=rank)  # each rank its own inputs: the reduced gradient is their mean
    if rank == 0:
        torch.save((dtypes, gradients), out / "sharded.pt")
    del dit
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp_bf16_policy_keeps_fp32_shards_and_reduces_the_mean_gradient(demo_models_dir, tmp_path) -> None:
    """What a GPU run with mixed_precision bf16 does, on the CPU under bf16 autocast: a bf16 file becomes fp32
    shards, units are gathered in bf16, and the reduced gradient is the mean of the two ranks' gradients computed
    by an unsharded fp32 DiT (within bf16's rounding)."""
    from flux2_core.checkpoints.loaders import load_dit

    path = demo_models_dir / "diffusion_models" / "flux-2-klein-base-4b.safetensors"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_bf16_sharded_gradients_on_rank, args=(port, path, tmp_path), nprocs=2)
    dtypes, sharded = torch.load(tmp_path / "sharded.pt")
    assert dtypes == {("DTensor", torch.float32)}
    reference = [_dit_gradients(load_dit(path, dtype=torch.float32).requires_grad_(True), seed) for seed in (0, 1)]
    for name, gradient in sharded.items():
        expected = (reference[0][name] + reference[1][name]) / 2
        error = float((gradient - expected).norm() / expected.norm().clamp_min(1e-12))
        assert error < 0.01, (name, error)  # measured <= 0.002; one rank's own gradient is 0.2 - 1.2 away


@pytest.mark.slow
def test_fsdp_full_fine_tune_on_two_processes_equals_one_with_double_accumulation_and_resumes_across_counts(
        demo_models_dir, tmp_path) -> None:
    """FSDP (2 gloo processes, the DiT sharded) writes the DiT one process writes with twice the accumulation; the
    file loads with `load_dit`; its gathered training state resumes on one process, and one process's on FSDP."""
    from flux2_core.checkpoints.loaders import load_dit

    toml = _toml(demo_models_dir, tmp_path, _FSDP_TOML, learning_rate=1e-3)
    two, one = tmp_path / "two", tmp_path / "one"
    log = _two_processes(toml, two, tmp_path / "cache")
    assert "fsdp: 2 blocks + the root sharded over 2 processes" in log
    assert "(per process, sharded over 2)" in log  # the memory plan
    assert "destroy_process_group" not in log  # torch warns at exit about a process group left alive
    straight = _one_process(toml, one, tmp_path / "cache", kind="FullFineTuner")
    _assert_same_adapter(two / "ddp.safetensors", one / "ddp.safetensors")
    torch.testing.assert_close(torch.tensor(_losses(two / "logs" / "ddp-loss.csv"), dtype=torch.float64),
                               torch.tensor(straight.losses, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    before = load_file(str(demo_models_dir / "diffusion_models" / "flux-2-klein-base-4b.safetensors"))
    after = load_file(str(two / "ddp.safetensors"))
    assert set(after) == set(before)
    for key in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"):
        assert not torch.equal(before[key].float(), after[key])  # trained
    for key in ("single_blocks.0.norm.query_norm.scale", "single_blocks.0.linear2.weight", "img_in.weight"):
        assert torch.equal(before[key].float(), after[key])  # frozen
    loaded = dict(load_dit(two / "ddp.safetensors", dtype=torch.float32).named_parameters())
    for key, value in after.items():
        assert torch.equal(loaded[key], value), key

    # the 2-process FSDP state at step 2 on 1 process, and 1 process's state at step 1 on 2 FSDP processes
    _one_process(toml, tmp_path / "two-then-one", tmp_path / "cache", resume=str(two / "ddp-step00000002-state"),
                 kind="FullFineTuner")
    _assert_same_adapter(tmp_path / "two-then-one" / "ddp.safetensors", one / "ddp.safetensors")
    _two_processes(toml, tmp_path / "one-then-two", tmp_path / "cache", f"--resume={one / 'ddp-step00000001-state'}")
    _assert_same_adapter(tmp_path / "one-then-two" / "ddp.safetensors", one / "ddp.safetensors")
