"""The training loop: epochs over the streaming loader, valid evaluation each epoch, early
stopping on valid AUC, checkpoints, and the test evaluation of the best checkpoint.

Everything distributed is delegated: `distributed` (process group), `sharding` (planner, DMP,
optimizers), `checkpoint` (DCP), `metrics`; the model family comes from `model.build`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data_pipes.schema import feature_specs, load_manifest
from data_pipes.stream import build_loader
from genci_dist.config import JobConfig, save_config
from genci_dist.model.build import batch_fields, build_task, load_generation_assets
from genci_dist.runtime.checkpoint import CheckpointManager
from genci_dist.runtime.console import progress_enabled, run_banner
from genci_dist.runtime.datasets import ensure_dataset
from genci_dist.runtime.distributed import DistEnv
from genci_dist.runtime.evaluation import bf16_autocast, evaluate_loader
from genci_dist.runtime.sharding import (
    build_dmp,
    build_lr_scheduler,
    build_optimizer,
    describe_plan,
    keep_sharding_types,
)
from genci_dist.runtime.steplog import ScalarWriter, StepTimer, format_step_line


def _truncate_steps_log(path: Path, step: int) -> None:
    """Drops steps.jsonl lines after `step` (the resumed checkpoint's): the steps a killed
    process ran past its last checkpoint are run again, and logged once."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def _test_sigkill(rank: int, step: int) -> None:
    """Test-only fault injection, off unless GENCI_TEST_SIGKILL=<rank>:<step>:<marker file>
    is set: that rank SIGKILLs itself after that step, once (the marker file records it)."""
    spec = os.environ.get("GENCI_TEST_SIGKILL")
    if not spec:
        return
    r, s, marker = spec.split(":", 2)
    if (int(r), int(s)) == (rank, step) and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)  # same dense init on every rank (DDP also broadcasts it)


