"""Stage 2: train the migration adapter (+ the target's task head) end to end through the frozen
TARGET LM, on the selected users only. Entry: :func:`train_adapter`.

The training rows are made once per run, streamed: the selected users' interactions joined (a Ray
Data hash join on user_id) with their source prompts, written as per-worker shards, so every row
carries its user's frozen prompt and no process holds the prompt table. Per row: source prompt
(l, d_src) -> adapter -> (l, d_tgt) -> LM -> head loss; only the adapter and the head learn
(``trainer.TaskModel`` with an adapter, all of it in the DeepSpeed engine). The loop is
``trainer.train_loop_per_worker``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import torch

from puma_ray import storage
from puma_ray.adapter import MigrationAdapter
from puma_ray.config import MigrateConfig
from puma_ray.console import say
from puma_ray.data import hashed_fraction, load_interactions, shard_by_user, shard_rows, shuffle_partitions
from puma_ray.heads import build_head
from puma_ray.llm import FrozenLM, row_texts
from puma_ray.schema import decode_prompts
from puma_ray.sources import Sources
from puma_ray.trainer import Batch, TaskModel, Trained, Worker, fit


@dataclass
class AdapterTrainable:
    """Stage 2 for ``trainer.fit``: adapter + head, all shared; each worker trains on its shard."""

    cfg: MigrateConfig
    d_src: int  # source prompt width per position (several sources: their sum)
    hidden_size: int  # d of the target model
    train_rows: int
    shards: dict[str, str]  # "<split>_<rank>" -> URI of that worker's rows (data.shard_by_user)
    name: str = "adapter"
    has_local: bool = False

    def local(self, worker: Worker) -> None:
        return None

    def shared(self) -> TaskModel:
        adapter = MigrationAdapter.from_config(self.d_src, self.hidden_size, self.cfg.adapter)
        return TaskModel(build_head(self.cfg.task, self.hidden_size, self.cfg.head), adapter)

    def batch(self, rows: pa.Table, lm: FrozenLM, worker: Worker) -> Batch:
        """Joined rows (interaction + the user's source prompt) -> Batch with src (B, l, d_src)."""
        l = self.cfg.prompt_length
        src = decode_prompts(rows, l * self.d_src, what="source prompt")
        return Batch(
            src=torch.from_numpy(src).view(len(src), l, self.d_src).to(worker.device),
            label=torch.as_tensor(rows.column("label").to_numpy(), dtype=torch.float32, device=worker.device),
            inputs=lm.collate(*row_texts(rows)),
        )

    def finish(self, worker: Worker, local: None) -> None:
        return None


def training_rows(cfg: MigrateConfig, src_uri: str, users: pa.Array, all_users: int) -> dict:
    """Stage-2 rows, streamed and not yet executed: interactions joined with their users' source
    prompts. "train" holds the selected ``users``' rows; "valid" the users ``cfg.validation`` names
    (a fixed hashed sample of all ``all_users`` users, or the selected ones). -> {split: Ray Dataset}."""

    def selected(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.is_in(batch.column("user_id"), value_set=users))

    def sampled(batch: pa.Table) -> pa.Table:
        ids = batch.column("user_id").to_numpy(zero_copy_only=False)
        return batch.filter(hashed_fraction(ids, cfg.validation.sample_users / max(1, all_users)))

    keep = {"train": selected, "valid": selected if cfg.validation.users == "selected" else sampled}
    out = {}
    for split in ("train", "valid"):
        uri = getattr(cfg.data, split)
        if not uri:
            continue
        ds, rows = load_interactions(uri, cfg.task)
        prompts = storage.ray_read_parquet(src_uri, columns=["user_id", "prompt"])
        out[split] = ds.map_batches(keep[split], batch_format="pyarrow").join(
            prompts.map_batches(keep[split], batch_format="pyarrow"),
            join_type="inner",
            num_partitions=shuffle_partitions(rows),
            on=("user_id",),
        )
    return out


def train_adapter(
    cfg: MigrateConfig, src: Sources, d_tgt: int, users: pa.Array, all_users: int, callbacks: tuple = ()
) -> Trained:
    """Stage 2 entry: train the adapter + head on the selected ``users`` (of ``all_users``) through
    the frozen target ``cfg.model`` (width ``d_tgt``). ``callbacks`` go to the Ray Train run (e.g. Tune's)."""
    datasets = training_rows(cfg, src.uri, users, all_users)
    key = {
        "data": cfg.data.model_dump(),
        "source": src.uri,
        "users": hashlib.sha256("\n".join(users.to_pylist()).encode()).hexdigest(),
        "validation": cfg.validation.model_dump(),
    }
    world = cfg.scaling.num_workers
    shards = shard_by_user(datasets, world, storage.join(cfg.run.storage_path, f"{cfg.run.name}-rows"), key)
    rows = sum(shard_rows(uri) for name, uri in shards.items() if name.startswith("train_"))
    say(
        f"adapter: training on {len(users):,} selected users ({rows:,} interactions), "
        f"d {src.meta.hidden_size} -> {d_tgt}, {cfg.train.epochs} epoch(s) on {world} worker(s)"
    )
    return fit(AdapterTrainable(cfg, src.meta.hidden_size, d_tgt, rows, shards), callbacks)
