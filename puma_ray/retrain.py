"""The gated retrain (``migrate ... gate.retrain=true``): fix just the users the gate flagged.

Their prompts are trained on the target by stage 1 on their rows only (``PromptsConfig.users``),
starting from their migrated prompts under the migrated head, which stays as it is
(``gate.train.head_lr`` = 0). OUT/gated/ then becomes a run: head.* (the migrated head), prompts/
(the migrated store with those users replaced: one Ray Data pass, a left join on user_id, one file
per block) and manifest.json, written last (no manifest = an incomplete store), and summary.json
whose LM sample-passes are the migration's plus the retrain's.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pyarrow as pa

from puma_ray import outputs, storage
from puma_ray.config import EvaluateConfig, MigrateConfig, PromptsConfig, build
from puma_ray.console import say
from puma_ray.data import join_on
from puma_ray.errors import PumaError
from puma_ray.evaluate import evaluate
from puma_ray.heads import HEAD_FILES
from puma_ray.schema import StoreMeta, decode_prompts, prompt_store_schema, prompt_table, read_store_meta
from puma_ray.stage1 import read_users, train_prompts

GATED = "puma_gated"  # the method's name in the evaluation


def _replace_block(block: pa.Table, meta: StoreMeta, out: str) -> pa.Table:
    """One block of (user_id, prompt, new_prompt | null) -> a store file under ``out`` holding each
    user's new prompt where there is one, else the old -> one row: (file, rows, replaced)."""
    prompts = decode_prompts(block, meta.width, where=out)
    new = block.column("new_prompt").combine_chunks()
    has = np.asarray(new.is_valid())
    if has.any():
        prompts[has] = decode_prompts(block.filter(pa.array(has)), meta.width, where=out, column="new_prompt")
    uri = storage.join(out, f"part-{uuid.uuid4().hex}.parquet")
    with storage.parquet_writer(uri, prompt_store_schema(meta)) as w:
        w.write_table(prompt_table(meta, block.column("user_id").to_numpy(zero_copy_only=False), prompts))
    return pa.table({"file": [uri], "rows": [block.num_rows], "replaced": [int(has.sum())]})


def _as_new(batch: pa.Table) -> pa.Table:
    return batch.rename_columns(["user_id", "new_prompt"])


def replace_users(base_uri: str, update_uri: str, out_uri: str) -> dict:
    """``out_uri``/prompts: the store ``base_uri`` with the users of ``update_uri`` (a store of the
    same model and width) holding their prompts from there, staged in ``out_uri`` and published
    (with the head staged beside it) after checking every base user is there once and every update
    user replaced; ``out_uri``/manifest.json written last. -> the manifest."""
    t0 = time.time()
    meta, update_meta = read_store_meta(base_uri), read_store_meta(update_uri)
    if (update_meta.model_fingerprint, update_meta.width) != (meta.model_fingerprint, meta.width):
        raise PumaError(f"{update_uri}: made for another model or width than {base_uri}")
    store_uri = outputs.staged(out_uri, "prompts")
    storage.delete_dir(store_uri)
    base_rows, update_rows = storage.parquet_rows(base_uri), storage.parquet_rows(update_uri)
    base = storage.ray_read_parquet(base_uri, columns=["user_id", "prompt"])
    update = storage.ray_read_parquet(update_uri, columns=["user_id", "prompt"]).map_batches(
        _as_new, batch_format="pyarrow"
    )
    joined = join_on(base, update, "user_id", base_rows, update_rows * meta.width * 4, how="left_outer")
    parts = joined.map_batches(
        _replace_block, fn_kwargs={"meta": meta, "out": store_uri}, batch_format="pyarrow", batch_size=None
    ).to_pandas()
    rows, replaced = int(parts["rows"].sum()), int(parts["replaced"].sum())
    if rows != base_rows or replaced != update_rows:
        raise PumaError(
            f"{store_uri}: wrote {rows:,} users ({replaced:,} replaced), expected {base_rows:,} ({update_rows:,})"
        )
    manifest = {"base": base_uri, "update": update_uri, "rows": rows, "replaced": replaced, "wall_s": time.time() - t0}
    manifest["files"] = sorted(outputs.final(out_uri, f) for f in parts["file"])
    outputs.publish(out_uri, ["prompts", *HEAD_FILES], retire=["manifest.json", "summary.json"])
    storage.write_json(storage.join(out_uri, "manifest.json"), manifest)
    return manifest


