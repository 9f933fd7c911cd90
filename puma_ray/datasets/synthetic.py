"""Synthetic per-user interaction data with a known, learnable structure.

Items carry a latent genre vector that shows up as genre words in their titles; users have a
bias, a noise level and a taste vector over genres. Labels mix these (see :func:`synthesize`),
so a model that reads ``item_text`` and remembers a user can beat per-user averages. Optionally a
source prompt store (``OUT/prompts``): each user's prompt is a fixed random linear image of that
user's latent (bias, noise, taste) plus noise, so prompts cluster by taste the way trained ones do.
Output is streamed one chunk of users at a time and is byte-identical for identical arguments.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from puma_ray import outputs, schema, storage
from puma_ray.errors import PumaError
from puma_ray.identity import model_info

WORDS_VERSION = 1
GENRES: tuple[tuple[str, ...], ...] = tuple(
    tuple(line.split())
    for line in """
mipan tenav gladoum dodouk trekand troubrok tilour tetruv thidroth dretrand glytouth rynul goduv sairund
deskour misouk thetaith shaivynd redus shebrurk trylourk narair vesal likoum segym tufouv krounoul fegil
thobynd gular plaivair sharoum poudryrk paglel ridraind brebiv draivan gloufuth vaisen sysyx didraish krygal
skaifav lekrair notairk kokoush koskyth quabus krovais quainel drosoth glyvas zaidem shosim zaidous pegir
bitryrk fyniv tibash zeskim globul lotraix toufash nytrouv fiskas gafir setath thydral glubrev radyth
vokryv tyskosh skutos foudrous mekoun gludrish zaifur rodrous gogouv paiploth menath tyram musken kedux
brikrim thupiv skymex briplex bekrend kekres baitoux vibron gubril luskox rikraik krabash skoskyl replyv
pugloth glipaik fadum gadouv thuvosh larir krybuth maikax glaigath pesuv zokan krefound broubux zodirk
shoumyr libroush shiskark trodak faidrous tabos kraresh skeskesh quykrex kokys pesuk vodith kruvik sasurk
drosush skurys droles burev rupol defuth fudrail sypar byroux quiplaim memath moudrosh bukrain poutreth
""".strip().splitlines()
)
FILLERS: tuple[str, ...] = tuple(
    """
