"""The paper's selection study (Table 4, METHOD.md "Group-based user selection") on one test bed.

One stage-1 run on the source model, then one PUMA migration per (strategy, budget, seed): every
strategy at ``--budget`` (the paper's ratio: 2,000 of ~30k users, ~7%) x ``--seeds`` seeds, plus
``random`` and ``kmeans_variance`` at each of ``--sweep`` budgets. The seed sets both the
selection and the adapter's training, so the spread is the whole run-to-run noise. All migrated
stores are scored in ONE evaluation pass (the target LM loads once). Prints, per (strategy,
budget): mean and standard deviation of the migrated RMSE (rating task) over the seeds, the cost
(selected users, LM sample-passes, wall s), which differences to ``random`` at the same budget
exceed twice the larger of their standard deviations, and Welch's t-test p-value over the seeds;
writes ``study.json`` and ``study.png`` (``--report study.json`` prints and draws them again).

Test beds (``--data``): ``movielens`` (MovieLens-100k from the recbole wheel, as
benchmarks/real_quality.py) or ``synthetic`` (the quickstart's data, ``--users``); models: the
quickstart's tiny random-init LMs (Llama d=64 -> Qwen2 d=96).

    python benchmarks/selection_study.py --data movielens --seeds 3
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import get_args

import numpy as np

from puma_ray import config as C
from puma_ray import storage

sys.path.insert(0, os.path.dirname(__file__))
from _testbed import MODELS, add_options, test_bed  # noqa: E402 (a sibling module)

PAPER = "paper (Amazon, 2k of 30k users): kmeans_variance 0.9315, random 0.9419, random at 6k users 0.9320"


def _method(key: str) -> str:
    """An evaluation method name (letters, digits and _) for a cell key like ``random@0.07#s0``."""
    return re.sub(r"\W", "_", key)


