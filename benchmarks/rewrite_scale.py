"""Bulk rewrite at scale: users/s and peak memory (driver AND Ray workers) at 100k, 1M, 10M users.

For each size: a random source store (d_in = 256, l = 1, streamed via ``schema.write_prompt_store``,
20k users per file like `data synth`) and a random adapter (256 -> 384, width h = 1024, depth 1) are
written, then ``puma_ray.rewrite.rewrite_store`` runs in a fresh Python process (its own local Ray),
while a sampler reads RSS/PSS of the driver and of every process under it (Ray's GCS, raylet and
workers) every 0.5 s, and the CPU seconds of that tree are counted. Time should grow linearly with
users; memory should stay flat. On a shared, busy machine compare users per CPU second, which does not
depend on the other load, beside users per wall second, which does.

    python benchmarks/rewrite_scale.py [--users 100000,1000000,10000000] [--work /tmp/bench/rewrite_scale]
        [--set actors=2 --set cpus_per_actor=1 ...] [--source 10000000=/path/to/store] [--keep]

``--set`` takes RewriteConfig fields (default: the config's defaults); ``--source N=URI`` reuses an
existing store of N users (e.g. `puma-ray data synth --prompt-width 256` output) instead of writing
one. Prints one JSON document, then a table. Data goes under --work and is deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _scale import (  # noqa: E402
    TreeMemory,
    child_args,
    du_mb,
    in_child,
    make_adapter,
    make_store,
    run_child,
    source_meta,
    table,
    target_meta,
)


def _rcfg(sets: list[str]):
    from puma_ray import config as C

    return C.build(C.RewriteConfig, C.parse_overrides(sets), source="--set")


def child(spec: dict) -> dict:
    if spec["op"] == "gen":
        return make_store(spec["uri"], spec["users"], spec["d_in"], spec["l"], seed=spec["seed"])
    from puma_ray.config import RayConfig
    from puma_ray.rewrite import rewrite_store
    from puma_ray.runtime import actor_pool_size, init_ray
    from puma_ray.schema import StoreMeta

    init_ray(RayConfig())
    rcfg = _rcfg(spec["sets"])
    meta = StoreMeta(**spec["target"])
    with TreeMemory() as mem:
        t0 = time.time()
        manifest = rewrite_store(spec["source"], spec["adapter"], meta, spec["out"], rcfg)
        wall = time.time() - t0
    return {
        "users": spec["users"],
        "wall_s": round(wall, 1),
        "users_per_s": round(spec["users"] / wall),
        "users_per_cpu_s": round(spec["users"] / mem.peak["tree_cpu_s"]),
        "rows_out": manifest["output"]["rows"],
        "files_out": len(manifest["output"]["files"]),
        "out_mb": du_mb(spec["out"]),
        "rewrite_config": rcfg.model_dump(),
        "rewrite_actors": actor_pool_size(rcfg, "rewrite"),
        **mem.peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", default="100000,1000000,10000000")
    ap.add_argument("--work", default="/tmp/bench/rewrite_scale")
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--d-out", type=int, default=384)
    ap.add_argument("--width", type=int, default=1024, help="adapter hidden width h")
    ap.add_argument("--prompt-length", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="RewriteConfig field")
    ap.add_argument("--source", action="append", default=[], metavar="N=URI", help="reuse an existing store of N users")
    ap.add_argument("--keep", action="store_true")
    child_args(ap)
    args = ap.parse_args()
    if run_child(args, child):
        return

    from puma_ray.schema import read_store_meta

    _rcfg(args.set)  # fail early on a bad --set
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    reuse = dict(s.split("=", 1) for s in args.source)
    sizes = [int(x) for x in args.users.split(",")]
    results = []
    for n in sizes:
        src = reuse.get(str(n))
        gen = None
        if src is None:
            src = f"{work}/source-{n}"
            gen = in_child(
                __file__,
                [
                    json.dumps(
                        {"op": "gen", "uri": src, "users": n, "d_in": args.d_in, "l": args.prompt_length, "seed": 0}
                    )
                ],
            )
            print(f"rewrite_scale: wrote a {n}-user source store in {gen['wall_s']} s", file=sys.stderr)
        smeta = read_store_meta(src) if str(n) in reuse else source_meta(args.d_in, args.prompt_length)
        tmeta = target_meta(args.d_out, smeta.prompt_length)
        adapter = make_adapter(f"{work}/adapter-{n}", smeta, tmeta, args.width)
        out = f"{work}/out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        r = in_child(
            __file__,
            [
                json.dumps(
                    {
                        "op": "run",
                        "users": n,
                        "source": src,
                        "adapter": adapter,
                        "out": out,
                        "target": tmeta.__dict__,
                        "sets": args.set,
                    }
                )
            ],
        )
        r["source_mb"] = du_mb(src)
        results.append(r)
        print(
            f"rewrite_scale: {n} users in {r['wall_s']} s ({r['users_per_s']}/s), "
            f"driver peak {r['driver_maxrss_mb']} MB, "
            f"workers peak {r['workers_rss_sum_mb']} MB RSS; {json.dumps(r)}",
            file=sys.stderr,
        )
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(f"{work}/adapter-{n}", ignore_errors=True)
            if gen is not None:
                shutil.rmtree(src, ignore_errors=True)
    base = results[0]
    for r in results:
        r["size_ratio"] = round(r["users"] / base["users"], 2)
        r["wall_ratio"] = round(r["wall_s"] / base["wall_s"], 2)
        r["throughput_vs_smallest"] = round(r["users_per_s"] / base["users_per_s"], 3)
        r["cpu_ratio"] = round(r["tree_cpu_s"] / base["tree_cpu_s"], 2)
        r["users_per_cpu_s_vs_smallest"] = round(r["users_per_cpu_s"] / base["users_per_cpu_s"], 3)
    doc = {
        "benchmark": "rewrite_scale",
        "d_in": args.d_in,
        "d_out": args.d_out,
        "adapter_width": args.width,
        "prompt_length": args.prompt_length,
        "machine": _machine(),
        "results": results,
    }
    print(json.dumps(doc, indent=1))
    print(
        table(
            results,
            [
                "users",
                "wall_s",
                "users_per_s",
                "throughput_vs_smallest",
                "tree_cpu_s",
                "users_per_cpu_s",
                "users_per_cpu_s_vs_smallest",
                "driver_maxrss_mb",
                "worker_rss_max_mb",
                "workers_rss_sum_mb",
                "workers_pss_sum_mb",
                "tree_pss_sum_mb",
                "workers_seen",
            ],
        )
    )
    if not args.keep and not os.listdir(work):
        os.rmdir(work)


def _machine() -> dict:
    import psutil

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    main()
