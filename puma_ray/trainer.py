"""The generic training loop through a frozen LM on Ray Train (TorchTrainer) with a DeepSpeed engine.

A *trainable* (``stage1.PromptsTrainable``, ``stage2.AdapterTrainable``) says WHAT is trained:
its config, its rows (per-worker shards, written once by ``data.shard_by_user``: users are
partitioned over the workers), its shared module (a :class:`TaskModel`, in the DeepSpeed engine
and all-reduced: the task head, and in stage 2 the adapter), an optional *local* part (stage 1's
prompt table of the worker's own users: outside the engine, with its own optimizer, checkpointed
per rank), and how rows become batches. This module says HOW: :func:`train_loop_per_worker`
(the loop) and :func:`fit` (the TorchTrainer launch); its checkpoints are puma_ray.checkpoints'.

Each worker streams its own shard from storage (``data.iter_shard``: no Ray Data executor starts
per epoch), regroups every ``train.length_groups`` micro-batches by token length (less padding),
and keeps the frozen LM out of the engine, so it is neither optimised nor partitioned.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer
from torch import nn

from puma_ray import checkpoints, console, outputs, storage
from puma_ray.config import MIN_MICRO, MigrateConfig, PromptsConfig, TrainConfig
from puma_ray.data import iter_shard
from puma_ray.errors import PumaError
from puma_ray.heads import Head
from puma_ray.llm import FrozenLM, row_texts
from puma_ray.metrics import auc, error_metrics
from puma_ray.runtime import deepspeed_config, setup_worker, skip_inference_comm_op


@dataclass
class Batch:
    """One micro-batch on the worker's device. ``label`` (B,); ``inputs``: :meth:`FrozenLM.collate`'s
    output; ``user_idx`` (B,) rows of the worker's prompt table (stage 1) or ``src`` (B, l, d_src)
    source prompts (stage 2)."""

    label: torch.Tensor
    inputs: dict[str, torch.Tensor]
    user_idx: torch.Tensor | None = None
    src: torch.Tensor | None = None


@dataclass(frozen=True)
class Worker:
    """What one Ray Train worker trains on, built once when it starts (:func:`build_worker`)."""

    rank: int
    world: int
    device: torch.device
    train: str  # URI of its training shard
    valid: str | None  # URI of its validation shard (None: no validation rows)
    rows: int  # training rows it reads per epoch
    users: tuple[str, ...] = ()  # with a local part: the users it owns (sorted)
    index: dict[str, int] = field(default_factory=dict)  # user_id -> row of its prompt table


class TaskModel(nn.Module):
    """The engine's module: [adapter ->] frozen LM -> task head.

    forward: x (B, l, d_in) prompts (stage 1: the worker's table rows; stage 2: source prompts,
    mapped by the adapter to (B, l, d)) -> (loss, (B,) predictions). The LM is an argument, not a
    submodule: it is never optimised, partitioned or checkpointed."""

    def __init__(self, head: Head, adapter: nn.Module | None = None):
        super().__init__()
        self.head = head
        self.adapter = adapter

    def forward(self, x: torch.Tensor, batch: Batch, lm: FrozenLM) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = x if self.adapter is None else self.adapter(x)
        out = lm.forward(prompts, batch.inputs, want_hidden=self.head.wants_hidden)
        return self.head.loss(out, batch.label)


class LocalPart(Protocol):
    """A worker's own trainable part outside the engine (stage 1's prompt table)."""

    def __call__(self, user_idx: torch.Tensor) -> torch.Tensor: ...  # (B,) -> (B, l, d)

    def configure(self, train: TrainConfig, schedule) -> None: ...  # its optimizer, on the shared schedule

    def step(self) -> None: ...  # after backward: clip, optimizer + schedule step, zero the gradients

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Trainable(Protocol):
    cfg: PromptsConfig | MigrateConfig
    identity: dict  # what the run's result depends on beyond cfg (a users input's content); part of its fingerprint
    name: str  # console prefix: "prompts", "adapter"
    shards: dict[str, str]  # "train_<rank>" / "valid_<rank>" -> URI (data.shard_by_user)
    train_rows: int  # all workers together, per epoch
    has_local: bool  # a local part, indexed by the worker's own users

    def local(self, worker: Worker) -> LocalPart | None: ...

    def shared(self) -> TaskModel: ...

    def batch(self, rows: pa.Table, lm: FrozenLM, worker: Worker) -> Batch | None: ...

    def finish(self, worker: Worker, local: LocalPart | None) -> None: ...


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker. config: {"trainable", "relay" (a console.Relay handle)}.

    Every worker runs the same number of steps per epoch (uneven user shards get proportionally
    sized micro-batches, plus zero-gradient steps if still short), so collectives stay in lockstep."""
    trainable: Trainable = config["trainable"]
    cfg = trainable.cfg
    device = setup_worker(cfg.scaling)
    torch.manual_seed(cfg.train.seed)
    ctx = ray.train.get_context()
    worker = build_worker(trainable, ctx.get_world_rank(), ctx.get_world_size(), device)
    lm = FrozenLM.from_config(cfg, device)
    local, shared = trainable.local(worker), trainable.shared()
    ckpt = ray.train.get_checkpoint()
    progress = checkpoints.restore(ckpt, shared, local, worker.rank, worker.world)
    finished_before = ckpt is not None and progress.epochs_done >= cfg.train.epochs
    steps = int(_allreduce([steps_per_epoch(worker.rows, cfg.train)], "max")[0])
    micro = max(1, math.ceil(worker.rows / steps))
    schedule = lr_schedule(cfg.train, steps, progress.epochs_done)
    engine = _engine(shared, cfg, schedule)
    checkpoints.restore_optimizer(ckpt, engine, worker.rank, cfg.scaling.zero_stage)
    if local is not None:
        local.configure(cfg.train, schedule)

    for epoch in range(progress.epochs_done, cfg.train.epochs):
        t0, loss_sum, rows, dropped, done = time.time(), 0.0, 0, 0, 0
        cache_before = lm.prefix_cache.stats()
        label = f"{trainable.name}: epoch {epoch + 1}/{cfg.train.epochs}"
        counter = console.RemoteProgress(config["relay"] if worker.rank == 0 else None, label, steps, "steps", 60.0)
        for table in epoch_batches(worker, lm, micro, cfg.train, seed=cfg.train.seed + epoch):
            batch = trainable.batch(table, lm, worker)
            dropped += table.num_rows - (0 if batch is None else len(batch.label))
            if batch is None or done == steps:
                continue
            x = local(batch.user_idx) if local is not None else batch.src
            loss, _ = engine(x, batch, lm)  # frozen LM inside; gradients reach the shared module and the local part
            engine.backward(loss)
            if local is not None:
                local.step()
            engine.step()
            loss_sum += loss.item() * len(batch.label)
            rows += len(batch.label)
            done += 1
            counter.update(done)
        for _ in range(steps - done):
            _empty_step(engine)
        cache = lm.prefix_cache.stats()
        asked, computed = (cache[k] - cache_before[k] for k in ("rows", "computed"))
        loss_sum, rows, dropped, asked, computed = _allreduce([loss_sum, rows, dropped, asked, computed])
        (cache_mb,) = _allreduce([cache["mb"]], "max")
        seconds = time.time() - t0
        progress.lm_sample_passes += rows
        progress.wall_s += seconds
        progress.epochs_done = epoch + 1
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(rows, 1),
            "lm_sample_passes": progress.lm_sample_passes,
            "unknown_rows": int(dropped),
            # rows whose prefix (what precedes the user's slot) came from the LM's cache, and its size
            "prefix_hit_rate": 1.0 - computed / asked if asked else float("nan"),
            "prefix_cache_mb": cache_mb,
        }
        metrics.update(_validate(engine, local, lm, trainable, worker))  # every rank: it joins collectives
        if local is not None:  # what each worker holds: its own users' prompts only
            metrics["worker_users"] = _gather(len(worker.users))
        if worker.rank == 0:
            console.tell(config["relay"], epoch_line(label, metrics, seconds, rows))
        progress.loop_s += time.time() - t0
        metrics.update(wall_s=progress.wall_s, loop_s=progress.loop_s)
        progress.metrics = metrics
        run = run_fingerprint(trainable)
        checkpoints.save(metrics, engine, local, worker.rank, worker.world, progress, cfg.scaling.zero_stage, run)
    if finished_before:  # a resumed run that had already trained every epoch: report its result again
        ray.train.report(progress.metrics)
    trainable.finish(worker, local)