def retrain_flagged(cfg: MigrateConfig, evaluation: dict, ev: EvaluateConfig) -> dict:
    """Train the flagged users of ``evaluation["gate"]`` on the target, write OUT/gated/ (module
    docstring), score it as ``puma_gated`` (``ev``'s data, no baselines) and return ``evaluation``
    with that method, its per-user deciles and a "retrain" summary added (written to ev.output)."""
    gate, out = evaluation["gate"], cfg.output
    if gate["flagged"] == 0:
        say("gate: no user flagged; nothing to retrain")
        return evaluation
    t0 = time.time()
    gated = storage.join(out, "gated")
    outputs.start_staging(gated)
    for name in HEAD_FILES:  # the final run's head, and the retrain's (fixed) init
        storage.write_bytes(outputs.staged(gated, name), storage.read_bytes(storage.join(out, name)))
    meta = read_store_meta(storage.join(out, "prompts"))
    flagged = storage.join(gate["uri"], "flagged")
    # its own Ray Train run per flagged set and settings: a rerun resumes it, another gate starts anew
    tag = outputs.config_hash({"users": read_users(flagged).to_pylist(), "train": cfg.gate.train.model_dump()})[:8]
    say(f"gate: retraining the {gate['flagged']:,} flagged users' prompts on {cfg.model.path}")
    pcfg = build(
        PromptsConfig,
        {
            "task": cfg.task,
            "model": cfg.model.model_dump(),
            "data": cfg.data.model_dump(),
            "output": storage.join(out, "gate", "retrain"),
            "output_mode": cfg.output_mode,
            "prompt_length": meta.prompt_length,
            "template": meta.template,
            "init_head": outputs.staged(gated),
            "init_prompts": storage.join(out, "prompts"),
            "users": flagged,
            "train": cfg.gate.train.model_dump(),
            "scaling": cfg.scaling.model_dump(),
            "ray": cfg.ray.model_dump(),
            "storage": cfg.storage.model_dump(),
            "run": {**cfg.run.model_dump(), "name": f"{cfg.run.name}-gate-{tag}"},
        },
    )
    trained = train_prompts(pcfg)
    merged = replace_users(storage.join(out, "prompts"), storage.join(pcfg.output, "prompts"), gated)
    migrated = storage.read_json(storage.join(out, "summary.json"))
    summary = {
        "stage": "gated",
        "model": cfg.model.path,
        "migrated": out,
        "retrained_users": trained["users"],
        "lm_sample_passes": migrated["lm_sample_passes"] + trained["lm_sample_passes"],
        "wall_s": migrated["wall_s"] + time.time() - t0,
    }
    storage.write_json(storage.join(gated, "summary.json"), summary)
    say(f"gate: {merged['replaced']:,} of {merged['rows']:,} prompts replaced -> {gated}")
    scored = evaluate(ev.model_copy(update={"runs": {GATED: gated}, "baselines": [], "output": None}))
    evaluation["methods"] = {**evaluation["methods"], GATED: scored["methods"][GATED]}
    deciles = evaluation["per_user"]["activity_deciles"]["methods"]
    deciles[GATED] = scored["per_user"]["activity_deciles"]["methods"][GATED]
    if "holdout" in evaluation:
        evaluation["holdout"]["methods"][GATED] = scored["holdout"]["methods"][GATED]
    evaluation["retrain"] = {
        "method": GATED,
        "users": trained["users"],
        "run": gated,
        "lm_sample_passes": trained["lm_sample_passes"],
        "wall_s": time.time() - t0,
    }
    return evaluation
