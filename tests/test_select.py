import json
from typing import get_args

import numpy as np
import pyarrow as pa
import pytest

from puma_ray import storage
from puma_ray.config import NEEDS_SOURCE_MODEL, MigrateConfig, SelectConfig, Strategy, build, load
from puma_ray.errors import PumaError
from puma_ray.profile import PROFILE_SCHEMA
from puma_ray.schema import StoreMeta, write_prompt_store
from puma_ray.select import read_selected, resolve_budget, select_users
from puma_ray.strategies import (
    STRATEGIES,
    Candidates,
    apportion,
    farthest_points,
    fit_kmeans,
    group_weights,
    kmeans_sample,
    strategy,
)

SIZES = [400, 200, 100, 60]


def blobs(sizes=SIZES, dim=8, seed=0):
    """Well-separated Gaussian blobs -> (prompts (N, dim) float32, true blob id (N,))."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), dim)) * 50
    x = np.concatenate([c + rng.normal(size=(s, dim)) for c, s in zip(centers, sizes)]).astype(np.float32)
    return x, np.repeat(np.arange(len(sizes)), sizes)


ALL = list(get_args(Strategy))


def run(name, prompts, var, budget, seed=0, loss=None, ffn=None, **cfg):
    cfg = SelectConfig(seed=seed, **{"clusters": len(SIZES), "min_per_cluster": 20, **cfg})
    cand = Candidates.from_prompts(prompts, var, loss=loss, ffn=ffn)
    return STRATEGIES[name](cand, budget, cfg, np.random.default_rng(seed))


@pytest.fixture(scope="module")
def data():
    x, blob = blobs()
    var = np.random.default_rng(1).random(len(x))
    return x, var, blob


def signals(x):
    """Stand-ins for the source model's signals: a loss (N,) and FFN features (N, 12) of the prompts."""
    loss = np.abs(x[:, 0]) / 10 + np.random.default_rng(2).random(len(x))
    ffn = np.tanh(x @ np.random.default_rng(3).normal(size=(x.shape[1], 12)) / 10).astype(np.float32)
    return {"loss": loss, "ffn": ffn}


def test_registry():
    """Every strategy of the paper's Table 4 is registered."""
    assert set(STRATEGIES) == {
        "random",
        "variance_buckets",
        "loss_buckets",
        "kmeans",
        "kmeans_pca",
        "kmeans_farthest",
        "kmeans_loss",
        "kmeans_variance",
        "ffn_kmeans",
        "ffn_kmeans_variance",
    }


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("budget", [1, 7, 50, 79, 80, 300, 759, 760])  # 4 clusters * min 20 = 80
def test_exact_budget_unique(data, name, budget):
    x, var, _ = data
    idx, _ = run(name, x, var, budget, **signals(x))
    assert len(idx) == budget and len(np.unique(idx)) == budget
    assert idx.min() >= 0 and idx.max() < len(x)


@pytest.mark.parametrize("name", ALL)
def test_deterministic_per_seed(data, name):
    x, var, _ = data
    a, _ = run(name, x, var, 100, seed=5, **signals(x))
    b, _ = run(name, x, var, 100, seed=5, **signals(x))
    c, _ = run(name, x, var, 100, seed=6, **signals(x))
    np.testing.assert_array_equal(a, b)
    if name != "kmeans_farthest":  # farthest points depend on the seed only through the clusters
        assert set(a) != set(c)


@pytest.mark.parametrize("name", ["kmeans", "kmeans_pca", "kmeans_farthest", "kmeans_loss", "ffn_kmeans"])
def test_cluster_strategies_split_the_budget_like_puma(data, name):
    """All cluster strategies share PUMA's split over clusters (minimum, then proportional); on
    well-separated blobs the clusters are the blobs in every space."""
    x, var, blob = data
    _, puma = run("kmeans_variance", x, var, 300)
    idx, extra = run(name, x, var, 300, **signals(x))
    assert sorted(extra["cluster_selected"]) == sorted(puma["cluster_selected"])
    assert sorted(np.bincount(blob[idx], minlength=len(SIZES))) == sorted(puma["cluster_selected"])


def test_farthest_points_take_the_extremes():
    line = np.linspace(0, 1, 101)[:, None]
    got = farthest_points(np.arange(101) + 1000, line, 3)
    assert got.tolist() == [1050, 1000, 1100]  # the middle, then both ends


def test_kmeans_farthest_spreads_wider_than_uniform(data):
    x, var, _ = data
    spread = {}
    for name in ("kmeans", "kmeans_farthest"):
        idx, extra = run(name, x, var, 120)
        c = extra["cluster"]
        spread[name] = np.mean([np.linalg.norm(x[idx][c == k] - x[idx][c == k].mean(0), axis=1).mean() for k in set(c)])
    assert spread["kmeans_farthest"] > 1.2 * spread["kmeans"]


