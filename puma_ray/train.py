"""Training through a frozen LM on Ray Train (TorchTrainer) with a DeepSpeed engine.

Stage 1 (``train_prompts``) learns one soft prompt per user plus the task head. The LM is frozen
and kept OUT of the engine: DeepSpeed sees only the trainable module (prompt table + head), so
the LM is neither optimised nor partitioned. The loop (``train_loop_per_worker``) is shared by
every trainable kind; a kind is a builder in ``TRAINABLES``.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from puma_ray import storage
from puma_ray.adapter import MigrationAdapter
from puma_ray.config import MigrateConfig, PromptsConfig
from puma_ray.errors import PumaError, user_errors
from puma_ray.heads import build_head, save_head
from puma_ray.llm import DEFAULT_TEMPLATE, FrozenLM, model_info
from puma_ray.schema import StoreMeta, prompt_store_schema, prompt_table


class LocalPrompts(nn.Module):
    """Stage 1's per-worker part: the prompt table (n_local, l*d) of the users THIS worker owns.

    It is kept out of the DeepSpeed engine and has its own optimizer: its gradients are never
    all-reduced, and no worker holds another worker's users."""

    def __init__(self, n_users: int, prompt_length: int, hidden_size: int, init_range: float = 0.1, train: bool = True):
        super().__init__()
        self.l, self.d = prompt_length, hidden_size
        self.weight = nn.Parameter(torch.empty(n_users, prompt_length * hidden_size).uniform_(-init_range, init_range),
                                   requires_grad=train)

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
        """(B,) local row indices -> (B, l, d) prompts."""
        return self.weight[user_idx].view(-1, self.l, self.d)


class HeadLoss(nn.Module):
    """Stage 1's shared part (in the engine, all-reduced): the task head; forward = its loss."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, out, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head.loss(out, label)


def build_prompt_model(cfg: PromptsConfig, lm: FrozenLM, ctx: dict) -> tuple[nn.Module, nn.Module]:
    local = LocalPrompts(len(ctx["users"]), cfg.prompt_length, lm.hidden_size, cfg.train.init_range, cfg.train.train_prompts)
    return HeadLoss(build_head(cfg.task, lm.hidden_size, cfg.head)), local


def prompt_batch(np_batch: dict, lm: FrozenLM, ctx: dict, device) -> dict | None:
    """A Ray Data numpy batch -> model batch; rows of users this worker does not own are dropped and counted."""
    index = ctx["index"]
    idx = np.array([index.get(u, -1) for u in np_batch["user_id"]])
    keep = idx >= 0
    ctx["unknown_rows"] = ctx.get("unknown_rows", 0) + int((~keep).sum())
    if not keep.any():
        return None
    hist = np_batch.get("history_text")
    return {
        "user_idx": torch.as_tensor(idx[keep], device=device),
        "label": torch.as_tensor(np_batch["label"][keep], dtype=torch.float32, device=device),
        "inputs": lm.collate(np_batch["item_text"][keep], hist[keep] if hist is not None else None),
    }


def prompt_step(batch: dict, lm: FrozenLM, engine, local: LocalPrompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 forward: local prompts (B, l, d) -> frozen LM -> head loss (engine). -> (loss, (B,) predictions)."""
    out = lm.forward(local(batch["user_idx"]), batch["inputs"], want_hidden=engine.module.head.wants_hidden)
    return engine(out, batch["label"])


class AdapterModel(nn.Module):
    """Stage 2's trainable part (all of it shared): the migration adapter + the target's task head.

    Source prompts arrive as frozen inputs in every row; only the adapter and the head learn."""

    def __init__(self, adapter: nn.Module, head: nn.Module):
        super().__init__()
        self.adapter, self.head = adapter, head

    def forward(self, batch: dict, lm: FrozenLM) -> tuple[torch.Tensor, torch.Tensor]:
        """batch: src (B, l, d_src), label (B,), inputs -> (loss, (B,) predictions)."""
        prompts = self.adapter(batch["src"])  # (B, l, d_src) -> (B, l, d_tgt)
        out = lm.forward(prompts, batch["inputs"], want_hidden=self.head.wants_hidden)
        return self.head.loss(out, batch["label"])


def build_adapter_model(cfg: MigrateConfig, lm: FrozenLM, ctx: dict) -> tuple[nn.Module, None]:
    a = cfg.adapter
    adapter = MigrationAdapter(ctx["d_src"], lm.hidden_size, a.width, a.depth, a.dropout)
    return AdapterModel(adapter, build_head(cfg.task, lm.hidden_size, cfg.head)), None


