"""Rank policies (deltaspec/metrics/ranks.py) against independent references: PEFT 0.21's own
energy cut-off, the ``optht`` package, and the Marchenko–Pastur law integrated by scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deltaspec.errors import UsageError
from deltaspec.metrics import ranks as R


@pytest.mark.parametrize("text,kind,value", [
    ("16", "k", 16), ("k:3", "k", 3), ("0.9", "energy", 0.9), ("energy:0.5", "energy", 0.5),
    ("1.0", "energy", 1.0), ("GD", "gd", None), (" mp ", "mp", None), (0.95, "energy", 0.95),
    (8, "k", 8),
])
def test_policy_spellings(text, kind, value):
    p = R.parse_policy(text)
    assert (p.kind, p.value) == (kind, value)
    assert R.parse_policy(p.text) == p


@pytest.mark.parametrize("text", ["0", "-3", "k:0", "1.5", "0.0", "energy:-0.1", "energy:x",
                                  "nan", "foo", "gd:3", "", True])
def test_bad_policies_are_one_line_usage_errors(text):
    with pytest.raises(UsageError) as e:
        R.parse_policy(text)
    assert "\n" not in str(e.value)


def test_clamps():
    s, shape = [5.0, 4.0, 3.0, 2.0, 1.0], (5, 5)
    assert R.parse_policy("gd", min_rank=3).rank(s, shape) == 3
    assert R.parse_policy("0.999", max_rank=2).rank(s, shape) == 2
    assert R.parse_policy("10").rank(s, shape) == 5  # never beyond the numerical rank
    assert R.parse_policy("2").rank([0.0, 0.0], (2, 2)) == 0  # ΔW = 0: rank 0
    with pytest.raises(UsageError):
        R.parse_policy("gd", min_rank=4, max_rank=2)
    with pytest.raises(UsageError):
        R.parse_policy("gd", min_rank=0)


def test_energy_rank_is_peft_convert_to_lora_cutoff():
    from peft.tuners.lora.conversion import _find_cutoff_index

    g = np.random.default_rng(0)
    for trial in range(200):
        n = int(g.integers(1, 40))
        s = np.sort(g.gamma(0.5 + trial % 3, size=n))[::-1].copy()
        tau = float(g.choice([0.5, 0.8, 0.9, 0.95, 0.99, 1.0, g.uniform(0.01, 1)]))
        want = _find_cutoff_index(torch.tensor(s, dtype=torch.float64), tau)
        assert R.parse_policy(f"energy:{tau!r}").rank(s, (n, n)) == min(want, n), (s, tau)


def _noisy(m, n, signal, seed):
    g = np.random.default_rng(seed)
    x = g.standard_normal((m, n)) / math.sqrt(max(m, n))
    for i, amp in enumerate(signal):
        u, v = g.standard_normal(m), g.standard_normal(n)
        x += amp * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v)) * (1 + i)
    return x


@pytest.mark.parametrize("shape", [(60, 60), (40, 90), (120, 30), (17, 50)])
def test_gd_rank_equals_optht(shape):
    from optht import optht

    for seed, signal in enumerate([(3.0,), (2.5, 4.0), (3.0, 1.0, 6.0, 0.5), (8.0,) * 5]):
        x = _noisy(*shape, signal, seed)
        sv = np.linalg.svd(x, compute_uv=False)
        assert R.gd_rank(sv, shape) == optht(x, sv), (shape, seed)
        assert R.noise_rank(sv, shape) == optht(x, sv)


def test_mp_median_and_edge_against_scipy():
    from scipy import integrate, optimize

    for beta in (1.0, 0.5, 0.2, 0.05):
        a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2

        def f(x, beta=beta, a=a, b=b):
            return math.sqrt(max((b - x) * (x - a), 0.0)) / (2 * math.pi * beta * x)

        def cdf(x, a=a, f=f):
            return integrate.quad(f, a, x, limit=200)[0] - 0.5

        mu = optimize.brentq(cdf, a + 1e-12, b, xtol=1e-14)
        assert R.mp_median(beta) == pytest.approx(mu, rel=1e-7)
        assert R.mp_coefficient(beta) == pytest.approx((1 + math.sqrt(beta)) / math.sqrt(mu))


def test_mp_keeps_what_stands_out_of_a_pure_noise_bulk():
    g = np.random.default_rng(3)
    m, n = 200, 400
    noise = 0.7 * g.standard_normal((m, n))
    sv = np.linalg.svd(noise, compute_uv=False)
    # the noise level estimated from the median matches the true one (0.7) closely …
    mu = R.mp_median(m / n)
    assert float(np.median(sv)) / math.sqrt(n * mu) == pytest.approx(0.7, rel=0.02)
    # … and a pure-noise matrix keeps (almost) nothing; spikes above the edge are kept
    assert R.mp_rank(sv, (m, n)) <= 1
    spiked = noise + 40 * np.outer(g.standard_normal(m), g.standard_normal(n)) / math.sqrt(m * n) * 10
    sv2 = np.linalg.svd(spiked, compute_uv=False)
    assert R.mp_rank(sv2, (m, n)) >= 1 and R.mp_rank(sv2, (m, n)) >= R.gd_rank(sv2, (m, n))


def test_noise_rank_column_equals_optht_on_a_full_finetune(tmp_path, llama):
    import factories as F
    from optht import optht

    import deltaspec

    model, base = llama
    folder, ft = F.noisy_finetune(model, tmp_path / "ft")
    df = deltaspec.analyze(folder, base=base, include="layers")
    sd0, sd1 = model.state_dict(), ft.state_dict()
    for name, got in zip(df["module"], df["noise_rank"], strict=True):
        x = (sd1[name + ".weight"].double() - sd0[name + ".weight"].double()).numpy()
        sv = np.linalg.svd(x, compute_uv=False)
        assert got == optht(x, sv), name
