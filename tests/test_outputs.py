"""No command destroys data it did not write (puma_ray.outputs): an output is never an input, inside
one or holding one; a non-empty output is written only by the command that wrote it before, unless
the user asks to overwrite. Pure checks on local directories, and the CLI's refusals, which come
before Ray starts (each stage's init_ray is replaced by one that fails the test)."""

from __future__ import annotations

import os

import pytest
import yaml

from puma_ray import coldstart, evaluate, outputs, pipeline, rewrite, stage1, storage, tune
from puma_ray.cli import main
from puma_ray.errors import PumaError


@pytest.mark.parametrize(
    "output, given, how",
    [
        ("runs/source", "runs/source", "is"),
        ("runs/source/", "./runs/source", "is"),
        ("runs/source/out", "runs/source", "is inside"),
        ("runs", "runs/source/prompts", "contains"),
        ("runs/x/../source", "runs/source/prompts", "contains"),
        ("s3://bucket/runs/source", "s3://bucket/runs/source/", "is"),
        ("s3://bucket/runs/source/out", "s3://bucket/runs/source", "is inside"),
        ("s3://bucket/runs", "s3://bucket/runs/source/prompts", "contains"),
        ("s3://bucket", "s3://bucket/runs/source", "contains"),
    ],
)
def test_overlap_is_refused(tmp_path, monkeypatch, output, given, how):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PumaError) as err:
        outputs.check_overlap(output, {"sources": ["elsewhere", given]})
    msg = str(err.value)
    assert msg.startswith(f"output {output} {how} the input sources[1] ({given})") and "\n" not in msg


@pytest.mark.parametrize(
    "output, given",
    [
        ("runs/source2", "runs/source"),  # a common string prefix is not a parent
        ("runs/source", "runs/source2/prompts"),
        ("runs/a/out", "runs/b"),
        ("s3://bucket/runs/source2", "s3://bucket/runs/source"),
        ("s3://other/runs/source", "s3://bucket/runs/source"),
        ("s3://bucket/runs/source", "runs/source"),  # another filesystem
    ],
)
def test_apart_is_accepted(tmp_path, monkeypatch, output, given):
    monkeypatch.chdir(tmp_path)
    outputs.check_overlap(output, {"data.train": given, "data.valid": None, "compare": {"x": given}})


