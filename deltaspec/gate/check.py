"""CI regression gate: compare an update against a baseline snapshot, module by module.

``take_snapshot`` (:mod:`deltaspec.gate.snapshot`) and :func:`run_check` each make the one ``analyze``
pass (values and top-K vectors, no extra solves); :func:`compare` turns the two sets of records
into a list of :class:`Check` results. Nothing here raises on a regression: the caller decides
(the CLI exits 1, :func:`deltaspec.testing.assert_spectra_within` raises AssertionError).

A metric **passes** when ``|current − baseline| ≤ abs + rel·|baseline|`` — numpy ``isclose``
semantics, the two tolerances add — or, with ``direction = "down"``, when it did not *drop* by more
than that (``"up"``: did not *rise* by more). Defaults (each can be changed in the rules file, see
:mod:`deltaspec.gate.rules`):

==================  =====  =====  =====  ==================================================
metric              abs    rel    fails  what it catches
==================  =====  =====  =====  ==================================================
normalized_entropy  0.05   5 %    drop   the update concentrating on fewer directions
top1_share          0.15   30 %   rise   energy moving into the top direction
fro_norm            –      35 %   both   the size of the update (lr, steps, α) changing
subspace φ(K, K)    ≥ 0.5                the top-K left/right vectors moving (Hu et al. §7)
==================  =====  =====  =====  ==================================================

They were calibrated on the bundled reference (``deltaspec.reference``, r = 16 LoRA on a
64/176-wide model, quick runs), module by module: re-running the recipe with seeds 0, 1, 2 moved
normalized_entropy by ≤ 0.068, top1_share by ≤ 0.26 and fro_norm by ≤ 31 %, and these tolerances
raise no false alarm there (0 of 84 module comparisons for entropy and norm, 1 for top1_share);
scaling one singular direction up tenfold (entropy 0.39 → 0.19, top-1 share 0.38 → 0.98) and a
10× learning rate (fro_norm × 11) fail. ``effective_rank`` = exp(H) and ``stable_rank`` =
1/top1_share carry the same information and are not checked unless the rules name them.

φ(8, 8) is 1.00 for a same-seed re-run, 0.56–0.89 after training 4× longer and 0.24–0.57 after a
10× learning rate, so φ ≥ 0.5 flags a recipe that moved the update's directions. A *reseeded* run
finds other directions (0.34–0.63 on the output side, 0.10–0.24 on the input side, where chance is
K/d ≈ 0.13): teams that change seeds between runs lower ``[subspace] min_similarity`` or set it to
false. Structural changes are failures: a module of the baseline missing from the update, a changed
shape (its metrics are then not compared), and by default a changed rank_bound or method. Modules
absent from the baseline are warnings.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaspec import patterns
from deltaspec.errors import UsageError
from deltaspec.gate.rules import (
    DEFAULT_TOLERANCES,
    METRICS,
    Bound,
    Policy,
    Rules,
    Tolerance,
    load_rules,
    load_rules_data,
    merge_rules,
    parse_rules,
)
from deltaspec.gate.snapshot import (
    Baseline,
    ModuleRecord,
    like,
    read_baseline,
    records_from,
    run_analysis,
    similarity,
    take_snapshot,
    write_baseline,
)
from deltaspec.options import Options, make_options
from deltaspec.output import fmt_number as fmt
from deltaspec.plan import partner

# Options a check takes from its baseline unless given (the rest: the command's, as any command's)
FROM_BASELINE = ("k", "top_k", "include", "intruders")
_PHI_SLACK = 1e-3  # φ from float16-stored vectors is within ~1e-5; identical subspaces pass φ ≥ 1

__all__ = [
    "DEFAULT_TOLERANCES", "FROM_BASELINE", "METRICS", "Baseline", "Bound", "Check", "Outcome",
    "Policy", "Rules", "Tolerance", "check_options", "compare", "compare_module", "describe",
    "fmt", "load_rules", "load_rules_data",
    "merge_rules", "parse_rules", "read_baseline", "run_check", "take_snapshot", "to_dict",
    "write_baseline",
]


@dataclass(frozen=True)
class Check:
    """One comparison: ``metric`` of ``module`` (or ``present``/``shape``/``rank_bound``/…)."""

    module: str
    metric: str
    baseline: Any
    current: Any
    limit: str
    passed: bool
    message: str = ""


@dataclass
class Outcome:
    """Every check of one run, plus the modules that were new or ignored."""

    source: str
    baseline: str
    checks: list[Check]
    modules: list[str]
    new: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if not c.passed]

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.failures

    def by_module(self) -> dict[str, list[Check]]:
        """Module → its checks, in module order (modules with no checks get an empty list)."""
        out: dict[str, list[Check]] = {m: [] for m in self.modules}
        for c in self.checks:
            out.setdefault(c.module, []).append(c)
        return out

    def failed_modules(self) -> list[str]:
        """Modules with at least one failed check, in order."""
        return [m for m, cs in self.by_module().items() if any(not c.passed for c in cs)]


def _value(metrics: dict[str, Any], key: str) -> float | None:
    v = metrics.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _tolerance_check(name: str, metric: str, tol: Tolerance, ref: ModuleRecord,
                     cur: ModuleRecord) -> Check:
    y, x = _value(ref.metrics, metric), _value(cur.metrics, metric)
    if y is None or x is None:
        if metric not in cur.metrics:
            return Check(name, metric, y, None, "computed", False,
                         f"{metric} was not computed for the checked update (is --base missing?)")
        ok = (x is None) == (y is None)
        return Check(name, metric, y, x, "defined" if y is not None else "undefined", ok,
                     "" if ok else f"{metric} {fmt(x)} vs baseline {fmt(y)} (undefined on one side)")
    d, eps = tol.allowed(y), tol.slack(y)
    lo, hi = y - d, y + d
    if tol.direction == "down":
        ok, limit = x >= lo - eps, f"≥ {lo:.4g}"
    elif tol.direction == "up":
        ok, limit = x <= hi + eps, f"≤ {hi:.4g}"
    else:
        ok, limit = lo - eps <= x <= hi + eps, f"{lo:.4g} … {hi:.4g}"
    return Check(name, metric, y, x, limit, ok,
                 "" if ok else f"{metric} {fmt(x)} vs baseline {fmt(y)} (allowed {limit})")


def _bound_check(name: str, metric: str, bound: Bound, cur: ModuleRecord) -> Check:
    x = _value(cur.metrics, metric)
    parts = ([f"≥ {bound.min:g}"] if bound.min is not None else []) + (
        [f"≤ {bound.max:g}"] if bound.max is not None else [])
    limit = " and ".join(parts)
    if x is None:
        return Check(name, metric, None, None, limit, False, f"{metric} is undefined (bound {limit})")
    if bound.min is not None and x < bound.min:
        return Check(name, metric, None, x, limit, False, f"{metric} {fmt(x)} < {bound.min:g}")
    if bound.max is not None and x > bound.max:
        return Check(name, metric, None, x, limit, False, f"{metric} {fmt(x)} > {bound.max:g}")
    return Check(name, metric, None, x, limit, True)


def _subspace_checks(name: str, ref: ModuleRecord, cur: ModuleRecord, pol: Policy) -> list[Check]:
    if pol.min_similarity is None:
        return []
    out = []
    for side in pol.sides:
        metric, a, b = f"subspace_sim_{side}", getattr(ref, side), getattr(cur, side)
        if a is None and b is None:
            continue  # a zero update on both sides: no subspace to compare
        if a is None or b is None:
            which = "baseline" if a is None else "current"
            out.append(Check(name, metric, None, None, f"≥ {pol.min_similarity:g}", False,
                             f"{metric} is undefined: the {which} update of this module is zero"))
            continue
        kk = min(a.matrix.shape[1], b.matrix.shape[1], pol.subspace_k or a.matrix.shape[1])
        phi = similarity(a, like(a, b.matrix), kk)
        limit = f"φ({kk},{kk}) ≥ {pol.min_similarity:g}"
        ok = phi >= pol.min_similarity - _PHI_SLACK
        out.append(Check(name, metric, None, phi, limit, ok,
                         "" if ok else f"{metric} φ({kk},{kk}) = {phi:.3f} < {pol.min_similarity:g}"))
    return out


def _shape(s: tuple[int, int]) -> str:
    return f"{s[0]}×{s[1]}"


def compare_module(name: str, ref: ModuleRecord, cur: ModuleRecord, policy: Policy,
                   fail_on_rank_change: bool = True) -> list[Check]:
    """The checks of one module present on both sides."""
    if tuple(ref.shape) != tuple(cur.shape):
        a, b = _shape(ref.shape), _shape(cur.shape)
        return [Check(name, "shape", a, b, "unchanged", False,
                      f"shape changed from {a} to {b} (metrics not compared)")]
    out = []
    for attr in ("rank_bound", "method"):
        a, b = getattr(ref, attr), getattr(cur, attr)
        if a != b:
            out.append(Check(name, attr, a, b, "unchanged", not fail_on_rank_change,
                             f"{attr} changed from {a} to {b}"))
    out += [_tolerance_check(name, m, t, ref, cur) for m, t in policy.tolerances.items()]
    out += [_bound_check(name, m, b, cur) for m, b in policy.bounds.items()]
    return out + _subspace_checks(name, ref, cur, policy)


def compare(current: dict[str, ModuleRecord], baseline: Baseline, rules: Rules | None = None,
            source: str = "the checked update") -> Outcome:
    """Compare module records of the checked update with the baseline's (paired by name)."""
    rules = rules or Rules()
    find = partner(list(current))
    checks: list[Check] = []
    modules, ignored, seen = [], [], set()
    for name, ref in baseline.modules.items():
        if rules.ignored(name):
            ignored.append(name)
            continue
        modules.append(name)
        cur_name = find(name)
        if cur_name is None:
            checks.append(Check(name, "present", "yes", "no", "present", False,
                                f"module missing: in the baseline, not in {source}"))
            continue
        seen.add(cur_name)
        checks += compare_module(name, ref, current[cur_name], rules.policy(ref.kind),
                                 rules.fail_on_rank_change)
    new = [n for n in current if n not in seen and not rules.ignored(n)]
    if rules.fail_on_new:
        modules += new
        checks += [Check(n, "present", "no", "yes", "in the baseline", False,
                         "new module, not in the baseline (fail_on_new)") for n in new]
    kinds = {r.kind for r in baseline.modules.values()}
    notes = [f"rules name module kind {k!r}, which no module of the baseline has"
             for k in sorted(set(rules.kinds) - kinds)]
    return Outcome(source, baseline.path, checks, modules, new, ignored, notes)


