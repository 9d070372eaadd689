"""The TorchX component: what torchrun command and environment a `torchx run
launchers/components.py:train` job gets (the spec torchx hands every scheduler)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _component():
    spec = importlib.util.spec_from_file_location("genci_components",
                                                  ROOT / "launchers" / "components.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("restarts", [0, 2])
def test_train_component_restarts_and_rendezvous_env(restarts: int) -> None:
    app = _component().train("--train.lr", "0.001", config="configs/debug.toml",
                             nproc_per_node=2, max_restarts=restarts, max_retries=1)
    role = app.roles[0]
    cmd = role.args[-1]
    assert cmd.startswith("torchrun ")
    assert ("--max-restarts 2 " in cmd) == (restarts == 2) and cmd.count("--max-restarts") \
        == (1 if restarts else 0)
    assert "genci_dist/train.py --config configs/debug.toml --train.lr 0.001" in cmd
    # a restarted rank must not rendezvous on the dead ranks' store (pytorch#135712)
    assert role.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert role.max_retries == 1
