"""The code base's own rules: mypy clean, docstring examples collected, the reference standalone."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "deltaspec"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")


def outside_imports(source: str, module: str, inside: str) -> list[str]:
    """The deltaspec modules that ``source`` (the module ``module``) imports from outside the
    package ``inside``: absolute imports and relative ones that climb out of it."""
    package = module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    names = ["<beyond the top package>"]
                else:
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    names = [f"{base}.{node.module}" if node.module else base]
            else:
                names = [node.module or ""]
        else:
            continue
        found += [n for n in names if n.split(".")[0] == "deltaspec"
                  and n != inside and not n.startswith(inside + ".")]
    return found


def test_the_import_scan_sees_absolute_relative_and_lazy_imports():
    src = ("from .data import X\nfrom . import model\nimport torch\n"
           "def f():\n    from deltaspec.engine.memory import peak_rss_mb\n"
           "from .. import metrics\nimport deltaspec.names\n")
    assert sorted(outside_imports(src, "deltaspec.reference.evaluate", "deltaspec.reference")) == [
        "deltaspec", "deltaspec.engine.memory", "deltaspec.names"]


def test_the_reference_imports_nothing_of_deltaspec_outside_itself():
    offenders = {}
    for path in sorted((PACKAGE / "reference").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        if path.name == "__init__.py":
            module += ".__init__"  # its relative imports resolve inside the package itself
        hits = outside_imports(path.read_text(), module, "deltaspec.reference")
        if hits:
            offenders[str(path.relative_to(ROOT))] = hits
    assert not offenders, f"deltaspec/reference/ must stay standalone: {offenders}"


def test_the_suite_collects_the_docstring_examples_of_the_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--doctest-modules" in cfg["addopts"].split()
    assert "deltaspec" in cfg["testpaths"]


@pytest.mark.slow
def test_mypy_is_clean_on_the_package():
    from mypy import api  # a dev dependency (pyproject's [dev] extra): missing is a failure

    out, err, status = api.run(["--config-file", str(ROOT / "pyproject.toml"),
                                "--cache-dir", str(ROOT / ".mypy_cache"), str(PACKAGE)])
    assert status == 0, f"mypy on deltaspec/:\n{out}{err}"