def table(result: dict) -> str:
    """The study as a Markdown table: per (strategy, budget) the RMSE's mean and std over the seeds,
    the difference to ``random`` at the same budget, whether it exceeds twice the larger of the two
    stds, and Welch's t-test p-value (two-sided) over the seeds' RMSEs; then the baselines."""
    from scipy.stats import ttest_ind

    rows = result["rows"]
    random_at = {r["budget"]: r for r in rows if r["strategy"] == "random"}
    lines = [
        f"Selection study on {result['data']} ({result['seeds']} seeds; {MODELS})",
        "| strategy | budget | users | RMSE mean | RMSE std | vs random (same budget) | Welch p | LM sample-passes"
        " | wall s |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        ref = random_at.get(r["budget"])
        verdict, p = "", ""
        if ref is not None and r is not ref:
            diff = r["rmse_mean"] - ref["rmse_mean"]
            noise = 2 * max(r["rmse_std"], ref["rmse_std"])
            verdict = f"{diff:+.4f} ({'beyond' if abs(diff) > noise else 'within'} 2 std)"
            p = f"{ttest_ind(r['rmse'], ref['rmse'], equal_var=False).pvalue:.2f}"
        lines.append(
            f"| {r['strategy']} | {r['budget']:g} | {r['selected_users']:.0f} | {r['rmse_mean']:.4f} | "
            f"{r['rmse_std']:.4f} | {verdict} | {p} | {r['lm_sample_passes']:,.0f} | {r['wall_s']:.1f} |"
        )
    lines += [f"{name}: RMSE {rmse:.4f}" for name, rmse in result["baselines"].items()]
    lines.append(PAPER)
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """study.png: left, every strategy at the common budget (mean and std over seeds, random's
    mean +- 2 std shaded); right, migrated RMSE against the users selected, per swept strategy."""
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")

    rows = result["rows"]
    budget = result["budget"]
    at = sorted((r for r in rows if r["budget"] == budget), key=lambda r: r["rmse_mean"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110, gridspec_kw={"width_ratios": [1.2, 1]})
    ref = next(r for r in at if r["strategy"] == "random")
    left.axvspan(ref["rmse_mean"] - 2 * ref["rmse_std"], ref["rmse_mean"] + 2 * ref["rmse_std"], color="0.9")
    left.axvline(ref["rmse_mean"], color="0.6", linestyle="--", linewidth=1)
    y = np.arange(len(at))
    left.errorbar([r["rmse_mean"] for r in at], y, xerr=[r["rmse_std"] for r in at], fmt="o", capsize=3)
    for k, r in enumerate(at):
        left.plot(r["rmse"], [k] * len(r["rmse"]), "x", color="0.4", markersize=4)
    left.set_yticks(y, [r["strategy"] for r in at], fontsize=8)
    left.set_xlabel(f"migrated RMSE at {budget:g} of the users (o mean +- std, x seeds; shade: random +- 2 std)")
    left.tick_params(axis="x", labelsize=8)
    for name in ("random", "kmeans_variance"):
        mine = sorted((r for r in rows if r["strategy"] == name), key=lambda r: r["budget"])
        right.errorbar(
            [r["selected_users"] for r in mine],
            [r["rmse_mean"] for r in mine],
            yerr=[r["rmse_std"] for r in mine],
            marker="o",
            capsize=3,
            label=name,
        )
    right.set_xlabel("users selected for adapter training")
    right.set_ylabel("migrated RMSE (mean +- std over seeds)")
    right.legend(fontsize=8)
    fig.suptitle(f"Selection strategies on {result['data']} ({result['seeds']} seeds, {MODELS})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=0.07, help="every strategy at this fraction of the users")
    ap.add_argument("--sweep", type=float, nargs="*", default=[0.05, 0.10, 0.20], help="random/kmeans_variance")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--strategies", nargs="*", default=None, help="default: all of config.Strategy")
    ap.add_argument("--report", metavar="STUDY_JSON", help="only print the table and redraw study.png of a study.json")
    add_options(ap, "/tmp/bench/selection_study")
    args = ap.parse_args()
    if args.report:
        result = storage.read_json(args.report)
        print(table(result))
        plot(result, os.path.join(os.path.dirname(os.path.abspath(args.report)), "study.png"))
        return

    from puma_ray.console import say
    from puma_ray.evaluate import evaluate
    from puma_ray.pipeline import migrate_step
    from puma_ray.profile import profile_users
    from puma_ray.quickstart import DEFAULTS
    from puma_ray.stage1 import train_prompts

    strategies = args.strategies or list(get_args(C.Strategy))
    unknown = sorted(set(strategies) - set(get_args(C.Strategy)))
    if unknown:
        sys.exit(f"selection_study: unknown strategies {unknown}; choose from {list(get_args(C.Strategy))}")
    t0 = time.time()
    bed = test_bed(args)
    source, target, out, splits = bed.source, bed.target, bed.out, bed.splits
    common = {"task": "rating", "data": splits, "scaling": {"num_workers": args.workers}}
    ray_runs = os.path.join(out, "ray_runs")

    say(f"selection study: stage 1 on {os.path.basename(source)}")
    s1 = C.build(
        C.PromptsConfig,
        {
            **common,
            "model": {"path": source},
            "train": DEFAULTS["train"],
            "output": os.path.join(out, "source"),
            "run": {"name": "study-source", "storage_path": ray_runs},
        },
    )
    s1_summary = train_prompts(s1)
    profile = profile_users(splits["train"], "rating", os.path.join(out, "profile"))

    cells = [(name, args.budget) for name in strategies]
    cells += [(name, b) for b in args.sweep for name in ("random", "kmeans_variance") if b != args.budget]
    m = DEFAULTS["migrate"]
    runs, costs = {}, {}
    for i, (name, budget) in enumerate(cells):
        for seed in range(args.seeds):
            key = f"{name}@{budget:g}#s{seed}"
            say(f"selection study: migration {i * args.seeds + seed + 1} of {len(cells) * args.seeds}: {key}")
            cfg = C.build(
                C.MigrateConfig,
                {
                    **common,
                    "model": {"path": target},
                    "sources": [os.path.join(s1.output, "prompts")],
                    "output": os.path.join(out, "migrations", key.replace("@", "_").replace("#", "_")),
                    "select": {
                        "strategy": name,
                        "budget": budget,
                        "seed": seed,
                        # the paper's 50 of 2,000 per cluster, scaled to this budget
                        "min_per_cluster": max(1, round(budget * profile["users"] * 50 / 2000)),
                    },
                    "adapter": m["adapter"],
                    "train": {**m["train"], "seed": seed},
                    "evaluate": False,
                    "run": {"name": f"study-{i}-{seed}", "storage_path": ray_runs},
                },
            )
            summary = migrate_step(cfg, profile=profile)
            runs[_method(key)] = cfg.output
            costs[key] = {
                "selected_users": summary["selected_users"],
                "lm_sample_passes": summary["lm_sample_passes"],
                "wall_s": summary["wall_s"],
            }

    say(f"selection study: scoring {len(runs)} migrated stores in one pass")
    report = evaluate(
        C.build(
            C.EvaluateConfig,
            {"task": "rating", "data": splits, "runs": runs, "baselines": ["user_mean", "bias"]},
        )
    )
    rows = []
    for name, budget in cells:
        keys = [f"{name}@{budget:g}#s{s}" for s in range(args.seeds)]
        rmse = np.array([report["methods"][_method(k)]["rmse"] for k in keys])
        rows.append(
            {
                "strategy": name,
                "budget": budget,
                "rmse_mean": float(rmse.mean()),
                "rmse_std": float(rmse.std(ddof=1)) if len(rmse) > 1 else 0.0,
                "rmse": rmse.tolist(),
                **{c: float(np.mean([costs[k][c] for k in keys])) for c in ("selected_users", "lm_sample_passes")},
                "wall_s": float(np.mean([costs[k]["wall_s"] for k in keys])),
            }
        )

    result = {
        "data": args.data,
        "seeds": args.seeds,
        "budget": args.budget,
        "rows": rows,
        "baselines": {b: report["methods"][b]["rmse"] for b in ("user_mean", "bias")},
        "source_stage1_wall_s": s1_summary["wall_s"],
        "wall_s": time.time() - t0,
    }
    storage.write_json(os.path.join(out, "study.json"), result)
    print(table(result))
    plot(result, os.path.join(out, "study.png"))
    print(f"\n{time.time() - t0:.0f} s; {out}/study.json, {out}/study.png")


if __name__ == "__main__":
    main()
