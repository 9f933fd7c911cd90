"""MovieLens (GroupLens) releases -> :class:`~puma_ray.datasets.parsing.Chunk` tables (task rating).

``src``: the release directory (or its ratings file). The variant follows from the ratings file there:

- ml-100k: ``u.data`` (user TAB item TAB rating TAB timestamp) + ``u.item`` (``id|title|release date|...``;
  latin-1). Ratings 1..5.
- ml-1m: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) + ``movies.dat`` (``MovieID::Title::Genres``;
  latin-1). Ratings 1..5 (ml-10m's half stars need ``rating_min=0.5``).
- ml-latest, ml-latest-small, ml-20m/25m/32m: ``ratings.csv`` (``userId,movieId,rating,timestamp`` with header)
  + ``movies.csv`` (``movieId,title,genres``, titles with commas quoted; utf-8). Half stars 0.5..5.

item_text = the movie title as released (with its year); timestamp: unix seconds.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable, Iterator

from puma_ray.config import ImportOptions
from puma_ray.datasets import parsing as imp
from puma_ray.errors import PumaError

# variant -> (ratings file, movies file, encoding, separator, rating_min)
VARIANTS = {
    "ml-100k": ("u.data", "u.item", "latin-1", "\t", 1.0),
    "ml-1m": ("ratings.dat", "movies.dat", "latin-1", "::", 1.0),
    "ml-latest": ("ratings.csv", "movies.csv", "utf-8", ",", 0.5),
}
RATINGS_HEADER = "userId,movieId,rating,timestamp"
MOVIES_HEADER = "movieId,title,genres"


def open_source(src: str, opts: ImportOptions) -> imp.Source:
    """Find the variant's files in ``src`` and check their first lines; PumaError if they are not MovieLens."""
    directory, _ = imp.locate(src)
    files = imp.dir_files(directory)
    found = [v for v, spec in VARIANTS.items() if spec[0] in files]
    if not found:
        names = ", ".join(spec[0] for spec in VARIANTS.values())
        raise PumaError(f"{directory}: not a MovieLens directory (none of {names})")
    if len(found) > 1:
        raise PumaError(f"{directory}: ambiguous MovieLens directory (ratings files of {found}); give one release")
    variant = found[0]
    ratings_name, movies_name, encoding, sep, lo = VARIANTS[variant]
    if movies_name not in files:
        raise PumaError(f"{directory}: MovieLens {ratings_name} without {movies_name} (the titles)")
    ratings, movies = files[ratings_name], files[movies_name]
    header = variant == "ml-latest"
    line = imp.first_line(ratings, encoding)
    if header and line.strip() != RATINGS_HEADER:
        raise PumaError(f"{ratings}: header is {line.strip()[:80]!r}, expected {RATINGS_HEADER!r}; not MovieLens")
    if not header and len(line.split(sep)) != 4:
        raise PumaError(
            f"{ratings}: line 1 is not 4 {sep!r}-separated fields (user, item, rating, time); not MovieLens"
        )
    if header and not imp.first_line(movies, encoding).startswith(MOVIES_HEADER):
        raise PumaError(f"{movies}: header is not {MOVIES_HEADER!r}; not MovieLens")
    parse: Callable[[list[str]], tuple[list, list, int]] = {
        "ml-100k": functools.partial(_split_movies, sep="|", title=1),
        "ml-1m": functools.partial(_split_movies, sep="::", title=1),
        "ml-latest": _csv_movies,
    }[variant]
    return imp.Source(
        variant=variant,
        task="rating",
        rating_min=lo,
        files={"interactions": ratings, "items": movies},
        items=functools.partial(_items, movies, encoding, header, parse, opts.chunk_lines),
        interactions=functools.partial(_ratings, ratings, encoding, sep, header, opts.chunk_lines),
    )


def _ratings(uri: str, encoding: str, sep: str, header: bool, chunk_lines: int) -> Iterator[imp.Chunk]:
    for lines in imp.read_lines(uri, chunk_lines, header=header):
        text, undecodable = imp.decode(lines, encoding)
        (user, item, rating, ts), bad = imp.split_fields(text, sep, 4)
        cols = {"user_id": user, "item_id": item, "label": imp.to_float(rating), "timestamp": imp.to_seconds(ts)}
        yield imp.interactions_chunk(cols, bad + undecodable)


def _items(
    uri: str, encoding: str, header: bool, parse: Callable[[list[str]], tuple[list, list, int]], chunk_lines: int
) -> Iterator[imp.Chunk]:
    for lines in imp.read_lines(uri, chunk_lines, header=header):
        text, undecodable = imp.decode(lines, encoding)
        ids, titles, bad = parse(text)
        yield imp.items_chunk(ids, titles, bad + undecodable)


def _split_movies(lines: list[str], sep: str, title: int) -> tuple[list[str], list[str], int]:
    """u.item / movies.dat lines -> (ids, titles, lines with too few fields)."""
    rows = [line.split(sep) for line in lines]
    ok = [r for r in rows if len(r) > title + 1]
    return [r[0] for r in ok], [r[title] for r in ok], len(rows) - len(ok)


def _csv_movies(lines: list[str]) -> tuple[list[str], list[str], int]:
    """movies.csv lines (quoted titles) -> (ids, titles, lines with too few fields)."""
    rows = list(csv.reader(lines))
    ok = [r for r in rows if len(r) >= 3]
    return [r[0] for r in ok], [",".join(r[1:-1]) for r in ok], len(rows) - len(ok)