@pytest.mark.parametrize("name, key", [("loss_buckets", "loss"), ("variance_buckets", "var")])
def test_buckets_favour_the_middle_strata(name, key):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5000, 4)).astype(np.float32)
    stat = rng.random(5000)
    idx, extra = run(name, x, stat if key == "var" else np.zeros(5000), 500, loss=stat)
    share = np.bincount(np.minimum((stat[idx] * 5).astype(int), 4), minlength=5) / len(idx)
    # numpy draws weighted samples one by one without replacement: close to the weights, a bit flatter
    np.testing.assert_allclose(share, extra["group_weights"], atol=0.05)
    assert share[2] > 2 * max(share[0], share[4])
    if name == "loss_buckets":
        assert extra["loss"]["selected"]["mean"] == pytest.approx(stat[idx].mean())


def test_signals_are_computed_only_when_asked(data):
    """A strategy reads only what it needs: no loss for the variance ones, no FFN features for prompt K-means."""
    x, var, _ = data
    for name in [n for n in ALL if n not in NEEDS_SOURCE_MODEL]:
        run(name, x, var, 50)  # from_prompts raises when a missing signal is asked for
    with pytest.raises(PumaError, match="no source losses"):
        run("kmeans_loss", x, var, 50)
    with pytest.raises(PumaError, match="no FFN features"):
        run("ffn_kmeans", x, var, 50)


def test_kmeans_minimum_then_proportional(data):
    x, var, blob = data
    budget, minimum = 300, 20
    idx, extra = run("kmeans_variance", x, var, budget, min_per_cluster=minimum)
    assert sorted(extra["cluster_sizes"]) == sorted(SIZES)
    assert sum(extra["cluster_selected"]) == budget
    # Clusters are the blobs: the selection per blob follows the reported per-cluster counts.
    per_blob = np.bincount(blob[idx], minlength=len(SIZES))
    assert sorted(per_blob) == sorted(extra["cluster_selected"])
    rest = budget - minimum * len(SIZES)
    for size, got in zip(SIZES, per_blob):
        assert got >= minimum
        assert abs((got - minimum) - rest * size / sum(SIZES)) <= 1
    assert np.bincount(extra["cluster"]).tolist() == extra["cluster_selected"]


def test_kmeans_minimum_scaled_down_fairly(data):
    x, var, blob = data
    idx, extra = run("kmeans_variance", x, var, 50, min_per_cluster=20)  # 4 * 20 > 50
    per_blob = np.bincount(blob[idx], minlength=len(SIZES))
    assert per_blob.sum() == 50 and per_blob.max() - per_blob.min() <= 1


def test_kmeans_minimum_capped_by_small_cluster():
    x, _ = blobs([300, 5], seed=2)
    var = np.random.default_rng(0).random(len(x))
    _, extra = run("kmeans_variance", x, var, 40, clusters=2, min_per_cluster=10)
    sel = dict(zip(extra["cluster_sizes"], extra["cluster_selected"]))
    assert sel == {5: 5, 300: 35}


def test_variance_strata_follow_gaussian_weights():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5000, 4)).astype(np.float32)
    var = rng.random(5000)
    idx, extra = run("kmeans_variance", x, var, 1000, clusters=1, variance_groups=5)
    w = np.array(extra["group_weights"])
    np.testing.assert_allclose(w, group_weights(SelectConfig()))
    x_ = np.linspace(-2, 2, 5)
    np.testing.assert_allclose(w, (np.exp(-(x_**2) / 2) + 0.1) / (np.exp(-(x_**2) / 2) + 0.1).sum())
    group = np.minimum((var[idx] * 5).astype(int), 4)  # var ~ U(0,1): quantile groups ~ fifths
    share = np.bincount(group, minlength=5) / len(idx)
    assert share[2] > 2 * max(share[0], share[4])
    assert share[1] > share[0] and share[3] > share[4]
    np.testing.assert_allclose(share, w, atol=0.04)


def test_random_is_roughly_uniform():
    x = np.zeros((100, 2), np.float32)
    counts = np.zeros(100)
    for seed in range(200):
        idx, extra = run("random", x, np.zeros(100), 50, seed=seed)
        counts[idx] += 1
        assert extra == {}
    freq = counts / 200
    assert abs(freq.mean() - 0.5) < 1e-12 and np.abs(freq - 0.5).max() < 0.15


