"""Streaming importers: public recommendation data sets -> puma-ray interactions.

Formats (one module each, ``puma_ray.datasets.<format>``): movielens, recbole, amazon2023, yelp, mind.
A format module only finds and checks its files and parses them into :class:`Chunk` tables (with the
helpers of :mod:`puma_ray.datasets.parsing`); everything
else (label rules, filtering, bucketing, split, writing) lives here.

Output (the layout of :mod:`puma_ray.datasets.synthetic`)::

    OUT/train/part-BBBBB.parquet, OUT/valid/part-BBBBB.parquet   exactly schema.interactions_schema(task):
        user_id string, item_id string, label float32, item_text string, [history_text list<string> (ctr)],
        timestamp int64 (unix seconds); rows sorted by (user_id, timestamp, item_id) within each part
    OUT/meta.json   generator ("puma_ray.importers"), complete (written last, after train/ and valid/), format, variant,
        source, files {interactions, items}, task, options, buckets, rows {train, valid}, users, items,
        rows_read (source records: lines, MIND impressions; rows_read = sum(dropped) + train + valid),
        dropped {reason: rows}, item_table {lines_read, malformed_line, missing_text, duplicate, items_with_text},
        items_counted, items_kept (>= min_item_interactions), [history_ids_without_text (ctr)]

Order of work (bounded memory: the item-text table, one parse chunk and one bucket at a time):

0. Checks: the format's files exist and look like that format; OUT is empty or a previous import
   (puma_ray.outputs; ``--overwrite`` lifts the latter).
   Every failure is one PumaError line, raised before anything is written.
1. Item table: the format's item file -> item_id -> item_text (surrounding whitespace trimmed; an entry
   with empty text is no text; the first entry of an id with text wins). Held in memory: items are far
   fewer than interactions.
2. Pass 1 streams the interactions in chunks of ``chunk_lines`` lines. Every source record either lands
   in the output or is dropped for exactly one reason, the first that applies, in this order:
   ``malformed_line`` (cannot be parsed), ``missing_field`` (no user, item or label), ``bad_timestamp``,
   ``bad_rating`` / ``bad_label`` (see below), ``missing_item_text`` (the item has no text; with
   ``missing_text="item_id"`` the item id is its text instead). Survivors are counted per item and
   written to B temporary Parquet buckets by a stable hash of user_id (every user lies in one bucket).
3. Items with >= ``min_item_interactions`` surviving rows are kept.
4. Pass 2, one bucket at a time: rows of other items are dropped (``item_below_min``); then users with
   fewer than ``min_user_interactions`` remaining rows (``user_below_min``); then each user's rows,
   sorted by (timestamp, item_id, source order), keep the ``max_per_user`` most recent (``over_max_per_user``);
   the last round(valid_fraction * n) of a user's n rows (half up; if valid_fraction > 0 at least 1, at most
   n - 1) go to valid. Bucket b
   becomes train/part-b and valid/part-b (an empty part is not written, except part-00000 of a split
   that would otherwise have none).

Labels. ctr: 0 or 1, anything else is ``bad_label``. rating: the source declares its scale [lo, 5]
(lo = 1, or 0.5 for half-star sources; ``rating_min`` overrides); a value outside it (or not a number)
is ``bad_rating``; inside it, ``rating_rule`` maps it onto 1..5:
``ceil`` (0.5 -> 1, 1.5 -> 2, ..., 4.5 -> 5), ``round`` (half up: 0.5 -> 1, 2.5 -> 3),
``scale`` (linear [lo, 5] onto [1, 5], fractions kept), ``strict`` (integers 1..5 only, else bad_rating).

Deterministic: the same input and options give the same bytes (stable hashes, stable sorts, no clock).
"""

from __future__ import annotations

import importlib
import math
import uuid
from collections.abc import Iterator
from typing import get_args

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from puma_ray import outputs, schema, storage
from puma_ray.config import ImportFormat, ImportOptions
from puma_ray.console import Progress, say
from puma_ray.data import user_hash
from puma_ray.datasets.parsing import Chunk, Source, list_tail
from puma_ray.errors import PumaError

FORMATS = get_args(ImportFormat)
GENERATOR = "puma_ray.importers"
RATING_MAX = 5.0
_BUCKET_BYTES = 64 << 20  # auto bucket count: one bucket per this many bytes of (uncompressed) source
_MAX_AUTO_BUCKETS = 1024
_FLUSH_ROWS = 2_000_000  # pending bucket rows held before they are written out


# ---------------------------------------------------------------------------------------------
# Shared machinery


