"""Stage 1: one soft prompt per user (plus the task head) through a frozen LM. Entry: :func:`train_prompts`.

Run on the source model it makes the source prompts; on the target model it is the "full
retraining" baseline PUMA is measured against. Users are partitioned over the Ray Train workers
(a stable hash of user_id; their rows are written once per run as per-worker shards): each worker
holds and trains only its users' prompts (a :class:`PromptTable`, outside the DeepSpeed engine,
never all-reduced, with a row-wise optimizer), sees only their interactions, and writes them as
one store file; only the head is shared. The loop is
``trainer.train_loop_per_worker``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from puma_ray import outputs, storage, templates
from puma_ray.config import HeadConfig, PromptsConfig, TrainConfig
from puma_ray.console import say
from puma_ray.data import keep_users, load_interactions, shard_by_user
from puma_ray.errors import PumaError, user_errors
from puma_ray.heads import HEAD_FILES, build_head, load_head, save_head
from puma_ray.identity import store_meta
from puma_ray.llm import FrozenLM, row_texts
from puma_ray.runtime import init_ray
from puma_ray.schema import (
    StoreMeta,
    check_interactions_input,
    check_store_input,
    decode_prompts,
    prompt_store_schema,
    prompt_table,
    read_store_meta,
)
from puma_ray.trainer import VAL_METRICS, Batch, TaskModel, Worker, fit


class PromptTable(nn.Module):
    """Stage 1's local part: the prompts (n_local, l*d) of the users THIS worker owns, trained by a
    row-wise (lazy) AdamW whose cost follows the batch, not the table.

    Semantics: each row keeps its own Adam moments and step count, and changes only in the steps
    where it is in the batch: its gradient (summed over the batch's rows of that user) updates its
    moments, bias-corrected with the row's own step count, then decoupled weight decay and the
    step at ``prompt_lr`` x the shared schedule. A row absent from a step is left as is (dense
    AdamW would decay its moments and, with weight decay, its weights). Gradients are clipped to
    ``grad_clip`` over the batch's rows (= dense clipping: other rows' gradients are zero). With
    every row in every step this IS torch's AdamW (a test checks it). Weights, moments and steps
    are buffers, so the module's state_dict (each rank's checkpoint) holds the optimizer state.
    Frozen (no optimizer state) when ``train.train_prompts`` is false (the random-init control)."""

    def __init__(self, n_users: int, prompt_length: int, hidden_size: int, init_range: float, train: bool):
        super().__init__()
        self.l, self.d, self.trains = prompt_length, hidden_size, train
        self.register_buffer(
            "weight", torch.empty(n_users, prompt_length * hidden_size).uniform_(-init_range, init_range)
        )
        if train:
            self.register_buffer("exp_avg", torch.zeros_like(self.weight))
            self.register_buffer("exp_avg_sq", torch.zeros_like(self.weight))
            self.register_buffer("steps", torch.zeros(n_users, dtype=torch.int64))
        self.train_cfg: TrainConfig | None = None
        self.schedule = None
        self.calls = 0  # optimizer steps in this run (the schedule's position, like the engine's scheduler)
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None  # (B,) rows, (B, l*d) leaf of this step

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
        """(B,) local row indices -> (B, l, d) prompts (a copy of the rows: gradients stop at it)."""
        rows = self.weight[user_idx]
        if self.trains and torch.is_grad_enabled():
            rows.requires_grad_()
            self._batch = (user_idx, rows)
        return rows.view(-1, self.l, self.d)

    def configure(self, train: TrainConfig, schedule) -> None:
        self.train_cfg, self.schedule = train, schedule

    @torch.no_grad()
    def step(self) -> None:
        """After backward: the lazy AdamW update of this batch's rows (class docstring)."""
        if not self.trains or self._batch is None or self._batch[1].grad is None:
            return
        t = self.train_cfg
        idx, leaf = self._batch
        self._batch = None
        rows, where = torch.unique(idx, return_inverse=True)
        grad = torch.zeros(len(rows), leaf.shape[1], dtype=leaf.dtype, device=leaf.device).index_add_(
            0, where, leaf.grad
        )
        norm = grad.norm()
        if t.grad_clip and norm > t.grad_clip:
            grad.mul_(t.grad_clip / (norm + 1e-6))
        lr = (t.prompt_lr or t.lr) * self.schedule(self.calls)
        self.calls += 1
        beta1, beta2, eps = 0.9, 0.999, 1e-8  # torch.optim.AdamW's defaults
        step = self.steps[rows] + 1
        m = self.exp_avg[rows].mul_(beta1).add_(grad, alpha=1 - beta1)
        v = self.exp_avg_sq[rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1 ** step.to(grad.dtype)[:, None]
        bias2 = 1 - beta2 ** step.to(grad.dtype)[:, None]
        w = self.weight[rows].mul_(1 - lr * t.weight_decay)
        w.addcdiv_(m / bias1, (v / bias2).sqrt_().add_(eps), value=-lr)
        self.weight[rows], self.exp_avg[rows], self.exp_avg_sq[rows], self.steps[rows] = w, m, v, step


@dataclass
class PromptsTrainable:
    """Stage 1 for ``trainer.fit``: a prompt table per worker (its users) + a shared head."""

    cfg: PromptsConfig
    hidden_size: int  # d of the model
    train_rows: int
    shards: dict[str, str]  # "<split>_<rank>" -> URI of that worker's rows (data.shard_by_user)
    store: str  # URI of the prompt store the workers write
    meta: StoreMeta  # of that store
    identity: dict = field(default_factory=dict)  # {"users": the users input's hash} with cfg.users
    name: str = "prompts"
    has_local: bool = True

    def local(self, worker: Worker) -> PromptTable:
        """The worker's users' prompts: uniform(-init_range, init_range), or ``cfg.init_prompts``'s
        rows for the users that store holds."""
        t = self.cfg.train
        table = PromptTable(len(worker.users), self.cfg.prompt_length, self.hidden_size, t.init_range, t.train_prompts)
        if self.cfg.init_prompts:
            users = pa.array(worker.users, pa.string())
            init = storage.read_table(self.cfg.init_prompts, filters=pc.field("user_id").isin(users))
            rows = [worker.index[u] for u in init.column("user_id").to_pylist()]
            table.weight[rows] = torch.from_numpy(decode_prompts(init, self.meta.width, self.cfg.init_prompts))
        return table

    def shared(self) -> TaskModel:
        if self.cfg.init_head:
            return TaskModel(load_head(self.cfg.init_head, self.cfg.task, self.meta.model_fingerprint).train())
        return TaskModel(build_head(self.cfg.task, self.hidden_size, self.cfg.head))

    def batch(self, rows: pa.Table, lm: FrozenLM, worker: Worker) -> Batch | None:
        """Rows -> Batch of those whose user this worker owns (None if none)."""
        idx = np.array([worker.index.get(u, -1) for u in rows.column("user_id").to_pylist()])
        keep = idx >= 0
        if not keep.any():
            return None
        rows = rows.filter(pa.array(keep))
        return Batch(
            user_idx=torch.as_tensor(idx[keep], device=worker.device),
            label=torch.as_tensor(rows.column("label").to_numpy(), dtype=torch.float32, device=worker.device),
            inputs=lm.collate(*row_texts(rows)),
        )

    def finish(self, worker: Worker, local: PromptTable, chunk: int = 65_536) -> None:
        """This worker's users' prompts -> ``store/part-<rank>.parquet``, streamed in chunks."""
        uri = storage.join(self.store, f"part-{worker.rank:05d}.parquet")
        with storage.parquet_writer(uri, prompt_store_schema(self.meta)) as w:
            for i in range(0, len(worker.users), chunk):
                rows = local.weight[i : i + chunk].detach().cpu().float().numpy()
                w.write_table(prompt_table(self.meta, list(worker.users[i : i + chunk]), rows))


def _check_inits(cfg: PromptsConfig, meta: StoreMeta) -> PromptsConfig:
    """Refuse (one line, before Ray starts) an ``init_head`` or ``init_prompts`` made for another model
    or shape, ``init_prompts`` trained under another template (unless ``allow_template_change``), or
    a bad init store (:func:`schema.check_store_input`: empty, truncated, an infinite value);
    with ``init_head`` the config's head becomes the one it holds (it is saved as such)."""
    if cfg.init_head:
        load_head(cfg.init_head, cfg.task, meta.model_fingerprint)  # refuses another task or model
        saved = storage.read_json(storage.join(cfg.init_head, "head.json"))["head"]
        cfg = cfg.model_copy(update={"head": HeadConfig(**saved)})
    if cfg.init_prompts:
        init = check_store_input(cfg.init_prompts)
        if (init.model_fingerprint, init.width) != (meta.model_fingerprint, meta.width):
            raise PumaError(
                f"{cfg.init_prompts}: init_prompts were made for model {init.model!r} with width {init.width}; "
                f"this run trains {meta.model!r} (fingerprint {meta.model_fingerprint}) with width {meta.width}"
            )
        want = templates.resolve(meta.template, cfg.task)
        templates.check_same(
            init.template,
            init.template_hash,
            cfg.init_prompts,
            want,
            cfg.allow_template_change,
            "allow_template_change",
        )
    return cfg


COMMAND = "prompts train"


def read_users(uri: str) -> pa.Array:
    """The user ids of a ``users`` input (a Parquet file or directory with a user_id column), as strings,
    each once; one line when it has none or lacks the column."""
    if "user_id" not in storage.read_schema(uri).names:
        raise PumaError(f"{uri}: users must be Parquet with a user_id column")
    ids = storage.read_table(uri, columns=["user_id"]).column("user_id")
    ids = pc.unique(ids.combine_chunks().cast(pa.string()).drop_null())
    if len(ids) == 0:
        raise PumaError(f"{uri}: users holds no user id")
    return ids


def check_run_output(cfg: PromptsConfig) -> None:
    """Refuse (one line) an output that overlaps an input, or a non-empty one ``prompts train`` did not
    write (unless ``output_mode: overwrite``): puma_ray.outputs."""
    inputs = {
        "data.train": cfg.data.train,
        "data.valid": cfg.data.valid,
        "init_head": cfg.init_head,
        "init_prompts": cfg.init_prompts,
        "users": cfg.users,
        "model.path": outputs.local_model(cfg.model.path),
    }
    storage.set_s3_endpoint(cfg.storage.s3_endpoint)  # the checks may read s3://
    outputs.check_output(cfg.output, COMMAND, inputs, cfg.output_mode == "overwrite")
    shards = storage.join(cfg.run.storage_path, f"{cfg.run.name}-shards")  # replaced by every run
    outputs.check_overlap(shards, inputs, what="run.storage_path's shard directory")


@user_errors
def train_prompts(cfg: PromptsConfig, callbacks: tuple = ()) -> dict:
    """Stage 1 entry: train per-user prompts + head; write the store, head and summary to ``cfg.output``.
    ``callbacks``: extra Ray Train callbacks."""
    check_run_output(cfg)  # before Ray starts and before anything is deleted
    for uri in (cfg.data.train, cfg.data.valid):  # footers only, before Ray starts
        if uri:
            check_interactions_input(uri, cfg.task)
    if cfg.template is None and cfg.init_prompts:  # the prompts it starts from were trained under theirs
        cfg = cfg.model_copy(update={"template": read_store_meta(cfg.init_prompts).template})
    meta = store_meta(cfg.model.path, cfg.task, cfg.template, cfg.prompt_length, "prompts")  # its config only
    cfg = _check_inits(cfg, meta)
    users = read_users(cfg.users) if cfg.users else None
    init_ray(cfg.ray, cfg.storage)
    t0 = time.time()
    train_ds, train_rows = load_interactions(cfg.data.train, cfg.task)
    datasets = {"train": train_ds}
    if cfg.data.valid:
        datasets["valid"], _ = load_interactions(cfg.data.valid, cfg.task)
    if users is not None:  # only these users' rows, counted again
        datasets = {
            k: ds.map_batches(keep_users, fn_kwargs={"users": users}, batch_format="pyarrow").materialize()
            for k, ds in datasets.items()
        }
        train_rows = datasets["train"].count()
        if train_rows == 0:
            raise PumaError(f"{cfg.data.train}: no training row of the {len(users):,} users of {cfg.users}")
    world = cfg.scaling.num_workers
    only = f" of {len(users):,} users ({cfg.users})" if users is not None else ""
    say(
        f"prompts: {train_rows:,} training rows{only} on {cfg.model.path} (d={meta.hidden_size}), "
        f"{cfg.train.epochs} epoch(s), users partitioned over {world} worker(s)"
    )
    key = {"train": cfg.data.train, "valid": cfg.data.valid, "task": cfg.task}
    if users is not None:  # the shards hold only these users' rows
        key["users"] = outputs.config_hash({"users": users.to_pylist()})
    shards = shard_by_user(datasets, world, storage.join(cfg.run.storage_path, f"{cfg.run.name}-shards"), key)
    outputs.mark_output(cfg.output, COMMAND, cfg)
    outputs.start_staging(cfg.output)  # the store and head are staged, then published together
    store = outputs.staged(cfg.output, "prompts")
    identity = {"users": key["users"]} if users is not None else {}
    trained = fit(PromptsTrainable(cfg, meta.hidden_size, train_rows, shards, store, meta, identity), callbacks)
    head = (meta.model_fingerprint, meta.hidden_size)
    save_head(outputs.staged(cfg.output), trained.model.head, cfg.task, cfg.head.model_dump(), *head)
    outputs.publish(cfg.output, ["prompts", *HEAD_FILES], retire=["summary.json"])
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
        "loop_s": trained.loop_s,
        "wall_s": time.time() - t0,
        "final_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    storage.write_json(storage.join(cfg.output, "summary.json"), summary)
    val = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in VAL_METRICS)
    say(f"prompts: wrote {summary['users']:,} prompts + head to {cfg.output} in {summary['wall_s']:.0f} s {val}")
    return summary
