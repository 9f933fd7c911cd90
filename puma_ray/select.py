"""User selection for adapter training (METHOD.md, "Group-based user selection").

A strategy is one function in :data:`STRATEGIES`::

    fn(cand Candidates, budget int, cfg SelectConfig, rng np.random.Generator)
        -> (indices (budget,) int64 unique positions in ``cand``, extra dict)

``cand`` holds the candidates' label variances (N,) and a ``clusters(cfg, rng)`` function that
returns the K-means cluster of each candidate (N,): fit on a bounded random sample of prompts
(``cfg.kmeans_sample``), assigned to every user. ``extra`` goes into the selection summary; its
optional key ``"cluster"`` ((budget,) int, aligned with ``indices``) goes into ``selected.parquet``.

:func:`select_users` (the stage entry) streams: it reads user ids and the profile (no prompt),
reads only the K-means sample's prompts, and assigns clusters with Ray Data ``map_batches`` over
the store (``selection/clusters/``). It writes ``selected.parquet`` (user_id string, cluster
int32; -1 = no cluster) and ``selection.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data import SaveMode
from sklearn.cluster import KMeans

from puma_ray import storage
from puma_ray.config import SelectConfig, Strategy
from puma_ray.console import say
from puma_ray.errors import PumaError, user_errors
from puma_ray.schema import check_prompt_values, read_store_meta


@dataclass
class Candidates:
    """The users a strategy chooses from (in user_id order): label variances and a cluster function."""

    var: np.ndarray  # (N,) float64
    clusters: Callable[[SelectConfig, np.random.Generator], np.ndarray]  # -> (N,) int64 cluster per candidate

    def __len__(self) -> int:
        return len(self.var)

    @classmethod
    def from_prompts(cls, prompts: np.ndarray, var: np.ndarray) -> "Candidates":
        """In-memory candidates: prompts (N, w), var (N,) (small inputs and tests)."""
        return cls(
            var, lambda cfg, rng: fit_kmeans(prompts[kmeans_sample(len(prompts), cfg, rng)], cfg).predict(prompts)
        )


StrategyFn = Callable[[Candidates, int, SelectConfig, np.random.Generator], tuple[np.ndarray, dict]]
STRATEGIES: dict[str, StrategyFn] = {}

NO_CLUSTER = -1

SELECTED_SCHEMA = pa.schema(
    [pa.field("user_id", pa.string(), nullable=False), pa.field("cluster", pa.int32(), nullable=False)]
)


def strategy(name: str) -> Callable[[StrategyFn], StrategyFn]:
    """Register a strategy function under ``name`` (one of config.Strategy)."""
    if name not in get_args(Strategy):
        raise ValueError(f"strategy {name!r} is not in config.Strategy {get_args(Strategy)}")

    def register(fn: StrategyFn) -> StrategyFn:
        STRATEGIES[name] = fn
        return fn

    return register


# ---------------------------------------------------------------------------------------------
# Building blocks


def apportion(total: int, weights: np.ndarray, caps: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Split ``total`` units over K bins in proportion to ``weights`` (K,), never above ``caps`` (K,).

    Largest-remainder rounding (ties: larger ``tiebreak``, then lower index); units a capped bin
    cannot take are re-split over the others. Returns (K,) int64 summing to min(total, caps.sum()).
    """
    caps = np.asarray(caps, np.int64)
    weights = np.asarray(weights, np.float64)
    tiebreak = np.zeros(len(caps)) if tiebreak is None else np.asarray(tiebreak, np.float64)
    out = np.zeros(len(caps), np.int64)
    left = int(min(total, caps.sum()))
    while left > 0:
        room = caps - out
        open_ = (room > 0) & (weights > 0)
        if not open_.any():  # only zero-weight bins have room: split evenly over them
            open_ = room > 0
            w = open_.astype(np.float64)
        else:
            w = np.where(open_, weights, 0.0)
        quota = left * w / w.sum()
        give = np.minimum(np.floor(quota).astype(np.int64), room)
        short = left - int(give.sum())
        if short > 0:  # largest remainders first, among bins that still have room
            frac = np.where(open_ & (give < room), quota - np.floor(quota), -1.0)
            order = np.lexsort((np.arange(len(caps)), -tiebreak, -frac))
            order = order[frac[order] >= 0][:short]
            give[order] += 1
        out += give
        left -= int(give.sum())
    return out


