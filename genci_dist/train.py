"""Training entry point: `python -m genci_dist.train --config configs/debug.toml [--x.y v ...]`,
under torchrun (`torchrun --standalone --nproc_per_node=2 -m genci_dist.train ...`) or TorchX
(`torchx run dist.ddp -j 1x2 --script genci_dist/train.py -- --config ...`).

A thin main(): parse the config, own the process group, hand everything to `Trainer`.

A bad config value, dataset or checkpoint stops it with one line on stderr and exit code 2,

    genci-train: error: command line: --train.lr must be > 0, got -0.1

(under torchrun: `genci-train: error: rank 1: ...`, last in the ranks' output and in
torchrun's "Root Cause"); add `--debug` or set GENCI_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchx --script genci_dist/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import genci_dist  # noqa: E402, F401  (its data_pipes import sets the OpenMP wait policy early)


def _strip_self(args: list[str]) -> list[str]:
    """`torchx run dist.ddp -j 2x8 genci_dist/train.py` passes the script path as the first
    script argument (torchx has no positional script; `.torchxconfig` supplies --script)."""
    if args and args[0].endswith("genci_dist/train.py"):
        return args[1:]
    return args


def parse_args(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    args = _strip_self(list(argv))
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        print("usage: train [--config FILE.toml] [--section.key VALUE ...] [--debug]")
        raise SystemExit(0)
    config = None
    rest: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--config":
            if i + 1 >= len(args):
                print("genci-train: error: --config needs a file", file=sys.stderr)
                raise SystemExit(2)
            config = args[i + 1]
            i += 2
        elif args[i].startswith("--config="):
            config = args[i].split("=", 1)[1]
            i += 1
        else:
            rest.append(args[i])
            i += 1
    return config, rest


def _train(args: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from genci_dist.config import ConfigError, load_config

    config_path, overrides = parse_args(args)
    cfg = load_config(config_path, overrides)
    from genci_dist.runtime.distributed import DistEnv
    from genci_dist.runtime.trainer import Trainer

    try:
        env = DistEnv.init(cfg.train.device, require_pg=True,
                           keep_freed=cfg.train.keep_freed_memory)
    except ValueError as e:  # a device this machine does not have
        raise ConfigError(f"train.device: {e}") from e
    try:
        cfg.check_world_size(env.world_size)
        Trainer(cfg, env).fit()
    finally:
        env.destroy()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Errors of the config, the data or a checkpoint end as one line on stderr and exit
    code 2 (`--debug` or GENCI_DEBUG=1: with the traceback; see genci_dist/errors.py)."""
    from genci_dist.errors import run_cli

    return run_cli("genci-train", _train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
