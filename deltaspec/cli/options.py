"""The command line's shared options, generated from the metadata of
:class:`deltaspec.options.Options` (each field's flag, help, value kind and commands: see
:func:`deltaspec.options.flag`), and their one mapping back (:func:`to_options`).

Every command that analyses (analyze, compare, report, snapshot, check, trajectory) takes
:func:`analysis_options`: ``--base`` and ``-q`` (declared here: a source and an output setting,
not options of the analysis) and one flag per :class:`~deltaspec.options.Options` field that has
one (``--top-k``, ``--k``, ``--device``, ``--intruders/--no-intruders``, ``--include``,
``--allow-modified-base``, ``--lora-alpha``, ``--mtl-temperature``, ``--no-base-discovery``,
``--revision``, ``--merge-dtype``, ``--alpha/--no-alpha``, …). The commands that read updates
without a metric table (zoo, compress, extract, verify-merge) call ``analysis_options(name)``
and get the fields whose ``commands`` name them (the load options:
:data:`deltaspec.options.LOADING`). A command may change a help text or a default (``check``
reads K and top-K from its baseline) but not a name. A command that writes one file takes
``-o/--output FILE``, one that writes a folder ``--out DIR``; ``--format`` defaults to the
extension of ``--output`` (.json, .csv), else ``table``. Older spellings stay as hidden aliases.
Nothing here imports torch, numpy or pandas: ``--help`` and argument errors stay fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from deltaspec.errors import UsageError, one_line
from deltaspec.options import Options, cli_fields, dest, from_flags
from deltaspec.output import FORMATS

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class DeviceType(click.ParamType):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked by spelling (no torch import: an
    argument error stays fast); whether CUDA is there is checked when the device is used."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        kind, _, index = text.partition(":")
        if text in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit()):
            return text
        self.fail(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N", param, ctx)


DEVICE = DeviceType()

# The click type of each value kind of :func:`deltaspec.options.flag`
KINDS: dict[str, dict[str, Any]] = {
    "count": dict(type=click.IntRange(min=1)),
    "positive": dict(type=click.FloatRange(min=0, min_open=True)),
    "device": dict(type=DEVICE),
    "flag": dict(is_flag=True),
    "switch": {},
    "choice": {},  # click.Choice of the field's choices (see _declared)
    "text": {},
}

# Shared arguments that are not Options: the base is a source of the request, -q is output
BASE: tuple[tuple[str, ...], dict[str, Any]] = (("--base",), dict(
    default=None, metavar="DIR|ID",
    help="Base model folder or Hub id org/name[@rev] (needed for full checkpoints and DoRA; "
         "enables relative_norm, amplification and, with --intruders, intruders). Default: "
         "the base_model_name_or_path of the adapter's config, when it resolves."))
QUIET: tuple[tuple[str, ...], dict[str, Any]] = (
    ("-q", "--quiet"), dict(is_flag=True, help="No progress bar or notes on stderr."))


def _declared(command: str | None = None) -> dict[str, tuple[tuple[str, ...], dict[str, Any]]]:
    """name → (parameter declarations, click.option keyword arguments), generated from the
    metadata of :class:`~deltaspec.options.Options` (plus ``--base`` and ``-q``)."""
    out: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {"base": BASE}
    for f in cli_fields(command):
        meta = f.metadata
        kw = dict(KINDS[meta["kind"]], help=meta["help"], show_default=meta["show_default"])
        if meta["kind"] == "choice":
            kw["type"] = click.Choice(meta["choices"])
        if meta["kind"] != "flag":
            kw["default"] = f.default
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        out[dest(f)] = ((meta["decl"], dest(f)), kw)
    return out | {"quiet": QUIET}


ANALYSIS = _declared()


def _apply(f: Callable[..., Any], decorators: Sequence[Callable[[Any], Any]]) -> Callable[..., Any]:
    for dec in reversed(decorators):
        f = dec(f)
    return f


def analysis_options(command: str | None = None, **overrides: dict[str, Any]) -> Decorator:
    """The shared analysis options (those ``command`` takes; default: all); ``overrides``: name →
    click keyword arguments to change (e.g. ``k={"default": None, "help": …}``)."""
    unknown = set(overrides) - set(ANALYSIS)
    assert not unknown, f"not a shared option: {unknown}"

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        decs = [click.option(*decls, **(kw | overrides.get(name, {})))
                for name, (decls, kw) in _declared(command).items()]
        return _apply(f, decs)

    return deco


def format_option(what: str = "the results", from_output: bool = True) -> Decorator:
    """``--format``: default from ``--output``'s extension, else table (``from_output=False``:
    a command that writes a folder, not one file — table)."""
    default = "from the extension of --output (.json, .csv), else table" if from_output else "table"
    return click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
                        help=f"How to print {what} [default: {default}].")


def output_file_option(what: str = "the results", required: bool = False,
                       alias: str | None = None) -> Decorator:
    """``-o/--output FILE`` (and a hidden alias, e.g. snapshot's old ``--out FILE``)."""
    decs = [click.option("-o", "--output", "output", default=None, metavar="FILE",
                         help=f"Write {what} to FILE (atomically)"
                              + (" [required]." if required else " instead of stdout."))]
    if alias:
        decs.append(click.option(alias, "output_alias", default=None, hidden=True))
    return lambda f: _apply(f, decs)


def output_dir_option(what: str, alias: str | None = "-o") -> Decorator:
    """``--out DIR`` (and a hidden alias, e.g. report's old ``-o DIR``)."""
    decs = [click.option("--out", "out", default=None, metavar="DIR", help=what + " [required]")]
    if alias:
        decs.append(click.option(alias, "out_alias", default=None, hidden=True))
    return lambda f: _apply(f, decs)


def take(kw: dict[str, Any], name: str, required: bool = False) -> Any:
    """The value of option ``name`` given under its name or its hidden alias (not both)."""
    value, alias = kw.pop(name, None), kw.pop(f"{name}_alias", None)
    if value is not None and alias is not None and value != alias:
        raise UsageError(f"--{name} given twice ({value} and {alias})")
    value = value if value is not None else alias
    if required and value is None:
        raise UsageError(f"missing option --{name} (see --help)")
    kw[name] = value
    return value


def writable(path: str | None, option: str = "--output") -> None:
    """Refuse an output file whose folder does not exist, before any work is done."""
    if path:
        parent = Path(path).parent if str(Path(path).parent) else Path(".")
        if not parent.is_dir():
            raise UsageError(f"{option} {path}: folder {parent} does not exist")


def progress(kw: dict[str, Any]) -> bool:
    """Progress bars go to stderr, only when it is a terminal and -q is not given."""
    return not kw.get("quiet") and sys.stderr.isatty()


def to_options(kw: dict[str, Any], **changes: Any) -> Options:
    """The parsed shared options → :class:`Options`, by the fields' metadata
    (:func:`deltaspec.options.from_flags`); progress from ``-q`` and the terminal."""
    return from_flags(kw, **({"progress": progress(kw)} | changes))


def emit(what: Any, kw: dict[str, Any], notes: list[str] | None = None) -> None:
    """Print ``what`` (a frame or an :class:`~deltaspec.output.Printable`) in the chosen format,
    or write it to ``--output``; then notes and the table's hint on stderr unless -q."""
    from deltaspec.output import format_for, hint, render, write_atomic

    fmt = format_for(kw.get("fmt"), kw.get("output"))
    text = render(what, fmt)
    if kw.get("output"):
        write_atomic(kw["output"], text)
    else:
        click.echo(text, nl=False)
    if kw.get("quiet"):
        return
    for line in [*(notes or []), hint(what, fmt)]:
        if line:
            click.echo(one_line(line), err=True)  # a tensor name may hold a newline


__all__ = ["ANALYSIS", "analysis_options", "emit", "format_option", "output_dir_option",
           "output_file_option", "progress", "take", "to_options", "writable"]
