"""The command line's shared options, declared once, and their one mapping to
:class:`deltaspec.options.Options`.

Every command that analyses (analyze, compare, report, snapshot, check) takes
:func:`analysis_options`: ``--base``, ``--no-base-discovery``, ``--revision``, ``--include``,
``--top-k``, ``--k``, ``--device``, ``--intruders/--no-intruders``, ``--allow-modified-base``,
``--lora-alpha``, ``--mtl-temperature``, ``--merge-dtype``, ``--alpha/--no-alpha``,
``-q``; a command may change a help text or a default (``check`` reads K and top-K from its
baseline) but not a name. A command that writes one file takes ``-o/--output FILE``, one that
writes a folder ``--out DIR``; ``--format`` defaults to the extension of ``--output`` (.json,
.csv), else ``table``. Older spellings stay as hidden aliases. Nothing here imports torch, numpy
or pandas: ``--help`` and argument errors stay fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from deltaspec.errors import UsageError, one_line
from deltaspec.options import MERGE_DTYPES, Options
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

# name → (parameter declarations, click.option keyword arguments)
ANALYSIS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "base": (("--base",), dict(
        default=None, metavar="DIR|ID",
        help="Base model folder or Hub id org/name[@rev] (needed for full checkpoints and DoRA; "
             "enables relative_norm, amplification and, with --intruders, intruders). Default: "
             "the base_model_name_or_path of the adapter's config, when it resolves.")),
    "no_base_discovery": (("--no-base-discovery",), dict(
        is_flag=True, help="Without --base, do not use the base the adapter's config names.")),
    "revision": (("--revision",), dict(
        default=None, metavar="REV",
        help="Revision (branch, tag or commit) of the Hub ids given without @REV (not --base: "
             "write org/name@REV there).")),
    "include": (("--include",), dict(
        default=None, metavar="REGEX",
        help="Only modules whose name matches this regular expression.")),
    "top_k": (("--top-k", "top_k"), dict(
        type=click.IntRange(min=1), default=None,
        help="Take every spectral metric over the top K singular values only.")),
    "k": (("--k", "k"), dict(
        type=click.IntRange(min=1), default=8, show_default=True,
        help="Subspace dimension K for similarity and amplification.")),
    "device": (("--device",), dict(
        type=DEVICE, default="auto", show_default=True,
        help="auto (CUDA when present), cpu, cuda or cuda:N.")),
    "intruders": (("--intruders/--no-intruders",), dict(
        default=False, show_default=True,
        help="Count intruder dimensions (with --base). Costs a full decomposition of every base "
             "matrix: slow on large models, hence off by default.")),
    "allow_modified_base": (("--allow-modified-base",), dict(
        is_flag=True, help="Read PiSSA/OLoRA/LoftQ/… adapters although s·B·A is not their update.")),
    "lora_alpha": (("--lora-alpha",), dict(
        type=click.FloatRange(min=0, min_open=True), default=None, metavar="A",
        help="LoRA α of checkpoints that do not save it (the MTL-LoRA code base's "
             "final_checkpoint.pt); without it their norms are reported with α/r = 1.")),
    "mtl_temperature": (("--mtl-temperature",), dict(
        type=click.FloatRange(min=0, min_open=True), default=None, metavar="T",
        help="MTL-LoRA's softmax temperature over its lora_B heads (not saved; default 1.0, "
             "the code base's default).")),
    "merge_dtype": (("--merge-dtype",), dict(
        type=click.Choice(MERGE_DTYPES), default="bfloat16", show_default=True,
        help="With --base: the dtype W + ΔW is stored in for lost_in_bf16 and bf16_merge_error.")),
    "alpha": (("--alpha/--no-alpha",), dict(
        default=False, show_default=True,
        help="Heavy-tail α of ΔW's spectral density (and of W's with --base; a values-only "
             "decomposition of each base matrix), as WeightWatcher fits it.")),
    "quiet": (("-q", "--quiet"), dict(is_flag=True, help="No progress bar or notes on stderr.")),
}


def _apply(f: Callable[..., Any], decorators: Sequence[Callable[[Any], Any]]) -> Callable[..., Any]:
    for dec in reversed(decorators):
        f = dec(f)
    return f


def analysis_options(**overrides: dict[str, Any]) -> Decorator:
    """The shared analysis options; ``overrides``: name → click keyword arguments to change
    (e.g. ``k={"default": None, "help": …}``)."""
    unknown = set(overrides) - set(ANALYSIS)
    assert not unknown, f"not a shared option: {unknown}"

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        decs = [click.option(*decls, **(kw | overrides.get(name, {})))
                for name, (decls, kw) in ANALYSIS.items()]
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
    """The parsed shared options → :class:`Options` (the one mapping)."""
    fields = dict(top_k=kw.get("top_k"), k=kw.get("k") or 8, device=kw.get("device", "auto"),
                  intruders=bool(kw.get("intruders")), include=kw.get("include"),
                  allow_modified_base=bool(kw.get("allow_modified_base")), progress=progress(kw),
                  discover_base=not kw.get("no_base_discovery"), revision=kw.get("revision"),
                  lora_alpha=kw.get("lora_alpha"), mtl_temperature=kw.get("mtl_temperature"),
                  merge_dtype=kw.get("merge_dtype") or "bfloat16", heavy_tail=bool(kw.get("alpha")))
    return Options(**(fields | changes))


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
