"""The loader contract: one (name, module) row per format, each module with detect + load of one
signature, PEFT adapters routed by peft_type, and no import circle inside deltaspec.loaders."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest

import deltaspec
from deltaspec import loaders
from deltaspec.errors import UnsupportedError
from deltaspec.loaders.peft import lora as peft_lora

PKG = Path(loaders.__file__).parent


def test_every_format_module_has_the_contract():
    names = [name for name, _ in loaders.FORMATS]
    assert len(names) == len(set(names))
    want = ["folder", "base", "opts", "skipped"]
    for name, module in loaders.FORMATS:
        assert list(inspect.signature(module.load).parameters) == want, name
        assert list(inspect.signature(module.detect).parameters) == ["folder"], name


def test_peft_adapters_are_detected_by_peft_type(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert peft_lora.detect(folder)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "NOT_A_METHOD"}))
    assert not peft_lora.detect(folder)
    with pytest.raises(UnsupportedError, match=r"adapter_config\.json: peft_type 'NOT_A_METHOD' "
                                                r"is not supported \(deltaspec reads LORA"):
        deltaspec.load(folder)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_no_import_circle_in_the_loaders():
    mods = {"deltaspec.loaders." + ".".join(p.relative_to(PKG).with_suffix("").parts): p
            for p in PKG.rglob("*.py") if p.stem != "__init__"}
    graph = {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, f"import circle: {' -> '.join((*path, m))}"
        if m in done:
            return
        for n in graph[m]:
            visit(n, (*path, m))
        done.add(m)

    for m in graph:
        visit(m, ())
