"""The OpenMP wait policy of every genci-dist process, set before torch loads libgomp.

torch's CPU kernels run on libgomp, whose threads spin 300,000 times at every barrier
before they sleep (its default when the thread count does not exceed the cores). On a
machine of its own that saves a few wake-ups; on a shared one the spinning thread holds the
core the working thread of the same team needs, and a step waits for the scheduler instead
of for arithmetic. Measured here (2 cores, one run each; `python -m genci_dist.bench.omp_wait`,
2026-12-05, README "Speed"), ML-100K tokenizer wall s / GenCI train samples/s:

    setting                     quiet         beside two 1-thread GenCI trainings (load 2-6)
    libgomp (300,000 spins)     12.7 / 243    261.5 / 17.5
    GOMP_SPINCOUNT=10000        12.7 / 209     82.0 / 55.9
    GOMP_SPINCOUNT=1000         13.8 / 210     30.2 / 106.3
    OMP_WAIT_POLICY=PASSIVE     19.3 / 214     20.8 / 115.9

1,000 spins keeps the quiet machine's speed (PASSIVE costs the tokenizer half again) and
removes nearly all of the shared machine's loss (9x and 6x over libgomp's default).

The project's default is DEFAULT_ENV below, chosen by that benchmark. libgomp reads its
environment once, when it is loaded, so `apply_default()` runs in `data_pipes/__init__.py`
(and therefore in `genci_dist`'s, which imports data_pipes first): every CLI, torchrun rank,
TorchX role and data-loader worker gets it. A value the user set (OMP_WAIT_POLICY or
GOMP_SPINCOUNT) always wins; a process that imported torch before data_pipes keeps the
policy it loaded with, and only its children get the default.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

USER_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
DEFAULT_ENV = {"GOMP_SPINCOUNT": "1000"}


def apply_default(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set DEFAULT_ENV unless the user chose a wait policy; returns what it set."""
    env = os.environ if environ is None else environ
    if any(env.get(var) for var in USER_VARS):
        return {}
    env.update(DEFAULT_ENV)
    return dict(DEFAULT_ENV)
