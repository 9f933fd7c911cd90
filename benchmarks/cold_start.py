"""Users who arrive after a migration, measured on held-out users (one run).

About ``--new`` of the users (a stable hash of user_id) are removed before anything is trained:
stage 1 on the source model and a PUMA migration to the target see only the others. Then the new
users get target prompts in four ways, none of which retrains anyone else:

- ``random_init``: uniform prompts under the migrated head (`prompts train` with ``init_head`` =
  the migration, ``train.head_lr=0``, ``train.train_prompts=false``): the floor;
- ``centroid``: `prompts coldstart` (the migrated prompts' K-means centroid with the lowest loss on
  the user's interactions; no training);
- ``trained``: `prompts train` of only the new users on the migrated head (``head_lr=0``);
- ``centroid_trained``: the same, starting from the centroids (``init_prompts``);

beside ``full_retrain`` (stage 1 on the target for ALL users, new ones included: what a migration
without PUMA would do) and the user_mean / bias baselines. All are scored on the new users' valid
rows; the table gives RMSE, MAE and the cost per new user (LM sample-passes, wall seconds).
Models: the quickstart's tiny random-init LMs (Llama d=64 -> Qwen2 d=96).

    python benchmarks/cold_start.py [--data synthetic|movielens] [--users 1000] [--new 0.1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import pyarrow as pa

from puma_ray import config as C
from puma_ray import storage

sys.path.insert(0, os.path.dirname(__file__))
from _testbed import MODELS, add_options, test_bed  # noqa: E402 (a sibling module)


def split_users(data: str, fraction: float, out: str) -> tuple[dict, dict, int]:
    """``data``'s rows split into old users (out/old/{train,valid}) and about ``fraction`` new ones
    (out/new/...) by a stable hash of user_id -> (old splits, new splits, new user count)."""
    from puma_ray.data import hashed_fraction

    new_users = set()
    for split in ("train", "valid"):
        table = storage.read_table(os.path.join(data, split))
        is_new = hashed_fraction(table.column("user_id").to_numpy(zero_copy_only=False), fraction)
        new_users |= set(table.column("user_id").filter(pa.array(is_new)).to_pylist())
        for side, mask in (("old", ~is_new), ("new", is_new)):
            storage.delete_dir(os.path.join(out, side, split))
            storage.write_table(os.path.join(out, side, split, "part-0.parquet"), table.filter(pa.array(mask)))
    old = {s: os.path.join(out, "old", s) for s in ("train", "valid")}
    new = {s: os.path.join(out, "new", s) for s in ("train", "valid")}
    return old, new, len(new_users)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, "/tmp/bench/cold_start", data="synthetic")
    ap.add_argument("--new", type=float, default=0.1, help="fraction of users held out as new arrivals")
    ap.add_argument("--epochs", type=int, default=None, help="stage-1 epochs (default: the quickstart's)")
    ap.add_argument("--clusters", type=int, default=15)
    args = ap.parse_args()

    from puma_ray.coldstart import cold_start
    from puma_ray.console import say
    from puma_ray.evaluate import evaluate
    from puma_ray.pipeline import migrate_step
    from puma_ray.quickstart import DEFAULTS
    from puma_ray.stage1 import train_prompts

    t0 = time.time()
    bed = test_bed(args)
    data, source, target, out = bed.data, bed.source, bed.target, bed.out
    old, new, n_new = split_users(data, args.new, os.path.join(out, "data"))
    train = dict(DEFAULTS["train"], **({"epochs": args.epochs} if args.epochs else {}))
    ray_runs = os.path.join(out, "ray_runs")
    scaling = {"num_workers": args.workers}

    def stage1(name: str, model: str, splits: dict, **over) -> str:
        say(f"cold start: stage 1 '{name}'")
        base = {
            "model": {"path": model},
            "data": splits,
            "train": train,
            "scaling": scaling,
            "output": os.path.join(out, name),
            "run": {"name": f"cold-{name}", "storage_path": ray_runs},
        }
        train_prompts(C.build(C.PromptsConfig, C.deep_merge(base, over)))
        return os.path.join(out, name)

    stage1("source", source, old)
    m = DEFAULTS["migrate"]
    say("cold start: PUMA migration of the old users")
    migrate_step(
        C.build(
            C.MigrateConfig,
            {
                "model": {"path": target},
                "sources": [os.path.join(out, "source", "prompts")],
                "data": old,
                "output": os.path.join(out, "puma"),
                "select": m["select"],
                "adapter": m["adapter"],
                "train": m["train"],
                "scaling": scaling,
                "evaluate": False,
                "run": {"name": "cold-puma", "storage_path": ray_runs},
            },
        )
    )
    puma = os.path.join(out, "puma")
    all_users = {s: os.path.join(data, s) for s in ("train", "valid")}
    runs = {"full_retrain": stage1("full_retrain", target, all_users)}
    frozen_head = {"init_head": puma, "train": {"head_lr": 0}}
    runs["random_init"] = stage1(
        "random_init", target, new, **C.deep_merge(frozen_head, {"train": {"train_prompts": False, "epochs": 1}})
    )
    say("cold start: centroids")
    cold_start(
        C.build(
            C.ColdStartConfig,
            {
                "run": puma,
                "data": {"train": new["train"]},
                "output": os.path.join(out, "centroid"),
                "clusters": args.clusters,
            },
        )
    )
    runs["centroid"] = os.path.join(out, "centroid")
    runs["trained"] = stage1("trained", target, new, **frozen_head)
    init = {"init_prompts": os.path.join(out, "centroid", "prompts")}
    runs["centroid_trained"] = stage1("centroid_trained", target, new, **frozen_head, **init)

    report = evaluate(
        C.build(C.EvaluateConfig, {"task": "rating", "data": new, "runs": runs, "baselines": ["user_mean", "bias"]})
    )
    print(f"\nCold start on {args.data}: {n_new} new users held out of the migration ({MODELS})")
    print("| method | RMSE | MAE | LM sample-passes per new user | wall s per new user |\n|---|---:|---:|---:|---:|")
    for name, r in report["methods"].items():
        cost = r["lm_sample_passes"] / n_new, r["wall_s"] / n_new
        print(f"| {name} | {r['rmse']:.4f} | {r['mae']:.4f} | {cost[0]:,.1f} | {cost[1]:.3f} |")
    print("(full_retrain's cost is that of retraining everyone, per new user)")
    storage.write_json(os.path.join(out, "cold_start.json"), {"new_users": n_new, "report": report})
    print(f"\n{time.time() - t0:.0f} s; {out}/cold_start.json")


if __name__ == "__main__":
    main()
