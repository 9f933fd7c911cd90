"""Why the migration adapter carries little over between real LMs with few users: measured.

Reads a finished story run (``benchmarks/real_quality.py``'s ``run-*`` directory: ``runs/source``,
``runs/full_retrain``, the data). In ONE process, no Ray (the target LM loads once and its prefix
cache stays warm across every configuration; the training step is the stage's own: ``TaskModel``
with a ``MigrationAdapter`` and a new head, the head's loss, AdamW on ``trainer.lr_schedule``):

1. statistics of the source prompts, the target's retrained prompts (full_retrain), the target's
   input embeddings (tokens) and the adapter's output at init and after training: vector norms
   (p10/p50/p90), per-dimension mean and std, the share of variance in the top principal
   components, and how much of each user's mean training rating a ridge regression reads from the
   prompts (5-fold cross-validated R^2: does the prompt hold the user's level?);
2. learning curves: the adapter (+ the target's new head) trained on ``n`` users drawn at random
   (seeded) from a pool that excludes a fixed 25% of the users; validation RMSE per epoch on the
   held-out users' valid rows ("out") and on the trained users' valid rows ("in");
3. the configurations given (``--configs NAME=JSON``: MigrateConfig ``adapter.*`` / ``train.*``
   fields over the story's PUMA defaults) at each ``--users`` count.

Prints one table per configuration and writes ``--out`` (JSON). Which test bed the numbers come
from is the run directory's: say so beside them.

    python benchmarks/adapter_study.py --run /tmp/bench/A/run-real --users 50,233 \\
        --configs base='{}' wd='{"train.weight_decay": 0.1}'
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from puma_ray import config as C
from puma_ray import storage
from puma_ray.schema import read_prompt_store

if TYPE_CHECKING:
    from puma_ray.adapter import MigrationAdapter
    from puma_ray.llm import FrozenLM
    from puma_ray.trainer import Batch, TaskModel


def vector_stats(x: np.ndarray) -> dict:
    """(N, d) vectors -> norms p10/p50/p90, mean |per-dim mean|, mean per-dim std, top-PC variance shares."""
    from sklearn.decomposition import PCA

    norms = np.linalg.norm(x, axis=1)
    pca = PCA(n_components=min(32, *x.shape)).fit(x)
    share = np.cumsum(pca.explained_variance_ratio_)
    return {
        "n": len(x),
        "norm_p10_p50_p90": [round(float(v), 3) for v in np.percentile(norms, [10, 50, 90])],
        "dim_mean_abs": round(float(np.abs(x.mean(0)).mean()), 4),
        "dim_std": round(float(x.std(0).mean()), 4),
        "var_top1_top8_top32": [round(float(share[min(k, len(share)) - 1]), 3) for k in (1, 8, 32)],
    }


def level_r2(x: np.ndarray, y: np.ndarray) -> float:
    """5-fold cross-validated R^2 of a ridge regression of ``y`` (N,) on ``x`` (N, d)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import cross_val_score

    model = RidgeCV(alphas=np.logspace(-3, 3, 13))
    return round(float(cross_val_score(model, x, y, cv=5, scoring="r2").mean()), 3)


def rows_of(table: pa.Table, users: list[str]) -> pa.Table:
    """The rows of ``users``."""
    return table.filter(pc.is_in(table.column("user_id"), value_set=pa.array(users, pa.string())))


def batches(rows: pa.Table, size: int, rng: np.random.Generator | None):
    """``rows`` in slices of ``size`` rows: shuffled by ``rng``, or in order (None)."""
    order = rng.permutation(rows.num_rows) if rng is not None else np.arange(rows.num_rows)
    for s in range(0, rows.num_rows, size):
        yield rows.take(pa.array(order[s : s + size]))


def make_batch(rows: pa.Table, lm: FrozenLM, src: np.ndarray, index: dict[str, int], l: int) -> Batch:
    """The trainer's :class:`Batch` of ``rows``: their users' source prompts (``src`` rows by ``index``)."""
    import torch

    from puma_ray.trainer import Batch

    idx = np.array([index[u] for u in rows.column("user_id").to_pylist()])
    prompts = torch.from_numpy(src[idx]).view(len(idx), l, -1)
    label = torch.as_tensor(rows.column("label").to_numpy(), dtype=torch.float32)
    return Batch(label=label, inputs=lm.collate(rows.column("item_text").to_pylist()), src=prompts)


def rmse(model: TaskModel, lm: FrozenLM, rows: pa.Table, src, index, l) -> float:
    """RMSE of ``model`` on ``rows`` (no gradients; the model is back in training mode after)."""
    import torch

    model.eval()
    se, n = 0.0, 0
    with torch.no_grad():
        for part in batches(rows, 256, None):
            b = make_batch(part, lm, src, index, l)
            _, pred = model(b.src, b, lm)
            se += float(((pred - b.label).double() ** 2).sum())
            n += len(b.label)
    model.train()
    return math.sqrt(se / max(n, 1))


