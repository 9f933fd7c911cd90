"""Yelp Open Dataset -> :class:`~puma_ray.datasets.parsing.Chunk` tables (task rating).

``src``: the directory holding ``yelp_academic_dataset_review.json`` (JSON lines: review_id, user_id,
business_id, stars 1..5, date "2016-03-09 00:00:00", ...) and ``yelp_academic_dataset_business.json``
(business_id, name, ...); ``review.json`` / ``business.json`` (each optionally .gz) are accepted too.

item_id = business_id; item_text = the business name; timestamp = the review date read as UTC seconds.
"""

from __future__ import annotations

import pyarrow as pa

from puma_ray.config import ImportOptions
from puma_ray.datasets import parsing as imp
from puma_ray.errors import PumaError

REVIEW_NAMES = ("yelp_academic_dataset_review.json", "review.json")
BUSINESS_NAMES = ("yelp_academic_dataset_business.json", "business.json")
REVIEW_FIELDS = ("user_id", "business_id", "stars", "date")
BUSINESS_FIELDS = ("business_id", "name")
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def open_source(src: str, opts: ImportOptions) -> imp.Source:
    """Find the review and business files and check their first lines; PumaError if they are not Yelp's."""
    directory, _ = imp.locate(src)
    files = imp.dir_files(directory)
    reviews = _find(directory, files, REVIEW_NAMES)
    business = _find(directory, files, BUSINESS_NAMES)
    return imp.json_source(
        "yelp",
        (reviews, REVIEW_FIELDS, "a Yelp review file"),
        (business, BUSINESS_FIELDS, "a Yelp business file"),
        _seconds,
        opts.chunk_lines,
    )


def _find(directory: str, files: dict[str, str], names: tuple[str, ...]) -> str:
    for name in names:
        for candidate in (name, name + ".gz"):
            if candidate in files:
                return files[candidate]
    raise PumaError(f"{directory}: no Yelp {' or '.join(names)} (.gz accepted)")


def _seconds(values: list) -> pa.Array:
    return imp.parse_time(imp.strings(values), DATE_FORMAT)
