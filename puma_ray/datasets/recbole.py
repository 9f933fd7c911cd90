"""RecBole atomic files -> :class:`~puma_ray.datasets.parsing.Chunk` tables.

``src``: a directory holding one ``<name>.inter`` and its ``<name>.item``, or the ``.inter`` path. Both are
tab-separated with a typed header, e.g. ``user_id:token  item_id:token  rating:float  timestamp:float`` and
``item_id:token  movie_title:token_seq  release_year:token  class:token_seq`` (utf-8).

Fields: user_id, item_id, timestamp (float seconds; required: the split is chronological), the label
(``label_field``, default ``rating``, else ``label``; a field named ``label`` makes the task ctr, any
other rating with scale [0.5, 5]), and item_text (``text_field``, default the first token_seq field of
the .item whose name contains "title").
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

from puma_ray.config import ImportOptions
from puma_ray.datasets import parsing as imp
from puma_ray.errors import PumaError

RATING_MIN = 0.5


def open_source(src: str, opts: ImportOptions) -> imp.Source:
    """Find the .inter/.item pair and the fields named in their headers; PumaError if they are not RecBole files."""
    directory, name = imp.locate(src)
    files = imp.dir_files(directory)
    if name is not None and not name.endswith(".inter"):
        raise PumaError(f"{src}: not a RecBole .inter file")
    inters = [name] if name is not None else sorted(f for f in files if f.endswith(".inter"))
    if len(inters) != 1:
        raise PumaError(f"{directory}: expected one RecBole .inter file, found {inters or 'none'}")
    inter = files[inters[0]]
    item_name = inters[0][: -len(".inter")] + ".item"
    if item_name not in files:
        raise PumaError(f"{directory}: RecBole {inters[0]} without {item_name} (the item texts)")
    item = files[item_name]
    inter_fields = _header(inter)
    label_field = opts.label_field or ("rating" if "rating" in inter_fields else "label")
    cols = [_field(inter, inter_fields, f) for f in ("user_id", "item_id", label_field, "timestamp")]
    item_fields = _header(item)
    titles = [f for f, t in item_fields.items() if t == "token_seq" and "title" in f]
    text_field = opts.text_field or (titles[0] if titles else None)
    if text_field is None:
        raise PumaError(f"{item}: no token_seq field named *title* (fields {list(item_fields)}); set text_field")
    item_cols = [_field(item, item_fields, f) for f in ("item_id", text_field)]
    return imp.Source(
        variant="recbole",
        task="ctr" if label_field == "label" else "rating",
        rating_min=RATING_MIN,
        files={"interactions": inter, "items": item},
        items=functools.partial(_items, item, len(item_fields), item_cols, opts.chunk_lines),
        interactions=functools.partial(_inter, inter, len(inter_fields), cols, opts.chunk_lines),
    )


def _header(uri: str) -> dict[str, str]:
    """{field name: RecBole type} of an atomic file's header line."""
    fields = [f.partition(":") for f in imp.first_line(uri).split("\t")]
    if not fields or any(not sep or not name for name, sep, _ in fields):
        raise PumaError(f"{uri}: header is not RecBole's 'name:type<TAB>...'")
    return {name: typ for name, _, typ in fields}


def _field(uri: str, fields: dict[str, str], name: str) -> int:
    """Column index of ``name``; PumaError naming the fields there are."""
    if name not in fields:
        raise PumaError(f"{uri}: no field {name!r} in the header (fields {list(fields)})")
    return list(fields).index(name)


def _inter(uri: str, width: int, cols: list[int], chunk_lines: int) -> Iterator[imp.Chunk]:
    for lines in imp.read_lines(uri, chunk_lines, header=True):
        text, undecodable = imp.decode(lines, "utf-8")
        fields, bad = imp.split_fields(text, "\t", width)
        user, item, label, ts = (fields[i] for i in cols)
        cols_out = {"user_id": user, "item_id": item, "label": imp.to_float(label), "timestamp": imp.to_seconds(ts)}
        yield imp.interactions_chunk(cols_out, bad + undecodable)


def _items(uri: str, width: int, cols: list[int], chunk_lines: int) -> Iterator[imp.Chunk]:
    for lines in imp.read_lines(uri, chunk_lines, header=True):
        text, undecodable = imp.decode(lines, "utf-8")
        fields, bad = imp.split_fields(text, "\t", width)
        yield imp.items_chunk(fields[cols[0]], fields[cols[1]], bad + undecodable)
