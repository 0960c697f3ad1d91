"""`flux2 train [CONFIG.toml] [--option value ...]`, `flux2 train --print-config VARIANT` and
`flux2 cache latents|text [CONFIG.toml] [--option value ...]`.

Every `TrainConfig` field is a command-line option under its musubi-tuner name (`--network_dim`; the dashed
spelling `--network-dim` works too); booleans are flags that also take a value (`--fp8_base`, `--fp8_base false`).
Command-line values override the config file's.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import Flux2Error, Interrupted
from .config import FIELD_TYPES, MODEL_VERSIONS, TrainConfig, coerce, config_to_toml, defaults_for, load_config

# The network_args keys musubi-tuner (and kohya's scripts) pass to LoRA networks that this trainer has as options.
NETWORK_ARGS = ("loraplus_lr_ratio",)


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="a training TOML (optional: options alone are enough)")
    for name, kind in FIELD_TYPES.items():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        if kind == "bool":
            parser.add_argument(*flags, dest=name, nargs="?", const="true", default=argparse.SUPPRESS)
        else:
            parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS)
    parser.add_argument("--network_args", "--network-args", nargs="+", metavar="KEY=VALUE", default=[],
                        help=f"musubi-tuner's spelling of network options: {', '.join(NETWORK_ARGS)}")


def add_train_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a LoRA / LoKr / LoHa on a FLUX.2 DiT")
    p.add_argument("--print-config", metavar="VARIANT", choices=sorted(MODEL_VERSIONS),
                   help="print every option with the variant's defaults as TOML, then exit")
    p.add_argument("--num-processes", type=int, default=1,  # part 2 hook: train/distributed.py
                   help="data-parallel processes (runs `accelerate launch --multi_gpu`: one per GPU; without GPUs, "
                        "CPU processes joined with gloo)")
    _add_options(p)
    p = sub.add_parser("cache", help="fill the latent or text-embedding cache of a training config")
    p.add_argument("cache_kind", choices=["latents", "text"])
    _add_options(p)


def network_args_options(network_args: list[str]) -> dict[str, str]:
    """musubi's `--network_args loraplus_lr_ratio=16 ...` -> {"loraplus_lr_ratio": "16"}."""
    options = {}
    for item in network_args:
        key, equals, value = item.partition("=")
        if not equals or key.strip() not in NETWORK_ARGS:
            raise Flux2Error(f"--network_args {item!r}: expected KEY=VALUE with KEY one of {list(NETWORK_ARGS)}")
        options[key.strip()] = value.strip()
    return options


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    config = load_config(args.config) if args.config else TrainConfig()
    options = network_args_options(getattr(args, "network_args", []))
    options.update({name: getattr(args, name) for name in FIELD_TYPES if name in vars(args)})
    for name, value in options.items():
        setattr(config, name, coerce(name, value))
    return config.validate()


def train_command(args: argparse.Namespace) -> int:
    if args.print_config:
        print(config_to_toml(defaults_for(args.print_config)), end="")
        return 0
    if args.num_processes > 1:  # part 2 hook: relaunch under accelerate
        from .distributed import launch_command
        return launch_command(args)
    from .full_finetune import make_trainer  # part 2 hook: "full" training_mode picks FullFineTuner

    try:
        trainer = make_trainer(config_from_args(args))
        try:
            path = trainer.run()
        except Interrupted as error:
            print(f"stopped: {error}", file=sys.stderr)
            trainer.close()  # every process stopped at the same step (distributed.py)
            return 130
        trainer.close()
    except (Flux2Error, ValueError) as error:  # the loaders raise ValueError for a model_version / file mismatch
        print(f"error: {error}", file=sys.stderr)
        return 1
    if getattr(trainer, "is_main", True):  # one line for a multi-process launch (distributed.py)
        print(f"wrote {path}")
    return 0


def cache_command(args: argparse.Namespace) -> int:
    from .trainer import Trainer

    try:
        trainer = Trainer(config_from_args(args))
        items = trainer.prepare_caches(latents=args.cache_kind == "latents", text=args.cache_kind == "text")
    except Flux2Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.cache_kind} cache ready for {len(items)} images in {trainer.cache_directory} "
          f"({len(trainer.report.skipped)} skipped)")
    return 0
