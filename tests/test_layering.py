"""The import graph follows the data flow: no circle between modules, no arrow upwards.

Layers, lowest first (a module imports only its own layer or lower ones):

    data_pipes                      raw files -> Parquet -> Batch; never imports genci_dist
    genci_dist.config_loader        TOML -> typed dataclasses, no project imports
    genci_dist.errors               one-line errors of every CLI (by class name, no imports)
    genci_dist.tokenizer            embeddings -> RQ-VAE -> semantic ids, cohorts, trie
    genci_dist.model                modules built from plain config objects
    genci_dist.runtime, .config     process group, sharding, checkpoints, loops; the job config
    genci_dist.analysis, .bench     read finished runs / measure the runtime
    genci_dist.train, .evaluate     thin entry points

Every import counts, including the ones inside functions (a lazy import is still an arrow).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("genci_dist", "data_pipes")

LAYERS: list[tuple[str, ...]] = [
    ("data_pipes",),
    # the package root only sets the OpenMP default (via data_pipes); matched exactly, so a
    # new genci_dist module still has to be given a layer
    ("genci_dist.config_loader", "genci_dist.errors", "=genci_dist"),
    ("genci_dist.tokenizer",),
    ("genci_dist.model",),
    ("genci_dist.runtime", "genci_dist.config"),
    ("genci_dist.analysis", "genci_dist.bench"),
    ("genci_dist.train", "genci_dist.evaluate"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in `path` (resolved to the longest known name)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(p, known) - {m} for m, p in mods.items()}


def _layer(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if p.startswith("="):
                if module == p[1:]:
                    return i
                continue
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank < 0:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")
    return rank


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle() -> None:
    assert _cycles(_graph()) == []


def test_no_upward_import() -> None:
    upward = [f"{a} -> {b}" for a, deps in _graph().items() for b in deps
              if a.rpartition(".")[0] != b and not a.startswith(b + ".")
              and _layer(b) > _layer(a)]
    assert upward == []


def test_model_never_touches_torch_distributed() -> None:
    """DESIGN: models are built from plain configs; DMP shards their tables from outside."""
    offenders = []
    for m, p in _modules().items():
        if m.startswith("genci_dist.model"):
            for node in ast.walk(ast.parse(p.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{m}: {n}" for n in names if n.startswith("torch.distributed")]
    assert offenders == []


def test_the_checker_finds_a_circle_and_an_upward_arrow() -> None:
    """The rules above can fail: a made-up graph with both defects is caught."""
    graph = {"data_pipes.a": {"genci_dist.model.x"}, "genci_dist.model.x": {"data_pipes.a"}}
    assert _cycles(graph) == [["data_pipes.a", "genci_dist.model.x"]]
    assert _layer("genci_dist.model.x") > _layer("data_pipes.a")


def test_every_module_imports() -> None:
    """Each module imports on its own in a fresh interpreter (catches a stale path after a move)."""
    mods = sorted(m for m in _modules() if not m.endswith("__main__"))
    code = f"import importlib\nfor m in {mods!r}:\n    importlib.import_module(m)\n"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)