def adapter_batch(np_batch: dict, lm: FrozenLM, ctx: dict, device) -> dict:
    """Rows of the stage-2 join (interaction + the user's source prompt) -> model batch."""
    src = np_batch["prompt"]
    src = np.stack(src) if src.dtype == object else src
    src = torch.as_tensor(np.asarray(src, np.float32)).view(len(src), ctx["prompt_length"], ctx["d_src"])
    if not torch.isfinite(src).all():
        raise PumaError(f"source prompts of users {sorted(set(np_batch['user_id'][~torch.isfinite(src).flatten(1).all(1).numpy()]))[:3]} contain NaN or Inf")
    hist = np_batch.get("history_text")
    return {
        "src": src.to(device),
        "label": torch.as_tensor(np_batch["label"], dtype=torch.float32, device=device),
        "inputs": lm.collate(np_batch["item_text"], hist),
    }


def adapter_step(batch: dict, lm: FrozenLM, engine, local: None) -> tuple[torch.Tensor, torch.Tensor]:
    return engine(batch, lm)


@dataclass(frozen=True)
class Trainable:
    """One kind of training run: its config class, model builder -> (shared, local or None),
    batch maker, forward step, and whether data are partitioned by user (one dataset per worker)."""

    config: type
    build: Callable
    batch: Callable
    step: Callable
    by_user: bool


TRAINABLES = {
    "prompts": Trainable(PromptsConfig, build_prompt_model, prompt_batch, prompt_step, by_user=True),
    "adapter": Trainable(MigrateConfig, build_adapter_model, adapter_batch, adapter_step, by_user=False),
}


def _lr_lambda(schedule: str, total_steps: int, warmup_frac: float):
    warm = int(total_steps * warmup_frac)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

    return f


def _allreduce(values: list[float], op: str = "sum") -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _gather(obj) -> list:
    """Every rank's ``obj``, in rank order (a list of one outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _validate(engine, local, lm, shard, kind: Trainable, ctx, task, batch_size, device) -> dict:
    """Task metrics on this worker's valid data, reduced over workers."""
    se = ae = n = loss_sum = 0.0
    labels, preds = [], []
    engine.eval()
    with torch.no_grad():
        for np_batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            b = kind.batch(np_batch, lm, ctx, device)
            if b is None:
                continue
            loss, pred = kind.step(b, lm, engine, local)
            err = (pred - b["label"]).double()
            se += float((err**2).sum()); ae += float(err.abs().sum()); n += len(err)
            loss_sum += loss.item() * len(err)
            labels.append(b["label"].cpu().numpy()); preds.append(pred.float().cpu().numpy())
    engine.train()
    se, ae, n, loss_sum = _allreduce([se, ae, n, loss_sum])
    out = {"val_loss": loss_sum / max(n, 1), "val_rows": int(n)}
    if task == "rating":
        out.update(val_rmse=math.sqrt(se / max(n, 1)), val_mae=ae / max(n, 1))
    else:
        from sklearn.metrics import roc_auc_score

        gathered = _gather((np.concatenate(labels) if labels else np.zeros(0), np.concatenate(preds) if preds else np.zeros(0)))
        y = np.concatenate([g[0] for g in gathered]); p = np.concatenate([g[1] for g in gathered])
        out["val_auc"] = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
    return out


def read_checkpoint_file(ckpt, name: str) -> bytes:
    """One file of a Ray Train checkpoint, read straight from its storage (never the whole checkpoint)."""
    with ckpt.filesystem.open_input_stream(f"{ckpt.path.rstrip('/')}/{name}") as f:
        return f.read()


def _local_name(rank: int) -> str:
    return f"local-{rank:05d}.safetensors"


def _restore(shared: nn.Module, local: nn.Module | None, rank: int, world: int) -> dict:
    """Load the latest reported checkpoint (safetensors + JSON, nothing unpickled): the shared
    weights, and this rank's own local table only. Returns {"epoch" (next), "lm_sample_passes", "wall_s"}."""
    import ray.train
    from safetensors.torch import load as st_load

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {"epoch": 0, "lm_sample_passes": 0.0, "wall_s": 0.0}
    state = json.loads(read_checkpoint_file(ckpt, "state.json"))
    if local is not None and state.get("workers", world) != world:
        raise PumaError(f"checkpoint {ckpt.path} holds prompts partitioned over {state['workers']} workers; "
                        f"resume with scaling.num_workers={state['workers']} (or start a new run.name)")
    shared.load_state_dict(st_load(read_checkpoint_file(ckpt, "trainable.safetensors")))
    if local is not None:
        local.load_state_dict(st_load(read_checkpoint_file(ckpt, _local_name(rank))))
    return {**state, "epoch": state["epoch"] + 1}