the of and a in on for with at from night story return last first new old great little secret
lost city river house road light dark song game world home day year part edition volume collection
journey tale book north south east west blue red golden silver small big long short deep high
under over after before inside beyond again together alone
""".split()
)
K = len(GENRES)  # number of latent genres
_WPG = len(GENRES[0])  # words per genre
_ITEM_STREAM = 0xFFFFFFFF  # SeedSequence key of the item table (chunks use 0, 1, 2, ...)
_PROMPT_STREAM = 0xFFFFFFFE  # SeedSequence key of the prompt map (and, after the chunk index, of prompt noise)
_T0 = 1_600_000_000  # earliest user start time (unix seconds)


def vocabulary() -> list[str]:
    """Every word that can appear in item_text/history_text: genre words, then fillers."""
    return [w for g in GENRES for w in g] + list(FILLERS)


class _Items:
    """The item table: ids, titles (pa.Array), attributes (n, K), bias (n,), popularity CDF (n,)."""

    def __init__(self, seed: int, n: int):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _ITEM_STREAM]))
        rows = np.arange(n)
        g1 = rng.integers(K, size=n)
        two = rng.random(n) < 0.4
        g2 = (g1 + rng.integers(1, K, size=n)) % K  # a second genre, never equal to g1
        attr = np.zeros((n, K), np.float32)
        attr[rows, g1] = 1.0
        attr[rows[two], g2[two]] = 1.0
        self.attr = attr / np.sqrt(attr.sum(1, keepdims=True))
        self.bias = rng.normal(0.0, 0.3, n)
        # Title: 2-3 genre words (both genres appear when there are two) + 1-3 fillers, shuffled.
        slot_genre = np.stack([g1, np.where(two, g2, g1), np.where(two & (rng.random(n) < 0.5), g2, g1)], 1)
        genre_words = slot_genre * _WPG + rng.integers(_WPG, size=(n, 3))
        fill_words = K * _WPG + rng.integers(len(FILLERS), size=(n, 3))
        used = np.concatenate(
            [np.arange(3) < rng.integers(2, 4, n)[:, None], np.arange(3) < rng.integers(1, 4, n)[:, None]], 1
        )
        order = np.argsort(np.where(used, rng.random((n, 6)), 2.0), axis=1, kind="stable")
        words = np.take_along_axis(np.where(used, np.concatenate([genre_words, fill_words], 1), -1), order, 1)
        vocab = vocabulary()
        self.titles = pa.array([" ".join(vocab[w] for w in row if w >= 0) for row in words.tolist()], pa.string())
        self.ids = pa.array([f"i{i:06d}" for i in range(n)], pa.string())
        pop = np.zeros(n)
        pop[rng.permutation(n)] = 1.0 / np.arange(1, n + 1) ** 1.1  # Zipf over a random ranking
        self.cdf = np.cumsum(pop) / pop.sum()
        self.cdf[-1] = 1.0

    def sample(self, rng: np.random.Generator, user: np.ndarray, n_users: int) -> np.ndarray:
        """Item index per row, by popularity, distinct within each user (redraws duplicates)."""
        n = len(self.cdf)
        item = np.searchsorted(self.cdf, rng.random(len(user)), side="right")
        todo = np.ones(len(user), bool)  # rows of users that may still hold duplicates
        while True:
            rows = np.flatnonzero(todo)
            _, first = np.unique(user[rows] * n + item[rows], return_index=True)
            dup = np.ones(len(rows), bool)
            dup[first] = False
            if not dup.any():
                return item
            redo = rows[dup]
            item[redo] = np.searchsorted(self.cdf, rng.random(len(redo)), side="right")
            todo = np.bincount(user[redo], minlength=n_users)[user] > 0


def _history(user: np.ndarray, first: np.ndarray, click: np.ndarray, titles: pa.Array, item: np.ndarray) -> pa.Array:
    """list<string> per row: titles of the user's up to 5 latest earlier clicks, oldest first.

    Rows are sorted by user, then time; ``first[u]`` is user u's first row."""
    clicked = np.flatnonzero(click)
    before = np.cumsum(click) - click  # clicks (of any user in the chunk) before each row
    h = np.minimum(before - before[first][user], 5)  # the user's own earlier clicks, at most 5
    offsets = np.r_[0, np.cumsum(h)].astype(np.int32)
    pos = np.arange(offsets[-1]) - np.repeat(offsets[:-1], h)
    src = clicked[np.repeat(before - h, h) + pos]
    return pa.ListArray.from_arrays(pa.array(offsets), titles.take(item[src]))


