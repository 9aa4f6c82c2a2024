"""`deltaspec snapshot` / `deltaspec check`: genuine PEFT adapters, regressed copies, bad input.

The "regressed" adapter is the session LoRA with lora_B rebuilt so that the top singular value of
B·A is multiplied by 10 in some modules (the update collapses onto one direction); references are
float64 numpy SVDs of the dense updates.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import factories as F
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import deltaspec
from deltaspec.cli import main
from deltaspec.gate.check import run_check
from deltaspec.gate.snapshot import read_baseline, take_snapshot, write_baseline
from deltaspec.loop import run
from deltaspec.options import Options

WEIGHTS = "adapter_model.safetensors"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BOOSTED = re.compile(r"\.q_proj$")  # the modules the regressed adapter collapses


def rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of adapter ``src`` at ``dst`` with its tensors passed through ``edit``."""
    shutil.copytree(src, dst)
    tensors = edit(load_file(str(src / WEIGHTS)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / WEIGHTS),
              metadata={"format": "pt"})
    return dst


def boost_top_direction(tensors: dict[str, torch.Tensor], factor: float = 10.0):
    """B' = B + (f − 1)·σ₁·u₁·(v₁ᵀ A⁺), so that B'·A = B·A + (f − 1)·σ₁·u₁·v₁ᵀ exactly."""
    out = dict(tensors)
    for key in tensors:
        if not key.endswith("lora_B.weight") or not BOOSTED.search(key.rsplit(".lora_B", 1)[0]):
            continue
        b = tensors[key].to(torch.float64)
        a = tensors[key.replace("lora_B", "lora_A")].to(torch.float64)
        u, s, vh = torch.linalg.svd(b @ a)
        extra = (factor - 1) * s[0] * torch.outer(u[:, 0], vh[0] @ torch.linalg.pinv(a))
        out[key] = (b + extra).to(tensors[key].dtype)
    return out


