"""Evaluation metrics of every method in one set of passes vs one method at a time, in one run.

Synthetic scored rows (run, user_id, label, pred) of ``--methods`` methods, ``--rows`` each, over
``--users`` users, a 20% user subset flagged, materialized in Ray Data on a local Ray. Then, in
alternating order, twice each:

- ``together``: ``metrics.report_metrics`` on all the rows (what evaluate does: one error-sum pass,
  one (method, user) groupby for every method);
- ``one_at_a_time``: the same function on each method's rows filtered out of the whole set (each
  method its own passes and groupby, the shape evaluate had before).

Prints seconds of each, their ratio and checks both give the same metrics.

    python benchmarks/metrics_passes.py [--methods 7] [--rows 300000] [--users 10000]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from puma_ray import config as C


def scored(methods: int, rows: int, users: int):
    """``methods`` x ``rows`` synthetic scored rows (run, user_id, label, pred) of ``users`` users,
    materialized in 64 blocks."""
    import ray.data

    def block(batch: dict) -> pa.Table:
        rng = np.random.default_rng(int(batch["id"][0]))
        n = len(batch["id"])
        names = np.array([f"m{i}" for i in range(methods)])
        return pa.table(
            {
                "run": names[rng.integers(0, methods, n)],
                "user_id": [f"u{u:08d}" for u in rng.integers(0, users, n)],
                "label": rng.integers(1, 6, n).astype(np.float32),
                "pred": rng.random(n) * 5,
            }
        )

    return ray.data.range(methods * rows, override_num_blocks=64).map_batches(block, batch_format="numpy").materialize()


def only(batch: pa.Table, run: str) -> pa.Table:
    """map_batches: the rows of method ``run``."""
    return batch.filter(pc.equal(batch.column("run"), run))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", type=int, default=7)
    ap.add_argument("--rows", type=int, default=300_000, help="scored rows per method")
    ap.add_argument("--users", type=int, default=10_000)
    args = ap.parse_args()

    from puma_ray.metrics import report_metrics
    from puma_ray.runtime import init_ray

    load_start = os.getloadavg()
    init_ray(C.RayConfig())
    ds = scored(args.methods, args.rows, args.users)
    subsets = {"g": pa.array([f"u{u:08d}" for u in range(0, args.users, 5)])}
    names = [f"m{i}" for i in range(args.methods)]

    def together() -> dict:
        return report_metrics("rating", ds, subsets)

    def one_at_a_time() -> dict:
        rows = {n: ds.map_batches(only, fn_kwargs={"run": n}, batch_format="pyarrow") for n in names}
        return {n: report_metrics("rating", r, subsets)[n] for n, r in rows.items()}

    seconds = {"together": [], "one_at_a_time": []}
    results = {}
    for f in (one_at_a_time, together, one_at_a_time, together):
        t0 = time.perf_counter()
        results[f.__name__] = f()
        seconds[f.__name__].append(time.perf_counter() - t0)
        print(f"metrics_passes: {f.__name__}: {seconds[f.__name__][-1]:.2f} s", flush=True)
    a, b = results["together"], results["one_at_a_time"]
    assert a.keys() == b.keys() and all(abs(a[n][k] - b[n][k]) < 1e-9 for n in a for k in a[n]), "metrics differ"
    t, o = min(seconds["together"]), min(seconds["one_at_a_time"])
    print(
        f"metrics_passes: {args.methods} methods x {args.rows:,} rows, {args.users:,} users: together {t:.2f} s, "
        f"one at a time {o:.2f} s, ratio {t / o:.3f} (faster of two each; same metrics); "
        f"load {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
