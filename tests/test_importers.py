"""Streaming importers: tiny files in each public format (written here), checked against a plain-Python
reference of the documented filter/split order; schema, labels, drop reasons, determinism, errors, buckets.
Pure pyarrow: no Ray."""

from __future__ import annotations

import datetime
import gzip
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest

from puma_ray import outputs, schema, storage
from puma_ray.config import ImportOptions
from puma_ray.datasets import importers
from puma_ray.datasets.importers import import_interactions
from puma_ray.errors import PumaError

OPTS = ImportOptions(min_item_interactions=3, min_user_interactions=5, max_per_user=8, valid_fraction=0.25, buckets=3)
T0 = 1_600_000_000
HALF_STARS = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]


def _plan(ratings: list[float], seed: int = 0, users: int = 12, items: int = 15) -> list[tuple]:
    """(user, item, rating, timestamp) records: user u rates 3..16 distinct items; pairs share a
    timestamp (ties broken by item_id); one extra item ("i99") is rated once."""
    rng = random.Random(seed)
    recs = []
    for u in range(users):
        n = min(3 + (u * 5) % 14, items)
        for j, i in enumerate(rng.sample(range(items), n)):
            recs.append((f"u{u:02d}", f"i{i:02d}", rng.choice(ratings), T0 + u * 10_000 + 60 * (j // 2)))
    recs.append(("u05", "i99", ratings[-1], T0 + 5))
    return recs


def _titles(items: int = 15, without: tuple[str, ...] = ("i07",)) -> dict[str, str]:
    """Item titles (commas inside), none for ``without``; "i99" has one."""
    titles = {f"i{i:02d}": f"Title {i}, The ({1990 + i})" for i in range(items)}
    titles["i99"] = "Rare, A (2001)"
    return {k: v for k, v in titles.items() if k not in without}


def _reference(recs: list[tuple], titles: dict[str, str], opts: ImportOptions, label=lambda v: v):
    """The documented order in plain Python. recs: (user, item, raw label, ts[, history]) that parse.
    -> (train rows, valid rows, dropped counts); a row is (user, item, label, item_text, ts[, history])."""
    dropped = Counter()
    rows = []
    for r in recs:
        if r[1] in titles or opts.missing_text == "item_id":
            rows.append(r)
        else:
            dropped["missing_item_text"] += 1
    per_item = Counter(r[1] for r in rows)
    by_user = defaultdict(list)
    for r in rows:
        if per_item[r[1]] >= opts.min_item_interactions:
            by_user[r[0]].append(r)
        else:
            dropped["item_below_min"] += 1
    train, valid = [], []
    for rs in by_user.values():
        if len(rs) < opts.min_user_interactions:
            dropped["user_below_min"] += len(rs)
            continue
        rs.sort(key=lambda r: (r[3], r[1]))
        if opts.max_per_user and len(rs) > opts.max_per_user:
            dropped["over_max_per_user"] += len(rs) - opts.max_per_user
            rs = rs[-opts.max_per_user :]
        m = len(rs)
        nv = min(max(1, math.floor(opts.valid_fraction * m + 0.5)), m - 1) if opts.valid_fraction else 0
        out = [(r[0], r[1], float(label(r[2])), titles.get(r[1], r[1]), r[3], *r[4:]) for r in rs]
        train += out[: m - nv]
        valid += out[m - nv :]
    return sorted(train), sorted(valid), dropped


def _rows(root: str, split: str, task: str) -> list[tuple]:
    """Rows of OUT/split, checked: schema, values, and sorted by (user_id, timestamp, item_id) per part."""
    want = schema.interactions_schema(task)
    rows = []
    for f in storage.list_files(os.path.join(root, split), ".parquet"):
        t = pq.read_table(f)
        assert t.schema.equals(want, check_metadata=False)
        schema.check_interactions_schema(f, t.schema)
        schema.check_interaction_values(f, task, t)
        part = list(zip(*(t[c].to_pylist() for c in want.names)))
        keys = [(r[0], r[-1], r[1]) for r in part]
        assert keys == sorted(keys)
        rows += [(r[0], r[1], r[2], r[3], r[-1], *r[4:-1]) for r in part]
    return sorted(rows)


def _check(root: str, meta: dict, expected, task: str = "rating") -> None:
    train, valid, dropped = expected
    assert _rows(root, "train", task) == train
    assert _rows(root, "valid", task) == valid
    assert meta["rows"] == {"train": len(train), "valid": len(valid)}
    assert meta["users"] == len({r[0] for r in train + valid})
    assert meta["items"] == len({r[1] for r in train + valid})
    for reason in ("missing_item_text", "item_below_min", "user_below_min", "over_max_per_user"):
        assert meta["dropped"][reason] == dropped[reason], reason
    assert meta["rows_read"] == sum(meta["dropped"].values()) + len(train) + len(valid)
    assert meta["generator"] == "puma_ray.importers" and meta["complete"] and meta["task"] == task
    assert storage.read_json(os.path.join(root, "meta.json")) == meta
    assert not os.path.exists(os.path.join(root, "_tmp"))


def _write(path: str, lines: list[str], encoding: str = "utf-8") -> None:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write("".join(line + "\n" for line in lines).encode(encoding))


# ---------------------------------------------------------------------------------------------
# Formats


def test_movielens_latest_half_stars_quoted_titles_and_bad_lines(tmp_path, capsys):
    recs = _plan(HALF_STARS)
    titles = _titles()
    src = tmp_path / "ml-latest-small"
    src.mkdir()
    bad = ["garbage line", "u01,i01,abc,5", "u01,i01,6,5", "u01,i01,0.25,5", "u01,,3,5", "u01,i02,3,soon"]
    _write(
        str(src / "ratings.csv"),
        ["userId,movieId,rating,timestamp", *(f"{u},{i},{r},{t}" for u, i, r, t in recs), *bad],
    )
    _write(str(src / "movies.csv"), ["movieId,title,genres", *(f'{i},"{t}",Drama|Comedy' for i, t in titles.items())])
    out = str(tmp_path / "out")
    meta = import_interactions("movielens", str(src), out, OPTS)
    assert meta["variant"] == "ml-latest" and meta["format"] == "movielens"
    assert "import movielens:" in capsys.readouterr().err
    _check(out, meta, _reference(recs, titles, OPTS, label=math.ceil))
    d = meta["dropped"]
    assert (d["malformed_line"], d["bad_rating"], d["missing_field"], d["bad_timestamp"]) == (1, 3, 1, 1)
    assert d["item_below_min"] >= 1 and d["user_below_min"] > 0 and d["over_max_per_user"] > 0
    assert d["missing_item_text"] == sum(r[1] == "i07" for r in recs)
    assert meta["item_table"]["items_with_text"] == len(titles)
    # the same half stars under the other rules
    for rule, fn in (("round", lambda v: math.floor(v + 0.5)), ("scale", lambda v: 1 + (v - 0.5) * 4 / 4.5)):
        opts = OPTS.model_copy(update={"rating_rule": rule})
        meta = import_interactions("movielens", str(src), out, opts)
        train, valid, _ = _reference(recs, titles, opts, label=fn)
        for split, want in (("train", train), ("valid", valid)):
            got = _rows(out, split, "rating")
            assert [r[:2] + r[3:] for r in got] == [r[:2] + r[3:] for r in want]
            assert [r[2] for r in got] == pytest.approx([r[2] for r in want]), rule
    strict = OPTS.model_copy(update={"rating_rule": "strict"})
    meta = import_interactions("movielens", str(src), out, strict)
    assert meta["dropped"]["bad_rating"] == 3 + sum(r[2] != int(r[2]) for r in recs)


@pytest.mark.parametrize("variant", ["ml-100k", "ml-1m"])
def test_movielens_100k_and_1m_latin1(tmp_path, variant):
    recs = _plan([1, 2, 3, 4, 5], seed=1)
    titles = {k: v.replace("Title", "Café") for k, v in _titles().items()}
    src = tmp_path / variant
    src.mkdir()
    if variant == "ml-100k":
        _write(str(src / "u.data"), [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in recs])
        movies = [f"{i}|{t}|01-Jan-1995||http://example.invalid|0|1|0" for i, t in titles.items()]
        _write(str(src / "u.item"), movies, "latin-1")
    else:
        _write(str(src / "ratings.dat"), [f"{u}::{i}::{r}::{t}" for u, i, r, t in recs])
        _write(str(src / "movies.dat"), [f"{i}::{t}::Drama|Comedy" for i, t in titles.items()], "latin-1")
    out = str(tmp_path / "out")
    meta = import_interactions("movielens", str(src / ("u.data" if variant == "ml-100k" else "")), out, OPTS)
    assert meta["variant"] == variant
    _check(out, meta, _reference(recs, titles, OPTS))
    assert any("Café" in r[3] for r in _rows(out, "train", "rating"))


def test_recbole_atomic_files(tmp_path):
    recs = _plan([1, 2, 3, 4, 5], seed=2)
    titles = _titles()
    _write(
        str(tmp_path / "ml.inter"),
        [
            "user_id:token\titem_id:token\trating:float\ttimestamp:float",
            *(f"{u}\t{i}\t{r}\t{t}.0" for u, i, r, t in recs),
        ],
    )
    items = [f"{i}\t{t}\t{1990 + n}\tDrama Comedy" for n, (i, t) in enumerate(titles.items())]
    _write(
        str(tmp_path / "ml.item"), ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq", *items]
    )
    out = str(tmp_path / "out")
    meta = import_interactions("recbole", str(tmp_path / "ml.inter"), out, OPTS)
    _check(out, meta, _reference(recs, titles, OPTS))
    genre = OPTS.model_copy(update={"text_field": "class"})
    meta = import_interactions("recbole", str(tmp_path), out, genre)
    assert {r[3] for r in _rows(out, "train", "rating")} == {"Drama Comedy"}
    clicks = [f"{u}\t{i}\t{int(r > 3)}\t{t}" for u, i, r, t in recs]
    _write(str(tmp_path / "ml.inter"), ["user_id:token\titem_id:token\tlabel:float\ttimestamp:float", *clicks])
    meta = import_interactions("recbole", str(tmp_path), out, OPTS)
    _check(out, meta, _reference([(u, i, int(r > 3), t, []) for u, i, r, t in recs], titles, OPTS), task="ctr")
    with pytest.raises(PumaError, match=r"ml.item: no field 'genre'"):
        import_interactions("recbole", str(tmp_path), out, OPTS.model_copy(update={"text_field": "genre"}))


def test_amazon2023_gzipped_and_plain_jsonl(tmp_path):
    recs = _plan([1.0, 2.0, 3.0, 4.0, 5.0], seed=3)
    titles = _titles(without=("i07", "i08"))
    reviews = [
        json.dumps(
            {
                "rating": r,
                "title": "ok",
                "text": "fine, really",
                "images": [],
                "asin": i + "x",
                "parent_asin": i,
                "user_id": u,
                "timestamp": t * 1000 + 999,
                "helpful_vote": 0,
                "verified_purchase": True,
            }
        )
        for u, i, r, t in recs
    ]
    reviews += ["{not json", "[1, 2]", json.dumps({"rating": 5.0, "parent_asin": "i01", "timestamp": 1})]
    meta_lines = [
        json.dumps({"main_category": "Books", "title": t, "parent_asin": i, "features": []}) for i, t in titles.items()
    ]
    meta_lines += [json.dumps({"title": "", "parent_asin": "i08"}), json.dumps({"title": "Dup", "parent_asin": "i01"})]
    _write(str(tmp_path / "Books.jsonl.gz"), reviews)
    _write(str(tmp_path / "meta_Books.jsonl"), meta_lines)
    out = str(tmp_path / "out")
    meta = import_interactions("amazon2023", str(tmp_path), out, OPTS)
    _check(out, meta, _reference(recs, titles, OPTS))
    assert (meta["dropped"]["malformed_line"], meta["dropped"]["missing_field"]) == (2, 1)
    assert meta["item_table"] == {
        "lines_read": len(meta_lines),
        "malformed_line": 0,
        "missing_text": 1,
        "duplicate": 1,
        "items_with_text": len(titles),
    }
    assert meta["files"]["interactions"].endswith("Books.jsonl.gz")
    # a truncated download: one line naming the file (here found by the probe, before the output is touched)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "Books.jsonl.gz").write_bytes((tmp_path / "Books.jsonl.gz").read_bytes()[:-20])
    (tmp_path / "cut" / "meta_Books.jsonl").write_bytes((tmp_path / "meta_Books.jsonl").read_bytes())
    with pytest.raises(PumaError, match=r"cut/Books.jsonl.gz: .*[Tt]runcated") as err:
        import_interactions("amazon2023", str(tmp_path / "cut"), out, OPTS)
    assert "\n" not in str(err.value)
    assert storage.read_json(os.path.join(out, "meta.json")) == meta
    # item ids as text instead of dropping; the files named by options
    as_id = OPTS.model_copy(
        update={"missing_text": "item_id", "reviews_file": "Books.jsonl.gz", "meta_file": "meta_Books.jsonl"}
    )
    meta = import_interactions("amazon2023", str(tmp_path), out, as_id)
    _check(out, meta, _reference(recs, titles, as_id))
    assert meta["dropped"]["missing_item_text"] == 0


def test_yelp_reviews_and_business_names(tmp_path):
    recs = _plan([1, 2, 3, 4, 5], seed=4)
    titles = _titles()

    def date(t: int) -> str:
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

    reviews = [
        json.dumps(
            {
                "review_id": f"r{n}",
                "user_id": u,
                "business_id": i,
                "stars": r,
                "useful": 0,
                "text": "tasty",
                "date": date(t),
            }
        )
        for n, (u, i, r, t) in enumerate(recs)
    ]
    reviews.append(
        json.dumps({"review_id": "x", "user_id": "u01", "business_id": "i01", "stars": 4, "date": "yesterday"})
    )
    _write(str(tmp_path / "review.json"), reviews)
    _write(
        str(tmp_path / "business.json"),
        [json.dumps({"business_id": i, "name": t, "city": "X"}) for i, t in titles.items()],
    )
    out = str(tmp_path / "out")
    meta = import_interactions("yelp", str(tmp_path), out, OPTS)
    _check(out, meta, _reference(recs, titles, OPTS))
    assert meta["dropped"]["bad_timestamp"] == 1


def _mind_time(t: int) -> str:
    """MIND's time format: month/day without zero padding, 12-hour clock."""
    d = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    hour = (d.hour - 1) % 12 + 1
    return f"{d.month}/{d.day}/{d.year} {hour}:{d.minute:02d}:{d.second:02d} {'AM' if d.hour < 12 else 'PM'}"


def test_mind_impressions_history_and_labels(tmp_path):
    rng = random.Random(5)
    news = {f"N{n}": f"News title {n}" for n in range(1, 13)}
    news["N6"] = ""  # no title
    history_size = 2
    lines, recs = [], []
    for u in range(8):
        hist = rng.sample(sorted(news), 4)
        known = [h for h in hist[-history_size:] if news[h]]  # the last N ids, those without a title left out
        for k in range(2 + u % 3):
            t = T0 + u * 50_000 + k * 3600 + 7 * 3600 * (u % 2)
            shown = rng.sample(sorted(news), 4)
            labels = [rng.randint(0, 1) for _ in shown]
            imps = " ".join(f"{n}-{c}" for n, c in zip(shown, labels))
            lines.append(f"{len(lines) + 1}\tU{u}\t{_mind_time(t)}\t{' '.join(hist)}\t{imps}")
            recs += [(f"U{u}", n, c, t, [news[h] for h in known]) for n, c in zip(shown, labels)]
    lines += ["99\tU1\t11/11/2019 9:05:58 AM\tN1\tN2", "broken line", "98\tU1\t11/11/2019 9:05:58 AM\tN1\tN2-7"]
    _write(str(tmp_path / "behaviors.tsv"), lines)
    _write(
        str(tmp_path / "news.tsv"),
        [f"{n}\tnews\tsports\t{t}\tabstract\thttp://x.invalid\t[]\t[]" for n, t in news.items()],
    )
    opts = OPTS.model_copy(update={"min_item_interactions": 2, "history_size": history_size, "max_per_user": 10})
    out = str(tmp_path / "out")
    meta = import_interactions("mind", str(tmp_path), out, opts)
    titles = {n: t for n, t in news.items() if t}
    _check(out, meta, _reference(recs, titles, opts), task="ctr")
    d = meta["dropped"]
    assert (d["malformed_line"], d["missing_field"], d["bad_label"]) == (1, 1, 1)
    assert _mind_time(T0) == "9/13/2020 12:26:40 PM"
    assert meta["history_ids_without_text"] > 0


# ---------------------------------------------------------------------------------------------
# Rules, buckets, determinism, errors


def test_rating_rules():
    raw = np.array([0.5, 1.0, 1.5, 2.5, 4.5, 5.0, 0.25, 5.5, np.nan, 3.7])
    want = {
        "ceil": [1, 1, 2, 3, 5, 5, None, None, None, 4],
        "round": [1, 1, 2, 3, 5, 5, None, None, None, 4],
        "scale": [
            1,
            1 + 0.5 / 1.125,
            1 + 1 / 1.125,
            1 + 2 / 1.125,
            1 + 4 / 1.125,
            5,
            None,
            None,
            None,
            1 + 3.2 / 1.125,
        ],
        "strict": [None, 1, None, None, None, 5, None, None, None, None],
    }
    for rule, expected in want.items():
        labels, bad = importers._labels(raw, "rating", rule, 0.5)
        assert bad.tolist() == [e is None for e in expected], rule
        assert labels[~bad] == pytest.approx([e for e in expected if e is not None]), rule
    labels, bad = importers._labels(np.array([0.0, 1.0, 2.0, np.nan]), "ctr", "ceil", 1.0)
    assert bad.tolist() == [False, False, True, True]
    _, bad = importers._labels(np.array([0.5, 1.0]), "rating", "ceil", 1.0)  # outside an integer source's scale
    assert bad.tolist() == [True, False]


def test_buckets_bound_memory_and_partition_users(tmp_path, monkeypatch):
    recs = _plan([1, 2, 3, 4, 5], seed=6, users=40)
    titles = _titles()
    _write(str(tmp_path / "u.data"), [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in recs])
    _write(str(tmp_path / "u.item"), [f"{i}|{t}|x" for i, t in titles.items()])
    seen = []
    read = importers._Buckets.read

    def spy(self, i):
        t = read(self, i)
        seen.append(t)
        return t

    monkeypatch.setattr(importers._Buckets, "read", spy)
    monkeypatch.setattr(importers, "_FLUSH_ROWS", 50)  # several flushes: a bucket is many files
    opts = OPTS.model_copy(update={"buckets": 4, "chunk_lines": 64})
    meta = import_interactions("movielens", str(tmp_path), str(tmp_path / "out"), opts)
    sizes = [t.num_rows for t in seen]
    survivors = len(recs) - meta["dropped"]["missing_item_text"]
    assert len(sizes) == 4 and sum(sizes) == survivors and max(sizes) < survivors / 2
    users = [set(t["user_id"].to_pylist()) for t in seen]
    assert sum(map(len, users)) == len(set().union(*users))  # every user in exactly one bucket
    for split in ("train", "valid"):
        for b in range(4):  # output part b holds users of bucket b only
            part = tmp_path / "out" / split / f"part-{b:05d}.parquet"
            assert not part.exists() or set(pq.read_table(part)["user_id"].to_pylist()) <= users[b]
    _check(str(tmp_path / "out"), meta, _reference(recs, titles, opts))


def test_deterministic_bytes_and_reimport(tmp_path):
    recs = _plan(HALF_STARS, seed=7)
    _write(
        str(tmp_path / "ratings.csv"), ["userId,movieId,rating,timestamp", *(f"{u},{i},{r},{t}" for u, i, r, t in recs)]
    )
    _write(str(tmp_path / "movies.csv"), ["movieId,title,genres", *(f'{i},"{t}",Drama' for i, t in _titles().items())])

    def run(out: str, **update) -> dict[str, bytes]:
        import_interactions("movielens", str(tmp_path), out, OPTS.model_copy(update=update))
        return {os.path.relpath(f, out): storage.read_bytes(f) for f in storage.list_files(out)}

    first = run(str(tmp_path / "a"))
    chunked = run(str(tmp_path / "b"), chunk_lines=7)
    assert {k: v for k, v in first.items() if k != "meta.json"} == {
        k: v for k, v in chunked.items() if k != "meta.json"
    }
    assert first == run(str(tmp_path / "a"))  # a previous import is replaced
    parts = [f"{s}/part-{b:05d}.parquet" for s in ("train", "valid") for b in range(3)]
    assert sorted(first) == [outputs.MARKER, "meta.json", *parts]  # nothing staged is left
    # another process with another hash seed writes the same bytes
    code = (
        "import sys; from puma_ray.datasets.importers import ImportOptions as O, import_interactions as run; "
        "run('movielens', sys.argv[1], sys.argv[2], O.model_validate_json(sys.argv[3]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    argv = [sys.executable, "-c", code, str(tmp_path), str(tmp_path / "c"), OPTS.model_dump_json()]
    subprocess.run(argv, check=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    files = storage.list_files(str(tmp_path / "c"))
    assert {os.path.relpath(f, tmp_path / "c"): storage.read_bytes(f) for f in files} == first
    # one bucket, no cap, no valid split: one train part, and an empty valid part
    opts = OPTS.model_copy(update={"buckets": 1, "max_per_user": 0, "valid_fraction": 0.0})
    meta = import_interactions("movielens", str(tmp_path), str(tmp_path / "a"), opts)
    assert (
        sorted(os.listdir(tmp_path / "a" / "train"))
        == sorted(os.listdir(tmp_path / "a" / "valid"))
        == ["part-00000.parquet"]
    )
    _check(str(tmp_path / "a"), meta, _reference(recs, _titles(), opts, label=math.ceil))
    assert meta["rows"]["valid"] == 0 and meta["dropped"]["over_max_per_user"] == 0


def test_errors_are_one_line_and_write_nothing(tmp_path):
    yelp = tmp_path / "yelp"
    yelp.mkdir()
    _write(
        str(yelp / "review.json"),
        [json.dumps({"user_id": "u", "business_id": "b", "stars": 5, "date": "2020-01-01 00:00:00"})],
    )
    _write(str(yelp / "business.json"), [json.dumps({"business_id": "b", "name": "B"})])
    amazon = tmp_path / "amazon"
    amazon.mkdir()
    _write(str(amazon / "Books.jsonl"), [json.dumps({"user_id": "u", "business_id": "b", "stars": 5})])
    _write(str(amazon / "meta_Books.jsonl"), [json.dumps({"parent_asin": "b", "title": "B"})])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    out = str(tmp_path / "out")
    cases = [
        ("netflix", str(yelp), out, r"unknown import format 'netflix'"),
        ("movielens", str(tmp_path / "nowhere"), out, r"nowhere: not found"),
        ("movielens", str(yelp), out, r"yelp: not a MovieLens directory"),
        ("mind", str(yelp), out, r"yelp: no MIND behaviors.tsv"),
        ("amazon2023", str(yelp), out, r"yelp: expected one Amazon 2023 reviews file"),
        ("amazon2023", str(amazon), out, r"Books.jsonl: line 1 lacks \['parent_asin', 'rating', 'timestamp'\]"),
        ("recbole", str(yelp), out, r"yelp: expected one RecBole .inter file, found none"),
        ("yelp", str(yelp), str(busy), r"busy: not empty and holds no output of `puma-ray data import`.*--overwrite"),
        ("yelp", str(yelp), str(yelp), r"yelp contains the input src.interactions \(\S+/yelp/review.json\)"),
        ("yelp", str(yelp), out, r"review.json: no row kept of 1 record\(s\) read \(dropped: \w+ 1\); nothing written"),
    ]
    for fmt, src, dst, message in cases:
        with pytest.raises(PumaError, match=message) as err:
            import_interactions(fmt, src, dst, OPTS)
        assert "\n" not in str(err.value)
    assert not os.path.exists(out)  # an import that keeps no row writes nothing
    assert os.listdir(busy) == ["notes.txt"] and sorted(os.listdir(yelp)) == ["business.json", "review.json"]
    import_interactions(
        "yelp",
        str(yelp),
        str(busy),
        OPTS.model_copy(update={"min_user_interactions": 1, "min_item_interactions": 1}),
        True,
    )
    assert "notes.txt" in os.listdir(busy) and os.path.exists(busy / "train")  # --overwrite: written into it
    with pytest.raises(ValueError):
        ImportOptions(valid_fraction=1.0)
    with pytest.raises(ValueError):
        ImportOptions(rating_rule="floor")
    with pytest.raises(ValueError):
        ImportOptions(min_user=3)
