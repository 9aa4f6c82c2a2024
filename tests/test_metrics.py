"""Metrics against hand-computed cases, and the metric table's facts against the functions.

(The docstring examples run as doctests of the package: pyproject's ``--doctest-modules``.)
"""

from __future__ import annotations

import doctest
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaspec import metrics as M
from deltaspec.engine.kernels import Operand
from deltaspec.engine.relative import frobenius_inner, projection
from deltaspec.metrics.table import METRICS, group

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", list(METRICS))
def test_every_metric_function_has_a_runnable_example(name):
    fn = METRICS[name].function
    examples = doctest.DocTestFinder(recurse=False).find(fn, fn.__name__, globs={})
    assert examples and examples[0].examples, f"{fn.__qualname__} has no >>> example"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1e300, allow_nan=False) | st.floats(0.0, 1e-150), max_size=40),
       st.sampled_from([None, 1, 4, 64]))
def test_spectral_metrics_stay_in_their_declared_bounds_and_types(values, top_k):
    n = max(len(values), 1)
    got = M.spectral_metrics(values, (n, n + 3), top_k)
    assert list(got) == [m.name for m in group("spectral")]
    for m in group("spectral"):
        v = got[m.name]
        lo, hi = m.bounds
        assert lo - 1e-12 <= v <= hi + 1e-12, (m.name, v)
        assert isinstance(v, int) == m.integer, (m.name, type(v))


def test_the_readme_metric_table_is_the_metric_table():
    section = README.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if re.match(r"\| `", ln)]
    want = [f"| `{m.name}` | {m.description} |" for m in METRICS.values()]
    assert rows == want, "README.md's metric table should read:\n" + "\n".join(want)


def test_two_value_spectrum_by_hand():
    s = [3.0, 4.0]  # unsorted on purpose
    p = [4 / 7, 3 / 7]
    h = -(p[0] * math.log(p[0]) + p[1] * math.log(p[1]))
    q = [16 / 25, 9 / 25]
    he = -(q[0] * math.log(q[0]) + q[1] * math.log(q[1]))
    m = M.spectral_metrics(s, (2, 2))
    assert m["fro_norm"] == pytest.approx(5.0)
    assert m["spectral_norm"] == pytest.approx(4.0)
    assert m["nuclear_norm"] == pytest.approx(7.0)
    assert m["rank"] == 2
    assert m["entropy"] == pytest.approx(h)
    assert m["effective_rank"] == pytest.approx(math.exp(h))
    assert m["normalized_entropy"] == pytest.approx(h / math.log(2))
    assert m["energy_entropy"] == pytest.approx(he / math.log(2))
    assert m["stable_rank"] == pytest.approx(25 / 16)
    assert m["energy_rank_90"] == 2 and m["energy_rank_99"] == 2
    assert m["top1_share"] == pytest.approx(0.64)
    assert m["top8_share"] == pytest.approx(1.0)


def test_flat_and_single_direction():
    flat = M.spectral_metrics([2.0] * 16, (16, 32))
    assert flat["normalized_entropy"] == pytest.approx(1.0)
    assert flat["effective_rank"] == pytest.approx(16.0)
    assert flat["energy_rank_90"] == 15  # 15/16 = 0.9375 ≥ 0.9, 14/16 = 0.875 < 0.9
    spike = M.spectral_metrics([5.0] + [0.0] * 15, (16, 16))
    assert spike["normalized_entropy"] == 0.0
    assert spike["effective_rank"] == pytest.approx(1.0)
    assert spike["stable_rank"] == pytest.approx(1.0)
    assert spike["top1_share"] == pytest.approx(1.0)


def test_spectra_of_any_float_dtype_and_unsorted_input_with_nan():
    bf16 = torch.tensor([1.0, 3.0, 2.0], dtype=torch.bfloat16)
    assert M.spectral_norm(bf16) == 3.0 and M.nuclear_norm(bf16) == 6.0
    assert M.fro_norm(np.array([4.0, 3.0])) == 5.0
    # a NaN is not hidden by the sort: it comes first, as in a descending torch sort
    assert math.isnan(M.spectral_norm([1.0, float("nan"), 3.0]))


def test_zero_spectrum_is_all_zero_not_nan():
    m = M.spectral_metrics([0.0] * 8, (8, 8))
    assert m.pop("untrained") == 1 and all(v == 0 for v in m.values()), m
    m = M.spectral_metrics([], (0, 0))
    assert m.pop("untrained") == 1 and all(v == 0 for v in m.values()), m


def test_top_k_restricts_every_metric():
    s = [4.0, 3.0, 1.0, 1.0]
    top = M.spectral_metrics(s, (4, 4), top_k=2)
    assert top == M.spectral_metrics([4.0, 3.0], (4, 4))
    assert top["normalized_entropy"] != M.spectral_metrics(s, (4, 4))["normalized_entropy"]


def test_numerical_rank_threshold_uses_float32_eps_and_max_dim():
    eps = float(torch.finfo(torch.float32).eps)
    tol = 1.0 * 100 * eps
    assert M.numerical_rank([1.0, tol * 1.01, tol * 0.99], (10, 100)) == 2


def test_subspace_similarity_identical_orthogonal_random():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(200, 16, generator=g, dtype=torch.float64))
    assert M.subspace_similarity(q[:, :8], q[:, :8]) == pytest.approx(1.0)
    assert M.subspace_similarity(q[:, :8], q[:, 8:16]) == pytest.approx(0.0, abs=1e-12)
    r, _ = torch.linalg.qr(torch.randn(200, 8, generator=g, dtype=torch.float64))
    assert M.subspace_similarity(q[:, :8], r) < 0.2  # ≈ k/d = 0.04 for random subspaces
    # the same span in another basis is still similarity 1
    rot, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    assert M.subspace_similarity(q[:, :8], q[:, :8] @ rot) == pytest.approx(1.0)


