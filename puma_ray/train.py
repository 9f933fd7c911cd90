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

import numpy as np
import torch
from torch import nn

from puma_ray import storage
from puma_ray.adapter import MigrationAdapter
from puma_ray.config import MigrateConfig, PromptsConfig
from puma_ray.errors import PumaError, user_errors
from puma_ray.heads import build_head, save_head
from puma_ray.llm import DEFAULT_TEMPLATE, FrozenLM, model_info
from puma_ray.schema import StoreMeta, write_prompt_store


class PromptModel(nn.Module):
    """Stage 1's trainable part: a per-user prompt table (N, l*d) and the task head."""

    def __init__(self, n_users: int, prompt_length: int, hidden_size: int, head: nn.Module,
                 init_range: float = 0.1, train_prompts: bool = True):
        super().__init__()
        self.l, self.d = prompt_length, hidden_size
        self.prompts = nn.Embedding(n_users, prompt_length * hidden_size)
        nn.init.uniform_(self.prompts.weight, -init_range, init_range)
        self.prompts.weight.requires_grad_(train_prompts)
        self.head = head

    def param_groups(self, lr: float, prompt_lr: float | None) -> list[dict]:
        groups = [{"params": list(self.head.parameters()), "lr": lr}]
        if self.prompts.weight.requires_grad:
            groups.append({"params": [self.prompts.weight], "lr": prompt_lr or lr})
        return groups

    def forward(self, batch: dict, lm: FrozenLM) -> tuple[torch.Tensor, torch.Tensor]:
        """batch: user_idx (B,), label (B,), inputs (see FrozenLM.collate) -> (loss, (B,) predictions)."""
        prompts = self.prompts(batch["user_idx"]).view(-1, self.l, self.d)  # (B, l, d)
        out = lm.forward(prompts, batch["inputs"], want_hidden=self.head.wants_hidden)
        return self.head.loss(out, batch["label"])


def build_prompt_model(cfg: PromptsConfig, lm: FrozenLM, ctx: dict) -> PromptModel:
    head = build_head(cfg.task, lm.hidden_size, cfg.head)
    return PromptModel(len(ctx["users"]), cfg.prompt_length, lm.hidden_size, head, cfg.train.init_range, cfg.train.train_prompts)


def prompt_batch(np_batch: dict, lm: FrozenLM, ctx: dict, device) -> dict | None:
    """A Ray Data numpy batch -> model batch; rows of users outside the table are dropped and counted."""
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


class AdapterModel(nn.Module):
    """Stage 2's trainable part: the migration adapter + the target's task head.

    Source prompts arrive as frozen inputs; only the adapter and the head learn."""

    def __init__(self, adapter: nn.Module, head: nn.Module):
        super().__init__()
        self.adapter, self.head = adapter, head

    def param_groups(self, lr: float, prompt_lr: float | None) -> list[dict]:
        return [{"params": list(self.parameters()), "lr": lr}]

    def forward(self, batch: dict, lm: FrozenLM) -> tuple[torch.Tensor, torch.Tensor]:
        """batch: src (B, l, d_src), label (B,), inputs -> (loss, (B,) predictions)."""
        prompts = self.adapter(batch["src"])  # (B, l, d_src) -> (B, l, d_tgt)
        out = lm.forward(prompts, batch["inputs"], want_hidden=self.head.wants_hidden)
        return self.head.loss(out, batch["label"])


def build_adapter_model(cfg: MigrateConfig, lm: FrozenLM, ctx: dict) -> AdapterModel:
    """ctx["src"]: (N_selected, l, d_src) source prompts in ctx["users"] order."""
    ctx["src_tensor"] = torch.as_tensor(ctx["src"], dtype=torch.float32)
    a = cfg.adapter
    adapter = MigrationAdapter(ctx["src_tensor"].shape[-1], lm.hidden_size, a.width, a.depth, a.dropout)
    return AdapterModel(adapter, build_head(cfg.task, lm.hidden_size, cfg.head))


def adapter_batch(np_batch: dict, lm: FrozenLM, ctx: dict, device) -> dict | None:
    batch = prompt_batch(np_batch, lm, ctx, device)
    if batch is not None:
        batch["src"] = ctx["src_tensor"][batch["user_idx"].cpu()].to(device)
    return batch