def _checked_metrics(rules: Rules) -> set[str]:
    policies = [rules.default, *rules.kinds.values()]
    return {m for p in policies for m in (*p.tolerances, *p.bounds)}


def check_options(baseline: Baseline, rules: Rules | None = None, **changes: Any) -> Options:
    """The analysis options of a check: the baseline's (k, top_k, include), intruders when the
    rules check them, then ``changes`` (keyword :class:`Options` fields). A K or top-K other than
    the baseline's would compare different quantities: that is a usage error."""
    where = baseline.path or "the baseline"
    need = baseline.intruders and "intruders" in _checked_metrics(rules or Rules())
    make_options(changes, public=True)  # names and values are options' own
    opts = dataclasses.replace(Options(k=baseline.k, top_k=baseline.top_k,
                                       include=baseline.include, intruders=need), **changes)
    for name, flag in (("k", "--k"), ("top_k", "--top-k")):
        if getattr(opts, name) != getattr(baseline, name):
            raise UsageError(f"{flag} {getattr(opts, name)}: {where} was made with {name} = "
                             f"{getattr(baseline, name)}; check with the same (or snapshot again "
                             f"with {flag} {getattr(opts, name)})")
    return opts


def run_check(path: str | Path, baseline: Baseline | str | Path, rules: Rules | None = None,
              base: str | Path | None = None, **changes: Any) -> Outcome:
    """Analyse the update at ``path`` once (with :func:`check_options`) and compare it.

    Keyword ``changes`` (:class:`Options` fields, e.g. ``device="cpu"``, ``include="q_proj"``)
    change the baseline's analysis options; modules of the baseline that ``include`` leaves out
    are reported as ignored, not missing.
    """
    if not isinstance(baseline, Baseline):
        baseline = read_baseline(baseline)
    if baseline.base is not None and base is None:
        raise UsageError(f"{baseline.path or 'baseline'}: was made with --base {baseline.base}; "
                         "give --base to check as well")
    opts = check_options(baseline, rules, **changes)
    checked = baseline
    left_out: list[str] = []
    if opts.include and opts.include != baseline.include:
        kept = {n: r for n, r in baseline.modules.items() if patterns.search(opts.include, n, "include")}
        left_out = [n for n in baseline.modules if n not in kept]
        checked = dataclasses.replace(baseline, modules=kept)
    where = baseline.path or "baseline"
    if not baseline.modules:  # a gate that checks nothing must not pass
        what = f" with --include {baseline.include!r:.80}" if baseline.include else ""
        raise UsageError(f"{where}: no module to check (the baseline was made{what} and holds none)")
    result = run_analysis(path, base, opts)  # an --include that selects nothing: the plan says so
    if not checked.modules:
        raise UsageError(f"{where}: no module to check (--include {opts.include!r:.80} left none of "
                         "the baseline's)")
    outcome = compare(records_from(result, baseline.k), checked, rules, source=str(path))
    outcome.ignored += left_out
    return outcome


