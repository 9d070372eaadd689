"""The trainer's command line, including the literal TorchX form the design card uses."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from genci_dist.train import parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_config_and_overrides_are_split() -> None:
    assert parse_args(["--config", "c.toml", "--train.lr", "0.1"]) == ("c.toml", ["--train.lr", "0.1"])
    assert parse_args(["--config=c.toml"]) == ("c.toml", [])
    assert parse_args(["--train.lr=0.1"]) == (None, ["--train.lr=0.1"])


def test_torchx_literal_form_drops_the_script_path() -> None:
    # `torchx run dist.ddp -j 2x8 genci_dist/train.py` passes the path as a script argument
    assert parse_args(["genci_dist/train.py", "--config", "c.toml"]) == ("c.toml", [])
    assert parse_args(["genci_dist/train.py"]) == (None, [])


def test_missing_config_value() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--config"])


def test_torchxconfig_defaults() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".torchxconfig")
    assert cfg["cli:run"]["scheduler"] == "local_cwd"          # not local_docker
    assert cfg["component:dist.ddp"]["script"] == "genci_dist/train.py"
    assert cfg["local_cwd"]["log_dir"]
