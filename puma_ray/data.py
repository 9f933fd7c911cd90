"""Rows as Ray Datasets (interactions: schema checked up front, values on every batch read) and
as per-worker shards: the training input, written once by Ray Data and read by each Ray Train
worker straight from storage (:func:`shard_by_user`, :func:`iter_shard`)."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data import SaveMode
from ray.data.aggregate import Sum

from puma_ray import schema, storage
from puma_ray.errors import PumaError

# Rows per hash-shuffle partition (groupby, join): tiny inputs get one partition, so one aggregator
# actor to start instead of Ray's default pool.
ROWS_PER_PARTITION = 2_000_000


def task_pool(concurrency: int | None) -> ray.data.TaskPoolStrategy:
    """A map's compute strategy: Ray tasks, at most ``concurrency`` at once (None: as many as Ray Data
    schedules). A map's ``concurrency=`` argument is deprecated since Ray 2.51; a read keeps its own."""
    return ray.data.TaskPoolStrategy(size=concurrency)


def _checked(batch: pa.Table, uri: str, task: str) -> pa.Table:
    batch = schema.normalize_interactions(batch)
    schema.check_interaction_values(uri, task, batch)
    return batch


def load_interactions(
    uri: str, task: str, columns: list[str] | None = None, blocks: int | None = None, concurrency: int | None = None
):
    """-> (ray.data.Dataset of validated interactions, row count). Streams; nothing is collected.
    ``columns``: read only these (their values are checked; the schema check covers them all).
    ``blocks``: read blocks (Ray's default: at least 200, for parallelism; a cheap per-row pass
    wants fewer, e.g. one per file). ``concurrency``: at most this many read tasks at once (a map
    after it with the same :func:`task_pool` fuses with the read; ``runtime.task_concurrency``)."""
    rows = schema.check_interactions_input(uri, task)  # footers only (Dataset.count() would run a pass)
    kwargs = {"columns": columns} if columns else {}
    if blocks:
        kwargs["override_num_blocks"] = blocks
    ds = storage.ray_read_parquet(uri, concurrency=concurrency, **kwargs)
    check = functools.partial(_checked, uri=uri, task=task)
    return ds.map_batches(check, batch_format="pyarrow", compute=task_pool(concurrency)), rows


