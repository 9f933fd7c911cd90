"""`puma-ray <stage>`: parse arguments, call one stage function, report. Nothing else lives here."""

from __future__ import annotations

import argparse
import sys

from puma_ray.errors import PumaError

OVERRIDES_HELP = "dotted overrides applied on top of the config file, e.g. train.epochs=3 model.dtype=bfloat16"


def _config_cmd(sub, name: str, help: str, doc: str):
    p = sub.add_parser(name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (path or s3:// URI); see configs/ for examples")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="puma-ray",
        description="Migrate per-user soft prompts between LLMs (PUMA) on a Ray cluster.\n"
        "Every input/output is a storage URI: a path, file://... or s3://bucket/prefix.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="<command>")

    data = sub.add_parser("data", help="generate data").add_subparsers(dest="sub", required=True, metavar="<sub>")
    s = data.add_parser("synth", help="write a synthetic interaction set (streamed)",
                        description="Synthetic users/items with Zipf popularity, per-user bias and noise, and a taste x item "
                        "signal visible in item_text words. Writes OUT/train, OUT/valid (per-user time split), OUT/users, OUT/meta.json; "
                        "with --prompt-width also OUT/prompts (a source prompt store).")
    s.add_argument("--out", required=True, help="output URI")
    s.add_argument("--users", type=int, required=True, help="number of users")
    s.add_argument("--task", choices=["rating", "ctr"], default="rating")
    s.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    s.add_argument("--items", type=int, default=None, help="item count (default max(500, users/2))")
    s.add_argument("--chunk-users", type=int, default=20000, help="users generated and written per file")
    s.add_argument("--prompt-width", type=int, default=0, metavar="D",
                   help="also write OUT/prompts, a source prompt store of every user with hidden size D (default 0: none)")
    s.add_argument("--prompt-length", type=int, default=1, metavar="L", help="prompt positions per user (default 1)")
    s.add_argument("--prompt-model", default=None, metavar="NAME_OR_DIR",
                   help="model the store is for: a model directory (its fingerprint; D must be its hidden size) or a "
                   "name (default synthetic-d<D>)")

    models = sub.add_parser("models", help="build models").add_subparsers(dest="sub", required=True, metavar="<sub>")
    m = models.add_parser("tiny", help="save tiny random-init causal LMs + tokenizer",
                          description="Saves OUT/<family> (save_pretrained) for each family; load with from_pretrained(path).")
    m.add_argument("--out", required=True, help="local directory")
    m.add_argument("--families", default="llama,qwen2,gemma3,phi3,stablelm", help="comma-separated families")
    m.add_argument("--seed", type=int, default=0)

    prompts = sub.add_parser("prompts", help="stage 1: per-user soft prompts").add_subparsers(dest="sub", required=True, metavar="<sub>")
    _config_cmd(prompts, "train", "train one soft prompt per user through a frozen LM",
                "Ray Train (TorchTrainer) + DeepSpeed; writes OUTPUT/prompts (store), head.safetensors/json, summary.json.\n"
                "Run it on the target model for the 'full retraining' baseline.")
    _config_cmd(sub, "evaluate", "score prompt stores and baselines on held-out interactions",
                "Prints a table (RMSE/MAE or AUC/uAUC, cost) and writes JSON to `output`.")

    _config_cmd(sub, "migrate", "PUMA: select users, train the adapter through the frozen target, rewrite every prompt, evaluate",
                "profile -> select -> train (Ray Train + DeepSpeed) -> rewrite (Ray Data) -> evaluate.\n"
                "Several `sources` = aggregated [A;B] -> target; `chain` = A -> B -> ... -> target.\n"
                "Writes OUTPUT/{profile,selection,adapter,prompts}/, manifest.json, head.*, summary.json, evaluation.json.")
    _config_cmd(sub, "rewrite", "apply a trained adapter to every prompt of the source store(s)",
                "Ray Data map_batches over ALL source prompts -> OUTPUT/prompts (target store); OUTPUT/manifest.json is written last.")

    _config_cmd(sub, "tune", "Ray Tune over the adapter's training: early stopping, cost per trial, quality-vs-cost frontier",
                "One migration without the rewrite per trial (base config + the trial's `search` values); ASHA stops\n"
                "weak trials early; a rerun with the same name resumes an interrupted search.\n"
                "Writes OUTPUT/trials/<id>/, results.json, pareto.json, pareto.md, frontier.png and best/ (adapter/ for `rewrite`).")

    q = sub.add_parser("quickstart", help="the whole story on tiny local models, from nothing",
                       description="synth data -> tiny LM -> stage 1 -> evaluate; writes OUT/results.json.")
    q.add_argument("--out", default="quickstart_out", help="output directory (default ./quickstart_out)")
    q.add_argument("--task", choices=["rating", "ctr"], default="rating")
    q.add_argument("--users", type=int, default=None, help="number of synthetic users (default 2000)")
    q.add_argument("--seed", type=int, default=None)
    q.add_argument("--epochs", type=int, default=None, help="stage-1 epochs (default 3)")
    return ap


def run(args: argparse.Namespace) -> None:
    from puma_ray import config as C

    if args.cmd == "data":
        from puma_ray.datasets.synthetic import synthesize

        synthesize(args.out, users=args.users, task=args.task, seed=args.seed, items=args.items, chunk_users=args.chunk_users,
                   prompt_width=args.prompt_width, prompt_length=args.prompt_length, prompt_model=args.prompt_model)
    elif args.cmd == "models":
        from puma_ray.models import build_tiny

        build_tiny(args.out, [f.strip() for f in args.families.split(",") if f.strip()], seed=args.seed)
    elif args.cmd == "prompts":
        from puma_ray.train import train_prompts

        train_prompts(C.load(C.PromptsConfig, args.config, args.overrides))
    elif args.cmd == "evaluate":
        from puma_ray.evaluate import evaluate

        evaluate(C.load(C.EvaluateConfig, args.config, args.overrides))
    elif args.cmd == "migrate":
        from puma_ray.pipeline import migrate

        migrate(C.load(C.MigrateConfig, args.config, args.overrides))
    elif args.cmd == "rewrite":
        from puma_ray.rewrite import rewrite

        rewrite(C.load(C.RewriteJobConfig, args.config, args.overrides))
    elif args.cmd == "tune":
        from puma_ray.tune import tune

        tune(C.load(C.TuneConfig, args.config, args.overrides))
    elif args.cmd == "quickstart":
        from puma_ray.quickstart import quickstart

        quickstart(args.out, task=args.task, users=args.users, seed=args.seed, epochs=args.epochs)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except PumaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
