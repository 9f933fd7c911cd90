"""User selection for adapter training (METHOD.md, "Group-based user selection").

A strategy is one function in :data:`STRATEGIES`::

    fn(prompts (N, w) float32, var (N,) float64, budget int, cfg SelectConfig, rng np.random.Generator)
        -> (indices (budget,) int64 unique rows of ``prompts``, extra dict)

``extra`` goes into the selection summary; its optional key ``"cluster"`` ((budget,) int, the
cluster of each selected row, aligned with ``indices``) goes into ``selected.parquet`` instead.

:func:`select_users` (the stage entry) reads a prompt store and a user profile
(:mod:`puma_ray.profile`), runs one strategy on the users that have both, and writes
``selected.parquet`` (user_id string, cluster int32; -1 = no cluster) and ``selection.json``.
"""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from puma_ray import storage
from puma_ray.config import SelectConfig
from puma_ray.errors import PumaError, user_errors

Strategy = Callable[[np.ndarray, np.ndarray, int, SelectConfig, np.random.Generator], tuple[np.ndarray, dict]]
STRATEGIES: dict[str, Strategy] = {}

NO_CLUSTER = -1

SELECTED_SCHEMA = pa.schema([pa.field("user_id", pa.string(), nullable=False), pa.field("cluster", pa.int32(), nullable=False)])


def strategy(name: str) -> Callable[[Strategy], Strategy]:
    """Register a strategy function under ``name``."""

    def register(fn: Strategy) -> Strategy:
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


def fit_clusters(prompts: np.ndarray, cfg: SelectConfig, rng: np.random.Generator) -> np.ndarray:
    """(N,) cluster id per row of ``prompts`` (N, w): K-means (k = cfg.clusters, at most the sample
    size) fit on at most ``cfg.kmeans_sample`` random rows, then every row assigned in batches."""
    from sklearn.cluster import KMeans

    n = len(prompts)
    fit_rows = np.sort(rng.choice(n, size=min(n, cfg.kmeans_sample), replace=False))
    k = min(cfg.clusters, len(fit_rows))
    km = KMeans(n_clusters=k, n_init=cfg.kmeans_n_init, random_state=cfg.seed).fit(prompts[fit_rows])
    step = cfg.kmeans_sample
    return np.concatenate([km.predict(prompts[i : i + step]) for i in range(0, n, step)]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Strategies


@strategy("random")
def random_users(prompts: np.ndarray, var: np.ndarray, budget: int, cfg: SelectConfig, rng: np.random.Generator):
    """``budget`` users uniformly at random without replacement. prompts (N, w), var (N,) unused."""
    return np.sort(rng.choice(len(prompts), size=budget, replace=False)), {}


@strategy("kmeans_variance")
def kmeans_variance(prompts: np.ndarray, var: np.ndarray, budget: int, cfg: SelectConfig, rng: np.random.Generator):
    """PUMA: K-means diversity x label-variance strata. prompts (N, w), var (N,) -> (budget,) rows.

    1. K-means clusters of the prompts (:func:`fit_clusters`).
    2. Per cluster, ``cfg.variance_groups`` variance quantile groups weighted by :func:`group_weights`.
    3. A minimum of min(cfg.min_per_cluster, size) per cluster (scaled down proportionally when
       they exceed the budget), the rest in proportion to cluster sizes; inside a cluster, users
       are drawn without replacement with probability ~ weight(group) / size(group).
    4. A random top-up to exactly ``budget`` (only if the draws above fall short).
    """
    n = len(prompts)
    cluster = fit_clusters(prompts, cfg, rng)
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
            raise PumaError(f"select: budget {budget} is neither a whole user count (>= 1) nor a fraction (0 < budget < 1)")
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


@user_errors
def select_users(cfg: SelectConfig, source_store_uri: str, profile_uri: str, out_uri: str) -> dict:
    """Entry: choose ``cfg.budget`` users of the prompt store that have interactions in the profile.

    Writes ``out_uri/selected.parquet`` (user_id, cluster; sorted by user_id) and
    ``out_uri/selection.json`` (the returned summary). Store users without interactions and
    profile users without a prompt are counted in the summary and noted on stderr.
    """
    from puma_ray.profile import read_profile
    from puma_ray.schema import read_prompt_store

    fn = STRATEGIES.get(cfg.strategy)
    if fn is None:
        raise PumaError(f"select: unknown strategy {cfg.strategy!r}; choose one of {sorted(STRATEGIES)}")

    _, store_ids, prompts = read_prompt_store(source_store_uri)
    profile = read_profile(profile_uri)
    store_ids = pd.Index(store_ids, dtype=object)
    profile_ids = pd.Index(profile["user_id"], dtype=object)
    has_rows = store_ids.isin(profile_ids)
    no_interactions = int((~has_rows).sum())
    no_prompt = int((~profile_ids.isin(store_ids)).sum())
    if no_interactions or no_prompt:
        print(f"select: skipping {no_interactions} store user(s) with no interactions and "
              f"{no_prompt} profile user(s) with no prompt", file=sys.stderr)

    # Candidates in user_id order, so the result does not depend on the store's row order.
    rows = np.flatnonzero(has_rows)
    rows = rows[np.argsort(store_ids[rows].to_numpy(), kind="stable")]
    ids = store_ids[rows].to_numpy()
    if len(ids) == 0:
        raise PumaError(f"{source_store_uri}: no user of the prompt store has interactions in {profile_uri}")
    var = profile.set_index("user_id")["label_var"].reindex(ids).to_numpy(np.float64)
    budget = resolve_budget(cfg.budget, len(ids), source_store_uri)

    picked, extra = fn(prompts[rows], var, budget, cfg, np.random.default_rng(cfg.seed))
    picked = np.asarray(picked, np.int64)
    if len(picked) != budget or len(np.unique(picked)) != budget:
        raise RuntimeError(f"strategy {cfg.strategy!r} returned {len(np.unique(picked))} unique of {len(picked)} users, expected {budget}")
    cluster = np.asarray(extra.pop("cluster", np.full(budget, NO_CLUSTER)), np.int32)

    order = np.argsort(ids[picked], kind="stable")
    table = pa.Table.from_arrays([pa.array(ids[picked][order].tolist(), pa.string()), pa.array(cluster[order])],
                                 schema=SELECTED_SCHEMA)
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


def read_selected(out_uri: str) -> list[str]:
    """The selected user ids (sorted) of a :func:`select_users` output directory."""
    return storage.read_table(storage.join(out_uri, "selected.parquet"), columns=["user_id"]).column("user_id").to_pylist()
