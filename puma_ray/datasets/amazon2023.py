"""Amazon Reviews 2023 (McAuley Lab), one category -> :class:`~puma_ray.datasets.parsing.Chunk` tables.

Files: reviews ``<Category>.jsonl[.gz]``, one JSON object a line (``rating`` 1.0..5.0, ``title``, ``text``,
``asin``, ``parent_asin``, ``user_id``, ``timestamp`` in milliseconds, ...), and item metadata
``meta_<Category>.jsonl[.gz]`` (``parent_asin``, ``title``, ``main_category``, ...).
``src``: the directory holding one such pair, or the reviews file; ``reviews_file`` / ``meta_file`` name
the files instead (a bare name is looked up in ``src``).

item_id = parent_asin; item_text = the metadata title of that parent_asin; timestamp: seconds (floor).
"""

from __future__ import annotations

import re

import pyarrow as pa

from puma_ray import storage
from puma_ray.config import ImportOptions
from puma_ray.datasets import parsing as imp
from puma_ray.errors import PumaError

REVIEW_FIELDS = ("user_id", "parent_asin", "rating", "timestamp")
META_FIELDS = ("parent_asin", "title")
_REVIEWS = re.compile(r"(?!meta_)(.+)\.jsonl(\.gz)?")
WHAT = "an Amazon Reviews 2023 {} file"


def open_source(src: str, opts: ImportOptions) -> imp.Source:
    """Find the reviews and metadata files and check their first lines; PumaError if they are not Amazon 2023."""
    directory, name = imp.locate(src)
    files = imp.dir_files(directory)
    reviews = _named(directory, opts.reviews_file) or (files[name] if name else _reviews(directory, files))
    meta = _named(directory, opts.meta_file) or _meta(directory, files, reviews)
    for uri in (reviews, meta):
        if not storage.exists(uri):
            raise PumaError(f"{uri}: not found")
    return imp.json_source(
        "amazon2023",
        (reviews, REVIEW_FIELDS, WHAT.format("review")),
        (meta, META_FIELDS, WHAT.format("metadata")),
        _seconds,
        opts.chunk_lines,
    )


def _named(directory: str, name: str | None) -> str | None:
    """An option's file: a bare name inside ``directory``, else the path/URI as given."""
    if name is None:
        return None
    return storage.join(directory, name) if "/" not in name else name


def _reviews(directory: str, files: dict[str, str]) -> str:
    """The one ``<Category>.jsonl[.gz]`` of ``directory``."""
    found = sorted(f for f in files if _REVIEWS.fullmatch(f))
    if len(found) != 1:
        what = f"several ({', '.join(found)}); set reviews_file" if found else "none"
        raise PumaError(f"{directory}: expected one Amazon 2023 reviews file <Category>.jsonl[.gz], found {what}")
    return files[found[0]]


def _meta(directory: str, files: dict[str, str], reviews: str) -> str:
    """``meta_<Category>.jsonl[.gz]`` next to the reviews file."""
    category = re.sub(r"\.jsonl(\.gz)?$", "", reviews.rsplit("/", 1)[-1])
    for name in (f"meta_{category}.jsonl", f"meta_{category}.jsonl.gz"):
        if name in files:
            return files[name]
    raise PumaError(f"{directory}: no meta_{category}.jsonl[.gz] (the item titles) next to {reviews}; set meta_file")


def _seconds(values: list) -> pa.Array:
    return imp.to_seconds(imp.numbers(values), 1000.0)  # milliseconds