def run_config(name, over, n, pool, held_out, data, lm, src, index, l, seed, steps=None, level=None) -> dict:
    """Train adapter + head on ``n`` users of ``pool``; validation RMSE per epoch in (at most 50 of
    the trained users) / out. ``steps``: train for at least this many optimizer steps (the epochs
    follow the rows) instead of the config's epochs. ``level``: (N,) every user's mean training label in
    ``src``'s order, for ``adapter.probe: label_mean`` (its readout is fitted on all users, as a migration does)."""
    import torch

    from puma_ray.adapter import MigrationAdapter, fit_probe
    from puma_ray.heads import build_head
    from puma_ray.trainer import TaskModel, lr_schedule

    cfg = C.build(C.MigrateConfig, C.deep_merge(base_migrate(), C.nest(over)))
    rng = np.random.default_rng(seed)
    users = sorted(rng.choice(pool, size=min(n, len(pool)), replace=False).tolist())
    train = rows_of(data["train"], users)
    if steps:
        epochs = math.ceil(steps / math.ceil(train.num_rows / cfg.train.batch_size))
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
    valid_in, valid_out = rows_of(data["valid"], users[:50]), rows_of(data["valid"], held_out)
    torch.manual_seed(seed)
    probe = fit_probe(src, level)[:2] if cfg.adapter.probe != "none" else None
    adapter = MigrationAdapter.from_config(src.shape[1] // l, lm.hidden_size, cfg.adapter, probe)
    model = TaskModel(build_head("rating", lm.hidden_size, cfg.head), adapter)
    t = cfg.train
    steps = math.ceil(train.num_rows / t.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(t, steps))
    out_init = adapter_outputs(adapter, src, l)
    curve = [
        {"epoch": 0, "in": rmse(model, lm, valid_in, src, index, l), "out": rmse(model, lm, valid_out, src, index, l)}
    ]
    t0 = time.time()
    for epoch in range(t.epochs):
        loss_sum, rows = 0.0, 0
        for part in batches(train, t.batch_size, np.random.default_rng(seed + epoch)):
            b = make_batch(part, lm, src, index, l)
            loss, _ = model(b.src, b, lm)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.item() * len(b.label)
            rows += len(b.label)
        point = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / rows,
            "in": rmse(model, lm, valid_in, src, index, l),
            "out": rmse(model, lm, valid_out, src, index, l),
        }
        curve.append(point)
        print(
            f"  {name} n={n} epoch {epoch + 1}: loss {point['train_loss']:.4f} "
            f"in {point['in']:.4f} out {point['out']:.4f}",
            flush=True,
        )
    return {
        "config": name,
        "over": over,
        "users": len(users),
        "train_rows": train.num_rows,
        "steps": steps * t.epochs,
        "curve": curve,
        "best_out": min(p["out"] for p in curve[1:]),
        "last_out": curve[-1]["out"],
        "seconds": time.time() - t0,
        "adapter_out_init": vector_stats(out_init),
        "adapter_out_trained": vector_stats(adapter_outputs(adapter, src, l)),
    }


def adapter_outputs(adapter: MigrationAdapter, src: np.ndarray, l: int) -> np.ndarray:
    """The adapter's outputs (N, l * d_tgt) for the source prompts ``src`` (no gradients)."""
    import torch

    adapter.eval()
    with torch.no_grad():
        out = adapter(torch.from_numpy(src).view(len(src), l, -1)).reshape(len(src), -1).numpy()
    adapter.train()
    return out


def reference_rmse(runs: str, users: list[str], data: dict, lm: FrozenLM, l: int) -> dict:
    """RMSE on ``users``' valid rows of the target's runs (their prompts and heads: full_retrain,
    random_init, and the run's own puma migration) and of the global and per-user mean of the
    training labels: the bars for "out"."""
    from puma_ray.heads import load_head
    from puma_ray.trainer import TaskModel

    out = {}
    for name in ("full_retrain", "random_init", "puma"):
        if not storage.exists(os.path.join(runs, name, "head.json")):
            continue
        _, ids, prompts = read_prompt_store(os.path.join(runs, name, "prompts"))
        model = TaskModel(load_head(os.path.join(runs, name), "rating", lm.fingerprint))
        out[name] = round(
            rmse(model, lm, rows_of(data["valid"], users), prompts, {u: i for i, u in enumerate(ids)}, l), 4
        )
    train, valid = data["train"].to_pandas(), rows_of(data["valid"], users).to_pandas()
    mean = train.groupby("user_id")["label"].mean()
    out["global_mean"] = round(float(np.sqrt(((valid["label"] - train["label"].mean()) ** 2).mean())), 4)
    out["user_mean"] = round(float(np.sqrt(((valid["label"] - valid["user_id"].map(mean)) ** 2).mean())), 4)
    return out


