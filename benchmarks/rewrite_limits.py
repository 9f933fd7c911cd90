"""How close the bulk rewrite gets to this machine's limits, in ONE run (ratios, not absolutes).

On the same N source prompts (d_in 256 -> d_out 384, adapter width h = 1024, l = 1):
  (i)   I/O limit: a plain Ray Data Parquet read + write of the source rows (and, beside it, the
        same with a trivial map to an output-width prompt column: the bytes the rewrite writes);
  (ii)  compute limit: the adapter's in-process batched forward (torch, no Ray, no I/O) on the
        same rows' prompts, with all cores and with the threads the rewrite config gives it;
  (iii) the rewrite itself: ``puma_ray.rewrite.rewrite_store`` with the given RewriteConfig, and its
        publish (``rewrite.commit``: the staged files moved into place, the manifest written);
and a per-part profile of one actor's work on the same batches (Parquet decode, arrow -> numpy,
finite check, adapter, numpy -> arrow, Parquet encode with and without the sha256 tee), plus the
rewrite's uniqueness check (rows per user over the output, ``data.sum_by``) timed on its own.

    python benchmarks/rewrite_limits.py [--users 500000] [--set actors=2 --set cpus_per_actor=1]
        [--compute-rows 200000] [--work /tmp/bench/rewrite_limits]

Target: rewrite users/s >= 0.7 x min(I/O limit, compute limit). Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _scale import TreeMemory, make_adapter, make_store, source_meta, table, target_meta  # noqa: E402


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


CPU: dict[str, float] = {}  # phase -> CPU seconds of the whole process tree (driver + Ray)


def _phase(name: str, fn):
    """Run ``fn`` as a measured phase: -> (its result, wall s); CPU seconds go to CPU[name]."""
    with TreeMemory(interval=1.0) as mem:
        out, wall = _timed(fn)
    CPU[name] = mem.peak["tree_cpu_s"]
    return out, wall


def io_limit(src: str, out: str, out_meta=None) -> tuple[float, str]:
    """Plain Ray Data read + write of ``src``; with ``out_meta`` the rows are first mapped to zero
    prompts of the output width (what the rewrite writes). -> (wall s, ds.stats())."""
    import numpy as np

    from puma_ray import storage
    from puma_ray.schema import prompt_table

    shutil.rmtree(out, ignore_errors=True)
    ds = storage.ray_read_parquet(src)
    if out_meta is not None:

        def widen(b):
            return prompt_table(out_meta, b.column("user_id"), np.zeros((b.num_rows, out_meta.width), np.float32))

        ds = ds.map_batches(widen, batch_format="pyarrow")
    t0 = time.perf_counter()
    ds.write_parquet(out)
    wall = time.perf_counter() - t0
    stats = ds.stats()
    shutil.rmtree(out, ignore_errors=True)
    return wall, stats


def compute_limit(adapter_uri: str, prompts, l: int, d_in: int, batch: int, threads: int) -> float:
    """Adapter forward over ``prompts`` (N, l*d_in) in batches, ``threads`` torch threads -> wall s."""
    import torch

    from puma_ray.adapter import load_adapter

    torch.set_num_threads(threads)
    adapter, _ = load_adapter(adapter_uri)
    x = torch.from_numpy(prompts)
    with torch.no_grad():
        adapter(x[:batch].view(-1, l, d_in))  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            adapter(x[i : i + batch].view(-1, l, d_in))
        return time.perf_counter() - t0


def part_profile(src_file: str, adapter_uri: str, tmeta, batch: int, threads: int, batches: int) -> dict:
    """Seconds per part of one actor's work over ``batches`` batches of ``src_file`` (threads as the actor)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from puma_ray import storage
    from puma_ray.adapter import load_adapter
    from puma_ray.schema import prompt_store_schema, prompt_table

    torch.set_num_threads(threads)
    adapter, info = load_adapter(adapter_uri)
    l, d_in = info["prompt_length"], info["arch"]["d_in"]
    t = dict.fromkeys(
        [
            "parquet_decode",
            "arrow_to_numpy",
            "finite_check",
            "adapter",
            "numpy_to_arrow",
            "parquet_encode_sha256",
            "parquet_encode_plain",
        ],
        0.0,
    )
    rows = 0
    it = pq.ParquetFile(src_file).iter_batches(batch_size=batch, columns=["user_id", "prompt"])
    schema = prompt_store_schema(tmeta)
    tmp = "/tmp/bench/_profile_part.parquet"
    with torch.no_grad():
        for _ in range(batches):
            b, dt = _timed(lambda: next(it, None))
            if b is None:
                break
            t["parquet_decode"] += dt
            tab = pa.Table.from_batches([b])
            flat, dt = _timed(
                lambda: np.array(
                    tab.column("prompt").combine_chunks().flatten().to_numpy(zero_copy_only=False), dtype=np.float32
                )
            )
            t["arrow_to_numpy"] += dt
            x = torch.from_numpy(flat).view(tab.num_rows, l, d_in)
            _, dt = _timed(lambda: bool((~torch.isfinite(x).flatten(1).all(1)).any()))
            t["finite_check"] += dt
            y, dt = _timed(lambda: adapter(x).reshape(tab.num_rows, -1).numpy())
            t["adapter"] += dt
            out, dt = _timed(lambda: prompt_table(tmeta, tab.column("user_id"), y))
            t["numpy_to_arrow"] += dt

            def enc(digest):
                with storage.parquet_writer(tmp, schema, digest) as w:
                    w.write_table(out)

            _, dt = _timed(lambda: enc(hashlib.sha256()))
            t["parquet_encode_sha256"] += dt
            _, dt = _timed(lambda: enc(None))
            t["parquet_encode_plain"] += dt
            rows += tab.num_rows
    os.remove(tmp)
    total = sum(v for k, v in t.items() if k != "parquet_encode_plain")
    return {
        "rows": rows,
        "threads": threads,
        "seconds": {k: round(v, 3) for k, v in t.items()},
        "share_of_actor_time": {k: round(v / total, 3) for k, v in t.items() if k != "parquet_encode_plain"},
        "actor_users_per_s": round(rows / total),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=500_000)
    ap.add_argument("--work", default="/tmp/bench/rewrite_limits")
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--d-out", type=int, default=384)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="RewriteConfig field")
    ap.add_argument(
        "--compute-rows", type=int, default=200_000, help="rows of the compute-limit run (the first of the same store)"
    )
    ap.add_argument("--profile-batches", type=int, default=8)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    import numpy as np

    from puma_ray import config as C
    from puma_ray import rewrite as R
    from puma_ray import storage
    from puma_ray.runtime import actor_pool_size, init_ray

    rcfg = C.build(C.RewriteConfig, C.parse_overrides(args.set), source="--set")
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    n, cores = args.users, os.cpu_count()
    smeta, tmeta = source_meta(args.d_in), target_meta(args.d_out)
    src = f"{work}/source"
    gen = make_store(src, n, args.d_in)
    adapter = make_adapter(f"{work}/adapter", smeta, tmeta, args.width)
    print(f"rewrite_limits: {n} users, source {gen['files']} file(s) in {gen['wall_s']} s", file=sys.stderr)

    init_ray(C.RayConfig())
    rows = {}
    io_limit(storage.list_files(src, ".parquet")[0], f"{work}/warmup")  # start Ray's workers before anything is timed
    # (i) I/O limits.
    (wall, io_stats), _ = _phase("io_read_write", lambda: io_limit(src, f"{work}/io_plain"))
    rows["io_read_write"] = wall
    (wall, _), _ = _phase("io_read_map_write_out_width", lambda: io_limit(src, f"{work}/io_wide", tmeta))
    rows["io_read_map_write_out_width"] = wall
    # (ii) compute limits, same rows' prompts.
    m = min(n, args.compute_rows)
    part = storage.read_table(src, columns=["prompt"]).slice(0, m)
    prompts = np.array(part.column("prompt").combine_chunks().flatten().to_numpy(), dtype=np.float32).reshape(m, -1)
    del part
    rewrite_threads = min(cores, max(1, int(rcfg.cpus_per_actor)) * actor_pool_size(rcfg, "rewrite"))
    compute = {}
    for threads in sorted({cores, rewrite_threads, max(1, int(rcfg.cpus_per_actor))}):
        wall, _ = _phase(
            f"compute_{threads}_threads",
            lambda p=prompts, t=threads: compute_limit(adapter, p, 1, args.d_in, rcfg.batch_size, t),
        )
        compute[threads] = m / wall
    del prompts
    # (iii) the rewrite, then its uniqueness check alone.
    out = f"{work}/rewrite"

    def staged_rewrite() -> dict:  # what `puma-ray rewrite` does: staged units, then publish + manifest
        manifest = R.rewrite_store(src, adapter, tmeta, out, rcfg)
        R.commit(out, manifest)
        return manifest

    manifest, wall = _phase("rewrite", staged_rewrite)
    rows["rewrite"] = wall
    _, dup_s = _phase("uniqueness_check", lambda: R.duplicates(f"{out}/prompts"))
    profile = part_profile(
        storage.list_files(src, ".parquet")[0],
        adapter,
        tmeta,
        rcfg.batch_size,
        max(1, int(rcfg.cpus_per_actor)),
        args.profile_batches,
    )

    ups = {k: n / v for k, v in rows.items()}
    io_lim = ups["io_read_write"]
    comp_lim = compute[cores]
    limit = min(io_lim, comp_lim)
    doc = {
        "benchmark": "rewrite_limits",
        "users": n,
        "d_in": args.d_in,
        "d_out": args.d_out,
        "adapter_width": args.width,
        "cores": cores,
        "rewrite_config": rcfg.model_dump(),
        "rewrite_actors": actor_pool_size(rcfg, "rewrite"),
        "compute_rows": m,
        "wall_s": {k: round(v, 2) for k, v in rows.items()},
        "users_per_s": {
            **{k: round(v) for k, v in ups.items()},
            **{f"compute_{t}_threads": round(v) for t, v in compute.items()},
        },
        "ratios": {
            "rewrite / io_limit": round(ups["rewrite"] / io_lim, 3),
            "rewrite / io_limit_out_width": round(ups["rewrite"] / ups["io_read_map_write_out_width"], 3),
            "rewrite / compute_limit_all_cores": round(ups["rewrite"] / comp_lim, 3),
            f"rewrite / compute_limit_{rewrite_threads}_threads (the config's)": round(
                ups["rewrite"] / compute[rewrite_threads], 3
            ),
            "rewrite / min(limits)": round(ups["rewrite"] / limit, 3),
        },
        "limiting": "io" if io_lim < comp_lim else "compute",
        "cpu_s": {k: round(v, 1) for k, v in CPU.items()},
        "users_per_cpu_s": {
            k: round((m if k.startswith("compute") else n) / v)
            for k, v in CPU.items()
            if v > 0 and k != "uniqueness_check"
        },
        "uniqueness_check_s": round(dup_s, 2),
        "uniqueness_check_share_of_rewrite": round(dup_s / rows["rewrite"], 3),
        "manifest_files": len(manifest["output"]["files"]),
        # where the rewrite's wall time goes: until its first unit started (planning, actor start-up),
        # the busiest actor's units, and the rest (that actor's idle gaps, the last units' tail, publish)
        "rewrite_timeline_s": {
            "startup": round(manifest["startup_s"], 2),
            "busiest_actor_busy": round(manifest["loop_s"], 2),
            "rest": round(rows["rewrite"] - manifest["startup_s"] - manifest["loop_s"], 2),
        },
        "actor_profile": profile,
        "io_limit_ray_data_stats": io_stats,
    }
    upc = doc["users_per_cpu_s"]
    doc["ratios_per_cpu_s"] = {f"rewrite / {k}": round(upc["rewrite"] / v, 3) for k, v in upc.items() if k != "rewrite"}
    print(json.dumps(doc, indent=1))
    tab = [{"what": k, "wall_s": round(v, 1), "users_per_s": round(ups[k])} for k, v in rows.items()]
    tab += [
        {"what": f"compute ({t} thread{'s' * (t > 1)})", "wall_s": round(m / v, 1), "users_per_s": round(v)}
        for t, v in compute.items()
    ]
    print(table(tab, ["what", "wall_s", "users_per_s"]))
    print(
        table(
            [{"ratio": k, "value": v} for k, v in doc["ratios"].items()]
            + [{"ratio": "uniqueness check s / rewrite s", "value": doc["uniqueness_check_share_of_rewrite"]}],
            ["ratio", "value"],
        )
    )
    print(
        table(
            [{"ratio (users per CPU second)": k, "value": v} for k, v in doc["ratios_per_cpu_s"].items()],
            ["ratio (users per CPU second)", "value"],
        )
    )
    print(table([{"part": k, "share": v} for k, v in profile["share_of_actor_time"].items()], ["part", "share"]))
    print(table([{"rewrite": k, "s": v} for k, v in doc["rewrite_timeline_s"].items()], ["rewrite", "s"]))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
