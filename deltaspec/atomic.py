"""The one writer of result files: atomic (a temporary file beside the target, then a rename), and
every ``OSError`` on the way — a folder in the way, ``/proc``, a full disk (``ENOSPC``/``EFBIG``),
no permission, a name too long — becomes one :class:`OutputError` naming the path and the reason.

Nothing is left behind on failure: not half a file, not the temporary file, not the folders
``parents=True`` created for it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from deltaspec.errors import OutputError

NAME_MAX = 255  # bytes of one path component on every common filesystem
_TMP_SUFFIX_BYTES = len(".") + 1 + 8 + len(".tmp")  # ".{name}.{8 hex}.tmp"


def this_rank_writes() -> bool:
    """False on the ranks other than 0 of a ``torchrun`` job: they hold the same result as rank 0,
    which alone writes every output (read from the launcher's environment; imports nothing).

    >>> this_rank_writes()
    True
    """
    env = os.environ
    rank = env.get("RANK", "0").strip()
    # a RANK that is no rank (garbage) speaks, so that its one-line error is seen
    return env.get("WORLD_SIZE", "1").strip() in ("", "1") or rank in ("", "0") or not rank.isdigit()


def output_error(path: str | Path, exc: OSError, what: str = "cannot write") -> OutputError:
    """The one-line error for an ``OSError`` met while writing ``path``."""
    reason = exc.strerror or type(exc).__name__
    return OutputError(f"{path}: {what} ({reason})")


def tmp_name(target: Path) -> str:
    """A hidden temporary name beside ``target`` that stays within 255 bytes."""
    raw = target.name.encode("utf-8", "surrogateescape")[: NAME_MAX - _TMP_SUFFIX_BYTES]
    stem = raw.decode("utf-8", "ignore") or "out"
    return f".{stem}.{secrets.token_hex(4)}.tmp"


def check_target(path: str | Path, option: str = "", parents: bool = False) -> Path:
    """``path`` as a Path, or a one-line error when it cannot be a file to write: an existing
    folder, a missing folder (unless ``parents``), a name over 255 bytes, a read-only folder."""
    target = Path(path)
    label = f"{option} {path}" if option else str(path)
    try:
        name = target.name.encode("utf-8", "surrogateescape")
        if not name or len(name) > NAME_MAX:
            raise OutputError(f"{label}: not a valid file name ({len(name)} bytes; at most "
                              f"{NAME_MAX})")
        if target.is_dir():
            raise OutputError(f"{label}: is a folder, not a file")
        parent = target.parent
        while parents and not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise OutputError(f"{label}: folder {target.parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"{label}: folder {parent} is not writable")
    except OSError as exc:
        raise output_error(label, exc) from None
    return target


@contextlib.contextmanager
def atomic_path(path: str | Path, *, parents: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.
    ``parents``: create missing folders first (removed again if writing fails). On a rank that
    does not write (:func:`this_rank_writes`) the path is a throwaway one."""
    if not this_rank_writes():
        with tempfile.TemporaryDirectory() as scratch:
            yield Path(scratch) / "out"
        return
    target = check_target(path, parents=parents)
    if _is_special(target):  # /dev/null, /dev/stdout, a FIFO: written in place, never replaced
        with _in_place(target) as same:
            yield same
        return
    created: list[Path] = []
    tmp: Path | None = None
    try:
        if parents:
            for d in reversed([target.parent, *target.parent.parents]):
                if not d.exists():
                    d.mkdir()
                    created.append(d)
        tmp = target.parent / tmp_name(target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the temporary file is private; outputs get the usual mode
        yield tmp
        os.replace(tmp, target)
        created.clear()
    except OSError as exc:
        raise output_error(path, exc) from None
    finally:
        if tmp is not None and os.path.lexists(tmp):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()


def _is_special(path: Path) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


@contextlib.contextmanager
def _in_place(target: Path) -> Iterator[Path]:
    try:
        if stat.S_ISFIFO(os.stat(target).st_mode):  # no reader: fail now rather than block
            os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK))
        yield target
    except OSError as exc:
        raise output_error(target, exc) from None


def write_atomic(path: str | Path, text: str, *, parents: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename: never half a file."""
    with atomic_path(path, parents=parents) as tmp:
        tmp.write_text(text, encoding="utf-8")
