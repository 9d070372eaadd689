"""The OpenMP wait policy (data_pipes/omp.py) is in the environment before torch loads, in
every entry point, and a policy the user chose is left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipes import omp

ROOT = Path(__file__).resolve().parents[1]

# Records OMP_WAIT_POLICY / GOMP_SPINCOUNT at the moment `import torch` starts, then imports
# or runs the entry point given as argv[1] ("module:NAME" or "script:PATH"), then imports
# torch as its main() would.
PROBE = r"""
import importlib, importlib.abc, json, os, runpy, sys
seen = {}
class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.update({v: os.environ.get(v) for v in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")})
        return None
sys.meta_path.insert(0, Probe())
kind, target = sys.argv[1].split(":", 1)
if kind == "module":
    importlib.import_module(target)
else:
    runpy.run_path(target, run_name="probe")
importlib.import_module("torch")  # what main() does next, if the import did not already
print(json.dumps({"torch_loaded": "torch" in sys.modules, "at_torch_import": seen,
                  "after": {v: os.environ.get(v) for v in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}}))
"""


def _probe(entry: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in omp.USER_VARS}
    env |= extra
    out = subprocess.run([sys.executable, "-c", PROBE, entry], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


ENTRY_POINTS = ["module:data_pipes.prepare", "module:genci_dist.tokenizer.cli",
                "module:genci_dist.train", "module:genci_dist.evaluate",
                "module:genci_dist.bench.cli", "module:genci_dist.analysis.report",
                "script:genci_dist/train.py"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_default_is_set_before_torch_loads(entry):
    r = _probe(entry)
    assert r["torch_loaded"]
    assert r["at_torch_import"] == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "1000"}


@pytest.mark.parametrize("user", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "5000"}])
def test_a_users_choice_wins(user):
    r = _probe("module:genci_dist.train", **user)
    expected = {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None} | user
    assert r["at_torch_import"] == expected and r["after"] == expected


def test_apply_default_on_a_mapping():
    env: dict[str, str] = {}
    assert omp.apply_default(env) == {"GOMP_SPINCOUNT": "1000"}
    assert env == {"GOMP_SPINCOUNT": "1000"}
    env = {"GOMP_SPINCOUNT": "0"}
    assert omp.apply_default(env) == {} and env == {"GOMP_SPINCOUNT": "0"}
    env = {"OMP_WAIT_POLICY": ""}  # set but empty: libgomp ignores it, so the default applies
    assert omp.apply_default(env) == {"GOMP_SPINCOUNT": "1000"}
    assert env == {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "1000"}
