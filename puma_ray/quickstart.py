"""`puma-ray quickstart`: the whole story from nothing on the embedded default.

synthetic interactions -> tiny source LM -> stage 1 (source prompts) and a random-init control
(prompts frozen at init, head trained) -> evaluate against global/user-mean baselines.
Writes DIR/results.json: {"task", "methods": {name: {rmse, mae | auc, uauc, lm_sample_passes, wall_s}}}.
"""

from __future__ import annotations

import os
import sys
import time

from puma_ray import config as C
from puma_ray import storage

DEFAULTS = {
    "users": 2000,
    "seed": 0,
    "source": "llama",
    # Tuned on the quickstart data (2 CPU cores): prompts need a far higher lr than the paper's
    # 5e-4 because each prompt sees only its own ~32 training rows per epoch.
    "train": {"epochs": 3, "batch_size": 128, "lr": 3e-3, "prompt_lr": 3e-2, "schedule": "cosine"},
}


def quickstart(out: str, task: str = "rating", users: int | None = None, seed: int | None = None,
               epochs: int | None = None, num_workers: int = 2) -> dict:
    from puma_ray.datasets.synthetic import synthesize
    from puma_ray.evaluate import evaluate
    from puma_ray.models import build_tiny
    from puma_ray.train import train_prompts

    users = users or DEFAULTS["users"]
    seed = DEFAULTS["seed"] if seed is None else seed
    out = os.path.abspath(out)
    t0 = time.time()
    data = storage.join(out, "data")
    if not storage.exists(storage.join(data, "meta.json")):
        synthesize(data, users=users, task=task, seed=seed)
    models = build_tiny(os.path.join(out, "models"), [DEFAULTS["source"]], seed=seed)
    model = {"path": models[DEFAULTS["source"]]}
    train = dict(DEFAULTS["train"], seed=seed, **({"epochs": epochs} if epochs else {}))
    common = {"task": task, "model": model, "data": {"train": storage.join(data, "train"), "valid": storage.join(data, "valid")},
              "train": train, "scaling": {"num_workers": num_workers}, "run": {"storage_path": os.path.join(out, "ray_runs")}}
    runs = {}
    for name, extra in {"source": {}, "random_init": {"train": {**train, "train_prompts": False}}}.items():
        cfg = C.build(C.PromptsConfig, {**common, **extra, "output": storage.join(out, "runs", name), "run": {**common["run"], "name": f"quickstart-{name}"}})
        print(f"quickstart: stage 1 '{name}'", file=sys.stderr)
        train_prompts(cfg)
        runs[name] = cfg.output
    ev = C.build(C.EvaluateConfig, {"task": task, "model": model, "data": common["data"], "runs": runs,
                                     "output": storage.join(out, "evaluation.json")})
    report = evaluate(ev)
    keep = ["rmse", "mae"] if task == "rating" else ["auc", "uauc"]
    results = {"task": task, "users": users, "seed": seed, "total_wall_s": time.time() - t0,
               "methods": {k: {**{m: v[m] for m in keep}, "lm_sample_passes": v["lm_sample_passes"], "wall_s": v["wall_s"]}
                           for k, v in report["methods"].items()}}
    storage.write_json(storage.join(out, "results.json"), results)
    print(f"quickstart ({task}, {users} users) finished in {results['total_wall_s']:.0f} s -> {out}/results.json")
    return results
