"""Stage 2: train the migration adapter (+ the target's task head) end to end through the frozen
TARGET LM, on the selected users only. Entry: :func:`train_adapter`.

The training rows are streamed: the selected users' interactions joined (a Ray Data hash join on
user_id) with their source prompts, so every row carries its user's frozen prompt and no process
holds the prompt table. Per row: source prompt (l, d_src) -> adapter -> (l, d_tgt) -> LM -> head
loss; only the adapter and the head learn (``trainer.TaskModel`` with an adapter, all of it in the
DeepSpeed engine). The loop is ``trainer.train_loop_per_worker``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import torch

from puma_ray import storage
from puma_ray.adapter import MigrationAdapter
from puma_ray.config import MigrateConfig
from puma_ray.console import say
from puma_ray.data import hashed_fraction, load_interactions, shuffle_partitions
from puma_ray.errors import PumaError
from puma_ray.heads import build_head
from puma_ray.llm import FrozenLM
from puma_ray.schema import decode_prompts
from puma_ray.sources import Sources
from puma_ray.trainer import Batch, TaskModel, Trained, Worker, fit


@dataclass
class AdapterTrainable:
    """Stage 2 for ``trainer.fit``: adapter + head, all shared; rows split evenly over workers."""

    cfg: MigrateConfig
    d_src: int  # source prompt width per position (several sources: their sum)
    hidden_size: int  # d of the target model
    train_rows: int
    name: str = "adapter"
    by_user: bool = False

    def worker(self, rank: int, world: int, device: torch.device) -> Worker:
        return Worker(rank, world, device, math.ceil(self.train_rows / world))

    def local(self, worker: Worker) -> None:
        return None

    def shared(self) -> TaskModel:
        adapter = MigrationAdapter.from_config(self.d_src, self.hidden_size, self.cfg.adapter)
        return TaskModel(build_head(self.cfg.task, self.hidden_size, self.cfg.head), adapter)

    def batch(self, np_batch: dict, lm: FrozenLM, worker: Worker) -> Batch:
        """Joined rows (interaction + the user's source prompt) -> Batch with src (B, l, d_src)."""
        l = self.cfg.prompt_length
        src = decode_prompts(np_batch, l * self.d_src, what="source prompt")
        return Batch(
            src=torch.from_numpy(src).view(len(src), l, self.d_src).to(worker.device),
            label=torch.as_tensor(np_batch["label"], dtype=torch.float32, device=worker.device),
            inputs=lm.collate(np_batch["item_text"], np_batch.get("history_text")),
        )

    def finish(self, worker: Worker, local: None) -> None:
        return None


def training_data(cfg: MigrateConfig, src_uri: str, users: pa.Array, all_users: int) -> tuple[dict, int]:
    """Stage-2 rows, streamed: interactions joined with their users' source prompts. "train" holds
    the selected ``users``' rows; "valid" the users ``cfg.validation`` names (a fixed hashed sample
    of all ``all_users`` users, or the selected ones). -> ({"train", "valid"} Ray Datasets, train rows)."""

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
            num_partitions=shuffle_partitions(rows, at_least=cfg.scaling.num_workers),
            on=("user_id",),
        )
    rows = out["train"].count()
    if rows == 0:
        raise PumaError(f"{cfg.data.train}: the {len(users)} selected users have no training interactions")
    return out, rows


def train_adapter(
    cfg: MigrateConfig, src: Sources, d_tgt: int, users: pa.Array, all_users: int, callbacks: tuple = ()
) -> Trained:
    """Stage 2 entry: train the adapter + head on the selected ``users`` (of ``all_users``) through
    the frozen target ``cfg.model`` (width ``d_tgt``). ``callbacks`` go to the Ray Train run (e.g. Tune's)."""
    datasets, rows = training_data(cfg, src.uri, users, all_users)
    say(
        f"adapter: training on {len(users):,} selected users ({rows:,} interactions), "
        f"d {src.meta.hidden_size} -> {d_tgt}, {cfg.train.epochs} epoch(s) on {cfg.scaling.num_workers} worker(s)"
    )
    return fit(AdapterTrainable(cfg, src.meta.hidden_size, d_tgt, rows), datasets, callbacks)
