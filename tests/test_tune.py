"""`puma-ray tune` on tiny models: a 2-trial search, one at a time, interrupted after the first epoch
report and resumed; ASHA really stops the weak trial; the best adapter feeds `rewrite`; the Pareto
frontier on hand-made points; search-space and resource mistakes as one-line errors."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import random_store, users_of
from ray.tune import Callback
from ray.util.state import list_actors

from puma_ray import config as C
from puma_ray import storage
from puma_ray.cli import main
from puma_ray.errors import PumaError
from puma_ray.rewrite import rewrite
from puma_ray.schema import read_prompt_store
from puma_ray.tune import check_search, expected_trials, max_concurrent, tune
from puma_ray.tune_report import pareto_front

GOOD_LR, BAD_LR = 3e-2, 1e-7  # 1e-7 learns nothing in an epoch: the trial ASHA must stop


def tcfg(root, models, data, src, **over):
    base = {
        "model": {"path": models["qwen2"]},
        "sources": [src],
        "data": {"train": f"{data}/train", "valid": f"{data}/valid"},
        "select": {"strategy": "random", "budget": 20},
        "adapter": {"width": 32},
        "train": {"epochs": 2, "batch_size": 64},
        "scaling": {"num_workers": 1},
        "rewrite": {"batch_size": 16},
        "run": {"storage_path": f"{root}/ray"},
        # scored on the training users: there one epoch at GOOD_LR is clearly ahead of BAD_LR, which
        # the scheduler test needs (on all 60 users the gap after one epoch is within noise)
        "validation": {"users": "selected"},
    }
    d = {
        "base": base,
        "output": f"{root}/out",
        "storage_path": f"{root}/tune",
        "name": "t",
        "seed": 0,
        "num_samples": 1,
        "max_concurrent": 1,  # trials in grid order, so the weak trial meets the learning one at ASHA's rung
        # grid order: trial 0 learns, trial 1 does not; depth and budget are sampled per trial
        "search": {
            "train.lr": {"grid": [GOOD_LR, BAD_LR]},
            "adapter.depth": {"choice": [0, 1]},
            "select.budget": {"choice": [15, 20]},
        },
    }
    return C.build(C.TuneConfig, C.deep_merge(d, over))


class InterruptOnce(Callback):
    """SIGINT to this process (as Ctrl+C) at the first epoch report. Tune keeps its callbacks with the
    experiment and brings them back on restore, so 'once' is a file, not an attribute."""

    def __init__(self, flag: str):
        self.flag = flag

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not os.path.exists(self.flag):
            open(self.flag, "w").close()
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def search(tmp_path_factory, tiny_models, rating_data, ray_session):
    """Run the search, interrupt it at the first epoch report, then resume it."""

    root = str(tmp_path_factory.mktemp("tune"))
    src = random_store(f"{root}/src", tiny_models["llama"], users_of(rating_data))
    cfg = tcfg(root, tiny_models, rating_data, src)
    with pytest.raises(
        PumaError, match="search interrupted with [12] of 2 trials unfinished; run the same command again"
    ):
        tune(cfg, callbacks=(InterruptOnce(f"{root}/interrupted"),))
    assert os.path.exists(f"{root}/interrupted") and not os.path.exists(f"{root}/out/results.json")
    first_ids = sorted(p for p in os.listdir(f"{root}/tune/t") if re.fullmatch(r"[0-9a-f]{5}_\d{5}", p))
    results = tune(cfg)
    return {
        "cfg": cfg,
        "root": root,
        "src": src,
        "results": results,
        "first_ids": first_ids,
        "users": users_of(rating_data),
    }


def test_search_resumes_and_completes_with_costs(search):
    r, cfg = search["results"], search["cfg"]
    rows = {t["trial_id"]: t for t in r["trials"]}
    assert (
        len(rows) == expected_trials(cfg) == 2 and search["first_ids"] and set(search["first_ids"]) <= set(rows)
    )  # the same experiment, resumed
    assert all(t["status"] in ("completed", "stopped") for t in rows.values())
    for t in rows.values():
        assert t["selected_users"] == t["values"]["select.budget"]
        assert t["lm_sample_passes"] > 0 and t["wall_s"] > 0 and t["epochs_done"] >= 1 and np.isfinite(t["val_rmse"])
    good = [t for t in rows.values() if t["values"]["train.lr"] == GOOD_LR]
    assert all(t["status"] == "completed" and t["epochs_done"] == 2 for t in good)
    assert r["best"]["values"]["train.lr"] == GOOD_LR and r["best"]["status"] == "completed"
    assert r["best"]["val_rmse"] == min(t["val_rmse"] for t in rows.values() if t["status"] == "completed")
    # Pareto files agree with the rows
    pareto = storage.read_json(f"{cfg.output}/pareto.json")
    assert [t["trial_id"] for t in pareto["frontier"]] == r["pareto"]
    assert [t["trial_id"] for t in pareto_front(r["trials"], "val_rmse", "min", "lm_sample_passes")] == r["pareto"]
    md = open(f"{cfg.output}/pareto.md").read()
    assert "## Pareto frontier" in md and all(tid in md for tid in rows)
    assert open(f"{cfg.output}/frontier.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # a rerun of a finished search changes nothing; a different search in the same place is refused

    with pytest.raises(PumaError, match="holds a different search"):
        tune(cfg.model_copy(update={"num_samples": 3}))


def _live_train_actors(timeout_s: float) -> list[str]:
    """Class names of Ray Train's controller and worker actors still alive, after up to ``timeout_s``."""
    deadline = time.time() + timeout_s
    while True:
        alive = [a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)]
        live = [c for c in alive if c in ("TrainController", "RayTrainWorker")]
        if not live or time.time() > deadline:
            return live
        time.sleep(1)


