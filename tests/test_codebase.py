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


MAX_FILE_LINES = 400  # house rules: no package file over 400 lines, no function over 60
MAX_FUNCTION_LINES = 60


def test_no_package_file_or_function_over_the_size_bars():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        rel = str(path.relative_to(ROOT))
        if source.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{rel}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, "over the size bars:\n" + "\n".join(too_long)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """deltaspec module → the deltaspec modules it imports, at the top or inside a function
    (not under ``if TYPE_CHECKING``; ``from pkg import mod`` is an edge to ``pkg.mod``; a
    module's own ancestor packages are not edges: Python imports them first anyway)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                parts = package.split(".")
                src = node.module or "" if not node.level else ".".join(
                    parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                names = [f"{src}.{a.name}" if f"{src}.{a.name}" in paths else src for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in paths:
                    name = name.rpartition(".")[0]
                if name and name != module and not module.startswith(name + "."):
                    found.add(name)
        graph[module] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_sees_a_lazy_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_circle_inside_the_package():
    graph = import_graph()
    assert "deltaspec.plan" in graph["deltaspec.execute"]  # the scan sees the package
    assert cycles(graph) == [], "import circles (lazy imports count)"
