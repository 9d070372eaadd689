"""How every command-line tool reports the project's own errors: one line, exit code 2.

`run_cli("genci-train", body, argv)` runs a tool's body; a user error (bad config, bad data,
bad checkpoint: `USER_ERRORS` below, found by class name so this module imports none of
them) becomes one line on stderr,

    genci-train: error: command line: --train.lr must be > 0, got -0.1

and exit code 2. `--debug` anywhere on the command line (removed before the tool parses its
arguments) or `GENCI_DEBUG=1` prints the traceback first. Any other exception is a bug and
keeps its traceback (exit code 1).

Under torchrun (WORLD_SIZE > 1) one rank's error breaks the others' collectives, and they
would die with long gloo tracebacks printed after the one line that matters; torchrun then
prints its ChildFailedError summary, whose "Root Cause" is the failure with the earliest
error-file timestamp. So the failing rank

1. prints `genci-train: error: rank R: <message>` on stderr;
2. writes torchrun's error file (TORCHELASTIC_ERROR_FILE, in the format of torch's
   `@record`, plus the line under a key of its own for the peers) with that line as its
   traceback and a timestamp one second early: timestamps are whole seconds and a tie goes
   to the lowest rank, which may be a peer dying in the same second;
3. publishes the line in the job's TCPStore (MASTER_ADDR:MASTER_PORT) when torchrun's
   agent hosts it (not under TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, where rank 0 does).

A rank whose collective then breaks (any exception that is not a user error) looks for that
line for up to PEER_WAIT_S seconds, in its node's other error files (found whoever hosts
the store) and in the agent's store (ranks on other nodes); found,
it prints the same line instead of its traceback and records "stopped after another rank's
error" in its error file. The user therefore sees the root cause's line as the last line of
the ranks' output and again at the end of torchrun's summary (`traceback : genci-train:
error: rank 1: ...`). A rank that torchrun stops with SIGTERM first prints nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

USER_ERRORS = frozenset({"ConfigError", "DatasetError", "SemanticIdError", "EmbeddingError",
                         "AnalysisError", "CheckpointError"})
"""Class names of the project's user-facing errors (config_loader, data_pipes.schema,
tokenizer, analysis.volatility, runtime.checkpoint); subclasses count too."""
_PACKAGES = ("genci_dist", "data_pipes")
DEBUG_ENV = "GENCI_DEBUG"
PEER_KEY = "genci/user_error"
USER_LINE_KEY = "genci_user_error"
PEER_WAIT_S = 5.0
"""How long a rank whose collective broke waits for a peer's published error line."""


def is_user_error(exc: BaseException) -> bool:
    return any(c.__name__ in USER_ERRORS and c.__module__.split(".")[0] in _PACKAGES
               for c in type(exc).__mro__)


_WORKER = re.compile(r"Caught \w+ in (DataLoader worker process \d+)\.\s*\nOriginal Traceback")


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (inner line breaks become "; "). An error
    re-raised from a DataLoader worker carries the worker's whole traceback in its message:
    only the original message is kept, with the worker named."""
    text = str(exc)
    worker = _WORKER.match(text)
    if worker:
        lines = text.splitlines()
        last_frame = max((i for i, x in enumerate(lines) if x.startswith("  ")), default=1)
        head, *rest = lines[last_frame + 1:] or [type(exc).__name__]
        cls, sep, msg = head.partition(": ")
        if sep and cls.rpartition(".")[2] == type(exc).__name__:
            head = msg
        text = "\n".join([head, *rest])
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    where = f" (in {worker.group(1)})" if worker else ""
    return ("; ".join(parts) or type(exc).__name__) + where


def _world() -> tuple[int, int]:
    env = os.environ
    try:
        return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def error_line(prog: str, exc: BaseException) -> str:
    rank, world = _world()
    where = f"rank {rank}: " if world > 1 else ""
    return f"{prog}: error: {where}{one_line(exc)}"


def debug_requested(args: Sequence[str]) -> tuple[bool, list[str]]:
    """(traceback wanted, args without --debug)."""
    rest = [a for a in args if a != "--debug"]
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return len(rest) < len(args) or env not in ("", "0", "false", "no"), rest


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (`prog: error: ...`, exit 2), pointing
    at --help instead of printing the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Documents --debug in --help (`run_cli` removes it before the parser runs)."""
    parser.add_argument("--debug", action="store_true",
                        help=f"print the traceback of an error (or set {DEBUG_ENV}=1)")