def build_worker(trainable: Trainable, rank: int, world: int, device: torch.device) -> Worker:
    """The :class:`Worker` of rank ``rank`` of ``world``: its shards and row count (from footers);
    with a local part, its users (sorted), read from its shard's user_id column only."""
    train, valid = trainable.shards[f"train_{rank}"], trainable.shards.get(f"valid_{rank}")
    if not trainable.has_local:
        return Worker(rank, world, device, train, valid, storage.parquet_rows(train))
    ids = storage.read_table(train, columns=["user_id"]).column("user_id")
    users = tuple(sorted(pc.unique(ids).to_pylist()))
    return Worker(rank, world, device, train, valid, len(ids), users, {u: i for i, u in enumerate(users)})


def epoch_batches(worker: Worker, lm: FrozenLM, micro: int, train: TrainConfig, seed: int):
    """One epoch of this worker's micro-batches (Arrow tables): its shard shuffled (seeded), and
    every ``train.length_groups`` micro-batches' rows regrouped by token length, the groups in a
    random order: rows of similar length share a batch, so less of it is padding."""
    rng = np.random.default_rng(seed + 7919 * worker.rank)
    for window in iter_shard(worker.train, micro * train.length_groups, seed, train.shuffle_buffer):
        lengths = lm.row_lengths(*row_texts(window))
        order = np.argsort(lengths, kind="stable")
        groups = [order[i : i + micro] for i in range(0, len(order), micro)]
        for g in rng.permutation(len(groups)) if train.length_groups > 1 else range(len(groups)):
            yield window.take(pa.array(groups[g]))


