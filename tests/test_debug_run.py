"""The single-process debug mode end to end (no torchrun): tiny synthetic dataset and its
semantic IDs generated on first use, GenCI trained under DMP on a one-rank gloo group, valid and
test metrics, run folder written — and a golden loss pinned as a regression check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genci_dist.train import main

ROOT = Path(__file__).resolve().parents[1]
# Mean training loss of the second (last) epoch of configs/debug.toml (30 steps, seed 7).
# A regression pin, not a quality claim: any change to the data generator, tokenizer, model
# or optimizer maths moves it. Recorded on the 2-core CPU machine this project runs on; the
# tolerance absorbs float reassociation across CPU kernels, not behaviour changes.
GOLDEN_LAST_EPOCH_LOSS = 4.801374435424805


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("debug")
    rc = main(["--config", str(ROOT / "configs/debug.toml"), "--data.dir", str(tmp / "data"),
               "--train.run_dir", str(tmp / "run"), "--tokenizer.cache_dir", str(tmp / "cache")])
    assert rc == 0
    return tmp / "run"


def test_debug_run_writes_a_complete_run_folder(debug_run: Path) -> None:
    metrics = json.loads((debug_run / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["world_size"] == 1
    assert 0.0 < metrics["test"]["auc"] < 1.0 and metrics["test"]["samples"] > 0
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]
    for name in ("config.toml", "plan.txt", "training_curves.png"):
        assert (debug_run / name).is_file(), name
    assert any((debug_run / "tensorboard").iterdir())
    assert (debug_run / "checkpoints" / "best" / ".metadata").is_file()
    parts = metrics["history"][-1]["train"]
    assert set(parts) == {"loss", "ctr", "ntp", "sr"}
    assert parts["loss"] == pytest.approx(parts["ctr"] + parts["ntp"] + parts["sr"], rel=1e-5)


def test_debug_golden_loss(debug_run: Path) -> None:
    metrics = json.loads((debug_run / "metrics.json").read_text())
    loss = metrics["history"][-1]["train"]["loss"]
    print("debug last-epoch loss", loss)
    assert loss == pytest.approx(GOLDEN_LAST_EPOCH_LOSS, rel=2e-3)
