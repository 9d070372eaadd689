"""Bad input reaches the user as one line on stderr and exit code 2, and damages nothing.

Table-driven over the real entry points (`main(argv)` of genci-train, genci-evaluate,
genci-tokenize, genci-report, genci-bench in this process, stderr captured at the file
descriptor): each bad config value, a foreign checkpoint, a missing checkpoint and a bogus
split ends in exactly one line `<prog>: error: <message naming the key or file>`, exit code 2,
and leaves every file of an existing run folder byte-for-byte (and mtime) as it was. Then the
real `python -m genci_dist.train` as a subprocess: one line, and the traceback only with
`--debug` or GENCI_DEBUG=1.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from genci_dist.config import JobConfig, load_config
from genci_dist.config_loader import ConfigError
from genci_dist.errors import is_user_error, one_line

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.toml")


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-step run of configs/debug.toml (its checkpoint, config.toml, plan.txt,
    metrics.json, steps.jsonl): the "previously written" files every case must leave alone."""
    from genci_dist.train import main

    run = tmp_path_factory.mktemp("bad-inputs") / "run"
    rc = main(["--config", DEBUG, "--train.run_dir", str(run), "--train.max_steps", "2",
               "--train.epochs", "1", "--eval.splits", "[]", "--train.tensorboard", "false"])
    assert rc == 0 and (run / "checkpoints" / "latest").exists()
    return run


def _train(run: Path, *args: str) -> list[str]:
    return ["train", "--config", DEBUG, "--train.run_dir", str(run), *args]


# (name, argv builder from the run folder, expected line: exact, or a prefix when it ends "…")
CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("batch_size 0", lambda r: _train(r, "--data.batch_size", "0"),
     "genci-train: error: command line: --data.batch_size must be >= 1, got 0"),
    ("lr -0.1", lambda r: _train(r, "--train.lr", "-0.1"),
     "genci-train: error: command line: --train.lr must be > 0, got -0.1"),
    ("epochs -1", lambda r: _train(r, "--train.epochs", "-1"),
     "genci-train: error: command line: --train.epochs must be >= 1, got -1"),
    ("dropout 1", lambda r: _train(r, "--model.dropout", "1"),
     "genci-train: error: command line: --model.dropout must be >= 0 and < 1, got 1.0"),
    ("zero-width mlp layer", lambda r: _train(r, "--model.mlp", "[32, 0]"),
     "genci-train: error: command line: --model.mlp[1] must be >= 1, got 0"),
    ("sparse lr 0", lambda r: _train(r, "--sharding.sparse_lr", "0"),
     "genci-train: error: command line: --sharding.sparse_lr must be > 0, got 0.0"),
    ("cross-field against the file", lambda r: _train(r, "--model.attn_heads", "3"),
     f"genci-train: error: {DEBUG} with the command line's overrides: model.d_model (16) must "
     "be divisible by model.attn_heads (3)"),
    ("unknown key", lambda r: _train(r, "--train.lrr", "0.1"),
     "genci-train: error: command line: --train.lrr: unknown key (did you mean 'lr'?); …"),
    ("wrong type", lambda r: _train(r, "--train.epochs", "2.5"),
     "genci-train: error: command line: --train.epochs: expected an integer, got 2.5"),
    ("a device this machine lacks", lambda r: _train(r, "--train.device", "cuda"),
     "genci-train: error: train.device: device = 'cuda' but this machine has no usable CUDA "
     "device (use 'auto' or 'cpu')"),
    ("missing config file", lambda r: ["train", "--config", str(r / "nope.toml")],
     "genci-train: error: {run}/nope.toml: config file not found"),
    ("foreign checkpoint (resume under another model)",
     lambda r: _train(r, "--checkpoint.resume", "auto", "--model.d_model", "32"),
     "genci-train: error: …another model config…"),
    ("evaluate a nonexistent checkpoint", lambda r: ["evaluate", "--checkpoint", str(r / "no")],
     "genci-evaluate: error: --checkpoint {run}/no: no such file or folder"),
    ("evaluate a folder without a checkpoint",
     lambda r: ["evaluate", "--checkpoint", str(r.parent)],
     "genci-evaluate: error: --checkpoint …no checkpoint…"),
    ("evaluate --split bogus",
     lambda r: ["evaluate", "--checkpoint", str(r), "--split", "bogus"],
     "genci-evaluate: error: argument --split: invalid choice: 'bogus' …"),
    ("evaluate with a bad override", lambda r: ["evaluate", "--checkpoint", str(r),
                                                "--data.batch_size", "0"],
     "genci-evaluate: error: command line: --data.batch_size must be >= 1, got 0"),
    ("tokenize a folder without a dataset", lambda r: ["tokenize", "--data", str(r)],
     "genci-tokenize: error: …manifest.json…"),
    ("report on a folder without a dataset",
     lambda r: ["report", "volatility", "--data", str(r), "--predictions", "m=x.parquet",
                "--out", str(r / "report")],
     "genci-report: error: …"),
    ("bench a batch that 2 ranks cannot split",
     lambda r: ["bench", "--configs", DEBUG, "--models", "genci", "--world-sizes", "2",
                "--batch-size", "3"],
     "genci-bench: error: data.batch_size must be a multiple of the world size 2 (each rank "
     "reads batch_size // 2), got 3"),
]