_ITEM_SCHEMA = pa.schema([("item_id", pa.string()), ("item_text", pa.string())])


class ItemTable:
    """item_id -> item_text, held in memory; ids unique, ``codes`` maps ids to rows (-1: no text)."""

    def __init__(self, chunks: Iterator[Chunk], progress: Progress):
        tables = []
        self.stats = {"lines_read": 0, "malformed_line": 0, "missing_text": 0, "duplicate": 0}
        for chunk in chunks:
            tables.append(chunk.table)
            self.stats["lines_read"] += chunk.records
            self.stats["malformed_line"] += chunk.malformed
            progress.update(self.stats["lines_read"])
        table = pa.concat_tables(tables) if tables else _ITEM_SCHEMA.empty_table()
        ids = pc.utf8_trim_whitespace(table["item_id"])
        texts = pc.utf8_trim_whitespace(table["item_text"])
        has = pc.and_(_present(ids), _present(texts))
        self.stats["missing_text"] = len(ids) - pc.sum(has).as_py() if len(ids) else 0
        ids, texts = ids.filter(has), texts.filter(has)
        first = ~pd.Index(ids.to_numpy(zero_copy_only=False), dtype=object).duplicated(keep="first")
        self.stats["duplicate"] = int((~first).sum())
        self.ids = ids.combine_chunks().filter(pa.array(first))
        self.texts = texts.combine_chunks().filter(pa.array(first))
        self.stats["items_with_text"] = len(self.ids)
        self._index = pd.Index(self.ids.to_numpy(zero_copy_only=False), dtype=object)

    def codes(self, item_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """(n,) int32 row of each id, -1 where the id has no text."""
        return self._index.get_indexer(item_ids.to_numpy(zero_copy_only=False)).astype(np.int32)

    def text(self, codes: np.ndarray, fallback: pa.Array) -> pa.Array:
        """(n,) texts of ``codes``; ``fallback`` where the code is -1."""
        if not len(self.texts):
            return fallback
        found = self.texts.take(pa.array(np.maximum(codes, 0)))
        return pc.if_else(pa.array(codes >= 0), found, fallback)


def _present(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """bool: not null and not empty."""
    return pc.fill_null(pc.greater(pc.utf8_length(col), 0), False)


def _bucket_schema(task: str) -> pa.Schema:
    """Pass-1 rows: user_id, item_id, label float32, timestamp, item_code int32 (-1: text = id)
    [, history list<int32> item codes, oldest first (ctr)]."""
    fields = [
        pa.field("user_id", pa.string()),
        pa.field("item_id", pa.string()),
        pa.field("label", pa.float32()),
        pa.field("timestamp", pa.int64()),
        pa.field("item_code", pa.int32()),
    ]
    if task == "ctr":
        fields.append(pa.field("history", pa.list_(pa.int32())))
    return pa.schema(fields)


def _labels(raw: np.ndarray, task: str, rule: str, lo: float) -> tuple[np.ndarray, np.ndarray]:
    """(n,) float64 source labels (NaN: missing or not a number) -> ((n,) float32 labels, (n,) bool bad)."""
    if task == "ctr":
        return raw.astype(np.float32), ~((raw == 0) | (raw == 1))
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(raw) & (raw >= lo) & (raw <= RATING_MAX))
        v = np.where(bad, RATING_MAX, raw)
        if rule == "strict":
            bad |= (v != np.floor(v)) | (v < 1)
        elif rule == "ceil":
            v = np.clip(np.ceil(v), 1, RATING_MAX)
        elif rule == "round":
            v = np.clip(np.floor(v + 0.5), 1, RATING_MAX)
        else:
            v = 1 + (v - lo) * (RATING_MAX - 1) / (RATING_MAX - lo)
    return v.astype(np.float32), bad


def _history_codes(hist: pa.ChunkedArray | None, n: int, items: ItemTable, k: int) -> tuple[pa.ListArray, int]:
    """(n,) list<string> item ids -> ((n,) list<int32> codes of the last ``k`` ids with text, how many
    non-empty ids had no text)."""
    if hist is None:
        return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.int32())), 0
    hist = hist.combine_chunks()
    flat = pc.list_flatten(hist)
    codes = items.codes(flat)
    known = codes >= 0
    unknown = int((~known & _present(flat).to_numpy(zero_copy_only=False)).sum())
    offsets = np.r_[0, np.cumsum(np.bincount(pc.list_parent_indices(hist).to_numpy()[known], minlength=n))]
    lists = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(codes[known]))
    return list_tail(lists, k), unknown


