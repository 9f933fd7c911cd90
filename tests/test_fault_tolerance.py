"""Fault tolerance of training: one Ray Train worker PROCESS is killed (SIGKILL) mid-training. With
run.max_failures=1 the run restarts its worker group, resumes from the latest checkpoint (through
ray.train.get_checkpoint(), not from epoch 0) and ends close to an uninterrupted run of the same
config. The epochs Ray Train registered are logged by a UserCallback on the controller."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import ray
import ray.train
from conftest import random_store, users_of
from ray.util.state import list_actors

from puma_ray import config as C
from puma_ray.pipeline import migrate_step
from puma_ray.stage1 import train_prompts

EPOCHS = 2


def epoch_logger(path: str):
    """A Ray Train callback (runs on the controller) appending each registered report to ``path``."""

    class EpochLog(ray.train.UserCallback):  # defined here so it is pickled by value for the controller
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(json.dumps({"epoch": metrics[0]["epoch"], "checkpoint": checkpoint is not None}) + "\n")

    return EpochLog()


def read_log(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path).read().splitlines() if line.strip()]


def train_worker_actors(address: str, state: str | None = None) -> list:
    filters = [("class_name", "=", "RayTrainWorker")] + ([("state", "=", state)] if state else [])
    return list_actors(address=address, filters=filters, detail=True, limit=10_000, raise_on_missing_output=False)


def kill_one_worker_after_first_report(
    log: str, address: str, ignore: set, done: threading.Event, out: dict, delay: float = 0.0
) -> None:
    """Find the run's worker processes while they train (actors not in ``ignore``); SIGKILL one of
    them ``delay`` seconds after the first epoch (and its checkpoint) has been registered."""
    pids: list[int] = []
    first = None
    try:
        while not done.is_set():
            if len(pids) < 2:
                pids = [a.pid for a in train_worker_actors(address, "ALIVE") if a.pid and a.actor_id not in ignore]
            entries = read_log(log)
            if first is None and entries and entries[0]["checkpoint"]:
                first = time.time()
            if len(pids) >= 2 and first is not None and time.time() - first >= delay:
                with open(f"/proc/{pids[0]}/cmdline", "rb") as f:
                    cmd = f.read()
                assert b"RayTrainWorker" in cmd, cmd  # never signal anything but a train worker
                os.kill(pids[0], signal.SIGKILL)
                out.update(killed=pids[0], reports_before=len(read_log(log)), at=time.time())
                return
            time.sleep(0.05)
    except Exception as exc:  # surfaced by the test
        out["error"] = repr(exc)


def test_worker_killed_mid_training_resumes_from_checkpoint(tmp_path, tiny_models, rating_data, ray_session):
    address = (
        "http://" + ray._private.worker.global_worker.node.webui_url
    )  # this session's dashboard, not another Ray on the box
    src = random_store(str(tmp_path / "src"), tiny_models["llama"], users_of(rating_data))

    def cfg(name: str, **run) -> C.MigrateConfig:
        return C.build(
            C.MigrateConfig,
            {
                "model": {"path": tiny_models["qwen2"]},
                "sources": [src],
                "output": str(tmp_path / name),
                "data": {"train": f"{rating_data}/train", "valid": f"{rating_data}/valid"},
                "select": {"strategy": "random", "budget": 20},
                "adapter": {"width": 32},
                "train": {"epochs": EPOCHS, "batch_size": 32, "lr": 3e-3},
                "scaling": {"num_workers": 2},
                "run": {"name": name, "storage_path": str(tmp_path / "ray"), **run},
                "evaluate": False,
            },
        )

    t0 = time.time()
    clean = migrate_step(cfg("clean"), rewrite=False)
    t_clean = time.time() - t0

    before = {a.actor_id for a in train_worker_actors(address)}
    log, out, done = str(tmp_path / "epochs.jsonl"), {}, threading.Event()
    killer = threading.Thread(
        target=kill_one_worker_after_first_report, args=(log, address, before, done, out), daemon=True
    )
    killer.start()
    try:
        resumed = migrate_step(cfg("killed", max_failures=1), rewrite=False, callbacks=(epoch_logger(log),))
    finally:
        done.set()
        killer.join(timeout=30)

    assert "error" not in out, out.get("error")
    assert out.get("killed"), f"no worker was killed (reports: {read_log(log)})"
    assert not os.path.exists(f"/proc/{out['killed']}")
    epochs = [e["epoch"] for e in read_log(log)]
    # resumed, not restarted: every epoch registered once, in order, some before and some after the kill
    assert epochs == list(range(EPOCHS)), epochs
    assert 1 <= out["reports_before"] < EPOCHS
    # the worker group was really replaced: 2 workers, then 2 new ones
    assert len({a.actor_id for a in train_worker_actors(address)} - before) == 4
    assert resumed["final_metrics"]["epoch"] == EPOCHS - 1
    # progress came back from the checkpoint: the interrupted epoch is not counted twice or lost
    assert resumed["lm_sample_passes"] == clean["lm_sample_passes"]
    a, b = resumed["final_metrics"]["val_rmse"], clean["final_metrics"]["val_rmse"]
    assert abs(a - b) <= 0.10 * b, (a, b)
    print(
        f"fault tolerance: killed pid {out['killed']} after {out['reports_before']} epoch(s); val_rmse {a:.4f} "
        f"(uninterrupted {b:.4f}); clean run {t_clean:.0f} s, killed run {time.time() - t0 - t_clean:.0f} s"
    )


def test_stage1_worker_killed_mid_epoch_resumes_within_2_percent(tmp_path, stage1_cfg, stage1_run, ray_session):
    """Stage 1 (per-user prompts): one worker SIGKILLed in the middle of the second epoch; the run
    resumes from the first epoch's checkpoint and ends within 2% of the uninterrupted run's
    validation RMSE (the suite's shared stage-1 run, same config)."""
    address = "http://" + ray._private.worker.global_worker.node.webui_url
    clean_cfg, clean = stage1_run
    epoch_s = clean["train_wall_s"] / clean_cfg.train.epochs
    before = {a.actor_id for a in train_worker_actors(address)}
    log, out, done = str(tmp_path / "epochs.jsonl"), {}, threading.Event()
    killer = threading.Thread(
        target=kill_one_worker_after_first_report,
        args=(log, address, before, done, out, 0.4 * epoch_s),
        daemon=True,
    )
    killer.start()
    try:
        resumed = train_prompts(stage1_cfg(tmp_path, run={"max_failures": 1}), callbacks=(epoch_logger(log),))
    finally:
        done.set()
        killer.join(timeout=30)
    assert "error" not in out, out.get("error")
    assert out.get("killed"), f"no worker was killed (reports: {read_log(log)})"
    # mid-epoch: after the first epoch was registered and before the second was
    assert out["reports_before"] == 1, out
    assert [e["epoch"] for e in read_log(log)] == list(range(clean_cfg.train.epochs))
    assert resumed["lm_sample_passes"] == clean["lm_sample_passes"]
    a, b = resumed["final_metrics"]["val_rmse"], clean["final_metrics"]["val_rmse"]
    assert abs(a - b) <= 0.02 * b, (a, b)
    print(f"stage 1: killed pid {out['killed']} mid-epoch 2; val_rmse {a:.4f} (uninterrupted {b:.4f})")
