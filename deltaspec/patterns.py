"""Regular expressions read from files (PEFT ``rank_pattern`` keys, rules ``ignore``), matched in
bounded time with Python's own semantics.

A pattern whose backtracking cost is at most quadratic in the name (no loop or alternation inside
a loop, at most two loops in all) runs on :mod:`re` itself. Any other pattern — ``(a+)+$``, ``(.*)*x``,
``.*.*.*.*x`` — runs on a Thompson NFA built from :mod:`re`'s own parse tree: linear in the
name, and it accepts exactly the strings :mod:`re` accepts (acceptance does not depend on greedy vs
lazy). Such a pattern using back-references, look-arounds, atomic groups or possessive loops (no
linear-time equivalent) is a one-line :class:`ConfigError` naming the key.

>>> peft_match("q_proj", "model.layers.0.self_attn.q_proj")
True
>>> peft_match("(a|aa)+$", "a" * 40 + "!")  # catastrophic for re, linear here
False
"""

from __future__ import annotations

import functools
import importlib
import re
import sys
from collections.abc import Callable
from typing import Any

from deltaspec.errors import ConfigError

# re's own parser: the NFA is built from the very tree re compiles (3.11 moved it into re/)
C: Any = importlib.import_module("re._constants" if sys.version_info >= (3, 11) else "sre_constants")
P: Any = importlib.import_module("re._parser" if sys.version_info >= (3, 11) else "sre_parse")

MAX_STATES = 20_000  # NFA size bound: x{1000}{1000} is refused, not expanded
MAX_PATTERN = 2_000  # characters of one pattern
MAX_NAME = 4_096  # characters of one name matched
_LOOPS = (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", C.MAX_REPEAT))
_NONREGULAR = {C.GROUPREF, C.GROUPREF_EXISTS, C.ASSERT, C.ASSERT_NOT,
               getattr(C, "ATOMIC_GROUP", None), getattr(C, "POSSESSIVE_REPEAT", None)} - {None}


def peft_match(key: str, name: str, where: str = "pattern") -> bool:
    """``re.match(rf"(.*\\.)?({key})$", name)`` is not None, in bounded time (PEFT's rule)."""
    return _compiled(rf"(.*\.)?({key})$", where, key)(_name(name, where), "match")


def search(pattern: str, name: str, where: str = "pattern") -> bool:
    """``re.search(pattern, name)`` is not None, in bounded time."""
    return _compiled(pattern, where, pattern)(_name(name, where), "search")


def fullmatch(pattern: str, name: str, where: str = "pattern") -> bool:
    """``re.fullmatch(pattern, name)`` is not None, in bounded time.

    >>> fullmatch("(a?){30}a{30}", "a" * 30), fullmatch(".*mlp.*", "model.layers.0.mlp.up_proj")
    (True, True)
    """
    return _compiled(pattern, where, pattern)(_name(name, where), "full")


def _name(name: str, where: str) -> str:
    if len(name) > MAX_NAME:
        raise ConfigError(f"{where}: a name of {len(name)} characters is longer than {MAX_NAME}: "
                          "too long to match")
    return name


def check(pattern: str, where: str, key: str | None = None) -> None:
    """Raise a one-line ConfigError naming ``key`` unless ``pattern`` can be matched safely."""
    _compiled(pattern, where, pattern if key is None else key)


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str, where: str, key: str) -> Callable[[str, str], bool]:
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN:
        raise ConfigError(f"{where}: pattern {key!r:.100} is not a string of at most "
                          f"{MAX_PATTERN} characters")
    try:
        rx = re.compile(pattern)
        tree = P.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid regular expression {key!r:.100} ({exc})") from None
    loops, nested, nonregular = _shape(tree)
    if not nested and loops <= 2:
        return lambda s, how: getattr(rx, how if how != "full" else "fullmatch")(s) is not None
    if nonregular:
        raise ConfigError(f"{where}: key {key!r:.100} nests repetitions and uses a "
                          "back-reference or look-around: it cannot be matched in bounded time")
    nfa = _Nfa(rx.flags)
    try:
        nfa.start = nfa.seq(list(tree), nfa.add("match"))
    except _TooBig:
        raise ConfigError(f"{where}: key {key!r:.100} expands to more than {MAX_STATES} "
                          "states: too large to match") from None
    return nfa.run


