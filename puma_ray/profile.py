"""Per-user label statistics of an interactions input (the "complexity" signal of user selection).

Output (Parquet directory): one row per user with interactions:
    user_id string, n int64 (records), label_mean float64, label_var float64 (population variance, ddof=0)

Computed in two distributed steps (``data.sum_by``): every block of (user_id, label) rows becomes
per-user partial sums (n, sum, sum of squares; a pyarrow group_by inside a Ray Data map_batches),
and the partials, about one row per user per block instead of one per interaction, are merged: in
ONE task when they fit a hash partition, else by a Ray Data groupby sized by the partial rows.
The read uses one block per file (at least two per core), not Ray's default of at least 200, and
on a local Ray one task per core: the per-row work is tiny, so per-block and per-process overheads
dominated (measured, benchmarks/profile_speed.py). Only the two columns are read; the interactions
are never collected in one process.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from ray.data import SaveMode

from puma_ray import storage
from puma_ray.data import load_interactions, sum_by, task_pool
from puma_ray.errors import PumaError, user_errors

PROFILE_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("n", pa.int64(), nullable=False),
        pa.field("label_mean", pa.float64(), nullable=False),
        pa.field("label_var", pa.float64(), nullable=False),
    ]
)


def _squares(batch: pa.Table) -> pa.Table:
    """(user_id, label) rows -> (user_id, s = label, ss = label^2), what the sums are taken of."""
    label = pc.cast(batch.column("label"), pa.float64())
    return pa.table({"user_id": batch.column("user_id").cast(pa.string()), "s": label, "ss": pc.multiply(label, label)})


def _to_profile(batch: pa.Table) -> pa.Table:
    """Sums per user (user_id, s, ss, n) -> PROFILE_SCHEMA: mean s/n, population variance ss/n - mean^2."""
    n = np.asarray(batch.column("n").to_numpy(zero_copy_only=False), dtype=np.int64)
    mean = np.asarray(batch.column("s").to_numpy(zero_copy_only=False), dtype=np.float64) / n
    var = np.asarray(batch.column("ss").to_numpy(zero_copy_only=False), dtype=np.float64) / n - mean**2
    user_id = batch.column("user_id").cast(pa.string())
    return pa.Table.from_arrays(
        [user_id, pa.array(n), pa.array(mean), pa.array(np.maximum(var, 0.0))], schema=PROFILE_SCHEMA
    )


def _check_target(out_uri: str) -> None:
    """Refuse to overwrite a non-empty directory that is not a previous profile."""
    if not storage.list_files(out_uri):
        return
    try:
        names = storage.read_schema(out_uri).names
    except PumaError:
        names = []
    if names != PROFILE_SCHEMA.names:
        raise PumaError(f"{out_uri}: not empty and not a user profile; choose another output path")


@user_errors
def profile_users(interactions_uri: str, task: str, out_uri: str) -> dict:
    """Entry: write per-user count / label mean / label variance of ``interactions_uri`` to ``out_uri``.

    Returns {"users": number of users, "rows": number of interactions, "uri": out_uri}.
    A previous profile at ``out_uri`` is replaced.
    """
    # the driver's only: Ray Data workers import this module for _squares, and runtime imports torch
    from puma_ray.runtime import cores, task_concurrency  # noqa: PLC0415

    _check_target(out_uri)
    files = len(storage.parquet_files(interactions_uri))
    blocks = max(files, 2 * cores())
    concurrency = task_concurrency(files)  # read, check, squares and partial sums: one task per file
    ds, rows = load_interactions(interactions_uri, task, ["user_id", "label"], blocks, concurrency)
    squares = ds.map_batches(_squares, batch_format="pyarrow", compute=task_pool(concurrency))
    stats = sum_by(squares, ["user_id"], ["s", "ss"], concurrency).map_batches(_to_profile, batch_format="pyarrow")
    stats = stats.materialize()
    users = stats.count()
    fs, path = storage.resolve(out_uri)
    stats.write_parquet(path, filesystem=fs, mode=SaveMode.OVERWRITE)
    return {"users": int(users), "rows": int(rows), "uri": out_uri}


def read_profile(uri: str) -> pd.DataFrame:
    """A profile directory -> DataFrame (user_id, n, label_mean, label_var), sorted by user_id."""
    table = storage.read_table(uri)
    missing = [c for c in PROFILE_SCHEMA.names if c not in table.column_names]
    if missing:
        raise PumaError(f"{uri}: not a user profile (lacks columns {missing})")
    df = table.select(PROFILE_SCHEMA.names).to_pandas()
    df["user_id"] = df["user_id"].astype(str)
    return df.sort_values("user_id", kind="stable").reset_index(drop=True)
