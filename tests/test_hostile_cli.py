"""Hostile and new-user edges at the command line: wrong exits, false refusals, outputs and the
order of what is said (issue 23). Every failure: exit 2, one line on stderr, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import factories as F
import pytest
from click.testing import CliRunner

from deltaspec.atomic import NAME_MAX
from deltaspec.cli import main
from deltaspec.report.write import GENERATOR, atomic_dir, check_out_dir


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_exit_2(res) -> str:
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.stdout)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def baseline(llama_lora, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile_gate") / "baseline.json"
    res = cli("snapshot", llama_lora[0], "-o", out, "--no-base-discovery", "-q")
    assert res.exit_code == 0, res.stderr
    return out


def _edited(baseline: Path, tmp_path: Path, edit) -> Path:
    data = json.loads(baseline.read_text())
    edit(data)
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(data))
    return out


def _first(data: dict) -> dict:
    return next(iter(data["modules"].values()))


@pytest.mark.parametrize(("what", "edit"), [
    ("metric 'entropy'", lambda d: _first(d)["metrics"].__setitem__("entropy", "NaN")),
    ("metric 'fro_norm'", lambda d: _first(d)["metrics"].__setitem__("fro_norm", "inf")),
    ("vectors k", lambda d: _first(d)["vectors"].__setitem__("k", 0)),
    ("vector rows", lambda d: _first(d)["vectors"]["left"].__setitem__("rows", 3)),
])
def test_hostile_baselines_exit_2(llama_lora, baseline, tmp_path, what, edit):
    bad = _edited(baseline, tmp_path, edit)
    line = _one_line_exit_2(cli("check", llama_lora[0], "-b", bad, "--no-base-discovery", "-q"))
    assert str(bad) in line and what.split()[0] in line


def test_a_gate_that_checks_nothing_fails(llama_lora, baseline, tmp_path):
    out = tmp_path / "empty.json"
    line = _one_line_exit_2(cli("snapshot", llama_lora[0], "-o", out, "--include", "nothing-matches",
                                "--no-base-discovery", "-q"))
    assert "nothing-matches" in line and not out.exists()
    empty = _edited(baseline, tmp_path, lambda d: d.__setitem__("modules", {}))
    line = _one_line_exit_2(cli("check", llama_lora[0], "-b", empty, "--no-base-discovery", "-q"))
    assert "no module to check" in line
    line = _one_line_exit_2(cli("analyze", llama_lora[0], "--include", "nothing-matches",
                                "--no-base-discovery"))
    assert "matches none" in line


def test_garbage_rank_under_a_launcher_is_one_line(llama_lora):
    env = dict(os.environ, WORLD_SIZE="2", RANK="zero", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="1")
    res = subprocess.run([sys.executable, "-m", "deltaspec", "analyze", str(llama_lora[0]),
                          "--no-base-discovery"], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "RANK='zero'" in lines[0], res.stderr


def test_stray_training_files_in_a_full_finetune_are_ignored_with_a_note(llama, llama_full, tmp_path):
    ft = shutil.copytree(llama_full, tmp_path / "ft")
    for name in ("scheduler.pt", "value_head.pt"):
        (ft / name).write_bytes(b"not weights")
    res = cli("analyze", ft, "--base", llama[1], "--format", "csv", "--no-intruders")
    assert res.exit_code == 0, res.stderr
    assert "ignored 2 file(s)" in res.stderr and "scheduler.pt" in res.stderr


def test_a_full_finetune_against_another_base_of_the_same_shapes_is_noted(llama, tmp_path):
    model, _ = llama
    ft = F.full_finetune(model, tmp_path / "ft")
    cfg = json.loads((ft / "config.json").read_text()) | {"_name_or_path": "org/the-real-base"}
    (ft / "config.json").write_text(json.dumps(cfg))
    other = F.save_model(F.tiny_llama(seed=5), tmp_path / "other-base")
    res = cli("analyze", ft, "--base", other, "--format", "csv", "--no-intruders")
    assert res.exit_code == 0 and "org/the-real-base" in res.stderr, res.stderr


def test_a_wrong_base_is_said_once(llama_lora, llama_full, tmp_path, gpt2):
    """A base of other shapes than the adapter's: the error alone, no warning before it."""
    _one_line_exit_2(cli("analyze", llama_lora[0], "--base", gpt2[1]))
    _one_line_exit_2(cli("analyze", llama_lora[0], "--base", gpt2[1], "-q"))


def test_report_out_given_a_symlink_leaves_it_and_its_target_alone(llama_lora, tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "summary.json").write_text(json.dumps({"generator": GENERATOR}))
    link = tmp_path / "latest"
    link.symlink_to(earlier)
    line = _one_line_exit_2(cli("report", f"lora={llama_lora[0]}", "--out", link, "--no-base-discovery"))
    assert "symbolic link" in line
    assert link.is_symlink() and os.listdir(earlier) == ["summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "latest"]


def test_report_out_with_a_legal_long_name(tmp_path):
    target = check_out_dir(tmp_path / ("r" * (NAME_MAX - 5)))
    for _ in range(2):  # creating, then replacing an earlier report
        with atomic_dir(target) as tmp:
            (tmp / "summary.json").write_text(json.dumps({"generator": GENERATOR}))
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
