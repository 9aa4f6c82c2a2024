"""Streaming and batching: prefetch, job planning, staging, and the analyze/compare loop against
independent float64 numpy oracles (PEFT's merge for LoRA, the stored tensors for full fine-tunes)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import factories as F
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from deltaspec import load
from deltaspec.analyze import analyze, compare, run, spectra
from deltaspec.delta import dense, factored
from deltaspec.engine import kernels, pipeline, relative
from deltaspec.engine.memory import release_mapped_weights
from deltaspec.engine.pipeline import Stager, plan, prefetch, shard, solve_stream
from deltaspec.errors import NumericalError
from deltaspec.options import Options

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def test_prefetch_keeps_order_and_bounds_the_work_in_flight():
    started, done = [], []
    lock = threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        time.sleep(0.01)
        return i * i

    out = []
    for v in prefetch(range(8), work, depth=2):
        with lock:
            ahead = len(started) - len(done)
        assert ahead <= 3  # the item being used + at most ``depth`` more
        done.append(v)
        out.append(v)
    assert out == [i * i for i in range(8)]


def test_prefetch_raises_at_the_failing_item():
    def work(i):
        if i == 2:
            raise ValueError("boom")
        return i

    it = prefetch(range(5), work)
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(ValueError, match="boom"):
        next(it)


def test_shard_covers_every_name_once():
    names = [f"m{i}" for i in range(11)]
    parts = [shard(names, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(names)


def _lora(name, shape, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, a = torch.randn(shape[0], r, generator=g), torch.randn(r, shape[1], generator=g)
    return factored(name, shape, lambda: (b, a), method="lora", source="t", rank=r,
                    base=lambda: torch.ones(shape))


def test_plan_batches_factored_modules_by_shape():
    ds = {"a": _lora("a", (20, 10), 2), "b": _lora("b", (30, 10), 2), "c": _lora("c", (20, 10), 2),
          "d": dense("d", (5, 5), lambda: torch.ones(5, 5), method="full", source="t"),
          "e": _lora("e", (20, 10), 4), "f": _lora("f", (20, 10), 2)}
    jobs = plan([ds], [(n,) for n in ds], with_base=False, max_batch=2)
    assert [(j.items, j.batched) for j in jobs] == [
        ([("a",), ("c",)], True), ([("b",)], True), ([("d",)], False), ([("e",)], True),
        ([("f",)], True)]
    with_base = plan([ds], [(n,) for n in ds], with_base=True)
    assert all(len(j.items) == 1 and not j.batched for j in with_base)


def test_streamed_spectra_equal_one_by_one():
    ds = {f"m{i}": _lora(f"m{i}", (24, 16) if i % 2 else (16, 24), 1 + i % 3, seed=i) for i in range(9)}
    solved = {s.deltas[0].name: s for s in solve_stream([ds], [(n,) for n in ds],
                                                        torch.device("cpu"), 3, False)}
    assert set(solved) == set(ds)
    for name, d in ds.items():
        b, a = d.factors(F64)
        ref = np.linalg.svd((b @ a).numpy(), compute_uv=False)
        sp = solved[name].spectra[0]
        assert np.abs(sp.values.numpy() - ref).max() <= 1e-12 * ref[0]
        assert sp.route == "factored" and sp.U.shape[1] == min(3, d.rank_bound)


def test_lapack_threads_halve_only_while_the_prefetch_worker_is_busy(monkeypatch):
    torch.set_num_threads(2)  # restored by the one_thread fixture
    seen = []

    def probe():
        with kernels.lapack_threads():
            seen.append(torch.get_num_threads())

    probe()  # a standalone solve keeps every thread
    with kernels.sharing_cpu(lambda: True):
        probe()
    with kernels.sharing_cpu(lambda: False):
        probe()
    real = pipeline.stage

    def slow_stage(*args, **kw):
        time.sleep(0.3)
        return real(*args, **kw)

    monkeypatch.setattr(pipeline, "stage", slow_stage)
    ds = {f"m{i}": dense(f"m{i}", (12, 10), lambda: torch.randn(12, 10), method="full",
                         source="test") for i in range(2)}
    for _ in solve_stream([ds], [(n,) for n in ds], torch.device("cpu"), 0, False):
        probe()  # first module: the worker is staging the second; last one: it is idle
    probe()
    assert seen == [2, 1, 2, 1, 2, 2] and torch.get_num_threads() == 2


def test_stager_on_cpu_passes_through_and_stacks_in_float64():
    st = Stager(torch.device("cpu"))
    t = torch.ones(3, 2, dtype=torch.bfloat16)
    assert st.move(t) is t and st.fence() is None
    s = st.stack([t, 2 * t])
    assert s.dtype == F64 and s.shape == (2, 3, 2) and float(s[1, 0, 0]) == 2.0


def _rss_file_kb() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc only")
def test_released_weight_pages_leave_the_resident_set(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "w.safetensors"
    save_file({f"t{i}": torch.randn(1024, 1024) for i in range(8)}, str(path))  # 32 MB
    handle = safe_open(str(path), framework="pt")
    before = _rss_file_kb()
    total = sum(float(handle.get_tensor(k).sum()) for k in handle.keys())  # noqa: SIM118
    grown = _rss_file_kb()
    release_mapped_weights()
    after = _rss_file_kb()
    assert np.isfinite(total) and before is not None and grown is not None and after is not None
    assert grown - before > 16_000  # the mapped pages were counted …
    assert grown - after > 16_000  # … and released
    assert float(handle.get_tensor("t3").sum()) == float(load_file(str(path))["t3"].sum())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc only")
def test_modified_mapped_pages_are_never_dropped(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "w.safetensors"
    save_file({"t": torch.zeros(512, 512)}, str(path))
    t = safe_open(str(path), framework="pt").get_tensor("t")
    t[0, 0] = 7.0  # a private (copy-on-write) page of the mapping, if t aliases it
    release_mapped_weights()
    assert float(t[0, 0]) == 7.0


def test_analyze_lora_matches_the_peft_merge(llama, llama_lora):
    model, _ = llama
    folder, peft_model = llama_lora
    expected = F.expected_deltas(model, peft_model)
    res = run(load(folder), opts=Options(keep_spectra=True, vectors=True, k=3, device="cpu"))
    df = res.frame()
    assert list(df["module"]) == list(load(folder))  # rows keep the loader's order
    assert set(df["module"]) == set(expected)
    for name, dw in expected.items():
        sp = res.spectra[name]
        ref = np.linalg.svd(dw.numpy(), compute_uv=False)
        assert sp.route == "factored"
        assert np.abs(sp.values.numpy() - ref).max() <= 1e-6 * ref[0]
        assert (dw @ sp.V - sp.U * sp.values[:3]).abs().max() <= 1e-6 * ref[0]
        row = df[df["module"] == name].iloc[0]
        assert abs(row["fro_norm"] - np.linalg.norm(dw.numpy())) <= 1e-6 * np.linalg.norm(dw.numpy())


def _stored_deltas(ft: Path, base: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(ΔW, W) per 2-D tensor, read straight from the files in float64."""
    t, b = load_file(str(ft / "model.safetensors")), load_file(str(base / "model.safetensors"))
    return {k.removesuffix(".weight"): ((t[k].to(F64) - b[k].to(F64)).numpy(), b[k].to(F64).numpy())
            for k in t if t[k].ndim == 2 and k in b}


