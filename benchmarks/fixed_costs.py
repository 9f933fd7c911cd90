"""Fixed costs of small runs: what Ray Train and Ray Data cost before any work, beside every
quickstart stage's loop, in one run (one process, one local Ray).

Issue 13 item 6 asks each quickstart stage to spend <= 25% of its wall outside its training or
scoring loop, i.e. at most loop / 3 seconds outside. This measures, on this machine:

- the floors: ``TorchTrainer.fit()`` of a train function that does nothing (with the quickstart's
  workers, and with 1), and a Ray Data pass that does nothing (one item through a one-actor pool,
  the shape of the rewrite's and the scoring's passes), each run twice, the faster kept: the least
  a stage on Ray Train or Ray Data costs, whatever puma-ray does inside it;
- the quickstart story on its default (``puma_ray.quickstart``), each stage's wall and loop seconds
  from results.json's ``timings``;

and prints per stage: its loop, the 25% allowance (loop / 3), what it spent outside, the floor of
the framework it runs on (a lower bound: a training stage also writes shards, profile and select
run Ray Data passes before stage 2), floor / allowance (above 1: no implementation on that
framework meets 25% on this machine at this size), and the users at which the measured outside
would be 25% if the loop grows with the users and the fixed cost does not.

    python benchmarks/fixed_costs.py [--out DIR] [--users 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from puma_ray import config as C

# the framework each quickstart stage runs its loop on (its floor is a lower bound of its fixed cost)
FRAMEWORK = {
    "source": "ray_train",
    "full_retrain": "ray_train",
    "random_init": "ray_train",
    "puma_train": "ray_train",
    "puma_rewrite": "ray_data",
    "evaluate": "ray_data",
}


def _nothing(config: dict) -> None:
    """A train function that does nothing."""


class _Identity:
    """A map_batches callable that does nothing."""

    def __call__(self, batch):
        return batch


def train_floor(workers: int, storage_path: str) -> float:
    """Seconds of ``TorchTrainer.fit()`` with ``workers`` workers and a train function that does nothing."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    TorchTrainer(
        _nothing,
        scaling_config=ray.train.ScalingConfig(num_workers=workers),
        run_config=ray.train.RunConfig(name=f"floor-{workers}-{time.time_ns()}", storage_path=storage_path),
    ).fit()
    return time.perf_counter() - t0


def data_floor() -> float:
    """Seconds of a Ray Data pass of one item through a one-actor pool that does nothing."""
    import ray.data

    from puma_ray.runtime import actor_pool

    t0 = time.perf_counter()
    pool = actor_pool(C.RewriteConfig(), "rewrite", limit=1)
    ray.data.from_items([{"unit": 0}]).map_batches(_Identity, batch_format="pyarrow", compute=pool).take_all()
    return time.perf_counter() - t0


def floors(workers: int, storage_path: str) -> dict[str, float]:
    """Each floor measured twice (the first pays this session's cold imports), the faster kept."""
    out = {
        "ray_train": min(train_floor(workers, storage_path) for _ in range(2)),
        "ray_train_1_worker": min(train_floor(1, storage_path) for _ in range(2)),
        "ray_data": min(data_floor() for _ in range(2)),
    }
    for k, v in out.items():
        print(f"fixed_costs: floor {k}: {v:.1f} s", flush=True)
    return out


def table(timings: dict, floor: dict, users: int) -> list[dict]:
    rows = []
    for stage, t in timings.items():
        outside = t["wall_s"] - t["loop_s"]
        allowance = t["loop_s"] / 3
        f = floor[FRAMEWORK[stage]]
        rows.append(
            {
                "stage": stage,
                "wall_s": t["wall_s"],
                "loop_s": t["loop_s"],
                "outside_s": round(outside, 1),
                "outside_share": round(outside / t["wall_s"], 3),
                "allowance_s": round(allowance, 2),
                "floor": FRAMEWORK[stage],
                "floor_s": round(f, 1),
                "floor_over_allowance": round(f / max(allowance, 1e-9), 2),
                "users_at_25pct": int(users * 3 * outside / max(t["loop_s"], 1e-9)),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="the quickstart's directory (default: a temporary one, removed)")
    ap.add_argument("--users", type=int, default=None, help="quickstart users (default: the quickstart's)")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers (the quickstart's default: 2)")
    args = ap.parse_args()

    from puma_ray.quickstart import quickstart
    from puma_ray.runtime import init_ray

    out = args.out or tempfile.mkdtemp(prefix="fixed-costs-")
    load_start = os.getloadavg()
    init_ray(C.RayConfig())
    floor = floors(args.workers, os.path.join(out, "floor_runs"))
    results = quickstart(out, users=args.users, num_workers=args.workers)
    rows = table(results["timings"], floor, results["users"])
    print(
        "| stage | wall s | loop s | outside s | outside | allowance s (loop/3) | floor | floor s | floor / allowance |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['stage']} | {r['wall_s']:.1f} | {r['loop_s']:.1f} | {r['outside_s']:.1f} | {r['outside_share']:.0%} "
            f"| {r['allowance_s']:.2f} | {r['floor']} | {r['floor_s']:.1f} | {r['floor_over_allowance']:.2f} |"
        )
    for r in rows:
        print(f"fixed_costs: {r['stage']}: outside would be 25% at ~{r['users_at_25pct']:,} users")
    report = {"floors_s": floor, "stages": rows, "load_at_start": load_start, "load_at_end": os.getloadavg()}
    print(json.dumps(report, indent=2))
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