def _report(metrics: dict, engine, local: nn.Module | None, rank: int, world: int) -> None:
    """Every rank reports; rank 0 attaches the shared weights + state, every rank its own local
    table (Ray Train merges the ranks' files into one checkpoint directory)."""
    import ray.train
    from safetensors.torch import save as st_save

    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            state = {k: v.detach().cpu().contiguous() for k, v in engine.module.state_dict().items()}
            storage.write_bytes(os.path.join(d, "trainable.safetensors"), st_save(state))
            storage.write_json(os.path.join(d, "state.json"), {**{k: metrics[k] for k in ("epoch", "lm_sample_passes", "wall_s")},
                                                               "workers": world})
        if local is not None:
            storage.write_bytes(os.path.join(d, _local_name(rank)), st_save({k: v.detach().cpu().contiguous() for k, v in local.state_dict().items()}))
        has_files = rank == 0 or local is not None
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if has_files else None)


def _worker_context(kind: Trainable, config: dict, rank: int) -> dict:
    """What this worker trains on. By user: its own users (sorted) and row count, read from its
    shard's user_id column only. Otherwise: an equal share of the rows (Ray Train's split)."""
    ctx = dict(config["ctx"])
    if kind.by_user:
        ids = storage.read_table(config["shards"][f"train_{rank}"], columns=["user_id"]).column("user_id")
        ctx["users"] = sorted(pc.unique(ids).to_pylist())
        ctx["index"] = {u: i for i, u in enumerate(ctx["users"])}
        ctx["rows"] = len(ids)
    else:
        ctx["rows"] = math.ceil(config["train_rows"] / config["world"])
    return ctx


