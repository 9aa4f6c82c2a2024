"""A solver choice a busy machine cannot poison (issue 29): load and consistency checks reject a
calibration, drift marks the cache stale, ``deltaspec calibrate`` shows and redoes it; and the
float32 route whose float64 certificate decides whether its values may be used."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from deltaspec.cli import main
from deltaspec.engine import calibration, lowprec, solvers
from deltaspec.engine.kernels import Operand
from deltaspec.engine.spectrum import spectrum

F64 = torch.float64
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """An empty solver cache, measured choices allowed, nothing remembered in this process."""
    monkeypatch.setenv("DELTASPEC_SOLVER", "auto")
    monkeypatch.setenv("DELTASPEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(solvers, "_CURRENT", {})
    monkeypatch.setattr(solvers, "_STALE", set())
    return tmp_path


def _busy(stop: threading.Event) -> None:
    while not stop.is_set():
        pass


def test_a_busy_thread_during_calibration_cannot_change_the_choice(cache):
    idle, _ = solvers.calibrate(n=96, repeat=2)
    stop = threading.Event()
    thread = threading.Thread(target=_busy, args=(stop,), daemon=True)
    thread.start()
    try:
        loaded, times = solvers.calibrate(n=96, repeat=2)
    finally:
        stop.set()
        thread.join()
    rule = solvers.rule()
    # the busy thread's core is seen as other work (it is not this calibration's own CPU time)
    assert times["other_cores"] > calibration.LOAD_CORES
    assert "loaded" in loaded.note and loaded == solvers.Policy(rule.values, rule.vectors,
                                                                rule.fallback, "rule")
    for field in ("values", "vectors", "fallback"):
        assert getattr(loaded, field) in (getattr(idle, field), getattr(rule, field))


def test_own_cpu_time_leaves_other_threads_out():
    stop = threading.Event()
    thread = threading.Thread(target=_busy, args=(stop,), daemon=True)
    thread.start()
    try:
        c0, p0, o0 = calibration.own_cpu(), time.process_time(), calibration.other_threads_cpu()
        deadline = time.monotonic() + 60
        while calibration.other_threads_cpu() - o0 < 0.2 and time.monotonic() < deadline:
            time.sleep(0.02)  # this thread idles while the busy one spins
        own, total = calibration.own_cpu() - c0, time.process_time() - p0
    finally:
        stop.set()
        thread.join()
    assert total >= 0.2 and own < 0.25 * total


def _poisoned(*_, **__):  # the loaded numbers: eigh 18.8 s, evd 1.47 s on a 1024² Gram
    wall = {"gram": 0.05, "evd": 1.47, "tridiag": 0.2, "svd": 2.0, "f32": 0.5, "tridiag8": 0.3,
            "eigh": 18.8}
    return calibration.Measured(wall, dict(wall), 1, other_cores=1.6)


def _idle(*_, **__):
    wall = {"gram": 0.05, "evd": 0.06, "tridiag": 0.12, "svd": 0.4, "f32": 0.5, "tridiag8": 0.13,
            "eigh": 0.2}
    return calibration.Measured(wall, dict(wall), 3, other_cores=0.05)


def _contradictory(*_, **__):  # eigh (values + every vector) 5× faster than evd (values alone)
    return calibration.Measured({**_idle().wall, "evd": 0.5, "eigh": 0.1}, {}, 3, 0.05)


@pytest.mark.parametrize(("measured", "why"), [(_poisoned, "loaded"),
                                               (_contradictory, "inconsistent"), (_idle, None)])
def test_a_loaded_or_contradictory_calibration_falls_back_to_the_rule(cache, monkeypatch,
                                                                      measured, why):
    monkeypatch.setattr(calibration, "measure", measured)
    monkeypatch.setattr(lowprec, "certified", lambda op: lowprec.Certified(None, np.inf, "test"))
    pol, _ = solvers.calibrate(n=32)
    if why is None:  # idle numbers: measured; tridiag loses to evd, and eigh to tridiag8 + evd
        assert (pol.source, pol.values, pol.vectors) == ("measured", "evd", "tridiag")
        assert pol.values_n3 == pytest.approx(0.06 / 32**3)
        return
    assert pol.source == "rule" and why in pol.note
    assert solvers._store(solvers._machine_key(), (pol, {"other_cores": 1.6})) == pol
    cached = solvers._cached(solvers._machine_key())  # the rejection is cached, for a while
    assert cached is not None and why in cached.note
    entry = json.loads(solvers.cache_file().read_text())[solvers._machine_key()]
    entry["measured_at"] -= calibration.RETRY_S + 1
    solvers.cache_file().write_text(json.dumps({solvers._machine_key(): entry}))
    assert solvers._cached(solvers._machine_key()) is None  # then measured again


def test_an_entry_measured_without_the_load_check_is_measured_again(cache):
    key = solvers._machine_key()
    old = {"values": "tridiag", "vectors": "eigh", "fallback": "eigh", "seconds": {"evd": 1.47}}
    solvers.cache_file().write_text(json.dumps({key: old}))
    assert solvers._cached(key) is None
    solvers.cache_file().write_text(json.dumps({key: old | {"seconds": {"other_cores": 0.1}}}))
    assert solvers._cached(key).values == "tridiag"


def test_a_measured_candidate_needs_a_clear_win_over_the_rule():
    assert calibration.choose({"evd": 1.0, "tridiag": 0.9, "svd": 3.0}, "evd") == "evd"
    assert calibration.choose({"evd": 1.0, "tridiag": 0.8, "svd": 3.0}, "evd") == "tridiag"


def test_a_run_off_the_cached_figures_marks_them_stale_and_the_next_run_measures(cache,
                                                                               monkeypatch):
    key = solvers._machine_key()
    n = solvers.CALIBRATE_MIN
    poisoned = {"values": "tridiag", "vectors": "eigh", "fallback": "eigh",
                "values_n3": 100.0 / n**3}  # the cache says 100 s for an n² solve
    solvers.cache_file().write_text(json.dumps({key: poisoned}))
    pol = solvers.policy(n)
    assert (pol.source, pol.values) == ("cache", "tridiag")
    solvers.observe(pol, n, 30.0)  # within DRIFT×: nothing happens
    assert "stale" not in json.loads(solvers.cache_file().read_text())[key]
    solvers.observe(pol, n, 0.5)  # 200× faster than the cached figure
    assert "stale" in json.loads(solvers.cache_file().read_text())[key]
    assert solvers.policy(n) is pol  # not in the middle of a run
    calls = []
    monkeypatch.setattr(solvers, "calibrate", lambda n=0: calls.append(n) or (
        solvers.Policy("evd", "tridiag", "tridiag", "measured", values_n3=1e-9), {}))
    solvers.start_run()
    assert solvers.policy(n).values == "evd" and len(calls) == 1
    assert "stale" not in json.loads(solvers.cache_file().read_text())[key]


def test_calibrate_command_shows_redoes_and_writes_every_format(cache, tmp_path):
    runner = CliRunner()
    shown = runner.invoke(main, ["calibrate"])
    assert shown.exit_code == 0, shown.output
    assert "not measured yet" in shown.output and "BLAS:" in shown.output
    redo = runner.invoke(main, ["calibrate", "--redo", "--size", "48", "--format", "json"])
    assert redo.exit_code == 0, redo.output
    info = json.loads(redo.output)
    assert info["entry"]["size"] == 48 and info["policy"]["source"] in ("measured", "rule")
    assert set(info["blas"]) == {"torch", "numpy", "scipy"}
    out = tmp_path / "cal.csv"
    assert runner.invoke(main, ["calibrate", "-o", str(out)]).exit_code == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "candidate,wall_s,cpu_s" and any(ln.startswith("eigh,") for ln in lines)
    bad = runner.invoke(main, ["calibrate", "--size", "3"])
    assert bad.exit_code == 2 and "--size" in bad.output


def _matrix(m: int, n: int, seed: int, decay: float = 0.9) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), dtype=F64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), dtype=F64, generator=gen))
    return u @ torch.diag(decay ** torch.arange(min(m, n), dtype=F64)) @ v.T


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (300, 200)])
def test_the_float32_certificate_bounds_the_true_error(shape):
    m = _matrix(*shape, seed=sum(shape))
    op = Operand(shape, CPU, "m", dense=[(1.0, m)])
    ref = np.linalg.svd(m.numpy(), compute_uv=False)
    got = lowprec.certified(op, promise=1.0)  # a loose promise: the whole bound is computed
    s32 = torch.linalg.svdvals(m.float()).double().numpy()
    assert got.values is not None and np.isfinite(got.bound)
    assert np.abs(s32 - ref).max() <= got.bound * ref[0]  # the bound holds
    strict = lowprec.certified(op)  # the promise: certified or refused, never wrong
    if strict.values is not None:
        assert np.abs(strict.values.numpy() - ref).max() <= lowprec.PROMISE * ref[0]
    refused = lowprec.certified(op, promise=1e-12)  # float32 cannot show that
    assert refused.values is None and refused.failed


def test_the_float32_route_falls_back_to_the_exact_one_where_it_is_refused(monkeypatch):
    monkeypatch.setenv("DELTASPEC_SOLVER", "values=f32")
    exact = torch.zeros(10, 6, dtype=F64)  # float32's SVD of a scaled permutation is exact
    exact[[3, 0, 7, 1, 9, 5], [0, 1, 2, 3, 4, 5]] = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.25], dtype=F64)
    sp = spectrum(exact, device="cpu")
    assert sp.route == "f32+certified"
    assert sp.values.tolist() == [3.0, 2.0, 1.5, 1.0, 0.5, 0.25]
    dense = _matrix(10, 6, seed=1)  # float32's vectors are orthonormal to ~ε₃₂ only: refused
    assert lowprec.certified(Operand((10, 6), CPU, "m", dense=[(1.0, dense)])).values is None
    sp = spectrum(dense, device="cpu")
    assert sp.route == "gram"
    assert np.abs(sp.values.numpy() - np.linalg.svd(dense.numpy(), compute_uv=False)).max() \
        <= 1e-13
