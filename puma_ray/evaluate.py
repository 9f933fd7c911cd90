"""`puma-ray evaluate`: score prompt stores (+ model + head) and the baselines on held-out interactions.

Streamed end to end: valid interactions are hash-joined (Ray Data) with the prompt stores of all
runs at once, scored in one ``map_batches`` pass with a callable class (each LM and head loads once
per actor, whatever the number of runs); the baselines (global_mean, user_mean, bias) come from
puma_ray.baselines. The rows of every method, runs and baselines together, are reduced to metrics
in one set of passes without collecting rows (puma_ray.metrics.run_metrics).
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass

import pyarrow as pa

from puma_ray import console, outputs, storage
from puma_ray.baselines import BASELINES
from puma_ray.config import EvaluateConfig
from puma_ray.data import column_mean, distinct, load_interactions, mark_held
from puma_ray.errors import PumaError, user_errors
from puma_ray.gate import per_user
from puma_ray.metrics import as_run, report_metrics
from puma_ray.report import format_table, gate_line
from puma_ray.runtime import init_ray
from puma_ray.scorer import run_model, score_runs


@user_errors
def evaluate(cfg: EvaluateConfig) -> dict:
    """Entry: score every run in ``cfg.runs`` and the baselines on ``cfg.data.valid``; print a table.

    Valid rows are joined (one Ray Data hash join) with every run's prompt store and scored in one
    pass by an actor pool holding only the runs' LMs and heads; rows of users without a prompt are
    counted, not scored. The report ``cfg.output`` may lie beside (inside) a scored run, never in or over
    another input; an existing file there must be an earlier report unless ``output_mode: overwrite``."""
    t_start = time.time()
    if cfg.output:  # before Ray starts
        inputs = {
            "data.train": cfg.data.train,
            "data.valid": cfg.data.valid,
            "runs": cfg.runs,
            "subsets": cfg.subsets,
            "model.path": outputs.local_model(cfg.model and cfg.model.path),
        }
        overwrite = cfg.output_mode == "overwrite"
        storage.set_s3_endpoint(cfg.storage.s3_endpoint)  # the check may read s3://
        outputs.check_output_file(cfg.output, "evaluate", inputs, overwrite, allow_inside=["runs"])
    gate = plan_gate(cfg)  # before Ray starts
    init_ray(cfg.ray, cfg.storage)
    if not cfg.data.valid:
        raise PumaError("evaluate needs data.valid (the held-out interactions)")
    valid_ds, valid_rows = load_interactions(cfg.data.valid, cfg.task)
    if cfg.holdout:  # every method's rows carry it: the gate judges the others, the held ones are measured apart
        valid_ds = valid_ds.map_batches(mark_held, fn_kwargs={"fraction": cfg.holdout}, batch_format="pyarrow")
    run_uris = {**cfg.runs, **(gate.extra if gate else {})}
    models = {name: run_model(cfg.model, uri) for name, uri in run_uris.items()}  # mismatches refused before any work
    subsets = {
        name: storage.read_table(uri, columns=["user_id"]).column("user_id").combine_chunks().cast(pa.string())
        for name, uri in cfg.subsets.items()
    }
    valid_users = distinct(valid_ds, ["user_id"])
    names = [*run_uris, *cfg.baselines]
    rows_of = f"{valid_rows:,} valid rows of {valid_users:,} users"
    console.say(f"evaluate: {len(names)} method(s) ({console.listing(names)}) on {rows_of}")
    scored, scoring_s = [], 0.0
    if run_uris:
        t0 = time.time()
        with console.Relay() as relay:
            runs = {name: {"uri": uri, "model": models[name]} for name, uri in run_uris.items()}
            label = "evaluate: scoring " + console.listing(run_uris)
            scored.append(score_runs(runs, cfg.task, valid_ds, valid_rows, cfg.scoring, relay.handle, label))
        scoring_s = time.time() - t0
        scored[0] = scored[0].map_batches(as_run, batch_format="pyarrow").materialize()
    if cfg.baselines or cfg.gate.enabled:
        train_ds, train_rows = load_interactions(cfg.data.train, cfg.task)
    if cfg.baselines:
        mu = column_mean(train_ds, "label")
        for name in cfg.baselines:
            rows = BASELINES[name](train_ds, train_rows, valid_ds, valid_rows, mu, cfg.task, cfg)
            scored.append(rows.map_batches(as_run, fn_kwargs={"run": name}, batch_format="pyarrow").materialize())
    # each method's rows materialized on its own: a union of materialized datasets only lists their
    # blocks, while a union of the unexecuted ones (joins, maps) ran seconds longer than the parts
    every = scored[0].union(*scored[1:]) if len(scored) > 1 else scored[0] if scored else None
    measured = report_metrics(cfg.task, every, subsets) if every is not None else {}
    results = {}
    for name in names:  # every method measured in one set of passes (puma_ray.metrics.run_metrics)
        m = measured.get(name, {"rows": 0, "users": 0})
        if m["rows"] == 0:
            raise PumaError(
                f"{run_uris.get(name, name)}: no valid row could be scored (no user of {cfg.data.valid} has a prompt)"
            )
        summary_uri = storage.join(run_uris[name], "summary.json") if name in run_uris else None
        summary = storage.read_json(summary_uri) if summary_uri and storage.exists(summary_uri) else {}
        results[name] = {
            **{k: v for k, v in m.items() if k not in ("rows", "users")},
            "scored_rows": m["rows"],
            "unknown_rows": valid_rows - m["rows"],
            "unknown_users": valid_users - m["users"],
            "lm_sample_passes": summary.get("lm_sample_passes", 0),
            "wall_s": summary.get("wall_s", 0.0),
        }
    report = {
        "task": cfg.task,
        "valid": cfg.data.valid,
        "methods": results,
    }
    if cfg.gate.enabled and every is not None:  # every method's error by user activity, and the gate
        plan = (gate.run, gate.reference, cfg.gate, gate.out) if gate else None
        report.update(per_user(cfg.task, every, train_ds.select_columns(["user_id"]), plan, cfg.holdout))
    report["timings"] = {"wall_s": time.time() - t_start, "loop_s": scoring_s}  # loop: the runs' scoring pass
    print(format_table(report))
    if "gate" in report:
        console.say(f"{gate_line(report)} -> {storage.join(report['gate']['uri'], 'flagged')}")
    if cfg.output:
        storage.write_json(cfg.output, outputs.stamp(report, "evaluate", cfg))
    return report


@dataclass
class GatePlan:
    """What the gate of an evaluation compares: ``run``'s users against ``reference`` (a method of the
    evaluation); ``extra``: runs to score for it beside ``cfg.runs`` (the migration's source run);
    ``out``: where its per-user tables go (RUN/gate)."""

    run: str
    reference: str
    extra: dict[str, str]
    out: str


def plan_gate(cfg: EvaluateConfig) -> GatePlan | None:
    """The gate of ``cfg`` (None: off, or no run named ``gate.run``), checked before any work: the
    reference is a run, a baseline of this evaluation, or "source" (the gated migration's first
    source store, scored as the run it lies in: RUN/prompts + RUN/head.*); GATE is absent, empty or
    an earlier gate (its gate.json) unless ``output_mode: overwrite``. One line otherwise. Left at
    their defaults (gate.run and gate.reference not set), a run that is not a migration with a
    source run is not gated."""
    g = cfg.gate
    if g.enabled and g.run not in cfg.runs and "run" in g.model_fields_set:
        raise PumaError(f"gate.run {g.run!r} is not one of the runs ({console.listing(cfg.runs) or 'none given'})")
    if not g.enabled or g.run not in cfg.runs:
        return None
    explicit = {"run", "reference"} & g.model_fields_set
    extra = {}
    if g.reference == g.run:
        raise PumaError(f"gate.reference {g.reference!r} is the gated run itself")
    if g.reference not in (*cfg.runs, *cfg.baselines):
        if g.reference != "source":
            methods = console.listing([*cfg.runs, *cfg.baselines])
            raise PumaError(
                f"gate.reference {g.reference!r} is not 'source' nor a method of this evaluation ({methods})"
            )
        try:
            extra["source"] = source_run(cfg.runs[g.run])
        except PumaError:
            if explicit:
                raise
            return None  # left at its defaults: a run that is not a migration with a source run is not gated
    out = storage.join(cfg.runs[g.run], "gate")
    if (
        storage.list_files(out)
        and not storage.exists(storage.join(out, "gate.json"))
        and cfg.output_mode != "overwrite"
    ):
        raise PumaError(f"{out}: not empty and holds no gate; move it away, or {outputs.OVERWRITE_HINT}")
    return GatePlan(g.run, g.reference, extra, out)


def source_run(run_uri: str) -> str:
    """The run directory of a migrated run's (first) source store: the gate's reference "source"."""
    summary_uri = storage.join(run_uri, "summary.json")
    summary = storage.read_json(summary_uri) if storage.exists(summary_uri) else {}
    if summary.get("stage") != "migrate":
        raise PumaError(f"{run_uri}: gate.reference=source needs a migrated run (its summary.json names its sources)")
    store = (summary.get("origin") or summary["sources"])[0]
    run = store_run(store)
    if run is None:
        raise PumaError(
            f"{store}: gate.reference=source scores the source store as a run (RUN/prompts beside "
            "RUN/head.safetensors); this one is not; set gate.reference to a baseline (user_mean) or a compared run"
        )
    return run


def store_run(store: str) -> str | None:
    """The run a prompt store belongs to (RUN for RUN/prompts with RUN/head.safetensors beside it), else None."""
    parent, name = posixpath.split(store.rstrip("/"))
    return parent if name == "prompts" and storage.exists(storage.join(parent, "head.safetensors")) else None
