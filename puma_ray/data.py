"""Interactions as Ray Datasets: schema checked up front, values checked on every batch read."""

from __future__ import annotations

import functools

import pyarrow as pa

from puma_ray import schema, storage
from puma_ray.errors import PumaError


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
