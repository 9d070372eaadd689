"""Typed configuration machinery: TOML tables and dotted CLI overrides → frozen dataclasses.

Precedence is CLI > TOML > dataclass defaults (torchtitan's JobConfig order). Every key is
checked against the dataclass it lands in: an unknown key or a value of the wrong type is a
`ConfigError` that names the file (or the CLI flag) and the dotted key, never a silent None.
Nothing is `eval`'d: values are parsed as TOML literals. Value ranges are checked by each
dataclass's `__post_init__` with `check_value` ("train.lr must be > 0, got -0.1"), so a config
object that exists is a valid one, however it was built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem; the message names the source and the dotted key."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Checks/converts one value to annotation `tp`; `where` names it in errors."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of {[_type_name(a) for a in args]}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table for section {tp.__name__}")
        return build_dataclass(tp, value, where)
    if origin in (tuple, list, Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        kt, vt = get_args(tp) or (str, Any)
        return {_convert(k, kt, where): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def build_dataclass(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Builds `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint}; known keys: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], dotted)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise  # a range check (`check_value`): its message names the dotted key already
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e
    return obj


def _bound_text(ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    parts = [f"{op} {b:g}" for op, b in ((">=", ge), (">", gt), ("<=", le), ("<", lt))
             if b is not None]
    return " and ".join(parts)


def check_value(key: str, value: float, *, ge: float | None = None, gt: float | None = None,
                le: float | None = None, lt: float | None = None) -> None:
    """A range check run when a config dataclass is built (its `__post_init__`): raises
    `ConfigError("train.lr must be > 0, got -0.1")`. Floats must also be finite."""
    bad = isinstance(value, float) and not math.isfinite(value)
    bad = bad or (ge is not None and not value >= ge) or (gt is not None and not value > gt)
    bad = bad or (le is not None and not value <= le) or (lt is not None and not value < lt)
    if bad:
        rule = _bound_text(ge, gt, le, lt)
        if isinstance(value, float) and not math.isfinite(value):
            rule = f"finite and {rule}" if rule else "finite"
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def check_each(key: str, values: Sequence[float], **bounds: float) -> None:
    """`check_value` on every element of a list setting: "model.mlp[1] must be >= 1, got 0"."""
    for i, v in enumerate(values):
        check_value(f"{key}[{i}]", v, **bounds)


def _parse_cli_value(text: str) -> Any:
    """Parses a CLI override as a TOML literal (`3`, `0.1`, `true`, `[1, 2]`, `"x"`), falling
    back to the bare string so `--data.dir data/ml-1m` needs no quotes."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """`["--train.lr", "0.001", "--model.name=din"]` → nested dict {"train": {"lr": 0.001}, ...}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"CLI: expected --section.key VALUE, got {arg!r}")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"CLI: {arg} needs a value")
            key, text = arg[2:], args[i + 1]
            i += 2
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"CLI: --{key} conflicts with an earlier override")
        node[leaf] = _parse_cli_value(text)
    return out


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: tables merge key by key, everything else in `top` replaces `base`."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """Reads a TOML file; `extends = "other.toml"` (relative to the file) layers it on another."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from e
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: extends must be a file name")
        data = merge(read_toml(path.parent / parent), data)
    return data


def to_plain(obj: Any) -> Any:
    """Dataclass → TOML-serialisable dict (tuples → lists, None dropped: TOML has no null)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if getattr(obj, f.name) is not None}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items() if v is not None}
    return obj
