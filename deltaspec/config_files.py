"""The one guarded reader of configuration files: JSON and TOML, bounded in size, depth and numbers.

Adapter configs, index files, baselines and rules files all come through :func:`parse_json_file`
or :func:`parse_toml_file`. Whatever the bytes, the result is a ``dict`` or a one-line
:class:`ConfigError` naming the file: no ``RecursionError`` (nesting is bounded before and after
parsing), no ``OverflowError`` later on (``1e999``, ``NaN`` and integers of more than 20 digits
are refused), no hang on a FIFO or ``/dev/zero`` (only regular files are read, and at most
``max_bytes`` of them), invalid UTF-8 named as such.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from deltaspec.errors import CheckpointError, ConfigError

MAX_BYTES = 64 << 20  # configs, indexes, rules: far above any real one (a 600B MoE index ≈ 10 MB)
MAX_DEPTH = 64  # real configs nest 3–5 levels
MAX_INT_DIGITS = 20  # 2⁶⁴ has 20 digits
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_TOML_STRINGS = re.compile(rb'"""(?:[^\\]|\\.)*?"""|\'\'\'.*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*',
                           re.S)


def why(exc: BaseException) -> str:
    """The first line of an exception's message, trimmed: errors stay one line."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def read_bounded(path: Path, max_bytes: int = MAX_BYTES, hint: str = "") -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, or a one-line error naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file{hint}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or why(exc)})"
                          f"{hint}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file{hint}")
        if info.st_size > max_bytes:
            raise ConfigError(f"{path}: {info.st_size} bytes, more than the {max_bytes >> 20} MiB "
                              f"a configuration file may have{hint}")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or why(exc)}){hint}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ConfigError(f"{path}: more than the {max_bytes >> 20} MiB a configuration file may have")
    return data


def _decode(path: Path, data: bytes, hint: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start}){hint}") from None


def _bracket_depth(data: bytes, strings: re.Pattern[bytes]) -> int:
    """The deepest bracket nesting of ``data`` outside strings (and comments), in linear time."""
    import numpy as np

    brackets = strings.sub(b"", data).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("]")) | (codes == ord("}")), -1, 1)
    return int(np.cumsum(steps).max())


def _dotted_depth(data: bytes) -> int:
    """The most segments of one TOML key (``a.b.c = …`` or ``[a.b.c]``): they nest tables too."""
    deepest = 0
    for line in _TOML_STRINGS.sub(b'""', data).splitlines():
        key = line if line.lstrip().startswith(b"[") else line.split(b"=", 1)[0]
        deepest = max(deepest, key.count(b".") + 1)
    return deepest


def _tree_depth(obj: Any) -> int:
    """The nesting depth of parsed containers, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def _check_tree(path: Path, obj: Any, kind: str, hint: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a {kind} object at the top, not {type(obj).__name__}"
                          f"{hint}")
    if _tree_depth(obj) > MAX_DEPTH:
        raise ConfigError(f"{path}: nested more than {MAX_DEPTH} levels deep{hint}")
    return obj


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:30]} is out of range")
    return value


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits is out of range")
    return int(text)


def _no_constant(text: str) -> float:
    raise ValueError(f"non-finite number {text} is not allowed")


def parse_json_file(path: str | Path, what: str = "valid JSON", hint: str = "",
                    max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """A JSON object file as a dict, or a one-line error naming it (``what``: the kind of file the
    error says it is not; ``hint``: how to get a good one)."""
    p = Path(path)
    data = read_bounded(p, max_bytes, hint)
    if _bracket_depth(data, _STRINGS) > MAX_DEPTH:
        raise ConfigError(f"{p}: not {what} (nested more than {MAX_DEPTH} levels deep){hint}")
    try:
        obj = json.loads(_decode(p, data, hint), parse_float=_number, parse_int=_integer,
                         parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{p}: not {what} ({why(exc)}){hint}") from None
    return _check_tree(p, obj, "JSON", hint)


def parse_toml_file(path: str | Path, what: str = "valid TOML", max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """A TOML file as a dict, or a one-line error naming it (same bounds as JSON)."""
    p = Path(path)
    data = read_bounded(p, max_bytes)
    text = _decode(p, data, "")
    if max(_bracket_depth(data, _TOML_STRINGS), _dotted_depth(data)) > MAX_DEPTH:
        raise ConfigError(f"{p}: not {what} (nested more than {MAX_DEPTH} levels deep)")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError(f"{p}: reading TOML needs Python ≥ 3.11 or the tomli package; "
                              "or write it as JSON") from None
    try:
        obj = tomllib.loads(text, parse_float=_number)
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError is a ValueError
        raise ConfigError(f"{p}: not {what} ({why(exc)})") from None
    _check_toml_numbers(p, obj)
    return _check_tree(p, obj, "TOML", "")


def _check_toml_numbers(path: Path, obj: Any) -> None:
    """TOML's inf/nan literals and huge integers bypass ``parse_float``: refuse them here."""
    stack = [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"{path}: non-finite number {node} is not allowed")
        elif isinstance(node, int) and not isinstance(node, bool) and abs(node) >= 10 ** MAX_INT_DIGITS:
            raise ConfigError(f"{path}: integer of more than {MAX_INT_DIGITS} digits is out of range")
