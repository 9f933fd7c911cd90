"""Where code runs: Ray initialisation for the driver, device/threads/DeepSpeed setup for workers.

Device choice lives here and only here, so CPU tests run the same code paths as GPU clusters.
"""

from __future__ import annotations

import logging
import os

import ray
import ray.data
import ray.train.torch
import torch

from puma_ray import console, storage
from puma_ray.console import say
from puma_ray.errors import PumaError

CORES = "puma_local_cores"  # resource name: the cores of a local Ray that puma-ray started


def init_ray(ray_cfg, storage_cfg=None) -> None:
    """Start a local Ray (or join ``ray_cfg.address``) once per process.

    Worker processes' output (Ray Train, Ray Data, DeepSpeed) stays in the Ray session's log files,
    named here once, unless ``ray_cfg.verbose`` (``--verbose``) forwards it to this terminal."""
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
        context = ray.init(num_cpus=ray_cfg.num_cpus or max(4, cores), resources={CORES: cores}, **quiet)
        where = os.path.join(context.address_info["session_dir"], "logs")
    quiet_ray_data()
    if not ray_cfg.verbose:
        native = f"; Ray's own messages in {console.native_log}" if console.native_log else ""
        say(f"ray: worker logs (Ray Train, Ray Data, DeepSpeed) are in {where}{native}; --verbose shows them here")


def quiet_ray_data() -> None:
    """Ray Data's per-operator progress bars and INFO logs drown the story; they stay in its log file."""
    ray.data.DataContext.get_current().enable_progress_bars = False
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
    if pool.num_gpus:
        n = have.get("GPU", 0) / pool.num_gpus
    else:
        n = min(have.get("CPU", 1), have.get(CORES, float("inf"))) / pool.cpus_per_actor
    return max(1, int(n))


def setup_worker(scaling) -> torch.device:
    """Inside a Ray Train worker: pick the device, DeepSpeed accelerator and thread count.

    ``scaling``: config.ScalingConfig. Call before importing deepspeed."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    if scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        os.environ["DS_ACCELERATOR"] = "cpu"
        device = torch.device("cpu")
    torch.set_num_threads(int(scaling.torch_threads or max(1, round(scaling.cpus_per_worker))))
    return device


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