def base_migrate() -> dict:
    """The story's PUMA settings (quickstart DEFAULTS["migrate"]) as a MigrateConfig dict."""
    from puma_ray.quickstart import DEFAULTS

    m = DEFAULTS["migrate"]
    return {
        "model": {"path": "unused"},
        "sources": ["unused"],
        "data": {"train": "unused"},
        "output": "unused",
        "adapter": m["adapter"],
        "train": m["train"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a real_quality.py run directory (runs/, and its data)")
    ap.add_argument("--data", default=None, help="the interactions (default: MovieLens-100k, as the story imports it)")
    ap.add_argument("--users", default="50,233", help="adapter training users, comma-separated")
    ap.add_argument("--configs", nargs="*", default=["base={}"], help="NAME=JSON of dotted MigrateConfig fields")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="train each for >= this many steps (epochs follow)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON results (default: RUN/adapter_study.json)")
    args = ap.parse_args()

    import torch

    from puma_ray.datasets.packaged import movielens_100k
    from puma_ray.llm import FrozenLM

    torch.set_num_threads(args.threads)
    runs = os.path.join(args.run, "runs")
    cache = os.path.expanduser(os.environ.get("PUMA_MODEL_CACHE", C.MODEL_CACHE))
    data_dir = args.data or movielens_100k(cache)
    data = {s: storage.read_table(os.path.join(data_dir, s)) for s in ("train", "valid")}
    smeta, s_ids, src = read_prompt_store(os.path.join(runs, "source", "prompts"))
    tmeta, t_ids, tgt = read_prompt_store(os.path.join(runs, "full_retrain", "prompts"))
    index = {u: i for i, u in enumerate(s_ids)}
    lm = FrozenLM(tmeta.model, "rating", tmeta.template, tmeta.prompt_length)
    print(
        f"adapter_study: {smeta.model} (d={smeta.hidden_size}) -> {tmeta.model} (d={tmeta.hidden_size}), "
        f"template {tmeta.template}, {len(s_ids)} users, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    level = data["train"].group_by("user_id").aggregate([("label", "mean")]).to_pandas().set_index("user_id")
    y_s = level.loc[s_ids, "label_mean"].to_numpy()
    y_t = level.loc[t_ids, "label_mean"].to_numpy()
    emb = lm.model.get_input_embeddings()
    tokens = (
        emb(torch.randperm(emb.num_embeddings, generator=torch.Generator().manual_seed(0))[:20000]).detach().numpy()
    )
    stats = {
        "source_prompts": {**vector_stats(src), "level_r2": level_r2(src, y_s)},
        "target_retrained_prompts": {**vector_stats(tgt), "level_r2": level_r2(tgt, y_t)},
        "target_token_embeddings": vector_stats(tokens),
    }
    for k, v in stats.items():
        print(f"  {k}: {json.dumps(v)}", flush=True)

    rng = np.random.default_rng(args.seed + 1)
    users = np.array(sorted(s_ids))
    held = rng.random(len(users)) < 0.25
    held_out, pool = users[held].tolist(), users[~held]
    references = reference_rmse(runs, held_out, data, lm, tmeta.prompt_length)
    print(f"  on the {len(held_out)} held-out users' valid rows: {json.dumps(references)}", flush=True)
    results = []
    for spec in args.configs:
        name, over = spec.split("=", 1)
        for n in (int(x) for x in args.users.split(",")):
            print(f"adapter_study: {name} on {n} users ...", flush=True)
            r = run_config(
                name,
                json.loads(over),
                n,
                pool,
                held_out,
                data,
                lm,
                src,
                index,
                tmeta.prompt_length,
                args.seed,
                args.steps,
                level=y_s,
            )
            results.append(r)
    print("\n| config | users | rows | steps | out RMSE epoch 0 | best out | last out | last in | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        c = r["curve"]
        print(
            f"| {r['config']} | {r['users']} | {r['train_rows']:,} | {r['steps']} | {c[0]['out']:.4f} | "
            f"{r['best_out']:.4f} | {r['last_out']:.4f} | {c[-1]['in']:.4f} | {r['seconds']:.0f} |"
        )
    out = args.out or os.path.join(args.run, "adapter_study.json")
    storage.write_json(
        out,
        {
            "stats": stats,
            "held_out_users": len(held_out),
            "references": references,
            "results": results,
            "prefix_cache": lm.prefix_cache.stats(),
            "load": os.getloadavg(),
        },
    )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