VAL_METRICS = ("val_rmse", "val_mae", "val_auc")


def epoch_line(label: str, metrics: dict, seconds: float, rows: float) -> str:
    """``adapter: epoch 2/4 train_loss=0.9684 val_rmse=0.9437 val_mae=0.7551 (12 s, 1,930 samples/s)``,
    with ``, 98% prefixes cached`` when rows had prefixes (an item-first template)."""
    shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in ("train_loss", *VAL_METRICS))
    hits = metrics.get("prefix_hit_rate", float("nan"))
    cached = "" if math.isnan(hits) else f", {hits:.0%} prefixes cached"
    return f"{label} {shown} ({console.duration(seconds)}, {rows / max(seconds, 1e-9):,.0f} samples/s{cached})"


def _engine(shared: TaskModel, cfg, schedule):
    """The DeepSpeed engine over the shared module: AdamW at ``train.lr`` on ``schedule`` (the head
    in its own group at ``train.head_lr`` when that is set; 0 leaves it exactly as it starts)."""
    import deepspeed  # noqa: PLC0415 -- reads the accelerator setup_worker chose (DS_ACCELERATOR) at import

    skip_inference_comm_op()
    t = cfg.train
    params = shared.parameters()
    if t.head_lr is not None:
        params = [{"params": shared.head.parameters(), "lr": t.head_lr}]
        if shared.adapter is not None:
            params.append({"params": shared.adapter.parameters()})
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ds_config = deepspeed_config(cfg.scaling, cfg.train, cfg.model.dtype)
    engine, *_ = deepspeed.initialize(model=shared, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def steps_per_epoch(rows: int, train: TrainConfig) -> int:
    """Optimizer steps per epoch for a worker's ``rows``: one per ``batch_size`` rows, and more (micro-
    batches down to MIN_MICRO rows, the same passes) while the epochs' total is under ``min_steps``."""
    steps = math.ceil(rows / train.batch_size)
    if train.min_steps:
        steps = max(steps, min(math.ceil(train.min_steps / train.epochs), rows // MIN_MICRO))
    return max(1, steps)


def lr_schedule(train: TrainConfig, steps_per_epoch: int, start_epoch: int = 0):
    """optimizer step (counted from ``start_epoch``) -> learning-rate factor: linear warm-up over
    ``warmup_frac`` of all steps, then constant or cosine to 0 at the last step."""
    total = train.epochs * steps_per_epoch
    warm = int(total * train.warmup_frac)
    offset = start_epoch * steps_per_epoch

    def factor(step: int) -> float:
        step += offset
        if step < warm:
            return (step + 1) / warm
        if train.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


def _allreduce(values: list[float], op: str = "sum") -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _gather(obj) -> list:
    """Every rank's ``obj``, in rank order (a list of one outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _empty_step(engine) -> None:
    """A zero-gradient step, so a worker that ran out of rows still joins the others' all-reduces."""
    engine.backward(sum((p * 0).sum() for p in engine.module.parameters()))
    engine.step()


def _validate(engine, local, lm: FrozenLM, trainable: Trainable, worker: Worker) -> dict:
    """Task metrics on this worker's validation shard (none: no rows), reduced over workers."""
    se = ae = n = loss_sum = 0.0
    labels, preds = [], []
    engine.eval()
    with torch.no_grad():
        tables = iter_shard(worker.valid, trainable.cfg.train.batch_size) if worker.valid is not None else ()
        for table in tables:
            batch = trainable.batch(table, lm, worker)
            if batch is None:
                continue
            loss, pred = engine(local(batch.user_idx) if local is not None else batch.src, batch, lm)
            err = (pred - batch.label).double()
            se += float((err**2).sum())
            ae += float(err.abs().sum())
            n += len(err)
            loss_sum += loss.item() * len(err)
            labels.append(batch.label.cpu().numpy())
            preds.append(pred.float().cpu().numpy())
    engine.train()
    se, ae, n, loss_sum = _allreduce([se, ae, n, loss_sum])
    if n == 0:
        return {}
    out = {"val_loss": loss_sum / n, "val_rows": int(n)}
    if trainable.cfg.task == "rating":
        out.update({f"val_{k}": v for k, v in error_metrics(se, ae, n).items()})
        return out
    gathered = _gather((np.concatenate(labels or [np.zeros(0)]), np.concatenate(preds or [np.zeros(0)])))
    y = np.concatenate([g[0] for g in gathered])
    p = np.concatenate([g[1] for g in gathered])
    out["val_auc"] = auc(y, p)
    return out


@dataclass
class Trained:
    """What :func:`fit` returns: the trained shared module (CPU, eval mode) and the run's cost."""

    model: TaskModel
    metrics: dict  # the last epoch's reported metrics
    lm_sample_passes: float
    train_wall_s: float  # seconds of training steps, all epochs
    loop_s: float  # seconds inside the epoch loop (training, validation, checkpoints)


# Config keys a run may change and still resume its checkpoint: where it runs and writes, and what
# follows the training. Anything else changed (data, model, train, users, ...) is another run.
RESUME_FREE = (
    "output",
    "output_mode",
    "ray",
    "storage",
    "run",
    "scaling",
    "compare",
    "baselines",
    "evaluate",
    "gate",
    "scoring",
    "rewrite",
)


def run_fingerprint(trainable: Trainable) -> str:
    """sha256 of what a training run's result depends on: its config but RESUME_FREE, and its identity."""
    cfg = {k: v for k, v in trainable.cfg.model_dump(mode="json").items() if k not in RESUME_FREE}
    return outputs.config_hash({**cfg, "identity": trainable.identity})


def check_resume(trainable: Trainable) -> None:
    """Refuse (one line) to resume a run.name whose latest checkpoint was trained with another config
    (its state's fingerprint): it would silently continue, or return, another run's result."""
    run = trainable.cfg.run
    run_uri = storage.join(run.storage_path, run.name)
    state = checkpoints.latest_state(run_uri)
    if state is None:
        return
    fingerprint = state.get("config_sha256")
    if fingerprint is not None and fingerprint != run_fingerprint(trainable):
        raise PumaError(
            f"{run_uri}: a checkpoint of run.name {run.name!r} trained with another config (data, model, train, "
            "...); set another run.name, or delete that directory to start over"
        )


def fit(trainable: Trainable, callbacks: tuple = ()) -> Trained:
    """Run :func:`train_loop_per_worker` on a TorchTrainer and load the trained shared module from
    its last checkpoint (raises PumaError on failure). ``callbacks``: extra Ray Train callbacks,
    e.g. Tune's TuneReportCallback in a trial."""
    cfg = trainable.cfg
    s = cfg.scaling
    check_resume(trainable)
    path, fs = _run_storage(cfg.run.storage_path)
    with console.Relay() as relay:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"trainable": trainable, "relay": relay.handle},
            scaling_config=ray.train.ScalingConfig(
                num_workers=s.num_workers,
                use_gpu=s.use_gpu,
                resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})},
            ),
            run_config=ray.train.RunConfig(
                name=cfg.run.name,
                storage_path=path,
                storage_filesystem=fs,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
                callbacks=list(callbacks) or None,
            ),
        )
        # Ray Train installs a Ctrl+C handler for the run that holds the run's controller actor; put the
        # caller's back afterwards, so the finished controller is released and Ctrl+C acts as before
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGINT) if main_thread else None
        try:
            result = trainer.fit()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
    if result.checkpoint is None:
        raise PumaError(f"training run {cfg.run.name!r} finished without a checkpoint")
    model, state = checkpoints.load_final(result.checkpoint, trainable.shared())
    if state["lm_sample_passes"] == 0:
        raise PumaError(
            f"training run {cfg.run.name!r}: no training row reached a worker ({trainable.name} trained on nothing)"
        )
    return Trained(model.eval(), result.metrics, state["lm_sample_passes"], state["wall_s"], state["loop_s"])


def _run_storage(uri: str) -> tuple[str, object | None]:
    """Ray Train's (storage_path, storage_filesystem): a local absolute path and None, or
    bucket/prefix inside the S3 filesystem."""
    if "://" not in uri:
        return os.path.abspath(uri), None
    fs, path = storage.resolve(uri)
    return path, fs
