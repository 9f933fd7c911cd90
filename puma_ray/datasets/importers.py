"""Streaming importers: public recommendation data sets -> puma-ray interactions.

Formats (one module each, ``puma_ray.datasets.<format>``): movielens, recbole, amazon2023, yelp, mind.
A format module only finds and checks its files and parses them into :class:`Chunk` tables; everything
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
import json
import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import get_args

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from puma_ray import outputs, schema, storage
from puma_ray.config import ImportFormat, ImportOptions
from puma_ray.console import Progress, say
from puma_ray.data import user_hash
from puma_ray.errors import PumaError

FORMATS = get_args(ImportFormat)
GENERATOR = "puma_ray.importers"
RATING_MAX = 5.0
_BUCKET_BYTES = 64 << 20  # auto bucket count: one bucket per this many bytes of (uncompressed) source
_GZIP_RATIO = 4  # a compressed source counts this many times its size
_MAX_AUTO_BUCKETS = 1024
_FLUSH_ROWS = 2_000_000  # pending bucket rows held before they are written out


@dataclass(frozen=True)
class Chunk:
    """One parsed piece of a source file.

    table, interactions: user_id string, item_id string, label float64, timestamp int64 (unix seconds)
    [, history list<string>: item ids, oldest first]; null = the field is missing or unparseable
    (a label that is not a number is NaN). table, items: item_id string, item_text string.
    malformed: source records (lines) of the chunk that could not be parsed; ``records`` = rows + malformed.
    """

    table: pa.Table
    malformed: int

    @property
    def records(self) -> int:
        return self.table.num_rows + self.malformed


@dataclass(frozen=True)
class Source:
    """What a format module found at ``src``.

    variant: e.g. "ml-1m"; task: "rating" or "ctr"; rating_min: lowest rating of the source scale;
    files: role ("interactions", "items") -> URI; items / interactions: iterators of :class:`Chunk`.
    """

    variant: str
    task: str
    rating_min: float
    files: dict[str, str]
    items: Callable[[], Iterator[Chunk]]
    interactions: Callable[[], Iterator[Chunk]]

    @property
    def size(self) -> int:
        """Bytes of the interactions file, a compressed one counted ``_GZIP_RATIO`` times (auto bucket count)."""
        uri = self.files["interactions"]
        return storage.stat(uri)["size"] * (_GZIP_RATIO if uri.endswith((".gz", ".bz2", ".zst")) else 1)


# ---------------------------------------------------------------------------------------------
# Helpers for format modules: files, lines, fields, values


def dir_files(src: str) -> dict[str, str]:
    """{file name: URI} of the files directly in directory ``src``."""
    prefix = src.rstrip("/") + "/"
    return {uri[len(prefix) :]: uri for uri in storage.list_files(src) if "/" not in uri[len(prefix) :]}


def locate(src: str) -> tuple[str, str | None]:
    """``src`` -> (its directory, the file name when ``src`` is a file, else None); PumaError if it does not exist."""
    if not storage.exists(src):
        raise PumaError(f"{src}: not found")
    try:
        storage.stat(src)
    except PumaError:  # a directory
        return src, None
    head, _, name = src.rstrip("/").rpartition("/")
    return head or ("/" if src.startswith("/") else "."), name


def read_lines(uri: str, chunk_lines: int, header: bool = False) -> Iterator[list[bytes]]:
    """Lists of up to ``chunk_lines`` non-blank lines of ``uri`` (line ends removed), decompressed by
    extension; ``header``: the first line is skipped."""
    with storage.open_input_stream(uri) as f:
        if header:
            f.readline()
        chunk: list[bytes] = []
        for line in f:
            line = line.rstrip(b"\r\n")
            if line.strip():
                chunk.append(line)
                if len(chunk) >= chunk_lines:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk


def first_line(uri: str, encoding: str = "utf-8") -> str:
    """The first non-blank line of ``uri`` (for format probes); PumaError if there is none."""
    for chunk in read_lines(uri, 1):
        return chunk[0].decode(encoding, errors="replace").lstrip("\ufeff")
    raise PumaError(f"{uri}: empty file")


def decode(lines: list[bytes], encoding: str) -> tuple[list[str], int]:
    """-> (the lines that decode, how many did not)."""
    try:
        return b"\n".join(lines).decode(encoding).split("\n"), 0
    except UnicodeDecodeError:
        good = []
        for line in lines:
            try:
                good.append(line.decode(encoding))
            except UnicodeDecodeError:
                continue
        return good, len(lines) - len(good)


def split_fields(lines: list[str], sep: str, n: int) -> tuple[list[pa.Array], int]:
    """Lines -> (n string columns of the lines with exactly n ``sep``-separated fields, how many had not)."""
    parts = pc.split_pattern(pa.array(lines, pa.string()), sep)
    ok = pc.equal(pc.list_value_length(parts), n)
    parts = parts.filter(ok)
    return [pc.list_element(parts, i) for i in range(n)], len(lines) - len(parts)


def json_objects(lines: list[bytes], fields: tuple[str, ...]) -> tuple[dict[str, list], int]:
    """JSON lines (utf-8) -> ({field: values, None where absent}, how many lines were not JSON objects)."""
    text, bad = decode(lines, "utf-8")
    cols: dict[str, list] = {f: [] for f in fields}
    for line in text:
        try:
            obj = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if not isinstance(obj, dict):
            bad += 1
            continue
        for f in fields:
            cols[f].append(obj.get(f))
    return cols, bad


def probe_json(uri: str, required: tuple[str, ...], what: str) -> None:
    """PumaError unless the first line of ``uri`` is a JSON object holding the ``required`` keys."""
    try:
        obj = json.loads(first_line(uri))
    except ValueError:
        raise PumaError(f"{uri}: line 1 is not JSON; not {what}") from None
    missing = [k for k in required if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise PumaError(f"{uri}: line 1 lacks {missing}; not {what}")


def strings(values: list) -> pa.Array:
    """JSON values -> string array: str kept, int written out, anything else null."""
    return pa.array(
        [
            v if isinstance(v, str) else str(v) if isinstance(v, int) and not isinstance(v, bool) else None
            for v in values
        ],
        pa.string(),
    )


def numbers(values: list) -> pa.Array:
    """JSON values -> float64 array: numbers and numeric strings kept, null stays null, anything else NaN."""
    out: list[float | None] = []
    for v in values:
        if v is None:
            out.append(None)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
        else:
            try:
                out.append(float(v))
            except (TypeError, ValueError):
                out.append(math.nan)
    return pa.array(out, pa.float64())


def to_float(arr: pa.Array) -> pa.Array:
    """string -> float64: empty or null -> null, text that is not a number -> NaN."""
    arr = pc.utf8_trim_whitespace(arr)
    arr = pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)
    try:
        return pc.cast(arr, pa.float64())
    except pa.ArrowInvalid:
        vals = pd.to_numeric(pd.Series(arr.to_numpy(zero_copy_only=False), dtype=object), errors="coerce")
        return pa.array(vals.to_numpy(np.float64), pa.float64(), mask=arr.is_null().to_numpy(zero_copy_only=False))


def to_seconds(arr: pa.Array, per_second: float = 1.0) -> pa.Array:
    """float64 (or numeric string) time in 1/``per_second`` s -> int64 unix seconds (floor); null if unusable."""
    if pa.types.is_string(arr.type):
        arr = to_float(arr)
    secs = pc.divide(arr, per_second)
    ok = pc.and_(pc.is_finite(secs), pc.less(pc.abs(secs), 2.0**53))
    return pc.if_else(ok, pc.cast(pc.floor(pc.if_else(ok, secs, 0.0)), pa.int64()), pa.scalar(None, pa.int64()))


def parse_time(arr: pa.Array, fmt: str) -> pa.Array:
    """Date-time strings in strptime ``fmt`` (read as UTC) -> int64 unix seconds; null if unparseable."""
    return pc.cast(pc.strptime(arr, format=fmt, unit="s", error_is_null=True), pa.int64())


def list_tail(lists: pa.Array, k: int) -> pa.ListArray:
    """Each list cut to its last ``k`` values (nulls become empty lists)."""
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    values = pc.list_flatten(lists)
    parent = pc.list_parent_indices(lists).to_numpy()
    counts = np.bincount(parent, minlength=len(lists))
    ends = np.cumsum(counts)
    keep = (ends[parent] - np.arange(len(parent))) <= k
    offsets = np.r_[0, np.cumsum(np.minimum(counts, k))].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values.filter(pa.array(keep)))


def json_interactions(uri: str, chunk_lines: int, fields: tuple[str, str, str, str], seconds) -> Iterator[Chunk]:
    """JSON-lines reviews -> interactions chunks. ``fields``: the (user, item, label, time) keys;
    ``seconds``: the time values (a list) -> int64 unix seconds."""
    for lines in read_lines(uri, chunk_lines):
        cols, bad = json_objects(lines, fields)
        user, item, label, when = (cols[f] for f in fields)
        out = {"user_id": strings(user), "item_id": strings(item), "label": numbers(label), "timestamp": seconds(when)}
        yield interactions_chunk(out, bad)


def json_items(uri: str, chunk_lines: int, fields: tuple[str, str]) -> Iterator[Chunk]:
    """JSON-lines item metadata -> items chunks. ``fields``: the (id, text) keys."""
    for lines in read_lines(uri, chunk_lines):
        cols, bad = json_objects(lines, fields)
        yield items_chunk(strings(cols[fields[0]]), strings(cols[fields[1]]), bad)


def items_chunk(ids: list | pa.Array, texts: list | pa.Array, malformed: int) -> Chunk:
    """An items :class:`Chunk` from ids and texts."""
    return Chunk(
        pa.table({"item_id": pa.array(ids, pa.string()), "item_text": pa.array(texts, pa.string())}), malformed
    )


def interactions_chunk(cols: dict[str, pa.Array], malformed: int) -> Chunk:
    """An interactions :class:`Chunk` from columns user_id, item_id, label, timestamp [, history]."""
    types = {"user_id": pa.string(), "item_id": pa.string(), "label": pa.float64(), "timestamp": pa.int64()}
    if "history" in cols:
        types["history"] = pa.list_(pa.string())
    return Chunk(pa.table({k: pc.cast(cols[k], t) for k, t in types.items()}), malformed)


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
