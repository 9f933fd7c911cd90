"""`puma-ray tune`: Ray Tune over stage 2 (the adapter), with early stopping and per-trial cost;
the results (Pareto frontier, plot, best/) are tune_report's.

A trial is one migration without the bulk rewrite. ``_trial`` (a Tune function trainable) builds
the trial's MigrateConfig (``TuneConfig.trial_config``: the base config + the trial's search
values, its own ``output`` and ``run.name``) and calls ``pipeline.migrate_step(cfg, rewrite=False,
callbacks=(TuneReportCallback,))``: the training loop is trainer.py's, imported, never copied. The
TorchTrainer that migrate_step starts reports every epoch to Tune through the callback (Ray Train
V2's Tune integration: a Tuner over a driver function, not the deprecated ``Tuner(trainer)``); the
scheduler (ASHA) stops a trial early on the validation metric by ending its driver, which ends the
Train run it owns.

Cost of a trial: users selected, LM sample-passes (cumulative, reported each epoch) and wall seconds
(from the trial's start to its last reported epoch, Tune's ``time_total_s``).

The users are profiled once per search (OUTPUT/profile/: it depends on the data only) and every
trial selects from that profile. Each trial's migration lives in OUTPUT/trials/<trial_id>/
(selection/, summary.json, and adapter/ + head.* when the trial ran to completion). The search
itself (Tune's experiment state) lives at ``storage_path/name``; running the same command again
resumes an interrupted search there (Tuner.restore).
"""

from __future__ import annotations

import math
import os
import time

import ray
from ray import tune as rt
from ray.train.v2._internal.constants import is_v2_enabled
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from puma_ray import outputs, storage
from puma_ray.config import MigrateConfig, TuneConfig, build, deep_merge, nest
from puma_ray.console import say
from puma_ray.errors import PumaError, user_errors
from puma_ray.pipeline import check_migrate_inputs, migrate_inputs, migrate_step
from puma_ray.profile import profile_users
from puma_ray.runtime import configure_ray_data, init_ray
from puma_ray.tune_report import summarize, trial_row

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
    base = cfg.base.model_dump()
    for key, spec in cfg.search.items():
        if key in FROZEN_KEYS or key.startswith("run."):
            raise PumaError(
                f"search.{key}: cannot be searched (output and run.* are set per trial; train.epochs is the "
                "scheduler's budget: set it in base)"
            )
        ((kind, values),) = spec.items()
        for v in _candidates(kind, values):
            build(MigrateConfig, deep_merge(base, nest({key: v})), source=f"search.{key}={v!r}")
        probe = build(MigrateConfig, deep_merge(base, nest({key: _candidates(kind, values)[0]})))
        node = probe.model_dump()
        for p in key.split("."):
            node = node[p]
        if isinstance(node, (dict, list)):
            raise PumaError(f"search.{key}: a section, not a value; search its fields (e.g. {key}.<field>)")


def param_space(search: dict) -> dict:
    """YAML search entries -> a nested Tune param_space ({"adapter": {"width": tune.choice(...)}})."""
    make = {
        "choice": rt.choice,
        "grid": rt.grid_search,
        "uniform": lambda v: rt.uniform(*v),
        "loguniform": lambda v: rt.loguniform(*v),
        "randint": lambda v: rt.randint(*v),
    }
    return nest({key: make[kind](values) for key, spec in search.items() for kind, values in spec.items()})


def trial_cpus(cfg: TuneConfig) -> float:
    """CPUs one trial holds: its Train workers plus its driver."""
    s = cfg.base.scaling
    return s.num_workers * s.cpus_per_worker + cfg.driver_cpus


