"""The ``deltaspec`` command line: one click group, one module per family of commands.

Each module in ``_COMMAND_MODULES`` exposes ``COMMANDS``, a list of click commands. No math here:
commands parse options, call the library, and print. Every :class:`DeltaspecError` becomes one line
on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Any

import click

from deltaspec.errors import DeltaspecError, DeltaspecWarning, one_line

_COMMAND_MODULES = ("analyze", "report", "check", "train", "demo", "act", "verify", "zoo",
                    "trajectory", "calibrate")


def error_line(exc: BaseException) -> str:
    """The one line the CLI prints for an error: a DeltaspecError's message, or an ``OSError``
    that escaped the readers and writers as ``path: reason`` (escaped: always one line)."""
    if isinstance(exc, OSError) and not isinstance(exc, DeltaspecError):
        where = exc.filename if exc.filename is not None else "deltaspec"
        text = f"{where}: {exc.strerror or type(exc).__name__}"
    else:
        text = str(exc)
    return f"deltaspec: error: {one_line(text)}"


def usage_line(exc: click.UsageError) -> str:
    """A click usage error (unknown option, bad value, missing argument) as one line, with the
    command's ``--help`` named instead of the usage block click prints."""
    where = exc.ctx.command_path if exc.ctx is not None else "deltaspec"
    text = " ".join(exc.format_message().split()).rstrip(".")  # click's choice lists span lines
    return f"deltaspec: error: {one_line(text)} (see '{where} --help')"


# `deltaspec` alone prints its help through a UsageError subclass (click ≥ 8.2): not an error.
_HELP_ERRORS: tuple[type[BaseException], ...] = tuple(
    c for c in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if c is not None)


class _Group(click.Group):
    """A click group that turns DeltaspecError, a stray OSError, a usage error (and Ctrl-C) into
    a one-line message and exit 2."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except _HELP_ERRORS:
            raise
        except click.UsageError as exc:  # the group's own options: `deltaspec --bogus`
            click.echo(usage_line(exc), err=True)
            sys.exit(2)

    def invoke(self, ctx: click.Context) -> Any:
        from deltaspec.output import this_rank_writes

        if not this_rank_writes():  # torchrun: rank 0 alone prints (errors included) and writes
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
            if not os.environ.get("DELTASPEC_DIST_VERBOSE"):  # keep every rank's stderr
                sys.stderr = sys.stdout
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", DeltaspecWarning)
                warnings.showwarning = _note
                _SHOWN.clear()
                _PENDING.clear()
                try:
                    result = super().invoke(ctx)
                except click.exceptions.Exit:  # a verdict's own exit status (check: 1)
                    _flush()
                    raise
            _flush()
            return result
        except (DeltaspecError, OSError) as exc:  # the error alone: no warning before it
            click.echo(error_line(exc), err=True)
            ctx.exit(2)
        except _HELP_ERRORS:
            raise
        except click.UsageError as exc:  # a command's options and arguments
            click.echo(usage_line(exc), err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("deltaspec: interrupted", err=True)
            ctx.exit(130)


_SHOWN: set[str] = set()
_PENDING: list[str] = []  # "warning: …" lines, printed only when the command succeeds


def _flush() -> None:
    """Say the pending warnings: the command ran (an error says its one line alone)."""
    for message in _PENDING:
        click.echo(f"deltaspec: {message}", err=True)
    _PENDING.clear()


def _note(message: Warning | str, category: type[Warning], filename: str, lineno: int,
          file: Any = None, line: str | None = None) -> None:
    """deltaspec's own warnings (``note: …``, ``warning: …``) as one line on stderr; the
    libraries' own (torch's pickle-protocol notice, …) only with ``DELTASPEC_SHOW_WARNINGS=1``,
    so that an error stays one line."""
    if issubclass(category, DeltaspecWarning):
        ctx = click.get_current_context(silent=True)
        quiet = bool(ctx is not None and ctx.params.get("quiet"))
        if str(message) in _SHOWN or (quiet and str(message).startswith("note:")):
            return  # each said once; -q keeps the warnings, drops the notes
        _SHOWN.add(str(message))
        if str(message).startswith("warning:"):
            _PENDING.append(str(message))
        else:
            click.echo(f"deltaspec: {message}", err=True)
    elif os.environ.get("DELTASPEC_SHOW_WARNINGS"):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deltaspec")
def main() -> None:
    """deltaspec: what did this fine-tune actually change?

    Exact spectra of weight updates (LoRA, MultiLoRA, full fine-tunes), the metrics that describe
    them, comparisons between updates, reports and CI gates.
    """


for _name in _COMMAND_MODULES:
    for _command in importlib.import_module(f"deltaspec.cli.{_name}").COMMANDS:
        main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
