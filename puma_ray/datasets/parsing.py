"""What a format module of ``puma-ray data import`` uses to read its source: the :class:`Chunk` and
:class:`Source` it hands to puma_ray.datasets.importers (which buckets, labels, splits and writes),
and helpers for files, lines, fields and values (bounded memory: sources are read in chunks of lines).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from puma_ray import storage
from puma_ray.errors import PumaError

_GZIP_RATIO = 4  # a compressed source counts this many times its size (auto bucket count)


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


def json_source(
    variant: str,
    interactions: tuple[str, tuple[str, str, str, str], str],
    items: tuple[str, tuple[str, str], str],
    seconds,
    chunk_lines: int,
) -> Source:
    """A rating :class:`Source` of two JSON-lines files, each ``(uri, fields, what it is)``, both
    probed first (:func:`probe_json`): the interactions (user, item, rating, time fields;
    ``seconds`` turns the time field into unix seconds) and the items (item id, text fields)."""
    for uri, fields, what in (interactions, items):
        probe_json(uri, fields, what)
    return Source(
        variant=variant,
        task="rating",
        rating_min=1.0,
        files={"interactions": interactions[0], "items": items[0]},
        items=functools.partial(json_items, items[0], chunk_lines, items[1]),
        interactions=functools.partial(json_interactions, interactions[0], chunk_lines, interactions[1], seconds),
    )