def _oracle(dw: np.ndarray, w: np.ndarray, k: int = 8) -> tuple[float, float, int]:
    u, s, vt = np.linalg.svd(dw)
    r = min(k, int((s > s[0] * max(dw.shape) * np.finfo(np.float32).eps).sum()))
    amp = np.linalg.norm(dw) / np.linalg.norm(u[:, :r].T @ w @ vt[:r].T)
    u_w = np.linalg.svd(w)[0]
    u_t = np.linalg.svd(w + dw)[0][:, :10]
    intruders = int((np.abs(u_w.T @ u_t).max(axis=0) < 0.5).sum())
    return np.linalg.norm(dw) / np.linalg.norm(w), amp, intruders


def test_full_finetune_base_metrics_match_numpy(llama, llama_full):
    _, base = llama
    df = analyze(llama_full, base=base, device="cpu", intruders=True).set_index("module")
    stored = _stored_deltas(llama_full, base)
    assert load(llama_full, base)["model.layers.0.mlp.up_proj"].parts is not None
    for name, (dw, w) in stored.items():
        if name not in df.index:
            continue
        rel, amp, intruders = _oracle(dw, w)
        row = df.loc[name]
        assert abs(row["relative_norm"] - rel) <= 1e-9 * rel
        assert abs(row["amplification"] - amp) <= 1e-6 * amp
        assert row["intruders"] == intruders
        ref = np.linalg.svd(dw, compute_uv=False)
        assert abs(row["spectral_norm"] - ref[0]) <= 1e-9 * ref[0]
    assert len(set(stored) & set(df.index)) >= 14


def test_lora_with_base_matches_numpy(llama, llama_lora):
    model, base = llama
    folder, peft_model = llama_lora
    expected = F.expected_deltas(model, peft_model)
    weights = {k.removesuffix(".weight"): v.to(F64).numpy() for k, v in model.state_dict().items()}
    df = analyze(folder, base=base, device="cpu", intruders=True).set_index("module")
    for name, dw in list(expected.items())[:6]:
        rel, amp, intruders = _oracle(dw.numpy(), weights[name])
        row = df.loc[name]
        assert abs(row["relative_norm"] - rel) <= 1e-6 * rel
        assert abs(row["amplification"] - amp) <= 1e-6 * amp
        assert row["intruders"] == intruders