def test_apportion():
    assert apportion(10, np.ones(3), np.full(3, 5), tiebreak=np.array([1, 3, 2])).tolist() == [3, 4, 3]
    assert apportion(10, np.array([1, 1, 100.0]), np.array([5, 5, 2])).tolist() == [4, 4, 2]
    assert apportion(100, np.ones(2), np.array([3, 4])).tolist() == [3, 4]


def test_resolve_budget():
    """An int >= 1 is a user count, a float in (0, 1] a fraction (1.0: every user); nothing else."""
    assert resolve_budget(10, 50, "s") == 10
    assert resolve_budget(1, 50, "s") == 1
    assert resolve_budget(np.int64(7), 50, "s") == 7
    assert resolve_budget(0.2, 50, "s") == 10
    assert resolve_budget(0.001, 50, "s") == 1
    assert resolve_budget(1.0, 50, "s") == 50  # every user, not one
    with pytest.raises(PumaError, match="budget 51 exceeds the 50 users with interactions"):
        resolve_budget(51, 50, "s")
    for bad in (1.5, 2.5, 0, 0.0, -3, -0.5, True, "10"):
        with pytest.raises(PumaError, match="whole user count") as err:
            resolve_budget(bad, 50, "s")
        assert "\n" not in str(err.value)
    with pytest.raises(PumaError, match=r"budget 2.0: a user count is written as an integer \(2\)"):
        resolve_budget(2.0, 50, "s")


@pytest.mark.parametrize(
    "value, message",
    [
        (1.5, "neither a whole user count"),
        (0, "neither a whole user count"),
        (-3, "neither a whole user count"),
        (2.0, r"written as an integer \(2\)"),
        (50.0, r"written as an integer \(50\)"),
    ],
)
def test_budget_config_is_checked_at_load(tmp_path, value, message):
    f = tmp_path / "m.yaml"
    f.write_text("model: {path: m}\nsources: [s]\ndata: {train: t}\noutput: o\n")
    with pytest.raises(PumaError, match=message) as err:
        load(MigrateConfig, str(f), [f"select.budget={value}"])
    assert "select.budget" in str(err.value) and "\n" not in str(err.value)
    assert load(MigrateConfig, str(f), ["select.budget=1.0"]).select.budget == 1.0
    assert isinstance(load(MigrateConfig, str(f), ["select.budget=20"]).select.budget, int)


# ---------------------------------------------------------------------------------------------
# select_users end to end (cluster assignment streams through Ray Data)

META = StoreMeta(model="m", model_fingerprint="f", hidden_size=4, prompt_length=2, template="t", stage="prompts")


@pytest.fixture
def inputs(tmp_path):
    """A prompt store of users s000..s039 and a profile of s000..s034 plus p000..p004 (no prompt)."""
    x, _ = blobs([20, 12, 8], dim=META.width, seed=4)
    ids = [f"s{i:03d}" for i in range(40)]
    order = np.random.default_rng(0).permutation(40)  # store row order must not matter
    store = str(tmp_path / "store")
    write_prompt_store(store, META, [ids[i] for i in order], x[order])
    prof_ids = ids[:35] + [f"p{i:03d}" for i in range(5)]
    var = np.random.default_rng(1).random(40)
    profile = str(tmp_path / "profile")
    storage.write_table(
        f"{profile}/part-00000.parquet",
        pa.Table.from_arrays(
            [pa.array(prof_ids), pa.array(np.full(40, 10, np.int64)), pa.array(np.full(40, 3.0)), pa.array(var)],
            schema=PROFILE_SCHEMA,
        ),
    )
    return store, profile, ids, x


def test_select_users_end_to_end(tmp_path, inputs, capsys, ray_session):
    store, profile, ids, _ = inputs
    out = str(tmp_path / "sel")
    cfg = SelectConfig(budget=10, clusters=3, min_per_cluster=2, seed=7)
    summary = select_users(cfg, store, profile, out)
    assert "5 store user(s) with no interactions" in capsys.readouterr().err
    assert {
        k: summary[k]
        for k in (
            "strategy",
            "budget",
            "candidates",
            "skipped_no_interactions",
            "skipped_no_prompt",
            "selected",
            "seed",
        )
    } == {
        "strategy": "kmeans_variance",
        "budget": 10,
        "candidates": 35,
        "skipped_no_interactions": 5,
        "skipped_no_prompt": 5,
        "selected": 10,
        "seed": 7,
    }
    assert sum(summary["cluster_selected"]) == 10 and sum(summary["cluster_sizes"]) == 35
    assert len(summary["group_weights"]) == cfg.variance_groups
    assert set(summary["variance"]) == {"all", "selected"}
    assert set(summary["variance"]["all"]) == {"p10", "p50", "p90", "mean"}
    assert json.loads(storage.read_bytes(f"{out}/selection.json")) == summary

    table = storage.read_table(f"{out}/selected.parquet")
    assert table.schema.field("user_id").type == pa.string() and table.schema.field("cluster").type == pa.int32()
    chosen = read_selected(out).to_pylist()
    assert chosen == sorted(chosen) and len(set(chosen)) == 10 and set(chosen) <= set(ids[:35])
    assert all(0 <= c < 3 for c in table.column("cluster").to_pylist())

    again = select_users(cfg, store, profile, str(tmp_path / "sel2"))
    assert read_selected(str(tmp_path / "sel2")).to_pylist() == chosen and again == summary