def test_scheduler_really_stops_the_weak_trial(search):
    r, cfg = search["results"], search["cfg"]
    last_bad = max((t for t in r["trials"] if t["values"]["train.lr"] == BAD_LR), key=lambda t: t["trial_id"])
    # It reached ASHA's rung (epoch 1) after the learning trial: stopped there, one epoch of two.
    assert last_bad["status"] == "stopped" and last_bad["epochs_done"] == 1
    results = [json.loads(line) for line in open(f"{cfg.storage_path}/{cfg.name}/{last_bad['trial_id']}/result.json")]
    assert [x["training_iteration"] for x in results] == [1] and results[-1]["epochs_done"] == 1
    # The Train runs were ended, not left running. (An epoch takes under a second here, so the stopped
    # run may finish its second epoch before the stop reaches it; Tune ignores it, and so does the table.)
    assert _live_train_actors(timeout_s=60) == []
    es = r["early_stopping"]
    assert es["stopped"] >= 1 and es["epochs_run"] < es["epochs_if_all_completed"] == 4


def test_best_adapter_feeds_rewrite(search):
    best = f"{search['cfg'].output}/best"
    assert os.path.exists(f"{best}/adapter/adapter.safetensors") and os.path.exists(f"{best}/head.json")
    job = C.load(C.RewriteJobConfig, f"{best}/rewrite.yaml", [f"output={search['root']}/rewritten"])
    assert job.adapter == f"{best}/adapter"
    manifest = rewrite(job)
    _, ids, prompts = read_prompt_store(f"{search['root']}/rewritten/prompts")
    assert sorted(ids) == search["users"] and prompts.shape[1] == 96 and manifest["output"]["rows"] == len(ids)
    migrate = yaml.safe_load(open(f"{best}/migrate.yaml"))
    assert (
        migrate["run"]["name"] == f"t-{search['results']['best']['trial_id']}"
    )  # reuses the best trial's training run
    C.build(C.MigrateConfig, migrate)