def _chunk(task: str, seed: int, index: int, u0: int, u1: int, items: _Items) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """Users u0..u1-1 -> (interactions with an extra bool column 'valid', ground-truth users table,
    latent features (m, K+2): standardised bias, log noise and taste, for :func:`_prompts`).

    noise_std in the users table only drives rating labels; ctr labels ignore it."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    m = u1 - u0
    cap = min(600, len(items.cdf) // 4)
    n = np.minimum(20 + np.floor(rng.lognormal(2.415, 1.1, m)).astype(np.int64), cap)  # mean ~40
    bias = rng.normal(0.0, 0.7, m)
    noise = 0.6 * np.exp(0.5 * rng.normal(size=m))
    taste = rng.normal(size=(m, K)).astype(np.float32)
    start = _T0 + rng.integers(0, 2 * 365 * 86400, m)
    user = np.repeat(np.arange(m), n)
    first = np.r_[0, np.cumsum(n)[:-1]]
    item = items.sample(rng, user, m)
    gaps = 60 + np.floor(rng.exponential(86400.0, len(user))).astype(np.int64)
    cum = np.cumsum(gaps)
    timestamp = start[user] + cum - (cum[first] - gaps[first])[user]
    affinity = np.einsum("rk,rk->r", taste[user], items.attr[item])
    pos = np.arange(len(user)) - first[user]
    valid = pos >= (n - np.maximum(1, np.floor(0.2 * n + 0.5)).astype(np.int64))[user]
    user_ids = pa.array([f"u{u:07d}" for u in range(u0, u1)], pa.string())
    cols = {"user_id": user_ids.take(user), "item_id": items.ids.take(item)}
    if task == "rating":
        raw = 3.6 + bias[user] + items.bias[item] + 0.6 * affinity + noise[user] * rng.normal(size=len(user))
        cols["label"] = np.clip(np.rint(raw), 1, 5).astype(np.float32)
    else:
        click = rng.random(len(user)) < 1.0 / (1.0 + np.exp(-(-1.9 + bias[user] + 0.8 * affinity)))
        cols["label"] = click.astype(np.float32)
    cols["item_text"] = items.titles.take(item)
    if task == "ctr":
        cols["history_text"] = _history(user, first, click.astype(np.int64), items.titles, item)
    cols["timestamp"] = timestamp
    table = pa.Table.from_pydict(cols, schema=schema.interactions_schema(task)).append_column("valid", pa.array(valid))
    users = pa.table(
        {
            "user_id": user_ids,
            "n_records": n.astype(np.int32),
            "bias": bias.astype(np.float32),
            "noise_std": noise.astype(np.float32),
        }
    )
    latent = np.concatenate([(bias / 0.7)[:, None], (2.0 * np.log(noise / 0.6))[:, None], taste], 1)
    return table, users, latent


def prompt_meta(task: str, width: int, length: int = 1, model: str | None = None) -> schema.StoreMeta:
    """StoreMeta of the synthetic prompt store: d = ``width`` per position, ``length`` positions.

    ``model``: a local model directory (transformers config) makes the store valid for that model
    (its fingerprint; d must equal its hidden size); any other name (default ``synthetic-d<width>``)
    gets a fingerprint hashed from the name and width."""
    name = model or f"synthetic-d{width}"
    if storage.exists(storage.join(name, "config.json")):
        fingerprint, d = model_info(name)
        if d != width:
            raise PumaError(f"{name}: model hidden size is {d}, prompt width {width} asked for")
    else:
        fingerprint = hashlib.sha256(f"puma_ray.synthetic:{name}:{width}".encode()).hexdigest()[:16]
    return schema.StoreMeta(
        model=name,
        model_fingerprint=fingerprint,
        hidden_size=width,
        prompt_length=length,
        template=f"{task}_v1",
        stage="synthetic",
    )  # = templates.DEFAULT[task]


def _prompts(seed: int, index: int, latent: np.ndarray, width: int, proj: np.ndarray) -> np.ndarray:
    """(m, K+2) latent -> (m, width) float32 prompts: 0.1 * latent @ proj + N(0, 0.02^2) noise."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, _PROMPT_STREAM]))
    out = latent.astype(np.float32) @ proj  # float32 x float32: BLAS (a float64 x float32 matmul is not)
    out *= 0.1
    noise = rng.standard_normal((len(latent), width), dtype=np.float32)
    noise *= 0.02
    out += noise
    return out


