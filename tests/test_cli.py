"""The command line: help, one-line errors (no tracebacks) for user mistakes, data/models commands."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from puma_ray.cli import main


def test_help_lists_stages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("data", "models", "prompts", "evaluate", "quickstart"):
        assert cmd in out


def test_bad_config_is_one_line_error(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: m}\ndata: {train: t}\noutput: o\ntrain: {epochz: 1}\n")
    assert main(["prompts", "train", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.epochz" in err and "Traceback" not in err and err.count("\n") == 1


def test_missing_config_file(tmp_path, capsys):
    assert main(["evaluate", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_data_synth_and_models_tiny_commands(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--users", "30", "--task", "ctr", "--seed", "1"]) == 0
    meta = json.load(open(tmp_path / "d" / "meta.json"))
    assert meta["users"] == 30 and meta["task"] == "ctr"
    assert "history_text" in pq.read_schema(next((tmp_path / "d" / "train").iterdir())).names
    assert main(["data", "synth", "--out", str(tmp_path / "d2"), "--users", "0"]) == 2
    assert main(["models", "tiny", "--out", str(tmp_path / "m"), "--families", "llama,gemma3"]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["gemma3", "llama"]
    assert main(["models", "tiny", "--out", str(tmp_path / "m2"), "--families", "gpt9"]) == 2
    assert "unknown model family 'gpt9'" in capsys.readouterr().err


def test_console_script_installed():
    r = subprocess.run([sys.executable, "-m", "puma_ray.cli", "quickstart", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "results.json" in r.stdout


@pytest.mark.parametrize("job", ["prompts", "migrate", "rewrite", "evaluate"])
def test_job_entrypoints_are_the_cli(job):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        [sys.executable, os.path.join(root, "jobs", f"{job}.py"), "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "--config" in r.stdout