def _normalize(
    chunk: Chunk, src: Source, opts: ImportOptions, items: ItemTable, dropped: dict[str, int]
) -> tuple[pa.Table, int]:
    """A parsed chunk -> (its surviving rows in the bucket schema, history ids without text); drop
    reasons added to ``dropped``."""
    t = chunk.table
    dropped["malformed_line"] += chunk.malformed
    user = pc.utf8_trim_whitespace(t["user_id"])
    item = pc.utf8_trim_whitespace(t["item_id"])
    alive = np.ones(t.num_rows, bool)

    def drop(reason: str, bad: np.ndarray) -> None:
        bad = bad & alive
        dropped[reason] += int(bad.sum())
        alive[bad] = False

    present = pc.and_(pc.and_(_present(user), _present(item)), pc.is_valid(t["label"]))
    drop("missing_field", ~present.to_numpy(zero_copy_only=False))
    drop("bad_timestamp", t["timestamp"].is_null().to_numpy(zero_copy_only=False))
    label, bad = _labels(pc.fill_null(t["label"], math.nan).to_numpy(), src.task, opts.rating_rule, _lo(src, opts))
    drop("bad_label" if src.task == "ctr" else "bad_rating", bad)
    codes = items.codes(item)
    if opts.missing_text == "drop":
        drop("missing_item_text", codes < 0)
    cols = {"user_id": user, "item_id": item, "label": label, "timestamp": t["timestamp"], "item_code": codes}
    unknown = 0
    if src.task == "ctr":
        hist = t["history"] if "history" in t.column_names else None
        cols["history"], unknown = _history_codes(hist, t.num_rows, items, opts.history_size)
    keep = pa.array(alive)
    return pa.table({k: pc.filter(v, keep) for k, v in cols.items()}, schema=_bucket_schema(src.task)), unknown


def _lo(src: Source, opts: ImportOptions) -> float:
    return src.rating_min if opts.rating_min is None else opts.rating_min


class _Buckets:
    """Pass-1 rows in ``n`` buckets by a stable hash of user_id: ROOT/bBBBBB/fFFFFFF.parquet, one file
    per flush, source order kept. Pending rows are held up to ``_FLUSH_ROWS`` in all."""

    def __init__(self, root: str, n: int, bucket_schema: pa.Schema):
        self.root, self.n, self.schema = root, n, bucket_schema
        self.pending: list[list[pa.Table]] = [[] for _ in range(n)]
        self.pending_rows = 0
        self.flushes = 0

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        b = (user_hash(table["user_id"].to_numpy(zero_copy_only=False)) % np.uint64(self.n)).astype(np.int64)
        order = np.argsort(b, kind="stable")
        counts = np.bincount(b, minlength=self.n)
        starts = np.r_[0, np.cumsum(counts)]
        table = table.take(pa.array(order))
        for i in np.flatnonzero(counts):
            self.pending[i].append(table.slice(starts[i], counts[i]))
        self.pending_rows += table.num_rows
        if self.pending_rows >= _FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        for i, parts in enumerate(self.pending):
            if parts:
                uri = storage.join(self.root, f"b{i:05d}", f"f{self.flushes:06d}.parquet")
                with storage.parquet_writer(uri, self.schema) as w:
                    w.write_table(pa.concat_tables(parts))
        self.pending = [[] for _ in range(self.n)]
        self.pending_rows = 0
        self.flushes += 1

    def read(self, i: int) -> pa.Table:
        """Bucket ``i``, in source order."""
        files = storage.list_files(storage.join(self.root, f"b{i:05d}"), ".parquet")
        return pa.concat_tables([storage.read_table(f) for f in files]) if files else self.schema.empty_table()


def _count_items(parts: list[pa.Table]) -> pa.Table:
    """item_id, n tables -> one with unique item_id and summed n."""
    return (
        pa.concat_tables(parts)
        .group_by("item_id", use_threads=False)
        .aggregate([("n", "sum")])
        .rename_columns(["item_id", "n"])
    )


