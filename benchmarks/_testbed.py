"""The test bed the study benchmarks share (selection_study, cold_start, progressive_prompts): a
rating data set (MovieLens-100k from the recbole wheel, or the quickstart's synthetic data) and
the quickstart's tiny random-init LMs (Llama d=64 -> Qwen2 d=96), on a local Ray."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from puma_ray import config as C
from puma_ray import storage
from puma_ray.datasets.packaged import movielens_100k
from puma_ray.datasets.synthetic import synthesize
from puma_ray.models import build_tiny
from puma_ray.quickstart import DEFAULTS
from puma_ray.runtime import init_ray

MODELS = "tiny Llama d=64 -> Qwen2 d=96"


@dataclass
class TestBed:
    data: str  # the interactions directory (train/, valid/)
    splits: dict[str, str]  # "train" / "valid" -> URI
    source: str  # source model dir
    target: str  # target model dir
    out: str  # this run's output directory (emptied)


def add_options(ap: argparse.ArgumentParser, work: str, data: str = "movielens") -> None:
    ap.add_argument("--data", choices=["movielens", "synthetic"], default=data)
    ap.add_argument("--users", type=int, default=1000, help="synthetic: users")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers per run")
    ap.add_argument("--work", default=work)
    ap.add_argument("--cache", default=os.path.expanduser(os.environ.get("PUMA_MODEL_CACHE", C.MODEL_CACHE)))


def test_bed(args: argparse.Namespace) -> TestBed:
    """The data (MovieLens-100k imported once into ``args.cache``, or synthesized once under
    ``args.work``), the two tiny models, an empty ``args.work/run-<data>`` and a local Ray."""
    if args.data == "movielens":
        data = movielens_100k(args.cache)
    else:
        data = os.path.join(args.work, f"synthetic-{args.users}")
        if not storage.exists(os.path.join(data, "meta.json")):
            synthesize(data, users=args.users, task="rating", seed=0)
    models = build_tiny(os.path.join(args.work, "models"), [DEFAULTS["source"], DEFAULTS["target"]])
    out = os.path.join(args.work, f"run-{args.data}")
    storage.delete_dir(out)
    init_ray(C.RayConfig())
    splits = {s: os.path.join(data, s) for s in ("train", "valid")}
    return TestBed(data, splits, models[DEFAULTS["source"]], models[DEFAULTS["target"]], out)
