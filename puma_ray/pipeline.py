"""`puma-ray migrate`: profile -> select -> train the adapter -> rewrite -> evaluate.

Topologies: one source (A -> B); aggregated sources ([A;B] -> C, joined on user_id); chained
(A -> B -> C: every step migrates the previous step's OUTPUT store, with no access to earlier
training). Each step's output directory is itself a run (prompts/ + head + summary.json) that
`puma-ray evaluate` and the next step can read.
"""

from __future__ import annotations

import time

from puma_ray import outputs, storage, templates
from puma_ray.adapter import save_adapter
from puma_ray.config import NEEDS_SOURCE_MODEL, EvaluateConfig, MigrateConfig, MigrateGateConfig, build
from puma_ray.console import say
from puma_ray.errors import PumaError, user_errors
from puma_ray.evaluate import evaluate, store_run
from puma_ray.heads import HEAD_FILES, save_head
from puma_ray.identity import store_meta
from puma_ray.profile import profile_users
from puma_ray.report import format_table, write_report
from puma_ray.retrain import retrain_flagged
from puma_ray.rewrite import STAGED, commit, rewrite_store
from puma_ray.runtime import init_ray
from puma_ray.schema import check_interactions_input, read_store_meta, store_user_ids
from puma_ray.select import read_selected, select_users
from puma_ray.signals import check_source_model
from puma_ray.sources import join_sources, source_metas
from puma_ray.stage2 import train_adapter

COMMAND = "migrate"
# what a migration step stages and publishes beside its prompt store (puma_ray.outputs)
PUBLISHED = ("profile", "selection", "adapter", *HEAD_FILES, "source_joined")


def migrate_step(
    cfg: MigrateConfig,
    rewrite: bool = True,
    callbacks: tuple = (),
    profile: dict | None = None,
    root: str | None = None,
) -> dict:
    """One migration (single or aggregated sources -> cfg.model). Writes everything under cfg.output.

    ``rewrite=False`` stops after the adapter and head are saved (a Tune trial); ``callbacks`` go
    to the Ray Train run (e.g. Tune's TuneReportCallback); ``profile``: :func:`profile_users`'s
    result for cfg.data.train when it is already written (Tune profiles once for all its trials),
    else the step profiles the users into cfg.output/profile. ``root``: the output the marker of
    ``migrate`` goes to (a chain's steps write inside it; default cfg.output)."""
    t0 = time.time()
    out = cfg.output
    if cfg.select.strategy in NEEDS_SOURCE_MODEL:
        check_source_model(cfg.select, cfg.sources)  # before any work
    outputs.mark_output(root or out, COMMAND, cfg)
    outputs.start_staging(out, keep=STAGED if cfg.rewrite.resume else ())  # published together below
    src = join_sources(cfg.sources, outputs.staged(out, "source_joined"))
    cfg = cfg.model_copy(update={"prompt_length": src.meta.prompt_length})
    meta = store_meta(cfg.model.path, cfg.task, cfg.template, src.meta.prompt_length, "rewrite")
    sources = " + ".join(m.model for m in src.metas)
    say(f"migrate: {sources} (d={src.meta.hidden_size}) -> {cfg.model.path} (d={meta.hidden_size})")

    t_profile = time.time()
    profile = profile or profile_users(cfg.data.train, cfg.task, outputs.staged(out, "profile"))
    t_select = time.time()
    sel_out = outputs.staged(out, "selection")
    selection = select_users(cfg.select, src.uri, profile["uri"], sel_out, cfg.data.train, cfg.task, cfg.scoring)
    users = read_selected(sel_out)
    t_train = time.time()
    trained = train_adapter(cfg, src, meta.hidden_size, users, profile["users"], callbacks, profile["uri"])

    target = {"model": meta.model, "model_fingerprint": meta.model_fingerprint, "hidden_size": meta.hidden_size}
    origins = [
        {"model": m.model, "model_fingerprint": m.model_fingerprint, "hidden_size": m.hidden_size} for m in src.metas
    ]
    adapter_uri = outputs.staged(out, "adapter")
    save_adapter(adapter_uri, trained.model.adapter, origins, target, src.meta.prompt_length, meta.template)
    head = (meta.model_fingerprint, meta.hidden_size)
    save_head(outputs.staged(out), trained.model.head, cfg.task, cfg.head.model_dump(), *head)
    t_rewrite = time.time()
    manifest = rewrite_store(src.uri, adapter_uri, meta, out, cfg.rewrite) if rewrite else None
    commit(out, manifest, PUBLISHED, retire=("summary.json", "evaluation.json"))
    summary = {
        "stage": "migrate",
        "model": cfg.model.path,
        "sources": cfg.sources,
        "selected_users": len(users),
        "source_users": manifest["input"]["rows"] if manifest else None,
        "missing_in_sources": src.missing,
        "selection": selection,
        "validation": cfg.validation.model_dump(),
        "lm_sample_passes": trained.lm_sample_passes,
        "train_wall_s": trained.train_wall_s,
        "wall_s": time.time() - t0,
        "timings": {
            # the adapter stage: profile + select + train (its loop: the epochs)
            "train": {
                "wall_s": t_rewrite - t0,
                "loop_s": trained.loop_s,
                "profile_s": t_select - t_profile,
                "select_s": t_train - t_select,
                "fit_s": t_rewrite - t_train,
            },
            "rewrite": {"wall_s": time.time() - t_rewrite, "loop_s": manifest["loop_s"] if manifest else 0.0},
        },
        "final_metrics": {k: v for k, v in trained.metrics.items() if isinstance(v, (int, float))},
    }
    storage.write_json(storage.join(out, "summary.json"), summary)
    return summary