def test_subspace_grid_matches_definition():
    g = torch.Generator().manual_seed(1)
    a, _ = torch.linalg.qr(torch.randn(30, 5, generator=g, dtype=torch.float64))
    b, _ = torch.linalg.qr(torch.randn(30, 4, generator=g, dtype=torch.float64))
    grid = M.subspace_similarity_grid(a, b)
    assert grid.shape == (5, 4)
    for i in range(1, 6):
        for j in range(1, 5):
            want = float((a[:, :i].T @ b[:, :j]).square().sum()) / min(i, j)
            assert float(grid[i - 1, j - 1]) == pytest.approx(want)


def test_empty_vectors_give_nan_similarity():
    empty = torch.zeros(10, 0, dtype=torch.float64)
    full = torch.eye(10, dtype=torch.float64)[:, :2]
    assert math.isnan(M.subspace_similarity(empty, full))
    assert math.isnan(M.min_angle_degrees(empty, full))


def test_cosine_of_the_engine_inner_product_factored_or_dense():
    g = torch.Generator().manual_seed(2)
    b1, a1 = torch.randn(20, 3, generator=g), torch.randn(3, 30, generator=g)
    b2, a2 = torch.randn(20, 2, generator=g), torch.randn(2, 30, generator=g)
    w1, w2 = b1.double() @ a1.double(), b2.double() @ a2.double()
    want = float((w1 * w2).sum() / (w1.norm() * w2.norm()))  # float64 oracle
    cpu = torch.device("cpu")
    fac1 = Operand((20, 30), cpu, factored=[(b1, a1)])
    fac2 = Operand((20, 30), cpu, factored=[(b2, a2)])
    den1, den2 = Operand((20, 30), cpu, dense=[(1.0, w1)]), Operand((20, 30), cpu, dense=[(1.0, w2)])
    fa, fb = float(w1.norm()), float(w2.norm())
    for x, y in ((fac1, fac2), (den1, fac2), (fac1, den2), (den1, den2)):
        assert M.cosine(frobenius_inner(x, y), fa, fb) == pytest.approx(want, rel=1e-9)
    assert math.isnan(M.cosine(0.0, 0.0, 1.0)) and M.cosine(-2.0, 1.0, 2.0) == -1.0


def test_principal_angles_known_case():
    e = torch.eye(3, dtype=torch.float64)
    u = torch.stack([e[0], (e[1] + e[2]) / math.sqrt(2)], dim=1)
    angles = M.principal_angles(e[:, :2], u)
    assert [math.degrees(float(x)) for x in angles] == pytest.approx([0.0, 45.0], abs=1e-9)


def test_base_relative_by_hand_through_the_engine_reductions():
    w = torch.diag(torch.tensor([3.0, 4.0], dtype=torch.float64))
    op = Operand((2, 2), torch.device("cpu"), dense=[(1.0, w)])
    assert M.relative_norm(1.0, math.sqrt(op.fro2())) == pytest.approx(0.2)
    assert math.isnan(M.relative_norm(1.0, 0.0))
    e2 = torch.tensor([[0.0], [1.0]], dtype=torch.float64)  # ΔW = 2·e2e2ᵀ: U_r = V_r = e2
    proj = projection(op, e2, e2)
    assert proj.tolist() == [[4.0]]
    assert M.amplification(2.0, proj) == pytest.approx(0.5)
    assert math.isnan(M.amplification(2.0, torch.zeros(1, 1)))
    # cos(0.9) = 0.62 and sin(0.9) = 0.78 against e1, e2: not an intruder
    tilted = torch.tensor([[math.cos(0.9)], [math.sin(0.9)]], dtype=torch.float64)
    assert M.intruders((torch.eye(2, dtype=torch.float64).T @ tilted).abs()) == 0
    u_base = torch.eye(3, dtype=torch.float64)[:, :1]
    assert M.intruders((u_base.T @ torch.eye(3, dtype=torch.float64)[:, 1:]).abs()) == 2
    assert M.intruders(torch.zeros(3, 0)) == 0


def test_tiny_and_huge_spectra_neither_underflow_nor_overflow():
    for scale in (1e-200, 1e200):
        m = M.spectral_metrics([3.0 * scale, 4.0 * scale], (2, 2))
        assert m["fro_norm"] == pytest.approx(5.0 * scale, rel=1e-12)
        assert m["stable_rank"] == pytest.approx(25 / 16)
        assert m["top1_share"] == pytest.approx(0.64) and m["rank"] == 2


def test_the_gates_documented_defaults_are_the_metric_tables():
    from deltaspec.gate import check
    from deltaspec.gate.rules import DEFAULT_TOLERANCES

    words = {"down": "drop", "up": "rise", "both": "both"}
    documented = {}
    for line in (check.__doc__ or "").splitlines():  # the rows of the defaults table
        m = re.match(r"(\w+)\s+(–|[\d.]+)\s+([\d.]+) %\s+(drop|rise|both)\s", line)
        if m:
            abs_, rel = m.group(2), m.group(3)
            documented[m.group(1)] = (0.0 if abs_ == "–" else float(abs_), float(rel) / 100, m.group(4))
    assert documented == {name: (t.abs, t.rel, words[t.direction])
                          for name, t in DEFAULT_TOLERANCES.items()}
    assert set(DEFAULT_TOLERANCES) == {m.name for m in METRICS.values() if m.gate is not None}
