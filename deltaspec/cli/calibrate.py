"""``deltaspec calibrate``: the CPU solver choice this machine uses, and measuring it again.

No math here: :func:`deltaspec.engine.solvers.describe` says what is cached and why,
:func:`deltaspec.engine.solvers.recalibrate` measures (see :mod:`deltaspec.engine.calibration`
for why a busy machine cannot poison it).
"""

from __future__ import annotations

from typing import Any

import click

from deltaspec.cli.options import emit, format_option, output_file_option, take, writable

CANDIDATE_COLUMNS = ["candidate", "wall_s", "cpu_s"]


def _text(info: dict[str, Any]) -> str:
    """The table format: machine, libraries, the policy and why, the measured candidates."""
    from deltaspec.output import fmt_number, text_table

    pol, entry = info["policy"], info.get("entry") or {}
    lines = [f"machine:  {info['cpu']} ({' '.join(info['flags']) or 'no AVX flags read'})",
             "BLAS:     " + ", ".join(f"{k} {v}" for k, v in info["blas"].items()),
             f"routes:   values={pol['values']}, vectors={pol['vectors']}, "
             f"fallback={pol['fallback']} ({pol['source']}{': ' + pol['note'] if pol['note'] else ''})",
             f"rule:     values={info['rule']['values']}, vectors={info['rule']['vectors']}",
             f"cache:    {info['cache_file']}"]
    if entry.get("stale"):
        lines.append(f"stale:    {entry['stale']} (measured again at the next run)")
    rows = _rows(entry)
    if rows:
        other = entry.get("seconds", {}).get("other_cores")
        lines += ["", f"measured on a {entry.get('size')}² Gram (best of "
                      f"{entry.get('seconds', {}).get('rounds', '?')} interleaved rounds; other "
                      f"work on the machine meanwhile: {fmt_number(other)} cores):",
                  text_table(CANDIDATE_COLUMNS, [[r["candidate"], fmt_number(r["wall_s"]),
                                                  fmt_number(r["cpu_s"])] for r in rows], left=1)]
    return "\n".join(lines) + "\n"


def _rows(entry: dict[str, Any]) -> list[dict[str, Any]]:
    seconds = entry.get("seconds") or {}
    cpu = seconds.get("cpu") or {}
    return [{"candidate": name, "wall_s": float(t), "cpu_s": cpu.get(name)}
            for name, t in seconds.items() if name in cpu and isinstance(t, (int, float))]


@click.command("calibrate")
@click.option("--redo", is_flag=True,
              help="Measure the candidates again now (a few seconds; rejected, and the "
                   "documented rule used, when other work loads the machine meanwhile).")
@click.option("--size", type=click.IntRange(min=16), default=None, metavar="N",
              help="Gram side timed by --redo [default: 1024].")
@format_option("the choice")
@output_file_option("the choice")
def calibrate(redo: bool, size: int | None, **kw: Any) -> None:
    """Show the CPU solver routes deltaspec uses for large dense updates on this machine, why
    (measured, cached, or the documented rule after a rejected calibration), the BLAS/LAPACK
    each library uses, and the timed candidates; --redo measures them again.

    CSV rows are the candidates' best wall and CPU seconds; JSON holds everything.
    """
    from deltaspec.engine import solvers
    from deltaspec.output import Printable, Rows

    take(kw, "output")
    writable(kw.get("output"))
    if redo:
        solvers.recalibrate(size or solvers.CALIBRATE_N)
    info = solvers.describe()
    rows = Rows(_rows(info.get("entry") or {}), CANDIDATE_COLUMNS)
    emit(Printable(rows, table=lambda: _text(info), json=info), kw)


COMMANDS = [calibrate]
