"""`puma-ray tune` on the quickstart setting, in one run: best-of-search vs the default config, and
what ASHA's early stopping saves against running every trial to completion.

1. Data, tiny models and stage-1 source prompts from the quickstart (reused from --quickstart when
   that directory holds them, else made by `quickstart`).
2. default: the quickstart's PUMA migration (20% of users, kmeans_variance, width 256, depth 1,
   lr 3e-3, 2 epochs), 1 Train worker like every trial.
3. asha: a search of --trials trials (adapter width/depth, selection budget/strategy, lr) over
   --epochs epochs, ASHA (grace 1 epoch, halving).
4. fifo: the SAME trials (same seed, same values) with no early stopping: every trial runs all epochs.
5. The default and ASHA's best are both rewritten and evaluated on ALL users' held-out rows
   (the search metric, val_rmse, is measured on each trial's selected users only).
Prints JSON and a table.

    python benchmarks/tune_frontier.py [--out /tmp/puma_tune_bench] [--quickstart quickstart_out] \
        [--trials 8] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from puma_ray import config as C
from puma_ray import storage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/puma_tune_bench")
    ap.add_argument(
        "--quickstart", default="quickstart_out", help="a quickstart output to reuse (data/, models/, runs/source/)"
    )
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from puma_ray.pipeline import migrate
    from puma_ray.quickstart import DEFAULTS, quickstart
    from puma_ray.runtime import init_ray
    from puma_ray.tune import tune

    t_all = time.time()
    out = os.path.abspath(args.out)
    qs = os.path.abspath(args.quickstart)
    need = [f"{qs}/data/train", f"{qs}/data/valid", f"{qs}/models/{DEFAULTS['target']}", f"{qs}/runs/source/prompts"]
    if not all(os.path.exists(p) for p in need):
        qs = f"{out}/quickstart"
        quickstart(qs, seed=args.seed)
    init_ray(C.RayConfig())
    common = {
        "task": "rating",
        "model": {"path": f"{qs}/models/{DEFAULTS['target']}"},
        "sources": [f"{qs}/runs/source/prompts"],
        "data": {"train": f"{qs}/data/train", "valid": f"{qs}/data/valid"},
        "scaling": {"num_workers": 1},
    }
    m = DEFAULTS["migrate"]

    # the default config, trained, rewritten and evaluated on every user
    t0 = time.time()
    default = migrate(
        C.build(
            C.MigrateConfig,
            {
                **common,
                "select": {**m["select"], "seed": args.seed},
                "adapter": m["adapter"],
                "train": {**m["train"], "seed": args.seed},
                "output": f"{out}/default",
                "run": {"name": "bench-default", "storage_path": f"{out}/ray_runs"},
            },
        )
    )
    default_wall = time.time() - t0

    def search(scheduler: str) -> tuple[dict, float]:
        cfg = C.build(
            C.TuneConfig,
            {
                "base": {
                    **common,
                    "select": {"strategy": "kmeans_variance", "budget": 0.2, "seed": args.seed},
                    "adapter": m["adapter"],
                    "train": {**m["train"], "epochs": args.epochs, "seed": args.seed},
                    "run": {"storage_path": f"{out}/ray_runs"},
                },
                "search": {
                    "adapter.width": {"choice": [64, 128, 256, 512]},
                    "adapter.depth": {"choice": [0, 1, 2]},
                    "select.budget": {"choice": [0.05, 0.1, 0.2]},
                    "select.strategy": {"choice": ["random", "kmeans_variance"]},
                    "train.lr": {"loguniform": [3e-4, 3e-2]},
                },
                "scheduler": {"name": scheduler, "grace_period": 1, "reduction_factor": 2},
                "num_samples": args.trials,
                "seed": args.seed,
                "output": f"{out}/{scheduler}",
                "storage_path": f"{out}/tune_state",
                "name": f"bench-{scheduler}",
            },
        )
        t = time.time()
        r = tune(cfg)
        return r, time.time() - t

    asha, asha_wall = search("asha")
    fifo, fifo_wall = search("fifo")

    # ASHA's best: rewrite + evaluate every user, reusing its finished training run (no retraining)
    best_cfg = C.load(C.MigrateConfig, f"{out}/asha/best/migrate.yaml")
    t0 = time.time()
    best_full = migrate(best_cfg)
    best_reuse_wall = time.time() - t0

    def trials(r):
        return {json.dumps(t["values"], sort_keys=True): t for t in r["trials"]}

    a, f = trials(asha), trials(fifo)
    same_values = sorted(a) == sorted(f)
    # like for like: the trials that ran (did not error) in both searches
    both = [k for k in a if k in f and a[k]["status"] != "error" and f[k]["status"] != "error"]

    def total(d, field):
        return sum(d[k][field] or 0 for k in both)

    fifo_best = fifo["best"]
    d_sum, b_sum = default["summary"], best_full["summary"]
    d_ev, b_ev = default["evaluation"]["methods"]["puma"], best_full["evaluation"]["methods"]["puma"]
    result = {
        "setting": {
            "users": storage.read_json(f"{qs}/data/meta.json").get("users"),
            "trials": args.trials,
            "epochs": args.epochs,
            "scaling": "1 Train worker per trial",
            "cpus": os.cpu_count(),
        },
        "default": {
            "values": {
                "adapter.width": m["adapter"]["width"],
                "adapter.depth": m["adapter"]["depth"],
                "select.budget": m["select"]["budget"],
                "select.strategy": "kmeans_variance",
                "train.lr": m["train"]["lr"],
                "train.epochs": m["train"]["epochs"],
            },
            "val_rmse_selected_users": d_sum["final_metrics"]["val_rmse"],
            "rmse_all_users": d_ev["rmse"],
            "selected_users": d_sum["selected_users"],
            "lm_sample_passes": d_sum["lm_sample_passes"],
            "train_wall_s": d_sum["train_wall_s"],
            "wall_s": default_wall,
        },
        "best_of_search": {
            "trial": asha["best"]["trial_id"],
            "values": asha["best"]["values"],
            "val_rmse_selected_users": asha["best"]["val_rmse"],
            "rmse_all_users": b_ev["rmse"],
            "selected_users": asha["best"]["selected_users"],
            "lm_sample_passes": asha["best"]["lm_sample_passes"],
            "train_wall_s": asha["best"]["train_wall_s"],
            "rewrite_and_evaluate_wall_s (reusing its training)": best_reuse_wall,
            "retrained_epochs_on_reuse": (b_sum["lm_sample_passes"] - asha["best"]["lm_sample_passes"])
            / max(1, asha["best"]["lm_sample_passes"] / args.epochs),
        },
        "fifo_best": {
            "trial": fifo_best["trial_id"],
            "values": fifo_best["values"],
            "val_rmse_selected_users": fifo_best["val_rmse"],
        },
        "early_stopping": {
            "same_trial_values_in_both_searches": same_values,
            "asha": {**asha["early_stopping"], "search_wall_s": asha_wall},
            "fifo": {**fifo["early_stopping"], "search_wall_s": fifo_wall},
            "lm_sample_passes_asha / fifo": asha["early_stopping"]["lm_sample_passes"]
            / fifo["early_stopping"]["lm_sample_passes"],
            "epochs_asha / fifo": asha["early_stopping"]["epochs_run"] / fifo["early_stopping"]["epochs_run"],
            "search_wall_asha / fifo": asha_wall / fifo_wall,
            "asha_best_equals_fifo_best_values": asha["best"]["values"] == fifo_best["values"],
            "like_for_like": {
                "trials": len(both),
                "epochs": {"asha": total(a, "epochs_done"), "fifo": total(f, "epochs_done")},
                "lm_sample_passes": {"asha": total(a, "lm_sample_passes"), "fifo": total(f, "lm_sample_passes")},
                "trial_wall_s": {"asha": total(a, "wall_s"), "fifo": total(f, "wall_s")},
                "lm_sample_passes_asha / fifo": total(a, "lm_sample_passes") / max(1.0, total(f, "lm_sample_passes")),
                "trial_wall_asha / fifo": total(a, "wall_s") / max(1e-9, total(f, "wall_s")),
            },
        },
        "ratios": {
            "best rmse_all_users / default": b_ev["rmse"] / d_ev["rmse"],
            "best lm_sample_passes / default": asha["best"]["lm_sample_passes"] / d_sum["lm_sample_passes"],
            "asha search lm_sample_passes / default": asha["early_stopping"]["lm_sample_passes"]
            / d_sum["lm_sample_passes"],
        },
        "pareto_asha": [
            {k: t[k] for k in ("trial_id", "status", "val_rmse", "selected_users", "lm_sample_passes")}
            for t in storage.read_json(f"{out}/asha/pareto.json")["frontier"]
        ],
        "total_wall_s": time.time() - t_all,
    }
    print(json.dumps(result, indent=2, default=str))
    es = result["early_stopping"]
    print("\n| | RMSE all users | val RMSE (selected) | selected users | LM sample-passes | train wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in (
        ("default (quickstart PUMA)", result["default"]),
        ("best of ASHA search", result["best_of_search"]),
    ):
        print(
            f"| {name} | {r['rmse_all_users']:.4f} | {r['val_rmse_selected_users']:.4f} | {r['selected_users']} | "
            f"{r['lm_sample_passes']:,.0f} | {r['train_wall_s']:.1f} |"
        )
    print("\n| search | trials stopped | epochs run | LM sample-passes | wall s |")
    print("|---|---:|---:|---:|---:|")
    for name in ("asha", "fifo"):
        s = es[name]
        print(
            f"| {name} | {s['stopped']}/{s['trials']} | {s['epochs_run']}/{s['epochs_if_all_completed']} "
            f"| {s['lm_sample_passes']:,.0f} | {s['search_wall_s']:.0f} |"
        )
    lf = es["like_for_like"]
    print(
        f"\nASHA / FIFO: LM sample-passes {es['lm_sample_passes_asha / fifo']:.3f}, "
        f"search wall {es['search_wall_asha / fifo']:.3f}; "
        f"over the {lf['trials']} trials that ran in both: LM sample-passes {lf['lm_sample_passes_asha / fifo']:.3f}, "
        f"summed trial wall {lf['trial_wall_asha / fifo']:.3f}; "
        f"same best trial values: {es['asha_best_equals_fifo_best_values']}"
    )


if __name__ == "__main__":
    main()
