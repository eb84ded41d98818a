"""`ehrfm pretrain` and `ehrfm export`.

    ehrfm pretrain --data DIR --model llama --size tiny --out RUN [--strategy fsdp] [--config pretrain.yaml]
                   [--accelerate-config acc.yaml] [--deepspeed-config ds.json] [key=value ...]
    torchrun --nproc_per_node 2 -m ehrfm.cli pretrain ...     (same command, several ranks)
    ehrfm export --run RUN [--step N] --out HFDIR
    ehrfm export --untrained bilstm --size tiny --data DIR --out HFDIR   (fresh weights, never pretrained)

Re-running the same pretrain command with the same --out resumes from the latest complete checkpoint.
Exit code 75 = preempted (SIGTERM/SIGUSR1): a checkpoint was written, requeue the same command.
"""

from __future__ import annotations

import argparse
import re

from ..loop import PREEMPTION_EXIT_CODE
from .config import ARCHITECTURE_NAMES, SIZE_NAMES, STRATEGIES


def add_parser(subparsers) -> None:
    from ..config_flags import add_config_arguments
    from ..outputs import add_overwrite_argument
    from .config import PretrainConfig

    p = subparsers.add_parser(
        "pretrain",
        help="pretrain a backbone (resumes automatically)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="prepared data folder (ehrfm prepare)")
    p.add_argument("--model", choices=ARCHITECTURE_NAMES, default=None)
    p.add_argument("--size", choices=SIZE_NAMES, default=None)
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics, config)")
    p.add_argument("--strategy", choices=STRATEGIES, default=None)
    p.add_argument("--config", default=None, help="YAML of PretrainConfig (ehrfm.pretrain.config)")
    p.add_argument(
        "--accelerate-config",
        default=None,
        help="an `accelerate config` YAML: each field mapped, accepted or refused (accelerate_config.py)",
    )
    p.add_argument("--deepspeed-config", default=None, help="a DeepSpeed JSON, used as-is ('auto' keys filled)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value config overrides, e.g. optim.lr=3e-4 train.max_steps=100; "
        "they win over flags, which win over --config",
    )
    add_config_arguments(p, PretrainConfig)
    p.set_defaults(func=main_pretrain)

    e = subparsers.add_parser(
        "export",
        help="consolidate a checkpoint into a HuggingFace folder",
        description="Export a (sharded) checkpoint of RUN to an HF folder: config.json, "
        "model.safetensors, tokenizer, model card and remote code.",
    )
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run folder of `ehrfm pretrain`")
    source.add_argument(
        "--untrained",
        choices=ARCHITECTURE_NAMES,
        metavar="ARCH",
        help="no run: freshly initialised weights of ARCH (--size, sized to --data's vocabulary), for a model "
        "trained from scratch per task (001's LSTM)",
    )
    e.add_argument("--size", choices=SIZE_NAMES, default="tiny", help="with --untrained: the preset")
    e.add_argument("--data", default=None, help="with --untrained: the prepared data folder")
    e.add_argument("--seed", type=int, default=0, help="with --untrained: initialisation seed")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    e.add_argument("--best", action="store_true", help="export the best-validation checkpoint")
    e.add_argument("--out", required=True, help="output folder")
    add_overwrite_argument(e)
    e.set_defaults(func=main_export)


def load_pretrain_config(path, overrides: list[str]):
    """PretrainConfig as `ehrfm pretrain` resolves it: defaults < the size's recipe (``recipes.py``) < the YAML
    at ``path`` < ``key=value`` overrides."""
    from ..config import load_config
    from .config import PretrainConfig
    from .recipes import recipe_overrides

    cfg = load_config(PretrainConfig, path, overrides)
    recipe = recipe_overrides(cfg.model.size)  # the size is known only once the YAML and overrides are read
    return load_config(PretrainConfig, path, overrides, defaults=recipe) if recipe else cfg


def shorthand_overrides(*flags: tuple[object, str]) -> list[str]:
    """``key=value`` for each (flag value, config key) whose flag was given (not None)."""
    return [f"{key}={value}" for value, key in flags if value is not None]


def build_config(args: argparse.Namespace):
    """PretrainConfig: defaults < the size's recipe < --config YAML < flags < key=value overrides; then the
    accelerate YAML, and --strategy over it."""
    from ..config_flags import config_overrides
    from .accelerate_config import apply_accelerate_config

    shorthand = shorthand_overrides(
        (args.model, "model.architecture"),
        (args.size, "model.size"),
        (args.data, "data.path"),
        (args.out, "out"),
        (args.deepspeed_config, "deepspeed.config_file"),
    )
    # `lambda` is a Python keyword, so the fields are `lam*`; the spelling `dense.lambda=` works too
    overrides = [
        re.sub(r"^dense\.lambda(_sub|_orth)?=", r"dense.lam\1=", item) for item in shorthand + config_overrides(args)
    ]
    cfg = load_pretrain_config(args.config, overrides)
    if args.accelerate_config:
        cfg.accelerate_config = args.accelerate_config
    if cfg.accelerate_config:
        apply_accelerate_config(cfg, cfg.accelerate_config)
    if args.strategy is not None:  # an explicit flag wins over the accelerate file
        cfg.train.strategy = args.strategy
    return cfg


def main_pretrain(args: argparse.Namespace) -> int:
    from .train import run

    code = run(build_config(args))
    if code == PREEMPTION_EXIT_CODE:
        print(f"preempted: checkpoint written; re-run the same command to resume (exit {PREEMPTION_EXIT_CODE})")
    return code


def main_export(args: argparse.Namespace) -> int:
    from .export import export, export_untrained

    if args.untrained:
        if args.data is None:
            raise SystemExit("ehrfm export --untrained needs --data (the prepared folder whose vocabulary it uses)")
        out = export_untrained(args.untrained, args.size, args.data, args.out, seed=args.seed)
        print(f"exported an untrained {args.untrained}-{args.size} to {out}")
        return 0
    out = export(args.run, args.out, step=args.step, best=args.best, overwrite=args.overwrite)
    print(f"exported to {out}")
    return 0
