"""`puma-ray tune`: Ray Tune over stage 2 (the adapter), with early stopping, per-trial cost and a
quality-vs-cost frontier.

A trial is one migration without the bulk rewrite. ``_trial`` (a Tune function trainable) builds
the trial's MigrateConfig (the base config + the trial's search values, its own ``output`` and
``run.name``) and calls ``pipeline.migrate_step(cfg, rewrite=False, callbacks=(TuneReportCallback,))``:
the training loop is train.py's, imported, never copied. The TorchTrainer that migrate_step starts
reports every epoch to Tune through the callback (Ray Train V2's Tune integration: a Tuner over a
driver function, not the deprecated ``Tuner(trainer)``); the scheduler (ASHA) stops a trial early
on the validation metric by ending its driver, which ends the Train run it owns.

Cost of a trial: users selected, LM sample-passes (cumulative, reported each epoch) and wall seconds
(from the trial's start to its last reported epoch, Tune's ``time_total_s``).

Outputs under ``cfg.output``:
    trials/<trial_id>/  each trial's migration: profile/, selection/, summary.json, and adapter/ + head.*
                        when the trial ran to completion (a trial the scheduler stops leaves no adapter)
    results.json        every trial: status, values, metric, cost, epochs run; the best; early-stopping totals
    pareto.json/.md     the non-dominated trials on (metric, cost), cheapest first
    frontier.png        metric vs cost, frontier drawn
    best/               the best COMPLETED trial: adapter/ (input of `puma-ray rewrite`), head.*, summary.json,
                        migrate.yaml (its full config: `puma-ray migrate` reuses its finished training run) and
                        rewrite.yaml (a ready `puma-ray rewrite` config)
The search itself (Tune's experiment state) lives at ``storage_path/name``; running the same command
again resumes an interrupted search there (Tuner.restore).
"""

from __future__ import annotations

import math
import os
import sys
import time

import yaml
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from puma_ray import storage
from puma_ray.config import MigrateConfig, TuneConfig, build, deep_merge, nest
from puma_ray.errors import PumaError, find_user_error, user_errors

FROZEN_KEYS = ("output", "train.epochs")


# ---------------------------------------------------------------------------------------------
# Search space, resources, scheduler


def _candidates(kind: str, values: list) -> list:
    """Values to validate a search entry with: every listed value, or a range's ends."""
    if kind == "randint":
        return [int(values[0]), int(values[1]) - 1]  # randint's high is exclusive
    return list(values)


def check_search(cfg: TuneConfig) -> None:
    """Every search key must be a MigrateConfig field and every value (a range's ends) valid there."""
    from puma_ray.select import STRATEGIES

    base = cfg.base.model_dump()
    for key, spec in cfg.search.items():
        if key in FROZEN_KEYS or key.startswith("run."):
            raise PumaError(f"search.{key}: cannot be searched (output and run.* are set per trial; train.epochs is the "
                            "scheduler's budget: set it in base)")
        (kind, values), = spec.items()
        for v in _candidates(kind, values):
            build(MigrateConfig, deep_merge(base, nest({key: v})), source=f"search.{key}={v!r}")
            if key.endswith("select.strategy") and v not in STRATEGIES:
                raise PumaError(f"search.{key}: unknown strategy {v!r}; choose from {sorted(STRATEGIES)}")
        probe = build(MigrateConfig, deep_merge(base, nest({key: _candidates(kind, values)[0]})))
        node = probe.model_dump()
        for p in key.split("."):
            node = node[p]
        if isinstance(node, (dict, list)):
            raise PumaError(f"search.{key}: a section, not a value; search its fields (e.g. {key}.<field>)")


def param_space(search: dict) -> dict:
    """YAML search entries -> a nested Tune param_space ({"adapter": {"width": tune.choice(...)}})."""
    from ray import tune

    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return nest({key: make[kind](values) for key, spec in search.items() for kind, values in spec.items()})


def trial_cpus(cfg: TuneConfig) -> float:
    """CPUs one trial holds: its Train workers plus its driver."""
    s = cfg.base.scaling
    return s.num_workers * s.cpus_per_worker + cfg.driver_cpus


