"""Step timing and the one-line step log (loss parts, samples/s, time split), plus TensorBoard.

Only rank 0 writes; the other ranks keep the timers (cheap) so the code path is the same.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

PHASES = ("data", "forward", "backward", "optimizer")


class StepTimer:
    """Accumulates wall time per phase between two `report()` calls."""

    def __init__(self) -> None:
        self._acc: dict[str, float] = defaultdict(float)
        self._samples = 0
        self._steps = 0
        self._t0 = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self._acc[name] += time.perf_counter() - t

    def add_samples(self, n: int) -> None:
        self._samples += n
        self._steps += 1

    def report(self) -> dict[str, float]:
        """Returns {samples_per_s, step_s, <phase>_s per step} and resets."""
        wall = max(time.perf_counter() - self._t0, 1e-9)
        steps = max(self._steps, 1)
        out = {"samples_per_s": self._samples / wall, "step_s": wall / steps}
        for name in PHASES:
            out[f"{name}_s"] = self._acc.get(name, 0.0) / steps
        self._acc.clear()
        self._samples = 0
        self._steps = 0
        self._t0 = time.perf_counter()
        return out


def format_step_line(epoch: int, step: int, losses: Mapping[str, float],
                     timing: Mapping[str, float], lr: float) -> str:
    parts = " ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "loss")
    step_s = max(timing["step_s"], 1e-9)
    split = " ".join(f"{n} {100 * timing[f'{n}_s'] / step_s:.0f}%" for n in PHASES)
    return (f"epoch {epoch} step {step} | loss {losses.get('loss', float('nan')):.4f} ({parts}) | "
            f"{timing['samples_per_s']:.0f} samples/s | {1000 * step_s:.0f} ms/step [{split}] | "
            f"lr {lr:.2e}")


class ScalarWriter:
    """TensorBoard event files (rank 0 only); a no-op elsewhere or when disabled."""

    def __init__(self, log_dir: Path | None) -> None:
        self._w = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._w = SummaryWriter(log_dir=str(log_dir))

    def add(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self._w is not None:
            for k, v in values.items():
                self._w.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._w is not None:
            self._w.flush()
            self._w.close()