def test_compare_with_base_decomposes_each_base_matrix_once(tmp_path, llama, llama_full, monkeypatch):
    model, base = llama
    other = F.full_finetune(model, tmp_path / "other", seed=5)
    calls = []
    real = relative.base_eig
    monkeypatch.setattr(relative, "base_eig", lambda w: calls.append(w.label) or real(w))
    df = compare(llama_full, other, base=base, device="cpu",
                 intruders=True).set_index("module")
    assert len(calls) == len(set(calls)) == len(df) >= 14  # one eigh of W per module, not per side
    sa, sb = _stored_deltas(llama_full, base), _stored_deltas(other, base)
    for name in df.index:
        (dwa, w), (dwb, _) = sa[name], sb[name]
        assert df.loc[name, "intruders_a"] == _oracle(dwa, w)[2]
        assert df.loc[name, "intruders_b"] == _oracle(dwb, w)[2]


def test_compare_pairwise_metrics_match_numpy(tmp_path, llama, llama_lora):
    model, _ = llama
    folder, peft_a = llama_lora
    other, peft_b = F.lora_adapter(model, tmp_path / "b", seed=9, r=2, lora_alpha=4,
                                   target_modules=["q_proj", "v_proj", "down_proj"])
    ea, eb = F.expected_deltas(model, peft_a), F.expected_deltas(model, peft_b)
    result = run(load(folder), load(other), Options(k=2, keep_spectra=True, device="cpu"))
    df = result.frame().set_index("module")
    assert set(df.index) == set(ea) & set(eb)
    for name in df.index:
        a, b = ea[name].numpy(), eb[name].numpy()
        cos = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))
        ua, ub = np.linalg.svd(a)[0][:, :2], np.linalg.svd(b)[0][:, :2]
        phi = float(np.square(ua.T @ ub).sum() / 2)
        assert abs(df.loc[name, "cosine"] - cos) <= 1e-7  # the merge oracle is float32
        assert abs(df.loc[name, "subspace_sim_left"] - phi) <= 1e-6
        assert result.spectra[name][1].values.shape[0] == min(b.shape)


def test_compare_two_full_checkpoints_is_the_update_between_them(llama, llama_full):
    _, base = llama
    a = compare(base, llama_full, device="cpu", intruders=False)
    b = analyze(llama_full, base=base, device="cpu", intruders=False)
    assert list(a["module"]) == list(b["module"])
    assert np.allclose(a["entropy"], b["entropy"], rtol=1e-12, atol=0)


def test_spectra_top_k_with_vectors(llama, llama_full):
    _, base = llama
    out = spectra(llama_full, base, k=4, vectors=True, device="cpu")
    stored = _stored_deltas(llama_full, base)
    assert list(out) == list(load(llama_full, base))
    for name, sp in out.items():
        dw = stored[name][0]
        assert sp.values.shape == (4,) and sp.U.shape == (dw.shape[0], 4)
        ref = np.linalg.svd(dw, compute_uv=False)[:4]
        assert np.abs(sp.values.numpy() - ref).max() <= 1e-9 * ref[0]


def _checkpoint(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def test_nan_in_a_full_checkpoint_names_the_tensor(tmp_path):
    w = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(12, 8).to(torch.bfloat16) for i in range(3)}
    bad = {k: v.clone() for k, v in w.items()}
    bad["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    base, ft = _checkpoint(tmp_path / "base", w), _checkpoint(tmp_path / "ft", bad)
    with pytest.raises(NumericalError, match=r"ft/model\.safetensors.*model\.layers\.1\.mlp\.up_proj"):
        analyze(ft, base=base, device="cpu")


_RSS_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
import deltaspec.engine.memory
from deltaspec.analyze import analyze
from deltaspec.engine.memory import peak_rss_mb
deltaspec.engine.memory.RELEASE_BYTES = int(sys.argv[4])
df = analyze(sys.argv[1], base=sys.argv[2], device="cpu", intruders=False, include=sys.argv[3])
print(len(df), peak_rss_mb())
"""


@pytest.mark.slow
def test_peak_memory_is_flat_in_model_size(tmp_path):
    """Analysing 4 or 48 modules of a bf16 checkpoint (2 × 4 MB per module) peaks at the same RSS
    when mapped pages are released every 8 MB read; without releases it grows with the model.
    The peak of one run varies by ±20 MB (what the worker and the solver hold at the same moment),
    hence the many modules: 44 more are 352 MB read."""
    gen = torch.Generator().manual_seed(0)
    w = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(2048, 1024, generator=gen).to(torch.bfloat16)
         for i in range(48)}
    ft = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16)
          for k, v in w.items()}
    base, tuned = _checkpoint(tmp_path / "base", w), _checkpoint(tmp_path / "ft", ft)

    def peak(pattern: str, count: int, release_bytes: int) -> float:
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tuned), str(base), pattern,
                              str(release_bytes)], capture_output=True, text=True, check=True)
        rows, mb = out.stdout.split()
        assert int(rows) == count
        return float(mb)

    small, large = peak(r"layers\.[0-3]\.", 4, 8 << 20), peak(".", 48, 8 << 20)
    assert large - small < 64, (small, large)  # measured: 398–414 MB and 411–420 MB
    kept = peak(".", 48, 1 << 40)  # the control: nothing released, every page read stays
    assert kept - large > 200, (large, kept)  # measured: +350 MB
