"""Stage 1: one soft prompt per user (plus the task head) through a frozen LM. Entry: :func:`train_prompts`.

Run on the source model it makes the source prompts; on the target model it is the "full
retraining" baseline PUMA is measured against. Users are partitioned over the Ray Train workers
(a stable hash of user_id): each worker holds and trains only its users' prompts (a
:class:`PromptTable`, outside the DeepSpeed engine, never all-reduced), sees only their
interactions, and writes them as one store file; only the head is shared. The loop is
``trainer.train_loop_per_worker``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from ray.data import SaveMode
from torch import nn

from puma_ray import storage
from puma_ray.config import PromptsConfig, TrainConfig
from puma_ray.console import say
from puma_ray.data import load_interactions, user_hash
from puma_ray.errors import PumaError, user_errors
from puma_ray.heads import build_head, save_head
from puma_ray.llm import FrozenLM, store_meta
from puma_ray.runtime import init_ray
from puma_ray.schema import StoreMeta, prompt_store_schema, prompt_table
from puma_ray.trainer import VAL_METRICS, Batch, TaskModel, Worker, fit


class PromptTable(nn.Module):
    """Stage 1's local part: the prompts (n_local, l*d) of the users THIS worker owns, with their
    own optimizer (AdamW at ``prompt_lr``, on the shared schedule). Frozen when
    ``train.train_prompts`` is false (the random-init control)."""

    def __init__(self, n_users: int, prompt_length: int, hidden_size: int, init_range: float, train: bool):
        super().__init__()
        self.l, self.d = prompt_length, hidden_size
        init = torch.empty(n_users, prompt_length * hidden_size).uniform_(-init_range, init_range)
        self.weight = nn.Parameter(init, requires_grad=train)
        self.optimizer = None
        self.scheduler = None
        self.grad_clip = 0.0

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
        """(B,) local row indices -> (B, l, d) prompts."""
        return self.weight[user_idx].view(-1, self.l, self.d)

    def configure(self, train: TrainConfig, schedule) -> None:
        if not self.weight.requires_grad:
            return
        lr = train.prompt_lr or train.lr
        self.optimizer = torch.optim.AdamW([self.weight], lr=lr, weight_decay=train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.grad_clip = train.grad_clip

    def step(self) -> None:
        if self.optimizer is None:
            return
        torch.nn.utils.clip_grad_norm_([self.weight], self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


@dataclass
class PromptsTrainable:
    """Stage 1 for ``trainer.fit``: a prompt table per worker (its users) + a shared head."""

    cfg: PromptsConfig
    hidden_size: int  # d of the model
    train_rows: int
    shards: dict[str, str]  # "<split>_<rank>" -> URI of that worker's rows (shard_by_user)
    store: str  # URI of the prompt store the workers write
    meta: StoreMeta  # of that store
    name: str = "prompts"
    by_user: bool = True

    def worker(self, rank: int, world: int, device: torch.device) -> Worker:
        """The worker's users (sorted) and row count, read from its shard's user_id column only."""
        ids = storage.read_table(self.shards[f"train_{rank}"], columns=["user_id"]).column("user_id")
        users = tuple(sorted(pc.unique(ids).to_pylist()))
        return Worker(rank, world, device, len(ids), users, {u: i for i, u in enumerate(users)})

    def local(self, worker: Worker) -> PromptTable:
        t = self.cfg.train
        return PromptTable(len(worker.users), self.cfg.prompt_length, self.hidden_size, t.init_range, t.train_prompts)

    def shared(self) -> TaskModel:
        return TaskModel(build_head(self.cfg.task, self.hidden_size, self.cfg.head))

    def batch(self, np_batch: dict, lm: FrozenLM, worker: Worker) -> Batch | None:
        """A Ray Data numpy batch -> Batch of the rows whose user this worker owns (None if none)."""
        idx = np.array([worker.index.get(u, -1) for u in np_batch["user_id"]])
        keep = idx >= 0
        if not keep.any():
            return None
        hist = np_batch.get("history_text")
        return Batch(
            user_idx=torch.as_tensor(idx[keep], device=worker.device),
            label=torch.as_tensor(np_batch["label"][keep], dtype=torch.float32, device=worker.device),
            inputs=lm.collate(np_batch["item_text"][keep], hist[keep] if hist is not None else None),
        )

    def finish(self, worker: Worker, local: PromptTable, chunk: int = 65_536) -> None:
        """This worker's users' prompts -> ``store/part-<rank>.parquet``, streamed in chunks."""
        uri = storage.join(self.store, f"part-{worker.rank:05d}.parquet")
        with storage.parquet_writer(uri, prompt_store_schema(self.meta)) as w:
            for i in range(0, len(worker.users), chunk):
                rows = local.weight[i : i + chunk].detach().cpu().float().numpy()
                w.write_table(prompt_table(self.meta, list(worker.users[i : i + chunk]), rows))


def _with_shard(table: pa.Table, world: int) -> pa.Table:
    """Adds ``shard``: the owning worker of each row's user, hash(user_id) % world (stable across
    processes and runs)."""
    ids = table.column("user_id").to_numpy(zero_copy_only=False)
    return table.append_column("shard", pa.array((user_hash(ids) % np.uint64(world)).astype(np.int64)))


def shard_by_user(datasets: dict, world: int, out_uri: str) -> dict[str, str]:
    """Write each split partitioned by owning worker (one streamed Ray Data pass per split):
    ``out_uri/<split>/shard=<r>/``. Returns {"<split>_<r>": URI}; reused when already complete."""
    done_uri = storage.join(out_uri, "done.json")
    want = {f"{split}_{r}": storage.join(out_uri, split, f"shard={r}") for split in datasets for r in range(world)}
    if storage.exists(done_uri) and storage.read_json(done_uri) == want:
        return want
    storage.delete_dir(out_uri)
    for split, ds in datasets.items():
        fs, path = storage.resolve(storage.join(out_uri, split))
        ds.map_batches(_with_shard, fn_kwargs={"world": world}, batch_format="pyarrow").write_parquet(
            path, filesystem=fs, partition_cols=["shard"], mode=SaveMode.OVERWRITE
        )
    empty = [r for r in range(world) if not storage.list_files(want[f"train_{r}"], ".parquet")]
    if empty:
        raise PumaError(f"workers {empty} own no user (too few users for scaling.num_workers={world})")
    for key in [k for k in want if not storage.list_files(want[k], ".parquet")]:
        want.pop(key)  # a worker with no validation users
    storage.write_json(done_uri, want)
    return want


@user_errors
def train_prompts(cfg: PromptsConfig) -> dict:
    """Stage 1 entry: train per-user prompts + head; write the store, head and summary to ``cfg.output``."""
    init_ray(cfg.ray, cfg.storage)
    t0 = time.time()
    train_ds, train_rows = load_interactions(cfg.data.train, cfg.task)
    datasets = {"train": train_ds}
    if cfg.data.valid:
        datasets["valid"], _ = load_interactions(cfg.data.valid, cfg.task)
    meta = store_meta(cfg.model.path, cfg.task, cfg.template, cfg.prompt_length, "prompts")
    world = cfg.scaling.num_workers
    say(
        f"prompts: {train_rows:,} training rows on {cfg.model.path} (d={meta.hidden_size}), "
        f"{cfg.train.epochs} epoch(s), users partitioned over {world} worker(s)"
    )
    shards = shard_by_user(datasets, world, storage.join(cfg.run.storage_path, f"{cfg.run.name}-shards"))
    store = storage.join(cfg.output, "prompts")
    storage.delete_dir(store)
    trainable = PromptsTrainable(cfg, meta.hidden_size, train_rows, shards, store, meta)
    trained = fit(trainable, {k: storage.ray_read_parquet(v) for k, v in shards.items()})
    save_head(cfg.output, trained.model.head, cfg.task, cfg.head.model_dump(), meta.model_fingerprint, meta.hidden_size)
    metrics = trained.metrics
    summary = {
        "stage": "prompts",
        "model": cfg.model.path,
        "users": int(sum(metrics["worker_users"])),
        "train_rows": train_rows,
        "epochs": cfg.train.epochs,
        "train_prompts": cfg.train.train_prompts,
        "worker_users": metrics["worker_users"],
        "lm_sample_passes": trained.lm_sample_passes,
        "train_wall_s": trained.train_wall_s,
        "wall_s": time.time() - t0,
        "final_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    storage.write_json(storage.join(cfg.output, "summary.json"), summary)
    val = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in VAL_METRICS)
    say(f"prompts: wrote {summary['users']:,} prompts + head to {cfg.output} in {summary['wall_s']:.0f} s {val}")
    return summary