def target_template(cfg: MigrateConfig) -> str:
    """The template the migrated prompts are trained and stored under: ``cfg.template``, else the
    sources' own. Refuses (one line) sources trained under another template than that one, unless
    ``cfg.allow_template_change``. Reads store footers only."""
    metas = {uri: read_store_meta(uri) for uri in cfg.sources}
    if cfg.template is None:
        specs = {m.template for m in metas.values()}
        if len(specs) > 1 and not cfg.allow_template_change:
            raise PumaError(
                f"sources {cfg.sources} were trained under different templates; set template (and "
                "allow_template_change=true)"
            )
        return next(iter(metas.values())).template
    want = templates.resolve(cfg.template, cfg.task)
    for uri, m in metas.items():
        templates.check_same(m.template, m.template_hash, uri, want, cfg.allow_template_change, "allow_template_change")
    return want.spec


def migrate_inputs(cfg: MigrateConfig) -> dict:
    """What a migration reads, by config key: its output must stay apart from all of them."""
    return {
        "sources": cfg.sources,
        "data.train": cfg.data.train,
        "data.valid": cfg.data.valid,
        "compare": cfg.compare,
        "model.path": outputs.local_model(cfg.model.path),
        "chain": [outputs.local_model(m.path) for m in cfg.chain],
        "select.source_model.path": outputs.local_model(cfg.select.source_model and cfg.select.source_model.path),
    }


def check_migrate_output(cfg: MigrateConfig) -> None:
    """Refuse (one line) an output that overlaps an input, or a non-empty one ``migrate`` did not write
    (unless ``output_mode: overwrite``): puma_ray.outputs."""
    storage.set_s3_endpoint(cfg.storage.s3_endpoint)  # the checks may read s3://
    outputs.check_output(cfg.output, COMMAND, migrate_inputs(cfg), cfg.output_mode == "overwrite")


def check_migrate_inputs(cfg: MigrateConfig) -> None:
    """Refuse (one line, before Ray starts and before the output is marked) bad interactions (their
    footers: puma_ray.schema.check_interactions_input) and bad source stores: footers
    (sources.source_metas) and user ids, each user once (read on the driver, as the selection reads them)."""
    for uri in (cfg.data.train, cfg.data.valid):
        if uri:
            check_interactions_input(uri, cfg.task)
    source_metas(cfg.sources)
    for uri in cfg.sources:
        store_user_ids(uri)


