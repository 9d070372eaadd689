#!/usr/bin/env bash
# README command 2: installs (if needed) and runs lint + the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./launchers/install.sh
venv="${GENCI_VENV:-$root/.venv}"
export PATH="$venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check genci_dist data_pipes launchers tests
exec python -m pytest -q "$@" tests
