"""`puma-ray migrate`: profile -> select -> train the adapter -> rewrite -> evaluate.

Topologies: one source (A -> B); aggregated sources ([A;B] -> C, joined on user_id); chained
(A -> B -> C: every step migrates the previous step's OUTPUT store, with no access to earlier
training). Each step's output directory is itself a run (prompts/ + head + summary.json) that
`puma-ray evaluate` and the next step can read.
"""

from __future__ import annotations

import json
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc

from puma_ray import storage
from puma_ray.config import EvaluateConfig, MigrateConfig, build
from puma_ray.errors import PumaError, user_errors


def _training_data(cfg: MigrateConfig, src_uri: str, users: pa.Array, all_users: int) -> tuple[dict, int]:
    """Stage-2 data, streamed: interactions joined (Ray Data hash join on user_id) with their
    users' source prompts, so every row carries its user's prompt and no process holds the prompt
    table. "train" holds the selected users' rows; "valid" the users ``cfg.validation`` names (a
    fixed hashed sample of all ``all_users`` users, or the selected ones).
    -> ({"train", "valid"} Ray Datasets, train row count)."""
    from puma_ray.data import hashed_fraction, load_interactions

    def selected(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.is_in(batch.column("user_id"), value_set=users))

    def sampled(batch: pa.Table) -> pa.Table:
        ids = batch.column("user_id").to_numpy(zero_copy_only=False)
        return batch.filter(hashed_fraction(ids, cfg.validation.sample_users / max(1, all_users)))

    keep = {"train": selected, "valid": selected if cfg.validation.users == "selected" else sampled}
    out = {}
    for split in ("train", "valid"):
        uri = getattr(cfg.data, split)
        if uri:
            ds, _ = load_interactions(uri, cfg.task)
            prompts = storage.ray_read_parquet(src_uri, columns=["user_id", "prompt"]).map_batches(keep[split], batch_format="pyarrow")
            out[split] = ds.map_batches(keep[split], batch_format="pyarrow").join(
                prompts, join_type="inner", num_partitions=max(2, cfg.scaling.num_workers), on=("user_id",))
    rows = out["train"].count()
    if rows == 0:
        raise PumaError(f"{cfg.data.train}: the {len(users)} selected users have no training interactions")
    return out, rows