def _empty_step(engine) -> None:
    """A zero-gradient step, so a worker that ran out of rows still joins the others' all-reduces."""
    engine.backward(sum((p * 0).sum() for p in engine.module.parameters()))
    engine.step()


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker. config: {"kind", "cfg" (dumped), "ctx", "train_rows", "world", "shards", "datasets"}.

    Every worker runs the same number of steps per epoch (uneven user shards get proportionally
    sized micro-batches, plus zero-gradient steps if still short), so collectives stay in lockstep."""
    import ray.train

    from puma_ray.runtime import deepspeed_config, setup_worker

    kind = TRAINABLES[config["kind"]]
    cfg = kind.config.model_validate(config["cfg"])
    device = setup_worker(cfg.scaling)
    import deepspeed  # after setup_worker chose the accelerator

    torch.manual_seed(cfg.train.seed)
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    ctx = _worker_context(kind, config, rank)
    lm = FrozenLM(cfg.model.path, cfg.task, cfg.template, cfg.prompt_length, cfg.model.dtype, cfg.model.attn_implementation, device)
    shared, local = kind.build(cfg, lm, ctx)
    local = local.to(device) if local is not None else None
    progress = _restore(shared, local, rank, world)
    steps = int(_allreduce([math.ceil(ctx["rows"] / cfg.train.batch_size)], "max")[0])
    micro, start = max(1, math.ceil(ctx["rows"] / steps)), progress["epoch"]
    optimizer = torch.optim.AdamW(shared.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    schedule = _lr_lambda(cfg.train.schedule, cfg.train.epochs * steps, cfg.train.warmup_frac)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step + start * steps))
    engine, _, _, _ = deepspeed.initialize(model=shared, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg.scaling, cfg.train, cfg.model.dtype))
    local_opt = None
    if local is not None and local.weight.requires_grad:  # the worker's own prompts: its own optimizer, same schedule
        local_opt = torch.optim.AdamW([local.weight], lr=cfg.train.prompt_lr or cfg.train.lr, weight_decay=cfg.train.weight_decay)
        local_sched = torch.optim.lr_scheduler.LambdaLR(local_opt, lambda step: schedule(step + start * steps))
    train_data = ray.train.get_dataset_shard(f"train_{rank}" if kind.by_user else "train")
    valid_name = f"valid_{rank}" if kind.by_user else "valid"
    valid_data = ray.train.get_dataset_shard(valid_name) if valid_name in config["datasets"] else None

    for epoch in range(start, cfg.train.epochs):
        t0, loss_sum, rows, done = time.time(), 0.0, 0, 0
        for np_batch in train_data.iter_batches(batch_size=micro, batch_format="numpy",
                                                local_shuffle_buffer_size=cfg.train.shuffle_buffer or None,
                                                local_shuffle_seed=cfg.train.seed + epoch):
            batch = kind.batch(np_batch, lm, ctx, device)
            if batch is None or done == steps:
                continue
            loss, _ = kind.step(batch, lm, engine, local)  # frozen LM inside; gradients reach shared + local only
            engine.backward(loss)
            if local_opt is not None:
                torch.nn.utils.clip_grad_norm_([local.weight], cfg.train.grad_clip)
                local_opt.step(); local_sched.step(); local_opt.zero_grad(set_to_none=True)
            engine.step()
            loss_sum += loss.item() * len(batch["label"]); rows += len(batch["label"]); done += 1
        for _ in range(steps - done):
            _empty_step(engine)
        loss_sum, rows = _allreduce([loss_sum, rows])
        progress["lm_sample_passes"] += rows
        progress["wall_s"] += time.time() - t0
        metrics = {"epoch": epoch, "train_loss": loss_sum / max(rows, 1), "lm_sample_passes": progress["lm_sample_passes"],
                   "wall_s": progress["wall_s"], "unknown_rows": int(_allreduce([ctx.get("unknown_rows", 0)])[0])}
        if valid_data is not None:
            metrics.update(_validate(engine, local, lm, valid_data, kind, ctx, cfg.task, cfg.train.batch_size, device))
        if local is not None:  # what each worker holds: its own users' prompts only
            metrics["worker_users"] = _gather(local.weight.shape[0])
            metrics["worker_prompt_bytes"] = _gather(local.weight.numel() * local.weight.element_size())
        if rank == 0:
            print(f"[{config['kind']}] epoch {epoch + 1}/{cfg.train.epochs} " + " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if k != "epoch"), flush=True)
        _report(metrics, engine, local, rank, world)
    if kind.by_user and config.get("store"):
        _write_store_part(config["store"], StoreMeta(**config["store_meta"]), ctx["users"], local, rank)


def _write_store_part(store_uri: str, meta: StoreMeta, users: list[str], local: LocalPrompts, rank: int, chunk: int = 65_536) -> None:
    """This worker's users' prompts -> ``store_uri/part-<rank>.parquet``, streamed in chunks."""
    with storage.parquet_writer(storage.join(store_uri, f"part-{rank:05d}.parquet"), prompt_store_schema(meta)) as w:
        for i in range(0, len(users), chunk):
            w.write_table(prompt_table(meta, users[i : i + chunk], local.weight[i : i + chunk].detach().cpu().float().numpy()))


def _shard_of(ids: np.ndarray, world: int) -> np.ndarray:
    """Stable worker index per user id (the same in every process and run): hash(user_id) % world."""
    from puma_ray.data import user_hash

    return (user_hash(ids) % np.uint64(world)).astype(np.int64)


def shard_by_user(datasets: dict, world: int, out_uri: str) -> dict[str, str]:
    """Write each split partitioned by owning worker (one streamed Ray Data pass per split):
    ``out_uri/<split>/shard=<r>/``. Returns {"<split>_<r>": URI}; reused when already complete."""
    from ray.data import SaveMode

    done_uri = storage.join(out_uri, "done.json")
    want = {f"{split}_{r}": storage.join(out_uri, split, f"shard={r}") for split in datasets for r in range(world)}
    if storage.exists(done_uri) and storage.read_json(done_uri) == want:
        return want
    storage.delete_dir(out_uri)
    for split, ds in datasets.items():
        fs, path = storage.resolve(storage.join(out_uri, split))
        ds.map_batches(lambda t: t.append_column("shard", pa.array(_shard_of(t.column("user_id").to_numpy(zero_copy_only=False), world))),
                       batch_format="pyarrow").write_parquet(path, filesystem=fs, partition_cols=["shard"], mode=SaveMode.OVERWRITE)
    empty = [r for r in range(world) if not storage.list_files(want[f"train_{r}"], ".parquet")]
    if empty:
        raise PumaError(f"workers {empty} own no user (too few users for scaling.num_workers={world})")
    for key in [k for k in want if not storage.list_files(want[k], ".parquet")]:
        want.pop(key)  # a worker with no validation users
    storage.write_json(done_uri, want)
    return want


def fit(kind: str, cfg, datasets: dict, ctx: dict, train_rows: int, callbacks: tuple = (), extra: dict | None = None):
    """Run ``train_loop_per_worker`` on a TorchTrainer; returns the ray.train.Result (raises PumaError on failure).

    By-user kinds get one dataset per worker (``train_<rank>``, not split further by Ray Train).
    ``callbacks``: extra Ray Train callbacks, e.g. Tune's TuneReportCallback when run as a Tune trial."""
    import ray.train
    from ray.train.torch import TorchTrainer

    s = cfg.scaling
    by_user = TRAINABLES[kind].by_user
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"kind": kind, "cfg": cfg.model_dump(), "ctx": ctx, "train_rows": train_rows, "world": s.num_workers,
                           "datasets": sorted(datasets), **(extra or {})},
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=_storage_path(cfg.run.storage_path), storage_filesystem=_storage_filesystem(cfg.run.storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=list(callbacks) or None,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[] if by_user else "all"),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise PumaError(f"training run {cfg.run.name!r} finished without a checkpoint")
    return result


