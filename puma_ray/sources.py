"""Source prompt stores of a migration: one store, or several joined on user_id (aggregation).

Aggregated [A; B] prompts are concatenated per prompt position: (l, d_A) and (l, d_B) ->
(l, d_A + d_B). Users missing from any source are counted and reported, never silently dropped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from puma_ray import storage
from puma_ray.errors import PumaError
from puma_ray.schema import StoreMeta, read_prompt_store, read_store_meta, write_prompt_store


@dataclass
class Sources:
    uri: str  # a single prompt store holding the (joined) source prompts
    meta: StoreMeta  # of that store (hidden_size = the adapter's input width)
    metas: list[StoreMeta]  # of each source, in concatenation order
    missing: dict[str, int] = field(default_factory=dict)  # source URI -> users of other sources it lacks


def join_sources(uris: list[str], joined_uri: str) -> Sources:
    """One source: used as is. Several: inner-join on user_id into ``joined_uri``."""
    metas = [read_store_meta(u) for u in uris]
    if len(uris) == 1:
        return Sources(uris[0], metas[0], metas)
    if len({m.prompt_length for m in metas}) != 1:
        raise PumaError(f"aggregated sources need one prompt length l, got {[m.prompt_length for m in metas]} for {uris}")
    stores = [read_prompt_store(u) for u in uris]
    common = set.intersection(*(set(ids) for _, ids, _ in stores))
    every = set.union(*(set(ids) for _, ids, _ in stores))
    missing = {u: len(every) - len(set(ids)) for u, (_, ids, _) in zip(uris, stores)}
    if not common:
        raise PumaError(f"aggregated sources {uris} share no user")
    if any(missing.values()):
        print(f"aggregate: {len(every) - len(common)} user(s) lack a prompt in some source and are skipped "
              f"(missing per source: {missing})", file=sys.stderr)
    ids = sorted(common)
    l = metas[0].prompt_length
    parts = []
    for (_, sid, p), m in zip(stores, metas):
        pos = {u: i for i, u in enumerate(sid)}
        parts.append(p[[pos[u] for u in ids]].reshape(len(ids), l, m.hidden_size))
    joined = np.concatenate(parts, axis=-1).reshape(len(ids), -1)  # (N, l * sum d)
    meta = StoreMeta(model="+".join(m.model for m in metas), model_fingerprint="+".join(m.model_fingerprint for m in metas),
                     hidden_size=sum(m.hidden_size for m in metas), prompt_length=l, template=metas[0].template, stage="aggregate")
    write_prompt_store(joined_uri, meta, ids, joined)
    return Sources(joined_uri, meta, metas, missing)