def group_weights(cfg: SelectConfig) -> np.ndarray:
    """(variance_groups,) normalised weights exp(-x^2/2) + floor, x = linspace(-span, span, groups)."""
    x = np.linspace(-cfg.gaussian_span, cfg.gaussian_span, cfg.variance_groups)
    w = np.exp(-(x**2) / 2) + cfg.gaussian_floor
    return w / w.sum()


def variance_groups(var: np.ndarray, groups: int, rng: np.random.Generator) -> np.ndarray:
    """(m,) group index 0..groups-1 per user: equal-count quantile groups of ``var`` (m,), low to high.

    Groups are cut on ranks, so ties (many users with the same variance) are split at random
    instead of collapsing groups."""
    m = len(var)
    order = np.lexsort((rng.random(m), var))
    g = np.empty(m, np.int64)
    g[order] = np.arange(m) * groups // max(m, 1)
    return g


def kmeans_sample(n: int, cfg: SelectConfig, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of the (at most ``cfg.kmeans_sample``) candidates K-means is fit on."""
    return np.sort(rng.choice(n, size=min(n, cfg.kmeans_sample), replace=False))


def fit_kmeans(sample: np.ndarray, cfg: SelectConfig):
    """scikit-learn KMeans (k = cfg.clusters, at most the sample size) fit on sample (S, w)."""
    k = min(cfg.clusters, len(sample))
    return KMeans(n_clusters=k, n_init=cfg.kmeans_n_init, random_state=cfg.seed).fit(sample)


# ---------------------------------------------------------------------------------------------
# Strategies


@strategy("random")
def random_users(cand: Candidates, budget: int, cfg: SelectConfig, rng: np.random.Generator):
    """``budget`` users uniformly at random without replacement (no prompt is read)."""
    return np.sort(rng.choice(len(cand), size=budget, replace=False)), {}


@strategy("kmeans_variance")
def kmeans_variance(cand: Candidates, budget: int, cfg: SelectConfig, rng: np.random.Generator):
    """PUMA: K-means diversity x label-variance strata -> (budget,) positions in ``cand``.

    1. K-means clusters of the prompts (``cand.clusters``: sample fit, every user assigned).
    2. Per cluster, ``cfg.variance_groups`` variance quantile groups weighted by :func:`group_weights`.
    3. A minimum of min(cfg.min_per_cluster, size) per cluster (scaled down proportionally when
       they exceed the budget), the rest in proportion to cluster sizes; inside a cluster, users
       are drawn without replacement with probability ~ weight(group) / size(group).
    4. A random top-up to exactly ``budget`` (only if the draws above fall short).
    """
    n, var = len(cand), cand.var
    cluster = np.asarray(cand.clusters(cfg, rng), np.int64)
    k = int(cluster.max()) + 1
    sizes = np.bincount(cluster, minlength=k)

    minimum = np.minimum(cfg.min_per_cluster, sizes)
    base = apportion(min(budget, int(minimum.sum())), minimum, minimum, tiebreak=sizes)
    extra = apportion(budget - int(base.sum()), sizes, sizes - base, tiebreak=sizes)
    take = base + extra

    weights = group_weights(cfg)
    chosen = []
    for c in range(k):
        members = np.flatnonzero(cluster == c)
        if take[c] == 0:
            continue
        g = variance_groups(var[members], cfg.variance_groups, rng)
        p = weights[g] / np.bincount(g, minlength=cfg.variance_groups)[g]
        size = min(int(take[c]), int(np.count_nonzero(p)))  # a zero weight (floor 0) can't be drawn
        chosen.append(rng.choice(members, size=size, replace=False, p=p / p.sum()))
    picked = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)

    short = budget - len(picked)
    if short > 0:
        rest = np.setdiff1d(np.arange(n), picked)
        picked = np.concatenate([picked, rng.choice(rest, size=short, replace=False)])
    picked = np.sort(picked)
    selected_per_cluster = np.bincount(cluster[picked], minlength=k)
    return picked, {
        "cluster": cluster[picked],
        "cluster_sizes": sizes.tolist(),
        "cluster_selected": selected_per_cluster.tolist(),
        "group_weights": weights.tolist(),
        "topped_up": int(max(short, 0)),
    }


# ---------------------------------------------------------------------------------------------
# Stage


def resolve_budget(budget: float, n_users: int, uri: str) -> int:
    """``budget`` >= 1: a user count (an integer value); 0 < budget < 1: a fraction of ``n_users``
    (rounded, at least 1). Raises PumaError when the count exceeds ``n_users`` (``uri`` names the input)."""
    if budget >= 1:
        if float(budget) != int(budget):
            raise PumaError(
                f"select: budget {budget} is neither a whole user count (>= 1) nor a fraction (0 < budget < 1)"
            )
        count = int(budget)
    elif budget > 0:
        count = max(1, int(round(budget * n_users)))
    else:
        raise PumaError(f"select: budget must be > 0, got {budget}")
    if count > n_users:
        raise PumaError(f"{uri}: budget {count} exceeds the {n_users} users with interactions")
    return count


def _variance_summary(var: np.ndarray) -> dict:
    if len(var) == 0:
        return {"p10": None, "p50": None, "p90": None, "mean": None}
    p10, p50, p90 = np.percentile(var, [10, 50, 90])
    return {"p10": float(p10), "p50": float(p50), "p90": float(p90), "mean": float(np.mean(var))}


def _assign(batch: pa.Table, km, meta, uri: str) -> pa.Table:
    """map_batches: (user_id, prompt) rows -> (user_id, cluster int32), prompts validated on the way."""
    if batch.num_rows == 0:
        return pa.table({"user_id": pa.array([], pa.string()), "cluster": pa.array([], pa.int32())})
    x = check_prompt_values(uri, meta, batch)
    return pa.table({"user_id": batch.column("user_id"), "cluster": pa.array(km.predict(x).astype(np.int32))})


def stream_clusters(
    store_uri: str, ids: pa.Array, cfg: SelectConfig, rng: np.random.Generator, out_uri: str
) -> np.ndarray:
    """K-means over a prompt store without holding it: fit on the prompts of a random sample of
    ``ids`` (sorted candidate ids, (N,)), assign every store user with Ray Data map_batches into
    ``out_uri`` (user_id, cluster). Returns (N,) int64 clusters aligned with ``ids``."""
    meta = read_store_meta(store_uri)
    sample_ids = ids.take(pa.array(kmeans_sample(len(ids), cfg, rng)))
    sample = storage.read_table(store_uri, filters=pc.field("user_id").isin(sample_ids)).sort_by("user_id")
    km = fit_kmeans(check_prompt_values(store_uri, meta, sample), cfg)
    fs, path = storage.resolve(out_uri)
    storage.ray_read_parquet(store_uri).map_batches(
        _assign,
        fn_kwargs={"km": km, "meta": meta, "uri": store_uri},
        batch_format="pyarrow",
    ).write_parquet(path, filesystem=fs, mode=SaveMode.OVERWRITE)
    assigned = storage.read_table(out_uri).cast(pa.schema([("user_id", pa.string()), ("cluster", pa.int32())]))
    assigned = pa.table({"user_id": ids}).join(assigned, "user_id", join_type="inner").sort_by("user_id")
    return assigned.column("cluster").to_numpy().astype(np.int64)


@user_errors
def select_users(cfg: SelectConfig, source_store_uri: str, profile_uri: str, out_uri: str) -> dict:
    """Entry: choose ``cfg.budget`` users of the prompt store that have interactions in the profile.

    Writes ``out_uri/selected.parquet`` (user_id, cluster; sorted by user_id),
    ``out_uri/selection.json`` (the returned summary) and, for K-means strategies,
    ``out_uri/clusters/`` (every store user's cluster). Store users without interactions and
    profile users without a prompt are counted in the summary and noted on stderr.
    """
    fn = STRATEGIES[cfg.strategy]  # the config accepts only registered names
    store_ids = storage.read_table(source_store_uri, columns=["user_id"]).column("user_id").combine_chunks()
    if pc.count_distinct(store_ids).as_py() != len(store_ids):
        raise PumaError(
            f"{source_store_uri}: {len(store_ids) - pc.count_distinct(store_ids).as_py()} duplicate user_id row(s)"
        )
    profile = storage.read_table(profile_uri)
    missing = [c for c in ("user_id", "label_var") if c not in profile.column_names]
    if missing:
        raise PumaError(f"{profile_uri}: not a user profile (lacks columns {missing})")
    profile = profile.select(["user_id", "label_var"]).cast(
        pa.schema([("user_id", pa.string()), ("label_var", pa.float64())])
    )
    # Candidates in user_id order, so the result does not depend on the store's row order.
    cand = pa.table({"user_id": store_ids}).join(profile, "user_id", join_type="inner").sort_by("user_id")
    no_interactions, no_prompt = len(store_ids) - cand.num_rows, profile.num_rows - cand.num_rows
    if no_interactions or no_prompt:
        say(
            f"select: skipping {no_interactions} store user(s) with no interactions and "
            f"{no_prompt} profile user(s) with no prompt"
        )
    if cand.num_rows == 0:
        raise PumaError(f"{source_store_uri}: no user of the prompt store has interactions in {profile_uri}")
    ids = cand.column("user_id").combine_chunks()
    var = cand.column("label_var").to_numpy()
    budget = resolve_budget(cfg.budget, len(ids), source_store_uri)

    clusters_uri = storage.join(out_uri, "clusters")
    candidates = Candidates(var, lambda c, rng: stream_clusters(source_store_uri, ids, c, rng, clusters_uri))
    picked, extra = fn(candidates, budget, cfg, np.random.default_rng(cfg.seed))
    picked = np.asarray(picked, np.int64)
    if len(picked) != budget or len(np.unique(picked)) != budget:
        raise RuntimeError(
            f"strategy {cfg.strategy!r} returned {len(np.unique(picked))} unique of {len(picked)} users, "
            f"expected {budget}"
        )
    cluster = np.asarray(extra.pop("cluster", np.full(budget, NO_CLUSTER)), np.int32)

    order = np.argsort(picked, kind="stable")  # positions in sorted ids -> selection sorted by user_id
    table = pa.Table.from_arrays([ids.take(pa.array(picked[order])), pa.array(cluster[order])], schema=SELECTED_SCHEMA)
    storage.write_table(storage.join(out_uri, "selected.parquet"), table)

    summary = {
        "strategy": cfg.strategy,
        "budget": budget,
        "budget_requested": cfg.budget,
        "candidates": len(ids),
        "skipped_no_interactions": no_interactions,
        "skipped_no_prompt": no_prompt,
        "selected": budget,
        "seed": cfg.seed,
        "variance": {"all": _variance_summary(var), "selected": _variance_summary(var[picked])},
        **extra,
    }
    storage.write_json(storage.join(out_uri, "selection.json"), summary)
    return summary


def read_selected(out_uri: str) -> pa.Array:
    """The selected user ids (string, sorted) of a :func:`select_users` output directory."""
    path = storage.join(out_uri, "selected.parquet")
    return storage.read_table(path, columns=["user_id"]).column("user_id").combine_chunks()