@user_errors
def migrate(cfg: MigrateConfig) -> dict:
    """Entry: run the migration (chained steps when cfg.chain is set), then evaluate against cfg.compare."""
    check_migrate_output(cfg)  # before Ray starts and before anything is deleted
    if cfg.evaluate and not cfg.data.valid:
        raise PumaError("migrate needs data.valid to evaluate (or set evaluate=false)")
    if cfg.gate.retrain and not (cfg.evaluate and cfg.gate.enabled):
        raise PumaError("gate.retrain retrains the users the gate flags: it needs evaluate=true and gate.enabled=true")
    check_migrate_inputs(cfg)
    cfg = cfg.model_copy(update={"gate": gate_reference(cfg)})
    cfg = cfg.model_copy(update={"template": target_template(cfg)})
    init_ray(cfg.ray, cfg.storage)
    t0 = time.time()
    steps = [*cfg.chain, cfg.model]
    sources, summaries = cfg.sources, []
    for i, model in enumerate(steps):
        step_out = cfg.output if i == len(steps) - 1 else storage.join(cfg.output, f"chain-{i}")
        step = cfg.model_copy(
            update={
                "model": model,
                "sources": sources,
                "output": step_out,
                "chain": [],
                "run": cfg.run.model_copy(update={"name": f"{cfg.run.name}-step{i}" if cfg.chain else cfg.run.name}),
            }
        )
        summaries.append(migrate_step(step, root=cfg.output))
        sources = [storage.join(step_out, "prompts")]
    if len(summaries) > 1:  # a chain's cost is every step's
        final = summaries[-1]
        final.update(
            lm_sample_passes=sum(s["lm_sample_passes"] for s in summaries),
            wall_s=time.time() - t0,
            chain=[
                {"model": s["model"], "lm_sample_passes": s["lm_sample_passes"], "wall_s": s["wall_s"]}
                for s in summaries
            ],
        )
    summaries[-1]["origin"] = cfg.sources  # the gate's reference "source" (a chain's first step's)
    storage.write_json(storage.join(cfg.output, "summary.json"), summaries[-1])
    report = {"summary": summaries[-1]}
    if cfg.evaluate:
        ev = build(
            EvaluateConfig,
            {
                "task": cfg.task,
                "data": cfg.data.model_dump(),
                "runs": {"puma": cfg.output, **cfg.compare},
                "baselines": cfg.baselines,
                "subsets": {"adapter_users": storage.join(cfg.output, "selection", "selected.parquet")},
                "output": storage.join(cfg.output, "evaluation.json"),
                "output_mode": cfg.output_mode,
                "gate": cfg.gate.model_dump(exclude={"retrain", "train"}),
                "ray": cfg.ray.model_dump(),
                "storage": cfg.storage.model_dump(),
                "scoring": cfg.scoring.model_dump(),
            },
        )
        evaluation = evaluate(ev)
        if cfg.gate.retrain and "gate" in evaluation:
            evaluation = retrain_flagged(cfg, evaluation, ev)
            storage.write_json(ev.output, outputs.stamp(evaluation, "evaluate", ev))
            print(format_table(evaluation))
        write_report(evaluation, storage.join(cfg.output, "report"))
        report["evaluation"] = evaluation
    return report


def gate_reference(cfg: MigrateConfig) -> MigrateGateConfig:
    """The gate as it will run, checked before any work. An explicit ``gate.reference`` must be "source"
    (with the first source store a run: RUN/prompts beside RUN/head.*), a compared run or a baseline: one
    line otherwise. The default "source" without such a run gates against ``user_mean`` (said once), or
    turns the gate off when user_mean is not evaluated either."""
    gate = cfg.gate
    if not (cfg.evaluate and gate.enabled) or gate.reference in (*cfg.compare, *cfg.baselines):
        return gate
    if gate.reference == "source" and store_run(cfg.sources[0]) is not None:
        return gate
    if "reference" in gate.model_fields_set:
        if gate.reference == "source":
            store_run_hint = f"{cfg.sources[0]} is not a run's prompts/ with its head beside it"
            raise PumaError(
                f"gate.reference=source: {store_run_hint}; set gate.reference to a baseline or compared run"
            )
        methods = ", ".join(["source", *cfg.compare, *cfg.baselines])
        raise PumaError(f"gate.reference {gate.reference!r} is not a method this migration evaluates ({methods})")
    if "user_mean" in cfg.baselines:
        say(f"gate: {cfg.sources[0]} has no head beside it, so users are gated against user_mean")
        return gate.model_copy(update={"reference": "user_mean"})
    say(f"gate: off ({cfg.sources[0]} has no head beside it and user_mean is not evaluated)")
    return gate.model_copy(update={"enabled": False})
