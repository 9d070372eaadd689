"""The job configuration: one typed section per concern, loaded from a TOML file under configs/
with dotted CLI overrides (`--train.lr 0.001`). See `config_loader` for the rules.

Sections owned by a subsystem are declared next to it (tokenizer, model, sharding) and composed
here, so each subsystem can be built from its own plain config object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tomli_w

from genci_dist.config_loader import (
    ConfigError,
    build_dataclass,
    check_value,
    merge,
    parse_overrides,
    read_toml,
    to_plain,
)
from genci_dist.model.config import ModelConfig
from genci_dist.runtime.sharding_config import ShardingConfig
from genci_dist.tokenizer.config import TokenizerConfig

__all__ = ["ConfigError", "JobConfig", "load_config", "save_config"]

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class DataConfig:
    """Where the prepared dataset is and how it is read."""

    dir: str = "data/ml-100k"
    """Prepared dataset folder (manifest.json, shards, semantic_ids.parquet)."""
    source: Literal["ml-100k", "ml-1m", "synthetic", "tiny", "none"] = "ml-100k"
    """What `prepare_if_missing` builds when `dir` has no manifest ("none": fail instead)."""
    synthetic_scale: float = 0.01
    """Scale factor for source = "synthetic" (1.0 ≈ Amazon-Instrument)."""
    split: Literal["temporal", "random", "leave_one_out"] = "temporal"
    max_history: int = 50
    """Histories used by the model: the most recent max_history items (the prepared data
    may store more; preparing a missing dataset stores this many)."""
    batch_size: int = 1024
    """Global batch size: each of W ranks reads batch_size // W samples a step."""
    eval_batch_size: int = 4096
    num_workers: int = 1
    read_ahead: bool = True
    """The reader (each worker, or the main process with num_workers = 0) reads its next row
    group from Parquet on a second thread while it decodes and builds batches:
    same batches; ML-1M GenCI batches: ~30 % less wall time for about the same CPU (README
    "Data")."""
    pad_history_to: int = 0
    """0 = pad each batch to its longest history (dynamic); L > 0 = always pad to L."""
    bucket_window: int = 0
    """Training length bucketing: sort the samples of every W consecutive batches by history
    length before cutting them into batches (0 = off). Same samples per epoch, less padding."""
    shuffle_block: int = 16
    """Training shuffle: the shuffled order of sequence row groups (each a random set of whole
    users) is cut into blocks of this many groups whose samples are shuffled jointly, so a
    batch mixes the samples of ~shuffle_block times more users; a reader worker holds one
    block decoded (1 = shuffle inside each row group only)."""
    seed: int = 2024

    def __post_init__(self) -> None:
        if not self.dir:
            raise ConfigError("data.dir must name a folder, got ''")
        check_value("data.synthetic_scale", self.synthetic_scale, gt=0)
        check_value("data.max_history", self.max_history, ge=1)
        check_value("data.batch_size", self.batch_size, ge=1)
        check_value("data.eval_batch_size", self.eval_batch_size, ge=1)
        check_value("data.num_workers", self.num_workers, ge=0)
        check_value("data.pad_history_to", self.pad_history_to, ge=0)
        check_value("data.bucket_window", self.bucket_window, ge=0)
        check_value("data.shuffle_block", self.shuffle_block, ge=1)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    max_steps: int = 0
    """Stop after this many steps in total (0 = no limit); for debug runs and benchmarks."""
    lr: float = 0.003
    """Dense Adam learning rate."""
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    patience: int = 2
    """Early stopping: epochs without a better valid AUC before stopping."""
    seed: int = 2024
    deterministic: bool = False
    autocast_bf16: bool = False
    """Forward passes under torch.autocast(bfloat16) (matmuls in bf16, fp32 master weights).
    Off by default: an option, kept only where valid AUC is unchanged within noise."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    keep_freed_memory: bool = True
    """glibc's malloc keeps freed memory for reuse (no mmap per large block, no trimming; see
    data_pipes/memory.py `keep_freed_memory`), in the trainer's process and the reader's
    workers: without it every step page-faults its large activations in afresh. GenCI ML-1M,
    batch 128, bf16, 1 thread: 35K–84K page faults and 0.85–0.98 s per step → ~0–400 and
    0.65–0.67 s. RSS stays at its peak between steps."""
    log_every: int = 50
    eval_every_epoch: bool = True
    """Evaluate the valid split after every epoch (early stopping, best checkpoint); false:
    train only (benchmarks and slices of data too large to validate every time)."""
    progress_bar: bool = True
    tensorboard: bool = True
    run_dir: str = "runs/default"
    """Folder for the resolved config, plan, metrics, TensorBoard events, plots, checkpoints."""

    def __post_init__(self) -> None:
        check_value("train.epochs", self.epochs, ge=1)
        check_value("train.max_steps", self.max_steps, ge=0)
        check_value("train.lr", self.lr, gt=0)
        check_value("train.weight_decay", self.weight_decay, ge=0)
        check_value("train.warmup_steps", self.warmup_steps, ge=0)
        check_value("train.patience", self.patience, ge=1)
        check_value("train.log_every", self.log_every, ge=1)
        if not self.run_dir:
            raise ConfigError("train.run_dir must name a folder, got ''")


@dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True
    every_n_steps: int = 0
    """Also checkpoint every N steps (0 = only at epoch end)."""
    keep_last: int = 2
    keep_best: bool = True
    resume: Literal["auto", "never"] = "auto"
    """auto: resume from run_dir/checkpoints/latest when it exists."""

    def __post_init__(self) -> None:
        check_value("checkpoint.every_n_steps", self.every_n_steps, ge=0)
        check_value("checkpoint.keep_last", self.keep_last, ge=1)


@dataclass(frozen=True)
class EvalConfig:
    splits: tuple[str, ...] = ("test",)
    write_predictions: bool = False
    base_metrics: str = ""
    """Metrics JSON of a base run (e.g. DeepFM) for RelaImpr; empty = none."""

    def __post_init__(self) -> None:
        for i, split in enumerate(self.splits):
            if split not in SPLITS:
                raise ConfigError(f"eval.splits[{i}] must be one of {', '.join(SPLITS)}, "
                                  f"got {split!r}")


@dataclass(frozen=True)
class JobConfig:
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return to_plain(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def replace(self, **sections: object) -> JobConfig:
        return dataclasses.replace(self, **sections)

    def check_world_size(self, world_size: int) -> None:
        """The checks that need the world size (run once the process group exists): every
        rank reads data.batch_size // world_size samples a step."""
        b = self.data.batch_size
        if b < world_size or b % world_size:
            raise ConfigError(f"data.batch_size must be a multiple of the world size "
                              f"{world_size} (each rank reads batch_size // {world_size}), "
                              f"got {b}")
        if self.data.eval_batch_size < world_size:
            raise ConfigError(f"data.eval_batch_size must be >= the world size {world_size}, "
                              f"got {self.data.eval_batch_size}")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> JobConfig:
    """Defaults ← TOML file (with `extends`) ← CLI overrides, all type- and range-checked:
    a `ConfigError` names the file or the flag and the dotted key."""
    data = read_toml(path) if path is not None else {}
    cli = parse_overrides(list(overrides))
    cli_error = None
    try:  # the overrides alone first, so that an error of theirs names the flag, not the file
        build_dataclass(JobConfig, cli)
    except ConfigError as e:
        cli_error = e
    where = str(path) if path is not None else "config"
    # An error of the overrides alone that the merged config does not have came from a
    # cross-field check against a default the file changes (--model.attn_heads 3 where the
    # file sets d_model = 48): not an error.
    try:
        return build_dataclass(JobConfig, merge(data, cli))
    except ConfigError as e:
        if cli_error is not None and str(cli_error) == str(e):
            raise ConfigError(f"command line: --{cli_error}") from None
        if cli_error is not None:  # a cross-field check: the file's values and the flags'
            raise ConfigError(f"{where} with the command line's overrides: {e}") from None
        raise ConfigError(f"{where}: {e}") from None


def save_config(cfg: JobConfig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(cfg.to_toml())
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m genci_dist.config --config F [overrides]`: prints the resolved config (a
    bad one: one line on stderr, exit code 2)."""
    from genci_dist.errors import run_cli

    def show(args: list[str]) -> int:
        path = None
        if args[:1] == ["--config"] and len(args) > 1:
            path, args = args[1], args[2:]
        print(load_config(path, args).to_toml())
        return 0

    return run_cli("genci-config", show, argv)


if __name__ == "__main__":
    raise SystemExit(main())
