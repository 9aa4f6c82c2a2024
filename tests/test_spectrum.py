"""The spectral engine against float64 LAPACK (numpy's ``svd``): values, vectors, routes, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltaspec import metrics as M
from deltaspec.delta import dense, factored
from deltaspec.engine import kernels, subspace
from deltaspec.engine.kernels import Operand
from deltaspec.engine.spectrum import compute, resolve_device, solve_factored, spectrum
from deltaspec.errors import NumericalError, UsageError

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
shapes = st.tuples(st.integers(1, 48), st.integers(1, 48))


pytestmark = pytest.mark.usefixtures("one_thread")


def reference(m: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(m.to(F64).numpy(), compute_uv=False)


def assert_values(got: torch.Tensor, m: torch.Tensor, rtol: float = 1e-6) -> None:
    ref = reference(m)
    assert got.dtype == F64 and got.shape == ref.shape
    assert np.all(np.diff(got.numpy()) <= 0), "values must be descending"
    scale = max(ref[0], 1e-300)
    assert np.abs(got.numpy() - ref).max() <= rtol * scale


def with_spectrum(shape: tuple[int, int], sigma: np.ndarray, seed: int) -> torch.Tensor:
    """U diag(σ) Vᵀ with Haar-random U, V and the given σ (padded with zeros)."""
    m, n = shape
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, dtype=F64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=gen))
    s = torch.zeros(m, n, dtype=F64)
    k = min(m, n, len(sigma))
    s[range(k), range(k)] = torch.as_tensor(sigma[:k], dtype=F64)
    return u @ s @ v.T


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_random_matrices_match_lapack(shape, seed):
    m = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    assert_values(spectrum(m, device="cpu").values, m)


@SETTINGS
@given(shape=shapes, rank=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_rank_deficient_matrices(shape, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(shape[0], rank, generator=gen, dtype=F64) @ torch.randn(rank, shape[1],
                                                                            generator=gen, dtype=F64)
    sp = spectrum(m, device="cpu")
    assert_values(sp.values, m)
    # exact zeros come back below √ε·σ₁ (the float64 Gram's resolution), far under the rank cut
    assert int((sp.values > 1e-7 * max(float(sp.values[0]), 1e-300)).sum()) == min(rank, *shape)


@SETTINGS
@given(shape=shapes, value=st.floats(1e-3, 1e3), reps=st.integers(1, 6), seed=st.integers(0, 99))
def test_repeated_values(shape, value, reps, seed):
    sigma = np.array([value] * reps + [value / 3] * reps)
    m = with_spectrum(shape, sigma, seed)
    assert_values(spectrum(m, device="cpu").values, m)


@SETTINGS
@given(shape=st.tuples(st.integers(8, 40), st.integers(8, 40)), seed=st.integers(0, 99))
def test_wide_dynamic_range(shape, seed):
    sigma = np.logspace(3, -6, min(shape))  # σ spanning 1e-6 .. 1e3
    m = with_spectrum(shape, sigma, seed)
    sp = spectrum(m, device="cpu")
    assert_values(sp.values, m)
    assert abs(float(sp.values[0]) - 1e3) <= 1e-9 * 1e3


@SETTINGS
@given(shape=st.tuples(st.integers(2, 40), st.integers(2, 40)), r=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_factored_route_equals_dense_route(shape, r, seed):
    gen = torch.Generator().manual_seed(seed)
    b, a = torch.randn(shape[0], r, generator=gen), torch.randn(r, shape[1], generator=gen)
    d = factored("m", shape, lambda: (b, a), method="lora", source="t", rank=r)
    sp = compute(d, device="cpu")
    dense_sp = spectrum(b.to(F64) @ a.to(F64), device="cpu")
    assert sp.route == ("factored" if r < min(shape) else "gram")
    assert_values(sp.values, b.to(F64) @ a.to(F64))
    assert np.abs(sp.values.numpy() - dense_sp.values.numpy()).max() <= 1e-6 * float(dense_sp.values[0])


def _check_vectors(sp, m: torch.Tensor, k: int, tol: float = 1e-6) -> None:
    u, v, s = sp.U, sp.V, sp.values[:k]
    assert u.shape == (m.shape[0], k) and v.shape == (m.shape[1], k)
    eye = torch.eye(k, dtype=F64)
    assert (u.T @ u - eye).abs().max() <= tol
    assert (v.T @ v - eye).abs().max() <= tol
    scale = float(sp.values[0])
    if k == min(m.shape):  # all vectors: U diag(σ) Vᵀ reconstructs ΔW
        assert (u @ torch.diag(s) @ v.T - m.to(F64)).abs().max() <= tol * scale
    else:  # top-k: M V = U Σ for the kept pairs
        assert (m.to(F64) @ v - u * s).abs().max() <= tol * scale


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_all_vectors_reconstruct(shape, seed):
    m = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    sp = spectrum(m, vectors=True, device="cpu")
    _check_vectors(sp, m, min(shape))


@SETTINGS
@given(shape=st.tuples(st.integers(4, 40), st.integers(4, 40)), k=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_top_k_vectors(shape, k, seed):
    m = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    sp = spectrum(m, k=k, vectors=True, device="cpu")
    assert sp.values.shape == (k,)
    _check_vectors(sp, m, k)


def test_ill_conditioned_vectors_use_an_svd():
    m = with_spectrum((30, 20), np.array([1.0] * 5 + [1e-9] * 15), seed=3)
    sp = spectrum(m, vectors=True, device="cpu")
    assert sp.route == "svd"
    _check_vectors(sp, m, 20)


def test_factored_vectors():
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(50, 4, generator=gen), torch.randn(4, 30, generator=gen)
    d = factored("m", (50, 30), lambda: (b, a), method="lora", source="t", rank=4)
    sp = compute(d, vectors_k=-1, device="cpu")
    assert sp.route == "factored" and sp.U.shape == (50, 4)
    _check_vectors(sp, b.to(F64) @ a.to(F64), 4)


@pytest.mark.parametrize(("solver", "route"), [("vectors=evd", "gram+randomized"),
                                               ("vectors=tridiag", "gram+tridiag"),
                                               ("vectors=eigh", "gram")])
def test_top_k_spans_the_right_subspace(monkeypatch, solver, route):
    monkeypatch.setenv("DELTASPEC_SOLVER", solver)
    sigma = 0.7 ** np.arange(160)  # a decaying spectrum
    m = with_spectrum((300, 160), sigma, seed=5)
    k = 6
    sp = spectrum(m, k=k, vectors=True, device="cpu")
    assert sp.route == route
    u_ref, _, vt_ref = torch.linalg.svd(m)  # LAPACK gesdd, float64
    for got, ref in ((sp.U, u_ref[:, :k]), (sp.V, vt_ref[:k].T)):
        proj = got @ got.T - ref @ ref.T  # ‖P − P_ref‖₂: 0 when the spans agree
        assert float(torch.linalg.matrix_norm(proj, 2)) <= 1e-8
    _check_vectors(sp, m, k)


@pytest.mark.parametrize(("solver", "route"), [("vectors=evd,fallback=eigh", "gram"),
                                               ("vectors=evd,fallback=tridiag", "gram+tridiag")])
def test_flat_spectrum_top_k_takes_a_second_reduction(monkeypatch, solver, route):
    monkeypatch.setenv("DELTASPEC_SOLVER", solver)
    m = with_spectrum((120, 100), np.ones(100) + 1e-3 * np.arange(100)[::-1], seed=2)
    sp = spectrum(m, k=3, vectors=True, device="cpu")
    assert sp.route == route
    _check_vectors(sp, m, 3)


def test_top_eigvecs_reports_non_convergence():
    g = torch.diag(torch.linspace(1.0, 0.999, 50, dtype=F64))
    assert subspace.top_eigvecs(g, 2, 4, max_iters=4) is None


@pytest.mark.parametrize("vectors", [False, True])
def test_zero_matrix(vectors):
    sp = spectrum(torch.zeros(5, 3), vectors=vectors, device="cpu")
    assert sp.route == "zero" and sp.values.tolist() == [0.0, 0.0, 0.0]
    if vectors:
        assert sp.U.shape == (5, 0) and sp.V.shape == (3, 0)
        top = spectrum(torch.zeros(5, 3), k=2, vectors=True, device="cpu")  # a k: one per value
        assert top.U.shape == (5, 2) and torch.allclose(top.U.T @ top.U, torch.eye(2, dtype=F64))
    zb = factored("z", (6, 5), lambda: (torch.zeros(6, 2), torch.ones(2, 5)), method="lora",
                  source="t", rank=2)
    assert compute(zb, device="cpu").route == "zero"


def test_empty_matrix():
    assert spectrum(torch.zeros(0, 4), device="cpu").values.numel() == 0


def test_nan_is_an_error_naming_the_tensor():
    bad = torch.ones(4, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(NumericalError, match="matrix"):
        spectrum(bad, device="cpu")
    d = dense("layers.3.q_proj", (4, 4), lambda: bad, method="full", source="ft.safetensors")
    with pytest.raises(NumericalError, match="ft.safetensors: layers.3.q_proj"):
        compute(d, device="cpu")
    f = factored("layers.1.v_proj", (4, 4), lambda: (bad[:, 1:3], torch.ones(2, 4)), method="lora",
                 source="a.safetensors", rank=2)
    with pytest.raises(NumericalError, match="layers.1.v_proj"):
        compute(f, device="cpu")


def test_inf_in_stored_parts_is_an_error_naming_the_tensor():
    tuned = torch.ones(6, 5, dtype=torch.bfloat16)
    tuned[0, 0] = float("inf")
    d = dense("layers.0.o_proj", (6, 5), lambda: tuned.float(), method="full", source="ft",
              parts=lambda: (tuned, torch.zeros(6, 5, dtype=torch.bfloat16)))
    with pytest.raises(NumericalError, match="ft: layers.0.o_proj"):
        compute(d, device="cpu")


def test_a_frozen_module_is_answered_without_a_solver():
    w = torch.randn(30, 20).to(torch.bfloat16)
    d = dense("m", (30, 20), lambda: torch.zeros(30, 20), method="full", source="s",
              parts=lambda: (w.clone(), w))
    sp = compute(d, vectors_k=3, device="cpu")
    assert sp.route == "zero" and float(sp.values.abs().max()) == 0.0 and sp.U.shape == (30, 0)


def test_stored_parts_are_used_in_float64():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(40, 24, generator=gen).to(torch.bfloat16)
    tuned = (base.float() + 1e-2 * torch.randn(40, 24, generator=gen)).to(torch.bfloat16)
    exact = tuned.to(F64) - base.to(F64)
    d = dense("m", (40, 24), lambda: (tuned.float() - base.float()), method="full", source="s",
              parts=lambda: (tuned, base))
    assert_values(compute(d, device="cpu").values, exact, rtol=1e-12)


def test_chunked_gram_matches(monkeypatch):
    m = torch.randn(300, 70, generator=torch.Generator().manual_seed(4))
    whole = spectrum(m, device="cpu")
    monkeypatch.setattr(kernels, "CPU_BLOCK_BYTES", 8 * 70 * 2 * 7)  # 7-row blocks
    monkeypatch.setattr(kernels, "GRAM_TILE", 16)  # lower-triangle tiles of the Gram matrix
    op = Operand((300, 70), torch.device("cpu"), dense=[(1.0, m)])
    assert op.step(True) == 7
    g, tall = kernels.gram(op)
    assert tall and torch.allclose(g, m.to(F64).T @ m.to(F64), rtol=1e-13, atol=1e-12)
    chunked = spectrum(m, vectors=True, k=3, device="cpu")
    assert np.abs(chunked.values.numpy() - whole.values[:3].numpy()).max() <= 1e-12 * float(whole.values[0])
    _check_vectors(chunked, m.to(F64), 3)


def test_batched_factored_equals_one_by_one():
    gen = torch.Generator().manual_seed(7)
    b = torch.randn(5, 30, 3, generator=gen)
    a = torch.randn(5, 3, 20, generator=gen)
    b[2] = 0  # a frozen module inside the batch
    batch = solve_factored(b, a, [(30, 20)] * 5, vectors_k=2)
    for i, sp in enumerate(batch):
        single = solve_factored(b[i: i + 1], a[i: i + 1], [(30, 20)], vectors_k=2)[0]
        assert torch.equal(sp.values, single.values) or i == 2
        assert_values(sp.values, b[i].to(F64) @ a[i].to(F64), rtol=1e-12)
    assert batch[2].route == "zero" and batch[0].U.shape == (30, 2)


def test_bad_arguments():
    with pytest.raises(UsageError):
        spectrum(torch.ones(2, 2, 2))
    with pytest.raises(UsageError):
        spectrum(torch.ones(2, 2), k=0)
    with pytest.raises(UsageError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA"):
            resolve_device("cuda:0")
    assert resolve_device("auto").type in ("cpu", "cuda")


@pytest.mark.parametrize("low_rank", [False, True])
def test_kronecker_route_matches_numpy(low_rank):
    """σ(W₁ ⊗ W₂) from the factors = float64 numpy SVD of the dense Kronecker product, with a
    rank-deficient second factor given dense or as B·A; an all-zero factor is the zero route."""
    from deltaspec.delta import kronecker

    g = torch.Generator().manual_seed(3)
    w1 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    b, a = torch.randn(4, 2, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g,
                                                                          dtype=torch.float64)
    w2 = (b, a) if low_rank else b @ a
    d = kronecker("m", (12, 30), lambda: (w1, w2), method="lokr", source="t", rank=6)
    sp = spectrum(d, device="cpu")
    want = np.linalg.svd(np.kron(w1.numpy(), (b @ a).numpy()), compute_uv=False)
    assert sp.route == "kronecker" and sp.values.shape == (12,)
    assert np.abs(sp.values.numpy() - want).max() <= 1e-12 * want[0]
    zero = kronecker("z", (12, 30), lambda: (w1 * 0, w2), method="lokr", source="t", rank=6)
    assert spectrum(zero, device="cpu").route == "zero"


@pytest.mark.parametrize("k", [6, 9])
def test_vectors_complete_below_k(k):
    """A rank-3 factored update asked for k > 3 vectors: one orthonormal column per value,
    and U·diag(σ)·Vᵀ is still ΔW."""
    g = torch.Generator().manual_seed(3)
    b, a = torch.randn(12, 3, generator=g), torch.randn(3, 9, generator=g)
    d = factored("f", (12, 9), lambda: (b, a), method="lora", source="t", rank=3)
    sp = spectrum(d, k=k, vectors=True, device="cpu")
    n = min(k, 9)
    assert sp.values.shape == (n,) and sp.U.shape == (12, n) and sp.V.shape == (9, n)
    eye = torch.eye(n, dtype=sp.U.dtype)
    assert torch.allclose(sp.U.T @ sp.U, eye, atol=1e-12)
    assert torch.allclose(sp.V.T @ sp.V, eye, atol=1e-12)
    rebuilt = sp.U @ torch.diag(sp.values.to(sp.U.dtype)) @ sp.V.T
    assert torch.allclose(rebuilt, (b @ a).double(), atol=1e-5)


def test_completed_vectors_of_unrelated_updates_stay_unrelated():
    """The completion of a rank-4 basis to k = 8 is seeded by the basis itself: two unrelated
    updates do not share completion columns (φ stays near the chance level k/m)."""
    g = torch.Generator().manual_seed(5)
    pairs = [(torch.randn(1024, 4, generator=g), torch.randn(4, 512, generator=g)) for _ in "ab"]
    sps = [spectrum(factored(f"f{i}", (1024, 512), lambda p=p: p, method="lora", source="t",
                             rank=4), k=8, vectors=True, device="cpu") for i, p in enumerate(pairs)]
    assert all(sp.U.shape == (1024, 8) for sp in sps)
    assert M.subspace_similarity(sps[0].U, sps[1].U, 8) < 0.05  # a shared e5…e8 would give 0.5
