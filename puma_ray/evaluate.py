"""Score prompt stores (+ model + head) and simple baselines on held-out interactions.

Scoring runs as Ray Data ``map_batches`` over the valid interactions with a callable class
(the LM, prompts and head load once per actor). Metrics use scikit-learn:
rating -> RMSE, MAE; ctr -> AUC and uAUC (mean per-user AUC over users with both classes).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from puma_ray import storage
from puma_ray.config import EvaluateConfig
from puma_ray.data import load_interactions
from puma_ray.errors import PumaError, user_errors
from puma_ray.heads import load_head
from puma_ray.llm import FrozenLM, model_info
from puma_ray.schema import read_prompt_store, read_store_meta


class PromptScorer:
    """map_batches callable: rows of (user_id, item_text[, history_text]) -> predictions.

    Rows whose user has no prompt in the store get pred = NaN (counted by the caller).
    """

    def __init__(self, model: dict, task: str, run_uri: str, batch_size: int):
        store_uri = storage.join(run_uri, "prompts")
        meta = read_store_meta(store_uri)
        self.lm = FrozenLM(model["path"], task, meta.template, meta.prompt_length, model["dtype"], model["attn_implementation"])
        _, ids, prompts = read_prompt_store(store_uri, expect_fingerprint=self.lm.fingerprint)
        self.index = {u: i for i, u in enumerate(ids)}
        self.prompts = torch.tensor(prompts).view(len(ids), meta.prompt_length, meta.hidden_size)
        self.head = load_head(run_uri, task, self.lm.fingerprint)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        idx = np.array([self.index.get(u, -1) for u in batch["user_id"]])
        pred = np.full(len(idx), np.nan, dtype=np.float32)
        known = np.flatnonzero(idx >= 0)
        hist = batch.get("history_text")
        for s in range(0, len(known), self.batch_size):
            rows = known[s : s + self.batch_size]
            inputs = self.lm.collate(batch["item_text"][rows], hist[rows] if hist is not None else None)
            out = self.lm.forward(self.prompts[idx[rows]], inputs, want_hidden=self.head.wants_hidden)
            pred[rows] = self.head.predict(out).float().numpy()
        return {"user_id": batch["user_id"], "label": batch["label"], "pred": pred}


METRIC_NAMES = ("rmse", "mae", "auc", "uauc")


def metrics(task: str, frame: pd.DataFrame) -> dict:
    """frame: user_id, label, pred (NaN = not scored) -> metric dict incl. scored/unknown counts."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, roc_auc_score

    ok = frame["pred"].notna()
    f = frame[ok]
    out: dict = {"scored_rows": int(ok.sum()), "unknown_rows": int((~ok).sum()),
                 "unknown_users": int(frame.loc[~ok, "user_id"].nunique())}
    if len(f) == 0:
        raise PumaError("no valid row could be scored (no user of the valid set has a prompt)")
    if task == "rating":
        out["rmse"] = math.sqrt(mean_squared_error(f["label"], f["pred"]))
        out["mae"] = float(mean_absolute_error(f["label"], f["pred"]))
    else:
        out["auc"] = float(roc_auc_score(f["label"], f["pred"])) if f["label"].nunique() == 2 else float("nan")
        per_user = [roc_auc_score(g["label"], g["pred"]) for _, g in f.groupby("user_id") if g["label"].nunique() == 2]
        out["uauc"] = float(np.mean(per_user)) if per_user else float("nan")
        out["uauc_users"] = len(per_user)
    return out


def _run_model(cfg: EvaluateConfig, run_uri: str) -> dict:
    """The model config to score a run with: cfg.model, or the model its prompt store records.

    Raises PumaError when the store was made for a model with another fingerprint."""
    store_uri = storage.join(run_uri, "prompts")
    meta = read_store_meta(store_uri)
    model = cfg.model.model_dump() if cfg.model else {"path": meta.model, "dtype": "float32", "attn_implementation": "sdpa"}
    fingerprint, _ = model_info(model["path"])
    if meta.model_fingerprint != fingerprint:
        raise PumaError(f"{store_uri}: prompt store was made for model {meta.model!r} (fingerprint {meta.model_fingerprint}); "
                        f"model {model['path']!r} has fingerprint {fingerprint}")
    return model


def _collect(ds, columns=("user_id", "label", "pred")) -> pd.DataFrame:
    """The (small) scored columns as a plain numpy-backed frame (Arrow-backed floats hide NaN from notna)."""
    df = ds.select_columns(list(columns)).to_pandas()
    return pd.DataFrame({c: df[c].astype(str) if c == "user_id" else df[c].to_numpy(np.float64) for c in columns})


