"""`puma-ray quickstart`: the whole story from nothing on the embedded default.

synthetic interactions -> two tiny LMs of different families and widths (source Llama d=64,
target Qwen2 d=96) -> stage 1 on the source ("source"), on the target ("full_retrain") and a
head-only control on the target ("random_init") -> PUMA migration source -> target on 20% of the
users ("puma") -> one evaluation beside the global/user-mean baselines.
Writes DIR/results.json: {"task", "methods": {name: {rmse, mae | auc, uauc, lm_sample_passes, wall_s}},
"puma_by_users", "timings": {stage: {wall_s, loop_s}; puma_train also profile_s, select_s, fit_s}}.
"""

from __future__ import annotations

import os
import time

from puma_ray import config as C
from puma_ray import storage
from puma_ray.console import say
from puma_ray.datasets.packaged import movielens_100k, user_subset
from puma_ray.datasets.synthetic import synthesize
from puma_ray.errors import PumaError
from puma_ray.models import build_tiny, packaged_import
from puma_ray.pipeline import migrate as run_migration
from puma_ray.runtime import init_ray
from puma_ray.stage1 import train_prompts

DEFAULTS = {
    "users": 2000,
    "seed": 0,
    "source": "llama",
    "target": "qwen2",
    # Tuned on the quickstart data (2 CPU cores): prompts need a far higher lr than the paper's
    # 5e-4 because each prompt sees only its own ~32 training rows per epoch; validation RMSE is
    # best around epoch 3 (prompts overfit after that).
    "train": {"epochs": 3, "batch_size": 128, "lr": 3e-3, "prompt_lr": 3e-2, "schedule": "cosine"},
    # PUMA: 20% of the users, a 256-wide adapter (the paper's 4096 is for d = 2048..3072).
    "migrate": {
        "select": {"budget": 0.2},
        "adapter": {"width": 256, "depth": 1},
        "train": {"epochs": 2, "batch_size": 128, "lr": 3e-3, "schedule": "cosine"},
    },
}


# `--models real`: SmolLM2-135M -> Gemma-3-270M (real pretrained LMs, full depth, imported once into
# the model cache) on a hashed subset of MovieLens-100k users (from the recbole wheel), with the
# item-first template: on 2 CPU cores a row costs the few tokens after the user's slot. 70 users keep
# the story within ~15 minutes on 2 cores (150 users took 29 minutes, 80 users 16.7, 2026-12-04); at
# this size the table shows the pipeline on real models, not PUMA's quality (benchmarks/RESULTS.md).
REAL = {
    "users": 70,
    "source": "smollm2-135m",
    "target": "gemma3-270m",
    "template": "rating_item_first",
    "train": {"epochs": 2, "batch_size": 128, "lr": 3e-3, "prompt_lr": 3e-2, "schedule": "cosine"},
    "migrate": {"select": {"budget": 0.25}},
}


def quickstart(
    out: str,
    task: str = "rating",
    users: int | None = None,
    seed: int | None = None,
    epochs: int | None = None,
    num_workers: int = 2,
    verbose: bool = False,
    models: str = "tiny",
    retrain: bool = False,
    holdout: float = 0.0,
) -> dict:
    """Entry: the data and the two models, then :func:`story` in ``out``. ``models="tiny"``:
    synthetic interactions and two tiny random-init LMs built here; ``"real"``: MovieLens-100k and
    SmolLM2-135M -> Gemma-3-270M (:data:`REAL`), fetched from the package index once and cached."""
    if models == "real" and task != "rating":
        raise PumaError("quickstart --models real tells the rating story (MovieLens-100k); use --models tiny for ctr")
    C.build(C.MigrateGateConfig, {"holdout": holdout}, source="--holdout")  # checked before any work
    seed = DEFAULTS["seed"] if seed is None else seed
    out = os.path.abspath(out)
    t0 = time.time()
    data = storage.join(out, "data")
    if models == "real":
        users = users or REAL["users"]
        cache = os.path.expanduser(os.environ.get("PUMA_MODEL_CACHE", C.MODEL_CACHE))
        data = user_subset(movielens_100k(cache), users, data)
        pair = packaged_import(REAL["source"], cache), packaged_import(REAL["target"], cache)
        train, template, migrate = REAL["train"], REAL["template"], REAL["migrate"]
    else:
        users = users or DEFAULTS["users"]
        meta_uri = storage.join(data, "meta.json")
        have = storage.read_json(meta_uri) if storage.exists(meta_uri) else {}
        if (have.get("users"), have.get("task"), have.get("seed")) != (users, task, seed):
            synthesize(data, users=users, task=task, seed=seed)
        built = build_tiny(os.path.join(out, "models"), [DEFAULTS["source"], DEFAULTS["target"]], seed=seed)
        pair = built[DEFAULTS["source"]], built[DEFAULTS["target"]]
        train, template, migrate = DEFAULTS["train"], None, None
    train = dict(train, **({"epochs": epochs} if epochs else {}))
    if retrain:  # the users the gate flags are retrained on the target ("puma_gated")
        migrate = C.deep_merge(migrate or {}, {"gate": {"retrain": True}})
    if holdout:  # validation rows kept out of the gate, every method measured on them apart
        migrate = C.deep_merge(migrate or {}, {"gate": {"holdout": holdout}})
    results = story(out, data, *pair, task, seed, train, num_workers, verbose, template, migrate)
    results = {"users": users, "models": models, **results, "total_wall_s": time.time() - t0}
    storage.write_json(storage.join(out, "results.json"), results)
    say(f"quickstart ({task}, {users} users) finished in {results['total_wall_s']:.0f} s -> {out}/results.json")
    return results


