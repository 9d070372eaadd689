"""genci_dist.bench.projection: the arithmetic by hand, the table sizes of the real model
classes at a target size, and the TorchRec planner run on simulated topologies."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from data_pipes.schema import feature_specs, load_manifest
from genci_dist.bench import projection as pj
from genci_dist.config import load_config
from genci_dist.runtime.sharding import table_sizes

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "instrument.toml"


def test_arithmetic_by_hand() -> None:
    # 10^10 interactions, 89 % kept, leave-one-out: 8.9e9 - 2 × 10^8 = 8.7e9 train samples
    assert pj.target_train_samples(10**10, 10**8, 0.89) == 8_700_000_000
    # 8.7e9 / (35000 / 2 × 64) = 8.7e9 / 1.12e6 = 7767.857142857143 s
    assert pj.epoch_seconds(8_700_000_000, 35000.0, 2, 64) == pytest.approx(7767.857142857143,
                                                                             rel=1e-12)
    # a measured rank's rate × ranks: 1 measured rank at 100/s, 4 ranks → 400 samples/s
    assert pj.epoch_seconds(1000, 100.0, 1, 4) == 2.5


def test_measure_dataset(tiny_dataset: Path) -> None:
    m = pj.measure_dataset(tiny_dataset)
    manifest = load_manifest(tiny_dataset)
    files = sorted((tiny_dataset / "sequences").glob("*.parquet"))
    assert files and m.train_bytes == sum(f.stat().st_size for f in files)
    assert m.train_rows == manifest["counts"]["train"]["rows"]
    assert m.bytes_per_sample == m.train_bytes / m.train_rows
    # no generator record of interactions in the tiny manifest: samples stand for them
    assert m.samples_per_interaction == 1.0


@pytest.mark.parametrize("name", ["deepfm", "genci"])
def test_target_tables_by_hand(tiny_dataset: Path, name: str) -> None:
    job = load_config(CONFIG)
    feats = pj.target_features(feature_specs(load_manifest(tiny_dataset)), 1000, 100)
    model = pj.build_target_model(replace(job.model, name=name), feats)
    sizes = {t.name: t for t in table_sizes(model, job.sharding)}
    user, item = sizes["t_user_id"], sizes["t_item_id"]
    # 1000 users + padding row, 16 wide fp32 = 64,064 B; rowwise_adagrad 4 B a row = 4,004 B
    assert (user.rows, user.cols, user.weight_bytes, user.state_bytes) == (1001, 16, 64064, 4004)
    assert (item.rows, item.weight_bytes, item.state_bytes) == (101, 6464, 404)
    # side features keep the measured cardinalities
    assert sizes["t_gender"].rows == next(f.cardinality for f in feature_specs(
        load_manifest(tiny_dataset)) if f.name == "gender")
    # GenCI adds the d_model-wide intent item table (d_model = 16 in the Instrument config)
    assert ("t_intent_item" in sizes) == (name == "genci")
    if name == "genci":
        assert sizes["t_intent_item"].rows == 101 and sizes["t_intent_item"].cols == 16


def test_planner_on_tiny_simulated_topology(tiny_dataset: Path) -> None:
    job = load_config(CONFIG)
    feats = pj.target_features(feature_specs(load_manifest(tiny_dataset)), 10**6, 10**5)
    model_cfg = replace(job.model, name="deepfm")
    p = pj.plan_on_topology(pj.build_target_model(model_cfg, feats), job.sharding,
                            world_size=4, budget_gb=2.0, local_world_size=2)
    assert p.ok, p.error
    assert set(p.tables) == {"t_user_id", "t_item_id", "t_gender", "t_release_year",
                             "t_genres"}
    for t in p.tables.values():
        assert 1 <= t["ranks"] <= 4 and t["sharding"]
    # every rank holds at least the runtime reserve, none more than its budget
    assert 0.6e9 <= p.rank_bytes_min <= p.rank_bytes_max <= 2e9
    # 10^8 users × 16 × 4 B + 4 B a row = 6.8 GB cannot fit 2 ranks of 1 GB (0.4 GB for tables)
    # of device memory: with 256 GB of host memory a rank the planner moves the user table to
    # host memory (a UVM kernel); with 0.1 GB of host memory nothing fits and it says so
    big = pj.target_features(feature_specs(load_manifest(tiny_dataset)), 10**8, 10**5)
    p = pj.plan_on_topology(pj.build_target_model(model_cfg, big), job.sharding,
                            world_size=2, budget_gb=1.0, host_gb=256.0)
    assert p.ok and p.tables["t_user_id"]["kernel"].startswith("fused_uvm")
    p = pj.plan_on_topology(pj.build_target_model(model_cfg, big), job.sharding,
                            world_size=2, budget_gb=1.0, host_gb=0.1)
    assert not p.ok and p.error


def test_cli_lines(tiny_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md = tiny_dataset.parent / "projection.md"
    rc = pj.main(["--config", str(CONFIG), "--dataset", str(tiny_dataset), "--users", "1e4",
                  "--items", "1e3", "--interactions", "1e6", "--models", "deepfm",
                  "--world-sizes", "4", "--budgets-gb", "2", "--local-world-size", "2",
                  "--measured", "deepfm=1000:2", "--markdown", str(md)])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    kinds = [x["kind"] for x in lines]
    assert kinds[0] == "data" and "plan" in kinds and kinds[-1] == "epoch"
    data, epoch = lines[0], lines[-1]
    train = data["target"]["train_samples"]
    assert train == 10**6 - 2 * 10**4       # samples/interaction = 1 here (see above)
    assert epoch["epoch_s"] == pytest.approx(train / (1000 / 2 * 4), abs=0.05)
    assert "| deepfm | 4 | 2 GB |" in md.read_text()


def test_cli_bad_measured(capsys: pytest.CaptureFixture[str]) -> None:
    assert pj.main(["--dataset", "x", "--measured", "deepfm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--measured 'deepfm'" in err
