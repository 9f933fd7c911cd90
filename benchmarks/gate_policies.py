"""Which users should a gated retrain take, for a given budget? Gate policies compared offline, in ONE run.

A user's gated-retrain prompt depends only on their own rows (stage 1 with the LM and the head
frozen; row-wise optimizer state), so one run that retrains EVERY user from their migrated prompt
gives each user's after-retrain predictions, and any choice of users can be scored without training
again: a chosen user's validation rows take the retrained predictions, the others the migrated
ones. Policies see only the verdict part of the validation rows (``--holdout``: the same stable
hash of user and item as ``gate.holdout``) and are measured on the held-out rows they never saw.
A user's retrain costs their training rows x the retrain's epochs (the all-users run's LM
sample-passes split by training rows); the budget is a share of full retraining's passes, PUMA's
own passes included.

Policies (each ranks users; users are taken in order while the budget lasts; a user the
retrain would not take, a score <= 0, is never taken):
  relative   the gate's default: the migrated prompt's per-user RMSE / the reference's - 1, users
             with >= --min-rows verdict rows (gate.mode relative; gate.max_share takes the worst)
  absolute   gate.mode absolute with gate.min_rows 1: per-user RMSE of the migrated prompt - the
             reference's, every user with a verdict row
  excess     the migrated prompt's mean squared-error excess over the reference on the verdict
             rows, shrunk toward 0 for users with few of them (x n / (n + --shrink)); every user
             eligible. A user's validation rows are about a fixed share of their training rows (a
             per-user chronological split), so this is the expected gain per pass of their retrain
  random     a stable hash of the user id (what a budget buys without a gate)
  oracle     the held-out gain per pass itself (a ceiling no policy reaches: it reads the rows it
             is scored on)

    # every user retrained from the migrated prompts, under the migrated head, with gate.train's settings:
    puma-ray prompts train task=rating model.path=TARGET data.train=D/train data.valid=D/valid \
        output=ALL init_head=OUT init_prompts=OUT/prompts run.name=all train.epochs=2 \
        train.batch_size=128 train.lr=3e-3 train.prompt_lr=0.3 train.head_lr=0 train.min_steps=200
    python benchmarks/gate_policies.py --data D --migrated OUT --retrained ALL --full-retrain RUN
        --source RUN [--holdout 0.5] [--budgets 0.2,0.25,0.3,0.35,0.4] [--rows scored.parquet]

(``--min-steps`` shrinks the micro-batches of a retrain of few users, so a real gated retrain of a
subset takes more optimizer steps per row than the all-users run: the estimate is conservative.)

Prints JSON, then a table: held-out RMSE / full retraining's for each policy and budget.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def scored_rows(runs: dict[str, str], data: str, task: str, holdout: float):
    """Every run's validation rows scored -> pandas (run, user_id, label, pred, held)."""
    import ray

    from puma_ray import console
    from puma_ray.config import RayConfig, ScoringConfig
    from puma_ray.data import load_interactions, mark_held
    from puma_ray.metrics import as_run
    from puma_ray.runtime import init_ray
    from puma_ray.scorer import run_model, score_runs

    init_ray(RayConfig())
    valid, rows = load_interactions(f"{data}/valid", task)
    valid = valid.map_batches(mark_held, fn_kwargs={"fraction": holdout}, batch_format="pyarrow")
    spec = {name: {"uri": uri, "model": run_model(None, uri)} for name, uri in runs.items()}
    with console.Relay() as relay:
        scored = score_runs(spec, task, valid, rows, ScoringConfig(), relay.handle, "gate_policies: scoring")
    df = scored.map_batches(as_run, batch_format="pyarrow").to_pandas()
    ray.shutdown()
    return df


def per_user(df, train_rows):
    """Scored rows -> one row per user: SE sums and row counts per run and part (v: verdict, h: held out)."""
    import pandas as pd

    df = df.assign(se=(df["pred"] - df["label"]) ** 2, part=np.where(df["held"], "h", "v"))
    t = df.pivot_table(index="user_id", columns=["run", "part"], values="se", aggfunc=["sum", "count"], fill_value=0)
    out = pd.DataFrame(index=t.index)
    for run in df["run"].unique():
        for part in ("v", "h"):
            out[f"se_{run}_{part}"] = t["sum"][run][part] if (run, part) in t["sum"] else 0.0
    first = df["run"].iloc[0]  # every run scores the same rows
    for part in ("v", "h"):
        out[f"n_{part}"] = t["count"][first][part] if (first, part) in t["count"] else 0
    out["train_rows"] = train_rows.reindex(out.index).fillna(0).to_numpy()
    return out


def excess_score(u, ref: str, shrink: float) -> np.ndarray:
    """Per user: (SE_migrated - SE_reference) / n on the n verdict rows, x n / (n + ``shrink``)."""
    n = u["n_v"].to_numpy(np.float64)
    diff = (u["se_puma_v"] - u[f"se_{ref}_v"]).to_numpy(np.float64)
    return np.where(n > 0, diff / np.maximum(n, 1), 0.0) * n / (n + shrink)