def dense_updates(folder: Path, scale: float) -> dict[str, np.ndarray]:
    """Module → s·B·A in float64 numpy, straight from the safetensors file (the reference)."""
    t = load_file(str(folder / WEIGHTS))
    out = {}
    for key in t:
        if key.endswith("lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = t[key.replace("lora_A", "lora_B")].double().numpy()
            out[name] = scale * b @ t[key].double().numpy()
    return out


def ref_metrics(w: np.ndarray) -> dict[str, float]:
    s = np.linalg.svd(w, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return {"normalized_entropy": float(-(p * np.log(p)).sum() / np.log(min(w.shape))),
            "top1_share": float(s[0] ** 2 / (s ** 2).sum())}


def ref_phi(w1: np.ndarray, w2: np.ndarray, k: int) -> float:
    u1, u2 = np.linalg.svd(w1)[0][:, :k], np.linalg.svd(w2)[0][:, :k]
    return float(np.sum((u1.T @ u2) ** 2) / k)


def cli(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, [*map(str, args)], env=env or {"GITHUB_ACTIONS": "false"})


@pytest.fixture(scope="module")
def snap(llama_lora, tmp_path_factory):
    """(adapter folder, baseline path) of the session LoRA."""
    folder, _ = llama_lora
    out = tmp_path_factory.mktemp("snap") / "baseline.json"
    r = cli("snapshot", folder, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    return folder, out


@pytest.fixture(scope="module")
def regressed(llama_lora, tmp_path_factory):
    folder, _ = llama_lora
    return rewrite(folder, tmp_path_factory.mktemp("regr") / "adapter", boost_top_direction)


def test_same_adapter_passes(snap, tmp_path):
    folder, baseline = snap
    r = cli("check", folder, "--baseline", baseline, "-q")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("deltaspec check: passed, 70 checks on 14 modules")
    data = json.loads(baseline.read_text())
    assert data["format"] == "deltaspec-baseline" and data["version"] == 1
    assert len(data["modules"]) == 14 and oct(baseline.stat().st_mode & 0o777) != "0o600"


def test_regressed_adapter_fails_naming_modules_and_metrics(snap, regressed, llama_lora):
    folder, baseline = snap
    r = cli("check", regressed, "--baseline", baseline, "-q")
    assert r.exit_code == 1, r.output
    assert r.stdout.startswith("deltaspec check: FAILED")
    assert r.stdout.splitlines()[-1].startswith("FAILED: ")  # the last line is a verdict too
    assert "model.layers.0.self_attn.q_proj" in r.stdout and "model.layers.1.self_attn.q_proj" in r.stdout
    assert "normalized_entropy" in r.stdout and "top1_share" in r.stdout
    assert "k_proj" not in r.stdout  # only the boosted modules fail
    result = json.loads(cli("check", regressed, "-b", baseline, "--format", "json", "-q").stdout)
    assert result["passed"] is False and result["summary"]["failed_modules"] == 2
    scale = 8 / 4  # lora_alpha / r of the session fixture
    ref = dense_updates(regressed, scale)
    for mod in result["modules"]:
        failed = {c["metric"] for c in mod["checks"] if not c["passed"]}
        assert bool(failed) == bool(BOOSTED.search(mod["module"])), mod
        if failed:
            assert failed == {"normalized_entropy", "top1_share", "fro_norm"}
            assert "subspace_sim_left" not in failed  # same directions, only one scaled up
        current = {c["metric"]: c["current"] for c in mod["checks"]}
        expect = ref_metrics(ref[mod["module"]])
        for metric, value in expect.items():
            assert current[metric] == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_subspace_drift_against_numpy(snap, llama, tmp_path):
    folder, baseline = snap
    other, _ = F.lora_adapter(llama[0], tmp_path / "other", seed=7, r=4, lora_alpha=8,
                              target_modules=TARGETS)
    result = json.loads(cli("check", other, "-b", baseline, "--format", "json", "-q").stdout)
    assert result["passed"] is False
    w_old, w_new = dense_updates(folder, 2.0), dense_updates(other, 2.0)
    for mod in result["modules"]:
        phi = {c["metric"]: c for c in mod["checks"]}["subspace_sim_left"]
        expect = ref_phi(w_old[mod["module"]], w_new[mod["module"]], 4)
        assert phi["current"] == pytest.approx(expect, abs=2e-3)  # float16 vectors
        assert phi["passed"] == (expect >= 0.5)


def test_missing_module_and_shape_change_are_failures(snap, tmp_path):
    folder, baseline = snap
    gone = "model.layers.1.self_attn.v_proj"
    missing = rewrite(folder, tmp_path / "missing",
                      lambda t: {k: v for k, v in t.items() if f".{gone}." not in k})
    r = cli("check", missing, "-b", baseline, "-q")
    assert r.exit_code == 1, r.output
    assert re.search(rf"{re.escape(gone)}\s+present\s+yes\s+no", r.stdout)
    # a genuine adapter of a model whose MLP is wider: gate/up/down change shape
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64))
    changed, _ = F.lora_adapter(wide, tmp_path / "wide", r=4, lora_alpha=8, target_modules=TARGETS)
    result = json.loads(cli("check", changed, "-b", baseline, "--format", "json", "-q").stdout)
    shapes = {m["module"]: m["checks"][0] for m in result["modules"]
              if m["checks"][0]["metric"] == "shape"}
    assert sorted(shapes) == sorted(f"model.layers.{i}.mlp.{k}" for i in (0, 1)
                                    for k in ("down_proj", "gate_proj", "up_proj"))
    assert shapes["model.layers.0.mlp.up_proj"]["current"] == "64×32"
    assert all(not c["passed"] for c in shapes.values())


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_rank_change_fails_and_new_modules_warn(snap, llama, tmp_path):
    folder, baseline = snap
    r8, _ = F.lora_adapter(llama[0], tmp_path / "r8", r=8, lora_alpha=16,
                           target_modules=[*TARGETS, "lm_head"])
    r = cli("check", r8, "-b", baseline, "-q", "--format", "json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    rank = [c for m in data["modules"] for c in m["checks"] if c["metric"] == "rank_bound"]
    assert len(rank) == 14 and all(c["baseline"] == 4 and c["current"] == 8 for c in rank)
    assert data["new_modules"] == ["lm_head"]
    table = cli("check", r8, "-b", baseline, "-q").stdout
    assert "warning: 1 module(s) not in the baseline, not checked: lm_head" in table


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_other_baseline_versions_are_refused(snap, tmp_path, version):
    folder, baseline = snap
    data = json.loads(baseline.read_text())
    data["version"] = version
    old = tmp_path / "baseline.json"
    old.write_text(json.dumps(data))
    r = cli("check", folder, "-b", old, "-q")
    assert r.exit_code == 2
    assert r.stderr == (f"deltaspec: error: {old}: format version {version} is not supported by "
                        "this deltaspec (expects 1); re-create it with `deltaspec snapshot`\n")


@pytest.mark.parametrize("content, needle", [
    ('{"format": "something-else", "version": 1}', "not a deltaspec baseline"),
    ("{not json", "not a JSON baseline"),
    ("TRUNCATE", "unreadable vectors"),
    ("NOMODS", "malformed baseline"),
])
def test_broken_baselines_are_one_line_errors(snap, tmp_path, content, needle):
    folder, baseline = snap
    if content in ("TRUNCATE", "NOMODS"):
        data = json.loads(baseline.read_text())
        if content == "TRUNCATE":
            first = next(iter(data["modules"].values()))
            first["vectors"]["left"]["data"] = first["vectors"]["left"]["data"][:-7] + "!"
        else:
            del data["modules"]
        content = json.dumps(data)
    bad = tmp_path / "b.json"
    bad.write_text(content)
    r = cli("check", folder, "-b", bad, "-q")
    assert r.exit_code == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert cli("check", folder, "-b", tmp_path / "nope.json").exit_code == 2


@pytest.mark.parametrize("rules, needle", [
    ("[defaults]\nentropyy = {abs = 0.1}\n", "unknown metric 'entropyy'"),
    ("[bounds]\nnormalized_entropy = '~ 0.6'\n", "cannot read bound"),
    ("[defaults\nx = 1\n", "not valid TOML"),
    ("[subspace]\nmin_similarity = 2\n", "min_similarity"),
    ("ignore = ['(']\n", "invalid regular expression"),
    ("[kinds.q_proj]\ntop1_share = {abs = 0.1, rell = 1}\n", "rell"),
    ("colour = 'red'\n", "unknown key(s) colour"),
])
def test_malformed_rules_exit_2(snap, tmp_path, rules, needle):
    folder, baseline = snap
    path = tmp_path / "rules.toml"
    path.write_text(rules)
    junit = tmp_path / "junit.xml"
    r = cli("check", folder, "-b", baseline, "--rules", path, "--junit", junit, "-q")
    assert r.exit_code == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert str(path) in r.stderr and not junit.exists()


def test_rules_bounds_kinds_and_ignore(snap, regressed, tmp_path):
    folder, baseline = snap
    rules = tmp_path / "rules.toml"
    rules.write_text("[bounds]\nnormalized_entropy = '>= 0.6'\n")  # a rank-4 LoRA on 32 dims: < 0.4
    r = cli("check", folder, "-b", baseline, "-r", rules, "-q")
    assert r.exit_code == 1 and r.stdout.count("≥ 0.6") == 14
    loose = {"normalized_entropy", "top1_share", "fro_norm"}
    rules.write_text("[kinds.q_proj]\n" + "".join(f"{m} = false\n" for m in loose))
    assert cli("check", regressed, "-b", baseline, "-r", rules, "-q").exit_code == 0
    rules.write_text("ignore = ['q_proj$']\n[kinds.q_prj]\nfro_norm = false\n")
    r = cli("check", regressed, "-b", baseline, "-r", rules, "-q")
    assert r.exit_code == 0 and "2 module(s) ignored" in r.stdout
    assert "warning: rules name module kind 'q_prj', which no module of the baseline has" in r.stdout
    rules.write_text('[defaults]\ntop1_share = {abs = 0.05, direction = "down"}\n'
                     "normalized_entropy = false\nfro_norm = false\n")  # the boost is a rise
    assert cli("check", regressed, "-b", baseline, "-r", rules, "-q").exit_code == 0
    rules.write_text('{"subspace": {"min_similarity": 0.99, "k": 1}}')
    json_rules = rules.rename(tmp_path / "rules.json")
    assert cli("check", folder, "-b", baseline, "-r", json_rules, "-q").exit_code == 0


def test_junit_xml_and_github_annotations(snap, regressed, tmp_path):
    folder, baseline = snap
    junit = tmp_path / "reports" / "junit.xml"  # the folder is created, like pytest's
    r = cli("check", regressed, "-b", baseline, "--junit", junit, "-q",
            env={"GITHUB_ACTIONS": "true"})
    assert r.exit_code == 1
    root = ET.parse(junit).getroot()
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "14" and suite.get("failures") == "2"
    failed = [tc for tc in suite.iter("testcase") if tc.find("failure") is not None]
    assert sorted(tc.get("name") for tc in failed) == ["model.layers.0.self_attn.q_proj",
                                                       "model.layers.1.self_attn.q_proj"]
    assert "normalized_entropy" in failed[0].find("failure").get("message")
    notes = [ln for ln in r.stdout.splitlines() if ln.startswith("::error")]
    assert notes and all(ln.startswith("::error title=deltaspec check::module model.layers.")
                         for ln in notes)
    assert any(re.search(r"q_proj: normalized_entropy \S+ vs baseline \S+ \(allowed", ln)
               for ln in notes)
    clean = cli("check", folder, "-b", baseline, "-q", env={"GITHUB_ACTIONS": "false"})
    assert "::" not in clean.stdout
    js = cli("check", regressed, "-b", baseline, "-q", "--format", "json",
             env={"GITHUB_ACTIONS": "true"})
    assert json.loads(js.stdout)["passed"] is False and "::error" in js.stderr


def test_check_makes_no_more_solves_than_analyze(snap, monkeypatch):
    """Snapshot and check each make the one analysis pass: as many SVD/eigen solves as the torch
    executor's analysis with vectors (a plain ``analyze`` of this adapter runs on numpy)."""
    folder, _ = snap
    calls: list[str] = []
    for name in ("svd", "svdvals", "eigh", "eigvalsh"):
        real = getattr(torch.linalg, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, counting)
    run(deltaspec.load(folder), opts=Options(vectors=True))
    n_analyze = len(calls)
    baseline = take_snapshot(folder)
    n_snapshot = len(calls) - n_analyze
    outcome = run_check(folder, baseline)
    n_check = len(calls) - n_analyze - n_snapshot
    assert outcome.ok and n_analyze > 0
    assert n_snapshot == n_check == n_analyze, calls


def test_baseline_round_trip_and_sketch(snap, tmp_path):
    folder, path = snap
    b = read_baseline(path)
    again = tmp_path / "again.json"
    write_baseline(b, again)
    b2 = read_baseline(again)
    assert list(b2.modules) == list(b.modules) and (b2.k, b2.top_k, b2.source) == (8, None, str(folder))
    for name, rec in b.modules.items():
        rec2 = b2.modules[name]
        assert rec2.metrics == rec.metrics and rec2.shape == rec.shape
        assert torch.equal(rec2.left.matrix, rec.left.matrix)  # float16 is exact on re-encode
        exact = deltaspec.spectrum(deltaspec.load(folder)[name], k=4, vectors=True).V
        assert (rec.right.matrix - exact).abs().max() < 1e-3  # float16 of the true vectors
    sk = take_snapshot(folder, sketch=16, k=8)  # 32/48-row sides are sketched to 16 rows
    write_baseline(sk, tmp_path / "sk.json")
    loaded = read_baseline(tmp_path / "sk.json")
    rec = loaded.modules["model.layers.0.mlp.up_proj"]  # 48 × 32: both sides sketched
    assert rec.left.sketch == 16 and rec.left.matrix.shape == (16, 4)
    assert run_check(folder, loaded).ok
    r = cli("snapshot", folder, "--out", tmp_path / "x.json", "--sketch", "4", "-q")
    assert r.exit_code == 2 and "does not fit k = 8" in r.stderr and not (tmp_path / "x.json").exists()


def test_sketched_similarity_tracks_exact_phi():
    from deltaspec.gate.snapshot import like, make_basis, similarity
    from deltaspec.metrics import subspace_similarity

    g = torch.Generator().manual_seed(0)
    m, k = 2048, 8
    qa = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=g))[0]
    noise = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=g))[0]
    for t in (0.1, 0.5, 0.9):
        qb = torch.linalg.qr(math.sqrt(t) * qa + math.sqrt(1 - t) * noise)[0]
        exact = subspace_similarity(qa, qb)
        assert similarity(make_basis(qa), make_basis(qb)) == pytest.approx(exact, abs=1e-12)
        a = make_basis(qa, 256)
        assert a.matrix.shape == (256, k)
        assert similarity(a, like(a, qb)) == pytest.approx(exact, abs=0.06)
    assert similarity(make_basis(qa, 256), like(make_basis(qa, 256), qa)) == pytest.approx(1.0)


def test_sketch_matrix_is_defined_by_the_splitmix64_hash():
    from deltaspec.gate.snapshot import _splitmix64, sketch_matrix

    first = 0xE220A8397B1DCDAF  # the published first output of SplitMix64 seeded with 0
    assert int(_splitmix64(np.array([0], dtype=np.uint64))[0]) == first
    s = sketch_matrix(256, 100).toarray()
    assert s[(first & 0xFFFFFFFF) % 32, 0] == pytest.approx(1 / math.sqrt(8))  # bit 63 set: +
    assert (np.count_nonzero(s, axis=0) == 8).all()  # one entry in each block of 32 rows
    assert np.array_equal(s, sketch_matrix.__wrapped__(256, 100).toarray())


def test_committed_ci_example_passes():
    """analyses/ci-example: its adapter passes its own baseline with its rules (format kept)."""
    example = Path(__file__).resolve().parent.parent / "analyses" / "ci-example"
    r = cli("check", example / "adapter", "-b", example / "baseline.json",
            "-r", example / "rules.toml", "-q")
    assert r.exit_code == 0, r.output
    assert "passed, 98 checks on 14 modules" in r.stdout
