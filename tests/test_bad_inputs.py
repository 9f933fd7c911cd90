"""Bad input (issue 25, item 5): every kind, through the real command line (``puma_ray.cli.main``
in-process), ends with exit code 2, ONE line on stderr that starts ``error:`` and names the problem,
no traceback, and nothing written: the files under the test's directory (inputs, outputs and the
working directory, where ``run.storage_path`` points) are the same before and after, byte for byte.

Every case but the ``RAY`` ones is refused before Ray starts: the stages' ``init_ray`` is replaced by
one that fails the test. The ``RAY`` cases are values that only a pass over the rows finds (a NaN
label, a NaN prompt: no Parquet statistic counts NaN); they run on the suite's Ray session.

``PUMA_BAD_INPUTS_TABLE=docs/BAD_INPUTS.md`` writes the table of every case with the line it printed
(tmp paths shortened to ``DIR/``): the docs' table is this test's observation, not a copy.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from puma_ray import coldstart, evaluate, pipeline, rewrite, stage1, tune
from puma_ray.adapter import MigrationAdapter, save_adapter
from puma_ray.cli import main
from puma_ray.config import HeadConfig
from puma_ray.heads import build_head, save_head
from puma_ray.identity import store_meta
from puma_ray.models import build_tiny
from puma_ray.schema import write_prompt_store

USERS = [f"u{i}" for i in range(4)]
TABLE_ENV = "PUMA_BAD_INPUTS_TABLE"
TABLE = os.path.abspath(os.environ[TABLE_ENV]) if os.environ.get(TABLE_ENV) else None  # the cases chdir


def _rows(labels: list, task: str = "rating") -> pa.Table:
    """Interactions of USERS (len(labels) rows, users in turn) with the given labels."""
    n = len(labels)
    cols = {
        "user_id": [USERS[i % len(USERS)] for i in range(n)],
        "item_id": [f"i{i}" for i in range(n)],
        "label": pa.array(labels, pa.float32()),
        "item_text": [f"item {i} words" for i in range(n)],
    }
    if task == "ctr":
        cols["history_text"] = pa.array([["a", "b"]] * n, pa.list_(pa.string()))
    return pa.table(cols)


def _parquet(path: Path, table: pa.Table) -> None:
    """``table`` as the one Parquet file of the directory ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path / "part-00000.parquet")


def _store(path: Path, model: str, ids: list[str], prompts: np.ndarray) -> None:
    """A prompt store for ``model`` (rating_v1, l = 1) holding ``prompts`` for ``ids``."""
    meta = store_meta(model, "rating", None, 1, "prompts")
    write_prompt_store(str(path), meta, ids, prompts.astype(np.float32))


