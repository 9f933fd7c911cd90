"""Stage 1 integration: Ray Train TorchTrainer, 2 workers, DeepSpeed engine on CPU (gloo)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from puma_ray import config as C
from puma_ray import storage
from puma_ray.errors import PumaError
from puma_ray.schema import read_prompt_store
from puma_ray.stage1 import train_prompts


def _cfg(tmp_path, models, data_dir, task="rating", **over):
    base = {
        "task": task,
        "model": {"path": models["llama"]},
        "data": {"train": f"{data_dir}/train", "valid": f"{data_dir}/valid"},
        "output": str(tmp_path / "out"),
        "train": {"epochs": 2, "batch_size": 64, "lr": 3e-3, "prompt_lr": 3e-2},
        "scaling": {"num_workers": 2, "zero_stage": 1},
        "run": {"name": f"t-{tmp_path.name}", "storage_path": str(tmp_path / "runs")},
    }
    return C.build(C.PromptsConfig, C.deep_merge(base, over))


def test_stage1_two_workers_deepspeed(tmp_path, tiny_models, rating_data, ray_session):
    cfg = _cfg(tmp_path, tiny_models, rating_data, prompt_length=2)
    summary = train_prompts(cfg)
    train = pq.read_table(f"{rating_data}/train")
    users = sorted(set(train.column("user_id").to_pylist()))

    meta, ids, prompts = read_prompt_store(f"{cfg.output}/prompts")
    assert sorted(ids) == users and len(ids) == len(set(ids))
    assert meta.hidden_size == 64 and meta.prompt_length == 2 and prompts.shape == (len(users), 128)
    assert meta.stage == "prompts" and meta.model == tiny_models["llama"]
    assert np.abs(prompts).max() > 0.1  # moved away from the uniform(-0.1, 0.1) init
    # every epoch reported a checkpoint (2 kept), each epoch pushed ~all rows through the LM
    ckpts = [d for d in (tmp_path / "runs" / cfg.run.name).iterdir() if d.is_dir() and d.name.startswith("checkpoint_")]
    assert len(ckpts) == 2
    n = train.num_rows
    assert 2 * (n - 2) <= summary["lm_sample_passes"] <= 2 * n
    assert summary["final_metrics"]["val_rows"] > 0 and np.isfinite(summary["final_metrics"]["val_rmse"])
    assert (
        storage.exists(f"{cfg.output}/head.safetensors")
        and json.load(open(f"{cfg.output}/head.json"))["task"] == "rating"
    )


def test_random_init_keeps_prompts_and_ctr_task(tmp_path, tiny_models, ctr_data, ray_session):
    cfg = _cfg(
        tmp_path,
        tiny_models,
        ctr_data,
        task="ctr",
        train={"epochs": 1, "train_prompts": False},
        scaling={"zero_stage": 0},
    )
    summary = train_prompts(cfg)
    _, _, prompts = read_prompt_store(f"{cfg.output}/prompts")
    assert np.abs(prompts).max() <= 0.1  # frozen at init
    assert 0.0 <= summary["final_metrics"]["val_auc"] <= 1.0


def test_bad_labels_fail_before_training(tmp_path, tiny_models, rating_data, ray_session):
    t = pq.read_table(f"{rating_data}/train")
    t = t.set_column(
        t.schema.get_field_index("label"), "label", pc.add(t.column("label"), pa.scalar(3.0, pa.float32()))
    )
    storage.write_table(str(tmp_path / "bad/part-0.parquet"), t)
    cfg = _cfg(tmp_path, tiny_models, rating_data, data={"train": str(tmp_path / "bad"), "valid": None})
    with pytest.raises(PumaError, match=r"bad: \d+ label\(s\) outside the rating range 1..5"):
        train_prompts(cfg)


def test_empty_interactions(tmp_path, tiny_models, rating_data, ray_session):
    t = pq.read_table(f"{rating_data}/train").slice(0, 0)
    storage.write_table(str(tmp_path / "empty/part-0.parquet"), t)
    cfg = _cfg(tmp_path, tiny_models, rating_data, data={"train": str(tmp_path / "empty"), "valid": None})
    with pytest.raises(PumaError, match="empty input"):
        train_prompts(cfg)


def test_rerun_same_name_resumes_from_latest_checkpoint(tmp_path, tiny_models, rating_data, ray_session):
    first = train_prompts(_cfg(tmp_path, tiny_models, rating_data, train={"epochs": 1}, data={"valid": None}))
    second = train_prompts(_cfg(tmp_path, tiny_models, rating_data, train={"epochs": 2}, data={"valid": None}))
    # the second run trained only epoch 2: cumulative passes are two epochs' worth, not three
    assert second["lm_sample_passes"] == 2 * first["lm_sample_passes"]
    assert second["final_metrics"]["epoch"] == 1


def test_workers_hold_only_their_users(tmp_path, tiny_models, rating_data, ray_session):
    """Stage 1 partitions users: each worker's prompt table holds only its users (disjoint, all
    covered), every worker writes its own store file, and the table per worker shrinks as workers
    are added."""

    users = sorted(set(pq.read_table(f"{rating_data}/train", columns=["user_id"]).column("user_id").to_pylist()))
    per_worker = {}
    for w in (1, 2):
        cfg = _cfg(
            tmp_path / f"w{w}",
            tiny_models,
            rating_data,
            train={"epochs": 1},
            scaling={"num_workers": w, "zero_stage": 0},
        )
        summary = train_prompts(cfg)
        fm = summary["final_metrics"]
        assert sum(summary["worker_users"]) == len(users) and len(summary["worker_users"]) == w
        files = storage.list_files(f"{cfg.output}/prompts", ".parquet")
        assert len(files) == w
        held = [pq.read_table(f, columns=["user_id"]).column("user_id").to_pylist() for f in files]
        assert sorted(u for h in held for u in h) == users  # disjoint and complete
        assert [len(h) for h in held] == summary["worker_users"]
        per_worker[w] = max(summary["worker_users"])
        assert fm["val_rows"] > 0
    assert per_worker[2] < 0.75 * per_worker[1]
