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
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from puma_ray import storage
from puma_ray.adapter import MigrationAdapter, fit_probe
from puma_ray.config import AdapterConfig, MigrateConfig
from puma_ray.console import say
from puma_ray.data import hashed_fraction, join_on, keep_hashed, keep_users, load_interactions, shard_by_user
from puma_ray.errors import PumaError
from puma_ray.heads import build_head
from puma_ray.llm import FrozenLM, row_texts
from puma_ray.schema import decode_prompts, read_store_meta
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
    identity: dict = field(default_factory=dict)
    name: str = "adapter"
    has_local: bool = False
    probe: tuple[np.ndarray, float] | None = None  # the adapter's fixed readout (w, b), :func:`probe_readout`

    def local(self, worker: Worker) -> None:
        return None

    def shared(self) -> TaskModel:
        adapter = MigrationAdapter.from_config(self.d_src, self.hidden_size, self.cfg.adapter, self.probe)
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

    # Filters as (function, arguments) of the light puma_ray.data module: Ray Data's tasks import
    # the module of their function, and this one imports torch and transformers (seconds per worker)
    selected = (keep_users, {"users": users})
    sampled = (keep_hashed, {"fraction": cfg.validation.sample_users / max(1, all_users)})
    keep = {"train": selected, "valid": selected if cfg.validation.users == "selected" else sampled}
    side_users = {
        "train": len(users),
        "valid": len(users) if keep["valid"] is selected else cfg.validation.sample_users,
    }
    width = read_store_meta(src_uri).width
    out = {}
    for split in ("train", "valid"):
        uri = getattr(cfg.data, split)
        if not uri:
            continue
        ds, rows = load_interactions(uri, cfg.task)
        prompts = storage.ray_read_parquet(src_uri, columns=["user_id", "prompt"])
        fn, args = keep[split]
        out[split] = join_on(
            ds.map_batches(fn, fn_kwargs=args, batch_format="pyarrow"),
            prompts.map_batches(fn, fn_kwargs=args, batch_format="pyarrow"),
            "user_id",
            rows,
            side_bytes=side_users[split] * width * 4,  # float32 prompts of the split's users
        )
    return out


def probe_readout(
    cfg: AdapterConfig, src: Sources, profile_uri: str, all_users: int
) -> tuple[np.ndarray, float] | None:
    """``cfg.probe: label_mean``: the adapter's fixed readout (w (l * d_src,), b), a ridge regression of
    the user's mean training label (the profile's ``label_mean``) on the source prompt, fitted on about
    ``cfg.probe_users`` users (a stable hash sample of ALL ``all_users`` users, not only the selected:
    labels cost no LM pass). Reads only their profile rows and prompts, on the driver. None without a probe."""
    if cfg.probe == "none":
        return None
    profile = storage.read_table(profile_uri, columns=["user_id", "label_mean"])
    ids = profile.column("user_id").cast(pa.string()).combine_chunks()
    keep = hashed_fraction(ids.to_numpy(zero_copy_only=False), cfg.probe_users / max(1, all_users))
    ids, label_mean = ids.filter(keep), profile.column("label_mean").combine_chunks().filter(keep)
    prompts = storage.read_table(src.uri, columns=["user_id", "prompt"], filters=pc.field("user_id").isin(ids))
    at = pc.index_in(prompts.column("user_id").cast(pa.string()), value_set=ids)  # each prompt's profile row
    rows = prompts.append_column("label_mean", label_mean.take(at)).filter(pc.is_valid(at))
    if rows.num_rows < 2:
        raise PumaError(
            f"adapter.probe: {rows.num_rows} user(s) of {src.uri} with training labels in the sample; "
            "raise adapter.probe_users or set adapter.probe: none"
        )
    x = decode_prompts(rows, src.meta.prompt_length * src.meta.hidden_size, where=src.uri, what="source prompt")
    w, b, r2 = fit_probe(x, rows.column("label_mean").to_numpy().astype(np.float64))
    say(f"adapter: label_mean readout fitted on {rows.num_rows:,} users (leave-one-out R^2 {r2:.3f})")
    return w.astype(np.float32), b


def train_adapter(
    cfg: MigrateConfig,
    src: Sources,
    d_tgt: int,
    users: pa.Array,
    all_users: int,
    callbacks: tuple = (),
    profile_uri: str | None = None,
) -> Trained:
    """Stage 2 entry: train the adapter + head on the selected ``users`` (of ``all_users``) through
    the frozen target ``cfg.model`` (width ``d_tgt``). ``callbacks`` go to the Ray Train run (e.g. Tune's);
    ``profile_uri``: the training users' profile (``profile.profile_users``), which ``adapter.probe`` needs."""
    if cfg.adapter.probe != "none" and profile_uri is None:
        raise PumaError("adapter.probe needs the users' profile (profile.profile_users)")
    probe = probe_readout(cfg.adapter, src, profile_uri, all_users) if profile_uri else None
    datasets = training_rows(cfg, src.uri, users, all_users)
    key = {
        "data": cfg.data.model_dump(),
        "source": src.uri,
        "users": hashlib.sha256("\n".join(users.to_pylist()).encode()).hexdigest(),
        "validation": cfg.validation.model_dump(),
    }
    world = cfg.scaling.num_workers
    shards = shard_by_user(datasets, world, storage.join(cfg.run.storage_path, f"{cfg.run.name}-rows"), key)
    rows = sum(storage.parquet_rows(uri) for name, uri in shards.items() if name.startswith("train_"))
    say(
        f"adapter: training on {len(users):,} selected users ({rows:,} interactions), "
        f"d {src.meta.hidden_size} -> {d_tgt}, {cfg.train.epochs} epoch(s) on {world} worker(s)"
    )
    return fit(AdapterTrainable(cfg, src.meta.hidden_size, d_tgt, rows, shards, probe=probe), callbacks)
