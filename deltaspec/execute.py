"""Run a :class:`~deltaspec.plan.Plan` on the executor it chose: ``numpy``
(:mod:`deltaspec.engine.host`, imports no torch) or ``torch`` (:mod:`deltaspec.loop`). Every
command and the public API go through :func:`analyse` (request → plan → result) or
:func:`execute`. Imports neither torch nor pandas itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deltaspec.options import Options
from deltaspec.plan import NUMPY, Plan, Request, build
from deltaspec.result import Analysis


def execute(plan: Plan, *, metrics: bool = True, modules: Sequence[str] | None = None,
            vectors_k: int | None = None) -> Analysis:
    """The result of ``plan``. ``metrics=False`` (spectra only), a module list or ``vectors_k``
    are the torch executor's (the numpy executor makes the metric table of the plan's modules)."""
    if plan.executor == NUMPY and metrics and modules is None and vectors_k is None:
        from deltaspec.engine import host

        return host.run(plan)
    from deltaspec import loop

    return loop.run_plan(plan, metrics=metrics, modules=modules, vectors_k=vectors_k)


def analyse(sources: Sequence[Any], base: Any = None, options: Options | None = None, *,
            config: Any = None) -> Analysis:
    """Plan ``sources`` (1: analyse; 2: compare, with ``compare``'s full − full rule) and
    execute the plan: the path of ``analyze``, ``compare``, ``snapshot`` and ``check``."""
    return execute(build(Request(tuple(sources), base, options or Options(), config)))


__all__ = ["analyse", "execute"]
