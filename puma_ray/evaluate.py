"""`puma-ray evaluate`: score prompt stores (+ model + head) and the baselines on held-out interactions.

Streamed end to end: valid interactions are hash-joined (Ray Data) with a run's prompt store,
scored by ``map_batches`` with a callable class (the LM and head load once per actor), and reduced
to metrics without collecting rows (puma_ray.metrics); the baselines (global_mean, user_mean,
bias) come from puma_ray.baselines.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from puma_ray import console, storage
from puma_ray.baselines import BASELINES
from puma_ray.config import EvaluateConfig
from puma_ray.data import load_interactions, shuffle_partitions
from puma_ray.errors import PumaError, user_errors
from puma_ray.heads import load_head
from puma_ray.llm import FrozenLM, model_info
from puma_ray.metrics import distinct_users, report_metrics
from puma_ray.runtime import actor_device, actor_pool, actor_pool_size, init_ray
from puma_ray.schema import decode_prompts, read_store_meta


class PromptScorer:
    """map_batches callable over valid rows joined with their users' prompts:
    (user_id, label, item_text[, history_text], prompt (l*d)) -> (user_id, label, pred).

    Only the LM and the head live in the actor; prompts arrive in the rows. Rows scored are
    counted on the driver's console (``relay``: a console.Relay handle, under ``label``)."""

    def __init__(
        self,
        model: dict,
        task: str,
        run_uri: str,
        batch_size: int,
        num_gpus: float = 0,
        relay=None,
        label: str = "",
        total: int | None = None,
    ):
        meta = read_store_meta(storage.join(run_uri, "prompts"))
        self.device = actor_device(num_gpus)
        self.lm = FrozenLM(
            model["path"],
            task,
            meta.template,
            meta.prompt_length,
            model["dtype"],
            model["attn_implementation"],
            self.device,
        )
        self.head = load_head(run_uri, task, self.lm.fingerprint).to(self.device)
        self.l, self.d, self.batch_size = meta.prompt_length, meta.hidden_size, batch_size
        self.counter = console.RemoteProgress(relay, label, total, "rows", every=0.0)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        p = decode_prompts(batch, self.l * self.d)
        prompts = torch.from_numpy(p).view(len(p), self.l, self.d).to(self.device)
        pred = np.empty(len(p), dtype=np.float32)
        hist = batch.get("history_text")
        for s in range(0, len(p), self.batch_size):
            rows = slice(s, s + self.batch_size)
            inputs = self.lm.collate(batch["item_text"][rows], hist[rows] if hist is not None else None)
            out = self.lm.forward(prompts[rows], inputs, want_hidden=self.head.wants_hidden)
            pred[rows] = self.head.predict(out).float().cpu().numpy()
        self.counter.add(len(p))
        return {"user_id": batch["user_id"], "label": batch["label"], "pred": pred}


def _run_model(cfg: EvaluateConfig, run_uri: str) -> dict:
    """The model config to score a run with: cfg.model, or the model its prompt store records.

    Raises PumaError when the store was made for a model with another fingerprint."""
    store_uri = storage.join(run_uri, "prompts")
    meta = read_store_meta(store_uri)
    model = (
        cfg.model.model_dump() if cfg.model else {"path": meta.model, "dtype": "float32", "attn_implementation": "sdpa"}
    )
    fingerprint, _ = model_info(model["path"])
    if meta.model_fingerprint != fingerprint:
        raise PumaError(
            f"{store_uri}: prompt store was made for model {meta.model!r} (fingerprint {meta.model_fingerprint}); "
            f"model {model['path']!r} has fingerprint {fingerprint}"
        )
    return model


def _score_run(cfg: EvaluateConfig, name: str, run_uri: str, model: dict, valid_ds, valid_rows: int, relay):
    """Valid rows of the users with a prompt in ``run_uri`` joined with their prompts and scored
    by an actor pool (LM + head per actor; rows counted on the console through ``relay``, a
    console.Relay handle) -> materialized (user_id, label, pred) rows."""
    sc = cfg.scoring
    pool = actor_pool_size(sc, "scoring")
    prompts = storage.ray_read_parquet(storage.join(run_uri, "prompts"), columns=["user_id", "prompt"])
    partitions = shuffle_partitions(valid_rows, at_least=pool)  # one block per actor at least
    joined = valid_ds.join(prompts, join_type="inner", num_partitions=partitions, on=("user_id",))
    scorer_args = {
        "model": model,
        "task": cfg.task,
        "run_uri": run_uri,
        "batch_size": sc.batch_size,
        "num_gpus": sc.num_gpus,
        "relay": relay,
        "label": f"evaluate: scoring {name}",
        "total": valid_rows,
    }
    return joined.map_batches(
        PromptScorer,
        fn_constructor_kwargs=scorer_args,
        batch_size=4 * sc.batch_size,
        batch_format="numpy",
        compute=actor_pool(sc, "scoring"),
        num_gpus=sc.num_gpus,
        num_cpus=sc.cpus_per_actor,
    ).materialize()


