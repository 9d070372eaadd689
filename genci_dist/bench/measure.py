"""Measurement pieces of `genci-bench` (genci_dist/bench/cli.py): the phase clock and module
hooks, the endless batch feed, the timed train/eval loop, FLOP and matmul rates."""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

FORWARD_PHASES = ("embedding", "encoder", "decoder", "generation", "attention", "mlp")
TRAIN_PHASES = ("data", *FORWARD_PHASES, "forward_other", "backward", "optimizer")
EVAL_PHASES = ("data", *FORWARD_PHASES, "forward_other")
# Phase → submodule names relative to the task (found under DMP's `_dmp_wrapped_module` and
# DDP's `module` prefixes). A missing name is simply not hooked (ablations, baselines).
HOOKS: dict[str, tuple[str, ...]] = {
    "embedding": ("sparse", "intent_emb", "history"),
    "encoder": ("generator.t5.encoder",),
    "decoder": ("generator.t5", "generator.t5.decoder", "generator.t5.lm_head"),
    "attention": ("cohort_attn", "attention"),
    "mlp": ("mlp", "teacher", "head"),
}
WRAPPER_PREFIXES = ("_dmp_wrapped_module", "module")


# ---- phase timing -------------------------------------------------------------------------
class PhaseClock:
    """Wall time per phase. Nested phases belong to the outermost one (depth counter), so a
    hooked module called inside another hooked call (the T5 decoder inside beam search) is
    never counted twice."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._depth = 0
        self._name = ""
        self._t0 = 0.0

    def enter(self, name: str) -> None:
        if self._depth == 0:
            self._name, self._t0 = name, time.perf_counter()
        self._depth += 1

    def exit(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.totals[self._name] += time.perf_counter() - self._t0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.exit()

    def reset(self) -> None:
        self.totals.clear()


def relative_name(name: str) -> str:
    """`_dmp_wrapped_module.module.generator.t5` → `generator.t5`."""
    parts = name.split(".") if name else []
    while parts and parts[0] in WRAPPER_PREFIXES:
        parts = parts[1:]
    return ".".join(parts)


def _wait_lazy(output: Any) -> Any:
    """A sharded TorchRec module may return a LazyAwaitable whose communication completes
    when first used: wait inside the hook so the lookup's time stays in its phase."""
    from torchrec.distributed.types import LazyAwaitable

    return output.wait() if isinstance(output, LazyAwaitable) else output


def install_phase_hooks(dmp: nn.Module, task: nn.Module, clock: PhaseClock
                        ) -> dict[str, list[str]]:
    """Forward pre/post hooks on the HOOKS submodules and a timing wrapper around the task's
    `generate` (an instance attribute shadowing the method). Returns the hooked names."""
    by_name: dict[str, nn.Module] = {}
    for name, mod in dmp.named_modules():
        by_name.setdefault(relative_name(name), mod)
    hooked: dict[str, list[str]] = {p: [] for p in FORWARD_PHASES}
    for phase, names in HOOKS.items():
        for name in names:
            mod = by_name.get(name)
            if mod is None:
                continue

            def pre(_m: nn.Module, _args: Any, phase: str = phase) -> None:
                clock.enter(phase)

            def post(_m: nn.Module, _args: Any, out: Any) -> Any:
                out = _wait_lazy(out)
                clock.exit()
                return out

            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)
            hooked[phase].append(name)
    if callable(getattr(task, "generate", None)):
        original: Callable[..., Any] = task.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            with clock.phase("generation"):
                return original(*args, **kwargs)

        task.generate = generate  # type: ignore[method-assign]
        hooked["generation"].append("generate")
    return hooked


