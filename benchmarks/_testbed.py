"""The test bed the study benchmarks share (selection_study, cold_start, progressive_prompts): a
rating data set (MovieLens-100k from the recbole wheel, or the quickstart's synthetic data) and
the quickstart's tiny random-init LMs (Llama d=64 -> Qwen2 d=96, :func:`tiny_pair`; real_quality
too), on a local Ray. Also :func:`tiny_lm`: a random 2-layer Llama of any width (stage1_step,
train_throughput), and :func:`epoch_log`: a Ray Train callback keeping each epoch's report
(train_throughput, template_throughput).

Importing this module is light (no torch, no Ray): a benchmark adds its options
(:func:`add_options`) and parses its arguments before anything heavy loads, so its ``--help`` is
quick; the functions that build the test bed import what they need."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from puma_ray import config as C
from puma_ray import storage
from puma_ray.datasets.synthetic import synthesize

MODELS = "tiny Llama d=64 -> Qwen2 d=96"


@dataclass
class TestBed:
    data: str  # the interactions directory (train/, valid/)
    splits: dict[str, str]  # "train" / "valid" -> URI
    source: str  # source model dir
    target: str  # target model dir
    out: str  # this run's output directory (emptied)


def add_options(ap: argparse.ArgumentParser, work: str, data: str = "movielens") -> None:
    """The test bed's options on ``ap``: ``--data`` (default ``data``), ``--users``, ``--workers``,
    ``--work`` (default ``work``) and ``--cache``."""
    ap.add_argument("--data", choices=["movielens", "synthetic"], default=data)
    ap.add_argument("--users", type=int, default=1000, help="synthetic: users")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers per run")
    ap.add_argument("--work", default=work)
    ap.add_argument("--cache", default=os.path.expanduser(os.environ.get("PUMA_MODEL_CACHE", C.MODEL_CACHE)))


def test_bed(args: argparse.Namespace) -> TestBed:
    """The data (MovieLens-100k imported once into ``args.cache``, or synthesized once under
    ``args.work``), the two tiny models, an empty ``args.work/run-<data>`` and a local Ray."""
    from puma_ray.datasets.packaged import movielens_100k
    from puma_ray.runtime import init_ray

    if args.data == "movielens":
        data = movielens_100k(args.cache)
    else:
        data = os.path.join(args.work, f"synthetic-{args.users}")
        if not storage.exists(os.path.join(data, "meta.json")):
            synthesize(data, users=args.users, task="rating", seed=0)
    source, target = tiny_pair(args.work)
    out = os.path.join(args.work, f"run-{args.data}")
    storage.delete_dir(out)
    init_ray(C.RayConfig())
    splits = {s: os.path.join(data, s) for s in ("train", "valid")}
    return TestBed(data, splits, source, target, out)


def tiny_pair(work: str) -> tuple[str, str]:
    """(source, target) model directories: the quickstart's tiny pair (:data:`MODELS`), built once
    under ``work/models``."""
    from puma_ray.models import build_tiny
    from puma_ray.quickstart import DEFAULTS

    built = build_tiny(os.path.join(work, "models"), [DEFAULTS["source"], DEFAULTS["target"]])
    return built[DEFAULTS["source"]], built[DEFAULTS["target"]]


def tiny_lm(root: str, d: int) -> str:
    """A random 2-layer Llama of width ``d`` (heads of 64) saved with save_pretrained (+ the tiny tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from puma_ray.models import build_tokenizer

    tok = build_tokenizer()
    heads = max(1, d // 64)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads // 3 if heads % 3 == 0 else heads,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def epoch_log(path: str, keys: tuple[str, ...]):
    """A Ray Train callback (on the controller) appending each epoch's report (its ``keys``) to
    ``path``, one JSON object a line."""
    import ray.train

    class EpochLog(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(json.dumps({k: metrics[0][k] for k in keys}) + "\n")

    return EpochLog()
