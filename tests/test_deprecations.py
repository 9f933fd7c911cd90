"""No use of APIs that the allowed dependency versions deprecate: a deprecation warning raised by
puma_ray's own call fails the suite (pyproject.toml's filters, tests/conftest.py's attribution), and
the deprecated names that the installed libraries accept silently are refused by reading the code."""

import ast
import warnings
from pathlib import Path

import pytest
import torch

from puma_ray.llm import FrozenLM
from puma_ray.models import FAMILIES

REPO = Path(__file__).resolve().parent.parent
CODE = ["puma_ray", "benchmarks", "jobs", "tests"]

# keyword -> what replaced it (accepted without a warning by some installed versions, removed later)
DEPRECATED_KEYWORDS = {
    "torch_dtype": "dtype (transformers from_pretrained/from_config, since 4.56)",
    "past_key_values": "cache (a transformers 5 model's forward; removed in 5.40)",
}
# a Ray Data map's concurrency= (deprecated since Ray 2.51: compute=, e.g. puma_ray.data.task_pool)
MAPS = {"map", "map_batches", "flat_map", "filter"}


def deprecated_calls(source: str) -> list[str]:
    """``line: call(keyword=...)`` of every call in ``source`` that passes a deprecated keyword."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for kw in node.keywords:
            if kw.arg in DEPRECATED_KEYWORDS or (kw.arg == "concurrency" and name in MAPS):
                found.append(f"{node.lineno}: {name}({kw.arg}=...)")
    return found


def test_no_call_passes_a_deprecated_keyword():
    files = [f for d in CODE for f in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 50
    found = [f"{f.relative_to(REPO)}:{c}" for f in files for c in deprecated_calls(f.read_text())]
    assert found == [], f"use instead: {DEPRECATED_KEYWORDS}, compute= for a map's concurrency="


def test_the_scan_sees_each_deprecated_keyword():
    source = (
        "m = AutoModelForCausalLM.from_pretrained(p, torch_dtype=t)\n"
        "model.decoder(input_ids=i, past_key_values=c)\n"
        "ds.map_batches(f, concurrency=4)\n"
        "ray.data.read_parquet(p, concurrency=4)\n"  # a read's concurrency is current
    )
    assert deprecated_calls(source) == [
        "1: from_pretrained(torch_dtype=...)",
        "2: decoder(past_key_values=...)",
        "3: map_batches(concurrency=...)",
    ]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_prefix_cache_passes_the_current_cache_keyword(tiny_models, family):
    """Every family's fast path hands its cache to the decoder as ``cache=`` on the installed
    transformers; building the LM ran the fast path's probes under the suite's filters."""
    lm = FrozenLM(tiny_models[family], "rating", prompt_length=2)
    assert lm.fast and lm._cache_kw == "cache"


def test_puma_ray_calling_a_deprecated_keyword_fails_the_test(tiny_models):
    """The regression of issue 25: the fast path passing ``past_key_values=`` to a model's forward.
    transformers warns with a stacklevel that names torch's module call, not puma_ray.llm; the
    suite still turns the warning into an error because tests/conftest.py charges it to the caller."""
    lm = FrozenLM(tiny_models["llama"], "rating", prompt_length=2)
    lm._cache_kw = "past_key_values"
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(FutureWarning, match="past_key_values"):
        lm._run(ids, torch.ones_like(ids), None)


def test_a_library_deprecation_inside_another_library_stays_a_warning():
    """A deprecated API of one library that another library calls is theirs to fix: a warning, not
    an error; the same API called from puma_ray is an error."""
    old = {"__name__": "libold.api", "warnings": warnings}
    exec("def old():\n    warnings.warn('old() is deprecated', FutureWarning, stacklevel=2)\n", old)
    other = {"__name__": "libother.core", "old": old["old"]}
    exec("def uses_old():\n    old()\n", other)
    ours = {"__name__": "puma_ray.probe", "old": old["old"]}
    exec("def uses_old():\n    old()\n", ours)
    with warnings.catch_warnings(record=True) as seen:  # the suite's filters stay in force
        other["uses_old"]()
    assert [(w.category, str(w.message)) for w in seen] == [(FutureWarning, "old() is deprecated")]
    with pytest.raises(FutureWarning, match="old"):
        ours["uses_old"]()