def test_overlap_through_a_symbolic_link_and_allowed_inside(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    with pytest.raises(PumaError, match="is the input run"):
        outputs.check_overlap(str(tmp_path / "alias"), {"run": str(tmp_path / "real")})
    report = str(tmp_path / "real" / "evaluation.json")
    outputs.check_overlap(report, {"runs": {"puma": str(tmp_path / "real")}}, allow_inside=["runs"])
    with pytest.raises(PumaError, match="is inside the input data.valid"):
        outputs.check_overlap(report, {"data.valid": str(tmp_path / "real")}, allow_inside=["runs"])


def test_marker_rule(tmp_path):
    out = str(tmp_path / "out")
    outputs.check_output(out, "rewrite")  # absent
    os.makedirs(out)
    outputs.check_output(out, "rewrite")  # empty
    outputs.mark_output(out, "rewrite", {"output": out})
    storage.write_bytes(f"{out}/prompts/part-0.parquet", b"x")
    outputs.check_output(out, "rewrite")  # its own: resumed or replaced
    record = storage.read_json(f"{out}/{outputs.MARKER}")
    assert record["command"] == "rewrite" and len(record["config_sha256"]) == 64
    with pytest.raises(PumaError) as err:
        outputs.check_output(out, "prompts train")
    msg = str(err.value)
    assert msg == (
        f"{out}: not empty and was written by `puma-ray rewrite`; choose another output, or pass --overwrite "
        "(or set output_mode: overwrite) to write into it anyway"
    )
    outputs.check_output(out, "prompts train", overwrite=True)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(PumaError, match="busy: not empty and holds no output of `puma-ray migrate`.*--overwrite"):
        outputs.check_output(str(busy), "migrate")
    outputs.check_output(str(busy), "migrate", overwrite=True)
    with pytest.raises(PumaError, match="notes.txt: exists and is not a directory"):
        outputs.check_output(str(busy / "notes.txt"), "migrate", overwrite=True)
    with pytest.raises(PumaError, match="is the input run"):  # overwrite never lifts the overlap
        outputs.check_output(str(busy), "prompts coldstart", {"run": str(busy)}, overwrite=True)
    assert os.listdir(busy) == ["notes.txt"]  # a check writes nothing


def test_outputs_of_earlier_versions_are_recognized(tmp_path):
    """Runs written before markers existed: their summary.json stage, a rewrite's state, tune's search.json."""
    run = tmp_path / "run"
    storage.write_json(str(run / "summary.json"), {"stage": "prompts"})
    outputs.check_output(str(run), "prompts train")
    with pytest.raises(PumaError, match="holds no output of `puma-ray migrate`"):
        outputs.check_output(str(run), "migrate")
    storage.write_json(str(tmp_path / "rw" / "rewrite_state" / "plan.json"), {})
    outputs.check_output(str(tmp_path / "rw"), "rewrite")
    storage.write_json(str(tmp_path / "tn" / "search.json"), {})
    outputs.check_output(str(tmp_path / "tn"), "tune")


def test_report_file_rule(tmp_path):
    report = str(tmp_path / "report.json")
    outputs.check_output_file(report, "evaluate")  # absent
    storage.write_json(report, outputs.stamp({"methods": {}}, "evaluate", {"a": 1}))
    outputs.check_output_file(report, "evaluate")  # an earlier report
    storage.write_json(report, {"task": "rating", "valid": "v", "methods": {}})  # a report of an earlier version
    outputs.check_output_file(report, "evaluate")
    storage.write_bytes(report, b"my notes")
    with pytest.raises(PumaError, match="report.json: exists and is not a report of `puma-ray evaluate`"):
        outputs.check_output_file(report, "evaluate")
    outputs.check_output_file(report, "evaluate", overwrite=True)
    with pytest.raises(PumaError, match="is a directory"):
        outputs.check_output_file(str(tmp_path), "evaluate", overwrite=True)


# ---------------------------------------------------------------------------------------------
# The CLI: refused before Ray starts, the inputs untouched


@pytest.fixture
def no_ray(monkeypatch):
    def boom(*_, **__):
        raise AssertionError("Ray was started before the output was checked")

    for module in (stage1, coldstart, evaluate, pipeline, rewrite, tune):
        monkeypatch.setattr(module, "init_ray", boom)


@pytest.fixture
def runs(tmp_path):
    """A source run (prompts/, head.json), an adapter and data, as files (never read: refused first)."""
    files = {
        "runs/source/prompts/part-00000.parquet": b"store",
        "runs/source/head.json": b"{}",
        "runs/puma/adapter/adapter.json": b"{}",
        "data/train/part-0.parquet": b"rows",
        "data/valid/part-0.parquet": b"rows",
    }
    for rel, data in files.items():
        storage.write_bytes(str(tmp_path / rel), data)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    return tmp_path, files


def _config(root, name: str, body: dict) -> str:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


COMMON = {"model": {"path": "models/m"}, "data": {"train": "data/train", "valid": "data/valid"}}
CASES = [
    (
        ["rewrite"],
        {"model": {"path": "models/m"}, "sources": ["runs/source/prompts"], "adapter": "runs/puma/adapter"},
        "runs/source",
        "output runs/source contains the input sources[0] (",
    ),
    (["prompts", "train"], COMMON, "data/train/out", "output data/train/out is inside the input data.train"),
    (
        ["migrate"],
        {**COMMON, "sources": ["runs/source/prompts"]},
        "runs/source",
        "output runs/source contains the input sources[0]",
    ),
    (
        ["prompts", "coldstart"],
        {"run": "runs/source", "data": {"train": "data/train"}},
        "runs/source",
        "output runs/source is the input run",
    ),
    (
        ["evaluate"],
        {"data": {"train": "data/train", "valid": "data/valid"}, "runs": {"src": "runs/source"}},
        "data/valid/report.json",
        "output data/valid/report.json is inside the input data.valid",
    ),
    (
        ["tune"],
        {"base": {**COMMON, "sources": ["runs/source/prompts"]}, "search": {"train.lr": {"choice": [0.1]}}},
        "runs",
        "output runs contains the input sources[0]",
    ),
]


@pytest.mark.parametrize(
    "command, body, output, message", CASES, ids=lambda c: " ".join(c) if isinstance(c, list) else None
)
def test_cli_refuses_an_output_over_an_input(runs, no_ray, monkeypatch, capsys, command, body, output, message):
    root, files = runs
    monkeypatch.chdir(root)
    cfg = _config(root, "job", {**body, "output": "placeholder"})
    message = message.replace(f"output {output} ", f"output {root / output} ", 1)  # configs make paths absolute
    for flag in ([], ["--overwrite"]):  # --overwrite never lifts it
        assert main([*command, "--config", cfg, *flag, f"output={output}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    for rel, data in files.items():  # every input as it was
        assert (root / rel).read_bytes() == data


@pytest.mark.parametrize(
    "command, body, output, message", CASES[:4], ids=lambda c: " ".join(c) if isinstance(c, list) else None
)
def test_cli_refuses_a_foreign_output(runs, no_ray, monkeypatch, capsys, command, body, output, message):
    root, _ = runs
    monkeypatch.chdir(root)
    cfg = _config(root, "job", {**body, "output": "busy"})
    assert main([*command, "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {root / 'busy'}: not empty and holds no output of `puma-ray {' '.join(command)}`; "
        "choose another output, or pass --overwrite (or set output_mode: overwrite) to write into it anyway\n"
    )
    assert os.listdir(root / "busy") == ["notes.txt"]
    cfg = _config(root, "job", {**body, "output": "busy", "output_mode": "nope"})
    assert main([*command, "--config", cfg]) == 2
    assert "output_mode" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Staged writes (issue 25, item 2): publish is all or nothing for readers, and finishes after a cut


def _tree(root: str) -> dict[str, bytes]:
    return {u[len(root) + 1 :]: storage.read_bytes(u) for u in storage.list_files(root)}


def _old_and_staged(out: str) -> None:
    """A complete earlier output (prompts a, b + summary) and a new one staged (prompts b, c + a head)."""
    for name in ("a", "b"):
        storage.write_bytes(storage.join(out, "prompts", f"{name}.parquet"), b"old " + name.encode())
    storage.write_json(storage.join(out, "summary.json"), {"stage": "prompts", "run": "old"})
    for name in ("b", "c"):
        storage.write_bytes(outputs.staged(out, "prompts", f"{name}.parquet"), b"new " + name.encode())
    storage.write_bytes(outputs.staged(out, "head.json"), b"new head")


@pytest.fixture(params=["local", "s3"])
def out_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return storage.join(request.getfixturevalue("s3_bucket"), "out")


def test_publish_replaces_the_output_at_once(out_root):
    out = out_root
    _old_and_staged(out)
    outputs.publish(out, ["prompts", "head.json", "adapter"], retire=["summary.json"])  # adapter: nothing staged
    assert _tree(out) == {"prompts/b.parquet": b"new b", "prompts/c.parquet": b"new c", "head.json": b"new head"}
    outputs.check_published(storage.join(out, "prompts"))  # nothing pending


def test_a_publish_cut_off_is_refused_by_readers_and_finished_by_the_next_run(out_root, monkeypatch):
    out = out_root
    _old_and_staged(out)
    real_move, moves = storage.move, []

    def cut_after_one(src: str, dst: str) -> None:
        if moves:
            raise RuntimeError("killed")
        moves.append(dst)
        real_move(src, dst)

    monkeypatch.setattr(storage, "move", cut_after_one)
    with pytest.raises(RuntimeError, match="killed"):
        outputs.publish(out, ["prompts", "head.json"], retire=["summary.json"])
    monkeypatch.setattr(storage, "move", real_move)
    assert len(moves) == 1 and not storage.exists(storage.join(out, "summary.json"))  # visibly incomplete
    with pytest.raises(PumaError, match="being replaced .* re-run the command"):
        outputs.check_published(storage.join(out, "prompts"))
    outputs.start_staging(out)  # what the next run of the command does first
    assert _tree(out) == {"prompts/b.parquet": b"new b", "prompts/c.parquet": b"new c", "head.json": b"new head"}
    outputs.check_published(storage.join(out, "prompts"))


def test_a_run_that_fails_before_publishing_leaves_the_previous_output_whole(out_root):
    out = out_root
    _old_and_staged(out)  # the new run staged its files, then failed: no publish
    before = {k: v for k, v in _tree(out).items() if not k.startswith(outputs.STAGING)}
    outputs.check_published(storage.join(out, "prompts"))  # readers see the old output, complete
    storage.write_bytes(outputs.staged(out, "rewrite_state", "unit-000000.json"), b"{}")
    outputs.start_staging(out, keep=["rewrite_state"])  # a resumable stage keeps its finished parts
    assert _tree(out) == {**before, f"{outputs.STAGING}/rewrite_state/unit-000000.json": b"{}"}
    outputs.start_staging(out)
    assert _tree(out) == before
