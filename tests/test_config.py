"""Config precedence (CLI > TOML > defaults), strict keys and types, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from genci_dist.config import JobConfig, load_config, save_config
from genci_dist.config_loader import ConfigError, parse_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_without_file() -> None:
    cfg = load_config(None)
    assert cfg == JobConfig()
    assert cfg.train.lr == 0.003


def test_precedence_cli_over_toml_over_defaults(tmp_path: Path) -> None:
    p = _write(tmp_path, "a.toml", "[train]\nlr = 0.01\nepochs = 3\n[data]\nbatch_size = 64\n")
    cfg = load_config(p, ["--train.lr", "0.5", "--data.dir=some/where"])
    assert cfg.train.lr == 0.5            # CLI beats TOML
    assert cfg.train.epochs == 3          # TOML beats default
    assert cfg.data.batch_size == 64
    assert cfg.data.dir == "some/where"   # bare strings need no quotes
    assert cfg.train.patience == JobConfig().train.patience  # default kept


def test_int_accepted_for_float_and_parsed_lists(tmp_path: Path) -> None:
    cfg = load_config(None, ["--train.lr", "1", "--eval.splits", '["valid", "test"]'])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.eval.splits == ("valid", "test")


def test_unknown_key_in_file_names_file_and_key(tmp_path: Path) -> None:
    p = _write(tmp_path, "bad.toml", "[train]\nlrr = 0.01\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "bad.toml" in msg and "train.lrr" in msg and "did you mean 'lr'" in msg


def test_unknown_section(tmp_path: Path) -> None:
    p = _write(tmp_path, "bad.toml", "[trian]\nlr = 0.01\n")
    with pytest.raises(ConfigError, match="trian: unknown key"):
        load_config(p)


def test_unknown_cli_key_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="command line: --train.nope"):
        load_config(None, ["--train.nope", "1"])


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--train.epochs", "2.5"], "train.epochs: expected an integer"),
        (["--train.epochs", "true"], "train.epochs: expected an integer"),
        (["--train.deterministic", "1"], "train.deterministic: expected true/false"),
        (["--data.split", "sideways"], "data.split: 'sideways' is not one of"),
        (["--train.lr", "fast"], "train.lr: expected a number"),
    ],
)
def test_wrong_types_rejected(args: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, args)


def test_malformed_cli() -> None:
    with pytest.raises(ConfigError, match="expected --section.key"):
        parse_overrides(["lr", "3"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--train.lr"])


def test_extends_layers_files(tmp_path: Path) -> None:
    _write(tmp_path, "base.toml", "[train]\nlr = 0.01\nepochs = 7\n")
    child = _write(tmp_path, "child.toml", 'extends = "base.toml"\n[train]\nepochs = 2\n')
    cfg = load_config(child)
    assert (cfg.train.lr, cfg.train.epochs) == (0.01, 2)


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "broken.toml", "[train\nlr = 1\n")
    with pytest.raises(ConfigError, match="broken.toml: invalid TOML"):
        load_config(p)


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["--train.lr", "0.02", "--model.name", "deepfm"])
    save_config(cfg, tmp_path / "resolved.toml")
    assert load_config(tmp_path / "resolved.toml") == cfg


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_shipped_configs_load_and_say_what_they_reproduce(name: str) -> None:
    path = CONFIGS / name
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{name} needs a header comment saying what it reproduces"
    cfg = load_config(path)
    assert cfg.description, f"{name} sets no description"
