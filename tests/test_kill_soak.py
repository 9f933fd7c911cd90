"""The random-kill soak of the rewrite, trimmed (issue 25, item 3): `benchmarks/kill_soak.py` with a
few kills on local files and on moto S3. Every round's output must equal an uninterrupted rewrite's
byte for byte, every user exactly once; the benchmark itself runs >= 20 kills per storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray  # the benchmark, in a subprocess, starts its own Ray (and moto)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rewrite_survives_random_kills_local_and_s3(tmp_path):
    argv = [sys.executable, os.path.join(ROOT, "benchmarks", "kill_soak.py")]
    argv += ["--kills", "3", "--users", "6000", "--unit-rows", "200", "--work", str(tmp_path), "--seed", "1"]
    run = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert [r["storage"] for r in summary["runs"]] == ["local", "s3"]
    for r in summary["runs"]:
        assert r["kills"] == 3 and r["problems"] == [], r
        assert r["driver_kills"] >= 1, r  # the first kill of each storage is the driver's: a resume
    print(run.stderr[-1500:])
