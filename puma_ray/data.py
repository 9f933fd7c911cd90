"""Interactions as Ray Datasets: schema checked up front, values checked on every batch read."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pyarrow as pa
import ray.data

from puma_ray import schema, storage
from puma_ray.errors import PumaError

# Rows per hash-shuffle partition (groupby, join): tiny inputs get one partition, so one aggregator
# actor to start instead of Ray's default pool.
ROWS_PER_PARTITION = 2_000_000


def _checked(batch: pa.Table, uri: str, task: str) -> pa.Table:
    batch = schema.normalize_interactions(batch)
    schema.check_interaction_values(uri, task, batch)
    return batch


def load_interactions(uri: str, task: str):
    """-> (ray.data.Dataset of validated interactions, row count). Streams; nothing is collected."""
    schema.check_interactions_schema(uri, storage.read_schema(uri))
    ds = storage.ray_read_parquet(uri)
    rows = ds.count()
    if rows == 0:
        raise PumaError(f"{uri}: empty input (0 interactions)")
    return ds.map_batches(functools.partial(_checked, uri=uri, task=task), batch_format="pyarrow"), rows


def shuffle_partitions(rows: int, at_least: int = 1) -> int:
    """Hash partitions of a groupby or join over ``rows`` rows: one per ROWS_PER_PARTITION, at least
    ``at_least`` (e.g. the Train workers a joined dataset is split over), at most Ray's default."""
    cap = ray.data.DataContext.get_current().default_hash_shuffle_parallelism
    return int(min(max(cap, at_least), max(at_least, -(-rows // ROWS_PER_PARTITION))))


def user_hash(ids) -> np.ndarray:
    """(n,) user ids -> (n,) uint64, stable across processes and runs (pandas' hash_array, fixed key)."""
    return pd.util.hash_array(np.asarray(ids, dtype=object))


def hashed_fraction(ids, fraction: float) -> np.ndarray:
    """(n,) bool: the users whose hash falls in the lowest ``fraction`` of the hash range; the same
    users in every process, run and trial."""
    h = user_hash(ids)
    return np.ones(len(h), bool) if fraction >= 1 else h < np.uint64(int(fraction * 2**64))
