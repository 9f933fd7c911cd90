"""Training throughput inside the Ray Train loop vs the same step in one plain process, in one run.

For stage 1 (per-user prompts + head) and stage 2 (adapter + head) on the same rows and models:

- ``ray_train``: the stage's own entry (``stage1.train_prompts``, ``stage2.train_adapter``) on 2 Ray
  Train workers, 1 core and 1 torch thread each (DeepSpeed engine, gloo all-reduce of the shared
  module, users partitioned over the workers); samples/s of the last epoch's training steps, from
  the run's per-epoch reports (a Ray Train callback).
- ``one_process``: the same step in this process with 2 torch threads on the same 2 cores, no Ray
  Train, no DeepSpeed: the trainable's own batches (``trainer`` length grouping, ``batch``) ->
  ``TaskModel`` -> backward -> the local part's step (stage 1's row-wise table) and torch AdamW on
  the shared module, over the rows written for one worker.

The LM is a random 2-layer Llama of width ``--d`` (default 576, SmolLM2-135M's width) with the tiny
tokenizer, so the step's arithmetic, not Python, dominates. Prints samples/s of both and their
ratio per stage (target >= 0.8).

    python benchmarks/train_throughput.py [--users 200] [--epochs 2] [--batch 64] [--d 576]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import pyarrow.compute as pc
from _testbed import epoch_log, tiny_lm

from puma_ray import config as C
from puma_ray import storage
from puma_ray.datasets.synthetic import synthesize

REPORTED = ("epoch", "wall_s", "lm_sample_passes")  # what each epoch's report keeps (_testbed.epoch_log)


def last_epoch_rate(path: str) -> float:
    """Samples/s of the last epoch's training steps, from the cumulative per-epoch reports."""
    *_, before, last = [{"wall_s": 0.0, "lm_sample_passes": 0.0}] + [json.loads(x) for x in open(path)]
    return (last["lm_sample_passes"] - before["lm_sample_passes"]) / (last["wall_s"] - before["wall_s"])


def rates(ray_rate: float, one_rate: float) -> dict:
    return {"ray_train": round(ray_rate, 1), "one_process": round(one_rate, 1), "ratio": ray_rate / one_rate}


