"""Means and distinct keys by ``data.sum_by`` (block partial sums merged in one task) vs Ray Data's groupby,
and ``data.column_mean`` vs ``Dataset.mean``, in one run (one local Ray, the same datasets).

What evaluation, the baselines and the rewrite's uniqueness check compute, on the inputs they
compute it on:

- the mean label per user and the mean label of interactions read from Parquet
  (``data.load_interactions``: the ``user_mean`` and bias baselines, the profile, evaluation's mu);
- the distinct (method, user) pairs of scored rows materialized in ``--blocks`` blocks (the users
  every metric reports; the quickstart's 109k scored rows came out of scoring in ~30 blocks).

Sizes: ``small`` (``--small-rows`` interactions of ``--small-users`` users, the quickstart's
evaluation) and ``large`` (``--large-rows`` of ``--large-users``). Each pair runs ``--repeats``
times in alternating order (Ray's way first, then puma-ray's, then the reverse, ...): the first
run of a session pays the hash shuffle's cold start. Prints every run's seconds, the ratio
puma-ray / Ray of the medians and of the first runs, and checks both give the same results.

    python benchmarks/group_sums.py [--small-rows 78000] [--large-rows 3000000] [--blocks 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa

from puma_ray import config as C
from puma_ray import storage


def interactions(out: str, rows: int, users: int, seed: int) -> str:
    """``rows`` synthetic ratings of ``users`` users (rows grouped by user, as the importers and the
    synthesizer write them) in one Parquet file under ``out``."""
    rng = np.random.default_rng(seed)
    user = np.sort(rng.integers(0, users, rows))
    table = pa.table(
        {
            "user_id": pa.array([f"u{i:07d}" for i in user]),
            "item_id": pa.array([f"i{i:05d}" for i in rng.integers(0, 5000, rows)]),
            "label": pa.array(rng.integers(1, 6, rows).astype(np.float64)),
            "timestamp": pa.array(np.arange(rows, dtype=np.int64)),
            "item_text": pa.array(["a title"] * rows),
        }
    )
    storage.write_table(os.path.join(out, "part-00000.parquet"), table)
    return out


def scored(uri: str, methods: int, blocks: int):
    """The interactions scored by ``methods`` methods (run, user_id, label, pred), in ``blocks`` blocks."""
    from puma_ray.data import load_interactions

    def tag(batch: pa.Table, run: str) -> pa.Table:
        n = batch.num_rows
        cols = {"run": pa.array([run] * n), "user_id": batch["user_id"], "label": batch["label"]}
        return pa.table({**cols, "pred": pa.array(np.full(n, 3.0))})

    ds, _ = load_interactions(uri, "rating")
    parts = [ds.map_batches(tag, fn_kwargs={"run": f"m{i}"}, batch_format="pyarrow") for i in range(methods)]
    return parts[0].union(*parts[1:]).repartition(blocks).materialize()


def ray_user_mean(ds, rows: int) -> dict:
    from puma_ray.data import shuffle_partitions

    means = ds.groupby("user_id", num_partitions=shuffle_partitions(rows)).mean("label").to_pandas()
    return dict(zip(means["user_id"], means["mean(label)"]))


def puma_user_mean(ds, rows: int) -> dict:
    from puma_ray.data import mean_by

    means = mean_by(ds, ["user_id"], "label").to_pandas()
    return dict(zip(means["user_id"], means["label"]))


def ray_pairs(ds, rows: int) -> int:
    from puma_ray.data import shuffle_partitions

    return ds.groupby(["run", "user_id"], num_partitions=shuffle_partitions(rows)).count().count()


def puma_pairs(ds, rows: int) -> int:
    from puma_ray.data import distinct

    return distinct(ds, ["run", "user_id"])


def ray_mean(ds, rows: int) -> float:
    return float(ds.mean("label"))


def puma_mean(ds, rows: int) -> float:
    from puma_ray.data import column_mean

    return column_mean(ds, "label")


PAIRS = {  # what -> (input, Ray's way, puma-ray's)
    "mean label per user": ("interactions", ray_user_mean, puma_user_mean),
    "mean label": ("interactions", ray_mean, puma_mean),
    "distinct (method, user) pairs": ("scored", ray_pairs, puma_pairs),
}


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-9 for k in a)
    return abs(a - b) < 1e-9


def timed(fn, ds, rows):
    t0 = time.perf_counter()
    out = fn(ds, rows)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-rows", type=int, default=78_000)
    ap.add_argument("--small-users", type=int, default=2_000)
    ap.add_argument("--large-rows", type=int, default=3_000_000)
    ap.add_argument("--large-users", type=int, default=100_000)
    ap.add_argument(
        "--methods", type=int, default=7, help="methods scored (evaluate's quickstart: 4 runs + 3 baselines)"
    )
    ap.add_argument("--blocks", type=int, default=32, help="blocks of the scored rows")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from puma_ray.data import load_interactions
    from puma_ray.runtime import init_ray

    load_start = os.getloadavg()
    init_ray(C.RayConfig())
    work = tempfile.mkdtemp(prefix="group-sums-")
    sizes = {"small": (args.small_rows, args.small_users), "large": (args.large_rows, args.large_users)}
    report = []
    for size, (rows, users) in sizes.items():
        uri = interactions(os.path.join(work, size), rows, users, seed=len(report))
        inputs = {"interactions": (lambda: load_interactions(uri, "rating")[0], rows)}
        pairs = scored(uri, args.methods, args.blocks)
        inputs["scored"] = (lambda: pairs, rows * args.methods)
        for what, (source, ray_fn, puma_fn) in PAIRS.items():
            make, n = inputs[source]
            runs = {"ray": [], "puma": []}
            outs = {}
            for i in range(args.repeats):
                for who in ("ray", "puma") if i % 2 == 0 else ("puma", "ray"):
                    seconds, outs[who] = timed(ray_fn if who == "ray" else puma_fn, make(), n)
                    runs[who].append(seconds)
            row = {
                "data": f"{size}: {rows:,} interactions of {users:,} users",
                "what": what,
                "ray_s": [round(s, 2) for s in runs["ray"]],
                "puma_s": [round(s, 2) for s in runs["puma"]],
                "ratio_median": round(float(np.median(runs["puma"]) / np.median(runs["ray"])), 3),
                "ratio_first": round(runs["puma"][0] / runs["ray"][0], 3),
                "same_result": same(outs["ray"], outs["puma"]),
            }
            report.append(row)
            print(json.dumps(row), flush=True)
    print("| data | what | Ray Data s (runs) | puma-ray s (runs) | ratio of medians | ratio of first runs | same |")
    print("|---|---|---|---|---:|---:|---|")
    for r in report:
        print(
            f"| {r['data']} | {r['what']} | {r['ray_s']} | {r['puma_s']} | {r['ratio_median']} | {r['ratio_first']} "
            f"| {r['same_result']} |"
        )
    print(json.dumps({"load_at_start": load_start, "load_at_end": os.getloadavg()}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