class Feed:
    """Endless batches from a loader: a new epoch (set_epoch) when one runs out."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader, self.device, self.epoch = loader, device, 0
        self._it = iter(loader)

    def next(self) -> Any:
        batch = next(self._it, None)
        if batch is None:
            self.epoch += 1
            self.loader.dataset.set_epoch(self.epoch)
            self._it = iter(self.loader)
            batch = next(self._it)
        return batch.to(self.device)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---- measurements (on every rank) ---------------------------------------------------------
def measure_loop(trainer: Any, clock: PhaseClock, feed: Feed, steps: int, warmup: int,
                 train: bool) -> dict[str, Any]:
    """Warm-up + timed steps; per-rank totals (seconds, samples)."""
    dmp, env = trainer.dmp, trainer.env
    dmp.train(train)
    forward = samples = 0.0
    start = time.perf_counter()
    grad = contextlib.nullcontext() if train else torch.no_grad()
    with grad:
        for i in range(warmup + steps):
            if i == warmup:
                env.barrier()
                clock.reset()
                forward = samples = 0.0
                start = time.perf_counter()
            with clock.phase("data"):
                batch = feed.next()
            t = time.perf_counter()
            with trainer._autocast():  # train.autocast_bf16, as the trainer runs it
                loss, *_ = dmp(batch)
            forward += time.perf_counter() - t
            if train:
                with clock.phase("backward"):
                    trainer.optimizer.zero_grad()
                    loss.backward()
                with clock.phase("optimizer"):
                    trainer.optimizer.step()
                    trainer.scheduler.step()
            samples += batch.size
    env.barrier()
    elapsed = time.perf_counter() - start
    split = dict(clock.totals)
    split["forward_other"] = max(0.0, forward - sum(split.get(p, 0.0) for p in FORWARD_PHASES))
    return {"elapsed": elapsed, "samples": samples, "split": split}


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(max(1, reps)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_matmul(n: int, reps: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """n×n torch.mm in `dtype` (bfloat16 when the run trains under bf16 autocast, so the
    generator's rate is set against the rate its matmuls can reach)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    t = time.perf_counter()
    for _ in range(max(1, reps)):
        torch.mm(a, b, out=out)
    dt = (time.perf_counter() - t) / max(1, reps)
    return {"matmul_s": dt, "matmul_gflops": 2 * n**3 / dt / 1e9,
            "matmul_dtype": str(dtype).removeprefix("torch.")}


def measure_flops(trainer: Any, task: nn.Module, reps: int) -> dict[str, Any]:
    """Generator forward+backward and beam search on one real local batch, under the run's
    autocast: FLOPs and time. The batch's histories are padded to max_history (no length
    bucketing): the first batch of a bucketed epoch has an arbitrary width, which made the
    per-sample count (and the achieved rate) depend on which bucket came first."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = task.generator
    loader = trainer._loader("train", shuffle=True, batch=trainer.local_batch, num_workers=0,
                             pad_history_to=trainer.cfg.data.max_history, bucket_window=0)
    batch = next(iter(loader)).to(trainer.env.device)
    params = [p for p in gen.parameters() if p.requires_grad]
    weights = batch.labels if task.cfg.ntp_on == "positive" else torch.ones_like(batch.labels)
    task.train()

    def fwd_bwd() -> None:
        with trainer._autocast():
            enc, mask = gen.encode(batch.history_tokens)
            logits = gen.ntp_logits(enc, mask, batch.target_tokens)
            loss = gen.ntp_loss(logits, batch.target_tokens, weights)
        torch.autograd.grad(loss, params, allow_unused=True)

    with FlopCounterMode(display=False) as counter:
        fwd_bwd()
    flops = counter.get_total_flops()
    t_train = _median_time(fwd_bwd, reps)
    with torch.no_grad(), trainer._autocast():
        enc, mask = gen.encode(batch.history_tokens)
        with FlopCounterMode(display=False) as counter:
            task.generate(enc, mask)
        gen_flops = counter.get_total_flops()
        t_gen = _median_time(lambda: task.generate(enc, mask), reps)
    b = batch.size
    return {"local_batch": b, "history_tokens": int(batch.history_tokens.shape[1]),
            "flops": flops, "fwd_bwd_s": t_train, "gen_flops": gen_flops,
            "generation_s": t_gen, "achieved_gflops": flops / t_train / 1e9,
            "generation_gflops": gen_flops / t_gen / 1e9, "samples_per_s": b / t_train}