def story(
    out: str,
    data: str,
    source_model: str,
    target_model: str,
    task: str = "rating",
    seed: int = 0,
    train: dict | None = None,
    num_workers: int = 2,
    verbose: bool = False,
    template: str | None = None,
    migrate: dict | None = None,
) -> dict:
    """The comparison on interactions ``data`` (train/ and valid/ under it): stage 1 on ``source_model``
    ("source"), on ``target_model`` ("full_retrain") and head-only on the target ("random_init"),
    then PUMA source -> target ("puma") and one evaluation of them all beside the baselines.
    ``train``: stage-1 TrainConfig fields (default DEFAULTS["train"]); ``template``: every stage's
    (default: the task's); ``migrate``: MigrateConfig fields over DEFAULTS["migrate"]. Returns
    results.json's content without the total wall time (the caller's) and without writing it."""
    source, target = {"path": source_model}, {"path": target_model}
    train = dict(train or DEFAULTS["train"], seed=seed)
    splits = {"train": storage.join(data, "train"), "valid": storage.join(data, "valid")}
    ray_cfg = C.RayConfig(verbose=verbose)
    init_ray(ray_cfg)
    common = {
        "task": task,
        "template": template,
        "data": splits,
        "scaling": {"num_workers": num_workers},
        "ray": ray_cfg.model_dump(),
    }
    ray_runs = os.path.join(out, "ray_runs")
    runs, timings = {}, {}
    # random_init trains the head only (prompts stay at their init); its validation RMSE is flat after one epoch
    for name, model, extra in (
        ("source", source, {}),
        ("full_retrain", target, {}),
        ("random_init", target, {"train_prompts": False, "epochs": 1}),
    ):
        say(f"quickstart: stage 1 '{name}' on {os.path.basename(model['path'])}")
        cfg = C.build(
            C.PromptsConfig,
            {
                **common,
                "model": model,
                "train": {**train, **extra},
                "output": storage.join(out, "runs", name),
                "run": {"name": f"quickstart-{name}", "storage_path": ray_runs},
            },
        )
        summary = train_prompts(cfg)
        runs[name] = cfg.output
        timings[name] = {"wall_s": summary["wall_s"], "loop_s": summary["loop_s"]}
    m = C.deep_merge(DEFAULTS["migrate"], migrate or {})
    mcfg = C.deep_merge(
        m,
        {
            **common,
            "model": target,
            "sources": [storage.join(runs["source"], "prompts")],
            "output": storage.join(out, "runs", "puma"),
            "select": {"seed": seed},
            "train": {"seed": seed},
            "compare": runs,
            "run": {"name": "quickstart-puma", "storage_path": ray_runs},
        },
    )
    migration = run_migration(C.build(C.MigrateConfig, mcfg))
    report = migration["evaluation"]
    timings.update(
        puma_train=migration["summary"]["timings"]["train"],
        puma_rewrite=migration["summary"]["timings"]["rewrite"],
        evaluate=report["timings"],
    )
    keep = ["rmse", "mae"] if task == "rating" else ["auc", "uauc"]
    order = ["puma", "full_retrain", "source", "random_init", "global_mean", "user_mean", "bias"]
    order += [k for k in report["methods"] if k not in order]  # puma_gated, after a gated retrain
    return {
        "task": task,
        "seed": seed,
        "methods": {
            k: {
                **{x: report["methods"][k][x] for x in keep},
                "lm_sample_passes": report["methods"][k]["lm_sample_passes"],
                "wall_s": report["methods"][k]["wall_s"],
            }
            for k in order
        },
        "puma_by_users": {k: v for k, v in report["methods"]["puma"].items() if "_adapter_users" in k},
        "gate": {k: v for k, v in report.get("gate", {}).items() if k not in ("histogram", "uri")},
        **({"holdout": report["holdout"]} if "holdout" in report else {}),
        # per stage: wall seconds and seconds inside its own loop (training epochs, rewrite, scoring)
        "timings": {k: {x: round(v, 1) for x, v in t.items()} for k, t in timings.items()},
    }
