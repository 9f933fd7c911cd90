"""Helpers shared by the scale benchmarks (rewrite_scale, rewrite_limits, select_scale).

- :class:`TreeMemory`: samples RSS and PSS of this process and every descendant (a local Ray's
  GCS, raylet and workers are all descendants of the driver that started it) every 0.5 s.
- :func:`make_store`: a random prompt store, streamed in chunks through ``schema.write_prompt_store``.
- :func:`make_adapter`: a random MigrationAdapter saved with ``save_adapter``, its pairing matching the store.
- :func:`in_child`: run one measurement in a fresh Python process (own peak RSS, own Ray) and get its JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import threading
import time

MB = 1024 * 1024


def _kind(p) -> str:
    try:
        cmd = " ".join(p.cmdline())
        name = p.name()
    except Exception:
        return "gone"
    if name.startswith("ray::") or "default_worker.py" in cmd:
        return "worker"
    return "system"


class TreeMemory:
    """Peak memory of the driver, the Ray workers and the whole process tree, sampled every ``interval`` s,
    and the CPU seconds the tree used meanwhile.

    RSS counts shared pages (the object store's shared memory) once per process that touches them;
    PSS splits them between the processes, so the tree's PSS sum is what the box really holds.
    CPU seconds (user + system of every process seen in the tree, at its last sample, minus what
    it had used at the start; a process that exits loses at most one interval) do not depend on
    how busy the rest of the machine is, unlike wall time. ``memory=False`` samples CPU times only:
    reading every process's memory maps costs the sampler ~0.1 CPU-s per second here, which a
    CPU-second comparison would charge to the code measured.
    """

    def __init__(self, interval: float = 0.5, memory: bool = True):
        import psutil

        self.interval, self.me, self.memory = interval, psutil.Process(), memory
        self.peak = {
            "driver_rss_mb": 0.0,
            "worker_rss_max_mb": 0.0,
            "workers_rss_sum_mb": 0.0,
            "workers_pss_sum_mb": 0.0,
            "ray_system_rss_mb": 0.0,
            "tree_rss_sum_mb": 0.0,
            "tree_pss_sum_mb": 0.0,
            "workers_seen": 0,
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._seen: set[int] = set()
        self._cpu_last: dict[int, float] = {}  # pid -> user + system CPU seconds at its last sample

    def _cpu(self) -> float:
        for p in [self.me] + self.me.children(recursive=True):
            try:
                t = p.cpu_times()
            except Exception:
                continue
            self._cpu_last[p.pid] = t.user + t.system
        return sum(self._cpu_last.values())

    def _sample(self) -> None:
        self._cpu()
        if not self.memory:
            return
        procs = [self.me] + self.me.children(recursive=True)
        w_rss, w_pss, w_max, sys_rss, t_rss, t_pss = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        for p in procs:
            try:
                info = p.memory_full_info()
            except Exception:
                continue
            rss, pss = info.rss / MB, getattr(info, "pss", info.rss) / MB
            t_rss, t_pss = t_rss + rss, t_pss + pss
            if p.pid == self.me.pid:
                self.peak["driver_rss_mb"] = max(self.peak["driver_rss_mb"], rss)
            elif _kind(p) == "worker":
                self._seen.add(p.pid)
                w_rss, w_pss, w_max = w_rss + rss, w_pss + pss, max(w_max, rss)
            else:
                sys_rss += rss
        for k, v in (
            ("worker_rss_max_mb", w_max),
            ("workers_rss_sum_mb", w_rss),
            ("workers_pss_sum_mb", w_pss),
            ("ray_system_rss_mb", sys_rss),
            ("tree_rss_sum_mb", t_rss),
            ("tree_pss_sum_mb", t_pss),
        ):
            self.peak[k] = max(self.peak[k], v)
        self.peak["workers_seen"] = len(self._seen)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self._cpu0 = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.peak["tree_cpu_s"] = self._cpu() - self._cpu0
        # The driver's exact peak (not sampled): ru_maxrss is in KiB on Linux.
        self.peak["driver_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.peak = {k: round(v, 1) if isinstance(v, float) else v for k, v in self.peak.items()}


def source_meta(d: int, l: int = 1, name: str | None = None):
    from puma_ray.schema import StoreMeta

    name = name or f"bench-source-d{d}"
    return StoreMeta(
        model=name,
        model_fingerprint=hashlib.sha256(name.encode()).hexdigest()[:16],
        hidden_size=d,
        prompt_length=l,
        template="rating_v1",
        stage="prompts",
    )


def target_meta(d: int, l: int = 1):
    m = source_meta(d, l, f"bench-target-d{d}")
    return type(m)(**{**m.__dict__, "stage": "rewrite"})


def make_store(uri: str, users: int, d: int, l: int = 1, seed: int = 0, chunk: int = 20_000, meta=None) -> dict:
    """A random prompt store of ``users`` users (ids u0000000...), ``chunk`` users per part file."""
    import numpy as np

    from puma_ray import storage
    from puma_ray.schema import write_prompt_store

    meta = meta or source_meta(d, l)
    storage.delete_dir(uri)
    t0 = time.time()
    for i, u0 in enumerate(range(0, users, chunk)):
        m = min(chunk, users - u0)
        rng = np.random.default_rng([seed, i])
        prompts = rng.standard_normal((m, l * d), dtype=np.float32)
        prompts *= 0.1
        write_prompt_store(
            storage.join(uri, f"part-{i:05d}.parquet"), meta, [f"u{u:07d}" for u in range(u0, u0 + m)], prompts
        )
    return {
        "uri": uri,
        "users": users,
        "width": l * d,
        "files": -(-users // chunk),
        "wall_s": round(time.time() - t0, 1),
    }


def make_adapter(uri: str, src_meta, tgt_meta, width: int, depth: int = 1, seed: int = 0) -> str:
    import torch

    from puma_ray.adapter import MigrationAdapter, save_adapter

    torch.manual_seed(seed)
    adapter = MigrationAdapter(src_meta.hidden_size, tgt_meta.hidden_size, width=width, depth=depth)
    side = lambda m: {"model": m.model, "model_fingerprint": m.model_fingerprint, "hidden_size": m.hidden_size}  # noqa: E731
    save_adapter(uri, adapter, [side(src_meta)], side(tgt_meta), src_meta.prompt_length, src_meta.template)
    return uri


def du_mb(path: str) -> float:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:
                pass
    return round(total / MB, 1)


def in_child(script: str, args: list[str], timeout: float | None = None) -> dict:
    """Run ``python script --child args...`` and return the JSON it prints on its last stdout line."""
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(
        [sys.executable, script, "--child", *args], stdout=subprocess.PIPE, text=True, env=env, timeout=timeout
    )
    lines = [x for x in run.stdout.splitlines() if x.startswith("{")]
    if run.returncode != 0 or not lines:
        raise SystemExit(f"{script} {args}: child failed (exit {run.returncode}); its stderr is above")
    return json.loads(lines[-1])


def table(rows: list[dict], cols: list[str]) -> str:
    """A small Markdown table of ``rows`` (dicts) over ``cols``."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def child_args(ap) -> None:
    """The hidden arguments a benchmark's measured child process is started with (see in_child)."""
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("spec", nargs="?", help=argparse.SUPPRESS)


def run_child(args, child) -> bool:
    """In a child process: run ``child(spec)``, print its JSON result, return True (the caller returns)."""
    if args.child:
        print(json.dumps(child(json.loads(args.spec))))
    return bool(args.child)
