"""Stage 1 integration: Ray Train TorchTrainer, 2 workers, DeepSpeed engine on CPU (gloo)."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray.train
import torch
from safetensors.torch import load

from puma_ray import config as C
from puma_ray import storage
from puma_ray.errors import PumaError
from puma_ray.schema import read_prompt_store
from puma_ray.stage1 import PromptTable, train_prompts
from puma_ray.trainer import lr_schedule, steps_per_epoch


def test_stage1_two_workers_deepspeed(stage1_run, tiny_models, rating_data):
    cfg, summary = stage1_run
    train = pq.read_table(f"{rating_data}/train")
    users = sorted(set(train.column("user_id").to_pylist()))

    meta, ids, prompts = read_prompt_store(f"{cfg.output}/prompts")
    assert sorted(ids) == users and len(ids) == len(set(ids))
    assert meta.hidden_size == 64 and meta.prompt_length == 2 and prompts.shape == (len(users), 128)
    assert meta.stage == "prompts" and meta.model == tiny_models["llama"]
    assert np.abs(prompts).max() > 0.1  # moved away from the uniform(-0.1, 0.1) init
    # every epoch reported a checkpoint (2 kept), each epoch pushed ~all rows through the LM
    runs = os.path.join(cfg.run.storage_path, cfg.run.name)
    ckpts = [d for d in os.listdir(runs) if os.path.isdir(os.path.join(runs, d)) and d.startswith("checkpoint_")]
    assert len(ckpts) == 2
    n = train.num_rows
    assert 2 * (n - 2) <= summary["lm_sample_passes"] <= 2 * n
    assert summary["final_metrics"]["val_rows"] > 0 and np.isfinite(summary["final_metrics"]["val_rmse"])
    assert (
        storage.exists(f"{cfg.output}/head.safetensors")
        and json.load(open(f"{cfg.output}/head.json"))["task"] == "rating"
    )


def test_random_init_keeps_prompts_and_ctr_task(tmp_path, stage1_cfg, ctr_data, ray_session):
    cfg = stage1_cfg(
        tmp_path, ctr_data, task="ctr", train={"epochs": 1, "train_prompts": False}, scaling={"zero_stage": 0}
    )
    summary = train_prompts(cfg)
    _, _, prompts = read_prompt_store(f"{cfg.output}/prompts")
    assert np.abs(prompts).max() <= 0.1  # frozen at init
    assert 0.0 <= summary["final_metrics"]["val_auc"] <= 1.0


def test_bad_labels_fail_before_training(tmp_path, stage1_cfg, rating_data, ray_session):
    t = pq.read_table(f"{rating_data}/train")
    t = t.set_column(
        t.schema.get_field_index("label"), "label", pc.add(t.column("label"), pa.scalar(3.0, pa.float32()))
    )
    storage.write_table(str(tmp_path / "bad/part-0.parquet"), t)
    cfg = stage1_cfg(tmp_path, data={"train": str(tmp_path / "bad"), "valid": None})
    with pytest.raises(PumaError, match=r"bad: \d+ label\(s\) outside the rating range 1..5"):
        train_prompts(cfg)


def test_empty_interactions(tmp_path, stage1_cfg, rating_data, ray_session):
    t = pq.read_table(f"{rating_data}/train").slice(0, 0)
    storage.write_table(str(tmp_path / "empty/part-0.parquet"), t)
    cfg = stage1_cfg(tmp_path, data={"train": str(tmp_path / "empty"), "valid": None})
    with pytest.raises(PumaError, match="empty input"):
        train_prompts(cfg)


def _last_checkpoint_state(cfg) -> list[dict]:
    """The run's last checkpoint (by time): each rank's local state (prompt table + its optimizer
    state), then the shared module's optimizer state."""
    runs_dir = Path(cfg.run.storage_path, cfg.run.name)
    last = max(d for d in runs_dir.iterdir() if d.is_dir() and d.name.startswith("checkpoint_"))
    return [load(f.read_bytes()) for f in sorted(last.glob("local-*.safetensors"))] + [
        load((last / "optimizer-00000.safetensors").read_bytes())
    ]