def _entry(name: str) -> Callable[[list[str]], int]:
    if name == "train":
        from genci_dist.train import main
    elif name == "evaluate":
        from genci_dist.evaluate import main
    elif name == "tokenize":
        from genci_dist.tokenizer.cli import main
    elif name == "report":
        from genci_dist.analysis.report import main
    else:
        from genci_dist.bench.cli import main
    return main


def _matches(line: str, expected: str) -> bool:
    parts = expected.split("…")
    if len(parts) == 1:
        return line == expected
    pos = 0
    for i, part in enumerate(parts):
        at = line.find(part, pos)
        if at < 0 or (i == 0 and at != 0):
            return False
        pos = at + len(part)
    return True


@pytest.mark.parametrize("name, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
        run: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        name: str, argv: Callable[[Path], list[str]], expected: str) -> None:
    monkeypatch.delenv("GENCI_DEBUG", raising=False)
    monkeypatch.chdir(ROOT)
    before = _snapshot(run)
    capfd.readouterr()
    prog, *args = argv(run)
    if "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
    rc = _entry(prog)(args)
    err = capfd.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert _matches(lines[0], expected.replace("{run}", str(run))), lines[0]
    assert _snapshot(run) == before


def test_the_run_fixture_is_what_the_cases_protect(run: Path) -> None:
    """The snapshot is not vacuous: the run wrote its config, plan, steps and checkpoint."""
    files = _snapshot(run)
    assert {"config.toml", "plan.txt", "metrics.json", "steps.jsonl"} <= set(files)
    assert any(f.startswith("checkpoints/") for f in files)


def test_matcher_rejects_other_lines() -> None:
    assert _matches("genci-train: error: a b c", "genci-train: error: …b…")
    assert not _matches("x genci-train: error: a b c", "genci-train: error: …b…")
    assert not _matches("genci-train: error: a c", "genci-train: error: …b…")
    assert not _matches("genci-train: error: a", "genci-train: error: a b")


# ---- the rules themselves ------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--train.lr", "0"], "train.lr must be > 0, got 0.0"),
    (["--train.lr", "inf"], "train.lr must be finite and > 0, got inf"),
    (["--train.patience", "0"], "train.patience must be >= 1, got 0"),
    (["--data.num_workers", "-1"], "data.num_workers must be >= 0, got -1"),
    (["--data.max_history", "0"], "data.max_history must be >= 1, got 0"),
    (["--model.attn_dropout", "-0.5"], "model.attn_dropout must be >= 0 and < 1, got -0.5"),
    (["--model.d_model", "0"], "model.d_model must be >= 1, got 0"),
    (["--checkpoint.keep_last", "0"], "checkpoint.keep_last must be >= 1, got 0"),
    (["--eval.splits", '["valid", "tset"]'],
     "eval.splits[1] must be one of train, valid, test, got 'tset'"),
    (["--sharding.min_partition", "0"], "sharding.min_partition must be >= 1, got 0"),
    (["--tokenizer.lr", "-1"], "tokenizer: lr must be > 0, got -1.0"),
])
def test_range_errors_name_the_key(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, args)
    assert str(e.value) == f"command line: --{message}"


