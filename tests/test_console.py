"""The console: periodic counters with rate and ETA, the relay that brings workers' story lines
to the driver's terminal (worker processes themselves never print there), and a user mistake that
Ray Data finds in a task shown as its one line (Ray's ERROR lines stay in the log file)."""

import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml

from puma_ray import console


def test_duration():
    assert [console.duration(s) for s in (8.4, 130, 3900)] == ["8 s", "2 min 10 s", "1 h 05 min"]


def test_listing_names_a_few_and_counts_the_rest():
    assert console.listing(["a", "b"]) == "a, b"
    assert console.listing([f"m{i}" for i in range(48)], at_most=2) == "m0, m1 and 46 more"


def test_progress_prints_rate_and_eta_only_when_due(capsys, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    p = console.Progress("rewrite", total=1000, unit="users", every=5.0)
    now[0] += 1
    p.add(100)  # not due yet: a short loop prints nothing
    assert capsys.readouterr().err == ""
    now[0] += 4
    p.add(150)  # 250 users in 5 s: 50/s, 750 left -> 15 s
    assert capsys.readouterr().err == "rewrite: 250/1,000 users (25%), 50 users/s, ETA 15 s\n"
    now[0] += 15
    p.add(750)
    assert p.close() == 20
    assert capsys.readouterr().err.splitlines()[-1] == "rewrite: 1,000/1,000 users (100%), 50 users/s"


def test_a_counter_that_printed_its_end_closes_without_repeating_it(capsys, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    p = console.Progress("rewrite", total=40, unit="users", every=5.0)
    now[0] += 8
    p.add(40)
    p.close()
    assert capsys.readouterr().err.splitlines() == ["rewrite: 40/40 users (100%), 5.0 users/s"]


def test_quiet_progress_closes_silently(capsys):
    p = console.Progress("scoring", total=10)
    p.add(10)
    p.close()
    assert capsys.readouterr().err == ""


@ray.remote
def _worker(handle) -> None:
    console.tell(handle, "adapter: epoch 1/2 train_loss=0.5000")
    counter = console.RemoteProgress(handle, "evaluate: scoring puma", total=30, every=0.0)
    for _ in range(3):
        counter.add(10)
    counter.close()


def test_relay_prints_worker_lines_and_counts_on_the_driver(capsys, ray_session):
    with console.Relay() as relay:
        ray.get(_worker.remote(relay.handle))
    assert "adapter: epoch 1/2 train_loss=0.5000" in capsys.readouterr().err.splitlines()
    assert relay.counters["evaluate: scoring puma"].done == 30


def test_a_late_item_from_a_closed_relay_is_dropped(capsys, ray_session):
    with console.Relay() as first:
        pass
    first.handle.send(("line", "evaluate: a line sent after its stage ended"), wait=True)
    with console.Relay() as second:
        console.tell(second.handle, "train: this stage's line")
    assert capsys.readouterr().err.splitlines() == ["train: this stage's line"]


def test_a_mistake_found_in_a_ray_data_task_is_one_line(tmp_path, ray_session):
    """`puma-ray evaluate` on held-out rows with a NaN rating (in no Parquet statistic, so only Ray Data's
    pass over the rows finds it): Ray Data's task raises, and the console
    shows the one-line error only; Ray Data's ERROR lines (streaming_executor_state's, the stack-trace
    hint) are in the log file named at the start. The command joins this session's Ray (RAY_ADDRESS)
    instead of starting its own."""
    for split, labels in (("train", [1.0, 2.0, 3.0, 4.0]), ("valid", [1.0, float("nan"), 3.0, 4.0])):
        (tmp_path / split).mkdir()
        rows = {
            "user_id": ["u0", "u0", "u1", "u1"],
            "item_id": ["i0", "i1", "i2", "i3"],
            "label": pa.array(labels, pa.float32()),
            "item_text": ["a b"] * 4,
        }
        pq.write_table(pa.table(rows), tmp_path / split / "part-0.parquet")
    data = {"train": str(tmp_path / "train"), "valid": str(tmp_path / "valid")}
    (tmp_path / "evaluate.yaml").write_text(yaml.safe_dump({"data": data, "baselines": ["global_mean"]}))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    argv = [sys.executable, "-m", "puma_ray.cli", "evaluate", "--config", str(tmp_path / "evaluate.yaml")]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    lines = (r.stdout + r.stderr).splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert lines[-1] == f"error: {data['valid']}: 1 label(s) outside the rating range 1..5, e.g. [nan]"
    assert [line for line in lines if "ERROR" in line or "Traceback" in line] == [], r.stderr
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:]
    log = re.search(r"Ray's own messages in (\S+);", r.stderr).group(1)
    assert "ERROR streaming_executor_state.py" in open(log).read()