class Trainer:
    def __init__(self, cfg: JobConfig, env: DistEnv) -> None:
        self.cfg = cfg
        self.env = env
        self.run_dir = Path(cfg.train.run_dir)
        self.is_main = env.rank == 0
        if cfg.data.batch_size % env.world_size:
            raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by the "
                             f"world size {env.world_size}")
        self.local_batch = cfg.data.batch_size // env.world_size
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        if self.is_main:
            print(run_banner(cfg, env), flush=True)
        needs_ids = cfg.model.name == "genci"
        self.dataset_dir = ensure_dataset(cfg, env, need_semantic_ids=needs_ids)
        # Seeded after preparing a missing dataset (which draws from the global RNGs), so a
        # run's init does not depend on whether its data had to be built first.
        seed_everything(cfg.train.seed, env.rank)
        self.manifest = load_manifest(self.dataset_dir)
        features = feature_specs(self.manifest)
        assets = load_generation_assets(self.dataset_dir, self.manifest, cfg.model)
        task = build_task(cfg.model, features, assets, device=torch.device("meta"))
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", env,
                                      keep_last=cfg.checkpoint.keep_last,
                                      keep_best=cfg.checkpoint.keep_best)
        resume = cfg.checkpoint.enabled and cfg.checkpoint.resume == "auto"
        sharding = cfg.sharding
        if resume:  # the planner may choose otherwise at another world size (see there)
            sharding, kept = keep_sharding_types(sharding, self.ckpt.latest_sharding_types(),
                                                 task)
            if kept and self.is_main:
                print(f"[resume] sharding types of the checkpoint's plan kept: {kept}",
                      flush=True)
        self.dmp, self.plan = build_dmp(task, env, sharding)
        self.train_loader = self._loader("train", shuffle=True, batch=self.local_batch)
        self.optimizer = build_optimizer(self.dmp, cfg.train.lr, cfg.train.weight_decay)
        total = cfg.train.max_steps or cfg.train.epochs * len(self.train_loader)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.train.warmup_steps, total,
                                            cfg.train.lr_schedule)
        self.semantic_hash = assets.content_hash if assets is not None else ""

        self.step = 0
        self.epoch = 0
        self.best_auc = -1.0
        self.best_epoch = -1
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []
        # Wall time of the epoch in progress: what earlier processes spent on it (restored from
        # the checkpoint a run resumes from) plus this process's part since _epoch_t0. Without
        # the carry, an epoch interrupted and resumed counted only its last process's part.
        self._epoch_carry_s = 0.0
        self._epoch_t0: float | None = None
        # The epoch's loss sums and step count so far, checkpointed too: a resumed epoch's
        # record averages over all its steps, not only the last process's.
        self._epoch_sums: dict[str, float] = {}
        self._epoch_steps = 0
        # Resume (which refuses a checkpoint of another model config) before the run folder's
        # config.toml / plan.txt are rewritten, so a refused resume leaves them as they were.
        if resume:
            self._resume()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.toml")
            (self.run_dir / "plan.txt").write_text(describe_plan(self.plan))
            print(f"[plan]\n{describe_plan(self.plan)}", flush=True)
        tb_dir = self.run_dir / "tensorboard" if (self.is_main and cfg.train.tensorboard) else None
        self.tb = ScalarWriter(tb_dir)

    # ---- pieces -------------------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool, batch: int, **overrides: Any) -> Any:
        """This run's loader of `split`; `overrides` replace build_loader arguments (the
        benchmark's full-width batch: pad_history_to, bucket_window, num_workers)."""
        d = self.cfg.data
        kwargs: dict[str, Any] = dict(
            batch_size=batch, rank=self.env.rank, world_size=self.env.world_size,
            num_workers=d.num_workers, read_ahead=d.read_ahead, seed=d.seed, shuffle=shuffle,
            pad_history_to=d.pad_history_to or None, max_history=d.max_history,
            shuffle_block=d.shuffle_block, keep_freed_memory=self.cfg.train.keep_freed_memory,
            **batch_fields(self.cfg.model), bucket_window=d.bucket_window if shuffle else 0)
        return build_loader(self.dataset_dir, split, **(kwargs | overrides))

    def _autocast(self) -> Any:
        return bf16_autocast(self.env.device, self.cfg.train.autocast_bf16)

    def _train_state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "best_auc": self.best_auc,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "history": self.history, "epoch_elapsed_s": self._epoch_elapsed(),
                "epoch_sums": dict(self._epoch_sums), "epoch_steps": self._epoch_steps}

    def _epoch_elapsed(self) -> float:
        here = 0.0 if self._epoch_t0 is None else time.perf_counter() - self._epoch_t0
        return self._epoch_carry_s + here

    def _save(self, metric: float | None) -> None:
        if not self.cfg.checkpoint.enabled:
            return
        self.ckpt.save(step=self.step, model=self.dmp, optimizer=self.optimizer,
                       scheduler=self.scheduler, loader=self.train_loader,
                       train_state=self._train_state(), config=self.cfg,
                       semantic_hash=self.semantic_hash, metric=metric, plan=self.plan)

    def _resume(self) -> None:
        state = self.ckpt.load_latest(model=self.dmp, optimizer=self.optimizer,
                                      scheduler=self.scheduler, loader=self.train_loader,
                                      config=self.cfg, semantic_hash=self.semantic_hash)
        if state is None:
            return
        for key in ("step", "epoch", "best_auc", "best_epoch", "bad_epochs", "history"):
            setattr(self, key, state[key])
        # checkpoints written before the carry existed have none: their epoch counts from here
        self._epoch_carry_s = float(state.get("epoch_elapsed_s", 0.0))
        self._epoch_sums = dict(state.get("epoch_sums", {}))
        self._epoch_steps = int(state.get("epoch_steps", 0))
        if self.is_main:
            _truncate_steps_log(self.run_dir / "steps.jsonl", self.step)
            print(f"[resume] step {self.step}, epoch {self.epoch}", flush=True)

    # ---- loop ---------------------------------------------------------------------------
    def _train_epoch(self) -> bool:
        """One epoch (or what is left of it after a resume). Returns False at max_steps."""
        cfg = self.cfg
        self.dmp.train()
        timer = StepTimer()
        n_steps = len(self.train_loader) if hasattr(self.train_loader, "__len__") else None
        bar = tqdm(total=n_steps, desc=f"epoch {self.epoch}", leave=False, dynamic_ncols=True,
                   disable=not (self.is_main and progress_enabled(cfg.train.progress_bar)))
        sums = self._epoch_sums  # carried over from a checkpoint mid-epoch, else empty
        # line-buffered: every step's line reaches the file at once, so a killed rank loses
        # none (measured +6 us per line, against steps of milliseconds)
        self._steps_log = ((self.run_dir / "steps.jsonl").open("a", buffering=1)
                           if self.is_main else None)
        it = iter(self.train_loader)
        while True:
            with timer.phase("data"):
                batch = next(it, None)
            if batch is None:
                break
            batch = batch.to(self.env.device)
            with timer.phase("forward"), self._autocast():
                loss, parts, _logits, _labels = self.dmp(batch)
            with timer.phase("backward"):
                self.optimizer.zero_grad()
                loss.backward()
            with timer.phase("optimizer"):
                self.optimizer.step()
                self.scheduler.step()
            self.step += 1
            timer.add_samples(batch.size * self.env.world_size)
            values = {"loss": float(loss.detach())} | {k: float(v) for k, v in parts.items()}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            self._epoch_steps += 1
            bar.update(1)
            if self._steps_log is not None:
                self._steps_log.write(json.dumps({"step": self.step, "epoch": self.epoch,
                                                  **values}) + "\n")
            if self.step % cfg.train.log_every == 0:
                timing = timer.report()
                lr = self.scheduler.get_last_lr()[0]
                if self.is_main:
                    tqdm.write(format_step_line(self.epoch, self.step, values, timing, lr))
                self.tb.add("train", values | {"samples_per_s": timing["samples_per_s"]},
                            self.step)
            every = cfg.checkpoint.every_n_steps
            if every and self.step % every == 0:
                self._save(metric=None)
            _test_sigkill(self.env.rank, self.step)
            if cfg.train.max_steps and self.step >= cfg.train.max_steps:
                bar.close()
                self._close_steps_log()
                self._last_train = {k: v / max(self._epoch_steps, 1) for k, v in sums.items()}
                return False
        bar.close()
        self._close_steps_log()
        self._last_train = {k: v / max(self._epoch_steps, 1) for k, v in sums.items()}
        return True

    def _close_steps_log(self) -> None:
        if self._steps_log is not None:
            self._steps_log.close()
            self._steps_log = None

    def evaluate(self, split: str) -> dict[str, float]:
        loader = self._loader(split, shuffle=False, batch=self.cfg.data.eval_batch_size
                              // self.env.world_size)
        with self._autocast():
            return evaluate_loader(self.dmp, loader, self.env)

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        self._last_train: dict[str, float] = {}
        # checked before every epoch, so a run resumed after early stopping trains no more
        while self.epoch < cfg.train.epochs and self.bad_epochs < cfg.train.patience:
            self.train_loader.dataset.set_epoch(self.epoch)
            self._epoch_t0 = time.perf_counter()
            finished = self._train_epoch()
            # eval_every_epoch = false: no validation, so no early stopping and no best
            # checkpoint (benchmarks, training slices of data too large to validate each time)
            valid = self.evaluate("valid") if cfg.train.eval_every_epoch else None
            record = {"epoch": self.epoch, "step": self.step,
                      "train": self._last_train, "epoch_s": self._epoch_elapsed()}
            if valid is not None:
                record["valid"] = valid
            self.history.append(record)
            self._epoch_carry_s, self._epoch_t0 = 0.0, None  # the record holds it now
            self._epoch_sums, self._epoch_steps = {}, 0
            if valid is not None:
                self.tb.add("valid", valid, self.step)
                if valid["auc"] > self.best_auc:
                    self.best_auc, self.best_epoch, self.bad_epochs = valid["auc"], self.epoch, 0
                else:
                    self.bad_epochs += 1
                if self.is_main:
                    print(f"[valid] epoch {self.epoch}: " + " ".join(
                        f"{k} {v:.4f}" for k, v in valid.items()) +
                        f" | best epoch {self.best_epoch}", flush=True)
            if finished:  # stopped by max_steps mid-epoch: a resume continues this epoch
                self.epoch += 1
            self._save(metric=None if valid is None else valid["auc"])
            if not finished:
                break
        return self._finish(time.perf_counter() - t0)

    def _finish(self, wall: float) -> dict[str, Any]:
        if self.cfg.checkpoint.enabled and self.cfg.checkpoint.keep_best:
            self.ckpt.load_best(model=self.dmp)
        results: dict[str, Any] = {"best_epoch": self.best_epoch, "best_valid_auc": self.best_auc,
                                   "steps": self.step,
                                   # every epoch's training + validation, across resumes
                                   # (history is checkpointed); this process's part apart
                                   "train_wall_s": sum(r["epoch_s"] for r in self.history),
                                   "process_wall_s": wall,
                                   "world_size": self.env.world_size,
                                   "model": self.cfg.model.name}
        for split in self.cfg.eval.splits:
            results[split] = self.evaluate(split)
        results["history"] = self.history
        if self.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(results, indent=2))
            print("[result] " + json.dumps({s: results[s] for s in self.cfg.eval.splits}),
                  flush=True)
            from genci_dist.runtime.curves import write_training_curves

            write_training_curves(self.history, self.run_dir)
        self.tb.close()
        return results
