"""Training rows/s of stage 1 and stage 2 per template, on a real LM at full depth and cut, in one run.

For each model (SmolLM2-135M at full depth, and its first ``--layers`` layers) and each template
(``rating_v1``: the user's slot first, the paper's; ``rating_item_first``: the item before the slot),
on the same MovieLens-100k users (a hashed subset of about ``--users``):

- stage 1: ``stage1.train_prompts`` (per-user prompts + head) on the model;
- stage 2: ``stage2.train_adapter`` (adapter + head) through the same model as the target, from a
  store of random source prompts (d = 576) of the same users;

each inside its own Ray Train loop (2 workers x 1 thread, DeepSpeed, gloo), ``--epochs`` epochs. From
the per-epoch reports: rows/s of the training steps of the first epoch (the prefix cache filling)
and of the last one (warm), the share of rows whose prefix came from the cache ("-" for the paper's
template: only static text precedes its slot, reused for every row without the cache), and the largest
worker's cache size. Prints a table and the item-first / paper ratios of the last epoch's rows/s
(target: >= 5 at full depth on 2 cores).

    python benchmarks/template_throughput.py [--users 40] [--epochs 2] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import pyarrow.compute as pc
from _testbed import epoch_log

from puma_ray import config as C
from puma_ray import storage
from puma_ray.schema import write_prompt_store

TEMPLATES = ("rating_v1", "rating_item_first")
# what each epoch's report keeps (_testbed.epoch_log)
REPORTED = ("epoch", "wall_s", "lm_sample_passes", "prefix_hit_rate", "prefix_cache_mb")


def rates(path: str) -> dict:
    """rows/s of the first and the last epoch's training steps, with the last epoch's cache figures."""
    reports = [{"wall_s": 0.0, "lm_sample_passes": 0.0}] + [json.loads(x) for x in open(path)]
    per = [
        (b["lm_sample_passes"] - a["lm_sample_passes"]) / (b["wall_s"] - a["wall_s"])
        for a, b in zip(reports, reports[1:])
    ]
    last = reports[-1]
    return {
        "first_rows_s": round(per[0], 1),
        "last_rows_s": round(per[-1], 1),
        "hit_rate": last["prefix_hit_rate"],
        "cache_mb": round(last["prefix_cache_mb"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4, help="the cut model's layers; 0: the full depth only")
    ap.add_argument("--batch", type=int, default=64, help="rows per step and worker")
    ap.add_argument("--work", default="/tmp/bench/template_throughput")
    ap.add_argument("--cache", default=os.path.expanduser(os.environ.get("PUMA_MODEL_CACHE", C.MODEL_CACHE)))
    args = ap.parse_args()

    from puma_ray.datasets.packaged import movielens_100k, user_subset
    from puma_ray.identity import store_meta
    from puma_ray.models import packaged_import
    from puma_ray.runtime import init_ray
    from puma_ray.sources import join_sources
    from puma_ray.stage1 import train_prompts
    from puma_ray.stage2 import train_adapter

    t0 = time.time()
    load0 = os.getloadavg()
    data = user_subset(movielens_100k(args.cache), args.users, os.path.join(args.work, "data"))
    train_uri = os.path.join(data, "train")
    users = pc.unique(storage.read_table(train_uri, columns=["user_id"]).column("user_id"))
    rows = storage.parquet_rows(train_uri)
    init_ray(C.RayConfig())
    root = tempfile.mkdtemp(prefix="template-throughput-", dir=args.work)
    beds = {"full": packaged_import("smollm2-135m", args.cache)}
    if args.layers:
        beds[f"{args.layers} layers"] = packaged_import("smollm2-135m", args.cache, args.layers)
    common = {
        "task": "rating",
        "data": {"train": train_uri, "valid": None},
        # min_steps 0: both stages step in micro-batches of --batch rows (a rate per batch size)
        "train": {"epochs": args.epochs, "batch_size": args.batch, "lr": 3e-3, "prompt_lr": 3e-2, "min_steps": 0},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "torch_threads": 1},
    }
    print(f"template_throughput: {len(users)} users, {rows:,} rows, {args.epochs} epochs, load {load0[0]:.1f}")
    out = {"users": len(users), "rows": rows, "epochs": args.epochs, "load_at_start": load0, "runs": {}}
    for bed, model in beds.items():
        for template in TEMPLATES:
            key = f"{bed} {template}"
            work = os.path.join(root, key.replace(" ", "-"))
            log1, log2 = os.path.join(work, "s1.jsonl"), os.path.join(work, "s2.jsonl")
            run = {"storage_path": os.path.join(work, "ray")}
            cfg = C.build(
                C.PromptsConfig,
                {
                    **common,
                    "model": {"path": model},
                    "template": template,
                    "output": f"{work}/s1",
                    "run": {**run, "name": "s1"},
                },
            )
            print(f"template_throughput: {key}: stage 1 ...", flush=True)
            train_prompts(cfg, callbacks=(epoch_log(log1, REPORTED),))
            meta = store_meta(model, "rating", template, 1, "prompts")
            rng = np.random.default_rng(0)
            write_prompt_store(f"{work}/src", meta, users.to_pylist(), rng.uniform(-0.1, 0.1, (len(users), meta.width)))
            src = join_sources([f"{work}/src"], f"{work}/joined")
            mcfg = C.build(
                C.MigrateConfig,
                {
                    **common,
                    "model": {"path": model},
                    "template": template,
                    "sources": [src.uri],
                    "output": f"{work}/s2",
                    "adapter": {"width": 256, "probe": "none"},  # throughput only: no readout to fit
                    "run": {**run, "name": "s2"},
                    "prompt_length": 1,
                },
            )
            print(f"template_throughput: {key}: stage 2 ...", flush=True)
            train_adapter(mcfg, src, meta.hidden_size, users, len(users), callbacks=(epoch_log(log2, REPORTED),))
            out["runs"][key] = {"stage1": rates(log1), "stage2": rates(log2)}
            print(f"template_throughput: {key}: {json.dumps(out['runs'][key])}", flush=True)
    out["load_at_end"] = os.getloadavg()
    print("\n| model | template | stage | rows/s epoch 1 | rows/s last epoch | prefixes cached | cache MB |")
    print("|---|---|---|---:|---:|---:|---:|")
    for key, r in out["runs"].items():
        bed, template = key.rsplit(" ", 1)
        for stage in ("stage1", "stage2"):
            x = r[stage]
            print(
                f"| SmolLM2-135M {bed} | {template} | {stage[-1]} | {x['first_rows_s']:.1f} | {x['last_rows_s']:.1f} "
                f"| {'-' if x['hit_rate'] != x['hit_rate'] else format(x['hit_rate'], '.1%')} | {x['cache_mb']:.0f} |"
            )
    print("\n| model | stage | item-first / paper rows/s (last epoch) |\n|---|---|---:|")
    out["ratios"] = {}
    for bed in beds:
        for stage in ("stage1", "stage2"):
            ratio = (
                out["runs"][f"{bed} rating_item_first"][stage]["last_rows_s"]
                / out["runs"][f"{bed} rating_v1"][stage]["last_rows_s"]
            )
            out["ratios"][f"{bed} {stage}"] = ratio
            print(f"| SmolLM2-135M {bed} | {stage[-1]} | {ratio:.2f} |")
    out["wall_s"] = time.time() - t0
    storage.write_json(os.path.join(args.work, "template_throughput.json"), out)
    print(
        f"\n{out['wall_s']:.0f} s (load {load0[0]:.1f} -> {out['load_at_end'][0]:.1f}); "
        f"{args.work}/template_throughput.json"
    )
    storage.delete_dir(root)


if __name__ == "__main__":
    main()