def stop_after_first_epoch():
    """A Ray Train callback ending the run (an error on its controller) once the first epoch is
    checkpointed; defined here so that it is pickled by value for the controller."""

    class StopAfterFirstEpoch(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            raise RuntimeError("interrupted after epoch 1 (test)")

    return StopAfterFirstEpoch()


def test_interrupted_run_resumes_to_the_uninterrupted_state(tmp_path, stage1_cfg, stage1_run):
    """A run interrupted after its first epoch and run again (same run.name) resumes from that
    checkpoint and ends with the table, the per-row optimizer state and the store of an
    uninterrupted run of the same config (the suite's 2-worker stage-1 run); its LM sample-passes
    count both runs' epochs once."""
    cfg = stage1_cfg(tmp_path)
    with pytest.raises(Exception, match="interrupted after epoch 1"):
        train_prompts(cfg, callbacks=(stop_after_first_epoch(),))
    resumed = train_prompts(cfg)
    straight, uninterrupted = stage1_run
    assert resumed["lm_sample_passes"] == uninterrupted["lm_sample_passes"] and resumed["final_metrics"]["epoch"] == 1
    states = [_last_checkpoint_state(cfg), _last_checkpoint_state(straight)]
    assert len(states[0]) == len(states[1]) == 3
    for a, b in zip(*states):
        assert set(a) == set(b) and len(a) >= 3
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert set(states[0][0]) == {"weight", "exp_avg", "exp_avg_sq", "steps"} and states[0][0]["steps"].max() > 0
    _, ids_a, p_a = read_prompt_store(f"{cfg.output}/prompts")
    _, ids_b, p_b = read_prompt_store(f"{straight.output}/prompts")
    assert ids_a == ids_b and np.array_equal(p_a, p_b)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_row_wise_adamw_is_adamw_on_the_rows_it_touches(weight_decay):
    """With every row in every step the table's lazy AdamW is torch's AdamW (clipping included);
    rows absent from a step keep their weights, moments and step counts."""
    torch.manual_seed(0)
    train = C.TrainConfig(lr=1e-3, prompt_lr=5e-2, weight_decay=weight_decay, grad_clip=0.5, epochs=1)
    schedule = lr_schedule(train, steps_per_epoch=6)
    table = PromptTable(4, 2, 3, 0.1, train=True)
    table.configure(train, schedule)
    dense = torch.nn.Parameter(table.weight.clone())
    opt = torch.optim.AdamW([dense], lr=5e-2, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    target = torch.randn(4, 2, 3)
    for _ in range(5):
        idx = torch.tensor([0, 1, 2, 3, 1])  # every row, one twice: its gradients add up
        (table(idx) - target[idx]).pow(2).sum().backward()
        table.step()
        (dense[idx].view(-1, 2, 3) - target[idx]).pow(2).sum().backward()
        torch.nn.utils.clip_grad_norm_([dense], 0.5)
        opt.step()
        sched.step()
        opt.zero_grad()
    assert torch.allclose(table.weight, dense.detach(), atol=1e-6)
    assert torch.allclose(table.exp_avg_sq, opt.state[dense]["exp_avg_sq"], atol=1e-9)
    before = {k: v.clone() for k, v in table.state_dict().items()}
    (table(torch.tensor([2])) - target[2]).pow(2).sum().backward()
    table.step()
    after = table.state_dict()
    for k in before:
        changed = (before[k] != after[k]).reshape(4, -1).any(1)
        assert changed.tolist() == [False, False, True, False], k


def test_workers_hold_only_their_users(stage1_run, rating_data):
    """Stage 1 partitions users: each of the 2 workers' prompt tables holds only its users
    (disjoint, all covered), every worker writes its own store file, and no table holds all users
    (the largest under 75% of them)."""

    users = sorted(set(pq.read_table(f"{rating_data}/train", columns=["user_id"]).column("user_id").to_pylist()))
    cfg, summary = stage1_run
    assert sum(summary["worker_users"]) == len(users) and len(summary["worker_users"]) == 2
    files = storage.list_files(f"{cfg.output}/prompts", ".parquet")
    assert len(files) == 2
    held = [pq.read_table(f, columns=["user_id"]).column("user_id").to_pylist() for f in files]
    assert sorted(u for h in held for u in h) == users  # disjoint and complete
    assert [len(h) for h in held] == summary["worker_users"]
    assert max(summary["worker_users"]) < 0.75 * len(users)
    assert summary["final_metrics"]["val_rows"] > 0


def test_min_steps_shrinks_micro_batches_not_passes():
    """train.min_steps: with few rows the steps follow the rows (smaller micro-batches, never under
    MIN_MICRO rows); with many rows batch_size rules; 0 is off."""
    t = C.TrainConfig(epochs=2, batch_size=128, min_steps=400)
    assert steps_per_epoch(5_700, t) == 200  # 2 x 200 steps of ~29 rows instead of 2 x 45 of 128
    assert steps_per_epoch(100_000, t) == 782  # ceil(100k / 128): already more than 200
    assert steps_per_epoch(800, t) == 800 // C.MIN_MICRO  # at most one step per 8 rows
    assert steps_per_epoch(5_700, t.model_copy(update={"min_steps": 0})) == 45
    assert steps_per_epoch(3, t) == 1


def test_a_run_name_trained_with_another_config_is_refused(tmp_path, stage1_run):
    """Resuming run.name with other training settings would return the old run's result as this one's."""
    cfg, _ = stage1_run
    other = cfg.model_copy(update={"output": str(tmp_path / "out"), "train": cfg.train.model_copy(update={"lr": 1e-3})})
    with pytest.raises(PumaError, match=f"run.name '{cfg.run.name}' trained with another config"):
        train_prompts(other)