def max_concurrent(cfg: TuneConfig, available: dict) -> int:
    """cfg.max_concurrent, else how many trials fit in ``available`` (ray.cluster_resources())."""
    if cfg.max_concurrent:
        return cfg.max_concurrent
    n = int(available.get("CPU", 0) // trial_cpus(cfg))
    s = cfg.base.scaling
    if s.use_gpu:
        n = min(n, int(available.get("GPU", 0) // s.num_workers))
    if n < 1:
        need = f"{trial_cpus(cfg):g} CPUs" + (f" and {s.num_workers} GPUs" if s.use_gpu else "")
        raise PumaError(
            f"one trial needs {need} (base.scaling + driver_cpus); the cluster has "
            f"{available.get('CPU', 0):g} CPUs and {available.get('GPU', 0):g} GPUs"
        )
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
        raise PumaError(
            f"scheduler.grace_period ({grace}) must be below base.train.epochs ({epochs}) for early "
            "stopping; raise the epochs or use scheduler.name: fifo"
        )
    return FinishLastEpoch(
        epochs,
        time_attr="epochs_done",
        max_t=epochs - 1,
        grace_period=grace,
        reduction_factor=cfg.scheduler.reduction_factor,
        stop_last_trials=False,
    )


# ---------------------------------------------------------------------------------------------
# One trial


def _report_callback():
    """Tune's TuneReportCallback, adding ``epochs_done`` (epochs finished, also across a resumed Train
    run, unlike Tune's own training_iteration) for the scheduler."""

    class EpochReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = {**metrics[0], "epochs_done": int(metrics[0]["epoch"]) + 1}
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EpochReport()


def _trial_dirname(trial) -> str:
    return trial.trial_id


TRIAL_ACTOR_CPUS = 0.01  # Tune's actor for a trial only waits; see _trial


def _trial(config: dict, search: dict, profile: dict) -> None:
    """A Tune function trainable: one migration (no rewrite) with this trial's values.

    The migration runs in a Ray task outside the trial's placement group: Tune makes every task started
    from a trial land in the trial's group, where migrate_step's Ray Data work (profile, ingest) would
    not fit. The trial's actor holds a token CPU; ``driver_cpus`` is counted in ``max_concurrent``
    instead, as room for the driver and its data tasks. Stopping the trial ends its actor, which ends
    the task it owns and, with it, the Train run the task started. That run's placement group is then
    removed by Ray Train's cleaner actor, which finds the cluster through the state API: RAY_ADDRESS
    names this cluster for it (auto-detection fails on a machine running several Ray instances)."""
    cfg = TuneConfig.model_validate(search).trial_config(config, rt.get_context().get_trial_id())
    address = os.environ.get("RAY_ADDRESS") or ray.get_runtime_context().gcs_address
    run = ray.remote(num_cpus=0, max_retries=0)(_run_trial).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
        runtime_env={"env_vars": {"RAY_ADDRESS": address}},
    )
    ray.get(run.remote(cfg.model_dump(), _report_callback(), profile))  # the callback: made inside the Tune session


def _run_trial(cfg: dict, callback, profile: dict) -> None:
    if not is_v2_enabled():
        raise PumaError("Ray Train V2 is off in the trial processes: start the cluster with RAY_TRAIN_V2_ENABLED=1")
    cfg = MigrateConfig.model_validate(cfg)
    init_ray(cfg.ray, cfg.storage)  # Ray is up here: this only sets the S3 endpoint
    configure_ray_data()
    migrate_step(cfg, rewrite=False, callbacks=(callback,), profile=profile)


class TrialEvents(Callback):
    """The search's story on the console (one line per trial epoch and end), and
    OUTPUT/trials/<id>/stopped.json when the scheduler stops a trial early (its result says done
    before the last epoch).

    A trial is then completed (adapter saved), stopped (this marker), errored, or unfinished: ended by
    an interruption, to be resumed. Tune's own trial status cannot tell the last from the others."""

    def __init__(self, output: str, metric: str, epochs: int):
        self.output = output
        self.metric = metric
        self.epochs = epochs

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        shown = f"{self.metric}={value:.4f}" if isinstance(value, float) else ""
        say(f"tune: trial {trial.trial_id} epoch {result.get('epochs_done')}/{self.epochs} {shown}")
        if result.get("done") and result.get("epochs_done", 0) < self.epochs:
            say(f"tune: trial {trial.trial_id} stopped early by the scheduler")
            marker = {"epochs_done": result.get("epochs_done"), "training_iteration": result.get("training_iteration")}
            storage.write_json(storage.join(self.output, "trials", trial.trial_id, "stopped.json"), marker)

    def on_trial_error(self, iteration, trials, trial, **info):
        say(f"tune: trial {trial.trial_id} failed (see results.json)")


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
    inputs = migrate_inputs(cfg.base)  # before Ray starts and before anything is written
    storage.set_s3_endpoint(cfg.base.storage.s3_endpoint)
    outputs.check_output(cfg.output, "tune", inputs, cfg.output_mode == "overwrite")
    outputs.check_overlap(storage.join(cfg.storage_path, cfg.name), inputs, what="the experiment directory")
    check_migrate_inputs(cfg.base)
    init_ray(cfg.base.ray, cfg.base.storage)
    # Tune's newer console output prints its own tables even at verbose=0; the search's story is
    # TrialEvents' lines (the legacy output at verbose=0 prints nothing)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    cfg = cfg.model_copy(
        update={
            "base": _absolute(cfg.base),
            "output": os.path.abspath(cfg.output) if "://" not in cfg.output else cfg.output,
            "storage_path": cfg.storage_path if "://" in cfg.storage_path else os.path.abspath(cfg.storage_path),
        }
    )
    check_search(cfg)
    scheduler = _scheduler(cfg)
    exp_path = storage.join(cfg.storage_path, cfg.name)
    fp_uri = storage.join(cfg.output, "search.json")
    t0 = time.time()
    resume = rt.Tuner.can_restore(exp_path)
    if resume and storage.exists(fp_uri) and storage.read_json(fp_uri) != _fingerprint(cfg):
        raise PumaError(
            f"{exp_path}: holds a different search (base, search, scheduler, metric or num_samples "
            "differ); choose another name or storage_path, or delete it"
        )
    concurrent = max_concurrent(cfg, ray.cluster_resources())
    outputs.mark_output(cfg.output, "tune", cfg)
    profile = profile_users(cfg.base.data.train, cfg.base.task, storage.join(cfg.output, "profile"))
    trainable = rt.with_parameters(_trial, search=cfg.model_dump(), profile=profile)
    trainable = rt.with_resources(trainable, {"cpu": TRIAL_ACTOR_CPUS})
    if resume:
        say(f"tune: resuming the search at {exp_path}")
        tuner = rt.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        storage.write_json(fp_uri, _fingerprint(cfg))
        say(
            f"tune: {expected_trials(cfg)} trial(s), {concurrent} at a time ({trial_cpus(cfg):g} CPUs each), "
            f"scheduler {cfg.scheduler.name}, {cfg.mode} {cfg.metric} -> {exp_path}"
        )
        tuner = rt.Tuner(
            trainable,
            param_space=param_space(cfg.search),
            # the generator caps live trials (Tune ignores max_concurrent_trials beside a SearchGenerator)
            tune_config=rt.TuneConfig(
                metric=cfg.metric,
                mode=cfg.mode,
                num_samples=cfg.num_samples,
                scheduler=scheduler,
                trial_dirname_creator=_trial_dirname,
                search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent),
            ),
            run_config=rt.RunConfig(
                name=cfg.name,
                storage_path=cfg.storage_path,
                verbose=0,
                failure_config=rt.FailureConfig(max_failures=0),
                callbacks=[TrialEvents(cfg.output, cfg.metric, cfg.base.train.epochs), *callbacks],
            ),
        )
    grid = tuner.fit()
    rows = [trial_row(r, cfg) for r in grid]
    left = sum(r["status"] == "unfinished" for r in rows) + max(0, expected_trials(cfg) - len(rows))
    if left:
        raise PumaError(
            f"search interrupted with {left} of {expected_trials(cfg)} trials unfinished; "
            f"run the same command again to resume it from {exp_path}"
        )
    return summarize(cfg, rows, time.time() - t0)


def expected_trials(cfg: TuneConfig) -> int:
    """num_samples x the size of the grid (every grid entry multiplies the trials)."""
    return cfg.num_samples * math.prod(len(v) for spec in cfg.search.values() for k, v in spec.items() if k == "grid")