def choose(order_score, eligible, cost, allowance):
    """Users taken in descending score (eligible, score > 0) while the cumulative cost fits -> mask."""
    idx = np.where(eligible & (order_score > 0))[0]
    idx = idx[np.argsort(-order_score[idx], kind="stable")]
    fits = np.cumsum(cost[idx]) <= allowance
    mask = np.zeros(len(order_score), bool)
    mask[idx[fits]] = True
    return mask


def held_rmse(u, mask) -> float:
    se = np.where(mask, u["se_retrained_h"], u["se_puma_h"]).sum()
    return float(np.sqrt(se / u["n_h"].sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the imported data (train/ and valid/)")
    ap.add_argument("--migrated", required=True, help="the migrate output (its prompts, head, summary.json)")
    ap.add_argument("--retrained", required=True, help="a `prompts train` run of EVERY user from the migrated prompts")
    ap.add_argument("--full-retrain", required=True)
    ap.add_argument("--source", required=True, help="the reference: the source run, under the source model")
    ap.add_argument("--task", default="rating", choices=["rating"])
    ap.add_argument("--holdout", type=float, default=0.5)
    ap.add_argument("--min-rows", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=0.05, help="the relative gate's max_regression")
    ap.add_argument("--shrink", type=float, default=3.0)
    ap.add_argument("--budgets", default="0.2,0.25,0.3,0.35,0.4")
    ap.add_argument("--rows", help="a Parquet file keeping the scored rows: read when it exists, else written")
    args = ap.parse_args()

    import os

    import pandas as pd

    from puma_ray import storage
    from puma_ray.data import user_hash
    from puma_ray.gate import error_of

    runs = {
        "puma": args.migrated,
        "retrained": args.retrained,
        "full_retrain": args.full_retrain,
        "source": args.source,
    }
    passes = {k: storage.read_json(f"{v}/summary.json")["lm_sample_passes"] for k, v in runs.items() if k != "source"}
    train = storage.read_table(f"{args.data}/train", columns=["user_id"]).to_pandas()
    train_rows = train["user_id"].astype(str).value_counts()
    if args.rows and os.path.exists(args.rows):
        df = pd.read_parquet(args.rows)
    else:
        df = scored_rows(runs, args.data, args.task, args.holdout)
        if args.rows:
            df.to_parquet(args.rows)
    df["user_id"] = df["user_id"].astype(str)
    u = per_user(df, train_rows)
    cost = u["train_rows"].to_numpy(np.float64) * passes["retrained"] / train_rows.sum()
    full = float(np.sqrt(u["se_full_retrain_h"].sum() / u["n_h"].sum()))
    err, ref = (error_of(u[f"se_{run}_v"], u["n_v"], "rmse") for run in ("puma", "source"))  # NaN without rows
    rel = np.nan_to_num(err / ref - 1, nan=-np.inf)
    decided = u["n_v"].to_numpy() >= args.min_rows
    absolute = np.nan_to_num(err - ref, nan=-np.inf)
    scores = {
        "relative": (rel, decided),
        "absolute": (absolute, u["n_v"].to_numpy() >= 1),
        "excess": (excess_score(u, "source", args.shrink), np.ones(len(u), bool)),
        "random": (
            user_hash(u.index).astype(np.float64) + 1,
            np.ones(len(u), bool),
        ),
        "oracle": (((u["se_puma_h"] - u["se_retrained_h"]) / np.maximum(cost, 1e-9)).to_numpy(), np.ones(len(u), bool)),
    }
    rows, doc = [], {"full_retrain_held": full, "passes": passes, "users": len(u), "held_rows": int(u["n_h"].sum())}
    gate = decided & (rel > args.threshold)  # the gate at its threshold, no budget
    doc["relative_gate_at_threshold"] = {
        "flagged": int(gate.sum()),
        "passes_share": round((passes["puma"] + cost[gate].sum()) / passes["full_retrain"], 4),
        "held_ratio": round(held_rmse(u, gate) / full, 4),
    }
    doc["puma_held_ratio"] = round(held_rmse(u, np.zeros(len(u), bool)) / full, 4)
    doc["all_retrained_held_ratio"] = round(held_rmse(u, np.ones(len(u), bool)) / full, 4)
    for b in [float(x) for x in args.budgets.split(",")]:
        allowance = b * passes["full_retrain"] - passes["puma"]
        row = {"budget": b}
        for name, (score, eligible) in scores.items():
            mask = choose(score, eligible, cost, allowance)
            row[name] = round(held_rmse(u, mask) / full, 4)
            row[f"{name}_users"] = int(mask.sum())
        rows.append(row)
    doc["by_budget"] = rows
    print(json.dumps(doc, indent=1))
    cols = ["budget", *[c for name in scores for c in (name, f"{name}_users")]]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---:|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
