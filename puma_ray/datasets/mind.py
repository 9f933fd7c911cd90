"""Microsoft News Dataset (MIND) -> :class:`~puma_ray.datasets.parsing.Chunk` tables (task ctr).

``src``: one MIND directory (e.g. MINDsmall_train) holding ``behaviors.tsv`` (impression_id TAB user_id
TAB time "11/11/2019 9:05:58 AM" TAB history "N1 N2 ..." TAB impressions "N3-1 N4-0 ...") and ``news.tsv``
(news_id TAB category TAB subcategory TAB title TAB abstract TAB url TAB title_entities TAB abstract_entities).

One row per impressed article: label 1 (clicked) or 0; item_text = its title; history = the ids of the
line's history column (oldest first), the last ``history_size`` of them. An impression without a label
(MIND's test set) has no label: missing_field. Times are read as UTC.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pyarrow.compute as pc

from puma_ray.config import ImportOptions
from puma_ray.datasets import parsing as imp
from puma_ray.errors import PumaError

TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"
ROWS_PER_LINE = 40  # about this many impressions a behaviors line: a chunk reads chunk_lines / ROWS_PER_LINE lines
_IMPRESSION = r"^(?P<item>.*?)(?:-(?P<label>[^-]*))?$"


def open_source(src: str, opts: ImportOptions) -> imp.Source:
    """Find behaviors.tsv and news.tsv in ``src`` and check their first lines; PumaError if they are not MIND's."""
    directory, _ = imp.locate(src)
    files = imp.dir_files(directory)
    for name in ("behaviors.tsv", "news.tsv"):
        if name not in files:
            raise PumaError(f"{directory}: no MIND {name}")
    behaviors, news = files["behaviors.tsv"], files["news.tsv"]
    for uri, width in ((behaviors, 5), (news, 8)):
        if len(imp.first_line(uri).split("\t")) != width:
            raise PumaError(f"{uri}: line 1 is not {width} tab-separated fields; not a MIND file")
    return imp.Source(
        variant="mind",
        task="ctr",
        rating_min=1.0,
        files={"interactions": behaviors, "items": news},
        items=functools.partial(_news, news, opts.chunk_lines),
        interactions=functools.partial(
            _behaviors, behaviors, max(1, opts.chunk_lines // ROWS_PER_LINE), opts.history_size
        ),
    )


def _behaviors(uri: str, chunk_lines: int, history_size: int) -> Iterator[imp.Chunk]:
    for lines in imp.read_lines(uri, chunk_lines):
        text, undecodable = imp.decode(lines, "utf-8")
        (_, user, when, history, impressions), bad = imp.split_fields(text, "\t", 5)
        shown = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(impressions))
        line = pc.list_parent_indices(shown)
        parts = pc.extract_regex(pc.list_flatten(shown), _IMPRESSION)
        hist = imp.list_tail(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(history)), history_size)
        cols = {
            "user_id": user.take(line),
            "item_id": parts.field("item"),
            "label": imp.to_float(parts.field("label")),
            "timestamp": imp.parse_time(when, TIME_FORMAT).take(line),
            "history": hist.take(line),
        }
        yield imp.interactions_chunk(cols, bad + undecodable)


def _news(uri: str, chunk_lines: int) -> Iterator[imp.Chunk]:
    for lines in imp.read_lines(uri, chunk_lines):
        text, undecodable = imp.decode(lines, "utf-8")
        fields, bad = imp.split_fields(text, "\t", 8)
        yield imp.items_chunk(fields[0], fields[3], bad + undecodable)
