"""The quickstart end to end at toy size, through the CLI: results.json has the promised shape, and
the console tells a short story with no Ray/DeepSpeed worker log line in it."""

import json
import re
import subprocess
import sys

import pytest

# Ray's worker prefixes, raylet notes, Ray Data plans, DeepSpeed's "[date] [INFO] [file.py:n]" lines, colours
WORKER_LOG = re.compile(
    r"\(\w+ pid=\d+|\(raylet\)|PYTHON worker|Execution plan|TrainingReport|\[(INFO|WARNING)\]|ds_accelerator|\x1b\["
)


@pytest.mark.ray  # the quickstart, in a subprocess, starts its own Ray
def test_quickstart_cli_results_and_console(tmp_path):
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), "--users", "40", "--epochs", "1", "--workers", "1"]
    r = subprocess.run([sys.executable, "-m", "puma_ray.cli", *args], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = (r.stdout + r.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert not [line for line in lines if WORKER_LOG.search(line)], "\n".join(lines)
    story = "\n".join(lines)
    assert story.count("prompts: epoch 1/1 train_loss=") == 3 and story.count("adapter: epoch 2/2 train_loss=") == 1
    assert "worker logs (Ray Train, Ray Data, DeepSpeed) are in" in story and "| puma |" in story

    on_disk = json.load(open(out / "results.json"))
    assert on_disk["task"] == "rating"
    assert set(on_disk["methods"]) == {
        "puma",
        "full_retrain",
        "source",
        "random_init",
        "global_mean",
        "user_mean",
        "bias",
    }
    for name, m in on_disk["methods"].items():
        assert set(m) == {"rmse", "mae", "lm_sample_passes", "wall_s"}, name
        assert 0 < m["rmse"] < 4 and 0 < m["mae"] <= m["rmse"]
    assert on_disk["methods"]["source"]["lm_sample_passes"] > 0
    assert on_disk["methods"]["global_mean"]["lm_sample_passes"] == 0
    assert set(on_disk["puma_by_users"]) >= {"rmse_in_adapter_users", "rmse_out_adapter_users"}


def test_real_quickstart_refuses_ctr_before_any_work(tmp_path):
    """`--models real` tells the rating story only: ctr is one line, before any download or Ray."""
    args = ["quickstart", "--out", str(tmp_path / "qs"), "--models", "real", "--task", "ctr"]
    r = subprocess.run([sys.executable, "-m", "puma_ray.cli", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: quickstart --models real tells the rating story")
    assert not (tmp_path / "qs").exists()


@pytest.mark.parametrize("share", ["1.5", "-0.1", "nan"])
def test_quickstart_refuses_a_bad_holdout_before_any_work(tmp_path, share):
    """`--holdout` outside [0, 1) is one line, before any data or model is written."""
    args = ["quickstart", "--out", str(tmp_path / "qs"), f"--holdout={share}"]
    r = subprocess.run([sys.executable, "-m", "puma_ray.cli", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --holdout: holdout: ")
    assert not (tmp_path / "qs").exists()
