"""The one spine: every analysing command and API entry hands every shared option to the plan the
core sees (a walk over commands × options, generated from the Options metadata, so a new option
without a walk entry fails here); ``check`` honours them (α from --lora-alpha gives the snapshot's
numbers, another α a regression); ``compare`` locates and detects both sides with --revision; a
module filter that selects nothing is an error in every command; the plan imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hubcache as H
import pytest
import torch
from click.testing import CliRunner
from test_loaders_mtl import _save, multilora_sd

import deltaspec
from deltaspec import plan as P
from deltaspec.cli import main
from deltaspec.gate.snapshot import take_snapshot, write_baseline
from deltaspec.options import Options, cli_fields

# field → (command-line arguments, the value the core must see): one per flag of Options.
# k and top_k match the baseline below (check refuses a K other than its baseline's).
WALK = {
    "top_k": (["--top-k", "2"], 2),
    "k": (["--k", "3"], 3),
    "device": (["--device", "cuda:1"], "cuda:1"),
    "intruders": (["--intruders"], True),
    "include": (["--include", "q_proj"], "q_proj"),
    "allow_modified_base": (["--allow-modified-base"], True),
    "lora_alpha": (["--lora-alpha", "16"], 16.0),
    "mtl_temperature": (["--mtl-temperature", "2"], 2.0),
    "discover_base": (["--no-base-discovery"], False),
    "revision": (["--revision", "v2"], "v2"),
    "merge_dtype": (["--merge-dtype", "float16"], "float16"),
    "heavy_tail": (["--alpha"], True),
}
# the core's view of the few options a command spends on something else
# (report's --top-k and collect's top_k are the K of the report's fair entropy, not Options.top_k)
OWN = {("report", "top_k"): None, ("collect", "top_k"): None}


class Seen(Exception):
    """Raised by the spy once the plan's options are seen: nothing is computed."""


@pytest.fixture
def spy(monkeypatch):
    seen: list[Options] = []

    def choose(sides, opts):
        seen.append(opts)
        raise Seen

    monkeypatch.setattr(P, "choose_executor", choose)
    return seen


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, llama_lora):
    out = tmp_path_factory.mktemp("spine") / "baseline.json"
    write_baseline(take_snapshot(llama_lora[0], k=3, top_k=2, include="proj"), out)
    return out


def _argv(command: str, adapter: Path, baseline: Path, tmp: Path) -> list[str]:
    return {"analyze": ["analyze", str(adapter)],
            "compare": ["compare", str(adapter), str(adapter)],
            "report": ["report", f"a={adapter}", "--out", str(tmp / "rep")],
            "snapshot": ["snapshot", str(adapter), "-o", str(tmp / "b.json")],
            "check": ["check", str(adapter), "--baseline", str(baseline)]}[command]


def test_the_walk_covers_every_flag():
    assert set(WALK) == {f.name for f in cli_fields()}


@pytest.mark.parametrize("command", ["analyze", "compare", "report", "snapshot", "check"])
def test_every_command_hands_every_option_to_the_plan(command, spy, llama_lora, baseline, tmp_path):
    for field in cli_fields(command):
        args, want = WALK[field.name]
        spy.clear()
        res = CliRunner().invoke(main, _argv(command, llama_lora[0], baseline, tmp_path) + args)
        assert isinstance(res.exception, Seen), (field.name, res.output)
        got = getattr(spy[-1], field.name)
        assert got == OWN.get((command, field.name), want), (command, field.name, got)


# the commands that read updates through plan.side (no analysis plan): argv → the flags they take
READERS = {
    "trajectory": lambda a, t: ["trajectory", f"1={a}", f"2={a}", "-q"],
    "zoo": lambda a, t: ["zoo", f"x={a}", f"y={a}", "--out", str(t / "zoo"), "-q"],
    "compress": lambda a, t: ["compress", str(a), "--dry-run", "-q"],
    "extract": lambda a, t: ["extract", str(a), "--base", str(a), "--dry-run", "-q"],
    "verify-merge": lambda a, t: ["verify-merge", str(a), "--adapter", str(a), "--base", str(a)],
}


@pytest.mark.parametrize("command", list(READERS))
def test_every_reading_command_hands_its_options_to_the_loaders(command, llama_lora, tmp_path,
                                                                monkeypatch):
    seen: list[Options] = []

    def side(source, base=None, opts=None, config=None):
        seen.append(opts)
        raise Seen

    monkeypatch.setattr(P, "side", side)
    fields = cli_fields(command)
    assert {"revision", "lora_alpha", "allow_modified_base"} <= {f.name for f in fields}
    for field in fields:
        args, want = WALK[field.name]
        seen.clear()
        res = CliRunner().invoke(main, READERS[command](llama_lora[0], tmp_path) + args)
        assert isinstance(res.exception, Seen), (command, field.name, res.output)
        assert getattr(seen[-1], field.name) == want, (command, field.name)


@pytest.mark.parametrize("entry", ["analyze", "compare", "spectra", "snapshot", "check",
                                   "collect", "assert_spectra_within"])
