"""The bulk rewrite: every source prompt -> adapter -> a target prompt store, plus a manifest.

Ray Data ``map_batches`` with a callable class (the adapter loads once per actor; an actor pool
of ``rewrite.actors``, ``rewrite.num_gpus`` each). The manifest (input/output URIs, row counts,
adapter fingerprint, per-file checksums) is written LAST, after the output was checked to hold
every input user exactly once: a store without a manifest is visibly incomplete.
"""

from __future__ import annotations

import hashlib
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from puma_ray import storage
from puma_ray.adapter import load_adapter
from puma_ray.config import RewriteConfig, RewriteJobConfig
from puma_ray.errors import PumaError, user_errors
from puma_ray.schema import StoreMeta, prompt_table


class Rewriter:
    """map_batches callable: (user_id, prompt (l*d_src)) rows -> (user_id, prompt (l*d_tgt)) rows."""

    def __init__(self, adapter_uri: str, meta: dict, threads: int = 1, num_gpus: float = 0):
        from puma_ray.runtime import actor_device

        torch.set_num_threads(threads)
        self.device = actor_device(num_gpus)
        adapter, info = load_adapter(adapter_uri)
        self.adapter = adapter.to(self.device)
        self.meta = StoreMeta(**meta)
        self.l, self.d_in = info["prompt_length"], info["arch"]["d_in"]

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        flat = np.array(batch.column("prompt").combine_chunks().flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        if flat.size != batch.num_rows * self.l * self.d_in:
            raise PumaError(f"source prompts have width {flat.size // max(batch.num_rows, 1)}, the adapter takes l*d = {self.l * self.d_in}")
        x = torch.from_numpy(flat).view(batch.num_rows, self.l, self.d_in)
        bad = ~torch.isfinite(x).flatten(1).all(1)
        if bad.any():
            users = np.asarray(batch.column("user_id").to_pylist())[bad.numpy()][:3].tolist()
            raise PumaError(f"{int(bad.sum())} source prompt(s) contain NaN or Inf, e.g. users {users}")
        y = self.adapter(x.to(self.device)).reshape(batch.num_rows, -1).cpu().numpy()  # (B, l, d_src) -> (B, l*d_tgt)
        return prompt_table(self.meta, batch.column("user_id"), y)


def _file_entry(uri: str) -> dict:
    data = storage.read_bytes(uri)
    rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
    return {"uri": uri, "rows": rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def rewrite_store(source_uri: str, adapter_uri: str, meta: StoreMeta, out_uri: str, rcfg: RewriteConfig) -> dict:
    """Rewrite every prompt of ``source_uri`` into ``out_uri/prompts``; write ``out_uri/manifest.json`` last."""
    import ray.data

    t0 = time.time()
    manifest_uri, store_uri = storage.join(out_uri, "manifest.json"), storage.join(out_uri, "prompts")
    if storage.exists(manifest_uri):
        storage.delete_file(manifest_uri)  # from here on the old store is visibly incomplete
    storage.delete_dir(store_uri)
    adapter_info = storage.read_json(storage.join(adapter_uri, "adapter.json"))
    source = storage.ray_read_parquet(source_uri)
    n_in = source.count()
    print(f"rewrite: {n_in} prompts {source_uri} -> {store_uri}", file=sys.stderr)
    out = source.map_batches(
        Rewriter, fn_constructor_kwargs={"adapter_uri": adapter_uri, "meta": meta.__dict__, "threads": max(1, int(rcfg.cpus_per_actor)),
                               "num_gpus": rcfg.num_gpus},
        batch_size=rcfg.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=rcfg.actors),
        num_gpus=rcfg.num_gpus, num_cpus=rcfg.cpus_per_actor,
    )
    fs, path = storage.resolve(store_uri)
    out.write_parquet(path, filesystem=fs)
    files = [_file_entry(u) for u in storage.list_files(store_uri, ".parquet")]
    ids = storage.read_table(store_uri, columns=["user_id"]).column("user_id")
    n_out, n_unique = len(ids), pc.count_distinct(ids).as_py()
    if n_out != n_in or n_unique != n_in:
        raise PumaError(f"{store_uri}: rewrite wrote {n_out} rows ({n_unique} distinct users) for {n_in} input users")
    manifest = {
        "input": {"uri": source_uri, "rows": n_in}, "output": {"uri": store_uri, "rows": n_out, "files": files},
        "adapter": {"uri": adapter_uri, "fingerprint": adapter_info["fingerprint"]}, "target": meta.__dict__,
        "wall_s": time.time() - t0,
    }
    storage.write_json(manifest_uri, manifest)
    print(f"rewrite: {n_out} users exactly once in {len(files)} file(s), {manifest['wall_s']:.1f} s", file=sys.stderr)
    return manifest


@user_errors
def rewrite(cfg: RewriteJobConfig) -> dict:
    """`puma-ray rewrite` entry: check the pairing, then rewrite (joining several sources first)."""
    from puma_ray.llm import DEFAULT_TEMPLATE, model_info
    from puma_ray.runtime import init_ray
    from puma_ray.sources import join_sources

    init_ray(cfg.ray, cfg.storage)
    fingerprint, d = model_info(cfg.model.path)
    joined = join_sources(cfg.sources, storage.join(cfg.output, "source_joined"))
    _, info = load_adapter(cfg.adapter, [m.model_fingerprint for m in joined.metas], fingerprint)
    if info["arch"]["d_in"] != joined.meta.hidden_size:
        raise PumaError(f"{cfg.adapter}: adapter takes width {info['arch']['d_in']}, source store(s) have {joined.meta.hidden_size}")
    meta = StoreMeta(model=cfg.model.path, model_fingerprint=fingerprint, hidden_size=d, prompt_length=joined.meta.prompt_length,
                     template=cfg.template or DEFAULT_TEMPLATE[cfg.task], stage="rewrite")
    return rewrite_store(joined.uri, cfg.adapter, meta, cfg.output, cfg.rewrite)
