"""Every benchmark stays runnable (issue 26, item 6).

- ``python benchmarks/<name>.py --help`` exits 0 and prints its usage, without importing torch,
  transformers, scikit-learn or Ray: a benchmark parses its arguments first and imports those in
  the functions that use them, so ``--help`` is quick.
- Every helper module (``benchmarks/_*.py``) imports.
- Every import a benchmark makes (at its top or inside a function) resolves, none is from another
  benchmark (shared code lives in the helper modules), and it uses no private name (``_x``) of
  puma_ray: not imported, not as a module attribute (``trainer._x``). A benchmark that calls a
  package function renamed or made private fails here, not the next time someone runs it.
"""

from __future__ import annotations

import ast
import glob
import importlib
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
SCRIPTS = sorted(os.path.basename(p)[: -len(".py")] for p in glob.glob(os.path.join(BENCHMARKS, "[!_]*.py")))
HELPERS = sorted(os.path.basename(p)[: -len(".py")] for p in glob.glob(os.path.join(BENCHMARKS, "_*.py")))
HEAVY = {"torch", "transformers", "sklearn", "ray"}  # what a benchmark's --help must not import


def python(argv: list[str], path: list[str]) -> subprocess.CompletedProcess:
    """``python argv...`` from the repository root, with ``path`` and then this checkout first on
    PYTHONPATH (an installed puma_ray elsewhere must not answer for this one)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*path, ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_benchmarks_are_found():
    assert "train_throughput" in SCRIPTS
    assert {"_scale", "_testbed"} <= set(HELPERS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_help(name):
    run = python(["-X", "importtime", os.path.join("benchmarks", f"{name}.py"), "--help"], [])
    timings = [x for x in run.stderr.splitlines() if x.startswith("import time:")]
    stderr = "\n".join(x for x in run.stderr.splitlines() if not x.startswith("import time:"))
    assert run.returncode == 0, stderr[-4000:]
    assert run.stdout.startswith(f"usage: {name}.py"), run.stdout[:1000]
    imported = {x.rsplit("|", 1)[-1].strip() for x in timings}
    assert not imported & HEAVY, f"{name}.py --help imports {sorted(imported & HEAVY)}"


@pytest.mark.parametrize("name", HELPERS)
def test_helper_module_imports(name):
    run = python(["-c", f"import {name}"], [BENCHMARKS])
    assert run.returncode == 0, run.stderr[-4000:]


def is_module(name: str) -> bool:
    """Whether ``name`` is an importable module (``puma_ray.config.X``, a name in a module, is not)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def package_uses(tree: ast.Module) -> tuple[list[tuple[str, str | None]], list[tuple[str, str]]]:
    """(every import as (module, name or None), every ``alias.attr`` whose alias names a puma_ray
    module, as (module, attr)) in ``tree``, at any depth."""
    imports, modules = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                imports.append((a.name, None))
                if a.asname and a.name.startswith("puma_ray"):
                    modules[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                imports.append((node.module or "", a.name))
                full = f"{node.module}.{a.name}"
                if full.startswith("puma_ray") and is_module(full):
                    modules[a.asname or a.name] = full
    attrs = [
        (modules[n.value.id], n.attr)
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in modules
    ]
    return imports, attrs


@pytest.mark.parametrize("name", SCRIPTS + HELPERS)
def test_benchmark_imports_resolve_and_are_public(name, monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    with open(os.path.join(BENCHMARKS, f"{name}.py")) as f:
        imports, attrs = package_uses(ast.parse(f.read()))
    problems = []
    for module, member in imports:
        if module == "__future__":
            continue
        if module in SCRIPTS:
            problems.append(f"imports from the benchmark {module}.py: shared code belongs in a helper module (_*.py)")
            continue
        mod = importlib.import_module(module)
        if member is not None and not hasattr(mod, member) and not is_module(f"{module}.{member}"):
            problems.append(f"from {module} import {member}: no such name")
        if module.startswith("puma_ray") and any(p.startswith("_") for p in [*module.split("."), member or ""]):
            problems.append(f"from {module} import {member}: a private name of the package")
    for module, attr in attrs:
        if not hasattr(importlib.import_module(module), attr):
            problems.append(f"{module}.{attr}: no such name")
        elif attr.startswith("_"):
            problems.append(f"{module}.{attr}: a private name of the package")
    assert not problems, problems


def test_gate_policies_scores_a_choice_of_users_like_the_mixed_store(monkeypatch):
    """benchmarks/gate_policies.py's offline scoring: a chosen user's held-out rows take the retrained
    predictions, the others the migrated ones; users are taken by score while their cost fits."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    gp = importlib.import_module("gate_policies")
    rng = np.random.default_rng(0)
    rows = []
    for user, n in [("a", 4), ("b", 6), ("c", 3)]:
        for i in range(n):
            label = float(rng.integers(1, 6))
            for run in ("puma", "retrained", "full_retrain", "source"):
                rows.append(
                    {"run": run, "user_id": user, "label": label, "pred": label + rng.normal(), "held": i % 2 == 0}
                )
    df = pd.DataFrame(rows)
    u = gp.per_user(df, pd.Series({"a": 10, "b": 30, "c": 5}))
    sub = df[(df.run == "puma") & ~df.held & (df.user_id == "b")]
    assert u.loc["b", "se_puma_v"] == pytest.approx(((sub.pred - sub.label) ** 2).sum())
    assert u.loc["b", "n_v"] == 3 and u.loc["b", "n_h"] == 3 and list(u["train_rows"]) == [10, 30, 5]
    cost = u["train_rows"].to_numpy(np.float64)
    score = np.array([3.0, 2.0, 1.0])
    assert list(gp.choose(score, np.ones(3, bool), cost, 16)) == [True, False, False]  # in order, while it lasts
    assert list(gp.choose(score, np.ones(3, bool), cost, 40)) == [True, True, False]
    assert list(gp.choose(score, np.array([True, True, False]), cost, 100)) == [True, True, False]
    assert not gp.choose(-score, np.ones(3, bool), cost, 100).any()  # no user the retrain would not take
    mask = np.array([True, False, True])
    held = df[df.held]
    mixed = held[
        ((held.run == "retrained") & held.user_id.isin(["a", "c"])) | ((held.run == "puma") & (held.user_id == "b"))
    ]
    assert gp.held_rmse(u, mask) == pytest.approx(float(np.sqrt(((mixed.pred - mixed.label) ** 2).mean())))
