#!/usr/bin/env bash
# Creates .venv and installs the pinned stack. Idempotent: a stamp keyed on the lock file and
# pyproject.toml makes a second run cost nothing.
#
# Why --no-deps everywhere: torchrec 1.8.0 declares `fbgemm-gpu` (the CUDA build) as a
# dependency; resolving it would pull fbgemm_gpu 1.9 (built for torch 2.14) over the CPU build.
# The lock lists every package the project needs, fbgemm-gpu-cpu==1.8.0 among them.
# GPU machines: replace `fbgemm_gpu-cpu==1.8.0` by `fbgemm-gpu==1.8.0` and torch's CPU build by
# a CUDA build of torch 2.13.0 (untested here: this project's machines have no GPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${GENCI_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
lock="launchers/requirements-lock.txt"
stamp_val="$(cat "$lock" pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$venv/.genci-stamp" ] && [ "$(cat "$venv/.genci-stamp")" = "$stamp_val" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
echo "[install] installing pinned packages into $venv (first run takes ~2 min)" >&2
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps -r "$lock" 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$venv/bin/python" -c "import torch, torchrec, fbgemm_gpu, transformers, pyarrow, genci_dist, data_pipes" \
  || { echo "[install] import check failed" >&2; exit 1; }
echo "$stamp_val" > "$venv/.genci-stamp"
