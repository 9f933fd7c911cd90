"""Source prompt stores of a migration: one store, or several joined on user_id (aggregation),
streamed through Ray Data (no process holds a store).

Aggregated [A; B] prompts are concatenated per prompt position: (l, d_A) and (l, d_B) ->
(l, d_A + d_B). Users missing from any source are counted and reported, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from ray.data import SaveMode

from puma_ray import storage
from puma_ray.console import say
from puma_ray.data import distinct, shuffle_partitions
from puma_ray.errors import PumaError
from puma_ray.schema import StoreMeta, check_store_input, decode_prompts, prompt_table, read_store_meta


@dataclass
class Sources:
    uri: str  # a single prompt store holding the (joined) source prompts
    meta: StoreMeta  # of that store (hidden_size = the adapter's input width)
    metas: list[StoreMeta]  # of each source, in concatenation order
    missing: dict[str, int] = field(default_factory=dict)  # source URI -> users of other sources it lacks


def _concat(batch: pa.Table, meta: StoreMeta, widths: list[int]) -> pa.Table:
    """Joined rows (user_id, p0, p1, ...) -> store rows with prompts concatenated per position."""
    n, l = batch.num_rows, meta.prompt_length
    parts = [decode_prompts(batch, l * d, column=f"p{i}").reshape(n, l, d) for i, d in enumerate(widths)]
    return prompt_table(meta, batch.column("user_id").cast(pa.string()), np.concatenate(parts, axis=-1).reshape(n, -1))


def source_metas(uris: list[str]) -> list[StoreMeta]:
    """Each source store's metadata, the store checked from its footers (schema.check_store_input:
    shape, users, truncated files, infinite values); several sources must share one prompt length.
    Before any work: no Ray, no prompt read."""
    metas = [check_store_input(u) for u in uris]
    if len({m.prompt_length for m in metas}) != 1:
        raise PumaError(
            f"aggregated sources need one prompt length l, got {[m.prompt_length for m in metas]} for {uris}"
        )
    return metas


def join_sources(uris: list[str], joined_uri: str) -> Sources:
    """One source: used as is. Several: a streamed Ray Data inner join on user_id into ``joined_uri``."""
    metas = [read_store_meta(u) for u in uris]
    if len(uris) == 1:
        return Sources(uris[0], metas[0], metas)
    if len({m.prompt_length for m in metas}) != 1:
        raise PumaError(
            f"aggregated sources need one prompt length l, got {[m.prompt_length for m in metas]} for {uris}"
        )
    stores = [storage.ray_read_parquet(u, columns=["user_id", "prompt"]) for u in uris]
    counts = [ds.count() for ds in stores]
    every = stores[0].select_columns(["user_id"]).union(*[ds.select_columns(["user_id"]) for ds in stores[1:]])
    n_every = distinct(every, ["user_id"])
    joined = stores[0].rename_columns({"prompt": "p0"})
    for i, ds in enumerate(stores[1:], 1):
        other = ds.rename_columns({"prompt": f"p{i}"})
        joined = joined.join(other, join_type="inner", num_partitions=shuffle_partitions(max(counts)), on=("user_id",))
    meta = StoreMeta(
        model="+".join(m.model for m in metas),
        model_fingerprint="+".join(m.model_fingerprint for m in metas),
        hidden_size=sum(m.hidden_size for m in metas),
        prompt_length=metas[0].prompt_length,
        template=metas[0].template,
        template_hash=metas[0].template_hash,
        stage="aggregate",
    )
    fs, path = storage.resolve(joined_uri)
    joined.map_batches(
        _concat, fn_kwargs={"meta": meta, "widths": [m.hidden_size for m in metas]}, batch_format="pyarrow"
    ).write_parquet(path, filesystem=fs, mode=SaveMode.OVERWRITE)
    n_common = (
        storage.ray_read_parquet(joined_uri, columns=["user_id"]).count()
        if storage.list_files(joined_uri, ".parquet")
        else 0
    )
    missing = {u: n_every - n for u, n in zip(uris, counts)}
    if n_common == 0:
        raise PumaError(f"aggregated sources {uris} share no user")
    if any(missing.values()):
        say(
            f"aggregate: {n_every - n_common} user(s) lack a prompt in some source and are skipped "
            f"(missing per source: {missing})"
        )
    return Sources(joined_uri, meta, metas, missing)