def describe(outcome: Outcome, verbose: bool = False) -> str:
    """A plain-text report: a headline, a table of failures (all checks if verbose), a summary."""
    fails = outcome.failures
    nmod = len(outcome.modules)
    bad = outcome.failed_modules()
    head = (f"deltaspec check: FAILED, {len(fails)} of {len(outcome.checks)} checks on "
            f"{len(bad)} of {nmod} modules" if fails else
            f"deltaspec check: passed, {len(outcome.checks)} checks on {nmod} modules")
    lines = [f"{head} (baseline {outcome.baseline or '–'}, update {outcome.source})"]
    shown = fails + ([c for c in outcome.checks if c.passed] if verbose else [])
    if shown:
        rows = [("module", "metric", "baseline", "current", "limit", "status")]
        rows += [(c.module, c.metric, fmt(c.baseline), fmt(c.current), c.limit,
                  "ok" if c.passed else "FAIL") for c in shown]
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                  for r in rows]
    if fails:  # the last line is the verdict, as the first one is
        lines.append(f"FAILED: {len(fails)} checks failed on {len(bad)} of {nmod} modules "
                     f"({len(outcome.checks) - len(fails)} checks passed)")
    unchecked = [n for n in outcome.new if n not in outcome.modules]
    if unchecked:
        lines.append(f"warning: {len(unchecked)} module(s) not in the baseline, not checked: "
                     + ", ".join(unchecked[:5]) + (" …" if len(unchecked) > 5 else ""))
    if outcome.ignored:
        lines.append(f"note: {len(outcome.ignored)} module(s) ignored by the rules")
    lines += [f"warning: {n}" for n in outcome.notes]
    return "\n".join(lines) + "\n"


def to_dict(outcome: Outcome) -> dict[str, Any]:
    """The full structured result (for ``--format json``)."""
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and math.isnan(v) else v

    modules = []
    for name, cs in outcome.by_module().items():
        modules.append({"module": name, "passed": all(c.passed for c in cs), "checks": [
            {"metric": c.metric, "baseline": clean(c.baseline), "current": clean(c.current),
             "limit": c.limit, "passed": c.passed, "message": c.message or None} for c in cs]})
    return {"passed": outcome.ok, "source": outcome.source, "baseline": outcome.baseline,
            "summary": {"checks": len(outcome.checks), "failed": len(outcome.failures),
                        "modules": len(outcome.modules),
                        "failed_modules": len(outcome.failed_modules())},
            "modules": modules, "new_modules": outcome.new, "ignored_modules": outcome.ignored,
            "warnings": outcome.notes}