def synthesize(
    out_uri: str,
    users: int,
    task: str = "rating",
    seed: int = 0,
    items: int | None = None,
    chunk_users: int = 20000,
    progress: bool = True,
    prompt_width: int = 0,
    prompt_length: int = 1,
    prompt_model: str | None = None,
) -> dict:
    """Write train/, valid/, users/ (ground truth) Parquet parts and meta.json under ``out_uri``.

    rating: label = clip(round(3.6 + b_u + c_i + 0.6 t_u.a_i + s_u eps), 1, 5).
    ctr: label ~ Bernoulli(sigmoid(-1.9 + b_u + 0.8 t_u.a_i)); history_text = up to 5 latest
    earlier clicked titles. The last 20% of each user's records (by time) are validation.
    ``prompt_width`` > 0 also writes ``prompts/``, a prompt store of every user (l = ``prompt_length``
    positions of d = ``prompt_width``; metadata from :func:`prompt_meta`), one part per chunk.
    An existing output of this generator at ``out_uri`` is replaced (staged, published at the end with
    meta.json last: a failed run leaves it whole). Returns the meta.json dict.
    """
    if not isinstance(users, int) or users < 1:
        raise PumaError(f"synthetic data: users must be an integer >= 1, got {users!r}")
    if task not in schema.TASKS:
        raise PumaError(f"synthetic data: task must be one of {schema.TASKS}, got {task!r}")
    if not isinstance(chunk_users, int) or chunk_users < 1:
        raise PumaError(f"synthetic data: chunk_users must be an integer >= 1, got {chunk_users!r}")
    if not isinstance(seed, int) or seed < 0:
        raise PumaError(f"synthetic data: seed must be an integer >= 0, got {seed!r}")
    n_items = min(200_000, max(500, users // 2)) if items is None else items
    if not isinstance(n_items, int) or n_items < 100:
        raise PumaError(f"synthetic data: items must be an integer >= 100, got {n_items!r}")
    if not isinstance(prompt_width, int) or prompt_width < 0 or not isinstance(prompt_length, int) or prompt_length < 1:
        raise PumaError(
            f"synthetic data: prompt width must be an integer >= 0 and prompt length >= 1, "
            f"got {prompt_width!r}, {prompt_length!r}"
        )
    pmeta = prompt_meta(task, prompt_width, prompt_length, prompt_model) if prompt_width else None
    staging = outputs.staged(out_uri)
    if any(not f.startswith(staging + "/") for f in storage.list_files(out_uri)):  # a failed run stages only
        meta_uri = storage.join(out_uri, "meta.json")
        if not storage.exists(meta_uri) or storage.read_json(meta_uri).get("generator") != "puma_ray.synthetic":
            raise PumaError(f"{out_uri}: not empty and not a synthetic data set; choose another output path")
    outputs.start_staging(out_uri)  # the parts are staged, published at the end, meta.json last
    item_table = _Items(seed, n_items)
    iface = schema.interactions_schema(task)
    if pmeta is not None:
        proj_rng = np.random.default_rng(np.random.SeedSequence([seed, _PROMPT_STREAM]))
        proj = (proj_rng.normal(size=(K + 2, pmeta.width)) / np.sqrt(K + 2)).astype(np.float32)
    rows = {"train": 0, "valid": 0}
    for index, u0 in enumerate(range(0, users, chunk_users)):
        table, truth, latent = _chunk(task, seed, index, u0, min(users, u0 + chunk_users), item_table)
        part = f"part-{index:05d}.parquet"
        for split, mask in (("train", pc.invert(table["valid"])), ("valid", table["valid"])):
            sub = table.filter(mask).drop_columns(["valid"])
            rows[split] += sub.num_rows
            with storage.parquet_writer(outputs.staged(out_uri, split, part), iface) as w:
                w.write_table(sub)
        with storage.parquet_writer(outputs.staged(out_uri, "users", part), truth.schema) as w:
            w.write_table(truth)
        if pmeta is not None:
            prompts = _prompts(seed, index, latent, pmeta.width, proj)
            with storage.parquet_writer(
                outputs.staged(out_uri, "prompts", part), schema.prompt_store_schema(pmeta)
            ) as w:
                w.write_table(schema.prompt_table(pmeta, truth["user_id"], prompts))
        if progress:
            done = min(users, u0 + chunk_users)
            print(f"synth: {done:,}/{users:,} users, {rows['train'] + rows['valid']:,} rows", file=sys.stderr)
    meta = {
        "task": task,
        "users": users,
        "items": n_items,
        "seed": seed,
        "words_version": WORDS_VERSION,
        "train_rows": rows["train"],
        "valid_rows": rows["valid"],
        "generator": "puma_ray.synthetic",
    }
    if pmeta is not None:
        meta["prompts"] = {
            "model": pmeta.model,
            "model_fingerprint": pmeta.model_fingerprint,
            "hidden_size": pmeta.hidden_size,
            "prompt_length": pmeta.prompt_length,
        }
    gone = [] if pmeta is not None else ["prompts"]  # an earlier data set's prompts would not match
    outputs.publish(out_uri, ["train", "valid", "users", "prompts"], retire=["meta.json", *gone])
    storage.write_json(storage.join(out_uri, "meta.json"), meta)
    return meta
