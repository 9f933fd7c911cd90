"""The user profile (per-user count, label mean and variance) against a single-process pyarrow
group_by over the same rows, in one run: rows per CPU-second of each, and their ratio (target >= 0.5).

- ``pyarrow``: this process reads the interactions' user_id and label columns (pyarrow.dataset) and
  runs one ``Table.group_by(...).aggregate(count, mean, variance)``: the single-core reference.
- ``puma-ray``: ``profile.profile_users`` on a local Ray: per-block partial aggregates (n, sum, sum of
  squares) by Ray Data map_batches (one task per core on a local Ray), merged in one task (or a Ray
  Data groupby when the partials exceed a hash partition), written as the profile. Run twice in the
  same session: ``cold`` (the session's first Ray Data execution: Ray Data starts its own actors and
  its workers import their modules) and ``warm`` (the same call again).

CPU seconds are user + system of this process and every process under it (a local Ray's workers
and its own daemons: raylet, GCS, dashboard), so the two are compared on the work done, not on how
busy the machine was. The data: ``--data`` (an interactions directory) or ``puma-ray data synth
--users N`` written to ``--work`` first.

    python benchmarks/profile_speed.py [--users 1000000] [--data DIR] [--work /tmp/bench/profile]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import pyarrow.dataset as pads
from _scale import TreeMemory

from puma_ray.config import RayConfig
from puma_ray.datasets.synthetic import synthesize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--data", default=None, help="an interactions directory (default: synthesize --users)")
    ap.add_argument("--work", default="/tmp/bench/profile")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    from puma_ray.profile import profile_users
    from puma_ray.runtime import init_ray

    os.makedirs(args.work, exist_ok=True)
    data = args.data
    if data is None:
        data = os.path.join(args.work, "data", "train")
        if not os.path.exists(data):
            synthesize(os.path.join(args.work, "data"), users=args.users, task="rating", seed=0)
    rows = pads.dataset(data, format="parquet").count_rows()
    print(f"profile_speed: {rows:,} interactions in {data}", flush=True)

    t0, c0 = time.perf_counter(), time.process_time()
    table = pads.dataset(data, format="parquet").to_table(columns=["user_id", "label"])
    stats = table.group_by("user_id").aggregate([("label", "count"), ("label", "mean"), ("label", "variance")])
    single = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "users": stats.num_rows}
    del table, stats
    print(f"profile_speed: pyarrow group_by {single}", flush=True)

    init_ray(RayConfig())
    out = os.path.join(args.work, "profile")
    runs = {}
    for run in ("cold", "warm"):  # cold: the session's first Ray Data execution (its actors start); warm: again
        shutil.rmtree(out, ignore_errors=True)
        with TreeMemory(memory=False) as tree:  # CPU only: the memory sampler's own cost is not the profile's
            t0 = time.perf_counter()
            done = profile_users(data, "rating", out)
            ray_wall = time.perf_counter() - t0
        runs[run] = {"wall_s": ray_wall, "cpu_s": tree.peak["tree_cpu_s"], "users": done["users"]}
        print(f"profile_speed: puma-ray profile_users ({run}) {runs[run]}", flush=True)
    result = {"rows": rows, "pyarrow_rows_per_cpu_s": round(rows / single["cpu_s"]), "pyarrow": single}
    for run, distributed in runs.items():
        result[run] = {
            "puma_ray_rows_per_cpu_s": round(rows / distributed["cpu_s"]),
            "ratio_puma_ray_over_pyarrow": round(single["cpu_s"] / distributed["cpu_s"], 3),
            "wall_ratio_puma_ray_over_pyarrow": round(single["wall_s"] / distributed["wall_s"], 3),
            "puma_ray": distributed,
            "same_users": single["users"] == distributed["users"],
        }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
