"""Progressive group -> user prompts in stage 1 (the PROPER idea applied to soft prompts), one run.

1. Users are grouped by their interaction profile: a truncated SVD (scikit-learn) of the centred
   user x item rating matrix, then K-means into ``--groups`` groups.
2. Group prompts: stage 1 on the source model with every row's user_id replaced by its group's, so
   each group learns one prompt (and a head) from all its members' rows.
3. User prompts start from their group's prompt (``init_prompts``) and the group run's head
   (``init_head``) and train as usual: "progressive". Beside them, "plain" stage 1 from uniform
   prompts with the same epochs.
4. Both source stores are migrated to the target with PUMA (same selection seed and settings).

All four stores are scored on the valid rows, with the metric split into users with fewer
training interactions than the median ("sparse") and the rest. Models: the quickstart's tiny
random-init LMs (Llama d=64 -> Qwen2 d=96). The grouping lives here (the driver holds the rating
matrix: a benchmark-sized choice); stage 1's ``init_prompts`` / ``init_head`` are the product's.

    python benchmarks/progressive_prompts.py [--data movielens|synthetic] [--groups 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from puma_ray import config as C
from puma_ray import storage
from puma_ray.schema import read_prompt_store, write_prompt_store

sys.path.insert(0, os.path.dirname(__file__))
from _testbed import MODELS, add_options, test_bed  # noqa: E402 (a sibling module)


def user_groups(train: pa.Table, groups: int, seed: int) -> dict[str, int]:
    """user_id -> group: K-means on a 16-dim truncated SVD of the centred user x item ratings."""
    from scipy.sparse import csr_matrix
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD

    users, u = np.unique(train.column("user_id").to_numpy(zero_copy_only=False), return_inverse=True)
    _, i = np.unique(train.column("item_id").to_numpy(zero_copy_only=False), return_inverse=True)
    label = train.column("label").to_numpy().astype(np.float64)
    mean = np.bincount(u, label) / np.bincount(u)
    m = csr_matrix((label - mean[u], (u, i)))
    z = TruncatedSVD(n_components=min(16, min(m.shape) - 1), random_state=seed).fit_transform(m)
    g = KMeans(n_clusters=groups, n_init=3, random_state=seed).fit_predict(np.hstack([z, mean[:, None]]))
    return dict(zip(users.tolist(), g.tolist()))


def relabel(splits: dict, groups: dict[str, int], out: str) -> dict:
    """The rows of ``splits`` with user_id replaced by "group-<g>" -> new splits under ``out``."""
    new = {}
    for split, uri in splits.items():
        table = storage.read_table(uri)
        ids = [f"group-{groups[u]:03d}" for u in table.column("user_id").to_pylist()]
        table = table.set_column(table.schema.get_field_index("user_id"), "user_id", pa.array(ids, pa.string()))
        new[split] = os.path.join(out, split)
        storage.delete_dir(new[split])
        storage.write_table(os.path.join(new[split], "part-0.parquet"), table)
    return new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, "/tmp/bench/progressive")
    ap.add_argument("--groups", type=int, default=20)
    ap.add_argument("--group-epochs", type=int, default=2)
    args = ap.parse_args()

    from puma_ray.console import say
    from puma_ray.evaluate import evaluate
    from puma_ray.pipeline import migrate_step
    from puma_ray.quickstart import DEFAULTS
    from puma_ray.stage1 import train_prompts

    t0 = time.time()
    bed = test_bed(args)
    splits, source, target, out = bed.splits, bed.source, bed.target, bed.out
    ray_runs = os.path.join(out, "ray_runs")
    scaling = {"num_workers": args.workers}

    train = storage.read_table(splits["train"])
    groups = user_groups(train, args.groups, seed=0)
    counts = pc.value_counts(train.column("user_id")).flatten()
    n = dict(zip(counts[0].to_pylist(), counts[1].to_pylist()))
    median = float(np.median(list(n.values())))
    sparse = sorted(u for u, c in n.items() if c < median)
    sparse_uri = os.path.join(out, "sparse_users.parquet")
    storage.write_table(sparse_uri, pa.table({"user_id": pa.array(sparse, pa.string())}))
    say(f"progressive: {len(n)} users in {args.groups} groups; {len(sparse)} sparse (< {median:g} training rows)")

    def stage1(name: str, rows: dict, **over) -> str:
        say(f"progressive: stage 1 '{name}'")
        base = {
            "model": {"path": source},
            "data": rows,
            "train": DEFAULTS["train"],
            "scaling": scaling,
            "output": os.path.join(out, name),
            "run": {"name": f"prog-{name}", "storage_path": ray_runs},
        }
        train_prompts(C.build(C.PromptsConfig, C.deep_merge(base, over)))
        return os.path.join(out, name)

    group_run = stage1(
        "groups", relabel(splits, groups, os.path.join(out, "group_data")), train={"epochs": args.group_epochs}
    )
    meta, gids, gprompts = read_prompt_store(os.path.join(group_run, "prompts"))
    row = {g: k for k, g in enumerate(gids)}
    users = sorted(groups)
    init = os.path.join(out, "group_init", "prompts")
    write_prompt_store(init, meta, users, gprompts[[row[f"group-{groups[u]:03d}"] for u in users]])
    runs = {
        "plain": stage1("plain", splits),
        "progressive": stage1("progressive", splits, init_prompts=init, init_head=group_run),
    }
    m = DEFAULTS["migrate"]
    for name in ("plain", "progressive"):
        say(f"progressive: PUMA migration of the '{name}' prompts")
        cfg = C.build(
            C.MigrateConfig,
            {
                "model": {"path": target},
                "sources": [os.path.join(runs[name], "prompts")],
                "data": splits,
                "output": os.path.join(out, f"{name}_puma"),
                "select": m["select"],
                "adapter": m["adapter"],
                "train": m["train"],
                "scaling": scaling,
                "evaluate": False,
                "run": {"name": f"prog-{name}-puma", "storage_path": ray_runs},
            },
        )
        migrate_step(cfg)
        runs[f"{name}_puma"] = cfg.output
    report = evaluate(
        C.build(
            C.EvaluateConfig,
            {
                "task": "rating",
                "data": splits,
                "runs": runs,
                "subsets": {"sparse": sparse_uri},
                "baselines": ["user_mean", "bias"],
            },
        )
    )
    print(f"\nProgressive group -> user prompts on {args.data} ({args.groups} groups; {MODELS})")
    print("| method | RMSE all | RMSE sparse users | RMSE other users | LM sample-passes |\n|---|---:|---:|---:|---:|")
    for name, r in report["methods"].items():
        print(
            f"| {name} | {r['rmse']:.4f} | {r.get('rmse_in_sparse', float('nan')):.4f} | "
            f"{r.get('rmse_out_sparse', float('nan')):.4f} | {int(r['lm_sample_passes']):,} |"
        )
    print("(progressive's LM sample-passes exclude the group stage's; it is in the groups run's summary)")
    storage.write_json(os.path.join(out, "progressive.json"), {"sparse_users": len(sparse), "report": report})
    print(f"\n{time.time() - t0:.0f} s; {out}/progressive.json")


if __name__ == "__main__":
    main()