def test_every_api_entry_hands_every_option_to_the_plan(entry, spy, llama_lora, baseline):
    from deltaspec.gate.check import run_check
    from deltaspec.report.data import collect
    from deltaspec.testing import assert_spectra_within

    adapter = llama_lora[0]
    calls = {
        "analyze": lambda o: deltaspec.analyze(adapter, **o),
        "compare": lambda o: deltaspec.compare(adapter, adapter, **o),
        "spectra": lambda o: deltaspec.spectra(adapter, **o),
        "snapshot": lambda o: take_snapshot(adapter, **o),
        "check": lambda o: run_check(adapter, baseline, **o),
        "collect": lambda o: collect({"a": adapter}, **o),
        "assert_spectra_within": lambda o: assert_spectra_within(adapter, baseline,
                                                                 options=Options(**o)),
    }
    for field in cli_fields():
        value = WALK[field.name][1]
        with pytest.raises(Seen):
            calls[entry]({field.name: value})
        assert getattr(spy[-1], field.name) == OWN.get((entry, field.name), value), entry


@pytest.fixture(scope="module")
def mtl(tmp_path_factory):
    folder, _ = _save(tmp_path_factory.mktemp("mtl"), multilora_sd())
    return folder


def test_check_reads_with_the_snapshots_alpha(mtl, tmp_path):
    def cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args], env={"GITHUB_ACTIONS": "false"})

    base = tmp_path / "b.json"
    assert cli("snapshot", mtl, "-o", base, "--lora-alpha", "16", "-q").exit_code == 0
    same = cli("check", mtl, "-b", base, "--lora-alpha", "16", "--format", "json")
    assert same.exit_code == 0, same.output
    checks = [c for m in json.loads(same.stdout)["modules"] for c in m["checks"]]
    norms = [c for c in checks if c["metric"] == "fro_norm"]
    assert norms and all(c["current"] == pytest.approx(c["baseline"], rel=1e-6) for c in norms)
    other = cli("check", mtl, "-b", base, "--lora-alpha", "4", "--format", "json")
    assert other.exit_code == 1, other.output  # α/r 4× smaller: fro_norm regressed
    failed = {c["metric"] for m in json.loads(other.stdout)["modules"] for c in m["checks"]
              if not c["passed"]}
    assert failed == {"fro_norm"}


def test_compare_locates_and_detects_both_sides_at_the_revision(llama, llama_full, tmp_path,
                                                                monkeypatch):
    cache = tmp_path / "cache"
    H.add_repo(cache, "org/base", llama[1], revision="v2", commit="2" * 40)  # no main branch
    H.add_repo(cache, "org/ft", llama_full, revision="v2", commit="3" * 40)
    H.offline_env(monkeypatch, cache)
    res = CliRunner().invoke(main, ["compare", "org/base", "org/ft", "--revision", "v2",
                                    "--include", "q_proj", "--format", "json", "-q"])
    assert res.exit_code == 0, res.output
    want = deltaspec.analyze(llama_full, llama[1], include="q_proj")  # ΔW = ft − base
    got = json.loads(res.stdout)
    assert [r["module"] for r in got] == want["module"].tolist()
    assert [r["fro_norm"] for r in got] == pytest.approx(want["fro_norm"].tolist(), rel=1e-6)


@pytest.mark.parametrize("command", ["analyze", "compare", "report", "snapshot", "check"])
def test_an_include_that_selects_nothing_is_an_error(command, llama_lora, baseline, tmp_path):
    res = CliRunner().invoke(main, _argv(command, llama_lora[0], baseline, tmp_path)
                             + ["--include", "no_such_module"] + (["--k", "3", "--top-k", "2"]
                                                                   if command == "check" else []))
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("deltaspec: error:")]
    assert len(lines) == 1 and "no_such_module" in lines[0] and "selects no module" in lines[0]
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "rep").exists()


def test_the_plan_is_torch_free_and_says_why(llama_lora, llama):
    code = ("import sys\nfrom deltaspec.plan import Request, build\n"
            f"p = build(Request(({str(llama_lora[0])!r},)))\n"
            "print(p.executor, 'torch' in sys.modules, 'pandas' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["numpy", "False", "False"], res.stderr
    plan = P.build(P.Request((llama_lora[0],), llama[1]))
    assert plan.executor == "torch" and "a base" in plan.reason


def test_pair_is_the_one_pairing_for_n_sides():
    sides = [["model.layers.0.q", "model.layers.0.k", "model.layers.1.q"],
             ["base_model.model.model.layers.1.q", "base_model.model.model.layers.0.q"],
             ["layers.0.q", "layers.1.q", "layers.9.q"]]
    items = P.pair(sides, include=r"layers\.1")
    assert items == [("model.layers.1.q", "base_model.model.model.layers.1.q", "layers.1.q")]
    assert P.one_sided(sides, P.pair(sides)) == [["model.layers.0.k"], [], ["layers.9.q"]]
    with pytest.raises(deltaspec.DeltaspecError, match="no module in common"):
        P.pair([["a.q"], ["a.k"]])


def test_a_torch_tensor_is_not_a_path():
    assert P.is_live({"w": torch.zeros(1)}) and not P.is_live(Path("x"))


def test_figures_draw_the_typed_result(llama_lora):
    from matplotlib.figure import Figure

    from deltaspec import plots
    from deltaspec.execute import execute

    result = execute(P.build(P.Request((llama_lora[0],), options=Options(include="q_proj"))))
    assert result.executor.startswith("numpy executor")
    fig = plots.plot_spectra(result)
    assert isinstance(fig, Figure) and fig.axes
    frame_fig = plots.plot_spectra(deltaspec.analyze(llama_lora[0], include="q_proj"))
    got = [ln.get_ydata().tolist() for ln in fig.axes[0].get_lines()]
    assert got == [ln.get_ydata().tolist() for ln in frame_fig.axes[0].get_lines()]
