"""The error types of deltaspec.

Every user-facing failure is a :class:`DeltaspecError` whose message is one line naming the file
or tensor and what is wrong. The CLI prints it as ``deltaspec: error: <message>`` and exits 2.
"""

from __future__ import annotations

import unicodedata

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\n``, ``\\x1b``,
    ``\\u2028``): whatever a tensor name or path holds, a message stays one printable line.

    >>> one_line("a\\nb\\x1b[31m")
    'a\\\\nb\\\\x1b[31m'
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp", "Co", "Cn"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                       else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


class DeltaspecError(Exception):
    """Base class of every error deltaspec raises on purpose (bad input, bad options); its
    message is always one line (see :func:`one_line`)."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(one_line(str(message)), *args)


class CheckpointError(DeltaspecError):
    """A checkpoint file or folder is missing, unreadable, corrupt or not of a known format."""


class ConfigError(DeltaspecError):
    """A configuration file (adapter_config.json, rules, baseline) is missing or invalid."""


class UnsupportedError(DeltaspecError):
    """A checkpoint uses a method or option deltaspec does not (yet) read."""


class ShapeError(DeltaspecError):
    """Tensors that must pair up (base vs fine-tuned, two updates) have different shapes."""


class NumericalError(DeltaspecError):
    """A tensor holds NaN or Inf values."""


class UsageError(DeltaspecError):
    """Options or arguments that do not fit together."""


class DeltaspecWarning(UserWarning):
    """Something the user should know that does not stop the analysis (the CLI prints one line)."""


class OutputError(DeltaspecError):
    """A result file or folder cannot be written (the path and the system's reason are named)."""