def baseline_frames(train_ds, valid: pd.DataFrame, names: list[str]) -> dict[str, pd.DataFrame]:
    """global_mean: the mean train label; user_mean: each user's mean train label (global for unseen users)."""
    out = {}
    g = float(train_ds.mean("label"))
    if "global_mean" in names:
        out["global_mean"] = valid.assign(pred=g)
    if "user_mean" in names:
        um = train_ds.groupby("user_id").mean("label").to_pandas()
        um = pd.Series(um["mean(label)"].to_numpy(np.float64), index=um["user_id"].astype(str))
        out["user_mean"] = valid.assign(pred=valid["user_id"].map(um).fillna(g))
    return out


@user_errors
def evaluate(cfg: EvaluateConfig) -> dict:
    """Entry: score every run in ``cfg.runs`` and the baselines on ``cfg.data.valid``; print a table."""
    import ray.data

    from puma_ray.runtime import init_ray

    init_ray(cfg.ray, cfg.storage)
    if not cfg.data.valid:
        raise PumaError("evaluate needs data.valid (the held-out interactions)")
    valid_ds, _ = load_interactions(cfg.data.valid, cfg.task)
    models = {name: _run_model(cfg, run_uri) for name, run_uri in cfg.runs.items()}  # refuses mismatches before any actor starts
    subsets = {name: set(storage.read_table(uri, columns=["user_id"]).column("user_id").to_pylist()) for name, uri in cfg.subsets.items()}
    frames: dict[str, tuple[pd.DataFrame, dict]] = {}
    for name, run_uri in cfg.runs.items():
        summary_uri = storage.join(run_uri, "summary.json")
        summary = storage.read_json(summary_uri) if storage.exists(summary_uri) else {}
        scored = valid_ds.map_batches(
            PromptScorer, fn_constructor_kwargs={"model": models[name], "task": cfg.task, "run_uri": run_uri, "batch_size": cfg.batch_size},
            batch_size=4 * cfg.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
        )
        frames[name] = (_collect(scored), {"lm_sample_passes": summary.get("lm_sample_passes", 0), "wall_s": summary.get("wall_s", 0.0)})
    if cfg.baselines:
        train_ds, _ = load_interactions(cfg.data.train, cfg.task)
        valid = _collect(valid_ds, ("user_id", "label"))
        for name, frame in baseline_frames(train_ds, valid, cfg.baselines).items():
            frames[name] = (frame, {"lm_sample_passes": 0, "wall_s": 0.0})
    results = {}
    for name, (frame, cost) in frames.items():
        results[name] = {**metrics(cfg.task, frame), **cost}
        for sub, users in subsets.items():
            inside = frame["user_id"].isin(users)
            for side, part in (("in", frame[inside]), ("out", frame[~inside])):
                if part["pred"].notna().any():
                    results[name].update({f"{k}_{side}_{sub}": v for k, v in metrics(cfg.task, part).items() if k in METRIC_NAMES})
    report = {"task": cfg.task, "valid": cfg.data.valid, "methods": results}
    print(format_table(report))
    if cfg.output:
        storage.write_json(cfg.output, report)
    return report


def format_table(report: dict) -> str:
    """A Markdown table of a report (methods x metrics + cost); subset columns when present."""
    task = report["task"]
    cols = ["rmse", "mae"] if task == "rating" else ["auc", "uauc"]
    methods = report["methods"]
    subs = sorted({k[len(cols[0]) + 4:] for m in methods.values() for k in m if k.startswith(f"{cols[0]}_in_")})
    extra = [f"{cols[0]}_{side}_{sub}" for sub in subs for side in ("in", "out")]
    head = [c.upper() for c in cols] + [f"{cols[0].upper()} {side} {sub}" for sub in subs for side in ("in", "out")]
    lines = [f"| method | {' | '.join(head)} | LM sample-passes | wall s | unknown rows |",
             "|---|" + "---:|" * (len(head) + 3)]
    for name, m in methods.items():
        vals = " | ".join(f"{m[c]:.4f}" if c in m else "" for c in cols + extra)
        lines.append(f"| {name} | {vals} | {int(m.get('lm_sample_passes', 0)):,} | {m.get('wall_s', 0):.1f} | {m.get('unknown_rows', 0)} |")
    return "\n".join(lines)
