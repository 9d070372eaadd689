"""What a run prints: library warnings known to be harmless are silenced here, once, at process
start-up (`DistEnv.init` calls `quiet_known_warnings`); every other warning stays visible.
Progress bars only on a terminal; plain step lines otherwise (logs, TorchX, CI).

The silenced messages, each with why it is harmless, are listed in `data_pipes/quiet.py`
(`quiet_known_warnings`, re-exported here), which the reader's worker processes call too.
"""

from __future__ import annotations

import sys
from typing import Any

from data_pipes.quiet import quiet_known_warnings

__all__ = ["progress_enabled", "quiet_known_warnings", "run_banner"]


def progress_enabled(wanted: bool) -> bool:
    """Progress bars only when asked for and stderr is a terminal: in a log file each update
    of a bar would be a line of its own."""
    return bool(wanted) and sys.stderr.isatty()


def run_banner(cfg: Any, env: Any) -> str:
    """The first line of a run: what is trained, on what, where, and where it writes.

    `cfg` is a JobConfig, `env` a DistEnv (not imported here: the console sits below both)."""
    import torch

    m, d, t = cfg.model, cfg.data, cfg.train
    where = (f"{env.world_size} rank{'s' if env.world_size > 1 else ''} × "
             f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''} "
             f"({env.device.type}{', ' + env.backend if env.backend else ''})")
    length = f"{t.max_steps} steps" if t.max_steps else f"≤ {t.epochs} epochs"
    resume = "" if not cfg.checkpoint.enabled else f", resume {cfg.checkpoint.resume}"
    return (f"[run] {m.name} on {d.dir} (history {d.max_history}, batch {d.batch_size}), "
            f"{length}, {where} → {t.run_dir} (config.toml, plan.txt, metrics.json, "
            f"steps.jsonl, checkpoints/{resume})")
