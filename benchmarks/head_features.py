"""Stage-1 quality of the paper's digit-logit head vs the optional hidden-state head, in one run.

Runs `puma-ray prompts train` twice on the quickstart data (same data, model, epochs, seed):
head.features=digits (5 digit logits -> MLP, the paper's) and digits_hidden (digit logits +
the LM's last hidden state -> MLP), evaluates both beside the global/user-mean baselines, and
prints RMSE ratios. Takes ~5 minutes on 2 cores.

    python benchmarks/head_features.py [--out /tmp/head_features] [--users 2000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os

from puma_ray import config as C
from puma_ray import storage
from puma_ray.datasets.synthetic import synthesize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/puma_head_features")
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from puma_ray.evaluate import evaluate
    from puma_ray.models import build_tiny
    from puma_ray.quickstart import DEFAULTS
    from puma_ray.report import format_table
    from puma_ray.stage1 import train_prompts

    out = os.path.abspath(args.out)
    data = f"{out}/data"
    synthesize(data, users=args.users, task="rating", seed=args.seed, progress=False)
    model = {"path": build_tiny(f"{out}/models", ["llama"], seed=args.seed)["llama"]}
    runs = {}
    for features in ("digits", "digits_hidden"):
        cfg = C.build(
            C.PromptsConfig,
            {
                "model": model,
                "data": {"train": f"{data}/train", "valid": f"{data}/valid"},
                "output": f"{out}/runs/{features}",
                "head": {"features": features},
                "train": {**DEFAULTS["train"], "epochs": args.epochs, "seed": args.seed},
                "run": {"name": f"head-{features}", "storage_path": f"{out}/ray"},
            },
        )
        train_prompts(cfg)
        runs[features] = cfg.output
    report = evaluate(
        C.build(
            C.EvaluateConfig,
            {
                "model": model,
                "data": {"train": f"{data}/train", "valid": f"{data}/valid"},
                "runs": runs,
                "output": f"{out}/report.json",
            },
        )
    )
    m = {k: v["rmse"] for k, v in report["methods"].items()}
    ratios = {
        "digits_hidden/digits": m["digits_hidden"] / m["digits"],
        "digits/user_mean": m["digits"] / m["user_mean"],
        "digits_hidden/user_mean": m["digits_hidden"] / m["user_mean"],
        "digits/global_mean": m["digits"] / m["global_mean"],
    }
    storage.write_json(f"{out}/ratios.json", ratios)
    print(json.dumps({"rmse": m, "ratios": ratios}, indent=1))
    print(format_table(report))
    print("\n" + "\n".join(f"{k}: {v:.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