def _split_bucket(
    t: pa.Table, kept_items: pa.Array, opts: ImportOptions, counts: dict[str, int]
) -> tuple[pa.Table, np.ndarray]:
    """One bucket's rows -> (its kept rows sorted by (user_id, timestamp, item_id), (rows,) bool valid)."""
    keep = pc.is_in(t["item_id"], value_set=kept_items)
    counts["item_below_min"] += t.num_rows - pc.sum(keep).as_py() if t.num_rows else 0
    t = t.filter(keep)
    t = t.take(pc.sort_indices(t, [("user_id", "ascending"), ("timestamp", "ascending"), ("item_id", "ascending")]))
    n = t.num_rows
    if not n:
        return t, np.zeros(0, bool)
    user = t["user_id"].combine_chunks()
    starts = np.flatnonzero(np.r_[True, pc.not_equal(user[1:], user[:-1]).to_numpy(zero_copy_only=False)])
    per_user = np.diff(np.r_[starts, n])
    uid = np.repeat(np.arange(len(starts)), per_user)
    from_end = per_user[uid] - 1 - (np.arange(n) - starts[uid])
    enough = (per_user >= opts.min_user_interactions)[uid]
    counts["user_below_min"] += int((~enough).sum())
    cap = opts.max_per_user or n
    recent = from_end < cap
    counts["over_max_per_user"] += int((enough & ~recent).sum())
    kept = np.minimum(per_user, cap)
    n_valid = np.zeros(len(kept), np.int64)
    if opts.valid_fraction > 0:
        n_valid = np.minimum(np.maximum(1, np.floor(opts.valid_fraction * kept + 0.5)).astype(np.int64), kept - 1)
    keep_rows = enough & recent
    return t.filter(pa.array(keep_rows)), (from_end < n_valid[uid])[keep_rows]


def _output(t: pa.Table, task: str, items: ItemTable) -> pa.Table:
    """Bucket-schema rows -> the interactions schema (item codes -> texts)."""
    codes = t["item_code"].to_numpy()
    cols = {
        "user_id": t["user_id"],
        "item_id": t["item_id"],
        "label": t["label"],
        "item_text": items.text(codes, t["item_id"].combine_chunks()),
    }
    if task == "ctr":
        hist = t["history"].combine_chunks()
        flat = pc.list_flatten(hist).to_numpy()
        offsets = np.r_[0, np.cumsum(pc.list_value_length(hist).to_numpy())].astype(np.int32)
        texts = items.texts.take(pa.array(flat, pa.int32())) if len(flat) else pa.array([], pa.string())
        cols["history_text"] = pa.ListArray.from_arrays(pa.array(offsets), texts)
    cols["timestamp"] = t["timestamp"]
    return pa.table(cols, schema=schema.interactions_schema(task))


class _NothingKept(PumaError):
    """Every record was dropped: the import ends with this one line and leaves nothing behind."""


