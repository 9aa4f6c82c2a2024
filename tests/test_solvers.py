"""The exact eigensolver routes (one tridiagonal reduction for values + top-k vectors, syevd,
a float64 bidiagonal SVD) against float64 numpy, and the per-machine choice between them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deltaspec.analyze import run_paths
from deltaspec.engine import solvers, tridiag
from deltaspec.engine.spectrum import spectrum
from deltaspec.errors import UsageError
from deltaspec.options import Options

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _psd(n: int, seed: int, sigma: np.ndarray | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if sigma is None:
        m = torch.randn(n + 5, n, dtype=F64, generator=gen)
        return m.T @ m
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=gen))
    return q @ torch.diag(torch.as_tensor(sigma, dtype=F64)) @ q.T


@pytest.mark.parametrize(("n", "k"), [(1, 1), (2, 1), (3, 3), (40, 1), (97, 8), (200, 8)])
def test_one_reduction_gives_every_value_and_the_top_vectors(n, k):
    g = _psd(n, seed=n)
    before = g.clone()
    lam, vec = tridiag.eig_top(g, k)
    assert torch.equal(g, before)  # not overwritten unless asked
    ref = np.linalg.eigvalsh(g.numpy())[::-1]
    scale = ref[0]
    assert np.abs(lam.numpy() - ref).max() <= 1e-13 * scale
    assert vec.shape == (n, k)
    assert (vec.T @ vec - torch.eye(k, dtype=F64)).abs().max() <= 1e-12
    assert float((g @ vec - vec * lam[:k]).norm(dim=0).max()) <= 1e-12 * scale


def test_clustered_top_eigenvalues_give_orthonormal_vectors():
    lam_true = np.concatenate([[5.0, 5.0, 5.0 * (1 + 1e-13), 4.0], np.linspace(1, 0, 56)])
    g = _psd(60, seed=3, sigma=lam_true)
    lam, vec = tridiag.eig_top(g, 4)
    assert (vec.T @ vec - torch.eye(4, dtype=F64)).abs().max() <= 1e-10
    assert float((g @ vec - vec * lam[:4]).norm(dim=0).max()) <= 1e-12 * 5
    assert np.abs(lam.numpy() - np.sort(lam_true)[::-1]).max() <= 1e-13 * 5


def test_overwrite_reuses_the_matrix_memory():
    g = _psd(50, seed=1)
    ref = np.linalg.eigvalsh(g.numpy())[::-1]
    lam = tridiag.eigvals(g, overwrite=True)
    assert np.abs(lam.numpy() - ref).max() <= 1e-13 * ref[0]


@pytest.mark.parametrize("n", [2, 3, 64, 150])
def test_reduction_projects_on_every_eigenvector_without_back_transforming_them(n):
    g = _psd(n, seed=n + 7)
    ref_lam, ref_vec = np.linalg.eigh(g.numpy())
    y = np.random.default_rng(n).standard_normal((n, 3))
    red = tridiag.Reduced.of(g.clone())
    assert np.abs(red.ascending() - ref_lam).max() <= 1e-13 * ref_lam[-1]
    proj = red.project(y)  # Vᵀy, rows ascending: equal to numpy's up to each vector's sign
    assert np.abs(np.abs(proj) - np.abs(ref_vec.T @ y)).max() <= 1e-10 * np.abs(y).max()
    top = red.top(2)
    assert np.abs(np.abs(top.T @ ref_vec[:, ::-1][:, :2]) - np.eye(2)).max() <= 1e-10


@pytest.mark.parametrize("shape", [(70, 50), (50, 70)])
@pytest.mark.parametrize("solver", ["vectors=tridiag", "vectors=eigh"])
def test_intruder_cosines_match_numpy_on_both_base_routes(monkeypatch, shape, solver):
    from deltaspec.engine.kernels import Operand
    from deltaspec.engine.relative import base_eig, intruder_cosines

    monkeypatch.setenv("DELTASPEC_SOLVER", solver)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(*shape, dtype=F64, generator=gen)
    dw = 3 * torch.randn(shape[0], 2, dtype=F64, generator=gen) @ torch.randn(2, shape[1], dtype=F64,
                                                                           generator=gen)
    op_w = Operand(shape, torch.device("cpu"), "w", dense=[(1.0, w)])
    tuned = Operand(shape, torch.device("cpu"), "w+dw", dense=[(1.0, w + dw)])
    assert base_eig(op_w).red is not None  # the CPU's one reduction whatever the top-k route
    cos = intruder_cosines(op_w, tuned, 10)
    u_w = np.linalg.svd(w.numpy(), full_matrices=False)[0]
    u_t = np.linalg.svd((w + dw).numpy(), full_matrices=False)[0][:, :10]
    ref = np.abs(u_w.T @ u_t)
    assert cos.shape == ref.shape
    # each column's largest |cos| (what the intruder count reads) is basis-independent
    assert np.abs(cos.numpy().max(axis=0) - ref.max(axis=0)).max() <= 1e-8


@pytest.mark.parametrize(("decay", "iterates"), [(0.7, True), (1.0, False)])
def test_tuned_top_vectors_iterate_only_where_the_weyl_bound_says_it_pays(monkeypatch, decay,
                                                                          iterates):
    from deltaspec.engine import relative
    from deltaspec.engine.kernels import Operand

    gen = torch.Generator().manual_seed(9)
    m, n = 320, 240
    u, _ = torch.linalg.qr(torch.randn(m, n, dtype=F64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=gen))
    sigma = 100 * decay ** torch.arange(n, dtype=F64) + 0.01 * torch.rand(n, dtype=F64, generator=gen)
    w = u @ torch.diag(sigma) @ v.T  # decaying (W's top directions well apart) or flat
    dw = 1e-4 * torch.randn(m, 3, dtype=F64, generator=gen) @ torch.randn(3, n, dtype=F64,
                                                                         generator=gen)
    calls = []
    real = relative.top_eigvecs
    monkeypatch.setattr(relative, "top_eigvecs", lambda *a, **k: calls.append(1) or real(*a, **k))
    cpu = torch.device("cpu")
    cos = relative.intruder_cosines(Operand((m, n), cpu, "w", dense=[(1.0, w)]),
                                    Operand((m, n), cpu, "t", dense=[(1.0, w + dw)]), 10,
                                    shift=float(torch.linalg.matrix_norm(dw, 2)))
    assert bool(calls) == iterates
    u_w = np.linalg.svd(w.numpy(), full_matrices=False)[0]
    u_t = np.linalg.svd((w + dw).numpy(), full_matrices=False)[0][:, :10]
    assert np.abs(cos.numpy().max(axis=0) - np.abs(u_w.T @ u_t).max(axis=0)).max() <= 1e-8


@pytest.mark.parametrize("shape", [(90, 60), (60, 90)])
@pytest.mark.parametrize("solver", ["vectors=tridiag", "vectors=eigh", "vectors=evd"])
def test_vectors_have_small_residuals_on_every_route(monkeypatch, shape, solver):
    monkeypatch.setenv("DELTASPEC_SOLVER", solver)
    m = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    k = 8
    sp = spectrum(m, k=k, vectors=True, device="cpu")
    ref = np.linalg.svd(m.numpy(), compute_uv=False)
    assert np.abs(sp.values.numpy() - ref[:k]).max() <= 1e-12 * ref[0]
    assert float((m @ sp.V - sp.U * sp.values).norm(dim=0).max()) <= 1e-10 * ref[0]  # ‖ΔW v − σ u‖
    assert float((m.T @ sp.U - sp.V * sp.values).norm(dim=0).max()) <= 1e-10 * ref[0]


@pytest.mark.parametrize("values", solvers.VALUES)
@pytest.mark.parametrize("shape", [(70, 50), (50, 70)])
def test_every_values_route_matches_lapack(monkeypatch, values, shape):
    monkeypatch.setenv("DELTASPEC_SOLVER", f"values={values}")
    m = torch.randn(*shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    sp = spectrum(m, device="cpu")
    routes = {"svd": ("svd",), "f32": ("f32+certified", "gram")}.get(values, ("gram",))
    assert sp.route in routes
    ref = np.linalg.svd(m.to(F64).numpy(), compute_uv=False)
    promise = 1e-6 if sp.route == "f32+certified" else 1e-12  # certified to the promise only
    assert np.abs(sp.values.numpy() - ref).max() <= promise * ref[0]


def test_analyze_is_the_same_whatever_the_routes(monkeypatch, llama, llama_full):
    _, base = llama
    opts = Options(keep_spectra=True)
    one = run_paths(llama_full, None, base, opts)
    monkeypatch.setenv("DELTASPEC_SOLVER", "values=svd,vectors=evd,fallback=eigh")
    other = run_paths(llama_full, None, base, opts)
    for name, sp in one.spectra.items():
        assert np.abs(sp.values.numpy() - other.spectra[name].values.numpy()).max() <= \
            1e-12 * float(sp.values[0])
    for col in ("effective_rank", "relative_norm", "amplification"):
        assert np.allclose(one.frame()[col].to_numpy(float), other.frame()[col].to_numpy(float),
                           rtol=1e-9)


def test_bad_solver_setting_is_a_usage_error(monkeypatch):
    with pytest.raises(UsageError, match="DELTASPEC_SOLVER"):
        solvers.parse("values=fast")
    monkeypatch.setenv("DELTASPEC_SOLVER", "vector=tridiag")
    with pytest.raises(UsageError, match="vector=tridiag"):
        spectrum(torch.eye(3), device="cpu")


def test_the_choice_is_cached_per_machine_and_never_made_for_small_matrices(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTASPEC_SOLVER", "auto")
    monkeypatch.setenv("DELTASPEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(solvers, "_CURRENT", {})
    assert solvers.policy(solvers.CALIBRATE_MIN - 1) == solvers.RULE
    assert not solvers.cache_file().exists()
    key = solvers._machine_key()
    solvers.cache_file().write_text(json.dumps(
        {key: {"values": "svd", "vectors": "evd", "fallback": "eigh"}}))
    got = solvers.policy(solvers.CALIBRATE_MIN)
    assert (got.values, got.vectors, got.fallback, got.source) == ("svd", "evd", "eigh", "cache")
    assert solvers.policy(4096, "cuda").values == "evd"


def test_calibration_chooses_among_the_candidates(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTASPEC_CACHE_DIR", str(tmp_path))
    pol, times = solvers.calibrate(n=48, repeat=1)
    assert pol.values in solvers.VALUES and pol.vectors in solvers.VECTORS
    assert pol.fallback in solvers.FALLBACKS
    assert pol.source == "measured" or "calibration rejected" in pol.note  # a loaded machine
    assert set(times) >= {"evd", "tridiag", "svd", "f32", "tridiag8", "eigh", "gram"}
    solvers._store("k", (pol, times))
    assert solvers._cached("k") == solvers.Policy(pol.values, pol.vectors, pol.fallback, "cache")