# ---- torchrun: the error file and the peers ----------------------------------------------
def _write_error_file(line: str, callstack: str, timestamp: int, user: bool = False) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data: dict[str, Any] = {"message": {"message": line, "extraInfo": {
        "py_callstack": callstack, "timestamp": str(timestamp)}}}
    if user:  # torchrun reads only "message"; the peers look for this
        data[USER_LINE_KEY] = line
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass


def _store(timeout_s: float) -> Any | None:
    """A client of the job's TCPStore when torchrun's agent hosts it (it outlives every
    rank), else None: under TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 rank 0 hosts it, and after
    rank 0's failure a client would only add c10d's connection errors after the line."""
    _rank, world = _world()
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if world <= 1 or not agent or not host or not port:
        return None
    try:
        import torch.distributed as dist

        return dist.TCPStore(host, int(port), is_master=False,
                             timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception:  # the store is gone: nobody left to tell or to ask
        return None


def _peer_key() -> str:
    """One key per attempt: torchrun --max-restarts reuses its store across restarts."""
    return f"{PEER_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _publish(line: str) -> None:
    store = _store(2.0)
    if store is not None:
        try:
            store.set(_peer_key(), line)
        except Exception:
            pass


def _sibling_error_files() -> list[Path]:
    """The error files of this node's other ranks (torchrun gives each local rank
    <run>/attempt_N/<local_rank>/error.json)."""
    own = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not own:
        return []
    me = Path(own)
    return [p for p in me.parent.parent.glob(f"*/{me.name}") if p != me]


def _user_line_in(path: Path) -> str | None:
    try:
        line = json.loads(path.read_text()).get(USER_LINE_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return line if isinstance(line, str) else None


def _peer_line(wait_s: float = PEER_WAIT_S) -> str | None:
    """A peer's user-error line: from this node's error files (works whoever hosts the
    store, e.g. rank 0 under TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, gone with rank 0) or from
    the job's store (other nodes), polled for up to wait_s seconds."""
    deadline = time.monotonic() + wait_s
    store = _store(1.0)
    while True:
        for path in _sibling_error_files():
            line = _user_line_in(path)
            if line is not None:
                return line
        if store is not None:
            try:
                if store.check([_peer_key()]):
                    return store.get(_peer_key()).decode()
            except Exception:
                store = None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def report_user_error(prog: str, exc: BaseException, debug: bool) -> int:
    line = error_line(prog, exc)
    tb = traceback.format_exc() if debug else ""
    print(f"{tb}{line}", file=sys.stderr, flush=True)
    _write_error_file(line, f"{tb}{line}", int(time.time()) - 1, user=True)
    _publish(line)
    return 2


def run_cli(prog: str, body: Callable[[list[str]], int], argv: Sequence[str] | None) -> int:
    """Runs `body(args)` (args = argv or sys.argv[1:], without --debug) as described above;
    returns the exit code (an argparse SystemExit's too, so `main(argv)` always returns)."""
    debug, args = debug_requested(list(sys.argv[1:] if argv is None else argv))
    try:
        return body(args)
    except SystemExit as e:  # argparse's usage error (2, its line printed) or --help (0)
        if isinstance(e.code, int) or e.code is None:
            return e.code or 0
        raise
    except Exception as e:
        if is_user_error(e):
            return report_user_error(prog, e, debug)
        rank, world = _world()
        peer = _peer_line() if world > 1 else None
        if peer is None:
            tb = traceback.format_exc()
            _write_error_file(f"{type(e).__name__}: {e}", tb, int(time.time()))
            raise
        if debug:
            traceback.print_exc()
        print(peer, file=sys.stderr, flush=True)
        _write_error_file(f"rank {rank} stopped after another rank's error",
                          f"rank {rank} stopped after another rank's error: {peer}",
                          int(time.time()))
        return 1