def max_concurrent(cfg: TuneConfig, available: dict) -> int:
    """cfg.max_concurrent, else how many trials fit in ``available`` (the cluster's resources, ray.cluster_resources())."""
    if cfg.max_concurrent:
        return cfg.max_concurrent
    n = int(available.get("CPU", 0) // trial_cpus(cfg))
    s = cfg.base.scaling
    if s.use_gpu:
        n = min(n, int(available.get("GPU", 0) // s.num_workers))
    if n < 1:
        need = f"{trial_cpus(cfg):g} CPUs" + (f" and {s.num_workers} GPUs" if s.use_gpu else "")
        raise PumaError(f"one trial needs {need} (base.scaling + driver_cpus); the cluster has "
                        f"{available.get('CPU', 0):g} CPUs and {available.get('GPU', 0):g} GPUs")
    return n


class FinishLastEpoch(ASHAScheduler):
    """ASHA, except that a trial which has trained all ``epochs`` is never stopped (it saves its
    adapter). Needed after a resume: ASHA's rungs start empty, so a trial reporting its last epoch
    would be judged at a rung it had passed before the interruption."""

    def __init__(self, epochs: int, **kwargs):
        super().__init__(**kwargs)
        self.epochs = epochs

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        return self.CONTINUE if result.get("epochs_done", 0) >= self.epochs else action


def _scheduler(cfg: TuneConfig):
    """ASHA on ``epochs_done``. Rungs stop below the last epoch (a trial reaching it always finishes and
    saves its adapter) and ``stop_last_trials=False`` lets every surviving trial run all its epochs."""
    if cfg.scheduler.name == "fifo":
        return None
    epochs, grace = cfg.base.train.epochs, cfg.scheduler.grace_period
    if grace >= epochs:
        raise PumaError(f"scheduler.grace_period ({grace}) must be below base.train.epochs ({epochs}) for early "
                        "stopping; raise the epochs or use scheduler.name: fifo")
    return FinishLastEpoch(epochs, time_attr="epochs_done", max_t=epochs - 1, grace_period=grace,
                           reduction_factor=cfg.scheduler.reduction_factor, stop_last_trials=False)


# ---------------------------------------------------------------------------------------------
# One trial


def _report_callback():
    """Tune's TuneReportCallback, adding ``epochs_done`` (epochs finished, also across a resumed Train
    run, unlike Tune's own training_iteration) for the scheduler."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = {**metrics[0], "epochs_done": int(metrics[0]["epoch"]) + 1}
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EpochReport()


def trial_config(base: dict, values: dict, output: str, name: str, trial_id: str) -> MigrateConfig:
    """The MigrateConfig of one trial: base + the trial's values, its own output and Train run name."""
    over = {"output": storage.join(output, "trials", trial_id), "run": {"name": f"{name}-{trial_id}"}}
    return build(MigrateConfig, deep_merge(deep_merge(base, values), over), source=f"trial {trial_id}")


def _trial_dirname(trial) -> str:
    return trial.trial_id


TRIAL_ACTOR_CPUS = 0.01  # Tune's actor for a trial only waits; see _trial


def _trial(config: dict, base: dict, output: str, name: str) -> None:
    """A Tune function trainable: one migration (no rewrite) with this trial's values.

    The migration runs in a Ray task outside the trial's placement group: Tune makes every task started
    from a trial land in the trial's group, where migrate_step's Ray Data work (profile, ingest) would
    not fit. The trial's actor holds a token CPU; ``driver_cpus`` is counted in ``max_concurrent``
    instead, as room for the driver and its data tasks. Stopping the trial ends its actor, which ends
    the task it owns and, with it, the Train run the task started. That run's placement group is then
    removed by Ray Train's cleaner actor, which finds the cluster through the state API: RAY_ADDRESS
    names this cluster for it (auto-detection fails on a machine running several Ray instances)."""
    import ray
    from ray import tune
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cfg = trial_config(base, config, output, name, tune.get_context().get_trial_id())
    address = os.environ.get("RAY_ADDRESS") or ray.get_runtime_context().gcs_address
    run = ray.remote(num_cpus=0, max_retries=0)(_run_trial).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None), runtime_env={"env_vars": {"RAY_ADDRESS": address}})
    ray.get(run.remote(cfg.model_dump(), _report_callback()))  # the callback must be made inside the Tune session


def _run_trial(cfg: dict, callback) -> None:
    from ray.train.v2._internal.constants import is_v2_enabled

    from puma_ray.pipeline import migrate_step
    from puma_ray.runtime import init_ray, quiet_ray_data

    if not is_v2_enabled():
        raise PumaError("Ray Train V2 is off in the trial processes: start the cluster with RAY_TRAIN_V2_ENABLED=1")
    cfg = MigrateConfig.model_validate(cfg)
    init_ray(cfg.ray, cfg.storage)  # Ray is up here: this only sets the S3 endpoint
    quiet_ray_data()
    migrate_step(cfg, rewrite=False, callbacks=(callback,))


class StopMarker(Callback):
    """Writes OUTPUT/trials/<id>/stopped.json when the scheduler stops a trial (its last result says done).

    A trial is then completed (adapter saved), stopped (this marker), errored, or unfinished: ended by
    an interruption, to be resumed. Tune's own trial status cannot tell the last from the others."""

    def __init__(self, output: str):
        self.output = output

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("done"):
            storage.write_json(storage.join(self.output, "trials", trial.trial_id, "stopped.json"),
                               {"epochs_done": result.get("epochs_done"), "training_iteration": result.get("training_iteration")})


# ---------------------------------------------------------------------------------------------
# Results: per-trial cost, Pareto frontier, best trial


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pareto_front(rows: list[dict], metric: str, mode: str, cost: str) -> list[dict]:
    """The rows no other row beats on both quality and cost, cheapest first.

    Row a dominates row b when a[cost] <= b[cost] and a[metric] is at least as good (``mode``: "min"
    or "max"), one of the two strictly. Rows with identical (cost, metric) do not dominate each other
    and are all kept. Rows lacking a finite metric or cost are left out."""
    sign = 1.0 if mode == "min" else -1.0
    pts = sorted((r for r in rows if _finite(r.get(metric)) and _finite(r.get(cost))),
                 key=lambda r: (r[cost], sign * r[metric]))
    front: list[dict] = []
    best = math.inf
    for r in pts:
        q = sign * r[metric]
        if q < best:
            front.append(r)
            best = q
        elif q == best and front and front[-1][cost] == r[cost]:
            front.append(r)
    return front


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _trial_row(result, cfg: TuneConfig) -> dict:
    m = result.metrics or {}
    trial_id = os.path.basename(str(result.path).rstrip("/"))  # trial dirs are named by _trial_dirname
    out = storage.join(cfg.output, "trials", trial_id)
    sel_uri = storage.join(out, "selection", "selection.json")
    done = storage.exists(storage.join(out, "summary.json")) and storage.exists(storage.join(out, "adapter", "adapter.json"))
    stopped = storage.exists(storage.join(out, "stopped.json"))
    status = "error" if result.error else "completed" if done else "stopped" if stopped else "unfinished"
    row = {
        "trial_id": trial_id, "status": status, "values": _flat(result.config or {}),
        "epochs_done": m.get("epochs_done", 0), "epochs": cfg.base.train.epochs,
        cfg.metric: m.get(cfg.metric),
        "selected_users": storage.read_json(sel_uri)["selected"] if storage.exists(sel_uri) else None,
        "lm_sample_passes": m.get("lm_sample_passes"), "wall_s": m.get("time_total_s"), "train_wall_s": m.get("wall_s"),
        "output": out,
    }
    if result.error:
        err = find_user_error(result.error)
        row["error"] = str(err) if err else str(result.error).strip().splitlines()[-1][:300]
    return row


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict], metric: str, keys: list[str]) -> str:
    cols = ["trial", "status", "epochs", metric, "selected users", "LM sample-passes", "wall s", *keys]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"]
    for r in rows:
        cells = [r["trial_id"], r["status"], f"{r['epochs_done']}/{r['epochs']}", _fmt(r.get(metric)), _fmt(r.get("selected_users")),
                 _fmt(r.get("lm_sample_passes")), _fmt(r.get("wall_s")), *(_fmt(r["values"].get(k)) for k in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_frontier(rows: list[dict], front: list[dict], metric: str, cost: str, best: dict | None, uri: str) -> None:
    """PNG: every trial as a point (filled = completed, hollow = stopped early), the frontier as a step line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for status, style in (("completed", {"color": "tab:blue"}), ("stopped", {"facecolors": "none", "edgecolors": "tab:gray"})):
        pts = [r for r in rows if r["status"] == status and _finite(r.get(metric)) and _finite(r.get(cost))]
        if pts:
            ax.scatter([r[cost] for r in pts], [r[metric] for r in pts], label=f"{status} ({len(pts)})", s=36, **style)
    if front:
        ax.step([r[cost] for r in front], [r[metric] for r in front], where="post", color="tab:orange", label="Pareto frontier")
    if best is not None and _finite(best.get(metric)) and _finite(best.get(cost)):
        ax.scatter([best[cost]], [best[metric]], marker="*", s=200, color="tab:red", label=f"best ({best['trial_id']})", zorder=3)
    ax.set_xlabel(cost.replace("_", " "))
    ax.set_ylabel(metric)
    ax.set_title("puma-ray tune: quality vs cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def publish_best(cfg: TuneConfig, best: dict) -> str:
    """Copy the best trial's adapter + head + summary to OUTPUT/best and write ready migrate/rewrite configs."""
    src, dst = best["output"], storage.join(cfg.output, "best")
    for uri in storage.list_files(storage.join(src, "adapter")):
        storage.write_bytes(storage.join(dst, "adapter", uri.rsplit("/", 1)[-1]), storage.read_bytes(uri))
    for f in ("head.safetensors", "head.json", "summary.json"):
        storage.write_bytes(storage.join(dst, f), storage.read_bytes(storage.join(src, f)))
    trial = trial_config(cfg.base.model_dump(), nest(best["values"]), cfg.output, cfg.name, best["trial_id"])
    # The same run.name + storage_path: `puma-ray migrate` finds the finished Train run and does not retrain.
    migrate = trial.model_copy(update={"output": storage.join(dst, "migration")}).model_dump(mode="json")
    storage.write_bytes(storage.join(dst, "migrate.yaml"), (
        f"# The best trial ({best['trial_id']}) of `puma-ray tune`. Rewrite every prompt + evaluate, reusing the trial's\n"
        f"# finished training (same run.name/storage_path): puma-ray migrate --config {storage.join(dst, 'migrate.yaml')}\n"
        + yaml.safe_dump(migrate, sort_keys=False)).encode())
    rewrite = {"model": trial.model.model_dump(), "sources": trial.sources, "adapter": storage.join(dst, "adapter"),
               "output": storage.join(dst, "rewrite"), "template": trial.template, "task": trial.task,
               "rewrite": trial.rewrite.model_dump(), "ray": trial.ray.model_dump(), "storage": trial.storage.model_dump()}
    storage.write_bytes(storage.join(dst, "rewrite.yaml"), (
        f"# Apply the best trial's adapter to every source prompt: puma-ray rewrite --config {storage.join(dst, 'rewrite.yaml')}\n"
        + yaml.safe_dump(rewrite, sort_keys=False)).encode())
    return dst


# ---------------------------------------------------------------------------------------------
# Entry


def _absolute(base: MigrateConfig) -> MigrateConfig:
    """Local relative paths made absolute: trials run in other processes (and Tune may chdir them)."""

    def a(uri: str | None, must_exist: bool = False) -> str | None:
        if uri is None or "://" in uri or os.path.isabs(uri) or (must_exist and not os.path.exists(uri)):
            return uri
        return os.path.abspath(uri)

    d = base.model_dump()
    d["model"]["path"] = a(d["model"]["path"], must_exist=True)  # else a hub id
    for m in d["chain"]:
        m["path"] = a(m["path"], must_exist=True)
    d["sources"] = [a(s) for s in d["sources"]]
    d["data"] = {k: a(v) for k, v in d["data"].items()}
    d["compare"] = {k: a(v) for k, v in d["compare"].items()}
    d["run"]["storage_path"] = a(d["run"]["storage_path"])
    return MigrateConfig.model_validate(d)


def _fingerprint(cfg: TuneConfig) -> dict:
    """What a resumed search must share with the one it resumes."""
    return cfg.model_dump(mode="json", include={"base", "search", "scheduler", "metric", "mode", "num_samples", "seed"})


@user_errors
def tune(cfg: TuneConfig, callbacks: tuple = ()) -> dict:
    """Entry: run (or resume) the search, then write results, the Pareto table + plot and best/.

    ``callbacks``: extra Ray Tune callbacks (tests use one to interrupt a search). Returns the
    results.json content."""
    import ray
    from ray import tune as rt

    from puma_ray.runtime import init_ray

    init_ray(cfg.base.ray, cfg.base.storage)
    cfg = cfg.model_copy(update={"base": _absolute(cfg.base), "output": os.path.abspath(cfg.output) if "://" not in cfg.output else cfg.output,
                                 "storage_path": cfg.storage_path if "://" in cfg.storage_path else os.path.abspath(cfg.storage_path)})
    check_search(cfg)
    scheduler = _scheduler(cfg)
    exp_path = storage.join(cfg.storage_path, cfg.name)
    fp_uri = storage.join(cfg.output, "search.json")
    trainable = rt.with_resources(rt.with_parameters(_trial, base=cfg.base.model_dump(), output=cfg.output, name=cfg.name),
                                  {"cpu": TRIAL_ACTOR_CPUS})
    t0 = time.time()
    if rt.Tuner.can_restore(exp_path):
        if storage.exists(fp_uri) and storage.read_json(fp_uri) != _fingerprint(cfg):
            raise PumaError(f"{exp_path}: holds a different search (base, search, scheduler, metric or num_samples "
                            "differ); choose another name or storage_path, or delete it")
        print(f"tune: resuming the search at {exp_path}", file=sys.stderr)
        tuner = rt.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        storage.write_json(fp_uri, _fingerprint(cfg))
        from ray.tune.search.basic_variant import BasicVariantGenerator

        concurrent = max_concurrent(cfg, ray.cluster_resources())
        print(f"tune: {cfg.num_samples} trial(s), {concurrent} at a time ({trial_cpus(cfg):g} CPUs each), "
              f"scheduler {cfg.scheduler.name}, {cfg.mode} {cfg.metric} -> {exp_path}", file=sys.stderr)
        tuner = rt.Tuner(
            trainable,
            param_space=param_space(cfg.search),
            # the generator caps live trials (Tune ignores max_concurrent_trials beside a SearchGenerator)
            tune_config=rt.TuneConfig(metric=cfg.metric, mode=cfg.mode, num_samples=cfg.num_samples, scheduler=scheduler,
                                      trial_dirname_creator=_trial_dirname,
                                      search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent)),
            run_config=rt.RunConfig(name=cfg.name, storage_path=cfg.storage_path, callbacks=[StopMarker(cfg.output), *callbacks],
                                    failure_config=rt.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()
    rows = [_trial_row(r, cfg) for r in grid]
    left = sum(r["status"] == "unfinished" for r in rows) + max(0, expected_trials(cfg) - len(rows))
    if left:
        raise PumaError(f"search interrupted with {left} of {expected_trials(cfg)} trials unfinished; "
                        f"run the same command again to resume it from {exp_path}")
    return summarize(cfg, rows, time.time() - t0)


def expected_trials(cfg: TuneConfig) -> int:
    """num_samples x the size of the grid (every grid entry multiplies the trials)."""
    return cfg.num_samples * math.prod(len(v) for spec in cfg.search.values() for k, v in spec.items() if k == "grid")


def summarize(cfg: TuneConfig, rows: list[dict], wall_s: float) -> dict:
    """results.json, pareto.json/.md, frontier.png and best/ from the trial rows."""
    rows = sorted(rows, key=lambda r: r["trial_id"])
    errors = [r for r in rows if r["status"] == "error"]
    if errors and len(errors) == len(rows):
        raise PumaError(f"every trial failed; the first: {errors[0]['error']}")
    sign = 1.0 if cfg.mode == "min" else -1.0
    completed = [r for r in rows if r["status"] == "completed" and _finite(r.get(cfg.metric))]
    best = min(completed, key=lambda r: sign * r[cfg.metric]) if completed else None
    front = pareto_front(rows, cfg.metric, cfg.mode, cfg.cost)
    keys = sorted(cfg.search)
    ran = [r for r in rows if r["status"] != "error"]
    results = {
        "metric": cfg.metric, "mode": cfg.mode, "cost": cfg.cost, "scheduler": cfg.scheduler.name, "search_wall_s": wall_s,
        "trials": rows, "best": best,
        "early_stopping": {"trials": len(ran), "stopped": sum(r["status"] == "stopped" for r in ran),
                           "epochs_run": sum(r["epochs_done"] for r in ran), "epochs_if_all_completed": sum(r["epochs"] for r in ran),
                           "lm_sample_passes": sum(r["lm_sample_passes"] or 0 for r in ran)},
        "pareto": [r["trial_id"] for r in front],
    }
    out = cfg.output
    if best is not None:
        results["best_dir"] = publish_best(cfg, best)
    storage.write_json(storage.join(out, "results.json"), results)
    storage.write_json(storage.join(out, "pareto.json"), {"metric": cfg.metric, "mode": cfg.mode, "cost": cfg.cost, "frontier": front})
    md = (f"# Quality vs cost ({cfg.metric}, {cfg.mode}; cost: {cfg.cost})\n\n## Pareto frontier\n\n" + markdown_table(front, cfg.metric, keys)
          + "\n## All trials\n\n" + markdown_table(rows, cfg.metric, keys))
    storage.write_bytes(storage.join(out, "pareto.md"), md.encode())
    plot_frontier(rows, front, cfg.metric, cfg.cost, best, storage.join(out, "frontier.png"))
    print(markdown_table(rows, cfg.metric, keys), end="")
    if best is None:
        print(f"tune: no trial completed; nothing in {storage.join(out, 'best')}", file=sys.stderr)
    else:
        values = ", ".join(f"{k}={_fmt(best['values'].get(k))}" for k in keys)
        print(f"tune: best {best['trial_id']} {cfg.metric}={best[cfg.metric]:.4f} ({values}) -> {results['best_dir']}", file=sys.stderr)
    return results