def _storage_path(uri: str) -> str:
    """Ray Train's storage_path: a local absolute path, or bucket/prefix inside the S3 filesystem."""
    return storage.resolve(uri)[1] if "://" in uri else os.path.abspath(uri)


def _storage_filesystem(uri: str):
    return storage.resolve(uri)[0] if "://" in uri else None


@user_errors
def train_prompts(cfg: PromptsConfig) -> dict:
    """Stage 1 entry: train per-user prompts + head; write store, head and summary to ``cfg.output``.

    Users are partitioned over the workers (hash of user_id): each worker holds and trains only
    its users' prompts, sees only their interactions, and writes them as one store file."""
    from safetensors.torch import load as st_load

    from puma_ray.data import load_interactions
    from puma_ray.runtime import init_ray

    init_ray(cfg.ray, cfg.storage)
    t0 = time.time()
    train_ds, train_rows = load_interactions(cfg.data.train, cfg.task)
    datasets = {"train": train_ds}
    if cfg.data.valid:
        datasets["valid"], _ = load_interactions(cfg.data.valid, cfg.task)
    world = cfg.scaling.num_workers
    print(f"prompts: {train_rows} training rows over {world} worker(s) by user, model {cfg.model.path}", file=sys.stderr)
    shards = shard_by_user(datasets, world, storage.join(cfg.run.storage_path, f"{cfg.run.name}-shards"))
    fingerprint, d = model_info(cfg.model.path)
    meta = StoreMeta(model=cfg.model.path, model_fingerprint=fingerprint, hidden_size=d, prompt_length=cfg.prompt_length,
                     template=cfg.template or DEFAULT_TEMPLATE[cfg.task], stage="prompts")
    store_uri = storage.join(cfg.output, "prompts")
    storage.delete_dir(store_uri)
    result = fit("prompts", cfg, {k: storage.ray_read_parquet(v) for k, v in shards.items()}, {}, train_rows,
                 extra={"shards": shards, "store": store_uri, "store_meta": meta.__dict__})

    state = st_load(read_checkpoint_file(result.checkpoint, "trainable.safetensors"))
    progress = json.loads(read_checkpoint_file(result.checkpoint, "state.json"))
    head = build_head(cfg.task, d, cfg.head)
    head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
    save_head(cfg.output, head, cfg.task, cfg.head.model_dump(), fingerprint, d)
    metrics = result.metrics
    summary = {
        "stage": "prompts", "model": cfg.model.path, "users": int(sum(metrics["worker_users"])), "train_rows": train_rows,
        "epochs": cfg.train.epochs, "train_prompts": cfg.train.train_prompts, "worker_users": metrics["worker_users"],
        "lm_sample_passes": progress["lm_sample_passes"], "train_wall_s": progress["wall_s"],
        "wall_s": time.time() - t0, "final_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    storage.write_json(storage.join(cfg.output, "summary.json"), summary)
    val = " ".join(f"{k}={v:.4f}" for k, v in summary["final_metrics"].items() if k.startswith("val_") and k != "val_rows")
    print(f"prompts: wrote {summary['users']} prompts ({len(metrics['worker_users'])} store files) + head to {cfg.output} {val}".rstrip(),
          file=sys.stderr)
    return summary