@user_errors
def evaluate(cfg: EvaluateConfig) -> dict:
    """Entry: score every run in ``cfg.runs`` and the baselines on ``cfg.data.valid``; print a table.

    Valid rows are joined (Ray Data hash join) with each run's prompt store and scored by an actor
    pool holding only the LM and head; rows of users without a prompt are counted, not scored."""
    t_start = time.time()
    init_ray(cfg.ray, cfg.storage)
    if not cfg.data.valid:
        raise PumaError("evaluate needs data.valid (the held-out interactions)")
    valid_ds, valid_rows = load_interactions(cfg.data.valid, cfg.task)
    models = {name: _run_model(cfg, uri) for name, uri in cfg.runs.items()}  # mismatches refused before any work
    subsets = {
        name: storage.read_table(uri, columns=["user_id"]).column("user_id").combine_chunks().cast(pa.string())
        for name, uri in cfg.subsets.items()
    }
    valid_users = distinct_users(valid_ds, valid_rows)
    names = [*cfg.runs, *cfg.baselines]
    console.say(
        f"evaluate: {len(names)} method(s) ({', '.join(names)}) on {valid_rows:,} valid rows of {valid_users:,} users"
    )
    results = {}
    with console.Relay() as relay:
        for name, run_uri in cfg.runs.items():
            summary_uri = storage.join(run_uri, "summary.json")
            summary = storage.read_json(summary_uri) if storage.exists(summary_uri) else {}
            t0 = time.time()
            scored = _score_run(cfg, name, run_uri, models[name], valid_ds, valid_rows, relay.handle)
            scoring_s = time.time() - t0
            rows = scored.count()
            if rows == 0:
                raise PumaError(f"{run_uri}: no valid row could be scored (no user of {cfg.data.valid} has a prompt)")
            results[name] = {
                **report_metrics(cfg.task, scored, subsets),
                "scored_rows": rows,
                "unknown_rows": valid_rows - rows,
                "unknown_users": valid_users - distinct_users(scored, rows),
                "lm_sample_passes": summary.get("lm_sample_passes", 0),
                "wall_s": summary.get("wall_s", 0.0),
                "scoring_s": scoring_s,
            }
    if cfg.baselines:
        train_ds, train_rows = load_interactions(cfg.data.train, cfg.task)
        mu = float(train_ds.mean("label"))
        for name in cfg.baselines:
            scored = BASELINES[name](train_ds, train_rows, valid_ds, valid_rows, mu, cfg.task, cfg)
            results[name] = {
                **report_metrics(cfg.task, scored, subsets),
                "scored_rows": valid_rows,
                "unknown_rows": 0,
                "unknown_users": 0,
                "lm_sample_passes": 0,
                "wall_s": 0.0,
            }
    scoring = sum(m.get("scoring_s", 0.0) for m in results.values())
    report = {
        "task": cfg.task,
        "valid": cfg.data.valid,
        "methods": results,
        "timings": {"wall_s": time.time() - t_start, "loop_s": scoring},
    }
    print(format_table(report))
    if cfg.output:
        storage.write_json(cfg.output, report)
    return report


def format_table(report: dict) -> str:
    """A Markdown table of a report (methods x metrics + cost); subset columns when present."""
    task = report["task"]
    cols = ["rmse", "mae"] if task == "rating" else ["auc", "uauc"]
    methods = report["methods"]
    subs = sorted({k[len(cols[0]) + 4 :] for m in methods.values() for k in m if k.startswith(f"{cols[0]}_in_")})
    extra = [f"{cols[0]}_{side}_{sub}" for sub in subs for side in ("in", "out")]
    head = [c.upper() for c in cols] + [f"{cols[0].upper()} {side} {sub}" for sub in subs for side in ("in", "out")]
    lines = [
        f"| method | {' | '.join(head)} | LM sample-passes | wall s | unknown rows |",
        "|---|" + "---:|" * (len(head) + 3),
    ]
    for name, m in methods.items():
        vals = " | ".join(f"{m[c]:.4f}" if c in m else "" for c in cols + extra)
        cost = f"{int(m.get('lm_sample_passes', 0)):,} | {m.get('wall_s', 0):.1f} | {m.get('unknown_rows', 0)}"
        lines.append(f"| {name} | {vals} | {cost} |")
    return "\n".join(lines)