def test_range_error_in_a_file_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[train]\nlr = -0.1\n")
    with pytest.raises(ConfigError, match=r"^.*bad\.toml: train\.lr must be > 0, got -0\.1$"):
        load_config(p)


def test_boundaries_are_accepted() -> None:
    cfg = load_config(None, ["--model.dropout", "0", "--train.max_steps", "0",
                             "--data.num_workers", "0", "--train.epochs", "1",
                             "--data.batch_size", "1"])
    assert (cfg.model.dropout, cfg.train.epochs, cfg.data.batch_size) == (0.0, 1, 1)


def test_a_cross_field_error_of_the_defaults_alone_is_not_an_error(tmp_path: Path) -> None:
    """--model.attn_heads 3 fails against the default d_model 64, not the file's 48."""
    p = tmp_path / "c.toml"
    p.write_text("[model]\nd_model = 48\n")
    assert load_config(p, ["--model.attn_heads", "3"]).model.attn_heads == 3


@pytest.mark.parametrize("batch, world, ok", [(64, 2, True), (2, 2, True), (3, 2, False),
                                              (1, 2, False), (63, 1, True)])
def test_world_size_checks(batch: int, world: int, ok: bool) -> None:
    cfg = load_config(None, ["--data.batch_size", str(batch)])
    if ok:
        cfg.check_world_size(world)
    else:
        with pytest.raises(ConfigError, match=rf"^data\.batch_size must be a multiple of the "
                                              rf"world size {world} .*got {batch}$"):
            cfg.check_world_size(world)


def test_user_errors_are_recognised_by_class() -> None:
    from data_pipes.schema import DatasetError
    from genci_dist.analysis.volatility import AnalysisError
    from genci_dist.runtime.checkpoint import CheckpointError
    from genci_dist.tokenizer.embed import EmbeddingError
    from genci_dist.tokenizer.semantic_ids import SemanticIdError

    for cls in (ConfigError, DatasetError, AnalysisError, EmbeddingError, SemanticIdError,
                CheckpointError):
        assert is_user_error(cls("x"))
    assert not is_user_error(ValueError("x")) and not is_user_error(RuntimeError("x"))

    class ConfigErrorLookalike(Exception):  # same name, not the project's
        pass

    assert not is_user_error(ConfigErrorLookalike("x"))
    assert one_line(ConfigError("a\n  b\n\nc")) == "a; b; c"
    assert JobConfig().train.lr > 0


# ---- the real command line: one line, or the traceback on request ---------------------------
def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k != "GENCI_DEBUG"} | (env or {})
    return subprocess.run([sys.executable, "-m", "genci_dist.train", "--config", DEBUG, *args],
                          cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)


def test_cli_prints_one_line_and_the_traceback_only_on_request() -> None:
    line = "genci-train: error: command line: --train.lr must be > 0, got -0.1"
    plain = _cli("--train.lr", "-0.1")
    assert (plain.returncode, plain.stderr.strip().splitlines()) == (2, [line])
    for r in (_cli("--train.lr", "-0.1", "--debug"),
              _cli("--train.lr", "-0.1", env={"GENCI_DEBUG": "1"})):
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2
        assert lines[0] == "Traceback (most recent call last):" and lines[-1] == line
        assert any("genci_dist/config.py" in x for x in lines)
        assert len(lines) > 5