def _write_yaml(path: Path, body: dict) -> None:
    """A config file."""
    path.write_text(yaml.safe_dump(body))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Every input the cases read: two tiny models, good and bad interactions, good and bad prompt
    stores, an adapter (llama -> gemma3), a run, a Yelp release, a foreign directory and one config
    per command (a case's overrides make it bad)."""
    root = tmp_path_factory.mktemp("bad")
    models = build_tiny(str(root / "models"), ["llama", "gemma3"])
    llama, gemma = models["llama"], models["gemma3"]
    d_llama = json.load(open(Path(llama) / "config.json"))["hidden_size"]
    d_gemma = json.load(open(Path(gemma) / "config.json"))["hidden_size"]
    good = [float(1 + i % 5) for i in range(20)]
    _parquet(root / "data" / "train", _rows(good))
    _parquet(root / "data" / "valid", _rows(good[:8]))
    (root / "empty").mkdir()
    _parquet(root / "truncated", _rows(good))
    data = (root / "truncated" / "part-00000.parquet").read_bytes()
    (root / "truncated" / "part-00000.parquet").write_bytes(data[: len(data) // 2])
    _parquet(root / "no_text", _rows(good).drop_columns(["item_text"]))
    _parquet(root / "text_label", _rows(good).set_column(2, "label", pa.array([str(v) for v in good])))
    _parquet(root / "label7", _rows([*good[:-1], 7.0]))
    _parquet(root / "label_inf", _rows([*good[:-1], float("inf")]))
    _parquet(root / "label_nan", _rows([*good[:7], float("nan")]))
    _parquet(root / "no_user", pa.table({"id": USERS}))
    _parquet(root / "ctr2", _rows([0.0, 1.0] * 9 + [1.0, 2.0], task="ctr"))

    rng = np.random.default_rng(0)
    _store(root / "src" / "prompts", llama, USERS, rng.normal(size=(4, d_llama)))  # rating_v1, l = 1
    _store(root / "gemma_src" / "prompts", gemma, USERS, rng.normal(size=(4, d_gemma)))
    _store(root / "dup" / "prompts", llama, [*USERS, USERS[0]], rng.normal(size=(5, d_llama)))
    inf = rng.normal(size=(4, d_llama))
    inf[2, 0] = np.inf
    _store(root / "inf" / "prompts", llama, USERS, inf)
    nan = rng.normal(size=(4, d_llama))
    nan[1, 3] = np.nan
    _store(root / "nanrun" / "prompts", llama, USERS, nan)
    fingerprint = store_meta(llama, "rating", None, 1, "prompts").model_fingerprint
    head = HeadConfig().model_dump()
    save_head(str(root / "nanrun"), build_head("rating", d_llama, head), "rating", head, fingerprint, d_llama)
    source = {"model": llama, "model_fingerprint": fingerprint, "hidden_size": d_llama}
    g = store_meta(gemma, "rating", None, 1, "prompts")
    target = {"model": gemma, "model_fingerprint": g.model_fingerprint, "hidden_size": d_gemma}
    adapter = MigrationAdapter(d_llama, d_gemma, width=8, depth=0, dropout=0.0)
    save_adapter(str(root / "adapter"), adapter, [source], target, 1, "rating_v1")

    (root / "yelp").mkdir()
    review = {"user_id": "u", "business_id": "b", "stars": 5, "date": "2020-01-01 00:00:00"}
    (root / "yelp" / "review.json").write_text(json.dumps(review) + "\n")
    (root / "yelp" / "business.json").write_text(json.dumps({"business_id": "b", "name": "B"}) + "\n")
    (root / "busy").mkdir()
    (root / "busy" / "notes.txt").write_text("mine")
    (root / "notes.txt").write_text("mine")

    data_cfg = {"train": str(root / "data" / "train"), "valid": str(root / "data" / "valid")}
    out = str(root / "out")
    _write_yaml(
        root / "prompts.yaml",
        {"model": {"path": llama}, "data": data_cfg, "output": out, "run": {"storage_path": str(root / "runs")}},
    )
    src = [str(root / "src" / "prompts")]
    _write_yaml(root / "migrate.yaml", {"model": {"path": gemma}, "sources": src, "data": data_cfg, "output": out})
    adapter_uri = str(root / "adapter")
    _write_yaml(
        root / "rewrite.yaml", {"model": {"path": gemma}, "sources": src, "adapter": adapter_uri, "output": out}
    )
    report = str(root / "report.json")
    _write_yaml(root / "evaluate.yaml", {"data": data_cfg, "baselines": ["global_mean"], "output": report})
    (root / "broken.yaml").write_text("model: {path: m\ndata: [\n")
    return root


@dataclass(frozen=True)
class Case:
    kind: str  # the bad input, as the table names it
    argv: Callable[[Path], list[str]]  # the command line, given the inputs' directory
    says: str  # a phrase the one line must hold
    ray: bool = False  # found only by a pass over the rows (on Ray)


def cfg(command: str, *overrides: str) -> Callable[[Path], list[str]]:
    """``puma-ray <command> --config DIR/<config>.yaml <overrides>`` with ``{D}`` in overrides = DIR."""
    words = command.split()
    name = {"prompts train": "prompts"}.get(command, words[0])
    return lambda d: [*words, "--config", str(d / f"{name}.yaml"), *(o.format(D=d) for o in overrides)]


def tool(*words: str) -> Callable[[Path], list[str]]:
    """A command without a config file; ``{D}`` in words = DIR."""
    return lambda d: [w.format(D=d) for w in words]


CASES = [
    # data import
    Case(
        "an import that keeps no rows",
        tool("data", "import", "--format", "yelp", "--src", "{D}/yelp", "--out", "{D}/imported"),
        "no row kept",
    ),
    Case(
        "an import from a directory that does not exist",
        tool("data", "import", "--format", "movielens", "--src", "{D}/nowhere", "--out", "{D}/imported"),
        "nowhere: not found",
    ),
    # select.budget
    Case("budget 1.5 (neither a count nor a fraction)", cfg("migrate", "select.budget=1.5"), "budget 1.5 is neither"),
    Case("budget 0", cfg("migrate", "select.budget=0"), "budget 0 is neither"),
    Case("budget -3", cfg("migrate", "select.budget=-3"), "budget -3 is neither"),
    Case("budget 2.0 (an int-valued float)", cfg("migrate", "select.budget=2.0"), "written as an integer (2)"),
    Case("budget abc", cfg("migrate", "select.budget=abc"), "budget 'abc' is neither"),
    # configs
    Case("an unknown config key", cfg("prompts train", "train.epochz=1"), "train.epochz: Extra inputs"),
    Case("negative epochs", cfg("prompts train", "train.epochs=-1"), "train.epochs: Input should be greater"),
    Case("an unknown selection strategy", cfg("migrate", "select.strategy=best"), "select.strategy: Input should be"),
    Case(
        "a template with an unknown slot",
        cfg("prompts train", "template=Rate <UserID> for <ItemTitle> by <Genre>"),
        "unknown slot(s) <Genre>",
    ),
    Case(
        "a template with <UserID> twice",
        cfg("prompts train", "template=<UserID> rates <ItemTitle> as <UserID>"),
        "<UserID> appears 2 time(s)",
    ),
    Case("a template of another task", cfg("prompts train", "template=ctr_v1"), "is for another task"),
    Case("an override that is not key=value", cfg("prompts train", "train.epochs"), "is not key=value"),
    Case("a missing config file", tool("evaluate", "--config", "{D}/nope.yaml"), "nope.yaml: not found"),
    Case("a malformed YAML config", tool("prompts", "train", "--config", "{D}/broken.yaml"), "not valid YAML"),
    Case(
        "a model path that does not exist",
        cfg("prompts train", "model.path={D}/models/nowhere"),
        "models/nowhere: cannot load model config (not found: no model directory",
    ),
    # outputs
    Case(
        "an output equal to an input",
        cfg("prompts train", "output={D}/data/train"),
        "is the input data.train",
    ),
    Case(
        "an output inside an input",
        cfg("rewrite", "output={D}/src/prompts/out"),
        "is inside the input sources[0]",
    ),
    Case("an output holding an input", cfg("migrate", "output={D}/src"), "contains the input sources[0]"),
    Case(
        "a non-empty output the command did not write",
        cfg("prompts train", "output={D}/busy"),
        "not empty and holds no output of `puma-ray prompts train`",
    ),
    Case("an output that is a file", cfg("prompts train", "output={D}/notes.txt"), "exists and is not a directory"),
    # interactions
    Case("an empty data directory", cfg("prompts train", "data.train={D}/empty"), "empty input (no .parquet files)"),
    Case("a data directory that does not exist", cfg("prompts train", "data.train={D}/nowhere"), "nowhere: not found"),
    Case("a truncated Parquet file", cfg("prompts train", "data.valid={D}/truncated"), "truncated or corrupt Parquet"),
    Case(
        "interactions without a required column",
        cfg("migrate", "data.train={D}/no_text"),
        "lack required column 'item_text'",
    ),
    Case(
        "a column of the wrong type",
        cfg("prompts train", "data.train={D}/text_label"),
        "column 'label' has type string",
    ),
    Case("a rating of 7", cfg("prompts train", "data.train={D}/label7"), "outside the rating range 1..5, e.g. [7.0]"),
    Case("an infinite rating", cfg("migrate", "data.train={D}/label_inf"), "outside the rating range 1..5, e.g. [inf]"),
    Case(
        "a click label of 2",
        cfg("prompts train", "task=ctr", "data.train={D}/ctr2", "data.valid=null"),
        "outside the ctr range 0 or 1, e.g. [2.0]",
    ),
    Case(
        "a NaN rating", cfg("evaluate", "data.valid={D}/label_nan"), "outside the rating range 1..5, e.g. [nan]", True
    ),
    # prompt stores
    Case(
        "prompts of another width than the config's",
        cfg("prompts train", "init_prompts={D}/src/prompts", "prompt_length=2"),
        "init_prompts were made for model",
    ),
    Case(
        "prompts of another template than the config's",
        cfg("prompts train", "init_prompts={D}/src/prompts", "template=rating_item_first"),
        "prompts were trained under template rating_v1 and this run uses rating_item_first",
    ),
    Case(
        "prompts of another model than the config's",
        cfg("prompts train", "init_prompts={D}/gemma_src/prompts"),
        "init_prompts were made for model",
    ),
    Case(
        "source prompts of another model than the adapter's",
        cfg("rewrite", "sources=[{D}/gemma_src/prompts]"),
        "adapter was trained on source model(s)",
    ),
    Case(
        "a rewrite under another template than the adapter's",
        cfg("rewrite", "template=rating_item_first"),
        "prompts were trained under template rating_v1",
    ),
    Case(
        "duplicate user ids in a source store",
        cfg("migrate", "sources=[{D}/dup/prompts]"),
        "1 duplicate user_id row(s), e.g. ['u0']",
    ),
    Case("an infinite value in a source prompt", cfg("rewrite", "sources=[{D}/inf/prompts]"), "contain NaN or Inf"),
    # the per-user gate and the report (issue 27)
    Case(
        "a negative gate threshold", cfg("migrate", "gate.max_regression=-0.1"), "gate.max_regression: Input should be"
    ),
    Case("a gate threshold that is not a number", cfg("migrate", "gate.max_regression=abc"), "gate.max_regression:"),
    Case("a NaN gate threshold", cfg("migrate", "gate.max_regression=nan"), "gate.max_regression: Input should be"),
    Case("a gate reference the migration lacks", cfg("migrate", "gate.reference=best"), "gate.reference 'best' is not"),
    Case(
        "gate.reference=source without a source run",
        cfg("migrate", "gate.reference=source"),
        "is not a run's prompts/ with its head beside it",
    ),
    Case(
        "a gated run that is not evaluated", cfg("evaluate", "gate.run=nope"), "gate.run 'nope' is not one of the runs"
    ),
    Case(
        "a retrain without the gate", cfg("migrate", "gate.retrain=true", "gate.enabled=false"), "gate.retrain retrains"
    ),
    Case("users without a user_id column", cfg("prompts train", "users={D}/no_user"), "users must be Parquet with a"),
    Case("a report of a directory that is not a migrated run", tool("report", "{D}/busy"), "not a migrated run"),
    Case(
        "a NaN in a scored prompt",
        cfg("evaluate", "runs.nanrun={D}/nanrun", "baselines=[]"),
        "prompt(s) contain NaN or Inf, e.g. users ['u1']",
        True,
    ),
]


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``root``: relative path -> (size, mtime_ns) (directories: (-1, 0))."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (-1, 0)
        for name in filenames:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def _cell(text: str, code: bool = False) -> str:
    """``text`` as a Markdown table cell: pipes escaped, as code (double backticks around text that has one)."""
    if code:
        text = f"`` {text} ``" if "`" in text else f"`{text}`"
    return text.replace("|", "\\|")


@pytest.fixture(scope="module")
def observed():
    """case kind -> (command, message) as seen; written as docs' table when PUMA_BAD_INPUTS_TABLE is set."""
    seen: dict[str, tuple[str, str]] = {}
    yield seen
    if TABLE and len(seen) == len(CASES):
        lines = [
            "# Bad input: what each command says",
            "",
            "Every row is a case of `tests/test_bad_inputs.py`, with the line the command printed "
            "(exit code 2, nothing written; `DIR/` is the test's directory). Regenerate with "
            f"`{TABLE_ENV}=docs/BAD_INPUTS.md pytest tests/test_bad_inputs.py`. Found before Ray starts "
            "unless marked (Ray): NaN is in no Parquet statistic, so only a pass over the rows finds it.",
            "",
            "| bad input | command | message |",
            "| --- | --- | --- |",
        ]
        for case in CASES:
            command, message = seen[case.kind]
            kind = case.kind + (" (Ray)" if case.ray else "")
            lines.append(f"| {_cell(kind)} | {_cell(command, code=True)} | {_cell(message, code=True)} |")
        Path(TABLE).write_text("\n".join(lines) + "\n")


@pytest.fixture
def guard(request, monkeypatch, case):
    """A case found before Ray must not start Ray; a RAY case runs on the suite's Ray session."""
    if case.ray:
        request.getfixturevalue("ray_session")
        return

    def boom(*_, **__):
        """The stages' init_ray for a case that must be refused before it."""
        raise AssertionError(f"Ray was started for {case.kind!r}: it should be refused before")

    for module in (stage1, coldstart, evaluate, pipeline, rewrite, tune):
        monkeypatch.setattr(module, "init_ray", boom)


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.kind, marks=[pytest.mark.ray] if c.ray else []) for c in CASES]
)  # a RAY case asks for the Ray session at run time (fixture ``guard``): its tier is marked here
def test_bad_input_is_one_line_and_writes_nothing(root, case, guard, observed, monkeypatch, capsys):
    """Exit code 2, the one ``error:`` line (holding ``case.says``) and no traceback; every file under
    ``root`` as it was (nothing created, deleted or rewritten)."""
    monkeypatch.chdir(root)  # run.storage_path's default (./runs) and any relative path land here
    argv = case.argv(root)
    before = _files(root)
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2, err
    assert "Traceback" not in err and "Traceback" not in captured.out, err
    assert len(errors) == 1 and lines[-1] == errors[0], err
    if not case.ray:
        assert lines == errors, err  # found before any work: the one line and nothing else
    assert case.says in errors[0], errors[0]
    assert _files(root) == before, "the command wrote (or touched) files"
    short = str(root) + "/"
    observed[case.kind] = ("puma-ray " + shlex.join(argv).replace(short, "DIR/"), errors[0].replace(short, "DIR/"))
