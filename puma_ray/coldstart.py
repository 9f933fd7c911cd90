"""`puma-ray prompts coldstart`: target prompts for users who arrive after a migration, without
training anyone. Entry: :func:`cold_start`.

Users with interactions but no source prompt have nothing to migrate. Each gets one of ``k``
group prompts: the centroids of a K-means fit on the migrated prompts (the target model's user
groups), the one under which the migrated model (target LM + migrated head, both unchanged) has
the lowest training loss on the user's interactions: k forward passes per interaction, in one Ray
Data scoring pass for all k (puma_ray.scorer.score_runs). The output is a run directory like
any other (prompts/ of the new users only, the migrated head, summary.json): it can be scored by
`puma-ray evaluate`, or refined with `puma-ray prompts train` (``init_prompts`` = its prompts/,
``init_head`` = the migrated run, ``train.head_lr=0``: only the new users' prompts train).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from puma_ray import console, outputs, storage
from puma_ray.config import ColdStartConfig, SelectConfig
from puma_ray.console import say
from puma_ray.data import keep_users, load_interactions, mean_by
from puma_ray.errors import PumaError, user_errors
from puma_ray.heads import HEAD_FILES, load_head
from puma_ray.runtime import init_ray
from puma_ray.schema import check_prompt_values, read_store_meta, write_prompt_store
from puma_ray.scorer import run_model, score_runs
from puma_ray.strategies import fit_kmeans, kmeans_sample

COMMAND = "prompts coldstart"


@user_errors
def cold_start(cfg: ColdStartConfig) -> dict:
    """Entry: a centroid prompt for every user of ``cfg.data.train`` without a prompt in ``cfg.run``.

    Writes ``cfg.output``/prompts/ (those users; the migrated store's metadata, stage "coldstart"),
    head.* (the migrated head) and summary.json; returns the summary."""
    t0 = time.time()
    inputs = {
        "run": cfg.run,
        "data.train": cfg.data.train,
        "model.path": outputs.local_model(cfg.model and cfg.model.path),
    }
    storage.set_s3_endpoint(cfg.storage.s3_endpoint)  # the check may read s3://
    outputs.check_output(cfg.output, COMMAND, inputs, cfg.output_mode == "overwrite")  # before Ray, before any delete
    init_ray(cfg.ray, cfg.storage)
    store = storage.join(cfg.run, "prompts")
    meta = read_store_meta(store)
    model = run_model(cfg.model, cfg.run)  # the store's model, fingerprint checked
    load_head(cfg.run, cfg.task, meta.model_fingerprint)  # refuses another task or model
    rows, n_rows = load_interactions(cfg.data.train, cfg.task)
    known = storage.read_table(store, columns=["user_id"]).column("user_id").combine_chunks().cast(pa.string())
    users = pa.array(sorted(rows.unique("user_id")), pa.string())
    new = pc.filter(users, pc.invert(pc.is_in(users, value_set=known))).sort()
    if len(new) == 0:
        raise PumaError(f"{cfg.data.train}: every user already has a prompt in {store}")
    say(
        f"coldstart: {len(new):,} new user(s) ({len(users) - len(new):,} of {cfg.data.train} already have a "
        f"migrated prompt, skipped); {cfg.clusters} centroids of {len(known):,} migrated prompts"
    )

    sel = SelectConfig(clusters=cfg.clusters, kmeans_sample=cfg.kmeans_sample, seed=cfg.seed)
    sample_ids = known.sort().take(pa.array(kmeans_sample(len(known), sel, np.random.default_rng(cfg.seed))))
    sample = storage.read_table(store, filters=pc.field("user_id").isin(sample_ids)).sort_by("user_id")
    centroids = fit_kmeans(check_prompt_values(store, meta, sample), sel).cluster_centers_.astype(np.float32)

    work = outputs.staged(cfg.output, "candidates")  # one store per centroid: every new user holds it
    outputs.mark_output(cfg.output, COMMAND, cfg)
    outputs.start_staging(cfg.output)
    runs = {}
    for j, c in enumerate(centroids):
        store_j = storage.join(work, f"c{j:03d}")
        write_prompt_store(store_j, meta, new.to_pylist(), np.repeat(c[None], len(new), 0))
        runs[f"c{j:03d}"] = {"uri": cfg.run, "prompts": store_j, "model": model}  # scored with the migrated head
    new_rows = rows.map_batches(keep_users, fn_kwargs={"users": new}, batch_format="pyarrow").materialize()
    n_new_rows = new_rows.count()
    with console.Relay() as relay:
        label = f"coldstart: {len(centroids)} centroids x {n_new_rows:,} rows"
        scored = score_runs(runs, cfg.task, new_rows, n_new_rows, cfg.scoring, relay.handle, label, loss=True)
    means = mean_by(scored, ["user_id", "run"], "loss").materialize()  # one row per (user, centroid)
    table = pa.concat_tables(ray.get(means.to_arrow_refs())).to_pandas()
    best = table.loc[table.groupby("user_id")["loss"].idxmin()].set_index("user_id")
    pick = best.loc[new.to_pylist(), "run"].map(lambda r: int(r[1:])).to_numpy()

    out_meta = dataclasses.replace(meta, stage="coldstart")
    write_prompt_store(outputs.staged(cfg.output, "prompts"), out_meta, new.to_pylist(), centroids[pick])
    for name in HEAD_FILES:  # the output is a run directory: the migrated head beside its prompts
        storage.write_bytes(outputs.staged(cfg.output, name), storage.read_bytes(storage.join(cfg.run, name)))
    outputs.publish(cfg.output, ["prompts", *HEAD_FILES], retire=["summary.json"])  # the candidates go with the staging
    summary = {
        "stage": "coldstart",
        "run": cfg.run,
        "users": len(new),
        "skipped_with_prompt": len(users) - len(new),
        "clusters": len(centroids),
        "users_per_centroid": np.bincount(pick, minlength=len(centroids)).tolist(),
        "rows": n_new_rows,
        "lm_sample_passes": n_new_rows * len(centroids),  # forward only
        "wall_s": time.time() - t0,
    }
    storage.write_json(storage.join(cfg.output, "summary.json"), summary)
    say(f"coldstart: wrote {len(new):,} prompts to {cfg.output} in {summary['wall_s']:.0f} s")
    return summary