def _shape(tree: Any) -> tuple[int, bool, bool]:
    """(loops, a loop or alternation inside a loop, uses non-regular constructs) of a parse tree."""
    loops, nested, nonregular = 0, False, False
    stack: list[tuple[Any, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        for op, av in node:
            nonregular |= op in _NONREGULAR
            nested |= op is C.BRANCH and depth > 0  # (a|aa)+: ambiguous alternatives in a loop
            inner = depth
            if op in _LOOPS and (av[0], av[1]) != (1, 1):  # a?, a*, a{2,3}, a{30}: every repeat
                loops, nested, inner = loops + 1, nested or depth > 0, depth + 1
            for child in _children(op, av):
                stack.append((child, inner))
    return loops, nested, nonregular


def _children(op: Any, av: Any) -> list[Any]:
    if op is C.BRANCH:
        return list(av[1])
    if op in _LOOPS:
        return [av[2]]
    if op is C.SUBPATTERN:
        return [av[3]]
    if op in (C.ASSERT, C.ASSERT_NOT):
        return [av[1]]
    if op is getattr(C, "ATOMIC_GROUP", None):
        return [av]
    if op is C.GROUPREF_EXISTS:
        return [p for p in av[1:] if p is not None]
    return []


class _TooBig(Exception):
    pass


def _is_word(ch: str, ascii_only: bool) -> bool:
    return (ch.isascii() or not ascii_only) and (ch.isalnum() or ch == "_")


_CATEGORIES: dict[Any, Callable[[str, bool], bool]] = {
    C.CATEGORY_DIGIT: lambda c, a: (c.isascii() or not a) and c.isdecimal(),
    C.CATEGORY_NOT_DIGIT: lambda c, a: not ((c.isascii() or not a) and c.isdecimal()),
    C.CATEGORY_SPACE: lambda c, a: c.isspace() and (c.isascii() or not a),
    C.CATEGORY_NOT_SPACE: lambda c, a: not (c.isspace() and (c.isascii() or not a)),
    C.CATEGORY_WORD: _is_word,
    C.CATEGORY_NOT_WORD: lambda c, a: not _is_word(c, a),
}


class _Nfa:
    """Instructions: ("char", pred, next) | ("split", a, b) | ("at", code, next) | ("match",)."""

    def __init__(self, flags: int) -> None:
        self.prog: list[list[Any]] = []
        self.flags = flags
        self.start = 0

    def add(self, *ins: Any) -> int:
        if len(self.prog) >= MAX_STATES:
            raise _TooBig
        self.prog.append(list(ins))
        return len(self.prog) - 1

    def seq(self, items: list[Any], nxt: int, flags: int | None = None) -> int:
        """Compile ``items`` (ops of a parse tree) to run before ``nxt``; return the entry."""
        flags = self.flags if flags is None else flags
        for op, av in reversed(items):
            nxt = self.one(op, av, nxt, flags)
        return nxt

    def one(self, op: Any, av: Any, nxt: int, flags: int) -> int:
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
            return self.add("char", _predicate(op, av, flags), nxt)
        if op is C.AT:
            return self.add("at", (av, flags), nxt)
        if op is C.SUBPATTERN:
            return self.seq(list(av[3]), nxt, (flags | av[1]) & ~av[2])
        if op is C.BRANCH:
            entries = [self.seq(list(alt), nxt, flags) for alt in av[1]]
            entry = entries[-1]
            for e in reversed(entries[:-1]):
                entry = self.add("split", e, entry)
            return entry
        if op in _LOOPS:
            lo, hi, body = av
            if hi == C.MAXREPEAT:
                loop = self.add("split", -1, nxt)
                self.prog[loop][1] = self.seq(list(body), loop, flags)
                nxt = loop
            else:
                for _ in range(hi - lo):
                    nxt = self.add("split", self.seq(list(body), nxt, flags), nxt)
            for _ in range(lo):
                nxt = self.seq(list(body), nxt, flags)
            return nxt
        raise _TooBig  # unreachable: non-regular ops are refused before

    def run(self, s: str, how: str) -> bool:
        """Whether the program matches ``s`` from the start (``how``: "match"), at some position
        ("search") or as a whole ("full")."""
        current: set[int] = set()
        anywhere = how == "search"
        for i in range(len(s) + 1):
            if anywhere or i == 0:
                current.add(self.start)
            closed = self._closure(current, s, i)
            if "match" in closed and (how != "full" or i == len(s)):
                return True
            ch = s[i] if i < len(s) else None
            current = {self.prog[pc][2] for pc in closed if pc != "match" and ch is not None
                       and self.prog[pc][1](ch)}
            if not current and not anywhere:
                return False
        return False

    def _closure(self, pcs: set[int], s: str, i: int) -> set[Any]:
        out: set[Any] = set()
        seen: set[int] = set()
        stack = list(pcs)
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            ins = self.prog[pc]
            if ins[0] == "match":
                out.add("match")
            elif ins[0] == "split":
                stack += [ins[1], ins[2]]
            elif ins[0] == "at":
                if _at(ins[1][0], ins[1][1], s, i):
                    stack.append(ins[2])
            else:
                out.add(pc)
        return out


def _predicate(op: Any, av: Any, flags: int) -> Callable[[str], bool]:
    ic, dotall, ascii_only = flags & re.I, flags & re.S, bool(flags & re.A)
    fold = (lambda c: {c, c.lower(), c.upper()}) if ic else (lambda c: {c})
    if op is C.ANY:
        return (lambda c: True) if dotall else (lambda c: c != "\n")
    if op in (C.LITERAL, C.NOT_LITERAL):
        want = fold(chr(av))
        hit = lambda c: bool(fold(c) & want)  # noqa: E731
        return hit if op is C.LITERAL else (lambda c: not hit(c))
    negate = any(o is C.NEGATE for o, _ in av)
    tests: list[Callable[[str], bool]] = []
    for o, a in av:
        if o is C.LITERAL:
            tests.append(functools.partial(_overlaps, fold, fold(chr(a))))
        elif o is C.RANGE:
            tests.append(functools.partial(_in_range, fold, a[0], a[1]))
        elif o is C.CATEGORY:
            tests.append(functools.partial(_in_category, _CATEGORIES[a], ascii_only))
    return lambda c: any(t(c) for t in tests) != negate


def _in_range(fold: Callable[[str], set[str]], lo: int, hi: int, c: str) -> bool:
    return any(lo <= ord(x) <= hi for x in fold(c))


def _in_category(test: Callable[[str, bool], bool], ascii_only: bool, c: str) -> bool:
    return test(c, ascii_only)


def _overlaps(fold: Callable[[str], set[str]], want: set[str], c: str) -> bool:
    return bool(fold(c) & want)


def _at(code: Any, flags: int, s: str, i: int) -> bool:
    n, multi = len(s), flags & re.M
    if code is C.AT_BEGINNING:
        return i == 0 or bool(multi and s[i - 1] == "\n")
    if code is C.AT_BEGINNING_STRING:
        return i == 0
    if code is C.AT_END:
        return i == n or (i == n - 1 and s[i] == "\n") or bool(multi and i < n and s[i] == "\n")
    if code is C.AT_END_STRING:
        return i == n
    ascii_only = bool(flags & re.A)
    before = i > 0 and _is_word(s[i - 1], ascii_only)
    after = i < n and _is_word(s[i], ascii_only)
    return (before != after) == (code is C.AT_BOUNDARY)
