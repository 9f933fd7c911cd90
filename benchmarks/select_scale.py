"""User selection at scale: wall time and peak memory of ``select_users`` on 1M users, and what
fitting K-means on a sample costs in quality.

1. Data: ``puma-ray data synth`` with a prompt store (d = 256; prompts are a fixed random image
   of each user's latent bias/noise/taste, so they have real cluster structure), then the user
   profile with ``puma_ray.profile.profile_users`` (both timed, in their own processes).
2. ``puma_ray.select.select_users`` (kmeans_variance, the config's defaults unless --set) in a
   fresh process, with RSS/PSS of the driver and every Ray process under it sampled every 0.5 s.
3. Sample-fit quality, on N = --full-fit-users users of the same store (a size where a K-means fit
   on ALL points still runs): inertia over all N points of a model fit on a random sample (the
   same fraction kmeans_sample / users that step 2 used, and kmeans_sample itself when < N),
   relative to the model fit on all N. k, n_init and seed from the SelectConfig.

    python benchmarks/select_scale.py [--users 1000000] [--full-fit-users 200000] [--set kmeans_sample=100000]
        [--data DIR (an existing synth output with prompts/)] [--work /tmp/bench/select_scale] [--keep]

Prints JSON, then tables. Data goes under --work and is deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _scale import TreeMemory, child_args, in_child, run_child, table  # noqa: E402


def _cfg(sets: list[str]):
    from puma_ray import config as C

    return C.build(C.SelectConfig, C.parse_overrides(sets), source="--set")


def child(spec: dict) -> dict:
    from puma_ray.config import RayConfig
    from puma_ray.runtime import init_ray

    op = spec["op"]
    if op == "synth":
        from puma_ray.datasets.synthetic import synthesize

        with TreeMemory() as mem:
            t0 = time.time()
            meta = synthesize(spec["out"], spec["users"], seed=spec["seed"], prompt_width=spec["d"], progress=False)
            wall = time.time() - t0
        return {
            "wall_s": round(wall, 1),
            "rows": meta["train_rows"] + meta["valid_rows"],
            "driver_maxrss_mb": mem.peak["driver_maxrss_mb"],
        }
    init_ray(RayConfig())
    if op == "profile":
        from puma_ray.profile import profile_users

        with TreeMemory() as mem:
            t0 = time.time()
            out = profile_users(spec["train"], "rating", spec["out"])
            wall = time.time() - t0
        return {"wall_s": round(wall, 1), "users": out["users"], "rows": out["rows"], **mem.peak}
    if op == "select":
        from puma_ray.select import select_users

        cfg = _cfg(spec["sets"])
        with TreeMemory() as mem:
            t0 = time.time()
            summary = select_users(cfg, spec["store"], spec["profile"], spec["out"])
            wall = time.time() - t0
        return {
            "wall_s": round(wall, 1),
            "candidates": summary["candidates"],
            "selected": summary["selected"],
            "config": cfg.model_dump(),
            **mem.peak,
        }
    raise ValueError(op)


def inertia_ratio(store: str, n_full: int, users: int, sets: list[str]) -> list[dict]:
    """Inertia on all n_full points of sample-fit K-means models relative to a fit on all of them."""
    import numpy as np
    import pyarrow.parquet as pq
    from sklearn.cluster import KMeans

    from puma_ray import storage

    cfg = _cfg(sets)
    parts, have = [], 0
    for f in storage.list_files(store, ".parquet"):  # the first n_full users, one part file at a time
        t = pq.read_table(f, columns=["prompt"])
        parts.append(
            np.asarray(t.column("prompt").combine_chunks().flatten().to_numpy(), np.float32).reshape(t.num_rows, -1)
        )
        have += t.num_rows
        if have >= n_full:
            break
    x = np.concatenate(parts)[:n_full]
    del parts

    def fit(rows):
        t0 = time.time()
        km = KMeans(n_clusters=min(cfg.clusters, len(rows)), n_init=cfg.kmeans_n_init, random_state=cfg.seed).fit(
            x[rows]
        )
        return km, time.time() - t0

    full, full_s = fit(np.arange(len(x)))
    full_inertia = -full.score(x)
    out = [{"fit_on": len(x), "fraction": 1.0, "inertia_vs_full_fit": 1.0, "fit_s": round(full_s, 1)}]
    sizes = sorted(
        {max(cfg.clusters, round(len(x) * min(1.0, cfg.kmeans_sample / users)))}
        | ({cfg.kmeans_sample} if cfg.kmeans_sample < len(x) else set())
    )
    rng = np.random.default_rng(cfg.seed)
    for s in sizes:
        km, s_fit = fit(np.sort(rng.choice(len(x), size=s, replace=False)))
        out.append(
            {
                "fit_on": s,
                "fraction": round(s / len(x), 3),
                "inertia_vs_full_fit": round(-km.score(x) / full_inertia, 4),
                "fit_s": round(s_fit, 1),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=256, help="source prompt width")
    ap.add_argument("--full-fit-users", type=int, default=200_000)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="SelectConfig field")
    ap.add_argument("--data", help="an existing `data synth --prompt-width` output (skips step 1's synth)")
    ap.add_argument("--work", default="/tmp/bench/select_scale")
    ap.add_argument("--keep", action="store_true")
    child_args(ap)
    args = ap.parse_args()
    if run_child(args, child):
        return

    _cfg(args.set)  # fail early on a bad --set
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    data = args.data or f"{work}/data"
    steps = {}
    if not args.data:
        steps["synth"] = in_child(
            __file__, [json.dumps({"op": "synth", "out": data, "users": args.users, "seed": 0, "d": args.d})]
        )
        print(f"select_scale: synth {steps['synth']}", file=sys.stderr)
    profile = f"{work}/profile"
    steps["profile"] = in_child(__file__, [json.dumps({"op": "profile", "train": f"{data}/train", "out": profile})])
    print(f"select_scale: profile {steps['profile']['wall_s']} s", file=sys.stderr)
    steps["select"] = in_child(
        __file__,
        [
            json.dumps(
                {
                    "op": "select",
                    "store": f"{data}/prompts",
                    "profile": profile,
                    "out": f"{work}/selection",
                    "sets": args.set,
                }
            )
        ],
    )
    print(f"select_scale: select {steps['select']['wall_s']} s", file=sys.stderr)
    with open(f"{work}/selection/selection.json") as f:
        selection = json.load(f)
    kmeans = inertia_ratio(f"{data}/prompts", args.full_fit_users, steps["select"]["candidates"], args.set)
    doc = {
        "benchmark": "select_scale",
        "users": args.users,
        "d": args.d,
        "steps": steps,
        "selection": {
            k: selection.get(k)
            for k in ("budget", "candidates", "cluster_sizes", "cluster_selected", "topped_up", "variance")
        },
        "kmeans_sample_quality": kmeans,
    }
    print(json.dumps(doc, indent=1))
    rows = [
        {
            "step": k,
            "wall_s": v["wall_s"],
            "driver_maxrss_mb": v.get("driver_maxrss_mb"),
            "workers_rss_sum_mb": v.get("workers_rss_sum_mb", ""),
            "workers_pss_sum_mb": v.get("workers_pss_sum_mb", ""),
            "tree_pss_sum_mb": v.get("tree_pss_sum_mb", ""),
        }
        for k, v in steps.items()
    ]
    print(
        table(
            rows, ["step", "wall_s", "driver_maxrss_mb", "workers_rss_sum_mb", "workers_pss_sum_mb", "tree_pss_sum_mb"]
        )
    )
    print(table(kmeans, ["fit_on", "fraction", "inertia_vs_full_fit", "fit_s"]))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