def _open(fmt: str, src: str, opts: ImportOptions) -> Source:
    """The format module's :class:`Source` for ``src`` (its files found and probed)."""
    if fmt not in FORMATS:
        raise PumaError(f"unknown import format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return importlib.import_module(f"puma_ray.datasets.{fmt}").open_source(src, opts)


def import_interactions(fmt: str, src: str, out: str, opts: ImportOptions, overwrite: bool = False) -> dict:
    """Import the ``fmt`` data set at ``src`` into ``out`` (see the module docstring); returns the meta.json dict.

    A previous import at ``out`` is replaced; any other non-empty ``out`` is refused unless ``overwrite``,
    and so is an ``out`` that is or holds a file it reads (puma_ray.outputs). train/ and valid/ are
    staged and published at the end, meta.json last: a failed import leaves a previous one whole. An
    import that keeps no row (every record dropped) is a one-line PumaError and leaves no file in
    ``out`` (a previous import there as it was).
    """
    source = _open(fmt, src, opts)
    # the inputs are the files read (a format reads only files directly in src: an OUT inside src is apart)
    outputs.check_output(out, "data import", {"src": source.files}, overwrite, hint=outputs.TOOL_OVERWRITE_HINT)
    fresh = not storage.exists(out)
    n_buckets = opts.buckets or min(_MAX_AUTO_BUCKETS, max(1, math.ceil(source.size / _BUCKET_BYTES)))
    tmp = storage.join(opts.tmp_dir, f"puma-import-{uuid.uuid4().hex}") if opts.tmp_dir else outputs.staged(out, "tmp")
    outputs.mark_output(out, "data import")  # train/ and valid/ are staged, published with meta.json last
    outputs.start_staging(out)
    meta = {
        "generator": GENERATOR,
        "complete": False,
        "format": fmt,
        "variant": source.variant,
        "source": src,
        "files": source.files,
        "task": source.task,
        "options": opts.model_dump(),
        "buckets": n_buckets,
    }
    try:
        meta.update(_run(source, out, opts, _Buckets(tmp, n_buckets, _bucket_schema(source.task)), f"import {fmt}"))
    except _NothingKept as exc:
        storage.delete_dir(outputs.staged(out))
        if fresh:
            storage.delete_dir(out)
        raise PumaError(str(exc)) from None
    finally:
        storage.delete_dir(tmp)
    meta["complete"] = True
    outputs.publish(out, ["train", "valid"], retire=["meta.json"])
    storage.write_json(storage.join(out, "meta.json"), meta)
    say(
        f"import {fmt}: {meta['rows_read']:,} records -> {meta['rows']['train']:,} train + {meta['rows']['valid']:,} "
        f"valid rows, {meta['users']:,} users, {meta['items']:,} items -> {out}; {_reasons(meta['dropped'])}".rstrip(
            "; "
        )
    )
    return meta


def _reasons(dropped: dict[str, int]) -> str:
    return "dropped: " + ", ".join(f"{k} {v:,}" for k, v in dropped.items() if v) if any(dropped.values()) else ""


def _run(source: Source, out: str, opts: ImportOptions, buckets: _Buckets, label: str) -> dict:
    """Item table, pass 1 and pass 2 (module docstring) -> the counts of meta.json."""
    task = source.task
    progress = Progress(f"{label}: item table", unit="lines")
    items = ItemTable(source.items(), progress)
    progress.close()
    reasons = [
        "malformed_line",
        "missing_field",
        "bad_timestamp",
        "bad_label" if task == "ctr" else "bad_rating",
        "missing_item_text",
        "item_below_min",
        "user_below_min",
        "over_max_per_user",
    ]
    dropped = dict.fromkeys(reasons, 0)
    rows_read = history_missing = 0
    item_parts: list[pa.Table] = []
    compacted = 0
    progress = Progress(f"{label}: pass 1", unit="records")
    for chunk in source.interactions():
        rows_read += chunk.records
        table, missing = _normalize(chunk, source, opts, items, dropped)
        history_missing += missing
        buckets.add(table)
        vc = pc.value_counts(table["item_id"])
        item_parts.append(pa.table({"item_id": vc.field("values"), "n": vc.field("counts")}))
        if sum(p.num_rows for p in item_parts) > max(1_000_000, 2 * compacted):
            item_parts = [_count_items(item_parts)]
            compacted = item_parts[0].num_rows
        progress.update(rows_read, detail=_reasons(dropped))
    buckets.flush()
    progress.close()
    counted = (
        _count_items(item_parts)
        if item_parts
        else pa.table({"item_id": pa.array([], pa.string()), "n": pa.array([], pa.int64())})
    )
    kept_items = counted["item_id"].filter(pc.greater_equal(counted["n"], opts.min_item_interactions))
    rows = {"train": 0, "valid": 0}
    users = 0
    out_items: list[pa.Array] = []
    iface = schema.interactions_schema(task)
    progress = Progress(f"{label}: pass 2", total=buckets.n, unit="buckets")
    for b in range(buckets.n):
        t, valid = _split_bucket(buckets.read(b), kept_items, opts, dropped)
        users += pc.count_distinct(t["user_id"]).as_py()
        out_items.append(pc.unique(t["item_id"]))
        table = _output(t, task, items)
        for split, mask in (("train", ~valid), ("valid", valid)):
            part = table.filter(pa.array(mask))
            if part.num_rows:
                with storage.parquet_writer(outputs.staged(out, split, f"part-{b:05d}.parquet"), iface) as w:
                    w.write_table(part)
                rows[split] += part.num_rows
        progress.add(1, detail=f"{rows['train'] + rows['valid']:,} rows written")
    progress.close()
    if not rows["train"] + rows["valid"]:  # nothing was written: pass 2 writes only non-empty parts
        why = _reasons(dropped) or "no interaction records"
        raise _NothingKept(
            f"{source.files.get('interactions', label)}: no row kept of {rows_read:,} record(s) read ({why}); "
            f"nothing written to {out}"
        )
    for split, n in rows.items():
        if not n:
            with storage.parquet_writer(outputs.staged(out, split, "part-00000.parquet"), iface) as w:
                w.write_table(iface.empty_table())
    n_items = len(pc.unique(pa.chunked_array(out_items, pa.string()))) if out_items else 0
    stats = {
        "rows": rows,
        "users": users,
        "items": n_items,
        "rows_read": rows_read,
        "dropped": dropped,
        "item_table": items.stats,
        "items_counted": counted.num_rows,
        "items_kept": len(kept_items),
    }
    if task == "ctr":
        stats["history_ids_without_text"] = history_missing
    return stats
