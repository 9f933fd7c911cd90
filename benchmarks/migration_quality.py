"""PUMA quality and cost on the quickstart default, with a shuffled-prompt control, in one run.

1. `puma-ray quickstart` (synthetic data, tiny Llama d=64 -> Qwen2 d=96): source, full_retrain,
   random_init, puma (adapter trained on 20% of users).
2. Control: the same migration from a copy of the source store whose prompts are shuffled across
   users. If per-user information moves through the adapter, the control must come out clearly
   worse than PUMA; if PUMA only learned a population average, the two would tie.
Prints JSON and a table: RMSE ratios to full retraining, cost ratios (LM sample-passes, wall),
and PUMA's RMSE on the users inside its training subset vs the users it never saw.

    python benchmarks/migration_quality.py [--out /tmp/puma_bench] [--users 2000] [--task rating]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from puma_ray import config as C
from puma_ray import storage
from puma_ray.schema import StoreMeta, read_prompt_store, write_prompt_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/puma_bench")
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from puma_ray.pipeline import migrate
    from puma_ray.quickstart import DEFAULTS, quickstart

    out = os.path.abspath(args.out)
    qs = quickstart(out, users=args.users, seed=args.seed)

    # control: same migration, prompts shuffled across users
    meta, ids, prompts = read_prompt_store(f"{out}/runs/source/prompts")
    perm = np.random.default_rng(args.seed + 1).permutation(len(ids))
    write_prompt_store(
        f"{out}/runs/source_shuffled/prompts",
        StoreMeta(**{**meta.__dict__, "stage": "shuffled_control"}),
        ids,
        prompts[perm],
    )
    m = DEFAULTS["migrate"]
    control = migrate(
        C.build(
            C.MigrateConfig,
            {
                "model": {"path": f"{out}/models/{DEFAULTS['target']}"},
                "sources": [f"{out}/runs/source_shuffled/prompts"],
                "data": {"train": f"{out}/data/train", "valid": f"{out}/data/valid"},
                "output": f"{out}/runs/puma_shuffled",
                "select": {**m["select"], "seed": args.seed},
                "adapter": m["adapter"],
                "train": {**m["train"], "seed": args.seed},
                "run": {"name": "bench-puma-shuffled", "storage_path": f"{out}/ray_runs"},
            },
        )
    )["evaluation"]["methods"]["puma"]

    r = qs["methods"]
    full, puma = r["full_retrain"], r["puma"]
    sel = storage.read_json(f"{out}/runs/puma/selection/selection.json")
    result = {
        "rmse": {k: v["rmse"] for k, v in r.items()} | {"puma_shuffled_control": control["rmse"]},
        "puma_rmse_by_users": {
            "in_adapter_subset": qs["puma_by_users"]["rmse_in_adapter_users"],
            "never_seen": qs["puma_by_users"]["rmse_out_adapter_users"],
        },
        "ratios": {
            "puma_rmse / full_retrain_rmse": puma["rmse"] / full["rmse"],
            "puma_unseen_rmse / full_retrain_rmse": qs["puma_by_users"]["rmse_out_adapter_users"] / full["rmse"],
            "puma_rmse / random_init_rmse": puma["rmse"] / r["random_init"]["rmse"],
            "shuffled_control_rmse / puma_rmse": control["rmse"] / puma["rmse"],
            "shuffled_control_rmse / global_mean_rmse": control["rmse"] / r["global_mean"]["rmse"],
            "puma_passes / full_retrain_passes": puma["lm_sample_passes"] / full["lm_sample_passes"],
            "puma_wall / full_retrain_wall": puma["wall_s"] / full["wall_s"],
        },
        "adapter_users": f"{sel['selected']} of {sel['candidates']} ({sel['selected'] / sel['candidates']:.0%})",
    }
    storage.write_json(f"{out}/migration_quality.json", result)
    print(json.dumps(result, indent=1))
    print("\n| method | RMSE | LM sample-passes | wall s |\n|---|---:|---:|---:|")
    for k, v in r.items():
        print(f"| {k} | {v['rmse']:.4f} | {int(v['lm_sample_passes']):,} | {v['wall_s']:.1f} |")
    print(
        f"| puma_shuffled_control | {control['rmse']:.4f} | {int(control['lm_sample_passes']):,} "
        f"| {control['wall_s']:.1f} |"
    )
    print("\n" + "\n".join(f"{k}: {v:.3f}" for k, v in result["ratios"].items()))


if __name__ == "__main__":
    main()