def test_pareto_front_hand_made():
    rows = [
        {"id": "a", "m": 1.00, "c": 10},
        {"id": "b", "m": 0.90, "c": 20},
        {"id": "c", "m": 0.95, "c": 25},  # dominated by b (cheaper and better)
        {"id": "d", "m": 0.80, "c": 40},
        {"id": "e", "m": 0.80, "c": 50},  # same quality as d, dearer
        {"id": "f", "m": 1.20, "c": 10},  # same cost as a, worse
        {"id": "g", "m": 0.80, "c": 40},  # identical to d: kept beside it
        {"id": "h", "m": float("nan"), "c": 1},
        {"id": "i", "m": 0.5, "c": None},
    ]
    assert [r["id"] for r in pareto_front(rows, "m", "min", "c")] == ["a", "b", "d", "g"]
    flipped = [{**r, "m": -r["m"]} if isinstance(r["m"], float) else r for r in rows]
    assert [r["id"] for r in pareto_front(flipped, "m", "max", "c")] == ["a", "b", "d", "g"]
    assert pareto_front([], "m", "min", "c") == []
    assert [r["id"] for r in pareto_front(rows[:1], "m", "min", "c")] == ["a"]


def base_cfg(**over):
    d = {
        "base": {
            "model": {"path": "m"},
            "sources": ["s"],
            "data": {"train": "t", "valid": "v"},
            "scaling": {"num_workers": 2},
        },
        "output": "o",
        "search": over.pop("search", {"train.lr": {"loguniform": [1e-4, 1e-2]}}),
    }
    return C.build(C.TuneConfig, C.deep_merge(d, over))


def test_config_defaults_and_mistakes():
    cfg = base_cfg()
    assert (cfg.metric, cfg.mode, cfg.base.output) == ("val_rmse", "min", os.path.abspath("o"))  # URIs: absolute
    ctr = base_cfg(base={"task": "ctr"})
    assert (ctr.metric, ctr.mode) == ("val_auc", "max")
    for over, msg in [
        ({"search": {"train.lr": {"loguniform": [0, 1]}}}, "loguniform needs low > 0"),
        ({"search": {"train.lr": {"uniform": [2, 1]}}}, "low < high"),
        ({"search": {"train.lr": {"choice": [1], "grid": [2]}}}, "exactly one of"),
        ({"search": {"train.lr": {"normal": [0, 1]}}}, "search.train.lr"),
        ({"metric": "val_f1"}, "set mode"),
        ({"base": {"data": {"valid": None}}}, "base.data.valid is required"),
        ({"schedulr": {}}, "schedulr"),
    ]:
        with pytest.raises(PumaError, match=msg.replace("(", r"\(")):
            base_cfg(**over)
    for search, msg in [
        ({"adapter.widht": {"choice": [64]}}, r"search.adapter.widht=64: .*widht"),
        ({"adapter.width": {"choice": [64, 0]}}, r"search.adapter.width=0: .*greater than or equal to 1"),
        ({"select.strategy": {"choice": ["random", "kmean"]}}, r"search.select.strategy='kmean': .*'random', "),
        ({"train.epochs": {"choice": [1, 2]}}, "train.epochs is the scheduler's budget"),
        ({"adapter": {"choice": [1]}}, "search.adapter"),
    ]:
        with pytest.raises(PumaError, match=msg):
            check_search(base_cfg().model_copy(update={"search": search}))


def test_max_concurrent_from_resources():
    cfg = base_cfg()  # 2 workers x 1 CPU + 1 for the driver = 3 CPUs a trial
    assert max_concurrent(cfg, {"CPU": 10}) == 3
    assert max_concurrent(base_cfg(max_concurrent=7), {"CPU": 1}) == 7
    gpu = base_cfg(base={"scaling": {"use_gpu": True}})
    assert max_concurrent(gpu, {"CPU": 64, "GPU": 4}) == 2
    with pytest.raises(PumaError, match="one trial needs 3 CPUs"):
        max_concurrent(cfg, {"CPU": 2})


def test_cli_and_job_entrypoint(tmp_path, capsys):
    f = tmp_path / "t.yaml"
    f.write_text(
        "base: {model: {path: m}, sources: [s], data: {train: t, valid: v}}\noutput: o\n"
        "search: {train.lr: {normal: [0, 1]}}\n"
    )
    assert main(["tune", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "search.train.lr" in err and "Traceback" not in err and err.count("\n") == 1
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        [sys.executable, os.path.join(root, "jobs", "tune.py"), "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "--config" in r.stdout and "pareto" in r.stdout
