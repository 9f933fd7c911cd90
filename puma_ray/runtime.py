"""Where code runs: Ray initialisation for the driver, device/threads/DeepSpeed setup for workers.

Device choice lives here and only here, so CPU tests run the same code paths as GPU clusters.
"""

from __future__ import annotations

import importlib
import logging
import os

import ray
import ray.data
import torch

from puma_ray import console, storage
from puma_ray.console import say
from puma_ray.errors import PumaError

CORES = "puma_local_cores"  # resource name: the cores of a local Ray that puma-ray started


def init_ray(ray_cfg, storage_cfg=None) -> None:
    """Start a local Ray (or join ``ray_cfg.address``) once per process.

    Worker processes' output (Ray Train, Ray Data, DeepSpeed) stays in the Ray session's log files,
    named here once, unless ``ray_cfg.verbose`` (``--verbose``) forwards it to this terminal; in the
    CLI's terminal session, so do this process's Ray and Ray Data log lines (console.ray_logs_to_file)."""
    if storage_cfg is not None:
        storage.set_s3_endpoint(storage_cfg.s3_endpoint)
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    quiet = {"logging_level": logging.ERROR, "log_to_driver": ray_cfg.verbose}
    if ray_cfg.address or os.environ.get("RAY_ADDRESS"):  # a cluster, e.g. the one a Ray job runs on
        context = ray.init(address=ray_cfg.address, **quiet)
        where = "the cluster's nodes (`ray logs`, the dashboard)"
    else:
        # Locally, logical CPUs beyond the cores let Ray Data's read tasks run beside the train workers;
        # the real core count is advertised as a resource so CPU-bound pools (the rewrite) do not
        # oversubscribe the machine.
        cores = os.cpu_count() or 1
        # Ray Train's controller acts on workers' reports (an epoch's checkpoint, the end of the run) at
        # its next poll: every 2 s by default, which costs small runs seconds each; 0.25 s here
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
        context = ray.init(num_cpus=ray_cfg.num_cpus or max(4, cores), resources={CORES: cores}, **quiet)
        where = os.path.join(context.address_info["session_dir"], "logs")
    configure_ray_data()
    if not ray_cfg.verbose:
        console.ray_logs_to_file()  # e.g. Ray Data's ERROR lines when a task raises on a user mistake
        native = f"; Ray's own messages in {console.native_log}" if console.native_log else ""
        say(f"ray: worker logs (Ray Train, Ray Data, DeepSpeed) are in {where}{native}; --verbose shows them here")


def configure_ray_data() -> None:
    """Ray Data settings of every process that plans datasets (the driver, a Tune trial's task).

    Its per-operator progress bars and INFO logs drown the story; they stay in its log file. Parquet
    is read through Ray Data's V1 datasource: Ray 2.60's default V2 path lists files in a task whose
    thread pool takes seconds to shut down (measured here: 3-5 s per read_parquet of one small file,
    0.13 s with V1), and a migration reads Parquet dozens of times."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.use_datasource_v2 = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def actor_pool_size(pool, section: str) -> int:
    """Actors of a Ray Data pool configured by ``pool`` (a config.ActorPoolConfig, e.g. the
    ``section`` "rewrite" or "scoring"): ``pool.actors``, else as many as the cluster's GPUs (num_gpus > 0)
    or CPUs hold (a local Ray: its real cores, which its logical CPUs overcommit). GPU actors on a
    cluster without enough GPUs are refused here instead of waiting forever."""
    have = ray.cluster_resources()
    if pool.num_gpus and have.get("GPU", 0) < pool.num_gpus:
        raise PumaError(
            f"{section}.num_gpus is {pool.num_gpus} but the Ray cluster has {have.get('GPU', 0):g} GPUs; "
            f"set {section}.num_gpus=0 on a CPU cluster"
        )
    if pool.actors:
        return pool.actors
    n = have.get("GPU", 0) / pool.num_gpus if pool.num_gpus else cores() / pool.cpus_per_actor
    return max(1, int(n))


def cores() -> int:
    """CPU cores of the Ray cluster: its CPUs, or on a local Ray that puma-ray started its real cores
    (the CORES resource; its logical CPUs overcommit them, see :func:`init_ray`)."""
    have = ray.cluster_resources()
    return max(1, int(min(have.get("CPU", 1), have.get(CORES, float("inf")))))


def task_concurrency(tasks: int) -> int | None:
    """Concurrent tasks of a CPU-bound Ray Data pass of ``tasks`` tasks (a read's ``concurrency=``, a
    map's ``data.task_pool``): on a local Ray that puma-ray started, its real cores when there are
    more tasks than that (a task beyond them only starts one more worker process, seconds of
    imports, and competes for the same cores); else None: no cap (no more tasks than cores, where
    Ray warns of an unused cap, or a cluster, whose autoscaler may add nodes)."""
    n = cores()
    return n if CORES in ray.cluster_resources() and tasks > n else None


def actor_pool(pool, section: str, limit: int | None = None, eager: bool = False) -> ray.data.ActorPoolStrategy:
    """Ray Data's actor pool for ``pool`` (a config.ActorPoolConfig), up to :func:`actor_pool_size`
    actors (and ``limit``, e.g. the work units). Autoscaling by default: it starts one actor and adds
    actors while inputs wait, so a small input is done by the first actor (starting the others, a
    process each importing torch and loading the LM, costs seconds). ``eager``: the whole pool from
    the start, for an input long enough that every actor would be added anyway (waiting for inputs
    to queue up before each one starts would cost its start-up time at full load)."""
    size = max(1, min(actor_pool_size(pool, section), limit) if limit else actor_pool_size(pool, section))
    return ray.data.ActorPoolStrategy(min_size=size if eager else 1, max_size=size)


def setup_worker(scaling) -> torch.device:
    """Inside a Ray Train worker: pick the device, DeepSpeed accelerator and thread count.

    ``scaling``: config.ScalingConfig. Call before importing deepspeed."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    if scaling.use_gpu:
        import ray.train.torch  # noqa: PLC0415 -- 0.26 s of every rewrite/scoring actor's start-up otherwise

        os.environ.setdefault("DS_ACCELERATOR", "cuda")
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        os.environ["DS_ACCELERATOR"] = "cpu"
        device = torch.device("cpu")
    torch.set_num_threads(int(scaling.torch_threads or max(1, round(scaling.cpus_per_worker))))
    return device


def skip_inference_comm_op() -> None:
    """Inside a worker, after importing deepspeed: on CPU, DeepSpeed's torch backend JIT-compiles a
    shared-memory C++ op when it starts (about a minute with g++ on a machine's first run, then a
    .so load per worker). Only ``deepspeed.comm.inference_all_reduce`` uses it; training's
    all-reduces go through torch.distributed (gloo), so the op is not built."""
    backend = importlib.import_module("deepspeed.comm.torch")  # (deepspeed.comm's own name "torch" is torch)
    if hasattr(backend, "build_shm_op"):
        backend.build_shm_op = lambda: None


def actor_device(num_gpus: float) -> torch.device:
    """Device of a Ray Data actor: its GPU when it was given one, else the CPU."""
    return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")


def deepspeed_config(scaling, train, dtype: str) -> dict:
    """The DeepSpeed engine config (``scaling``: config.ScalingConfig, ``train``: config.TrainConfig):
    ZeRO stage from config, bf16 only on GPU, fp16 always off (a torch optimizer is passed in, so
    ZeRO must allow it)."""
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": scaling.zero_stage},
        "bf16": {"enabled": bool(scaling.use_gpu and dtype == "bfloat16")},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
