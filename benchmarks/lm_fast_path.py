"""FrozenLM's fast path (template prefix KV reused, answer-token logits only) against the model's own
full forward, in one run: forward + backward into the prompts, samples/s, per model x template.

Models: a tiny Llama (d = 64, the quickstart's), and 2-layer cuts of the real SmolLM2-135M (vocab
49k) and Gemma-3-270M (vocab 262k) when their imports are in the model cache (``puma-ray models
fetch`` + ``models import --layers 2``, or a run of tests/test_real_models.py). Templates: rating
and CTR (CTR rows carry a 5-title click history). Also reports padded tokens / real tokens of a
batch of random rows against the same rows grouped by length (what trainer.epoch_batches does).

    python benchmarks/lm_fast_path.py [--batch 32] [--steps 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import TYPE_CHECKING

import numpy as np

from puma_ray import config as C
from puma_ray.datasets.synthetic import vocabulary

if TYPE_CHECKING:
    from puma_ray.llm import FrozenLM


def rows(n: int, seed: int) -> tuple[list[str], list[list[str]]]:
    rng = np.random.default_rng(seed)
    words = vocabulary()
    titles = [" ".join(rng.choice(words, rng.integers(2, 9))) for _ in range(n)]
    history = [[" ".join(rng.choice(words, rng.integers(2, 9))) for _ in range(5)] for _ in range(n)]
    return titles, history


def samples_per_s(lm: FrozenLM, task: str, batch: int, steps: int) -> float:
    import torch

    titles, history = rows(batch, 0)
    inputs = lm.collate(titles, history if task == "ctr" else None)
    prompts = torch.zeros(batch, 1, lm.hidden_size, requires_grad=True)
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        lm.forward(prompts, inputs).answer_logits.float().sum().backward()
    return steps * batch / (time.perf_counter() - t0)


def padding(lm: FrozenLM, n: int, batch: int, groups: int) -> dict:
    """Padded / real tokens over ``n`` random rows in batches of ``batch``: in arrival order, and with
    ``groups`` batches at a time sorted by length before being cut (trainer.epoch_batches' grouping)."""
    titles, _ = rows(n, 1)
    lengths = np.array(lm.row_lengths(titles))

    def ratio(order: np.ndarray) -> float:
        chunks = [lengths[order[s : s + batch]] for s in range(0, n, batch)]
        return sum(c.max() * len(c) for c in chunks) / lengths.sum()

    arrival = np.arange(n)
    grouped = np.concatenate(
        [s + np.argsort(lengths[s : s + batch * groups], kind="stable") for s in range(0, n, batch * groups)]
    )
    return {"arrival": round(ratio(arrival), 3), "grouped": round(ratio(grouped), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=os.path.expanduser(os.environ.get("PUMA_MODEL_CACHE", C.MODEL_CACHE)))
    args = ap.parse_args()

    import torch

    from puma_ray.llm import FrozenLM
    from puma_ray.models import build_tiny

    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        models = {"tiny llama d=64": build_tiny(root, ["llama"])["llama"]}
        for name in ("smollm2-135m", "gemma3-270m"):
            cut = os.path.join(args.cache, "imported", f"{name}-layers2")
            if os.path.exists(os.path.join(cut, "puma_import.json")):
                models[f"{name} 2-layer cut"] = cut
        for label, path in models.items():
            for task in ("rating", "ctr"):
                speed = {}
                for fast in (False, True):
                    lm = FrozenLM(path, task, fast=fast)
                    speed["fast" if fast else "full"] = samples_per_s(lm, task, args.batch, args.steps)
                    del lm
                results[f"{label} / {task}"] = {
                    **{k: round(v, 1) for k, v in speed.items()},
                    "speedup": round(speed["fast"] / speed["full"], 2),
                }
                print(f"lm_fast_path: {label:28s} {task:6s} {results[f'{label} / {task}']}", flush=True)
            lm = FrozenLM(path, "rating")
            results[f"{label} / padded per real token (256 rows, batch 32, 8 batches grouped)"] = padding(
                lm, 256, 32, 8
            )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
