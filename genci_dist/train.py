"""Training entry point: `python -m genci_dist.train --config configs/debug.toml [--x.y v ...]`,
under torchrun (`torchrun --standalone --nproc_per_node=2 -m genci_dist.train ...`) or TorchX
(`torchx run dist.ddp -j 1x2 --script genci_dist/train.py -- --config ...`).

A thin main(): parse the config, own the process group, hand everything to `Trainer`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchx --script genci_dist/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
        print("usage: train [--config FILE.toml] [--section.key VALUE ...]")
        raise SystemExit(0)
    config = None
    rest: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--config":
            if i + 1 >= len(args):
                raise SystemExit("--config needs a file")
            config = args[i + 1]
            i += 2
        elif args[i].startswith("--config="):
            config = args[i].split("=", 1)[1]
            i += 1
        else:
            rest.append(args[i])
            i += 1
    return config, rest


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from genci_dist.config import ConfigError, load_config
    from genci_dist.runtime.distributed import DistEnv
    from genci_dist.runtime.trainer import Trainer

    config_path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    env = DistEnv.init(cfg.train.device, require_pg=True, keep_freed=cfg.train.keep_freed_memory)
    try:
        Trainer(cfg, env).fit()
    finally:
        env.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