@pytest.mark.parametrize("name", ["kmeans_farthest", "kmeans_pca"])
def test_select_users_streamed_coordinates(tmp_path, inputs, ray_session, name):
    """The strategies whose clusters stream with PCA coordinates (farthest points) or in PCA space."""
    store, profile, ids, _ = inputs
    cfg = SelectConfig(strategy=name, budget=10, clusters=3, min_per_cluster=2, seed=7, fps_dims=2)
    summary = select_users(cfg, store, profile, str(tmp_path / "sel"))
    chosen = read_selected(str(tmp_path / "sel")).to_pylist()
    assert summary["selected"] == len(set(chosen)) == 10 and set(chosen) <= set(ids[:35])
    assert sum(summary["cluster_selected"]) == 10 and sum(summary["cluster_sizes"]) == 35


def test_select_users_random_fraction(tmp_path, inputs, ray_session):
    store, profile, _, _ = inputs
    out = str(tmp_path / "sel")
    summary = select_users(SelectConfig(strategy="random", budget=0.2), store, profile, out)
    assert summary["budget"] == summary["selected"] == 7  # round(0.2 * 35)
    assert "cluster_sizes" not in summary
    assert set(storage.read_table(f"{out}/selected.parquet").column("cluster").to_pylist()) == {-1}


@pytest.mark.parametrize("name", [n for n in ALL if n not in NEEDS_SOURCE_MODEL])
def test_select_users_errors(tmp_path, inputs, name, ray_session):
    """A budget no strategy can fill is one line, before anything is written (the strategies that
    run the source model are refused earlier when it is missing: tests/test_signals.py)."""
    store, profile, _, _ = inputs
    with pytest.raises(PumaError, match="budget 36 exceeds the 35 users with interactions"):
        select_users(SelectConfig(strategy=name, budget=36), store, profile, str(tmp_path / "a"))
    assert not storage.exists(str(tmp_path / "a"))


@pytest.mark.parametrize("name", NEEDS_SOURCE_MODEL)
def test_source_model_strategies_refuse_a_bare_store(tmp_path, inputs, name):
    store, profile, _, _ = inputs
    with pytest.raises(PumaError, match="must be the prompts/ of a `prompts train` or `migrate` output directory"):
        select_users(SelectConfig(strategy=name), store, profile, str(tmp_path / "a"), "train")
    assert not storage.exists(str(tmp_path / "a"))


def test_strategies_are_one_registry_validated_by_the_config():
    """config.Strategy names exactly the registered functions; an unknown name is refused when the
    config is read (one line), before any work, by every command that takes one (migrate, tune)."""
    assert set(STRATEGIES) == set(get_args(Strategy))
    with pytest.raises(
        PumaError, match=r"select.strategy: Input should be 'random', 'variance_buckets', .* or 'ffn_kmeans_variance'"
    ):
        build(
            MigrateConfig,
            {
                "model": {"path": "m"},
                "sources": ["s"],
                "data": {"train": "t"},
                "output": "o",
                "select": {"strategy": "nope"},
            },
        )
    with pytest.raises(ValueError, match="not in config.Strategy"):
        strategy("nope")


def test_streamed_clusters_match_in_memory_kmeans(tmp_path, inputs, ray_session):
    """The store is never held: K-means is fit on a sample read by id, every user assigned by
    map_batches; the result equals fitting and predicting in memory on the same sample."""
    store, profile, ids, x = inputs
    cfg = SelectConfig(budget=10, clusters=3, min_per_cluster=2, kmeans_sample=25, seed=3)
    select_users(cfg, store, profile, str(tmp_path / "sel"))
    streamed = storage.read_table(str(tmp_path / "sel" / "clusters")).sort_by("user_id")
    assert streamed.column("user_id").to_pylist() == sorted(ids)  # every store user, profile or not
    cand = [i for i in range(40) if ids[i] in set(ids[:35])]  # candidates = store users with a profile, in id order
    sample = np.array(cand)[kmeans_sample(len(cand), cfg, np.random.default_rng(cfg.seed))]
    want = fit_kmeans(x[sample], cfg).predict(x)
    assert streamed.column("cluster").to_pylist() == want.tolist()