TRAINABLES = {
    "prompts": (PromptsConfig, build_prompt_model, prompt_batch),
    "adapter": (MigrateConfig, build_adapter_model, adapter_batch),
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


def _allreduce(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _validate(engine, lm, shard, make_batch, ctx, task, batch_size, device) -> dict:
    """Task metrics on this worker's valid shard, reduced over workers."""
    import torch.distributed as dist

    se = ae = n = loss_sum = 0.0
    labels, preds = [], []
    engine.eval()
    with torch.no_grad():
        for np_batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            b = make_batch(np_batch, lm, ctx, device)
            if b is None:
                continue
            loss, pred = engine(b, lm)
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

        gathered = [None] * dist.get_world_size() if dist.is_initialized() else None
        mine = (np.concatenate(labels) if labels else np.zeros(0), np.concatenate(preds) if preds else np.zeros(0))
        if gathered is not None:
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        y = np.concatenate([g[0] for g in gathered]); p = np.concatenate([g[1] for g in gathered])
        out["val_auc"] = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
    return out


def _restore(model: nn.Module) -> dict:
    """Load the latest reported checkpoint into ``model`` (safetensors + JSON, nothing unpickled).

    Returns the progress to continue from: {"epoch" (next), "lm_sample_passes", "wall_s"}."""
    import ray.train
    from safetensors.torch import load as st_load

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {"epoch": 0, "lm_sample_passes": 0.0, "wall_s": 0.0}
    with ckpt.as_directory() as d:
        model.load_state_dict(st_load(storage.read_bytes(os.path.join(d, "trainable.safetensors"))))
        state = storage.read_json(os.path.join(d, "state.json"))
    return {**state, "epoch": state["epoch"] + 1}


def _report(metrics: dict, engine, rank: int) -> None:
    """Every rank reports the metrics; rank 0 attaches the trainable weights as a checkpoint."""
    import ray.train
    from safetensors.torch import save as st_save

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            state = {k: v.detach().cpu().contiguous() for k, v in engine.module.state_dict().items()}
            storage.write_bytes(os.path.join(d, "trainable.safetensors"), st_save(state))
            storage.write_json(os.path.join(d, "state.json"), {k: metrics[k] for k in ("epoch", "lm_sample_passes", "wall_s")})
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker. config: {"kind", "cfg" (dumped config), "ctx", "steps_per_epoch", "datasets"}."""
    import ray.train

    from puma_ray.runtime import deepspeed_config, setup_worker

    cfg_cls, build, make_batch = TRAINABLES[config["kind"]]
    cfg = cfg_cls.model_validate(config["cfg"])
    device = setup_worker(cfg.scaling)
    import deepspeed  # after setup_worker chose the accelerator

    torch.manual_seed(cfg.train.seed)
    ctx = {**config["ctx"], "index": {u: i for i, u in enumerate(config["ctx"]["users"])}}
    lm = FrozenLM(cfg.model.path, cfg.task, cfg.template, cfg.prompt_length, cfg.model.dtype, cfg.model.attn_implementation, device)
    model = build(cfg, lm, ctx)
    progress = _restore(model)
    steps, start = config["steps_per_epoch"], progress["epoch"]
    optimizer = torch.optim.AdamW(model.param_groups(cfg.train.lr, cfg.train.prompt_lr), weight_decay=cfg.train.weight_decay)
    schedule = _lr_lambda(cfg.train.schedule, cfg.train.epochs * steps, cfg.train.warmup_frac)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step + start * steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg.scaling, cfg.train, cfg.model.dtype))
    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid") if "valid" in config["datasets"] else None
    rank = ray.train.get_context().get_world_rank()

    for epoch in range(start, cfg.train.epochs):
        t0, loss_sum, rows = time.time(), 0.0, 0
        for np_batch in train_shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy",
                                                  local_shuffle_buffer_size=cfg.train.shuffle_buffer or None,
                                                  local_shuffle_seed=cfg.train.seed + epoch):
            batch = make_batch(np_batch, lm, ctx, device)
            if batch is None:
                continue
            loss, _ = engine(batch, lm)  # frozen LM forward inside; gradients reach the trainable part only
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item() * len(batch["label"]); rows += len(batch["label"])
        loss_sum, rows = _allreduce([loss_sum, rows])
        progress["lm_sample_passes"] += rows
        progress["wall_s"] += time.time() - t0
        metrics = {"epoch": epoch, "train_loss": loss_sum / max(rows, 1), "lm_sample_passes": progress["lm_sample_passes"],
                   "wall_s": progress["wall_s"], "unknown_rows": int(_allreduce([ctx.get("unknown_rows", 0)])[0])}
        if valid_shard is not None:
            metrics.update(_validate(engine, lm, valid_shard, make_batch, ctx, cfg.task, cfg.train.batch_size, device))
        if rank == 0:
            print(f"[{config['kind']}] epoch {epoch + 1}/{cfg.train.epochs} " + " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if k != "epoch"), flush=True)
        _report(metrics, engine, rank)


def fit(kind: str, cfg, datasets: dict, ctx: dict, train_rows: int, callbacks: tuple = ()):
    """Run ``train_loop_per_worker`` on a TorchTrainer; returns the ray.train.Result (raises PumaError on failure).

    ``callbacks``: extra Ray Train callbacks, e.g. Tune's TuneReportCallback when run as a Tune trial."""
    import ray.train
    from ray.train.torch import TorchTrainer

    s = cfg.scaling
    steps = max(1, math.ceil(train_rows / s.num_workers / cfg.train.batch_size))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"kind": kind, "cfg": cfg.model_dump(), "ctx": ctx, "steps_per_epoch": steps, "datasets": sorted(datasets)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=_storage_path(cfg.run.storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=list(callbacks) or None,
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise PumaError(f"training run {cfg.run.name!r} finished without a checkpoint")
    return result


def _storage_path(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


@user_errors
def train_prompts(cfg: PromptsConfig) -> dict:
    """Stage 1 entry: train per-user prompts + head; write store, head and summary to ``cfg.output``."""
    from puma_ray.data import load_interactions
    from puma_ray.runtime import init_ray

    init_ray(cfg.ray, cfg.storage)
    t0 = time.time()
    train_ds, train_rows = load_interactions(cfg.data.train, cfg.task)
    datasets = {"train": train_ds}
    if cfg.data.valid:
        datasets["valid"], _ = load_interactions(cfg.data.valid, cfg.task)
    users = sorted(train_ds.unique("user_id"))
    print(f"prompts: {len(users)} users, {train_rows} training rows, model {cfg.model.path}", file=sys.stderr)
    result = fit("prompts", cfg, datasets, {"users": users}, train_rows)

    from safetensors.torch import load as st_load

    with result.checkpoint.as_directory() as d:
        state = st_load(storage.read_bytes(os.path.join(d, "trainable.safetensors")))
        progress = storage.read_json(os.path.join(d, "state.json"))
    fingerprint, d = model_info(cfg.model.path)
    meta = StoreMeta(model=cfg.model.path, model_fingerprint=fingerprint, hidden_size=d, prompt_length=cfg.prompt_length,
                     template=cfg.template or DEFAULT_TEMPLATE[cfg.task], stage="prompts")
    write_prompt_store(storage.join(cfg.output, "prompts"), meta, users, state["prompts.weight"].numpy())
    head = build_head(cfg.task, d, cfg.head)
    head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
    save_head(cfg.output, head, cfg.task, cfg.head.model_dump(), fingerprint, d)
    summary = {
        "stage": "prompts", "model": cfg.model.path, "users": len(users), "train_rows": train_rows,
        "epochs": cfg.train.epochs, "train_prompts": cfg.train.train_prompts,
        "lm_sample_passes": progress["lm_sample_passes"], "train_wall_s": progress["wall_s"],
        "wall_s": time.time() - t0, "final_metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    }
    storage.write_json(storage.join(cfg.output, "summary.json"), summary)
    val = " ".join(f"{k}={v:.4f}" for k, v in summary["final_metrics"].items() if k.startswith("val_") and k != "val_rows")
    print(f"prompts: wrote {len(users)} prompts + head to {cfg.output} {val}".rstrip(), file=sys.stderr)
    return summary
