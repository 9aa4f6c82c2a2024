"""The error types of deltaspec.

Every user-facing failure is a :class:`DeltaspecError` whose message is one line naming the file
or tensor and what is wrong. The CLI prints it as ``deltaspec: error: <message>`` and exits 2.
"""

from __future__ import annotations


class DeltaspecError(Exception):
    """Base class of every error deltaspec raises on purpose (bad input, bad options)."""


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
