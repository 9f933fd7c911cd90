"""The package's layers: no import cycle among its modules (imports inside functions count), and the
light modules (``puma_ray.LIGHT_MODULES``) never load torch or transformers."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import puma_ray
from puma_ray import LIGHT_MODULES

PACKAGE_DIR = Path(puma_ray.__file__).parent
HEAVY = ("torch", "transformers")


def package_modules(package_dir: Path) -> dict[str, Path]:
    """Every module of the package under ``package_dir``, subpackages included: dotted name -> file."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The innermost module of ``modules`` that ``name`` is or lies in (``pkg.a.Cls`` -> ``pkg.a``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports anywhere in its file (top level, functions,
    classes), relative imports resolved; ``from pkg import mod`` counts as importing ``pkg.mod``."""
    path = modules[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    root = name.partition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module
            targets = [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target.partition(".")[0] == root:
                found.add(_known(target, modules))
    found.discard(name)
    found.discard(None)
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = package_modules(package_dir)
    return {name: imports_of(name, modules) for name in modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted: every
    import cycle lies inside one, and each names the modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = len(index)
        low[v] = index[v]
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    graph = import_graph(PACKAGE_DIR)
    assert "puma_ray.datasets.synthetic" in graph  # subpackages are walked
    found = cycles(graph)
    assert found == [], "modules that import each other: " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_finder_sees_every_import_form(tmp_path):
    """The checker finds a cycle made of each form of import, deferred and relative ones included."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from . import b\n",
        "b.py": "from pkg.sub.c import X\n",
        "sub/__init__.py": "",
        "sub/c.py": "class K:\n    def g(self):\n        import pkg.d as D\n",
        "d.py": "from pkg import e as E\n",
        "e.py": "from .sub import f\n",
        "sub/f.py": "from ..a import f\n",
        "lone.py": "import os\nfrom pkg import __version__\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.d", "pkg.e", "pkg.sub.c", "pkg.sub.f"]]
    assert graph["pkg.lone"] == {"pkg"}
    (pkg / "sub/f.py").write_text("")
    assert cycles(import_graph(pkg)) == []


def heavy_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter on this checkout; the heavy modules it left in sys.modules."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=PACKAGE_DIR.parent, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_light_module_loads_no_torch(module):
    assert heavy_after(f"import {module}") == []


@pytest.mark.parametrize("argv", [["--help"], ["migrate", "--help"]])
def test_cli_help_loads_no_torch(argv):
    code = (
        f"from puma_ray import cli\ntry:\n    cli.main({argv!r})\nexcept SystemExit as exc:\n    assert exc.code == 0\n"
    )
    assert heavy_after(code) == []


def test_probe_sees_torch():
    """The probe above can fail: a heavy module shows up in its answer."""
    assert "torch" in heavy_after("import puma_ray.weights")