# ---- torchrun's error files, without torchrun ------------------------------------------------
def test_error_file_is_torchruns_root_cause_and_peers_print_its_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Rank 1 fails with a user error; torch's own ProcessFailure / ChildFailedError read its
    error file as the root cause (one second earlier than rank 0 dying in the same second),
    and rank 0, whose collective broke, prints rank 1's line instead of a traceback."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from genci_dist.errors import run_cli

    files = {r: tmp_path / "attempt_0" / str(r) / "error.json" for r in (0, 1)}
    for f in files.values():
        f.parent.mkdir(parents=True)
    for k in ("MASTER_ADDR", "MASTER_PORT", "GENCI_DEBUG", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")

    def bad_data(_args: list[str]) -> int:
        from data_pipes.schema import DatasetError
        raise DatasetError("shard-00001.parquet: row 7: label 3 is not 0/1")

    def broken_collective(_args: list[str]) -> int:
        raise RuntimeError("[gloo/pair.cc:553] Connection closed by peer")

    line = "genci-train: error: rank 1: shard-00001.parquet: row 7: label 3 is not 0/1"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(files[1]))
    assert run_cli("genci-train", bad_data, []) == 2
    assert capfd.readouterr().err.splitlines() == [line]

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(files[0]))
    assert run_cli("genci-train", broken_collective, []) == 1
    assert capfd.readouterr().err.splitlines() == [line]

    failures = {0: ProcessFailure(0, 100, 1, str(files[0])),
                1: ProcessFailure(1, 101, 2, str(files[1]))}
    assert failures[1].timestamp < failures[0].timestamp  # rank 0's was written later
    msg = str(ChildFailedError("train", failures))
    root = msg.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root
    assert [x for x in root.strip().splitlines() if x.strip("=")][-1] == f"  traceback : {line}"
    assert f"stopped after another rank's error: {line}" in msg.split("Root Cause")[0]


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from genci_dist.errors import run_cli

    monkeypatch.setenv("WORLD_SIZE", "1")

    def bug(_args: list[str]) -> int:
        raise KeyError("not a user error")

    with pytest.raises(KeyError):
        run_cli("genci-train", bug, [])


def test_a_reader_workers_error_keeps_only_its_message() -> None:
    """A DataLoader worker's DatasetError comes back with the worker's traceback in its
    message; the user's line keeps the original message and names the worker."""
    from torch.utils.data import DataLoader, Dataset

    from data_pipes.schema import DatasetError

    class Bad(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> int:
            raise DatasetError("shard-00001.parquet: row 7: label 3 is not 0/1")

    with pytest.raises(DatasetError) as e:
        list(DataLoader(Bad(), num_workers=1))
    assert "Traceback" in str(e.value) and is_user_error(e.value)
    assert one_line(e.value) == ("shard-00001.parquet: row 7: label 3 is not 0/1 "
                                 "(in DataLoader worker process 0)")


def test_damaged_checkpoint_is_one_line_and_left_as_it_was(
        run: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every checkpoint of a run damaged (.metadata overwritten): evaluate and a resuming
    train each end in one CheckpointError line, exit 2, and change no file of the run."""
    import shutil

    from genci_dist.evaluate import main as evaluate
    from genci_dist.train import main as train

    monkeypatch.delenv("GENCI_DEBUG", raising=False)
    monkeypatch.chdir(ROOT)
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged, symlinks=True)
    metas = list((damaged / "checkpoints").glob("step-*/.metadata"))
    assert metas
    for m in metas:
        m.write_bytes(b"garbage\n")
    before = _snapshot(damaged)
    capfd.readouterr()
    for prog, entry, argv in (
            ("genci-evaluate", evaluate, ["--checkpoint", str(damaged)]),
            ("genci-train", train, ["--config", DEBUG, "--train.run_dir", str(damaged),
                                    "--checkpoint.resume", "auto"])):
        rc = entry(argv)
        lines = [x for x in capfd.readouterr().err.splitlines() if x.strip()]
        assert rc == 2 and len(lines) == 1, lines
        assert _matches(lines[0], f"{prog}: error: {damaged}/checkpoints: …damaged…"), lines
    assert _snapshot(damaged) == before
