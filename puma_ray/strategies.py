"""User-selection strategies, pure numpy/scikit-learn (METHOD.md, "Group-based user selection"; the
paper's Table 4). A strategy is one function in :data:`STRATEGIES`::

    fn(cand Candidates, budget int, cfg SelectConfig, rng np.random.Generator)
        -> (indices (budget,) int64 unique positions in ``cand``, extra dict)

``cand`` holds the candidates' label variances (N,) and two lazily computed signals:
``clusters(cfg, rng, space, coords)``, the K-means cluster of each candidate (N,) (fit on a
bounded random sample, ``cfg.kmeans_sample``, every user assigned) in one of three spaces
("prompt": the source prompts; "pca": their ``cfg.pca_components`` principal components; "ffn":
the source LM's FFN activations, puma_ray.signals) plus, when ``coords``, an (N, cfg.fps_dims)
PCA projection of the prompts; and ``loss()``, each candidate's mean source-model training loss
(N,). ``extra`` goes into the selection summary; its optional key ``"cluster"`` ((budget,) int,
aligned with ``indices``) goes into ``selected.parquet``.

Every cluster strategy splits the budget over clusters the same way (a minimum per cluster, the
rest in proportion to cluster sizes: :func:`_clustered`) and differs only in its space and in how
it draws inside a cluster (uniform, Gaussian-weighted variance or loss strata, farthest points),
so a comparison between them measures that one choice. The stage that streams the store and runs
a strategy is puma_ray.select.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, get_args

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.pipeline import make_pipeline

from puma_ray.config import SelectConfig, Strategy
from puma_ray.errors import PumaError

Space = Literal["prompt", "pca", "ffn"]
Within = Literal["uniform", "variance", "loss", "farthest"]


@dataclass
class Candidates:
    """The users a strategy chooses from (in user_id order): label variances and lazy signals."""

    var: np.ndarray  # (N,) float64
    # (cfg, rng, space, coords) -> ((N,) int64 cluster per candidate, (N, fps_dims) float32 or None)
    clusters: Callable[[SelectConfig, np.random.Generator, Space, bool], tuple[np.ndarray, np.ndarray | None]]
    loss: Callable[[], np.ndarray]  # -> (N,) float64 mean source-model loss per candidate

    def __len__(self) -> int:
        return len(self.var)

    @classmethod
    def from_prompts(
        cls, prompts: np.ndarray, var: np.ndarray, loss: np.ndarray | None = None, ffn: np.ndarray | None = None
    ) -> "Candidates":
        """In-memory candidates (small inputs and tests): prompts (N, w), var (N,), and optionally
        the source losses (N,) and FFN features (N, f)."""

        def clusters(cfg: SelectConfig, rng: np.random.Generator, space: Space, coords: bool):
            x = ffn if space == "ffn" else prompts
            if x is None:
                raise PumaError("select: no FFN features given")
            sample = x[kmeans_sample(len(x), cfg, rng)]
            proj = fit_projection(sample, cfg).transform(x).astype(np.float32) if coords else None
            return fit_space(sample, cfg, space).predict(x), proj

        def source_loss() -> np.ndarray:
            if loss is None:
                raise PumaError("select: no source losses given")
            return loss

        return cls(var, clusters, source_loss)


StrategyFn = Callable[[Candidates, int, SelectConfig, np.random.Generator], tuple[np.ndarray, dict]]
STRATEGIES: dict[str, StrategyFn] = {}


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


def fit_space(sample: np.ndarray, cfg: SelectConfig, space: Space):
    """The fitted clustering of ``space`` (anything with ``.predict((N, w)) -> (N,)``): K-means on
    the rows of ``sample`` (S, w) ("prompt", "ffn"), or on their principal components ("pca")."""
    if space != "pca":
        return fit_kmeans(sample, cfg)
    pca = PCA(n_components=min(cfg.pca_components, *sample.shape), random_state=cfg.seed)
    k = min(cfg.clusters, len(sample))
    return make_pipeline(pca, KMeans(n_clusters=k, n_init=cfg.kmeans_n_init, random_state=cfg.seed)).fit(sample)


def fit_projection(sample: np.ndarray, cfg: SelectConfig) -> PCA:
    """A PCA to ``cfg.fps_dims`` dims fit on ``sample`` (S, w): the space farthest points are found in."""
    return PCA(n_components=min(cfg.fps_dims, *sample.shape), random_state=cfg.seed).fit(sample)


def strata_draw(members: np.ndarray, stat: np.ndarray, take: int, cfg: SelectConfig, rng) -> np.ndarray:
    """Up to ``take`` of ``members`` (m,) without replacement, from ``cfg.variance_groups``
    quantile groups of ``stat`` (m,) with probability ~ weight(group) / size(group)
    (:func:`group_weights`: medium groups favoured); fewer only when zero weights leave too few."""
    weights = group_weights(cfg)
    g = variance_groups(stat, cfg.variance_groups, rng)
    p = weights[g] / np.bincount(g, minlength=cfg.variance_groups)[g]
    size = min(int(take), int(np.count_nonzero(p)))  # a zero weight (floor 0) can't be drawn
    return rng.choice(members, size=size, replace=False, p=p / p.sum())


def farthest_points(members: np.ndarray, coords: np.ndarray, take: int) -> np.ndarray:
    """``take`` of ``members`` (m,) by farthest-point sampling over ``coords`` (m, f): the member
    nearest the mean first, then each time the member farthest from all chosen so far."""
    first = int(np.argmin(((coords - coords.mean(0)) ** 2).sum(1)))
    chosen = [first]
    dist = ((coords - coords[first]) ** 2).sum(1)
    for _ in range(int(take) - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, ((coords - coords[nxt]) ** 2).sum(1))
    return members[np.array(chosen, np.int64)]


def _top_up(picked: np.ndarray, n: int, budget: int, rng) -> tuple[np.ndarray, int]:
    """``picked`` topped up at random to exactly ``budget`` positions of 0..n-1 -> (sorted, added)."""
    short = budget - len(picked)
    if short > 0:
        rest = np.setdiff1d(np.arange(n), picked)
        picked = np.concatenate([picked, rng.choice(rest, size=short, replace=False)])
    return np.sort(picked), int(max(short, 0))


def summary_stats(x: np.ndarray) -> dict:
    """p10/p50/p90/mean of a per-user statistic (None for no users)."""
    if len(x) == 0:
        return {"p10": None, "p50": None, "p90": None, "mean": None}
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    return {"p10": float(p10), "p50": float(p50), "p90": float(p90), "mean": float(np.mean(x))}


def _clustered(
    cand: Candidates, budget: int, cfg: SelectConfig, rng, space: Space = "prompt", within: Within = "uniform"
):
    """K-means clusters in ``space`` -> (budget,) positions, drawn inside each cluster by ``within``.

    1. K-means clusters (``cand.clusters``: sample fit, every user assigned).
    2. A minimum of min(cfg.min_per_cluster, size) per cluster (scaled down proportionally when
       they exceed the budget), the rest in proportion to cluster sizes.
    3. Inside a cluster: "uniform" at random; "variance" / "loss": :func:`strata_draw` on the
       label variance / source loss; "farthest": :func:`farthest_points` in the PCA projection.
    4. A random top-up to exactly ``budget`` (only if the draws above fall short).
    """
    n = len(cand)
    cluster, coords = cand.clusters(cfg, rng, space, within == "farthest")
    cluster = np.asarray(cluster, np.int64)
    stat = {"variance": cand.var, "loss": cand.loss() if within == "loss" else None}.get(within)
    k = int(cluster.max()) + 1
    sizes = np.bincount(cluster, minlength=k)

    minimum = np.minimum(cfg.min_per_cluster, sizes)
    base = apportion(min(budget, int(minimum.sum())), minimum, minimum, tiebreak=sizes)
    extra = apportion(budget - int(base.sum()), sizes, sizes - base, tiebreak=sizes)
    take = base + extra

    chosen = []
    for c in range(k):
        members = np.flatnonzero(cluster == c)
        if take[c] == 0:
            continue
        if stat is not None:
            chosen.append(strata_draw(members, stat[members], int(take[c]), cfg, rng))
        elif within == "farthest":
            chosen.append(farthest_points(members, coords[members], int(take[c])))
        else:
            chosen.append(rng.choice(members, size=int(take[c]), replace=False))
    picked = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    picked, topped_up = _top_up(picked, n, budget, rng)
    info = {
        "cluster": cluster[picked],
        "cluster_sizes": sizes.tolist(),
        "cluster_selected": np.bincount(cluster[picked], minlength=k).tolist(),
        "topped_up": topped_up,
    }
    if stat is not None:
        info["group_weights"] = group_weights(cfg).tolist()
    if within == "loss":
        info["loss"] = {"all": summary_stats(stat), "selected": summary_stats(stat[picked])}
    return picked, info


def _bucketed(cand: Candidates, budget: int, cfg: SelectConfig, rng, stat: np.ndarray):
    """No clusters: :func:`strata_draw` over all users on ``stat`` (N,), topped up to ``budget``."""
    picked = strata_draw(np.arange(len(cand)), stat, budget, cfg, rng)
    picked, topped_up = _top_up(picked, len(cand), budget, rng)
    return picked, {"group_weights": group_weights(cfg).tolist(), "topped_up": topped_up}


# ---------------------------------------------------------------------------------------------
# Strategies (the paper's Table 4)


@strategy("random")
def random_users(cand: Candidates, budget: int, cfg: SelectConfig, rng: np.random.Generator):
    """``budget`` users uniformly at random without replacement (no prompt is read)."""
    return np.sort(rng.choice(len(cand), size=budget, replace=False)), {}


@strategy("variance_buckets")
def variance_buckets(cand: Candidates, budget: int, cfg: SelectConfig, rng: np.random.Generator):
    """Label-variance quantile buckets over all users, drawn with the Gaussian group weights."""
    return _bucketed(cand, budget, cfg, rng, cand.var)


@strategy("loss_buckets")
def loss_buckets(cand: Candidates, budget: int, cfg: SelectConfig, rng: np.random.Generator):
    """Source-loss quantile buckets over all users, drawn with the Gaussian group weights."""
    loss = cand.loss()
    picked, info = _bucketed(cand, budget, cfg, rng, loss)
    return picked, {**info, "loss": {"all": summary_stats(loss), "selected": summary_stats(loss[picked])}}


# The cluster strategies: name -> (space, draw inside a cluster, what it does); each is
# :func:`_clustered` with those two choices, so a comparison between two of them measures one choice.
CLUSTERED: dict[str, tuple[Space, Within, str]] = {
    "kmeans": ("prompt", "uniform", "K-means on the prompts, stratified by cluster size, uniform inside a cluster."),
    "kmeans_pca": (
        "pca",
        "uniform",
        "K-means on the prompts' ``cfg.pca_components`` principal components, uniform inside a cluster.",
    ),
    "kmeans_farthest": (
        "prompt",
        "farthest",
        "K-means on the prompts; farthest-point sampling inside a cluster (in a PCA projection).",
    ),
    "kmeans_loss": ("prompt", "loss", "K-means on the prompts x source-loss strata inside each cluster."),
    "kmeans_variance": (
        "prompt",
        "variance",
        "PUMA: K-means on the prompts x label-variance strata inside each cluster.",
    ),
    "ffn_kmeans": (
        "ffn",
        "uniform",
        "K-means on the source LM's FFN activations given the prompt, uniform inside a cluster.",
    ),
    "ffn_kmeans_variance": (
        "ffn",
        "variance",
        "K-means on the source LM's FFN activations x label-variance strata inside each cluster.",
    ),
}


def cluster_strategy(space: Space, within: Within, doc: str) -> StrategyFn:
    """The strategy that runs :func:`_clustered` in ``space``, drawing ``within`` each cluster."""

    def fn(cand: Candidates, budget: int, cfg: SelectConfig, rng: np.random.Generator):
        return _clustered(cand, budget, cfg, rng, space=space, within=within)

    fn.__doc__ = doc
    return fn


for _name, (_space, _within, _doc) in CLUSTERED.items():
    strategy(_name)(cluster_strategy(_space, _within, _doc))