def shuffle_partitions(rows: int, at_least: int = 1) -> int:
    """Hash partitions of a groupby or join over ``rows`` rows: one per ROWS_PER_PARTITION, at least
    ``at_least`` (e.g. the Train workers a joined dataset is split over), at most Ray's default."""
    cap = ray.data.DataContext.get_current().default_hash_shuffle_parallelism
    return int(min(max(cap, at_least), max(at_least, -(-rows // ROWS_PER_PARTITION))))


def sum_by(ds, keys: list[str], columns: list[str] = (), concurrency: int | None = None):
    """Per distinct ``keys`` of ``ds``: the sum of each of ``columns`` (same names) and the row count
    ``n`` -> a Ray Dataset (not yet executed), one row per key (a user, an item, a (run, user) pair).

    Two steps: every block becomes partial sums (a pyarrow group_by: about one row per key per
    block), and the partials are merged in ONE task when they fit a hash partition
    (ROWS_PER_PARTITION rows), else by a Ray Data groupby sized by the partial rows. A Ray Data
    groupby of the rows themselves costs a hash shuffle whose aggregator actors take seconds to
    start, even for a few thousand keys (benchmarks/group_sums.py). ``concurrency``: of the
    partial-sum tasks (the same as the map before it fuses them with it; :func:`task_pool`)."""
    keys, columns = list(keys), list(columns)
    partials = ds.map_batches(
        _block_sums,
        fn_kwargs={"keys": keys, "columns": columns, "count": True},
        batch_format="pyarrow",
        batch_size=None,  # a whole block per call
        compute=task_pool(concurrency),
    ).materialize()
    partitions = shuffle_partitions(partials.count())
    if partitions == 1:
        merged = partials.repartition(1).map_batches(
            _block_sums,
            fn_kwargs={"keys": keys, "columns": [*columns, "n"], "count": False},
            batch_format="pyarrow",
            batch_size=None,
        )
    else:
        sums = [Sum(c, alias_name=c) for c in [*columns, "n"]]
        merged = partials.groupby(keys, num_partitions=partitions).aggregate(*sums)
    return merged


def mean_by(ds, keys: list[str], column: str, reg: float = 0.0, name: str | None = None):
    """Per distinct ``keys`` of ``ds``: the mean of ``column``, sum / (``reg`` + rows) (``reg`` > 0
    shrinks it towards 0), as column ``name`` (default: ``column``) -> a Ray Dataset (not yet
    executed), one row per key, from :func:`sum_by`."""
    sums = sum_by(ds, keys, [column])
    fn_kwargs = {"keys": list(keys), "column": column, "name": name or column, "reg": reg}
    return sums.map_batches(_mean, fn_kwargs=fn_kwargs, batch_format="pyarrow")


def _mean(batch: pa.Table, keys: list[str], column: str, name: str, reg: float) -> pa.Table:
    n = pc.add(batch.column("n").cast(pa.float64()), reg)
    return pa.table({**{k: batch.column(k) for k in keys}, name: pc.divide(batch.column(column).cast(pa.float64()), n)})


def column_mean(ds, column: str) -> float:
    """The mean of ``column`` over ``ds`` (:func:`mean_by` with no key: block sums merged in one
    task; in the quickstart's evaluation Ray Data's ``Dataset.mean`` took 5-6 s on its 62k train
    rows, the sums 0.6 s)."""
    return float(mean_by(ds.select_columns([column]), [], column).take_all()[0][column])


def distinct(ds, keys: list[str]) -> int:
    """Distinct values of ``keys`` in ``ds`` (the rows of :func:`sum_by`'s table)."""
    return sum_by(ds, keys).count()


def _block_sums(batch: pa.Table, keys: list[str], columns: list[str], count: bool) -> pa.Table:
    """One block -> one row per distinct ``keys``: the sums of ``columns`` (same names), and with
    ``count`` its rows as ``n``."""
    aggs = [(c, "sum") for c in columns] + ([([], "count_all")] if count else [])
    g = batch.group_by(keys, use_threads=False).aggregate(aggs)
    names = [*(f"{c}_sum" for c in columns), *(["count_all"] if count else [])]
    out = [*columns, *(["n"] if count else [])]
    return g.select([*keys, *names]).rename_columns([*keys, *out])


# Rows per block of a cheap pass over few rows (metrics of scored rows): a task per block costs
# 0.05-0.2 s to schedule on 2 cores, so a pass over 30 blocks of 3k rows spends seconds doing that.
ROWS_PER_BLOCK = 1_000_000


def compact(ds):
    """``ds`` (materialized) re-cut into one block per ROWS_PER_BLOCK rows (at least one), when that
    is fewer blocks than it has: the blocks that small per-row passes over it want."""
    blocks = max(1, -(-ds.count() // ROWS_PER_BLOCK))
    return ds.repartition(blocks).materialize() if blocks < ds.num_blocks() else ds


# A side table (prompts of the selected users, per-user statistics) of at most this many bytes is
# joined by broadcast: every task of the other side gets its blocks from the object store and joins
# locally, with no hash shuffle (whose aggregator actors cost seconds to start, even on tiny inputs).
BROADCAST_BYTES = 256 << 20


def join_on(
    rows, side, key: str, rows_count: int, side_bytes: int, how: str = "inner", at_least: int = 1, broadcast_bytes=None
):
    """``rows`` (a Ray Dataset) joined on column ``key`` with ``side`` (a smaller Ray Dataset; a key
    may repeat on either side): ``how`` "inner" or "left_outer" (every row kept, the side's columns
    null where no side row matches). ``side_bytes``: the side's size, known or estimated by the
    caller (e.g. users x prompt width x 4): up to ``broadcast_bytes`` (default BROADCAST_BYTES) the
    side is materialized and broadcast (:func:`_join_block`; the rows keep their blocks), else both
    go through a Ray Data hash join (``rows_count`` sizes its partitions, at least ``at_least``)."""
    if side_bytes > (BROADCAST_BYTES if broadcast_bytes is None else broadcast_bytes):
        partitions = shuffle_partitions(rows_count, at_least)
        return rows.join(side, join_type=how, num_partitions=partitions, on=(key,))
    side = side.materialize()
    refs = side.to_arrow_refs()
    return rows.map_batches(
        _join_block,
        fn_kwargs={"refs": refs, "empty": side.schema().base_schema.empty_table(), "key": key, "how": how},
        batch_format="pyarrow",
        batch_size=None,  # a whole block per call: the side's key index is built once per block
    )


def _join_block(block: pa.Table, refs: list, empty: pa.Table, key: str, how: str) -> pa.Table:
    """One block of the rows joined with the whole broadcast side (its Arrow blocks ``refs``): keys
    matched by pyarrow's hash join on row numbers (its joins take no list columns), columns taken;
    rows in block order."""
    side = pa.concat_tables([empty, *ray.get(refs)], promote_options="permissive")
    left = pa.table({key: block.column(key), "__row": pa.array(np.arange(block.num_rows))})
    right = pa.table({key: side.column(key), "__side": pa.array(np.arange(side.num_rows))})
    pairs = left.join(right, key, join_type="inner" if how == "inner" else "left outer")
    pairs = pairs.sort_by([("__row", "ascending"), ("__side", "ascending")])
    cols = block.take(pairs.column("__row"))
    for name in side.column_names:
        if name != key:
            cols = cols.append_column(name, side.column(name).take(pairs.column("__side")))
    return cols


def user_hash(ids) -> np.ndarray:
    """(n,) user ids -> (n,) uint64, stable across processes and runs (pandas' hash_array, fixed key)."""
    return pd.util.hash_array(np.asarray(ids, dtype=object))


def hashed_fraction(ids, fraction: float) -> np.ndarray:
    """(n,) bool: the users whose hash falls in the lowest ``fraction`` of the hash range; the same
    users in every process, run and trial."""
    h = user_hash(ids)
    return np.ones(len(h), bool) if fraction >= 1 else h < np.uint64(int(fraction * 2**64))


HELD = "held"  # bool column of scored validation rows: kept out of the gate's verdict (gate.holdout)


def mark_held(batch: pa.Table, fraction: float) -> pa.Table:
    """map_batches: adds :data:`HELD`, true for the rows whose (user_id, item_id) hash falls in the
    lowest ``fraction`` of the hash range (the same rows in every process and run)."""
    key = pc.binary_join_element_wise(
        batch.column("user_id").cast(pa.string()), batch.column("item_id").cast(pa.string()), "\x1f"
    )
    return batch.append_column(HELD, pa.array(hashed_fraction(key.to_numpy(zero_copy_only=False), fraction)))


def with_held(batch: pa.Table, cols: dict) -> pa.Table:
    """A table of ``cols``, plus ``batch``'s :data:`HELD` column when it has one (scored rows carry it
    through every method's scoring)."""
    return pa.table({**cols, HELD: batch.column(HELD)} if HELD in batch.column_names else cols)


def keep_users(batch: pa.Table, users: pa.Array) -> pa.Table:
    """map_batches: the rows of ``users`` (string ids) only."""
    return batch.filter(pc.is_in(batch.column("user_id"), value_set=users))


def keep_hashed(batch: pa.Table, fraction: float) -> pa.Table:
    """map_batches: the rows of the users :func:`hashed_fraction` keeps."""
    return batch.filter(hashed_fraction(batch.column("user_id").to_numpy(zero_copy_only=False), fraction))


def _with_shard(table: pa.Table, world: int, split: str) -> pa.Table:
    """Adds ``split`` and ``shard``: the worker owning each row's user, hash(user_id) % world."""
    ids = table.column("user_id").to_numpy(zero_copy_only=False)
    shard = pa.array((user_hash(ids) % np.uint64(world)).astype(np.int64))
    return table.append_column("split", pa.repeat(pa.scalar(split, pa.string()), table.num_rows)).append_column(
        "shard", shard
    )


def shard_by_user(datasets: dict, world: int, out_uri: str, key: dict) -> dict[str, str]:
    """Write each split's rows partitioned by owning worker (a stable hash of user_id; one streamed
    Ray Data pass per split) to ``out_uri/split=<split>/shard=<r>/``; {"<split>_<r>": URI} of the
    non-empty ones. ``key`` says what the rows are made of: shards written for the same key (a
    resumed run) are reused as they are."""
    done_uri = storage.join(out_uri, "done.json")
    if storage.exists(done_uri):
        done = storage.read_json(done_uri)
        if done.get("key") == key and done.get("world") == world:
            return done["shards"]
    storage.delete_dir(out_uri)
    fs, path = storage.resolve(out_uri)
    # A pass per split: splits made by joins (stage 2) would put two hash shuffles in one execution,
    # which costs Ray Data seconds more than two executions, even on tiny inputs.
    for split, ds in datasets.items():
        rows = ds.map_batches(_with_shard, fn_kwargs={"world": world, "split": split}, batch_format="pyarrow")
        rows.write_parquet(path, filesystem=fs, partition_cols=["split", "shard"], mode=SaveMode.APPEND)
    shards = {
        f"{split}_{r}": storage.join(out_uri, f"split={split}", f"shard={r}")
        for split in datasets
        for r in range(world)
    }
    shards = {k: uri for k, uri in shards.items() if storage.list_files(uri, ".parquet")}
    empty = [r for r in range(world) if f"train_{r}" not in shards]
    if len(empty) == world:
        raise PumaError(f"{out_uri}: no training rows (no user of the training split has any)")
    if empty:
        raise PumaError(f"workers {empty} own no user (too few users for scaling.num_workers={world})")
    storage.write_json(done_uri, {"key": key, "world": world, "shards": shards})
    return shards


def iter_shard(uri: str, batch_size: int, seed: int | None = None, buffer_rows: int = 0) -> Iterator[pa.Table]:
    """Batches (<= ``batch_size`` rows) of one shard, streamed from storage: with a ``seed``, its
    row groups in a seeded random order and rows shuffled inside a buffer of at least
    ``buffer_rows`` (a local shuffle, like Ray Data's); without one, in file order."""
    groups = [
        (f, g) for f in storage.list_files(uri, ".parquet") for g in range(storage.parquet_file(f).num_row_groups)
    ]
    rng = np.random.default_rng(seed)
    if seed is not None:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    pending: list[pa.Table] = []
    held = 0
    for n, (f, g) in enumerate(groups):
        table = storage.parquet_file(f).read_row_group(g)
        pending.append(table.drop_columns([c for c in ("split", "shard") if c in table.column_names]))
        held += table.num_rows
        if held < max(buffer_rows, batch_size) and n < len(groups) - 1:
            continue
        buffer = pa.concat_tables(pending)
        if seed is not None:
            buffer = buffer.take(rng.permutation(buffer.num_rows))
        full = buffer.num_rows - buffer.num_rows % batch_size if n < len(groups) - 1 else buffer.num_rows
        for start in range(0, full, batch_size):
            yield buffer.slice(start, min(batch_size, full - start))
        pending, held = [buffer.slice(full)], buffer.num_rows - full
