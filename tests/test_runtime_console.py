"""The console: known-harmless library warnings are dropped, every other one is kept; progress
bars only on a terminal; the run's first line says what, on what, where."""

from __future__ import annotations

import logging
import warnings

import pytest

from data_pipes import quiet
from genci_dist.config import load_config
from genci_dist.runtime import console
from genci_dist.runtime.distributed import DistEnv


def test_known_warnings_dropped_others_kept() -> None:
    console.quiet_known_warnings()
    with warnings.catch_warnings(record=True) as caught:
        # catch_warnings restores the filters on exit; re-install inside it for the check
        warnings.simplefilter("always")
        quiet._installed = False
        console.quiet_known_warnings()
        warnings.warn("'set_vital' is deprecated, please do not call", UserWarning, stacklevel=1)
        warnings.warn("fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was "
                      "not registered to the Autograd key(s)", UserWarning, stacklevel=1)
        warnings.warn("something the project must see", UserWarning, stacklevel=1)
        warnings.warn("`broadcast_buffers` is deprecated", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something the project must see",
                                                "`broadcast_buffers` is deprecated"]


def test_known_log_records_dropped_others_kept() -> None:
    console.quiet_known_warnings()
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    root = logging.getLogger()
    handler, level = Keep(logging.WARNING), root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        logging.getLogger("torchrec.distributed.utils").warning(
            "Sharding Type is data_parallel, caching params will be ignored")
        logging.warning("Sharding spec not found for sparse.ebc.t_gender")
        logging.getLogger("torchrec.distributed.utils").warning("a table did not fit")
        logging.warning("rank 1 is slow")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert seen == ["a table did not fit", "rank 1 is slow"]


def test_progress_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    monkeypatch.setattr("sys.stderr", Tty(False))
    assert console.progress_enabled(True) is False
    monkeypatch.setattr("sys.stderr", Tty(True))
    assert console.progress_enabled(True) is True
    assert console.progress_enabled(False) is False


def test_run_banner_says_what_where() -> None:
    cfg = load_config("configs/debug.toml", ["--train.run_dir", "/tmp/some-run"])
    env = DistEnv.init("cpu")
    line = console.run_banner(cfg, env)
    assert "\n" not in line
    assert line.startswith(f"[run] {cfg.model.name} on {cfg.data.dir} ")
    assert "1 rank × " in line and "(cpu)" in line and "→ /tmp/some-run" in line
    assert f"{cfg.train.max_steps} steps" in line


def test_reader_workers_start_quiet(tmp_path) -> None:
    """A reader worker (fork-server process) installs the same filters at its start."""
    import functools

    from data_pipes import stream

    seen: list[bool] = []
    quiet._installed = False
    stream._init_worker(False, 0)
    seen.append(quiet._installed)
    assert seen == [True]
    assert isinstance(functools.partial(stream._init_worker, True), functools.partial)