def one_process(trainable, cfg, threads: int) -> float:
    """The stage's step in this process (no Ray Train, no DeepSpeed): samples/s of the last epoch."""
    import torch

    from puma_ray import trainer
    from puma_ray.llm import FrozenLM

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    worker = trainer.build_worker(trainable, 0, 1, torch.device("cpu"))  # the one home of a worker's shard + users
    lm = FrozenLM.from_config(cfg)
    local, shared = trainable.local(worker), trainable.shared()
    steps = math.ceil(worker.rows / cfg.train.batch_size)
    schedule = trainer.lr_schedule(cfg.train, steps)
    opt = torch.optim.AdamW(shared.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    if local is not None:
        local.configure(cfg.train, schedule)
    for epoch in range(cfg.train.epochs):
        t0, rows = time.perf_counter(), 0
        for table in trainer.epoch_batches(worker, lm, cfg.train.batch_size, cfg.train, seed=cfg.train.seed + epoch):
            batch = trainable.batch(table, lm, worker)
            loss, _ = shared(local(batch.user_idx) if local is not None else batch.src, batch, lm)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(shared.parameters(), cfg.train.grad_clip)
            if local is not None:
                local.step()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            rows += len(batch.label)
        rate = rows / (time.perf_counter() - t0)
        print(f"train_throughput:   one process epoch {epoch + 1}: {rate:,.1f} samples/s", flush=True)
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=2, help="the last one is measured")
    ap.add_argument("--batch", type=int, default=64, help="rows per step and worker")
    ap.add_argument("--d", type=int, default=576, help="the target LM's width")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stages", nargs="*", choices=["1", "2"], default=["1", "2"])
    args = ap.parse_args()

    from puma_ray.data import load_interactions, shard_by_user
    from puma_ray.identity import store_meta
    from puma_ray.models import build_tiny
    from puma_ray.runtime import init_ray
    from puma_ray.sources import join_sources
    from puma_ray.stage1 import PromptsTrainable, train_prompts
    from puma_ray.stage2 import AdapterTrainable, train_adapter, training_rows

    root = tempfile.mkdtemp(prefix="train-throughput-")
    init_ray(C.RayConfig())
    source = build_tiny(os.path.join(root, "models"), ["llama"])["llama"]
    target = tiny_lm(os.path.join(root, "target"), args.d)
    data = os.path.join(root, "data")
    synthesize(data, users=args.users, task="rating", seed=0, progress=False, prompt_width=64, prompt_model=source)
    common = {
        "task": "rating",
        "model": {"path": target},
        "data": {"train": f"{data}/train", "valid": None},
        "train": {"epochs": args.epochs, "batch_size": args.batch, "lr": 1e-3, "prompt_lr": 3e-2, "length_groups": 8},
        "scaling": {"num_workers": args.workers, "cpus_per_worker": 1, "torch_threads": 1},
    }
    out = {
        "d": args.d,
        "users": args.users,
        "batch": args.batch,
        "workers": args.workers,
        "load_at_start": os.getloadavg(),
    }

    if "1" in args.stages:
        log = os.path.join(root, "stage1.jsonl")
        cfg = C.build(
            C.PromptsConfig,
            {**common, "output": f"{root}/s1", "run": {"name": "s1", "storage_path": f"{root}/ray"}},
        )
        print("train_throughput: stage 1 on Ray Train ...", flush=True)
        train_prompts(cfg, callbacks=(epoch_log(log, REPORTED),))
        ray_rate = last_epoch_rate(log)
        train_ds, rows = load_interactions(cfg.data.train, cfg.task)
        shards = shard_by_user({"train": train_ds}, 1, f"{root}/s1-one", {"stage": 1})
        meta = store_meta(target, "rating", None, 1, "prompts")
        one = PromptsTrainable(cfg, meta.hidden_size, rows, shards, f"{root}/s1-one-store", meta)
        print("train_throughput: stage 1 in one process ...", flush=True)
        one_rate = one_process(one, cfg, threads=args.workers)
        out["stage1"] = rates(ray_rate, one_rate)

    if "2" in args.stages:
        # stage 2: every user's rows (the adapter's training subset = all users), source prompts d = 64
        src = join_sources([f"{data}/prompts"], f"{root}/joined")
        users = pc.unique(storage.read_table(f"{data}/train", columns=["user_id"]).column("user_id"))
        mcfg = C.build(
            C.MigrateConfig,
            {
                **common,
                "sources": [src.uri],
                "output": f"{root}/s2",
                "adapter": {"width": 256, "probe": "none"},  # throughput only: no readout to fit
                "run": {"name": "s2", "storage_path": f"{root}/ray"},
            },
        )
        mcfg = mcfg.model_copy(update={"prompt_length": src.meta.prompt_length})  # what migrate_step sets
        log = os.path.join(root, "stage2.jsonl")
        print("train_throughput: stage 2 on Ray Train ...", flush=True)
        train_adapter(mcfg, src, args.d, users, len(users), callbacks=(epoch_log(log, REPORTED),))
        ray_rate = last_epoch_rate(log)
        shards = shard_by_user(training_rows(mcfg, src.uri, users, len(users)), 1, f"{root}/s2-one", {"stage": 2})
        rows = storage.parquet_rows(shards["train_0"])
        one = AdapterTrainable(mcfg, src.meta.hidden_size, args.d, rows, shards)
        print("train_throughput: stage 2 in one process ...", flush=True)
        one_rate = one_process(one, mcfg, threads=args.workers)
        out["stage2"] = rates(ray_rate, one_rate)
    out["load_at_end"] = os.getloadavg()
    for stage in (f"stage{k}" for k in args.stages):
        r = out[stage]
        print(
            f"train_throughput: {stage}: Ray Train {r['ray_train']:,.1f} samples/s, one process {r['one_process']:,.1f}"
            f" samples/s, ratio {r['ratio']:.3f}"
        )
    print(json.dumps(out, indent=2))
    storage.delete_dir(root)


if __name__ == "__main__":
    main()
