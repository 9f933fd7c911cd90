"""Stage-1 step throughput vs the number of users a worker holds, in one run (one process).

One training step of a worker = batch rows -> prompt table rows (B, l*d) -> frozen LM (FrozenLM's
fast path) -> rating head loss -> backward -> the table's optimizer step + the head's AdamW step.
Measured with a table of ``--small`` users and of ``--large`` users at d = 576 (SmolLM2-135M's width;
a random 2-layer Llama of that width, the tiny tokenizer), for

- ``row-wise``: puma-ray's PromptTable (lazy AdamW: only the batch's rows are read and updated);
- ``dense``: the table as one nn.Parameter under torch's AdamW (the previous design: every row and
  both its moments are read and written at every step).

Prints samples/s per case and the large/small ratio of each (target for row-wise: >= 0.9).

    python benchmarks/stage1_step.py [--small 1000] [--large 1000000] [--steps 30] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import TYPE_CHECKING

import numpy as np
from _testbed import tiny_lm

from puma_ray.config import HeadConfig, TrainConfig
from puma_ray.datasets.synthetic import vocabulary

if TYPE_CHECKING:
    from puma_ray.llm import FrozenLM

D = 576  # SmolLM2-135M's width


def dense_table(n: int, lr: float):
    """The previous design: the whole table (``n`` rows) one parameter under torch's AdamW at ``lr``."""
    import torch

    class DenseTable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(n, D).uniform_(-0.1, 0.1))
            self.opt = torch.optim.AdamW([self.weight], lr=lr)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.weight[idx].view(-1, 1, D)

        def step(self) -> None:
            torch.nn.utils.clip_grad_norm_([self.weight], 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    return DenseTable()


def measure(lm: FrozenLM, table, n_users: int, steps: int, batch: int, texts: list[str]) -> float:
    """Samples per second of ``steps`` steps (after 3 warm-up steps)."""
    import torch

    from puma_ray.heads import build_head

    head = build_head("rating", D, HeadConfig())
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    inputs = lm.collate(texts[:batch])
    label = torch.as_tensor(rng.integers(1, 6, batch), dtype=torch.float32)
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        idx = torch.as_tensor(rng.integers(0, n_users, batch))
        loss, _ = head.loss(lm.forward(table(idx), inputs), label)
        loss.backward()
        table.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one Ray Train worker's core)")
    args = ap.parse_args()

    import torch

    from puma_ray.llm import FrozenLM
    from puma_ray.stage1 import PromptTable
    from puma_ray.trainer import lr_schedule

    torch.set_num_threads(args.threads)
    words = vocabulary()
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(words, 4)) for _ in range(args.batch)]
    train = TrainConfig(lr=1e-3, prompt_lr=3e-2, epochs=1)
    with tempfile.TemporaryDirectory() as root:
        lm = FrozenLM(tiny_lm(root, D), "rating")
        rows = {}
        for kind in ("row-wise", "dense"):
            for n in (args.small, args.large):
                if kind == "row-wise":
                    table = PromptTable(n, 1, D, 0.1, train=True)
                    table.configure(train, lr_schedule(train, 10_000))
                else:
                    table = dense_table(n, 3e-2)
                rows[(kind, n)] = measure(lm, table, n, args.steps, args.batch, texts)
                print(f"stage1_step: {kind:8s} {n:>9,} users: {rows[(kind, n)]:,.0f} samples/s", flush=True)
                del table
    result = {
        "d": D,
        "batch": args.batch,
        "threads": args.threads,
        "samples_per_s": {f"{k}/{n}": round(v, 1) for (k, n), v in rows.items()},
        "ratio_large_over_small": {
            k: round(rows[(k, args.large)] / rows[(k, args.small)], 3) for k in ("row-wise", "dense")
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
