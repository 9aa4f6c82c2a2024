"""Gate spectral regressions inside your own test suite::

    from deltaspec.testing import assert_spectra_within

    def test_adapter_did_not_collapse():
        assert_spectra_within("runs/latest/adapter", "tests/baseline.json",
                              rules="tests/spectra.toml", normalized_entropy=">= 0.3")

The baseline comes from ``deltaspec snapshot`` (or :func:`deltaspec.gate.snapshot.take_snapshot` and
:func:`deltaspec.gate.snapshot.write_baseline`). The checks are those of ``deltaspec check``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from deltaspec.errors import UsageError
from deltaspec.gate.check import (
    FROM_BASELINE,
    METRICS,
    Baseline,
    Outcome,
    describe,
    load_rules_data,
    merge_rules,
    parse_rules,
    read_baseline,
    run_check,
)
from deltaspec.options import CORE_ONLY, Options


def given(options: Options | None) -> dict[str, Any]:
    """The fields of ``options`` a check passes on: every one, except those a baseline records
    (:data:`~deltaspec.gate.check.FROM_BASELINE`) left at their defaults.

    >>> sorted(given(Options(lora_alpha=2.0)))[:3]
    ['adapter_name', 'allow_modified_base', 'device']
    """
    if options is None:
        return {}
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(Options)
            if f.name not in CORE_ONLY
            and (f.name not in FROM_BASELINE or getattr(options, f.name) != f.default)}


_FLAGS = ("fail_on_new", "fail_on_rank_change", "ignore")
_SUBSPACE = {"min_similarity": "min_similarity", "subspace_k": "k", "subspace_sides": "sides"}


def rules_from_keywords(tolerances: dict[str, Any]) -> dict[str, Any]:
    """Keyword overrides → a rules object (the structure of a rules file).

    ``metric=0.02`` is an absolute tolerance; ``metric={"abs": …, "rel": …, "direction": …}`` a
    full one; ``metric=False`` turns the metric's check off; ``metric=">= 0.6"`` (or
    ``{"min": …, "max": …}`` given as ``bounds={...}``) a bound. ``min_similarity``,
    ``subspace_k``, ``subspace_sides``, ``ignore``, ``fail_on_new`` and ``fail_on_rank_change``
    set the rules of the same names.
    """
    out: dict[str, Any] = {"defaults": {}, "bounds": {}, "subspace": {}}
    for key, value in tolerances.items():
        if key in _SUBSPACE:
            out["subspace"][_SUBSPACE[key]] = value
        elif key in _FLAGS:
            out[key] = value
        elif key == "bounds":
            out["bounds"].update(value)
        elif key not in METRICS:
            raise UsageError(f"assert_spectra_within: unknown keyword {key!r} (metrics: "
                             f"{', '.join(METRICS)}; or {', '.join([*_SUBSPACE, *_FLAGS])})")
        elif isinstance(value, str):
            out["bounds"][key] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out["defaults"][key] = {"abs": value}
        else:
            out["defaults"][key] = value
    return {k: v for k, v in out.items() if v != {}}


def assert_spectra_within(path: str | Path, baseline: str | Path | Baseline,
                          base: str | Path | None = None,
                          rules: str | Path | dict[str, Any] | None = None, *,
                          options: Options | None = None, **tolerances: Any) -> Outcome:
    """Check the update at ``path`` against ``baseline``; raise AssertionError on a regression.

    Args:
        path: the adapter or checkpoint folder to check.
        baseline: a baseline file (from ``deltaspec snapshot``) or a loaded :class:`Baseline`.
        base: the base model folder, when the baseline was made with one.
        rules: a rules file (TOML/JSON) or the same structure as a dict; defaults otherwise.
        options: analysis options (:class:`~deltaspec.options.Options`), as ``deltaspec check``
            takes them: the fields left at their defaults that a baseline records (K, top-K,
            include, intruders) are the baseline's.
        **tolerances: overrides on top of ``rules`` (see :func:`rules_from_keywords`), e.g.
            ``top1_share=0.1``, ``fro_norm=False``, ``normalized_entropy=">= 0.3"``,
            ``min_similarity=0.7``.

    Returns:
        The :class:`~deltaspec.gate.check.Outcome` when every check passed.

    Raises:
        AssertionError: listing every failed check, one per line (module, metric, values, limit).
        DeltaspecError: unreadable input (adapter, baseline or rules).
    """
    __tracebackhide__ = True
    where = "rules"
    if isinstance(rules, str | Path):
        where, data = str(rules), load_rules_data(rules)
    else:
        data = dict(rules or {})
    parsed = parse_rules(merge_rules(data, rules_from_keywords(tolerances)), where)
    bl = baseline if isinstance(baseline, Baseline) else read_baseline(baseline)
    outcome = run_check(path, bl, parsed, base=base, **given(options))
    if not outcome.ok:
        lines = [f"  {c.module}: {c.message}" for c in outcome.failures]
        raise AssertionError(f"spectra of {path} regressed against {bl.path or 'the baseline'}:\n"
                             + "\n".join(lines) + "\n\n" + describe(outcome))
    return outcome
