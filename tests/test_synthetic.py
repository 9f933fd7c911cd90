"""The synthetic generator: schema, determinism, streaming, and that its structure is real."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import LlamaConfig

from puma_ray import schema, storage
from puma_ray.datasets import synthetic
from puma_ray.errors import PumaError
from puma_ray.identity import model_info
from puma_ray.templates import DEFAULT as DEFAULT_TEMPLATE

USERS = 2000


def _load(root):
    """(train, valid, users) Arrow tables of a synthesized data set."""
    train, valid = pq.read_table(os.path.join(root, "train")), pq.read_table(os.path.join(root, "valid"))
    return train, valid, pq.read_table(os.path.join(root, "users"))


@pytest.fixture(scope="module")
def rating(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rating"))
    meta = synthetic.synthesize(root, USERS, task="rating", seed=3, chunk_users=800, progress=False)
    return root, meta, *_load(root)


@pytest.fixture(scope="module")
def ctr(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ctr"))
    meta = synthetic.synthesize(root, USERS, task="ctr", seed=4, chunk_users=800, progress=False)
    return root, meta, *_load(root)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _per_user(table, col):
    """{user_id: numpy array of ``col`` in file order (time order)}."""
    users = np.asarray(table["user_id"].to_pylist())
    vals = table[col].to_numpy(zero_copy_only=False)
    order = np.argsort(users, kind="stable")
    keys, starts = np.unique(users[order], return_index=True)
    return dict(zip(keys, np.split(vals[order], starts[1:])))


def _rank(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x))


@pytest.mark.parametrize("task", ["rating", "ctr"])
def test_schema_meta_and_values(task, rating, ctr):
    root, meta, train, valid, users = rating if task == "rating" else ctr
    want = schema.interactions_schema(task)
    for split in ("train", "valid"):
        for f in _files(os.path.join(root, split)):
            assert pq.read_schema(os.path.join(root, split, f)).equals(want, check_metadata=False)
    assert train.schema.equals(want, check_metadata=False)
    assert storage.read_json(os.path.join(root, "meta.json")) == meta
    assert meta == {
        "task": task,
        "users": USERS,
        "items": 1000,
        "seed": meta["seed"],
        "words_version": 1,
        "train_rows": train.num_rows,
        "valid_rows": valid.num_rows,
        "generator": "puma_ray.synthetic",
    }
    assert users.column_names == ["user_id", "n_records", "bias", "noise_std"]
    for t in (train, valid):
        schema.check_interaction_values(root, task, t)  # no nulls, labels in range
    labels = np.concatenate([train["label"].to_numpy(), valid["label"].to_numpy()])
    allowed = {1.0, 2.0, 3.0, 4.0, 5.0} if task == "rating" else {0.0, 1.0}
    assert set(np.unique(labels).tolist()) == allowed
    assert train["user_id"][0].as_py() == "u0000000" and len(train["item_id"][0].as_py()) == 7


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    for out, seed in ((a, 7), (b, 7), (c, 8)):
        synthetic.synthesize(out, 300, task="ctr", seed=seed, chunk_users=120, progress=False)
    assert _files(a) == _files(b) == _files(c) and len(_files(a)) == 10
    for f in _files(a):
        with open(os.path.join(a, f), "rb") as fa, open(os.path.join(b, f), "rb") as fb:
            assert fa.read() == fb.read(), f
    for f in ("train/part-00000.parquet", "valid/part-00002.parquet", "users/part-00001.parquet"):
        with open(os.path.join(a, f), "rb") as fa, open(os.path.join(c, f), "rb") as fc:
            assert fa.read() != fc.read(), f


def test_record_counts(rating):
    _, _, train, valid, users = rating
    n = users["n_records"].to_numpy()
    assert len(n) == USERS and n.min() >= 20 and 32 <= n.mean() <= 48 and n.max() <= 600
    assert np.percentile(n, 95) > 2 * np.median(n)  # a long tail
    counts = {u: len(v) for u, v in _per_user(train, "label").items()}
    for u, v in _per_user(valid, "label").items():
        counts[u] += len(v)
    assert [counts[u] for u in users["user_id"].to_pylist()] == n.tolist()


def test_split_is_per_user_by_time(rating):
    _, _, train, valid, users = rating
    tr, va = _per_user(train, "timestamp"), _per_user(valid, "timestamp")
    assert set(tr) == set(va) == set(users["user_id"].to_pylist())
    for u in tr:
        n = len(tr[u]) + len(va[u])
        assert len(va[u]) == max(1, int(np.floor(0.2 * n + 0.5)))
        ts = np.concatenate([tr[u], va[u]])
        assert np.all(np.diff(ts) > 0), u  # strictly increasing, valid after train
    frac = valid.num_rows / (train.num_rows + valid.num_rows)
    assert 0.18 <= frac <= 0.22


def test_zipf_popularity_and_distinct_items(rating):
    _, meta, train, valid, _ = rating
    items = np.concatenate(
        [train["item_id"].to_numpy(zero_copy_only=False), valid["item_id"].to_numpy(zero_copy_only=False)]
    )
    _, counts = np.unique(items, return_counts=True)
    top = np.sort(counts)[::-1][: meta["items"] // 100]
    assert top.sum() / len(items) > 0.15
    pairs = np.char.add(
        np.concatenate(
            [train["user_id"].to_numpy(zero_copy_only=False), valid["user_id"].to_numpy(zero_copy_only=False)]
        ).astype(str),
        items.astype(str),
    )
    assert len(np.unique(pairs)) == len(pairs)  # no user sees an item twice


def test_users_differ_in_noise(rating):
    _, _, train, valid, users = rating
    noise = users["noise_std"].to_numpy()
    assert np.percentile(noise, 90) > 2.5 * np.percentile(noise, 10)
    labels = {**_per_user(train, "label")}
    for u, v in _per_user(valid, "label").items():
        labels[u] = np.concatenate([labels[u], v])
    ids, bias = users["user_id"].to_pylist(), users["bias"].to_numpy()
    emp = np.array([labels[u].std() for u in ids])
    mid = np.abs(bias) < 0.5  # away from the 1/5 clip, label spread follows the user's noise
    assert np.corrcoef(_rank(emp[mid]), _rank(noise[mid]))[0, 1] > 0.4
    means = np.array([labels[u].mean() for u in ids])
    assert np.corrcoef(means, bias)[0, 1] > 0.8


def test_words_come_from_vocabulary(rating, ctr):
    vocab = synthetic.vocabulary()
    assert vocab == synthetic.vocabulary() and len(vocab) == len(set(vocab)) and 150 <= len(vocab) <= 300
    assert all(w.isalpha() and w.islower() for w in vocab)
    words = set()
    for t in (rating[2], rating[3], ctr[2], ctr[3]):
        for text in t["item_text"].to_pylist():
            assert text == " ".join(text.split())
            words.update(text.split())
    for text in ctr[2]["history_text"].to_pylist():
        for title in text:
            words.update(title.split())
    assert words <= set(vocab)
    assert len(words) > 0.9 * len(vocab)


def test_genre_words_carry_signal(rating):
    """Within a user, items of the same genres get closer ratings than items of other genres."""
    _, _, train, _, _ = rating
    genre_of = {w: g for g, ws in enumerate(synthetic.GENRES) for w in ws}
    texts, labels = _per_user(train, "item_text"), _per_user(train, "label")
    same, other = [], []
    for u in texts:
        keys = [frozenset(genre_of[w] for w in t.split() if w in genre_of) for t in texts[u]]
        lab = labels[u]
        for i in range(len(keys)):
            for j in range(i + 1, len(keys)):
                if keys[i] == keys[j]:
                    same.append(abs(lab[i] - lab[j]))
                elif not keys[i] & keys[j]:
                    other.append(abs(lab[i] - lab[j]))
    assert len(same) > 1000 and np.mean(same) < 0.85 * np.mean(other)


def test_ctr_rate_and_history(ctr):
    _, _, train, valid, _ = ctr
    labels = np.concatenate([train["label"].to_numpy(), valid["label"].to_numpy()])
    assert 0.10 <= labels.mean() <= 0.25
    rows = sorted(train.to_pylist() + valid.to_pylist(), key=lambda r: (r["user_id"], r["timestamp"]))
    clicks: dict[str, list[str]] = {}
    nonempty = 0
    for r in rows:
        seen = clicks.setdefault(r["user_id"], [])
        assert r["history_text"] == seen[-5:]
        nonempty += bool(seen)
        if r["label"] == 1.0:
            seen.append(r["item_text"])
    assert nonempty > 0.5 * len(rows)


def test_streams_one_file_per_chunk(tmp_path, capsys):
    out = str(tmp_path / "s")
    meta = synthetic.synthesize(out, 1200, chunk_users=500, seed=1)
    for split in ("train", "valid", "users"):
        assert _files(os.path.join(out, split)) == [f"part-{i:05d}.parquet" for i in range(3)]
    assert pq.read_table(os.path.join(out, "users")).num_rows == 1200
    err = capsys.readouterr().err
    assert err.count("synth: ") == 3 and "1,200/1,200 users" in err
    # Rerunning over its own output replaces it (no stale parts); foreign data is refused.
    synthetic.synthesize(out, 400, chunk_users=500, seed=1, progress=False)
    assert _files(os.path.join(out, "train")) == ["part-00000.parquet"]
    assert meta["train_rows"] + meta["valid_rows"] > 1200 * 20
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(PumaError, match="not a synthetic"):
        synthetic.synthesize(str(tmp_path / "other"), 10, progress=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"users": 0},
        {"users": 10, "task": "regression"},
        {"users": 10, "chunk_users": 0},
        {"users": 10, "seed": -1},
        {"users": 10, "items": 5},
        {"users": 10, "prompt_width": -1},
        {"users": 10, "prompt_width": 4, "prompt_length": 0},
    ],
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(PumaError) as exc:
        synthetic.synthesize(str(tmp_path / "x"), **kwargs)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "x").exists()


def test_prompt_store(tmp_path):
    """--prompt-width: a valid prompt store of every user, one part per chunk, carrying the users'
    latent traits; the interactions are the same bytes as without it."""
    out, plain = str(tmp_path / "p"), str(tmp_path / "plain")
    meta = synthetic.synthesize(out, 1200, seed=5, chunk_users=500, progress=False, prompt_width=8, prompt_length=2)
    synthetic.synthesize(plain, 1200, seed=5, chunk_users=500, progress=False)
    assert _files(os.path.join(out, "prompts")) == [f"part-{i:05d}.parquet" for i in range(3)]
    for f in _files(plain):
        if f != "meta.json":
            with open(os.path.join(out, f), "rb") as a, open(os.path.join(plain, f), "rb") as b:
                assert a.read() == b.read(), f
    smeta, ids, prompts = schema.read_prompt_store(os.path.join(out, "prompts"))  # checks width, NaN, duplicates
    assert (smeta.hidden_size, smeta.prompt_length, smeta.stage, smeta.model) == (8, 2, "synthetic", "synthetic-d8")

    assert smeta.template == DEFAULT_TEMPLATE["rating"]
    assert meta["prompts"] == {
        "model": "synthetic-d8",
        "model_fingerprint": smeta.model_fingerprint,
        "hidden_size": 8,
        "prompt_length": 2,
    }
    users = pq.read_table(os.path.join(out, "users"))
    assert ids == users["user_id"].to_pylist() and prompts.shape == (1200, 16)
    # Prompts carry the user's traits: a linear read-out recovers the bias.
    x = np.c_[prompts, np.ones(len(prompts))]
    bias = users["bias"].to_numpy()
    fit = x @ np.linalg.lstsq(x, bias, rcond=None)[0]
    assert np.corrcoef(fit, bias)[0, 1] > 0.9
    again = str(tmp_path / "again")
    synthetic.synthesize(again, 1200, seed=5, chunk_users=500, progress=False, prompt_width=8, prompt_length=2)
    for f in _files(os.path.join(out, "prompts")):
        with open(os.path.join(out, "prompts", f), "rb") as a, open(os.path.join(again, "prompts", f), "rb") as b:
            assert a.read() == b.read(), f


def test_prompt_store_for_a_model_dir(tmp_path):
    """--prompt-model DIR: the store carries that model's fingerprint; a width it lacks is refused."""

    model = str(tmp_path / "llama")
    LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    ).save_pretrained(model)
    synthetic.synthesize(str(tmp_path / "o"), 30, progress=False, items=100, prompt_width=16, prompt_model=model)
    smeta = schema.read_store_meta(str(tmp_path / "o" / "prompts"))
    assert (smeta.model, smeta.model_fingerprint, smeta.hidden_size) == (model, model_info(model)[0], 16)
    with pytest.raises(PumaError, match="hidden size is 16"):
        synthetic.synthesize(str(tmp_path / "bad"), 30, progress=False, items=100, prompt_width=8, prompt_model=model)


def test_memory_stays_flat(tmp_path):
    """Peak RSS does not grow with the user count (streamed one chunk at a time): 4x the users
    (prompts included), a few MB more at most."""

    code = (
        "import json, resource, sys; from puma_ray.datasets.synthetic import synthesize; "
        "synthesize(sys.argv[1], int(sys.argv[2]), items=2000, chunk_users=4000, progress=False, prompt_width=64); "
        "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))"
    )
    peak = {}
    for users in (8000, 32000):
        run = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / str(users)), str(users)],
            capture_output=True,
            text=True,
            check=True,
        )
        peak[users] = json.loads(run.stdout) / 1024  # MB
    assert peak[32000] - peak[8000] < 40, peak