def migrate_step(cfg: MigrateConfig, rewrite: bool = True, callbacks: tuple = ()) -> dict:
    """One migration (single or aggregated sources -> cfg.model). Writes everything under cfg.output.

    ``rewrite=False`` stops after the adapter and head are saved (a Tune trial); ``callbacks`` go
    to the Ray Train run (e.g. Tune's TuneReportCallback)."""
    from safetensors.torch import load as st_load

    from puma_ray.adapter import MigrationAdapter, save_adapter
    from puma_ray.heads import build_head, save_head
    from puma_ray.llm import DEFAULT_TEMPLATE, model_info
    from puma_ray.profile import profile_users
    from puma_ray.rewrite import rewrite_store
    from puma_ray.schema import StoreMeta
    from puma_ray.select import select_users
    from puma_ray.sources import join_sources
    from puma_ray.train import fit, read_checkpoint_file

    t0 = time.time()
    out = cfg.output
    fingerprint, d_tgt = model_info(cfg.model.path)
    src = join_sources(cfg.sources, storage.join(out, "source_joined"))
    cfg = cfg.model_copy(update={"prompt_length": src.meta.prompt_length})
    print(f"migrate: {' + '.join(m.model for m in src.metas)} (d={src.meta.hidden_size}) -> {cfg.model.path} (d={d_tgt})", file=sys.stderr)

    profile_uri = storage.join(out, "profile")
    profiled = profile_users(cfg.data.train, cfg.task, profile_uri)
    selection = select_users(cfg.select, src.uri, profile_uri, storage.join(out, "selection"))
    users = storage.read_table(storage.join(out, "selection", "selected.parquet"), columns=["user_id"]).column("user_id").combine_chunks()
    datasets, rows = _training_data(cfg, src.uri, users, profiled["users"])
    print(f"migrate: training the adapter on {len(users)} users ({rows} interactions)", file=sys.stderr)
    ctx = {"d_src": src.meta.hidden_size, "prompt_length": src.meta.prompt_length}
    result = fit("adapter", cfg, datasets, ctx, rows, callbacks)
    state = st_load(read_checkpoint_file(result.checkpoint, "trainable.safetensors"))
    progress = json.loads(read_checkpoint_file(result.checkpoint, "state.json"))
    a = cfg.adapter
    adapter = MigrationAdapter(src.meta.hidden_size, d_tgt, a.width, a.depth, a.dropout)
    adapter.load_state_dict({k[len("adapter."):]: v for k, v in state.items() if k.startswith("adapter.")})
    head = build_head(cfg.task, d_tgt, cfg.head)
    head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
    target = {"model": cfg.model.path, "model_fingerprint": fingerprint, "hidden_size": d_tgt}
    sources = [{"model": m.model, "model_fingerprint": m.model_fingerprint, "hidden_size": m.hidden_size} for m in src.metas]
    adapter_uri = storage.join(out, "adapter")
    save_adapter(adapter_uri, adapter, sources, target, src.meta.prompt_length)
    save_head(out, head, cfg.task, cfg.head.model_dump(), fingerprint, d_tgt)
    meta = StoreMeta(model=cfg.model.path, model_fingerprint=fingerprint, hidden_size=d_tgt, prompt_length=src.meta.prompt_length,
                     template=cfg.template or DEFAULT_TEMPLATE[cfg.task], stage="rewrite")
    manifest = rewrite_store(src.uri, adapter_uri, meta, out, cfg.rewrite) if rewrite else None
    summary = {
        "stage": "migrate", "model": cfg.model.path, "sources": cfg.sources, "selected_users": len(users),
        "source_users": manifest["input"]["rows"] if manifest else None, "missing_in_sources": src.missing, "selection": selection,
        "validation": cfg.validation.model_dump(),
        "lm_sample_passes": progress["lm_sample_passes"], "train_wall_s": progress["wall_s"], "wall_s": time.time() - t0,
        "final_metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    }
    storage.write_json(storage.join(out, "summary.json"), summary)
    return summary


@user_errors
def migrate(cfg: MigrateConfig) -> dict:
    """Entry: run the migration (chained steps when cfg.chain is set), then evaluate against cfg.compare."""
    from puma_ray.evaluate import evaluate
    from puma_ray.runtime import init_ray

    init_ray(cfg.ray, cfg.storage)
    t0 = time.time()
    steps = [*cfg.chain, cfg.model]
    sources, summaries = cfg.sources, []
    for i, model in enumerate(steps):
        step_out = cfg.output if i == len(steps) - 1 else storage.join(cfg.output, f"chain-{i}")
        step = cfg.model_copy(update={"model": model, "sources": sources, "output": step_out, "chain": [],
                                      "run": cfg.run.model_copy(update={"name": f"{cfg.run.name}-step{i}" if cfg.chain else cfg.run.name})})
        summaries.append(migrate_step(step))
        sources = [storage.join(step_out, "prompts")]
    if len(summaries) > 1:  # a chain's cost is every step's
        final = summaries[-1]
        final.update(lm_sample_passes=sum(s["lm_sample_passes"] for s in summaries), wall_s=time.time() - t0,
                     chain=[{"model": s["model"], "lm_sample_passes": s["lm_sample_passes"], "wall_s": s["wall_s"]} for s in summaries])
        storage.write_json(storage.join(cfg.output, "summary.json"), final)
    report = {"summary": summaries[-1]}
    if cfg.evaluate:
        if not cfg.data.valid:
            raise PumaError("migrate needs data.valid to evaluate (or set evaluate=false)")
        ev = build(EvaluateConfig, {
            "task": cfg.task, "data": cfg.data.model_dump(), "runs": {"puma": cfg.output, **cfg.compare},
            "subsets": {"adapter_users": storage.join(cfg.output, "selection", "selected.parquet")},
            "output": storage.join(cfg.output, "evaluation.json"), "ray": cfg.ray.model_dump(), "storage": cfg.storage.model_dump(),
            "scoring": cfg.scoring.model_dump(),
        })
        report["evaluation"] = evaluate(ev)
    return report
