"""Every engine route on CUDA against the CPU float64 one (to 1e-6), and the GPU-only machinery:
pinned staging buffers, bf16 moved as stored, the memory guard. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from deltaspec.analyze import analyze, compare, spectra
from deltaspec.delta import dense, factored
from deltaspec.engine import kernels, pipeline
from deltaspec.engine.spectrum import compute, operand, resolve_device, solve_factored, spectrum
from deltaspec.errors import NumericalError, UsageError

pytestmark = pytest.mark.gpu
F64 = torch.float64
CUDA = "cuda"


def _matrix(shape, seed=0, decay=None):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(*shape, generator=gen, dtype=F64)
    if decay is not None:
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        s = torch.as_tensor(decay ** np.arange(min(shape)), dtype=F64)
        m = (u * s) @ vh
    return m


def _same_values(a, b, tol=1e-6):
    scale = max(float(b.values[0]), 1e-300) if b.values.numel() else 1.0
    assert a.values.shape == b.values.shape
    assert float((a.values - b.values).abs().max()) <= tol * scale


def _same_vectors(a, b, tol=1e-6):
    """Columns equal up to sign (the test matrices have distinct singular values)."""
    for x, y in ((a.U, b.U), (a.V, b.V)):
        assert x.shape == y.shape and x.device.type == "cpu"
        overlap = (x * y).sum(dim=0).abs()
        assert float((overlap - 1).abs().max()) <= tol


def test_devices():
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UsageError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (256, 256)])
def test_dense_values_and_all_vectors_match_cpu(shape):
    m = _matrix(shape, decay=0.97)
    for vectors in (False, True):
        g, c = spectrum(m, vectors=vectors, device=CUDA), spectrum(m, vectors=vectors, device="cpu")
        assert g.route == c.route and g.values.device.type == "cpu"
        _same_values(g, c)
        ref = np.linalg.svd(m.numpy(), compute_uv=False)
        assert np.abs(g.values.numpy() - ref).max() <= 1e-6 * ref[0]
        if vectors:
            _same_vectors(g, c)


def test_randomized_top_k_matches_cpu(monkeypatch):
    monkeypatch.setenv("DELTASPEC_SOLVER", "vectors=evd")  # values, then subspace iteration
    m = _matrix((600, 400), seed=1, decay=0.8)
    g, c = spectrum(m, k=5, vectors=True, device=CUDA), spectrum(m, k=5, vectors=True, device="cpu")
    assert g.route == c.route == "gram+randomized"
    _same_values(g, c)
    _same_vectors(g, c)


@pytest.mark.parametrize("shape", [(600, 400), (400, 600)])
def test_top_k_from_one_reduction_matches_cpu(shape):
    m = _matrix(shape, seed=4)  # a flat spectrum: one eigh on CUDA, one dsytrd on the CPU
    g, c = spectrum(m, k=8, vectors=True, device=CUDA), spectrum(m, k=8, vectors=True, device="cpu")
    assert (g.route, c.route) == ("gram", "gram+tridiag")
    _same_values(g, c)
    _same_vectors(g, c)
    assert float((m @ g.V - g.U * g.values).norm(dim=0).max()) <= 1e-10 * float(g.values[0])


def test_ill_conditioned_vectors_match_cpu():
    m = _matrix((80, 60), seed=2, decay=0.5)  # σ down to 1e-18: the SVD fallback
    g, c = spectrum(m, vectors=True, device=CUDA), spectrum(m, vectors=True, device="cpu")
    assert g.route == c.route == "svd"
    _same_values(g, c)
    k = 20  # the well-separated leading vectors
    for x, y in ((g.U, c.U), (g.V, c.V)):
        assert float(((x[:, :k] * y[:, :k]).sum(0).abs() - 1).abs().max()) <= 1e-6


@pytest.mark.parametrize("vectors_k", [0, 4])
def test_factored_batch_matches_cpu(vectors_k):
    gen = torch.Generator().manual_seed(3)
    b, a = torch.randn(6, 500, 8, generator=gen), torch.randn(6, 8, 300, generator=gen)
    b[4] = 0
    shapes = [(500, 300)] * 6
    on_gpu = solve_factored(b.to(CUDA), a.to(CUDA), shapes, vectors_k)
    on_cpu = solve_factored(b, a, shapes, vectors_k)
    for g, c in zip(on_gpu, on_cpu, strict=True):
        assert g.route == c.route
        _same_values(g, c)
        if vectors_k and c.route == "factored":
            _same_vectors(g, c)
    assert on_gpu[4].route == "zero"


def test_zero_and_nan_on_cuda():
    assert spectrum(torch.zeros(7, 5), device=CUDA).route == "zero"
    bad = torch.ones(9, 9)
    bad[2, 3] = float("inf")
    d = dense("layers.2.k_proj", (9, 9), lambda: bad, method="full", source="ft.safetensors")
    with pytest.raises(NumericalError, match="ft.safetensors: layers.2.k_proj"):
        compute(d, device=CUDA)


def test_bf16_parts_travel_as_stored_and_are_up_cast_on_the_device():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(256, 128, generator=gen).to(torch.bfloat16)
    tuned = (base.float() + 0.01 * torch.randn(256, 128, generator=gen)).to(torch.bfloat16)
    d = dense("m", (256, 128), lambda: tuned.float() - base.float(), method="full", source="s",
              parts=lambda: (tuned, base))
    stager = pipeline.Stager(torch.device(CUDA))
    op = operand(d, torch.device(CUDA), move=stager.move)
    stager.fence().synchronize()
    assert [(t.dtype, t.device.type) for _, t in op.dense] == [(torch.bfloat16, "cuda")] * 2
    exact = tuned.to(F64) - base.to(F64)
    ref = np.linalg.svd(exact.numpy(), compute_uv=False)
    got = compute(d, device=CUDA).values.numpy()
    assert np.abs(got - ref).max() <= 1e-9 * ref[0]


def test_pinned_staging_buffers_are_reused():
    stager = pipeline.Stager(torch.device(CUDA))
    outs = []
    for i in range(3 * pipeline.PINNED_SLOTS):
        outs.append((i, stager.move(torch.full((64, 1024), float(i)))))
    stager.fence().synchronize()
    assert len(stager.slots) <= pipeline.PINNED_SLOTS
    assert all(slot[0].is_pinned() for slot in stager.slots)
    assert all(float(t.mean()) == i for i, t in outs)
    stacked = stager.stack([torch.ones(3, 2), 2 * torch.ones(3, 2)])
    assert stacked.is_cuda and stacked.dtype == torch.float32 and float(stacked[1].sum()) == 12.0


def test_memory_guard_chunks_and_falls_back_to_the_cpu(monkeypatch):
    m = _matrix((700, 300), seed=5, decay=0.99)
    whole = spectrum(m, device=CUDA)
    monkeypatch.setattr(kernels, "block_budget", lambda device: 8 * 300 * 2 * 50)  # 50-row blocks
    op = kernels.Operand((700, 300), torch.device(CUDA), dense=[(1.0, m.to(CUDA))])
    assert op.step(True) == 50
    _same_values(spectrum(m, device=CUDA), whole, tol=1e-12)
    monkeypatch.setattr(kernels, "device_has_room", lambda device, nbytes: device.type != "cuda")
    _same_values(spectrum(m, device=CUDA), whole, tol=1e-12)  # Gram and eigvalsh on the CPU
    small = spectrum(m, k=3, vectors=True, device=CUDA)
    _same_vectors(small, spectrum(m, k=3, vectors=True, device="cpu"))


def _numeric_frames_agree(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) and list(a["module"]) == list(b["module"])
    for col in a.columns:
        if pd.api.types.is_integer_dtype(a[col]):
            assert a[col].equals(b[col]), col
        elif pd.api.types.is_float_dtype(a[col]):
            x, y = a[col].to_numpy(float), b[col].to_numpy(float)
            assert np.array_equal(np.isnan(x), np.isnan(y)), col
            ok = ~np.isnan(x)
            assert np.all(np.abs(x[ok] - y[ok]) <= 1e-6 * np.maximum(np.abs(y[ok]), 1e-3)), col


def test_analyze_agrees_with_cpu(llama, llama_lora, llama_full):
    _, base = llama
    folder, _ = llama_lora
    for path, b in ((folder, None), (folder, base), (llama_full, base)):
        _numeric_frames_agree(analyze(path, base=b, device=CUDA),
                              analyze(path, base=b, device="cpu"))


def test_compare_and_spectra_agree_with_cpu(llama, llama_lora, llama_full):
    _, base = llama
    folder, _ = llama_lora
    _numeric_frames_agree(compare(folder, llama_full, base=base, device=CUDA),
                          compare(folder, llama_full, base=base, device="cpu"))
    _numeric_frames_agree(compare(base, llama_full, device=CUDA), compare(base, llama_full, device="cpu"))
    g = spectra(llama_full, base, k=4, vectors=True, device=CUDA)
    c = spectra(llama_full, base, k=4, vectors=True, device="cpu")
    for name in c:
        _same_values(g[name], c[name])


def test_factored_delta_on_cuda_stays_factored():
    gen = torch.Generator().manual_seed(6)
    b, a = torch.randn(400, 4, generator=gen), torch.randn(4, 300, generator=gen)
    d = factored("m", (400, 300), lambda: (b, a), method="lora", source="t", rank=4)
    g, c = compute(d, vectors_k=4, device=CUDA), compute(d, vectors_k=4, device="cpu")
    assert g.route == c.route == "factored"
    _same_values(g, c)
    _same_vectors(g, c)
